//! Network pieces a test puts between clients and servers: a proxy whose connections can be cut
//! (a network drop) or refused for a while (a partition), and a plain round-robin TCP balancer
//! in front of several instances, as an operator would run one.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::AbortHandle,
};

/// A TCP proxy in front of one server whose connections the test can cut, like a network drop,
/// and which can refuse WebSocket upgrades, like a proxy that does not support them.
pub struct Proxy {
    pub addr: SocketAddr,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    blocked: Arc<AtomicBool>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        Self::start_with(target, false).await
    }

    /// A proxy that drops every WebSocket upgrade request (plain HTTP passes).
    pub async fn without_websockets(target: SocketAddr) -> Self {
        Self::start_with(target, true).await
    }

    async fn start_with(target: SocketAddr, block_websockets: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let blocked = Arc::new(AtomicBool::new(false));
        let tracked = connections.clone();
        let refusing = blocked.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if refusing.load(Ordering::SeqCst) {
                    continue;
                }
                let task = tokio::spawn(async move {
                    let mut first = vec![0u8; 16 * 1024];
                    let Ok(read) = inbound.read(&mut first).await else {
                        return;
                    };
                    first.truncate(read);
                    let head = String::from_utf8_lossy(&first).to_ascii_lowercase();
                    if block_websockets && head.contains("upgrade: websocket") {
                        return;
                    }
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        if outbound.write_all(&first).await.is_err() {
                            return;
                        }
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tracked.lock().unwrap().push(task.abort_handle());
            }
        });
        Self {
            addr,
            connections,
            blocked,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops every open connection (the sockets close without a close frame).
    pub fn cut(&self) {
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    /// Cuts every connection and refuses new ones until [`Proxy::heal`]: a partition.
    pub fn partition(&self) {
        self.blocked.store(true, Ordering::SeqCst);
        self.cut();
    }

    pub fn heal(&self) {
        self.blocked.store(false, Ordering::SeqCst);
    }
}

/// A round-robin TCP balancer: each new connection goes to the next backend (skipping one that
/// refuses), with no stickiness at all.
pub struct Balancer {
    pub addr: SocketAddr,
}

impl Balancer {
    pub async fn start(backends: Vec<SocketAddr>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let next = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let backends = backends.clone();
                let next = next.clone();
                tokio::spawn(async move {
                    for _ in 0..backends.len() {
                        let backend =
                            backends[next.fetch_add(1, Ordering::SeqCst) % backends.len()];
                        if let Ok(mut outbound) = TcpStream::connect(backend).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                            return;
                        }
                    }
                });
            }
        });
        Self { addr }
    }
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
