//! What a userland proxy does once it listens: TCP connections are joined to a connection of
//! their own to the container; UDP datagrams go to the container through a socket per client
//! address, and its answers back out of the listening socket. As docker-proxy does, including
//! its 90 s timeout for an idle UDP session.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result};
use tokio::{
    net::{TcpListener, TcpStream, UdpSocket},
    time::Instant,
};

use crate::datapath::Protocol;

/// A UDP session with no datagram either way for this long ends (docker-proxy's).
const UDP_IDLE: Duration = Duration::from_secs(90);
/// The largest UDP payload over IPv4.
const MAX_DATAGRAM: usize = 65507;
/// A failed accept (out of file descriptors) is tried again after this, rather than at once.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// The bound socket, made before the fork so a failure to bind reaches netd.
pub enum Listener {
    Tcp(std::net::TcpListener),
    Udp(std::net::UdpSocket),
}

impl Listener {
    pub fn bind(proto: Protocol, addr: SocketAddr) -> std::io::Result<Self> {
        Ok(match proto {
            Protocol::Tcp => Self::Tcp(std::net::TcpListener::bind(addr)?),
            Protocol::Udp => Self::Udp(std::net::UdpSocket::bind(addr)?),
        })
    }
}

/// Detaches the serving process from the command that started it: a session of its own (no
/// terminal's signals), and stdio on /dev/null (netd reads the starting process's output to
/// its end, which must not wait for this one).
pub fn detach() -> Result<()> {
    nix::unistd::setsid().context("start a session")?;
    let null = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .context("open /dev/null")?;
    nix::unistd::dup2_stdin(&null)?;
    nix::unistd::dup2_stdout(&null)?;
    nix::unistd::dup2_stderr(&null)?;
    Ok(())
}

/// Serves `listener`, forwarding to `to`, until it fails.
pub fn run(listener: Listener, to: SocketAddr) -> Result<()> {
    // A client gone mid-write must end its connection only: netd's main restores SIGPIPE's
    // default action (end the process) for its commands.
    // SAFETY: no other thread exists yet; SIG_IGN is a valid disposition.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match listener {
            Listener::Tcp(l) => {
                l.set_nonblocking(true)?;
                tcp(TcpListener::from_std(l)?, to).await
            }
            Listener::Udp(s) => {
                s.set_nonblocking(true)?;
                udp(UdpSocket::from_std(s)?, to).await
            }
        }
    })
}

async fn tcp(listener: TcpListener, to: SocketAddr) -> Result<()> {
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            tokio::time::sleep(ACCEPT_RETRY).await;
            continue;
        };
        tokio::spawn(async move {
            // As docker-proxy: a client the container doesn't take is closed. Each side's
            // end of stream is passed on (a half close), until both have ended.
            if let Ok(mut backend) = TcpStream::connect(to).await {
                tokio::io::copy_bidirectional(&mut client, &mut backend)
                    .await
                    .ok();
            }
        });
    }
}

/// A client's way to the container: its own socket, connected there.
struct Session {
    backend: Arc<UdpSocket>,
    last_seen: Instant,
}

type Sessions = Arc<Mutex<HashMap<SocketAddr, Session>>>;

async fn udp(socket: UdpSocket, to: SocketAddr) -> Result<()> {
    let socket = Arc::new(socket);
    let sessions = Sessions::default();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, client) = socket.recv_from(&mut buf).await?;
        let known = sessions.lock().unwrap().get_mut(&client).map(|s| {
            s.last_seen = Instant::now();
            s.backend.clone()
        });
        let backend = match known {
            Some(backend) => backend,
            None => match open_session(&sessions, &socket, client, to).await {
                Ok(backend) => backend,
                // No way to the container (no route, say): the datagram is lost, as if sent.
                Err(_) => continue,
            },
        };
        backend.send(&buf[..n]).await.ok();
    }
}

/// Opens `client`'s session to `to`, with the task that relays the container's answers.
async fn open_session(
    sessions: &Sessions,
    socket: &Arc<UdpSocket>,
    client: SocketAddr,
    to: SocketAddr,
) -> std::io::Result<Arc<UdpSocket>> {
    let any: IpAddr = match to {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let backend = UdpSocket::bind((any, 0)).await?;
    backend.connect(to).await?;
    let backend = Arc::new(backend);
    sessions.lock().unwrap().insert(
        client,
        Session {
            backend: backend.clone(),
            last_seen: Instant::now(),
        },
    );
    tokio::spawn(relay_answers(
        sessions.clone(),
        socket.clone(),
        client,
        backend.clone(),
    ));
    Ok(backend)
}

/// Sends what the container answers on `backend` to `client` from the listening socket,
/// until the session has been idle for [`UDP_IDLE`]; then ends it.
async fn relay_answers(
    sessions: Sessions,
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    backend: Arc<UdpSocket>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Some(last_seen) = sessions.lock().unwrap().get(&client).map(|s| s.last_seen) else {
            return;
        };
        match tokio::time::timeout_at(last_seen + UDP_IDLE, backend.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                if let Some(s) = sessions.lock().unwrap().get_mut(&client) {
                    s.last_seen = Instant::now();
                }
                socket.send_to(&buf[..n], client).await.ok();
            }
            // The container's port is closed (an ICMP error on the connected socket): the
            // client's next datagram tries again.
            Ok(Err(_)) => {}
            Err(_) => {
                let mut sessions = sessions.lock().unwrap();
                if sessions
                    .get(&client)
                    .is_some_and(|s| s.last_seen + UDP_IDLE <= Instant::now())
                {
                    sessions.remove(&client);
                    return;
                }
            }
        }
    }
}
