//! A TCP proxy with a gate, to hold a process's requests to a server for a
//! while (a slow or stalled network path) at a moment the test chooses.

use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Forwards connections from `127.0.0.1:<port>` to `upstream`. While the gate
/// is closed, bytes in the gated direction are held (not dropped) and
/// delivered once it opens; the other direction always passes. Stops when
/// dropped.
pub struct GatedProxy {
    port: u16,
    gate: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl GatedProxy {
    /// Listens on a free port of 127.0.0.1, gate open; the gate holds what
    /// clients send (requests never reach the server).
    pub async fn start(upstream: SocketAddr) -> Self {
        Self::start_gating(upstream, Direction::Requests).await
    }

    /// Like [`GatedProxy::start`], but the gate holds the server's answers:
    /// requests are executed, their callers just do not hear back (a slow
    /// network path on the way back, a paused client).
    pub async fn start_holding_answers(upstream: SocketAddr) -> Self {
        Self::start_gating(upstream, Direction::Answers).await
    }

    async fn start_gating(upstream: SocketAddr, gated: Direction) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let (gate, _) = watch::channel(true);
        let opened = gate.subscribe();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let opened = opened.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let (requests, answers) = match gated {
                        Direction::Requests => (Some(opened), None),
                        Direction::Answers => (None, Some(opened)),
                    };
                    tokio::select! {
                        () = pump(client_read, server_write, requests) => {}
                        () = pump(server_read, client_write, answers) => {}
                    }
                });
            }
        });
        Self { port, gate, task }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Holds every client's bytes from now on.
    pub fn close(&self) {
        self.gate.send_replace(false);
    }

    /// Delivers what was held, and lets everything through again.
    pub fn open(&self) {
        self.gate.send_replace(true);
    }
}

/// Which way the gate holds bytes.
#[derive(Debug, Clone, Copy)]
enum Direction {
    Requests,
    Answers,
}

impl Drop for GatedProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut gate: Option<watch::Receiver<bool>>,
) {
    let mut buf = vec![0_u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Some(gate) = gate.as_mut()
            && gate.wait_for(|open| *open).await.is_err()
        {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
