//! The parent ↔ sandbox-process protocol over a SOCK_SEQPACKET pair. The
//! child sends its tap fd (SCM_RIGHTS) or why setup failed, then waits for
//! "go"; its end is close-on-exec, so end of file means exec succeeded, and
//! a message instead says why exec failed. One message per packet: a tag
//! byte, then UTF-8 text.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Longest text carried; a longer one is cut here, never at the receiver.
const MAX_TEXT: usize = 4000;

const TAG_TAP: u8 = b'T';
const TAG_SETUP_FAILED: u8 = b'E';
const TAG_COMMAND_NOT_FOUND: u8 = b'N';
const TAG_EXEC_FAILED: u8 = b'X';
const TAG_GO: u8 = b'G';

/// A message to send.
pub(super) enum Message<'a> {
    /// Child → parent: the network is up; here is the tap.
    Tap(BorrowedFd<'a>),
    /// Child → parent: setup failed, in one line.
    SetupFailed(&'a str),
    /// Child → parent: exec found no such file; the text is the command.
    CommandNotFound(&'a str),
    /// Child → parent: exec failed, in one line.
    ExecFailed(&'a str),
    /// Parent → child: the stack serves the tap; run the command.
    Go,
}

/// A message received, or the end of the conversation.
#[derive(Debug)]
pub(super) enum Received {
    Tap(OwnedFd),
    SetupFailed(String),
    CommandNotFound(String),
    ExecFailed(String),
    Go,
    /// The other end is closed (exec'd or gone).
    Closed,
}

impl Received {
    /// The error for a message that makes no sense at this point.
    pub(super) fn unexpected(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected message from the sandbox process: {self:?}"),
        )
    }
}

/// A connected pair, both ends close-on-exec: (parent's, child's).
pub(super) fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    let kind = libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC;
    // SAFETY: socketpair writes two fds into the array.
    if unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, fds.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds are fresh and owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Room for one SCM_RIGHTS fd, aligned as `cmsghdr` needs.
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

pub(super) fn send(sock: BorrowedFd<'_>, message: Message<'_>) -> io::Result<()> {
    let (tag, text, fd) = match message {
        Message::Tap(fd) => (TAG_TAP, "", Some(fd)),
        Message::SetupFailed(text) => (TAG_SETUP_FAILED, text, None),
        Message::CommandNotFound(text) => (TAG_COMMAND_NOT_FOUND, text, None),
        Message::ExecFailed(text) => (TAG_EXEC_FAILED, text, None),
        Message::Go => (TAG_GO, "", None),
    };
    let mut data = Vec::with_capacity(1 + text.len().min(MAX_TEXT));
    data.push(tag);
    data.extend_from_slice(&text.as_bytes()[..text.len().min(MAX_TEXT)]);
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    let mut cmsg_buf = CmsgBuf([0; 64]);
    // SAFETY: `msghdr` is pointers and integers; all-zero is a valid empty header.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    if let Some(fd) = fd {
        let fd_len = std::mem::size_of::<RawFd>() as libc::c_uint;
        hdr.msg_control = cmsg_buf.0.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is arithmetic on its argument.
        hdr.msg_controllen = unsafe { libc::CMSG_SPACE(fd_len) } as _;
        // SAFETY: `hdr.msg_control` points at `cmsg_buf`, aligned and larger
        // than CMSG_SPACE(4), so the first header and its data fit inside it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&hdr);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_len) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd.as_raw_fd());
        }
    }
    loop {
        // SAFETY: `hdr` points at `iov`, `data` and `cmsg_buf`, all alive
        // for the call; MSG_NOSIGNAL turns a closed peer into EPIPE.
        if unsafe { libc::sendmsg(sock.as_raw_fd(), &hdr, libc::MSG_NOSIGNAL) } >= 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Blocks for the next message.
pub(super) fn recv(sock: BorrowedFd<'_>) -> io::Result<Received> {
    let mut data = [0u8; 1 + MAX_TEXT];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    let mut cmsg_buf = CmsgBuf([0; 64]);
    // SAFETY: `msghdr` is pointers and integers; all-zero is a valid empty header.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = cmsg_buf.0.as_mut_ptr().cast();
    hdr.msg_controllen = cmsg_buf.0.len() as _;
    let n = loop {
        // SAFETY: `hdr` points at `iov`, `data` and `cmsg_buf`, all alive
        // and exclusively ours for the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut hdr, libc::MSG_CMSG_CLOEXEC) };
        if let Ok(n) = usize::try_from(n) {
            break n;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    let mut fds = received_fds(&hdr);
    if n == 0 {
        return Ok(Received::Closed);
    }
    if hdr.msg_flags & (libc::MSG_CTRUNC | libc::MSG_TRUNC) != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "truncated message from the sandbox process",
        ));
    }
    let text = String::from_utf8_lossy(&data[1..n]).into_owned();
    Ok(match data[0] {
        TAG_TAP if !fds.is_empty() => Received::Tap(fds.swap_remove(0)),
        TAG_SETUP_FAILED => Received::SetupFailed(text),
        TAG_COMMAND_NOT_FOUND => Received::CommandNotFound(text),
        TAG_EXEC_FAILED => Received::ExecFailed(text),
        TAG_GO => Received::Go,
        tag => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "malformed message from the sandbox process (tag {tag:#04x}, {} fds)",
                    fds.len()
                ),
            ))
        }
    })
}

/// Takes ownership of every fd that arrived with the message, so none leaks
/// whatever the message turns out to be.
fn received_fds(hdr: &libc::msghdr) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    // SAFETY: `hdr` was filled by recvmsg; CMSG_FIRSTHDR/CMSG_NXTHDR walk only
    // the `msg_controllen` bytes the kernel wrote, and every SCM_RIGHTS
    // payload is an array of fds now installed in this process and owned by
    // nobody else.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let header_len = libc::CMSG_LEN(0) as usize;
                let payload = ((*cmsg).cmsg_len as usize).saturating_sub(header_len);
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..payload / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
        }
    }
    fds
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_tap_fd_crosses_the_pair() {
        let (a, b) = pair().unwrap();
        let (r, _w) = pair().unwrap();
        send(a.as_fd(), Message::Tap(r.as_fd())).unwrap();
        let Received::Tap(fd) = recv(b.as_fd()).unwrap() else {
            panic!("expected a tap fd");
        };
        assert_ne!(fd.as_raw_fd(), r.as_raw_fd());
    }

    #[test]
    fn text_messages_and_end_of_file_arrive_as_sent() {
        let (a, b) = pair().unwrap();
        send(a.as_fd(), Message::SetupFailed("cannot open /dev/net/tun")).unwrap();
        send(a.as_fd(), Message::CommandNotFound("frob")).unwrap();
        send(a.as_fd(), Message::Go).unwrap();
        drop(a);
        assert!(
            matches!(recv(b.as_fd()).unwrap(), Received::SetupFailed(t) if t == "cannot open /dev/net/tun")
        );
        assert!(matches!(recv(b.as_fd()).unwrap(), Received::CommandNotFound(t) if t == "frob"));
        assert!(matches!(recv(b.as_fd()).unwrap(), Received::Go));
        assert!(matches!(recv(b.as_fd()).unwrap(), Received::Closed));
    }

    #[test]
    fn a_tap_message_without_an_fd_is_malformed() {
        let (a, b) = pair().unwrap();
        // SAFETY: send writes from a live one-byte buffer.
        unsafe { libc::send(a.as_raw_fd(), [TAG_TAP].as_ptr().cast(), 1, 0) };
        assert_eq!(
            recv(b.as_fd()).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }
}
