//! How connections are accepted, bounded and ended.
//!
//! `axum::serve` keeps every connection for as long as its client wants: a
//! client that opens hundreds of connections and sends nothing, or a
//! request head a byte at a time, holds a socket and a task each for ever.
//! So the server drives hyper's HTTP/1 connections itself: each gets a
//! header-read timeout (hyper's), an idle timeout (a watchdog here, fed by
//! the bytes the socket moves) and a permit of a semaphore that caps how
//! many are open. A connection beyond the cap is answered 503 and closed
//! at once, so a flood costs the server one accept and one write each.

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tower::ServiceExt;

use crate::{ConnectionLimits, Metrics};

/// What a connection beyond the cap is told before it is closed.
const BUSY_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
Content-Type: application/json\r\n\
Content-Length: 63\r\n\
Retry-After: 1\r\n\
Connection: close\r\n\
\r\n\
{\"error\":\"the server has too many open connections; try again\"}";

/// When a connection last moved a byte, and whether a request of it is
/// being answered; shared by its socket wrapper, its service and its
/// watchdog.
struct Activity {
    start: Instant,
    /// Nanoseconds from `start` to the last byte read or written, or to
    /// the end of the last answered request.
    last: AtomicU64,
    /// Requests of this connection whose answer is being computed.
    busy: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let nanos = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.fetch_max(nanos, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }

    /// When the connection counts as idle if nothing happens before then;
    /// `None` while a request is being answered (the handler may take its
    /// time without the socket moving).
    fn idle_at(&self, timeout: Duration) -> Option<Instant> {
        (self.busy.load(Ordering::Relaxed) == 0).then(|| self.last() + timeout)
    }
}

/// Marks a request of the connection as being answered until dropped.
struct Busy(Arc<Activity>);

impl Busy {
    fn new(activity: Arc<Activity>) -> Self {
        activity.busy.fetch_add(1, Ordering::Relaxed);
        Self(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        // The idle time of a connection counts from the end of its last
        // answer, not from the last byte of the request.
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A socket that records when it last moved a byte.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        res
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accepts connections on `listener` and serves `router` on each until
/// `shutdown` completes; then stops accepting, asks every connection to
/// finish its request in flight and close, and returns once all have.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (stop, stopping) = watch::channel(false);
    let mut shutdown = pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: waiting a little
                // lets connections close instead of spinning on the error.
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics.connection_refused();
            // Best effort and without waiting: a client that does not read
            // its 503 still sees the connection close.
            let _ = stream.try_write(BUSY_RESPONSE);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(
            stream,
            router.clone(),
            limits.clone(),
            metrics.clone(),
            stopping.clone(),
            permit,
        ));
    }
    drop(listener);
    let _ = stop.send(true);
    // Every connection holds a permit until it ends: having them all back
    // means every connection has closed.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
}

/// Why a connection ended, for the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The client or the server closed it after its requests.
    Closed,
    /// No complete request head within the header-read timeout.
    HeaderTimeout,
    /// No byte either way within the idle timeout.
    Idle,
    /// A protocol error or a broken socket.
    Error,
}

async fn connection(
    stream: TcpStream,
    router: Router,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    mut stopping: watch::Receiver<bool>,
    permit: OwnedSemaphorePermit,
) {
    metrics.connection_opened();
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Tracked {
        inner: stream,
        activity: activity.clone(),
    });
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let busy = Busy::new(activity.clone());
            let router = router.clone();
            async move {
                let resp = router.oneshot(req.map(Body::new)).await;
                drop(busy);
                resp
            }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true)
        .serve_connection(io, service);
    let mut conn = pin!(conn);
    let mut draining = false;
    if *stopping.borrow_and_update() {
        conn.as_mut().graceful_shutdown();
        draining = true;
    }
    let ended = loop {
        // Far enough to never fire; re-armed after every wake-up.
        let far = Instant::now() + limits.idle_timeout;
        let idle_at = activity.idle_at(limits.idle_timeout);
        tokio::select! {
            res = conn.as_mut() => break match res {
                Ok(()) => Ended::Closed,
                Err(e) if e.is_timeout() => Ended::HeaderTimeout,
                Err(e) => {
                    tracing::debug!("connection: {e}");
                    Ended::Error
                }
            },
            _ = stopping.changed(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep_until(idle_at.unwrap_or(far)) => {
                let now = Instant::now();
                if activity.idle_at(limits.idle_timeout).is_some_and(|at| at <= now) {
                    // Dropping the connection closes its socket.
                    break Ended::Idle;
                }
            }
        }
    };
    // The slot is free before the metrics say so, never after: whoever
    // sees the count drop may connect at once.
    drop(permit);
    metrics.connection_closed(ended);
}
