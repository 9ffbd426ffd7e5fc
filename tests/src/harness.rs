//! The integration-test harness: every test gets its own netd in a sandbox
//! ([`netd_testkit::Instance`], here named `TestEnv`), which removes everything it made, and
//! every process it started, on success, failure and panic, and fails the test when it can't.

use std::net::{SocketAddr, TcpStream};

pub use netd_testkit::{HOST_ADDR, Instance as TestEnv, OUTSIDE_ADDR, UPLINK};

/// A TCP connection from the fixed local address `local` (SO_REUSEADDR so tests can repeat).
pub fn bound_connect(local: SocketAddr, server: SocketAddr) -> TcpStream {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, setsockopt, socket, sockopt,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    setsockopt(&fd, sockopt::ReuseAddr, &true).unwrap();
    let v4 = |a: SocketAddr| match a {
        SocketAddr::V4(a) => SockaddrIn::from(a),
        SocketAddr::V6(_) => unreachable!("IPv4 only"),
    };
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &v4(local)).unwrap();
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &v4(server)).unwrap();
    TcpStream::from(fd)
}
