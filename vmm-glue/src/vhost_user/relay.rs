//! A message relay between the VMM and the vhost-user daemon, for the one
//! place where QEMU and the rust-vmm `vhost` crate disagree: QEMU (7.2 on)
//! restores each ring's enable state with SET_VRING_ENABLE *before* it sends
//! SET_FEATURES when it starts a vhost-user-net device, and the crate
//! refuses that message until PROTOCOL_FEATURES is acked — it drops the
//! connection. Without PROTOCOL_FEATURES offered QEMU fails the same step
//! itself, and cloud-hypervisor requires it. So the relay holds such early
//! messages (answering them if the VMM wants an answer) and passes them on
//! right after SET_FEATURES. Every other message, with its file
//! descriptors, passes unchanged, one whole message at a time.

use std::io::{self, IoSlice, IoSliceMut, Read};
use std::mem::size_of;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::message::{
    self, Packet, Repr, FLAG_NEED_REPLY, FLAG_REPLY, FLAG_VERSION, HEADER_LEN, SET_FEATURES,
    SET_VRING_ENABLE,
};

/// The vhost crate's MAX_ATTACHED_FD_ENTRIES.
const MAX_FDS: usize = 32;

const PROTOCOL_FEATURES: u64 = 1 << 30;

/// One message as read off a socket.
struct Message {
    header: Repr,
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// The relay's two threads; both end when either side closes.
pub(super) struct Relay {
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Relay between `vmm` (the VMM's connection) and `daemon` (a
    /// connection the daemon accepted).
    pub(super) fn start(vmm: UnixStream, daemon: UnixStream) -> io::Result<Relay> {
        let vmm_writer = Arc::new(Mutex::new(vmm.try_clone()?));
        let (vmm_r, daemon_w) = (vmm.try_clone()?, daemon.try_clone()?);
        let (daemon_r, vmm_w) = (daemon, vmm_writer.clone());
        let ends = [vmm, daemon_w.try_clone()?];
        let ends2 = [ends[0].try_clone()?, ends[1].try_clone()?];
        let to_daemon = std::thread::Builder::new()
            .name("vhost-user-relay".into())
            .spawn(move || {
                if let Err(e) = vmm_to_daemon(vmm_r, daemon_w, &vmm_writer) {
                    tracing::debug!(error = %e, "vhost-user relay: VMM side ended");
                }
                close(&ends);
            })?;
        let to_vmm = std::thread::Builder::new()
            .name("vhost-user-relay".into())
            .spawn(move || {
                if let Err(e) = daemon_to_vmm(daemon_r, &vmm_w) {
                    tracing::debug!(error = %e, "vhost-user relay: daemon side ended");
                }
                close(&ends2);
            })?;
        Ok(Relay {
            threads: vec![to_daemon, to_vmm],
        })
    }

    /// Wait for both directions to end (after either socket closed).
    pub(super) fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn close(ends: &[UnixStream]) {
    for s in ends {
        let _ = s.shutdown(Shutdown::Both);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn vmm_to_daemon(
    mut vmm: UnixStream,
    daemon: UnixStream,
    vmm_writer: &Mutex<UnixStream>,
) -> io::Result<()> {
    let mut protocol_acked = false;
    let mut held: Vec<Message> = Vec::new();
    while let Some(mut msg) = read_message(&mut vmm)? {
        let request = msg.header.request;
        if request == SET_VRING_ENABLE && !protocol_acked {
            if msg.header.flags & FLAG_NEED_REPLY != 0 {
                // REPLY_ACK: "done" (it will be, once the features are set).
                let ack = Repr {
                    request,
                    flags: FLAG_VERSION | FLAG_REPLY,
                    size: 8,
                };
                let mut reply = [0u8; HEADER_LEN + 8];
                ack.emit(&mut Packet::new_unchecked(&mut reply[..ack.buffer_len()]));
                send_all(&lock(vmm_writer), &reply)?;
                msg.header.flags &= !FLAG_NEED_REPLY;
            }
            tracing::debug!(
                "vhost-user relay: holding a SET_VRING_ENABLE sent before SET_FEATURES"
            );
            held.push(msg);
            continue;
        }
        let acks_protocol = request == SET_FEATURES
            && msg.body.len() >= 8
            && u64::from_le_bytes(msg.body[..8].try_into().unwrap_or_default()) & PROTOCOL_FEATURES
                != 0;
        write_message(&daemon, &msg)?;
        if acks_protocol && !protocol_acked {
            protocol_acked = true;
            for early in held.drain(..) {
                write_message(&daemon, &early)?;
            }
        }
    }
    Ok(())
}

fn daemon_to_vmm(mut daemon: UnixStream, vmm: &Mutex<UnixStream>) -> io::Result<()> {
    while let Some(msg) = read_message(&mut daemon)? {
        write_message(&lock(vmm), &msg)?;
    }
    Ok(())
}

/// One whole message, or None at a clean end of stream.
fn read_message(sock: &mut UnixStream) -> io::Result<Option<Message>> {
    let mut bytes = [0u8; HEADER_LEN];
    let mut fds = Vec::new();
    let n = recv_with_fds(sock, &mut bytes, &mut fds)?;
    if n == 0 {
        return Ok(None);
    }
    if n < HEADER_LEN {
        sock.read_exact(&mut bytes[n..])?;
    }
    let invalid = |e: message::Error| io::Error::new(io::ErrorKind::InvalidData, e.to_string());
    let header =
        Repr::parse(&Packet::new_checked(&bytes[..]).map_err(invalid)?).map_err(invalid)?;
    let mut body = vec![0u8; header.body_len()];
    sock.read_exact(&mut body)?;
    Ok(Some(Message { header, body, fds }))
}

fn write_message(sock: &UnixStream, msg: &Message) -> io::Result<()> {
    let header = msg.header.to_bytes();
    let parts = [IoSlice::new(&header), IoSlice::new(&msg.body)];
    let total = HEADER_LEN + msg.body.len();
    let sent = send_with_fds(sock, &parts, &msg.fds)?;
    if sent < total {
        // The descriptors went with the first bytes; the rest is plain data.
        let mut whole = Vec::with_capacity(total);
        whole.extend_from_slice(&header);
        whole.extend_from_slice(&msg.body);
        send_all(sock, &whole[sent..])?;
    }
    Ok(())
}

fn send_all(sock: &UnixStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match send_with_fds(sock, &[IoSlice::new(data)], &[])? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n => data = &data[n..],
        }
    }
    Ok(())
}

fn cmsg_space() -> usize {
    // SAFETY: CMSG_SPACE is a pure size computation.
    unsafe { libc::CMSG_SPACE((MAX_FDS * size_of::<RawFd>()) as u32) as usize }
}

/// recvmsg(2) into `buf`, taking any SCM_RIGHTS descriptors that came along.
fn recv_with_fds(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut iov = [IoSliceMut::new(buf)];
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut control = vec![0u64; cmsg_space().div_ceil(8)];
    // SAFETY: msghdr is plain old data; all-zero is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr().cast();
    msg.msg_iovlen = iov.len();
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() * 8;
    let n = loop {
        // SAFETY: msg points at live buffers (iov, control) whose lengths it
        // states; the kernel writes within them.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled,
    // bounded by msg_controllen; each SCM_RIGHTS payload holds `count`
    // descriptors that are now ours.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a vhost-user message carried more than {MAX_FDS} descriptors"),
        ));
    }
    Ok(n)
}

/// sendmsg(2) of `parts` with `fds` attached (MSG_NOSIGNAL: a VMM that is
/// gone is an error, not a SIGPIPE); returns the bytes sent.
fn send_with_fds(sock: &UnixStream, parts: &[IoSlice<'_>], fds: &[OwnedFd]) -> io::Result<usize> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let bytes = raw.len() * size_of::<RawFd>();
    let mut control = vec![0u64; cmsg_space().div_ceil(8)];
    // SAFETY: msghdr is plain old data; all-zero is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = parts.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = parts.len();
    if !raw.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is a pure size computation; `bytes` is at most
        // MAX_FDS descriptors, which `control` was sized for (read_message
        // never collects more).
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(bytes as u32) } as usize;
        // SAFETY: the header and data are written inside `control`, which
        // holds CMSG_SPACE(bytes); the descriptors stay open until sendmsg
        // returns.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(bytes as u32) as usize;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr(),
                libc::CMSG_DATA(cmsg) as *mut RawFd,
                raw.len(),
            );
        }
    }
    loop {
        // SAFETY: msg points at live iovecs (IoSlice is ABI-compatible with
        // iovec) and a filled control buffer.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn message(request: u32, flags: u32, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&request.to_le_bytes());
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&(body.len() as u32).to_le_bytes());
        m.extend_from_slice(body);
        m
    }

    fn read_plain(sock: &mut UnixStream) -> (u32, u32, Vec<u8>) {
        let msg = read_message(sock).unwrap().expect("a message");
        (msg.header.request, msg.header.flags, msg.body)
    }

    #[test]
    fn early_vring_enable_waits_for_set_features_and_fds_pass() {
        let (mut vmm, vmm_far) = UnixStream::pair().unwrap();
        let (daemon_far, mut daemon) = UnixStream::pair().unwrap();
        let relay = Relay::start(vmm_far, daemon_far).unwrap();

        let enable = |index: u32| {
            let mut body = index.to_le_bytes().to_vec();
            body.extend_from_slice(&1u32.to_le_bytes());
            body
        };
        // GET_FEATURES, two early enables (one wanting a reply), SET_FEATURES.
        vmm.write_all(&message(1, FLAG_VERSION, &[])).unwrap();
        vmm.write_all(&message(SET_VRING_ENABLE, FLAG_VERSION, &enable(0)))
            .unwrap();
        vmm.write_all(&message(
            SET_VRING_ENABLE,
            FLAG_VERSION | FLAG_NEED_REPLY,
            &enable(1),
        ))
        .unwrap();
        let reply = read_plain(&mut vmm);
        assert_eq!(
            reply,
            (SET_VRING_ENABLE, FLAG_VERSION | FLAG_REPLY, vec![0; 8])
        );
        let features = (PROTOCOL_FEATURES | 1 << 32).to_le_bytes();
        vmm.write_all(&message(SET_FEATURES, FLAG_VERSION, &features))
            .unwrap();
        // A message with a descriptor attached (as SET_VRING_KICK has).
        let (kick, _kick_far) = UnixStream::pair().unwrap();
        let body = 0u64.to_le_bytes();
        let m = message(12, FLAG_VERSION, &body);
        let sent = send_with_fds(&vmm, &[IoSlice::new(&m)], &[OwnedFd::from(kick)]).unwrap();
        assert_eq!(sent, m.len());

        assert_eq!(read_plain(&mut daemon).0, 1);
        assert_eq!(read_plain(&mut daemon).0, SET_FEATURES);
        let (r, f, b) = read_plain(&mut daemon);
        assert_eq!((r, f, b), (SET_VRING_ENABLE, FLAG_VERSION, enable(0)));
        let (r, f, b) = read_plain(&mut daemon);
        assert_eq!(
            (r, f, b),
            (SET_VRING_ENABLE, FLAG_VERSION, enable(1)),
            "NEED_REPLY cleared"
        );
        let kick = read_message(&mut daemon).unwrap().unwrap();
        assert_eq!((kick.header.request, kick.fds.len()), (12, 1));

        // Replies flow back; closing one side ends the relay.
        daemon
            .write_all(&message(1, FLAG_VERSION | FLAG_REPLY, &7u64.to_le_bytes()))
            .unwrap();
        assert_eq!(read_plain(&mut vmm).2, 7u64.to_le_bytes());
        drop(vmm);
        relay.join();
        assert!(read_message(&mut daemon).unwrap().is_none());
    }

    #[test]
    fn oversized_message_ends_the_relay() {
        let (mut vmm, vmm_far) = UnixStream::pair().unwrap();
        let (daemon_far, mut daemon) = UnixStream::pair().unwrap();
        let relay = Relay::start(vmm_far, daemon_far).unwrap();
        let mut m = message(5, FLAG_VERSION, &[]);
        m[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        vmm.write_all(&m).unwrap();
        relay.join();
        assert!(read_message(&mut daemon).unwrap().is_none());
    }
}
