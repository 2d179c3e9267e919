//! QEMU's socket netdevs, rootless and tapless: `-netdev stream` (a unix
//! stream, each frame behind a 4-byte big-endian length) and `-netdev dgram`
//! (a unix datagram socket, one frame per datagram).
//!
//! What the VMM sends is hostile: a length of zero or beyond the frame limit
//! loses the stream's framing, so the connection is dropped (the stack lives
//! on and serves the next one); a bad datagram is dropped alone.

use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use netstack::driver::Link;
use netstack::wire::RxMeta;
// Frames either way are MIN_FRAME..=MAX_FRAME bytes (QEMU's own limit for
// these netdevs is 69632).
use netstack::wire::{MAX_FRAME, MIN_FRAME};

/// Frames' worth of bytes queued toward the VMM before `send` pushes back.
const TX_LIMIT: usize = 4 * (MAX_FRAME + 4);

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// One `-netdev stream` connection.
pub struct StreamLink {
    sock: UnixStream,
    rx: Vec<u8>,
    /// Bytes of `rx` that hold data.
    rx_len: usize,
    tx: Vec<u8>,
    /// Bytes of `tx` already written.
    tx_sent: usize,
}

impl StreamLink {
    pub fn new(sock: UnixStream) -> io::Result<Self> {
        sock.set_nonblocking(true)?;
        Ok(Self {
            sock,
            rx: vec![0; 4 + MAX_FRAME],
            rx_len: 0,
            tx: Vec::new(),
            tx_sent: 0,
        })
    }

    /// A complete frame at the head of the receive buffer, as (start, len).
    fn frame_ready(&self) -> io::Result<Option<(usize, usize)>> {
        if self.rx_len < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.rx[0], self.rx[1], self.rx[2], self.rx[3]]) as usize;
        if !(MIN_FRAME..=MAX_FRAME).contains(&len) {
            return Err(bad(format!(
                "the VMM sent a frame length of {len} (allowed {MIN_FRAME}..={MAX_FRAME}); dropping the connection"
            )));
        }
        Ok((self.rx_len >= 4 + len).then_some((4, len)))
    }

    fn flush(&mut self) -> io::Result<()> {
        while self.tx_sent < self.tx.len() {
            match self.sock.write(&self.tx[self.tx_sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.tx_sent += n,
                Err(e) => return Err(e),
            }
        }
        self.tx.clear();
        self.tx_sent = 0;
        Ok(())
    }
}

// SAFETY: the link owns its socket for as long as it lives.
unsafe impl Link for StreamLink {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<(usize, RxMeta)> {
        loop {
            if let Some((start, len)) = self.frame_ready()? {
                if len > buf.len() {
                    return Err(bad(format!(
                        "a {len}-byte frame does not fit the receive buffer"
                    )));
                }
                buf[..len].copy_from_slice(&self.rx[start..start + len]);
                self.rx.copy_within(start + len..self.rx_len, 0);
                self.rx_len -= start + len;
                // A stream carries no virtio-net header: nothing is vouched for.
                return Ok((len, RxMeta::default()));
            }
            match self.sock.read(&mut self.rx[self.rx_len..]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the VMM closed the stream",
                    ))
                }
                Ok(n) => self.rx_len += n,
                Err(e) => return Err(e),
            }
        }
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        if frame.len() > MAX_FRAME {
            return Err(bad(format!(
                "a {}-byte frame is over the limit",
                frame.len()
            )));
        }
        match self.flush() {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && self.tx.len() < TX_LIMIT => {}
            Err(e) => return Err(e),
        }
        let header = (frame.len() as u32).to_be_bytes();
        if self.tx.is_empty() {
            // The common case: straight out, no copy, unless the socket is full.
            let written = match self
                .sock
                .write_vectored(&[IoSlice::new(&header), IoSlice::new(frame)])
            {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e),
            };
            if written == header.len() + frame.len() {
                return Ok(());
            }
            let mut whole = Vec::with_capacity(header.len() + frame.len());
            whole.extend_from_slice(&header);
            whole.extend_from_slice(frame);
            self.tx = whole;
            self.tx_sent = written;
        } else {
            self.tx.extend_from_slice(&header);
            self.tx.extend_from_slice(frame);
        }
        Ok(())
    }
}

