//! Idle timeouts for connections: a stream wrapper notes when bytes last
//! moved, and `until_idle` drops whatever serves the connection once nothing
//! has moved for the timeout. Cheap: one atomic store per read or write.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// When bytes last moved on a connection.
#[derive(Clone)]
pub struct Activity(Arc<AtomicU64>);

impl Activity {
    pub fn new() -> Self {
        let a = Self(Arc::new(AtomicU64::new(0)));
        a.touch();
        a
    }

    pub fn touch(&self) {
        let ms = epoch().elapsed().as_millis() as u64;
        self.0.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        epoch() + Duration::from_millis(self.0.load(Ordering::Relaxed))
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// Run `work` until it finishes, or until `activity` has been still for
/// `timeout`; then `work` is dropped (which closes its connection).
/// Returns `None` on timeout.
pub async fn until_idle<F: Future>(
    activity: Activity,
    timeout: Duration,
    work: F,
) -> Option<F::Output> {
    let mut work = std::pin::pin!(work);
    let mut sleep = std::pin::pin!(tokio::time::sleep_until(activity.last() + timeout));
    std::future::poll_fn(move |cx| {
        if let Poll::Ready(out) = work.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let deadline = activity.last() + timeout;
            if deadline <= Instant::now() {
                return Poll::Ready(None);
            }
            sleep.as_mut().reset(deadline);
        }
    })
    .await
}

/// A stream that touches its `Activity` whenever bytes move.
pub struct Watched<T> {
    inner: T,
    activity: Activity,
}

impl<T> Watched<T> {
    pub fn new(inner: T, activity: Activity) -> Self {
        Self { inner, activity }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn still_work_is_dropped_after_the_timeout() {
        let a = Activity::new();
        let out = until_idle(
            a.clone(),
            Duration::from_secs(5),
            std::future::pending::<()>(),
        )
        .await;
        assert!(out.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn activity_pushes_the_deadline_back() {
        let a = Activity::new();
        let toucher = a.clone();
        let work = async move {
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_secs(3)).await;
                toucher.touch();
            }
            7
        };
        assert_eq!(
            until_idle(a.clone(), Duration::from_secs(5), work).await,
            Some(7)
        );
    }
}
