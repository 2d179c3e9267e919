//! How a sandbox's frames get in and out of slipway: a Linux tap device
//! (by name or inherited fd), QEMU's stream and dgram netdevs, and
//! `slipway run`'s namespace, whose only link is a tap whose other end this
//! process holds. Each transport is a `netstack::driver::Link`.
//!
//! Error messages say what failed and what to do; the OS error behind one
//! is its `source()`, so print the whole chain (`msg: cause: …`).

pub mod embed;
mod ifreq;
pub mod netns;
pub mod qemu;
pub mod tap;
pub mod vhost_user;
pub mod vnet;

pub use tap::Tap;
