//! QEMU `-netdev stream` framing: whatever bytes a VMM writes, the link
//! yields only frames whose length lies within its limits and whose bytes are
//! exactly the ones that followed their length; bad framing is an error that
//! ends the connection, never a panic or a frame.

use std::io::{ErrorKind, Write};
use std::os::unix::net::UnixStream;

use netstack::driver::Link;
use netstack::wire::MAX_FRAME;
use vmm_glue::qemu::StreamLink;

pub fn stream(data: &[u8]) {
    let Ok((ours, mut vmm)) = UnixStream::pair() else {
        return;
    };
    let Ok(mut link) = StreamLink::new(ours) else {
        return;
    };
    // What a correct parser must yield for this byte stream.
    let mut expected = Vec::new();
    let mut at = 0;
    while at + 4 <= data.len() {
        let len = u32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize;
        if !(14..=MAX_FRAME).contains(&len) || at + 4 + len > data.len() {
            break;
        }
        expected.push(&data[at + 4..at + 4 + len]);
        at += 4 + len;
    }
    let mut buf = vec![0u8; MAX_FRAME];
    let mut got = 0;
    // Feed in chunks (sizes from the data itself) so frames straddle reads.
    let step = 1 + data.first().copied().unwrap_or(0) as usize * 97;
    for chunk in data.chunks(step) {
        if vmm.write_all(chunk).is_err() {
            return;
        }
        loop {
            match link.recv(&mut buf) {
                Ok((n, _)) => {
                    assert!(
                        got < expected.len(),
                        "a frame beyond the well-framed prefix"
                    );
                    assert_eq!(&buf[..n], expected[got], "frame {got} differs");
                    got += 1;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    assert_eq!(e.kind(), ErrorKind::InvalidData, "{e}");
                    return;
                }
            }
        }
    }
    assert_eq!(
        got,
        expected.len(),
        "well-framed frames were not all delivered"
    );
}
