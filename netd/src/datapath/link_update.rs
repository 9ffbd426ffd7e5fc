//! `BPF_LINK_UPDATE` on a pinned link: the atomic program swap aya 0.14 offers for TCX and
//! XDP links (`attach_to_link`) but not for cgroup ones; and the program a pinned link runs,
//! which aya 0.14 doesn't tell.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

/// bpf(2) commands (include/uapi/linux/bpf.h).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `union bpf_attr` for `BPF_OBJ_GET`.
#[repr(C)]
struct ObjGet {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `union bpf_attr` for `BPF_LINK_UPDATE`.
#[repr(C)]
struct LinkUpdate {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Replaces the program of the link pinned at `pin` with `prog`, atomically: the hook runs
/// the old program or the new one, never none. The link stays pinned.
pub fn update_pinned_link(pin: &Path, prog: BorrowedFd<'_>) -> io::Result<()> {
    let link = open_pinned(pin)?;
    let mut attr = LinkUpdate {
        link_fd: fd_u32(link.as_raw_fd()),
        new_prog_fd: fd_u32(prog.as_raw_fd()),
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
struct InfoByFd {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_link_info` (the kernel writes no more than `info_len` bytes).
#[repr(C)]
#[derive(Default)]
struct LinkInfoHead {
    link_type: u32,
    id: u32,
    prog_id: u32,
}

/// `union bpf_attr` for `BPF_PROG_GET_FD_BY_ID`.
#[repr(C)]
struct GetFdById {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// An fd of the program the link pinned at `pin` runs.
pub fn pinned_link_program(pin: &Path) -> io::Result<OwnedFd> {
    let link = open_pinned(pin)?;
    let mut head = LinkInfoHead::default();
    let mut attr = InfoByFd {
        bpf_fd: fd_u32(link.as_raw_fd()),
        info_len: std::mem::size_of::<LinkInfoHead>() as u32,
        info: std::ptr::from_mut(&mut head) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    program_by_id(head.prog_id)
}

/// An fd of the loaded program with id `id`.
pub(super) fn program_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = GetFdById {
        id,
        next_id: 0,
        open_flags: 0,
    };
    owned_fd(bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?)
}

/// A new fd for the object pinned at `pin`.
pub(super) fn open_pinned(pin: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(pin.as_os_str().as_bytes())?;
    let mut attr = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    owned_fd(bpf(BPF_OBJ_GET, &mut attr)?)
}

/// The new fd a bpf(2) command returned.
fn owned_fd(ret: libc::c_long) -> io::Result<OwnedFd> {
    let fd = i32::try_from(ret).map_err(|_| io::Error::other("bpf(2): fd out of range"))?;
    // SAFETY: the command returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(super) fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is the leading part of `union bpf_attr` for `cmd`, valid for its size
    // (the kernel zero-fills the rest); what it points to (a path) outlives the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            std::mem::size_of::<T>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// An fd as bpf_attr carries it (valid fds are non-negative).
pub(super) fn fd_u32(fd: i32) -> u32 {
    fd.unsigned_abs()
}
