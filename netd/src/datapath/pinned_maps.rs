//! The pinned maps against this build's definitions of them.
//!
//! Programs reuse the maps pinned by name, and aya reuses a pinned map whatever its shape: a
//! netd whose map grew (more entries) or whose key or value changed would run its programs on
//! an older netd's map, failing later ("index 37 but max_entries is 37") or reading a value of
//! the wrong size. So every load first compares each pinned map (`bpf_map_info`) with the
//! object's definition:
//!
//! - the same: reused;
//! - only the number of entries differs (and the preallocation flag), for a map whose entries
//!   can be copied: `netd reload` makes the new map, copies the entries, and swaps the pin
//!   ([`Upgrade`]); any other load refuses, pointing at `netd reload`;
//! - the type, key, value or flags differ: refused before anything is touched, naming the map
//!   and the change (the entries can't be translated).

use std::{
    collections::BTreeMap,
    fmt, fs, io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{MapData, MapInfo};
use aya_obj::maps::PinningType;

use super::link_update::{bpf, fd_u32, open_pinned, program_by_id};

/// bpf(2) map types netd uses (include/uapi/linux/bpf.h).
const HASH: u32 = 1;
const ARRAY: u32 = 2;
const PROG_ARRAY: u32 = 3;
const PERCPU_HASH: u32 = 5;
const PERCPU_ARRAY: u32 = 6;
const LRU_HASH: u32 = 9;
const LRU_PERCPU_HASH: u32 = 10;
const LPM_TRIE: u32 = 11;
const RINGBUF: u32 = 27;

/// `BPF_F_NO_PREALLOC`: a hash map allocates each entry when it is added. Changing it is a
/// resize: the entries copy over the same.
pub const NO_PREALLOC: u32 = 1;

/// What the kernel knows of a map's layout and size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub kind: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl Shape {
    /// The shape of the map pinned at `path`.
    pub fn of_pin(path: &Path) -> Result<Self> {
        let info = MapInfo::from_pin(path).with_context(|| format!("open {}", path.display()))?;
        Ok(Self {
            kind: info.map_type().map_or(u32::MAX, |t| t as u32),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        })
    }

    /// The shape aya creates for the object's definition `def` (a ring buffer's size rounded
    /// up as aya and libbpf round it; its value size is 0).
    fn of_definition(def: &aya_obj::Map) -> Self {
        let mut shape = Self {
            kind: def.map_type(),
            key_size: def.key_size(),
            value_size: def.value_size(),
            max_entries: def.max_entries(),
            flags: def.map_flags(),
        };
        if shape.kind == RINGBUF {
            shape.value_size = 0;
            shape.max_entries = ring_size(shape.max_entries);
        }
        shape
    }

    /// Whether the entries of a map of this shape can be copied to a bigger or smaller one.
    fn copyable(&self) -> bool {
        matches!(
            self.kind,
            HASH | ARRAY | PERCPU_HASH | PERCPU_ARRAY | LRU_HASH | LRU_PERCPU_HASH | LPM_TRIE
        )
    }

    fn per_cpu(&self) -> bool {
        matches!(self.kind, PERCPU_HASH | PERCPU_ARRAY | LRU_PERCPU_HASH)
    }

    fn array(&self) -> bool {
        matches!(self.kind, ARRAY | PERCPU_ARRAY)
    }
}

/// A ring buffer's size as the kernel takes it: a power-of-two number of pages.
fn ring_size(bytes: u32) -> u32 {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |p| p as u32);
    if bytes == 0 {
        return 0;
    }
    bytes.div_ceil(page).next_power_of_two() * page
}

fn kind_name(kind: u32) -> String {
    match kind {
        HASH => "hash".into(),
        ARRAY => "array".into(),
        PERCPU_HASH => "percpu_hash".into(),
        PERCPU_ARRAY => "percpu_array".into(),
        LRU_HASH => "lru_hash".into(),
        LRU_PERCPU_HASH => "lru_percpu_hash".into(),
        LPM_TRIE => "lpm_trie".into(),
        PROG_ARRAY => "prog_array".into(),
        RINGBUF => "ringbuf".into(),
        other => format!("type {other}"),
    }
}

/// A pinned map to make again with this build's number of entries.
#[derive(Clone, Debug)]
pub struct Resize {
    pub name: String,
    pub pinned: Shape,
    pub wanted: Shape,
}

impl fmt::Display for Resize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "map {}: ", self.name)?;
        if self.pinned.max_entries != self.wanted.max_entries {
            write!(
                f,
                "{} → {} entries",
                self.pinned.max_entries, self.wanted.max_entries
            )?;
        }
        if self.pinned.flags != self.wanted.flags {
            let alloc = |flags: u32| {
                if flags & NO_PREALLOC == 0 {
                    "preallocated"
                } else {
                    "allocated per entry"
                }
            };
            if self.pinned.max_entries != self.wanted.max_entries {
                f.write_str(", ")?;
            }
            write!(
                f,
                "{} → {}",
                alloc(self.pinned.flags),
                alloc(self.wanted.flags)
            )?;
        }
        Ok(())
    }
}

