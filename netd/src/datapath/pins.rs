//! The embedded eBPF object and the instance's bpffs pin directory.
//!
//! Layout under the pin root (one root per netd instance, `--bpffs`):
//! `maps/` holds every map pinned by name (shared by all programs and all netd processes),
//! `links/` holds one link per attached program (TCX, XDP, cgroup), so programs stay attached
//! after exit; `progs/` the programs, by name. Per-container programs are legacy TC filters
//! instead (see [`Pins::attach_pinned_filter`]), which live as long as their interface.
//!
//! Host-wide TC programs attach with TCX (Linux 6.6) where the kernel has it, else as
//! classic clsact filters ([`AttachMode`]); a filter has no link to pin, so its attachment is
//! recorded by pinning its program under `links/` with a `-filter` suffix.

use std::{
    fs,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    sync::OnceLock,
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, ProgramArray},
    programs::{
        CgroupAttachMode, CgroupSockAddr, Program, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
        xdp::XdpLink,
    },
};
use netd_common::datapath::{CONNTRACK_DEFAULT_MAX, CONNTRACK_MAPS};

use super::pinned_maps::{self, ProgramSlots, Resize, Upgrade};

/// The programs of `netd-ebpf`, built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netd-ebpf"));

/// `statfs` magic of a bpf filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The pin directory of one netd instance.
#[derive(Clone, Debug)]
pub struct Pins {
    root: PathBuf,
}

impl Pins {
    /// Opens (creating when needed) the pin root `root`, which must be on a mounted bpffs.
    pub fn open(root: &Path) -> Result<Self> {
        check_bpffs(root)?;
        let pins = Self {
            root: root.to_path_buf(),
        };
        for dir in [pins.maps_dir(), pins.links_dir()] {
            fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        }
        Ok(pins)
    }

