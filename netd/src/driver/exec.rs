//! `netd exec NAME -- CMD`: runs a command inside a container's network namespace, with the
//! container's hosts, resolv.conf and hostname mounted over /etc in a private mount namespace
//! and its hostname set in a private UTS namespace. The machine's own /etc is never touched.

use std::{
    ffi::CString,
    fs::File,
    os::{fd::AsRawFd, unix::process::CommandExt as _},
    path::Path,
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::store::Container;

/// The files mounted over /etc, as (source, target) C strings prepared before the fork.
fn bind_mounts(dir: &Path) -> Result<Vec<(CString, CString)>> {
    ["hosts", "resolv.conf", "hostname"]
        .iter()
        .filter(|f| Path::new("/etc").join(f).exists())
        .map(|f| {
            let src = CString::new(dir.join(f).into_os_string().into_encoded_bytes())?;
            Ok((src, CString::new(format!("/etc/{f}"))?))
        })
        .collect()
}

/// Runs `argv` in container `c` (whose files are in `dir`) and returns its exit code.
pub fn run(c: &Container, dir: &Path, argv: &[String]) -> Result<i32> {
    let Some((program, args)) = argv.split_first() else {
        bail!("netd exec needs a command after --");
    };
    let netns = File::open(&c.netns).with_context(|| format!("open {}", c.netns.display()))?;
    let mounts = bind_mounts(dir)?;
    let hostname = c.hostname.clone().into_bytes();
    let root = CString::new("/")?;
    let fd = netns.as_raw_fd();
    let mut cmd = Command::new(program);
    cmd.args(args);
    // SAFETY: between fork and exec the closure only makes raw syscalls on data prepared
    // above; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            let check = |rc: libc::c_int| {
                if rc == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            };
            check(libc::setns(fd, libc::CLONE_NEWNET))?;
            check(libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWUTS))?;
            // Keep our bind mounts from propagating back to the machine's mount namespace.
            check(libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            for (src, dst) in &mounts {
                check(libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ))?;
            }
            check(libc::sethostname(hostname.as_ptr().cast(), hostname.len()))
        });
    }
    let status = cmd.status().with_context(|| format!("run {program}"))?;
    drop(netns);
    Ok(status.code().unwrap_or(128 + 9))
}