/// How a pinned map differs from this build's definition, when its entries can't be carried
/// over: `value 48 → 56 bytes`.
fn layout_change(pinned: &Shape, wanted: &Shape) -> Option<String> {
    let mut changes = Vec::new();
    if pinned.kind != wanted.kind {
        changes.push(format!(
            "type {} → {}",
            kind_name(pinned.kind),
            kind_name(wanted.kind)
        ));
    }
    if pinned.key_size != wanted.key_size {
        changes.push(format!(
            "key {} → {} bytes",
            pinned.key_size, wanted.key_size
        ));
    }
    if pinned.value_size != wanted.value_size {
        changes.push(format!(
            "value {} → {} bytes",
            pinned.value_size, wanted.value_size
        ));
    }
    if (pinned.flags ^ wanted.flags) & !NO_PREALLOC != 0 {
        changes.push(format!("flags {:#x} → {:#x}", pinned.flags, wanted.flags));
    }
    if changes.is_empty() && pinned != wanted && !wanted.copyable() && wanted.kind != RINGBUF {
        changes.push(format!(
            "{} → {} entries of a {} map, which can't be copied",
            pinned.max_entries,
            wanted.max_entries,
            kind_name(wanted.kind)
        ));
    }
    (!changes.is_empty()).then(|| changes.join(", "))
}

/// The pinned maps' shapes as this build defines them, by name.
fn wanted_shapes(object: &[u8]) -> Result<BTreeMap<String, Shape>> {
    let object = aya_obj::Object::parse(object).context("parse the eBPF object")?;
    Ok(object
        .maps
        .iter()
        .filter(|(_, def)| def.pinning() == PinningType::ByName)
        .map(|(name, def)| (name.clone(), Shape::of_definition(def)))
        .collect())
}

/// Compares the maps pinned in `maps_dir` with the definitions of `object` (the maps named in
/// `keep_size` keep their pinned number of entries: they are sized at creation). Returns the
/// maps to resize; fails in one line when a layout changed. Maps not pinned yet are fine: the
/// load creates them.
pub fn check(maps_dir: &Path, object: &[u8], keep_size: &[&str]) -> Result<Vec<Resize>> {
    let mut resizes = Vec::new();
    let mut changed = Vec::new();
    for (name, mut wanted) in wanted_shapes(object)? {
        let path = maps_dir.join(&name);
        if !path.exists() {
            continue;
        }
        let pinned = Shape::of_pin(&path)?;
        if keep_size.contains(&name.as_str()) {
            wanted.max_entries = pinned.max_entries;
        }
        if let Some(change) = layout_change(&pinned, &wanted) {
            changed.push(format!("map {name}: {change}"));
        } else if pinned != wanted {
            resizes.push(Resize {
                name,
                pinned,
                wanted,
            });
        }
    }
    if !changed.is_empty() {
        let root = maps_dir.parent().unwrap_or(maps_dir);
        bail!(
            "{}: this netd can't use the maps pinned under {root}; remove every container and \
             network (netd container rm, netd network rm), then the pins (rm -r {root}), and \
             create them again",
            changed.join("; "),
            root = root.display()
        );
    }
    Ok(resizes)
}

/// A `netd reload` that resizes pinned maps. The new maps are made and filled beside the old
/// ones (`maps-next/`), the old pins set aside (`maps-old/`) when the new ones take their
/// place, and dropped only once every program runs on the new maps: until then
/// [`Upgrade::abort`] puts everything back, and the old programs never stopped using the old
/// maps.
pub struct Upgrade {
    maps: PathBuf,
    next: PathBuf,
    old: PathBuf,
    pub resizes: Vec<Resize>,
}

impl Upgrade {
    /// Prepares the resizes of the maps pinned in `maps_dir`, putting back first what a
    /// reload killed midway left set aside.
    pub fn prepare(maps_dir: &Path, resizes: Vec<Resize>) -> Result<Self> {
        let upgrade = Self {
            maps: maps_dir.to_path_buf(),
            // bpffs takes no '.' in a name.
            next: sibling(maps_dir, "next"),
            old: sibling(maps_dir, "old"),
            resizes,
        };
        upgrade.restore_set_aside()?;
        remove_dir(&upgrade.next)?;
        if !upgrade.resizes.is_empty() {
            fs::create_dir_all(&upgrade.next)
                .with_context(|| format!("create {}", upgrade.next.display()))?;
        }
        Ok(upgrade)
    }

    /// Where the new map `name` is pinned until it replaces the old one.
    pub fn staged(&self, name: &str) -> PathBuf {
        self.next.join(name)
    }