    /// The pin root `root` if it is already there on a bpffs (nothing is created).
    pub fn existing(root: &Path) -> Option<Self> {
        (root.exists() && check_bpffs(root).is_ok()).then(|| Self {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    /// The pin of program `prog`'s TCX link on interface `iface` in direction `dir`.
    pub fn tc_link(&self, prog: &str, iface: &str, dir: TcAttachType) -> PathBuf {
        self.links_dir()
            .join(format!("{prog}@{iface}@{}", direction_name(dir)))
    }

    /// The pin of XDP program `prog`'s link on interface `iface`.
    pub fn xdp_link(&self, prog: &str, iface: &str) -> PathBuf {
        self.links_dir().join(format!("{prog}@{iface}@{XDP_HOOK}"))
    }

    /// Loads the eBPF object, reusing the maps already pinned here (or pinning new ones).
    pub fn load(&self) -> Result<Ebpf> {
        self.load_sized(CONNTRACK_DEFAULT_MAX)
    }

    /// Like [`Pins::load`], with conntrack tables (assured and unassured flows) of
    /// `conntrack_max` entries each when they are not pinned yet (a pinned table keeps its
    /// size).
    ///
    /// Refuses pinned maps this build defines otherwise (see [`pinned_maps`]): one whose
    /// layout changed, and one to resize, which only `netd reload` does.
    pub fn load_sized(&self, conntrack_max: u32) -> Result<Ebpf> {
        if let Some(resize) = self.check_maps()?.first() {
            bail!(
                "{resize}: the datapath runs on an older netd's maps; `netd reload` moves it to this netd's"
            );
        }
        loader(&self.maps_dir(), conntrack_max)
            .load(OBJECT)
            .context("load the eBPF object")
    }

    /// Like [`Pins::load_sized`] for a reload: pinned maps whose number of entries changed
    /// are made again with this build's, their entries copied; the returned [`Upgrade`] then
    /// swaps their pins ([`Upgrade::swap`], [`Upgrade::finish`]) or puts everything back
    /// ([`Upgrade::abort`]). Maps whose layout changed are refused before anything is made.
    pub fn load_upgrading(&self, conntrack_max: u32) -> Result<(Ebpf, Upgrade)> {
        let upgrade = Upgrade::prepare(&self.maps_dir(), self.check_maps()?)?;
        let staged: Vec<(String, PathBuf)> = upgrade
            .resizes
            .iter()
            .map(|r| (r.name.clone(), upgrade.staged(&r.name)))
            .collect();
        let mut loader = loader(&self.maps_dir(), conntrack_max);
        for (name, path) in &staged {
            loader.map_pin_path(name, path.as_path());
        }
        let loaded = loader
            .load(OBJECT)
            .context("load the eBPF object")
            .and_then(|ebpf| upgrade.copy_entries().map(|()| ebpf));
        match loaded {
            Ok(ebpf) => Ok((ebpf, upgrade)),
            Err(e) => {
                upgrade.abort();
                Err(e)
            }
        }
    }

    /// The pinned maps to resize for this build; fails when a layout changed.
    fn check_maps(&self) -> Result<Vec<Resize>> {
        pinned_maps::check(&self.maps_dir(), OBJECT, &CONNTRACK_MAPS)
    }

    /// Opens the map pinned as `name` (it exists once any program using it was loaded).
    pub fn open_map(&self, name: &str) -> Result<MapData> {
        let path = self.map(name);
        MapData::from_pin(&path)
            .with_context(|| format!("open {} (is the datapath set up?)", path.display()))
    }

    /// The pin recording that `prog` is attached to `iface` in direction `dir` as a clsact
    /// filter (the program itself: a filter has no link).
    pub fn tc_filter(&self, prog: &str, iface: &str, dir: TcAttachType) -> PathBuf {
        self.links_dir().join(format!(
            "{prog}@{iface}@{}{FILTER_SUFFIX}",
            direction_name(dir)
        ))
    }

    /// Whether `prog` is attached to `iface` in direction `dir`, either way.
    pub fn tc_attached(&self, prog: &str, iface: &str, dir: TcAttachType) -> bool {
        self.tc_link(prog, iface, dir).exists() || self.tc_filter(prog, iface, dir).exists()
    }

    /// Attaches the TC program `prog` of `ebpf` to `iface` (with TCX or as a clsact filter,
    /// see [`AttachMode::select`]) and pins what records it, so it stays attached when this
    /// process exits. Attaching twice is an error.
    pub fn attach_tc(
        &self,
        ebpf: &mut Ebpf,
        prog: &str,
        iface: &str,
        dir: TcAttachType,
    ) -> Result<()> {
        if self.tc_attached(prog, iface, dir) {
            bail!(
                "{prog} is already attached to {iface} ({})",
                direction_name(dir)
            );
        }
        let program = loaded_tc_program(ebpf, prog)?;
        self.pin_program(program, prog)?;
        match AttachMode::select(program.fd()?.as_fd())? {
            AttachMode::Tcx => self.attach_and_pin_link(program, prog, iface, dir),
            AttachMode::Clsact => self.attach_and_pin_filter(program, prog, iface, dir),
        }
    }

    /// Pins TC program `prog` of `ebpf`, loading it first (the build attached next).
    pub fn pin_tc_program(&self, ebpf: &mut Ebpf, prog: &str) -> Result<()> {
        self.pin_program(loaded_tc_program(ebpf, prog)?, prog)
    }

    /// Attaches the pinned TC program `prog` to `iface`'s `dir` as a cls_bpf filter under a
    /// clsact qdisc (legacy TC, over netlink). For per-container programs: a TCX attach waits
    /// out an RCU grace period (about 10 ms here, most of a container's creation), a filter
    /// takes well under a millisecond. It lives as long as the interface, with no pin.
    pub fn attach_pinned_filter(&self, prog: &str, iface: &str, dir: TcAttachType) -> Result<()> {
        let path = self.program(prog);
        let mut program = SchedClassifier::from_pin(&path)
            .with_context(|| format!("open pinned program {}", path.display()))?;
        add_filter(&mut program, prog, iface, dir)
    }

    /// Attaches `program` to `iface` as a clsact filter and pins it as the record of that.
    fn attach_and_pin_filter(
        &self,
        program: &mut SchedClassifier,
        prog: &str,
        iface: &str,
        dir: TcAttachType,
    ) -> Result<()> {
        add_filter(program, prog, iface, dir)?;
        let pin = self.tc_filter(prog, iface, dir);
        if let Err(e) = program.pin(&pin) {
            let _ = detach_filter_from(iface, dir);
            return Err(e).with_context(|| format!("pin program at {}", pin.display()));
        }
        Ok(())
    }

    /// Replaces the program of the filter on `iface`'s `dir` with `prog` from `ebpf`
    /// (netlink's replace, in place: packets see the old or the new program, never none).
    pub fn replace_filter(
        &self,
        ebpf: &mut Ebpf,
        prog: &str,
        iface: &str,
        dir: TcAttachType,
    ) -> Result<()> {
        replace_filter_on(ebpf, prog, iface, dir)
    }

    /// Removes netd's filter from `iface`'s `dir`, if the interface and the filter are there.
    pub fn detach_filter(&self, iface: &str, dir: TcAttachType) -> Result<()> {
        detach_filter_from(iface, dir)
    }

    /// The pin of loaded program `prog` (the build attached last).
    pub fn program(&self, prog: &str) -> PathBuf {
        self.root.join("progs").join(prog)
    }

    /// Pins `program` as `prog`, replacing an older pin (a reload's new build wins).
    fn pin_program(&self, program: &mut SchedClassifier, prog: &str) -> Result<()> {
        let path = self.program(prog);
        fs::create_dir_all(self.root.join("progs"))?;
        let _ = fs::remove_file(&path);
        program
            .pin(&path)
            .with_context(|| format!("pin program at {}", path.display()))
    }

    fn attach_and_pin_link(
        &self,
        program: &mut SchedClassifier,
        prog: &str,
        iface: &str,
        dir: TcAttachType,
    ) -> Result<()> {
        let pin = self.tc_link(prog, iface, dir);
        let link_id = program
            .attach(iface, dir)
            .with_context(|| format!("attach {prog} to {iface}"))?;
        let link: FdLink = program
            .take_link(link_id)
            .context("take the TCX link")?
            .try_into()
            .context("TCX link is not an fd link")?;
        link.pin(&pin)
            .with_context(|| format!("pin link at {}", pin.display()))?;
        Ok(())
    }

    /// Atomically replaces the program attached as `prog` to `iface` (a TCX link or a clsact
    /// filter) with `prog` from `ebpf` (a newer build): packets see the old or the new
    /// program, never none.
    pub fn replace_tc(
        &self,
        ebpf: &mut Ebpf,
        prog: &str,
        iface: &str,
        dir: TcAttachType,
    ) -> Result<()> {
        let filter = self.tc_filter(prog, iface, dir);
        if filter.exists() {
            replace_filter_on(ebpf, prog, iface, dir)?;
            let _ = fs::remove_file(&filter);
            let program = loaded_tc_program(ebpf, prog)?;
            program
                .pin(&filter)
                .with_context(|| format!("pin program at {}", filter.display()))?;
            return self.pin_program(program, prog);
        }
        let pin = self.tc_link(prog, iface, dir);
        let pinned =
            PinnedLink::from_pin(&pin).with_context(|| format!("open {}", pin.display()))?;
        let link = SchedClassifierLink::try_from(FdLink::from(pinned))
            .with_context(|| format!("{} is not a TCX link", pin.display()))?;
        let program = loaded_tc_program(ebpf, prog)?;
        // The link stays pinned: it outlives this process with the new program.
        program
            .attach_to_link(link)
            .with_context(|| format!("replace {prog} on {iface}"))?;
        self.pin_program(program, prog)
    }

    /// The pin of cgroup program `prog`'s link (one cgroup per instance).
    pub fn cgroup_link(&self, prog: &str) -> PathBuf {
        self.links_dir().join(format!("{prog}@cgroup"))
    }

    /// Attaches the cgroup sock_addr program `prog` of `ebpf` to the cgroup at `cgroup` and
    /// pins the link. Attaching twice is an error.
    pub fn attach_cgroup_sock_addr(
        &self,
        ebpf: &mut Ebpf,
        prog: &str,
        cgroup: &Path,
    ) -> Result<()> {
        let pin = self.cgroup_link(prog);
        if pin.exists() {
            bail!("{prog} is already attached to a cgroup");
        }
        let program = loaded_cgroup_program(ebpf, prog)?;
        let dir =
            fs::File::open(cgroup).with_context(|| format!("open cgroup {}", cgroup.display()))?;
        // A bpf_link (aya uses one on Linux >= 5.7) always coexists with other programs on the
        // cgroup; link_create takes no attach flags, so "Single" (flags 0) is the right mode.
        let link_id = program
            .attach(&dir, CgroupAttachMode::Single)
            .with_context(|| format!("attach {prog} to {}", cgroup.display()))?;
        let link: FdLink = program
            .take_link(link_id)
            .context("take the cgroup link")?
            .try_into()
            .context("cgroup link is not an fd link")?;
        link.pin(&pin)
            .with_context(|| format!("pin link at {}", pin.display()))?;
        Ok(())
    }

    /// Atomically replaces the program behind the pinned cgroup link of `prog` with `prog`
    /// from `ebpf` (see [`Pins::replace_tc`]).
    pub fn replace_cgroup(&self, ebpf: &mut Ebpf, prog: &str) -> Result<()> {
        let pin = self.cgroup_link(prog);
        let program = loaded_cgroup_program(ebpf, prog)?;
        let fd = program.fd().with_context(|| format!("fd of {prog}"))?;
        super::link_update::update_pinned_link(&pin, fd.as_fd())
            .with_context(|| format!("replace {prog} behind {}", pin.display()))
    }

    /// Detaches the link pinned at `pin`. Returns whether anything was attached.
    pub fn detach_pinned(&self, pin: &Path) -> Result<bool> {
        if !pin.exists() {
            return Ok(false);
        }
        let link = PinnedLink::from_pin(pin).with_context(|| format!("open {}", pin.display()))?;
        // Unpinning drops the last reference to the link, which detaches the program.
        let _detached: FdLink = link
            .unpin()
            .with_context(|| format!("unpin {}", pin.display()))?;
        Ok(true)
    }

    /// Detaches what [`Pins::attach_tc`] attached. Returns whether anything was attached.
    pub fn detach_tc(&self, prog: &str, iface: &str, dir: TcAttachType) -> Result<bool> {
        let filter = self.tc_filter(prog, iface, dir);
        if filter.exists() {
            detach_filter_from(iface, dir)?;
            fs::remove_file(&filter).with_context(|| format!("unpin {}", filter.display()))?;
            return Ok(true);
        }
        self.detach_pinned(&self.tc_link(prog, iface, dir))
    }

    /// The interfaces program `prog` is attached to in direction `dir` (either way), from
    /// the pins.
    pub fn tc_attachments(&self, prog: &str, dir: TcAttachType) -> Result<Vec<String>> {
        let mut ifaces = self.attachments(prog, direction_name(dir))?;
        ifaces.extend(self.attachments(prog, &format!("{}{FILTER_SUFFIX}", direction_name(dir)))?);
        Ok(ifaces)
    }

    /// The interfaces XDP program `prog` is attached to, from the link pins.
    pub fn xdp_attachments(&self, prog: &str) -> Result<Vec<String>> {
        self.attachments(prog, XDP_HOOK)
    }

    /// The interfaces with a link of `prog` pinned at `hook`.
    fn attachments(&self, prog: &str, hook: &str) -> Result<Vec<String>> {
        let suffix = format!("@{hook}");
        let prefix = format!("{prog}@");
        let dir_path = self.links_dir();
        let entries =
            fs::read_dir(&dir_path).with_context(|| format!("list {}", dir_path.display()))?;
        let mut ifaces = Vec::new();
        for entry in entries {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if let Some(iface) = name
                .strip_prefix(&prefix)
                .and_then(|rest| rest.strip_suffix(&suffix))
            {
                ifaces.push(iface.to_string());
            }
        }
        Ok(ifaces)
    }

    /// Attaches the XDP program `prog` of `ebpf` to `iface` (natively where the driver can,
    /// else generic) and pins the link. Attaching twice is an error.
    pub fn attach_xdp(&self, ebpf: &mut Ebpf, prog: &str, iface: &str) -> Result<()> {
        let pin = self.xdp_link(prog, iface);
        if pin.exists() {
            bail!("{prog} is already attached to {iface} (xdp)");
        }
        let program = loaded_xdp_program(ebpf, prog)?;
        let link_id = program.attach(iface, XdpMode::Default).map_err(|e| {
            let hint = match &e {
                // What veth says when a frame of its peer's MTU wouldn't fit XDP's page.
                aya::programs::ProgramError::SyscallError(aya::sys::SyscallError {
                    io_error,
                    ..
                }) if io_error.raw_os_error() == Some(libc::ERANGE) => {
                    " (the MTU is too large for XDP on it)"
                }
                _ => "",
            };
            anyhow::Error::new(e).context(format!("attach {prog} to {iface} (xdp){hint}"))
        })?;
        let link: FdLink = program
            .take_link(link_id)
            .context("take the XDP link")?
            .try_into()
            .context("XDP link is not an fd link")?;
        link.pin(&pin)
            .with_context(|| format!("pin link at {}", pin.display()))?;
        Ok(())
    }

    /// Atomically replaces the program behind the pinned XDP link of `prog` on `iface` with
    /// `prog` from `ebpf` (see [`Pins::replace_tc`]).
    pub fn replace_xdp(&self, ebpf: &mut Ebpf, prog: &str, iface: &str) -> Result<()> {
        let pin = self.xdp_link(prog, iface);
        let pinned =
            PinnedLink::from_pin(&pin).with_context(|| format!("open {}", pin.display()))?;
        let link = XdpLink::try_from(FdLink::from(pinned))
            .with_context(|| format!("{} is not an XDP link", pin.display()))?;
        loaded_xdp_program(ebpf, prog)?
            .attach_to_link(link)
            .with_context(|| format!("replace {prog} on {iface}"))?;
        Ok(())
    }

    /// Removes every pin of this instance (links first, so programs detach).
    pub fn remove_all(&self) -> Result<()> {
        fs::remove_dir_all(&self.root).with_context(|| format!("remove {}", self.root.display()))
    }
}

/// A loader of the object that reuses the maps pinned in `maps_dir` (or pins new ones there),
/// with conntrack tables of `conntrack_max` entries when they are made.
fn loader(maps_dir: &Path, conntrack_max: u32) -> EbpfLoader<'static> {
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(maps_dir);
    for table in CONNTRACK_MAPS {
        loader.map_max_entries(table, conntrack_max);
    }
    loader
}

/// Loads `progs` of `ebpf` and puts them in the program array `map`, in that order: the
/// programs other programs hand packets over to by tail call (NAT66's, IPv6 hairpin's, the
/// endpoint's IPv6 policy). A pinned map: its slots outlive this process. Called before the
/// programs calling them are attached, pinned or replaced: from an empty slot they don't
/// translate (or check: the endpoint program drops IPv6 then).
pub fn fill_prog_array(ebpf: &mut Ebpf, map: &str, progs: &[&str]) -> Result<()> {
    for (slot, prog) in progs.iter().enumerate() {
        let fd = loaded_tc_program(ebpf, prog)?
            .fd()?
            .try_clone()
            .with_context(|| format!("duplicate the fd of {prog}"))?;
        let array = ebpf
            .map_mut(map)
            .with_context(|| format!("no map {map} in the eBPF object"))?;
        ProgramArray::try_from(array)?
            .set(slot as u32, &fd, 0)
            .with_context(|| format!("put {prog} in {map}"))?;
    }
    Ok(())
}

/// Loads every program of `ebpf` into the kernel (the verifier), so that a reload fails, if it
/// does, before it changes anything.
pub fn load_programs(ebpf: &mut Ebpf) -> Result<()> {
    for (name, program) in ebpf.programs_mut() {
        let loaded = match program {
            Program::SchedClassifier(p) if p.fd().is_err() => verify(|| p.load()),
            Program::Xdp(p) if p.fd().is_err() => verify(|| p.load()),
            Program::CgroupSockAddr(p) if p.fd().is_err() => verify(|| p.load()),
            _ => Ok(()),
        };
        loaded.with_context(|| format!("load program {name}"))?;
    }
    Ok(())
}

/// netd's cls_bpf filter on an interface (one each): a fixed priority and handle, so a reload
/// can name it to replace it in place.
const FILTER: NlOptions = NlOptions {
    priority: 1,
    handle: TcHandle::new(0, 1),
    classid: None,
};

/// The suffix of the pins recording clsact filters (after the direction).
const FILTER_SUFFIX: &str = "-filter";

/// netd's filter on `iface` in direction `dir`, named for a replace or a detach (an error: no
/// such interface).
fn filter_link(iface: &str, dir: TcAttachType) -> std::io::Result<SchedClassifierLink> {
    SchedClassifierLink::attached(iface, dir, FILTER.priority, FILTER.handle, None)
}

/// Attaches `program` (named `prog`) to `iface` in direction `dir` as netd's cls_bpf filter
/// under a clsact qdisc (added when missing). It lives as long as the interface, with no pin.
fn add_filter(
    program: &mut SchedClassifier,
    prog: &str,
    iface: &str,
    dir: TcAttachType,
) -> Result<()> {
    if let Err(e) = tc::qdisc_add_clsact(iface)
        && !clsact_exists(&e)
    {
        return Err(e).with_context(|| format!("add a clsact qdisc to {iface}"));
    }
    let id = program
        .attach_with_options(iface, dir, TcAttachOptions::Netlink(FILTER))
        .with_context(|| format!("attach {prog} to {iface} ({})", direction_name(dir)))?;
    keep_attached(program.take_link(id).context("take the filter")?);
    Ok(())
}

/// Replaces the program of netd's filter on `iface` in direction `dir` with `prog` from
/// `ebpf` (netlink's replace, in place).
fn replace_filter_on(ebpf: &mut Ebpf, prog: &str, iface: &str, dir: TcAttachType) -> Result<()> {
    replace_filter_with(loaded_tc_program(ebpf, prog)?, prog, iface, dir)
}

/// Replaces the program of netd's filter on `iface` in direction `dir` with `program` (named
/// `prog`).
fn replace_filter_with(
    program: &mut SchedClassifier,
    prog: &str,
    iface: &str,
    dir: TcAttachType,
) -> Result<()> {
    let link = filter_link(iface, dir).with_context(|| format!("find {iface}"))?;
    let id = program
        .attach_to_link(link)
        .with_context(|| format!("replace {prog} on {iface}"))?;
    keep_attached(program.take_link(id).context("take the filter")?);
    Ok(())
}

/// The programs attached before a reload, held so that a reload failing midway puts them back
/// ([`Pins::put_back`]).
pub struct Attached {
    /// Each pinned link (TCX, XDP, cgroup) and the program it ran.
    links: Vec<(PathBuf, OwnedFd)>,
    /// Each pinned TC program: under `progs/`, and the clsact filters' records under `links/`.
    programs: Vec<(PathBuf, SchedClassifier)>,
    /// Each pinned program array's programs (the IPv6 programs tail-called).
    program_arrays: Vec<ProgramSlots>,
}

impl Pins {
    /// What is attached now, from the pins.
    pub fn attached(&self) -> Result<Attached> {
        let mut attached = Attached {
            links: Vec::new(),
            programs: Vec::new(),
            program_arrays: pinned_maps::program_arrays(&self.maps_dir())?,
        };
        for dir in [self.links_dir(), self.root.join("progs")] {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries {
                let path = entry?.path();
                let name = path.to_string_lossy();
                if dir == self.links_dir() && !name.ends_with(FILTER_SUFFIX) {
                    let program = super::link_update::pinned_link_program(&path)
                        .with_context(|| format!("the program of {}", path.display()))?;
                    attached.links.push((path, program));
                } else {
                    let program = SchedClassifier::from_pin(&path)
                        .with_context(|| format!("open pinned program {}", path.display()))?;
                    attached.programs.push((path, program));
                }
            }
        }
        Ok(attached)
    }

    /// Puts back every program `attached` holds: behind each link, on each clsact filter
    /// (the host-wide ones from their records; the endpoint filters `endpoints`, as program,
    /// interface and direction), under each program pin, and in each program array (else the
    /// old programs would tail-call the new build's). Goes on past a failure; returns the
    /// first.
    pub fn put_back(
        &self,
        attached: &mut Attached,
        endpoints: &[(&str, String, TcAttachType)],
    ) -> Result<()> {
        let mut first = Ok(());
        let mut keep = |result: Result<()>| {
            if first.is_ok() {
                first = result;
            }
        };
        for (pin, program) in &attached.links {
            keep(
                super::link_update::update_pinned_link(pin, program.as_fd())
                    .with_context(|| format!("put back the program behind {}", pin.display())),
            );
        }
        for (pin, program) in &mut attached.programs {
            let name = pin
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if let Some((prog, iface, dir)) = parse_filter_record(&name) {
                keep(replace_filter_with(program, prog, iface, dir));
            }
            for (prog, veth, dir) in endpoints {
                if *pin == self.program(prog) {
                    keep(replace_filter_with(program, prog, veth, *dir));
                }
            }
            let _ = fs::remove_file(&*pin);
            keep(
                program
                    .pin(&*pin)
                    .with_context(|| format!("pin program at {}", pin.display())),
            );
        }
        for array in &attached.program_arrays {
            keep(array.put_back());
        }
        first
    }
}

/// The program, interface and direction of a filter's record pin, `PROG@IFACE@DIR-filter`.
fn parse_filter_record(name: &str) -> Option<(&str, &str, TcAttachType)> {
    let (prog, rest) = name.split_once('@')?;
    let (iface, dir) = rest.strip_suffix(FILTER_SUFFIX)?.rsplit_once('@')?;
    let dir = [TcAttachType::Ingress, TcAttachType::Egress]
        .into_iter()
        .find(|d| direction_name(*d) == dir)?;
    Some((prog, iface, dir))
}

/// Removes netd's filter from `iface` in direction `dir`, if the interface and the filter
/// are there.
fn detach_filter_from(iface: &str, dir: TcAttachType) -> Result<()> {
    let Ok(link) = filter_link(iface, dir) else {
        return Ok(());
    };
    match aya::programs::Link::detach(link) {
        Err(aya::programs::ProgramError::TcError(TcError::NetlinkError(e)))
            if e.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other.with_context(|| format!("detach the filter from {iface}")),
    }
}

/// How host-wide TC programs attach to their interfaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// A TCX link (Linux 6.6), pinned: attaching needs no qdisc, replacing is a link update.
    Tcx,
    /// A cls_bpf filter under a clsact qdisc, for kernels without TCX (Debian 12's 6.1,
    /// Ubuntu 22.04's 5.15).
    Clsact,
}

/// The environment variable that overrides the probe: `tcx` or `clsact` (the tests run the
/// datapath in both modes on one kernel).
pub const ATTACH_ENV: &str = "NETD_ATTACH";

impl AttachMode {
    /// [`ATTACH_ENV`] when it is set, else TCX where the kernel has it (probed with `program`,
    /// a loaded TC program), else clsact.
    pub fn select(program: BorrowedFd<'_>) -> Result<Self> {
        match Self::from_env()? {
            Some(mode) => Ok(mode),
            None if kernel_has_tcx(program) => Ok(Self::Tcx),
            None => Ok(Self::Clsact),
        }
    }

