//! How a sandbox's frames get in and out of slipway: a Linux tap device
//! (by name or inherited fd), QEMU's stream and dgram netdevs, and
//! `slipway run`'s namespace, whose only link is a tap whose other end this
//! process holds. Each transport is a `netstack::driver::Link`;
//! `transport` is where one is described, opened and served across VMM
//! reconnects, and `sys` holds the binary's process-level system calls.
//!
//! Error messages say what failed and what to do; the OS error behind one
//! is its `source()`, so print the whole chain (`msg: cause: …`).

pub mod embed;
mod ifreq;
pub mod netns;
pub mod qemu;
pub mod sys;
pub mod tap;
pub mod transport;
pub mod vhost_user;
pub mod vnet;

pub use tap::Tap;
pub use transport::{Transport, TransportError, TransportSpec};

/// An error and its causes on one line, `what failed: why: the OS error`; a
/// cause whose text the line already holds is not repeated. The one printer
/// for error chains in the workspace's binaries.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}