    /// Copies every entry of the old maps into the new ones (made by the load, pinned at
    /// [`Upgrade::staged`]).
    pub fn copy_entries(&self) -> Result<()> {
        for resize in &self.resizes {
            let from = MapData::from_pin(self.maps.join(&resize.name))
                .with_context(|| format!("open map {}", resize.name))?;
            let to = MapData::from_pin(self.staged(&resize.name))
                .with_context(|| format!("open the new map {}", resize.name))?;
            copy_entries(from.fd().as_fd(), to.fd().as_fd(), resize)?;
        }
        Ok(())
    }

    /// Puts the new maps' pins in place of the old ones, which are set aside; all or none.
    pub fn swap(&self) -> Result<()> {
        if self.resizes.is_empty() {
            return Ok(());
        }
        fs::create_dir_all(&self.old).with_context(|| format!("create {}", self.old.display()))?;
        for resize in &self.resizes {
            let pin = self.maps.join(&resize.name);
            let swapped = rename(&pin, &self.old.join(&resize.name))
                .and_then(|()| rename(&self.staged(&resize.name), &pin));
            if let Err(e) = swapped {
                self.abort();
                return Err(e);
            }
        }
        Ok(())
    }

    /// Undoes the upgrade: the old pins back in place, the new maps dropped.
    pub fn abort(&self) {
        let _ = self.restore_set_aside();
        let _ = remove_dir(&self.next);
    }

    /// Drops the old pins: every program runs on the new maps (the old maps go with the last
    /// program using them).
    pub fn finish(&self) -> Result<()> {
        remove_dir(&self.old)?;
        remove_dir(&self.next)
    }

    /// Moves the pins set aside back in place (the new map's pin, if there, goes back to
    /// `maps-next/`, which is then dropped).
    fn restore_set_aside(&self) -> Result<()> {
        let Ok(entries) = fs::read_dir(&self.old) else {
            return Ok(());
        };
        for entry in entries {
            let name = entry?.file_name();
            let pin = self.maps.join(&name);
            if pin.exists() {
                fs::create_dir_all(&self.next)?;
                rename(&pin, &self.next.join(&name))?;
            }
            rename(&self.old.join(&name), &pin)?;
        }
        remove_dir(&self.old)
    }
}

/// `DIR-suffix` beside `dir`.
fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(format!("-{suffix}"));
    dir.with_file_name(name)
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    fs::rename(from, to)
        .with_context(|| format!("move the pin {} to {}", from.display(), to.display()))
}

/// Removes a pin directory and what it holds, if it is there.
fn remove_dir(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// bpf(2) commands on map elements.
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// `union bpf_attr` for the element commands.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    /// The value, or the next key.
    value: u64,
    flags: u64,
}

/// Copies every entry of map `from` into `to`, as bytes (`resize` gives their shapes). Fails
/// naming the map when they don't fit.
fn copy_entries(from: BorrowedFd<'_>, to: BorrowedFd<'_>, resize: &Resize) -> Result<()> {
    let shape = &resize.pinned;
    if !shape.copyable() {
        // A ring buffer holds only events not read yet: the new one starts empty.
        return Ok(());
    }
    let value_len = if shape.per_cpu() {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        shape.value_size.next_multiple_of(8) as usize * cpus
    } else {
        shape.value_size as usize
    };
    let mut value = vec![0u8; value_len];
    let keys = if shape.array() {
        array_keys(shape.max_entries)
    } else {
        hash_keys(from, shape.key_size as usize)?
    };
    for key in keys {
        if lookup(from, &key, &mut value).is_err() {
            // Removed since it was listed.
            continue;
        }
        let index = shape
            .array()
            .then(|| u32::from_ne_bytes(key[..4].try_into().unwrap()));
        if index.is_some_and(|i| i >= resize.wanted.max_entries) {
            if value.iter().any(|b| *b != 0) {
                bail!("{resize}: slot {} is in use", index.unwrap_or_default());
            }
            continue;
        }
        update(to, &key, &value).map_err(|e| match e.raw_os_error() {
            Some(libc::E2BIG | libc::ENOSPC) => anyhow::anyhow!(
                "{resize}: the entries in use don't fit in {}",
                resize.wanted.max_entries
            ),
            _ => anyhow::Error::new(e).context(format!("{resize}: copy an entry")),
        })?;
    }
    Ok(())
}

/// The keys of an array of `len` slots, as bytes.
fn array_keys(len: u32) -> Vec<Vec<u8>> {
    (0..len).map(|i| i.to_ne_bytes().to_vec()).collect()
}