impl AsRawFd for StreamLink {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

/// Where `-netdev stream` connections come from: slipway listens (QEMU runs
/// with `server=off`), or connects to QEMU's listening socket (`--connect`).
pub enum StreamEndpoint {
    Listen {
        listener: UnixListener,
        path: PathBuf,
    },
    Connect(PathBuf),
}

impl StreamEndpoint {
    /// Listen on PATH, replacing a stale socket file left by an earlier run.
    pub fn listen(path: &Path) -> io::Result<Self> {
        if path.exists() && UnixStream::connect(path).is_err() {
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        Ok(Self::Listen {
            listener,
            path: path.to_owned(),
        })
    }

    /// Wait (blocking) for the next connection from the VMM.
    pub fn next(&self) -> io::Result<StreamLink> {
        match self {
            Self::Listen { listener, .. } => StreamLink::new(listener.accept()?.0),
            Self::Connect(path) => StreamLink::new(UnixStream::connect(path)?),
        }
    }
}

impl Drop for StreamEndpoint {
    fn drop(&mut self) {
        if let Self::Listen { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A `-netdev dgram` socket: slipway binds PATH (QEMU's `remote`), learns
/// QEMU's address (its `local`) from the first datagram, or is told it.
pub struct DgramLink {
    sock: UnixDatagram,
    path: PathBuf,
    peer: Option<PathBuf>,
}

impl DgramLink {
    pub fn bind(path: &Path, peer: Option<PathBuf>) -> io::Result<Self> {
        if path.exists() {
            std::fs::remove_file(path)?;
        }
        let sock = UnixDatagram::bind(path)?;
        sock.set_nonblocking(true)?;
        Ok(Self {
            sock,
            path: path.to_owned(),
            peer,
        })
    }

    fn learn(&mut self, from: &SocketAddr) {
        if let Some(p) = from.as_pathname() {
            if self.peer.as_deref() != Some(p) {
                tracing::info!(peer = %p.display(), "dgram peer");
                self.peer = Some(p.to_owned());
            }
        }
    }
}

// SAFETY: the link owns its socket for as long as it lives.
unsafe impl Link for DgramLink {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<(usize, RxMeta)> {
        loop {
            let (n, from) = self.sock.recv_from(buf)?;
            if n < MIN_FRAME {
                tracing::debug!(len = n, "dropped a runt datagram from the VMM");
                continue;
            }
            self.learn(&from);
            return Ok((n, RxMeta::default()));
        }
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let Some(peer) = &self.peer else {
            // Nobody to talk to yet: the frame is lost, as on a cable with no one attached.
            return Ok(());
        };
        match self.sock.send_to(frame, peer) {
            Ok(_) => Ok(()),
            // QEMU went away (or has not bound yet): same as no peer.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

impl AsRawFd for DgramLink {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl Drop for DgramLink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (StreamLink, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (StreamLink::new(a).unwrap(), b)
    }

    fn frame(len: usize, fill: u8) -> Vec<u8> {
        vec![fill; len]
    }

    #[test]
    fn stream_frames_survive_being_split_and_batched() {
        let (mut link, mut vmm) = pair();
        let f1 = frame(60, 1);
        let f2 = frame(1514, 2);
        let mut wire = Vec::new();
        for f in [&f1, &f2] {
            wire.extend_from_slice(&(f.len() as u32).to_be_bytes());
            wire.extend_from_slice(f);
        }
        // Byte by byte for the first frame, the rest in one go.
        let mut buf = vec![0; MAX_FRAME];
        for b in &wire[..10] {
            vmm.write_all(&[*b]).unwrap();
            assert_eq!(
                link.recv(&mut buf).unwrap_err().kind(),
                io::ErrorKind::WouldBlock
            );
        }
        vmm.write_all(&wire[10..]).unwrap();
        assert_eq!(link.recv(&mut buf).unwrap().0, 60);
        assert_eq!(&buf[..60], &f1[..]);
        assert_eq!(link.recv(&mut buf).unwrap().0, 1514);
        assert_eq!(&buf[..1514], &f2[..]);
        assert_eq!(
            link.recv(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    #[test]
    fn stream_rejects_zero_and_oversized_lengths() {
        for len in [0u32, 13, (MAX_FRAME + 1) as u32, u32::MAX] {
            let (mut link, mut vmm) = pair();
            vmm.write_all(&len.to_be_bytes()).unwrap();
            let err = link.recv(&mut vec![0; MAX_FRAME]).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "length {len}");
            assert!(err.to_string().contains(&len.to_string()));
        }
    }

    #[test]
    fn stream_truncated_frame_then_eof_is_an_error_not_a_frame() {
        let (mut link, mut vmm) = pair();
        vmm.write_all(&100u32.to_be_bytes()).unwrap();
        vmm.write_all(&[0; 50]).unwrap();
        drop(vmm);
        let err = link.recv(&mut vec![0; MAX_FRAME]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn stream_send_frames_with_length_and_queues_when_full() {
        let (mut link, mut vmm) = pair();
        let f = frame(65000, 7);
        // Fill the socket until send has to queue, then more until it pushes back.
        let mut sent = 0;
        loop {
            match link.send(&f) {
                Ok(()) => sent += 1,
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
                    break;
                }
            }
            assert!(sent < 10_000, "send never pushed back");
        }
        // Drain on the VMM side and check every frame arrives whole.
        vmm.set_nonblocking(false).unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = 0;
            let mut hdr = [0u8; 4];
            while vmm.read_exact(&mut hdr).is_ok() {
                let len = u32::from_be_bytes(hdr) as usize;
                let mut body = vec![0; len];
                vmm.read_exact(&mut body).unwrap();
                assert!(body.iter().all(|b| *b == 7));
                got += 1;
            }
            got
        });
        while !link.tx.is_empty() {
            match link.flush() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        drop(link);
        assert_eq!(reader.join().unwrap(), sent);
    }

    #[test]
    fn dgram_learns_its_peer_and_drops_runts() {
        let dir = std::env::temp_dir().join(format!("slw-dgram-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ours = dir.join("slipway.sock");
        let theirs = dir.join("qemu.sock");
        let mut link = DgramLink::bind(&ours, None).unwrap();
        let vmm = UnixDatagram::bind(&theirs).unwrap();
        vmm.send_to(&[1, 2, 3], &ours).unwrap();
        vmm.send_to(&frame(60, 9), &ours).unwrap();
        let mut buf = vec![0; MAX_FRAME];
        assert_eq!(link.recv(&mut buf).unwrap().0, 60);
        link.send(&frame(70, 4)).unwrap();
        let mut back = vec![0; 100];
        assert_eq!(vmm.recv(&mut back).unwrap(), 70);
        drop(link);
        assert!(!ours.exists(), "the socket file stays behind");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