    /// The mode [`ATTACH_ENV`] asks for, if it is set.
    pub fn from_env() -> Result<Option<Self>> {
        let Some(value) = std::env::var_os(ATTACH_ENV) else {
            return Ok(None);
        };
        match value.to_str() {
            Some("tcx") => Ok(Some(Self::Tcx)),
            Some("clsact") => Ok(Some(Self::Clsact)),
            Some("" | "auto") => Ok(None),
            _ => Err(anyhow!(
                "invalid {ATTACH_ENV}={value:?}: expected tcx, clsact or auto"
            )),
        }
    }
}

/// Whether the kernel has TCX, asked once per process: a TCX link of `program` on ifindex 0
/// fails with ENODEV where TCX exists (the kernel looked for the device) and EINVAL where
/// it doesn't (no such attach type for a TC program). Creates nothing either way.
fn kernel_has_tcx(program: BorrowedFd<'_>) -> bool {
    static HAS_TCX: OnceLock<bool> = OnceLock::new();
    *HAS_TCX.get_or_init(|| {
        const BPF_LINK_CREATE: libc::c_long = 28;
        const BPF_TCX_INGRESS: u32 = 46;
        /// `union bpf_attr` as BPF_LINK_CREATE reads it, with room for the fields after.
        #[repr(C)]
        struct LinkCreate {
            prog_fd: u32,
            target_ifindex: u32,
            attach_type: u32,
            flags: u32,
            rest: [u64; 6],
        }
        let attr = LinkCreate {
            prog_fd: program.as_raw_fd() as u32,
            target_ifindex: 0,
            attach_type: BPF_TCX_INGRESS,
            flags: 0,
            rest: [0; 6],
        };
        // SAFETY: the kernel reads `size_of::<LinkCreate>()` bytes of `attr`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_LINK_CREATE,
                &raw const attr,
                std::mem::size_of::<LinkCreate>(),
            )
        };
        if rc >= 0 {
            // SAFETY: a link fd this call created and nothing else holds.
            unsafe { libc::close(rc as libc::c_int) };
            return true;
        }
        std::io::Error::last_os_error().raw_os_error() == Some(libc::ENODEV)
    })
}