/// The keys of hash-like map `map` (`key_len` bytes each).
fn hash_keys(map: BorrowedFd<'_>, key_len: usize) -> Result<Vec<Vec<u8>>> {
    let mut keys: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut next = vec![0u8; key_len];
        let mut attr = ElemAttr {
            map_fd: fd_u32(map.as_raw_fd()),
            _pad: 0,
            // No key: the first one.
            key: keys.last().map_or(0, |k| k.as_ptr() as u64),
            value: next.as_mut_ptr() as u64,
            flags: 0,
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => keys.push(next),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
            Err(e) => return Err(e).context("list the keys of a map"),
        }
    }
}

/// The programs in one pinned program array, slot by slot (`None`: empty), held open so
/// they can be put back after a failed reload refilled the array with programs it then
/// unloads.
pub struct ProgramSlots {
    pin: PathBuf,
    map: OwnedFd,
    slots: Vec<Option<OwnedFd>>,
}

/// What each program array pinned in `dir` holds now.
pub fn program_arrays(dir: &Path) -> Result<Vec<ProgramSlots>> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut arrays = Vec::new();
    for entry in entries {
        let pin = entry?.path();
        let shape = Shape::of_pin(&pin)?;
        if shape.kind != PROG_ARRAY {
            continue;
        }
        let map = open_pinned(&pin).with_context(|| format!("open {}", pin.display()))?;
        let slots = (0..shape.max_entries)
            .map(|slot| {
                let mut id = [0u8; 4];
                // From a syscall, a program array's value is the program's id.
                match lookup(map.as_fd(), &slot.to_ne_bytes(), &mut id) {
                    Ok(()) => program_by_id(u32::from_ne_bytes(id)).map(Some),
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
                    Err(e) => Err(e),
                }
                .with_context(|| format!("read slot {slot} of {}", pin.display()))
            })
            .collect::<Result<_>>()?;
        arrays.push(ProgramSlots { pin, map, slots });
    }
    Ok(arrays)
}

impl ProgramSlots {
    /// Puts every slot back as it was.
    pub fn put_back(&self) -> Result<()> {
        let map = self.map.as_fd();
        for (slot, program) in (0u32..).zip(&self.slots) {
            let key = slot.to_ne_bytes();
            let done = match program {
                Some(program) => update(map, &key, &fd_u32(program.as_raw_fd()).to_ne_bytes()),
                None => delete(map, &key).or_else(|e| match e.raw_os_error() {
                    Some(libc::ENOENT) => Ok(()),
                    _ => Err(e),
                }),
            };
            done.with_context(|| format!("put back slot {slot} of {}", self.pin.display()))?;
        }
        Ok(())
    }
}

fn lookup(map: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: fd_u32(map.as_raw_fd()),
        _pad: 0,
        key: key.as_ptr() as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).map(drop)
}

fn update(map: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: fd_u32(map.as_raw_fd()),
        _pad: 0,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        flags: 0,
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

fn delete(map: BorrowedFd<'_>, key: &[u8]) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: fd_u32(map.as_raw_fd()),
        _pad: 0,
        key: key.as_ptr() as u64,
        value: 0,
        flags: 0,
    };
    bpf(BPF_MAP_DELETE_ELEM, &mut attr).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(kind: u32, key: u32, value: u32, max: u32, flags: u32) -> Shape {
        Shape {
            kind,
            key_size: key,
            value_size: value,
            max_entries: max,
            flags,
        }
    }

    #[test]
    fn more_entries_is_a_resize_and_another_value_is_a_layout_change() {
        let old = shape(HASH, 20, 24, 65_536, 0);
        assert_eq!(
            layout_change(&old, &shape(HASH, 20, 24, 131_072, NO_PREALLOC)),
            None
        );
        assert_eq!(
            layout_change(&old, &shape(HASH, 20, 28, 65_536, 0)).as_deref(),
            Some("value 24 → 28 bytes")
        );
        assert_eq!(
            layout_change(&old, &shape(LRU_HASH, 16, 24, 65_536, 4)).as_deref(),
            Some("type hash → lru_hash, key 20 → 16 bytes, flags 0x0 → 0x4")
        );
        let ring = shape(RINGBUF, 0, 0, 4096, 0);
        assert_eq!(layout_change(&ring, &shape(RINGBUF, 0, 0, 8192, 0)), None);
    }

    #[test]
    fn a_resize_says_what_grows() {
        let resize = Resize {
            name: "PUBLISHED".into(),
            pinned: shape(HASH, 20, 24, 65_536, 0),
            wanted: shape(HASH, 20, 24, 131_072, NO_PREALLOC),
        };
        assert_eq!(
            resize.to_string(),
            "map PUBLISHED: 65536 → 131072 entries, preallocated → allocated per entry"
        );
    }

    #[test]
    fn ring_sizes_round_to_a_power_of_two_pages() {
        assert_eq!(ring_size(1), 4096);
        assert_eq!(ring_size(3 * 4096), 4 * 4096);
    }
}
