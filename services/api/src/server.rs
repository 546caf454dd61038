//! The HTTP serving loop, with the limits `axum::serve` does not offer
//! (SECURITY.md, "Limits"):
//!
//! - a connection cap (`HTTP_MAX_CONNECTIONS`): the loop accepts only while
//!   it holds a permit, so excess connections wait in the kernel's listen
//!   backlog (and time out there if it stays full) rather than being
//!   accepted and starved;
//! - a header-read timeout (`HTTP_HEADER_READ_TIMEOUT_MS`, hyper's own):
//!   headers not complete that long after the server began waiting for them
//!   close the connection (slowloris). hyper's timer runs while a kept-alive
//!   connection waits for its next request, too;
//! - an idle timeout (`HTTP_IDLE_TIMEOUT_MS`): a connection that has no
//!   request in flight and sent no byte for that long is closed;
//! - half-closed HTTP/1.1 connections still get their response;
//! - graceful shutdown: when the token is cancelled the listener is closed
//!   (new connections are refused), every connection finishes the request
//!   it serves and closes, and after `SHUTDOWN_GRACE_MS` whatever is left is
//!   dropped.
//!
//! Each request goes to the fast path first ([`crate::fast_path`]: reads of
//! one customer's document), and to the router when the fast path leaves it.
//! The per-request deadline (`HTTP_REQUEST_TIMEOUT_MS`) is part of
//! [`crate::middleware::RequestLayer`] and of the fast path, so its answer is
//! the API's JSON error.

use crate::fast_path::{Answer, FastPath};
use axum::Router;
use axum::extract::{ConnectInfo, Request};
use futures::future::{self, Either};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// The server's limits, from settings.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
}

impl ServerLimits {
    pub fn from_settings(settings: &settings::Settings) -> Self {
        Self {
            header_read_timeout: settings.http_header_read_timeout,
            idle_timeout: settings.http_idle_timeout,
            max_connections: settings.http_max_connections,
            shutdown_grace: settings.shutdown_grace,
        }
    }
}

/// What answers requests: the router, and before it the fast path of the
/// document reads.
#[derive(Clone)]
pub struct Service {
    pub router: Router,
    pub fast_path: Arc<FastPath>,
}

/// Serves `service` on `listener` until `shutdown` is cancelled, then drains
/// (see the module's documentation). Returns once every connection closed
/// or the grace passed.
pub async fn serve(
    listener: TcpListener,
    service: Service,
    limits: ServerLimits,
    shutdown: CancellationToken,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .half_close(true);
    let builder = Arc::new(builder);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let tracker = TaskTracker::new();
    loop {
        // Waiting for a permit before accepting leaves excess connections
        // in the listen backlog.
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = Arc::clone(&connections).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let builder = Arc::clone(&builder);
        let service = service.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            serve_connection(&builder, stream, peer, service, limits, shutdown).await;
            drop(permit);
        });
    }
    // Closing the listener refuses new connections from here on.
    drop(listener);
    tracker.close();
    tracing::info!(
        connections = tracker.len(),
        grace_ms = limits.shutdown_grace.as_millis() as u64,
        "stopped accepting; draining connections"
    );
    if tokio::time::timeout(limits.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            connections = tracker.len(),
            "shutdown grace passed; dropping the connections left"
        );
    }
}

/// One connection: served by hyper, watched for idleness, and asked to
/// finish and close when shutdown begins.
async fn serve_connection(
    builder: &auto::Builder<TokioExecutor>,
    stream: TcpStream,
    peer: SocketAddr,
    service: Service,
    limits: ServerLimits,
    shutdown: CancellationToken,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: Arc::clone(&activity),
    });
    let Service { router, fast_path } = service;
    let service = {
        let activity = Arc::clone(&activity);
        hyper::service::service_fn(move |mut request: Request<Incoming>| {
            let busy = activity.begin();
            let (method, uri, headers) = (request.method(), request.uri(), request.headers());
            let later = match fast_path.answer(method, uri, headers, peer.ip()) {
                Answer::Served(response) => {
                    drop(busy);
                    return Either::Left(future::ready(Ok(response)));
                }
                Answer::Later(answer) => Either::Left(answer),
                Answer::Router => {
                    // The client's address, for whoever needs it (as
                    // `into_make_service_with_connect_info` would give it).
                    request.extensions_mut().insert(ConnectInfo(peer));
                    let router = router.clone();
                    Either::Right(async move {
                        match router.oneshot(request).await {
                            Ok(response) => response,
                            Err(never) => match never {},
                        }
                    })
                }
            };
            Either::Right(async move {
                let response = later.await;
                drop(busy);
                Ok::<_, Infallible>(response)
            })
        })
    };
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let mut draining = false;
    loop {
        let check = activity.idle_deadline(limits.idle_timeout);
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(%peer, error = %err, "connection ended with an error");
                }
                return;
            }
            () = shutdown.cancelled(), if !draining => {
                // Finishes the request in flight, then closes; an idle
                // connection closes now.
                connection.as_mut().graceful_shutdown();
                draining = true;
            }
            () = tokio::time::sleep_until(check) => {
                if activity.idle_for(limits.idle_timeout) {
                    tracing::debug!(%peer, "closing an idle connection");
                    return;
                }
            }
        }
    }
}

/// What one connection is doing, for the idle timeout.
struct Activity {
    /// Requests being answered.
    in_flight: AtomicUsize,
    /// Whether a byte arrived since the connection last became idle.
    heard: AtomicBool,
    /// When it last became idle (accepted, or its last request answered).
    idle_since: std::sync::Mutex<Instant>,
}

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            heard: AtomicBool::new(false),
            idle_since: std::sync::Mutex::new(Instant::now()),
        }
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Busy(Arc::clone(self))
    }

    fn idle_since(&self) -> Instant {
        *self
            .idle_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// When to check next: when the idle timeout would run out if nothing
    /// happens; while busy, a timeout from now.
    fn idle_deadline(&self, timeout: Duration) -> Instant {
        if self.in_flight.load(Ordering::SeqCst) > 0 || self.heard.load(Ordering::SeqCst) {
            Instant::now() + timeout
        } else {
            self.idle_since() + timeout
        }
    }

    /// Whether the connection has been idle (no request, no byte) for `timeout`.
    fn idle_for(&self, timeout: Duration) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0
            && !self.heard.load(Ordering::SeqCst)
            && self.idle_since().elapsed() >= timeout
    }
}

/// A request being answered; its end makes the connection idle again.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            *self
                .0
                .idle_since
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
            self.0.heard.store(false, Ordering::SeqCst);
        }
    }
}

/// The connection's stream, noting when bytes arrive.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.heard.store(true, Ordering::SeqCst);
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
