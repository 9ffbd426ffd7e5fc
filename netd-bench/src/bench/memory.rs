//! Memory: what netd's eBPF maps take in the kernel (`bytes_memlock` as bpftool shows it:
//! since Linux 6.2 the map's own accounting of its memory; netd's hash maps are preallocated,
//! so what a container or a port costs is the share of it that its entries occupy), what
//! iptables' rules take (the rule set's size, and the machine's Slab before and after: shared
//! with every other process, so noisy), and a process's resident set.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result};
use netd_testkit::traffic::try_output_in;

/// One pinned map's kernel memory, and how many of its entries are in use.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MapMemory {
    pub name: String,
    pub max_entries: u64,
    pub bytes_memlock: u64,
    pub entries: u64,
}

impl MapMemory {
    /// The memory its entries in use occupy: netd's hash maps are preallocated (their
    /// `bytes_memlock` doesn't grow as they fill), so this is the share of it they use.
    pub fn occupied_bytes(&self) -> u64 {
        if self.max_entries == 0 {
            return 0;
        }
        self.bytes_memlock * self.entries.min(self.max_entries) / self.max_entries
    }
}

/// Every map pinned under `bpffs/maps` with its kernel memory.
pub fn pinned_maps(bpffs: &Path) -> Result<Vec<MapMemory>> {
    let dir = bpffs.join("maps");
    let mut maps = Vec::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(maps);
    };
    for entry in entries.flatten() {
        let out = Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(entry.path())
            .output()
            .context("run bpftool")?;
        let Ok(info) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
            continue;
        };
        maps.push(MapMemory {
            name: entry.file_name().to_string_lossy().into_owned(),
            max_entries: info["max_entries"].as_u64().unwrap_or(0),
            bytes_memlock: info["bytes_memlock"].as_u64().unwrap_or(0),
            entries: map_entries(&entry.path())?,
        });
    }
    maps.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(maps)
}

/// Kernel memory the entries in use of every map pinned under `bpffs` occupy, in bytes (see
/// [`MapMemory::occupied_bytes`]).
pub fn map_bytes(bpffs: &Path) -> Result<u64> {
    Ok(pinned_maps(bpffs)?
        .iter()
        .map(MapMemory::occupied_bytes)
        .sum())
}

/// The machine's slab memory (/proc/meminfo `Slab`), in bytes.
pub fn slab_bytes() -> Result<u64> {
    meminfo_kb("Slab:").map(|kb| kb * 1024)
}

fn meminfo_kb(key: &str) -> Result<u64> {
    let info = std::fs::read_to_string("/proc/meminfo")?;
    info.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {key} in /proc/meminfo"))
}

/// The size of the netfilter rule set in `ns`, in bytes of its text: `iptables-legacy-save`
/// (x_tables) plus `nft list ruleset` (nf_tables, where iptables-nft's rules live).
pub fn ruleset_bytes(ns: &Path) -> Result<u64> {
    let legacy = try_output_in(ns, "iptables-legacy-save", &[])?;
    let nft = try_output_in(ns, "nft", &["list", "ruleset"])?;
    Ok((legacy.len() + nft.len()) as u64)
}

/// The resident set of process `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    status_bytes(pid, "VmRSS")
}

/// The most resident memory process `pid` has used, in bytes.
pub fn peak_rss_bytes(pid: u32) -> Result<u64> {
    status_bytes(pid, "VmHWM")
}

/// Field `field` (in kB) of `/proc/PID/status`, in bytes.
fn status_bytes(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read the status of process {pid}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .with_context(|| format!("no {field} for process {pid}"))
}

/// The size of one object of the kernel's slab cache `cache` (/proc/slabinfo), in bytes.
pub fn slab_object_bytes(cache: &str) -> Result<u64> {
    let info = std::fs::read_to_string("/proc/slabinfo").context("read /proc/slabinfo")?;
    info.lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(cache)).then(|| words.nth(2)?.parse().ok())?
        })
        .with_context(|| format!("no slab cache {cache}"))
}

