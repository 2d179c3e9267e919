//! How a sandbox's frames get in and out of slipway: a Linux tap device
//! (by name or inherited fd), and `slipway run`'s namespace, whose only
//! link is a tap whose other end this process holds.

mod ifreq;
pub mod netns;
pub mod tap;

pub use tap::Tap;
