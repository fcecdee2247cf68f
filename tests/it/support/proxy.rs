//! A TCP proxy whose connections can be cut (or refused for a while), and a port
//! that never answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::services::amqp_url;

/// A TCP proxy whose connections can be cut, to drop one process's connection to
/// RabbitMQ or a database without touching other tests' connections. It can also
/// rewrite bytes on their way to the server.
pub struct Proxy {
    pub port: u16,
    upstream_url: String,
    cut: Arc<std::sync::Mutex<CancellationToken>>,
    /// While set, new connections are closed at once: the server is down.
    down: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// A proxy in front of RabbitMQ.
    pub async fn start() -> Proxy {
        Self::start_to(&amqp_url(), None).await
    }

    /// A proxy in front of the server of `url` (any scheme with a host and port).
    /// With `rewrite = (from, to)`, each `from` in what the client sends becomes
    /// `to` (same length, so AMQP frame sizes hold): a way to send bytes no client
    /// library will encode, such as a short string that is not UTF-8.
    pub async fn start_to(url: &str, rewrite: Option<(Vec<u8>, Vec<u8>)>) -> Proxy {
        let target = url::Url::parse(url).expect("server URL");
        let upstream = format!(
            "{}:{}",
            target.host_str().unwrap_or("127.0.0.1"),
            target.port_or_known_default().unwrap_or(5672)
        );
        if let Some((from, to)) = &rewrite {
            assert_eq!(from.len(), to.len(), "a rewrite keeps the length");
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let cut = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
        let current = cut.clone();
        let down = Arc::new(AtomicBool::new(false));
        let refusing = down.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if refusing.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let token = current.lock().expect("token").clone();
                let upstream = upstream.clone();
                let rewrite = rewrite.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = pipe(inbound, outbound, rewrite) => {}
                    }
                });
            }
        });
        Proxy {
            port,
            upstream_url: url.to_owned(),
            cut,
            down,
            task,
        }
    }

    /// The server's URL through this proxy.
    pub fn url(&self) -> String {
        let mut url = url::Url::parse(&self.upstream_url).expect("server URL");
        url.set_host(Some("127.0.0.1")).expect("host");
        url.set_port(Some(self.port)).expect("port");
        url.to_string()
    }

    /// Drops every connection through the proxy; new ones are accepted.
    pub fn cut(&self) {
        let mut token = self.cut.lock().expect("token");
        token.cancel();
        *token = CancellationToken::new();
    }

    /// The server goes away: every connection is cut, and new ones are closed as
    /// soon as they are accepted, until [`Proxy::up`].
    pub fn down(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.cut();
    }

    /// The server is back: connections are accepted and passed on again.
    pub fn up(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

/// Copies both ways until either side closes, rewriting client-to-server bytes.
async fn pipe(
    mut client: tokio::net::TcpStream,
    mut server: tokio::net::TcpStream,
    rewrite: Option<(Vec<u8>, Vec<u8>)>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Some((from, to)) = rewrite else {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let up = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = &mut buf[..n];
            let mut i = 0;
            while i + from.len() <= chunk.len() {
                if chunk[i..].starts_with(&from) {
                    chunk[i..i + from.len()].copy_from_slice(&to);
                    i += from.len();
                } else {
                    i += 1;
                }
            }
            if server_write.write_all(chunk).await.is_err() {
                break;
            }
        }
    };
    let down = tokio::io::copy(&mut server_read, &mut client_write);
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// A port that accepts TCP connections and never answers: a broker that hangs.
pub struct Blackhole {
    pub port: u16,
    task: JoinHandle<()>,
}

impl Blackhole {
    pub async fn start() -> Blackhole {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        Blackhole { port, task }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}