/// Whether adding a clsact qdisc failed only because the interface has one already.
fn clsact_exists(e: &TcError) -> bool {
    match e {
        TcError::AlreadyAttached => true,
        TcError::NetlinkError(e) => e.raw_os_error() == Some(libc::EEXIST),
        _ => false,
    }
}

/// Leaves a netlink-attached filter in place: the link holds no kernel object, and dropping it
/// would detach the filter, which must outlive this process.
fn keep_attached(link: SchedClassifierLink) {
    std::mem::forget(link);
}

/// Runs `load` (one program's BPF_PROG_LOAD) again while the verifier gives up with EAGAIN,
/// a few times at most: it does when a signal arrives for the process while it works (seen
/// once in a test run), and the same load then passes. libbpf retries the same way.
fn verify(
    mut load: impl FnMut() -> Result<(), aya::programs::ProgramError>,
) -> Result<(), aya::programs::ProgramError> {
    const TRIES: usize = 5;
    for _ in 1..TRIES {
        match load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) => {}
            done => return done,
        }
    }
    load()
}

/// Defines `$name(ebpf, prog)`: program `prog` of `ebpf` as a `$ty`, loaded into the kernel
/// unless it already is. (aya has no trait for `load`, so one macro serves each kind.)
macro_rules! loaded_program {
    ($name:ident, $ty:ty, $kind:literal) => {
        fn $name<'a>(ebpf: &'a mut Ebpf, prog: &str) -> Result<&'a mut $ty> {
            let program: &mut $ty = ebpf
                .program_mut(prog)
                .with_context(|| format!("no program {prog} in the eBPF object"))?
                .try_into()
                .with_context(|| format!("{prog} is not {}", $kind))?;
            if program.fd().is_err() {
                verify(|| program.load()).with_context(|| format!("load program {prog}"))?;
            }
            Ok(program)
        }
    };
}