/// The memory the netd arm `arm` holds for what it has made so far: its maps' kernel memory
/// for eBPF; for iptables the rule set's text and the machine's Slab (see the module doc).
#[derive(Clone, Copy, Debug)]
pub struct Snapshot {
    pub maps: u64,
    pub ruleset: u64,
    pub slab: u64,
}

impl Snapshot {
    pub fn take(bpffs: &Path, host_ns: &Path) -> Result<Self> {
        Ok(Self {
            maps: map_bytes(bpffs)?,
            ruleset: ruleset_bytes(host_ns)?,
            slab: slab_bytes()?,
        })
    }

    /// Records what grew from `before` to `self`, in KiB per `per`, when `made` of them were
    /// made in between; filed under N = `n`.
    pub fn record_growth(
        &self,
        before: &Self,
        (arm, n): (&str, u32),
        per: Per,
        made: f64,
        samples: &mut super::Samples,
    ) {
        let scale = match per {
            Per::Container => 1.0 / made,
            Per::TenThousandPorts => 10_000.0 / made,
        };
        let grew = |a: u64, b: u64| (a as f64 - b as f64) * scale / 1024.0;
        let metrics: [(&'static str, f64); 3] = match per {
            Per::Container => [
                ("maps_kib_per_container", grew(self.maps, before.maps)),
                (
                    "ruleset_kib_per_container",
                    grew(self.ruleset, before.ruleset),
                ),
                ("slab_kib_per_container", grew(self.slab, before.slab)),
            ],
            _ => [
                ("maps_kib_per_10k_ports", grew(self.maps, before.maps)),
                (
                    "ruleset_kib_per_10k_ports",
                    grew(self.ruleset, before.ruleset),
                ),
                ("slab_kib_per_10k_ports", grew(self.slab, before.slab)),
            ],
        };
        for (metric, v) in metrics {
            super::record(samples, arm, MEMORY, metric, n, v);
        }
    }
}

/// What memory growth is counted per.
#[derive(Clone, Copy, Debug)]
pub enum Per {
    Container,
    TenThousandPorts,
}

/// The path name memory records are filed under.
pub const MEMORY: &str = "memory";

/// Flows in netd's conntrack, both tables (assured and unassured), pinned under `maps`.
pub fn conntrack_entries(maps: &Path) -> Result<u64> {
    netd_common::datapath::CONNTRACK_MAPS
        .iter()
        .map(|t| map_entries(&maps.join(t)))
        .sum()
}

/// Entries in the map pinned at `pin` (every key, walked with `BPF_MAP_GET_NEXT_KEY`; a map
/// that can't be walked, such as a ring buffer, counts 0). A walk whose current key is
/// deleted under it (the daemon sweeping, LRU eviction) starts over from the first key, so
/// keys are counted once each, and the walk gives up after twice the map's size.
pub fn map_entries(pin: &Path) -> Result<u64> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    /// The part of `union bpf_attr` that BPF_MAP_GET_NEXT_KEY reads.
    #[repr(C)]
    struct NextKey {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
        _flags: u64,
    }
    let map =
        aya::maps::MapData::from_pin(pin).with_context(|| format!("open map {}", pin.display()))?;
    let info = map.info()?;
    let key_size = (info.key_size() as usize).max(1);
    let fd = map.fd().as_fd().as_raw_fd();
    let mut seen = std::collections::HashSet::new();
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    for step in 0..2 * u64::from(info.max_entries()) {
        let attr = NextKey {
            map_fd: fd as u32,
            _pad: 0,
            key: if step == 0 { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            _flags: 0,
        };
        // SAFETY: `attr` points at buffers of the map's key size, alive for the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &attr as *const NextKey,
                std::mem::size_of::<NextKey>() as u32,
            )
        };
        if ret < 0 {
            break;
        }
        seen.insert(next.clone());
        std::mem::swap(&mut key, &mut next);
    }
    Ok(seen.len() as u64)
}
