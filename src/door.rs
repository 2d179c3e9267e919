//! The public URL gateway's way into one sandbox's stack (for `serve`'s many
//! sandboxes and for `run`/`attach`'s one), counted: every connection it
//! opens into a guest holds one count until dropped, so that draining on
//! SIGTERM can tell when the requests in flight have finished.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use ingress::{BoxGuestStream, ConnectFuture, GuestConnector, GuestError, GuestPort};
use netstack::driver::{DriverHandle, GuestConnectError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;

pub struct StackDoor {
    handle: DriverHandle,
    /// Connections into guests alive now (over all of `serve`'s sandboxes).
    live: Arc<AtomicUsize>,
}

impl StackDoor {
    pub fn new(handle: DriverHandle, live: Arc<AtomicUsize>) -> Self {
        Self { handle, live }
    }
}

impl GuestConnector for StackDoor {
    fn connect(&self, port: GuestPort) -> ConnectFuture<'_> {
        Box::pin(async move {
            match self.handle.connect_guest(port.get(), false).await {
                Ok(stream) => {
                    Ok(Box::new(Counted::new(stream, self.live.clone())) as BoxGuestStream)
                }
                Err(GuestConnectError::OverCap) => Err(GuestError::OverCap),
                Err(GuestConnectError::NoPort) => Err(GuestError::NoPort),
                Err(GuestConnectError::Refused) => Err(GuestError::Refused),
                Err(GuestConnectError::TimedOut) => Err(GuestError::TimedOut),
                Err(GuestConnectError::Gone) => Err(GuestError::Gone),
            }
        })
    }
}

/// A stream into a guest that counts itself while it lives.
struct Counted {
    inner: UnixStream,
    live: Arc<AtomicUsize>,
}

impl Counted {
    fn new(inner: UnixStream, live: Arc<AtomicUsize>) -> Self {
        live.fetch_add(1, Ordering::Relaxed);
        Self { inner, live }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
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

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