loaded_program!(loaded_tc_program, SchedClassifier, "a TC program");
loaded_program!(
    loaded_cgroup_program,
    CgroupSockAddr,
    "a cgroup sock_addr program"
);
loaded_program!(loaded_xdp_program, Xdp, "an XDP program");

/// The hook name of XDP links in pin names (TC links use their direction).
const XDP_HOOK: &str = "xdp";

pub fn direction_name(dir: TcAttachType) -> &'static str {
    match dir {
        TcAttachType::Ingress => "ingress",
        TcAttachType::Egress => "egress",
        TcAttachType::Custom(_) => "custom",
    }
}

/// Fails with a one-line hint when the bpffs that should hold `root` is not mounted.
fn check_bpffs(root: &Path) -> Result<()> {
    let mut probe = root;
    while !probe.exists() {
        probe = probe.parent().unwrap_or(Path::new("/"));
    }
    let fs =
        nix::sys::statfs::statfs(probe).with_context(|| format!("statfs {}", probe.display()))?;
    if fs.filesystem_type().0 as i64 != BPF_FS_MAGIC {
        bail!(
            "{} is not on a bpf filesystem: mount one with `mount -t bpf bpf /sys/fs/bpf` (cargo xtask setup does)",
            root.display()
        );
    }
    Ok(())
}
