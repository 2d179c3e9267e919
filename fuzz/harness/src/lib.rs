//! Fuzz harnesses for slipway. Each target is a plain `fn(&[u8])` that
//! panics on a broken promise: cargo-fuzz's targets (`fuzz/fuzz_targets/`)
//! call it, and `tests/replay.rs` runs every seed and crash input through
//! exactly the same code in `cargo test`.

pub mod check;
pub mod classify;
pub mod cluster_record;
pub mod first_bytes;
pub mod frames;
pub mod gateway;
pub mod header_rewrite;
pub mod input;
pub mod kit;
pub mod policy;
pub mod qemu_stream;
pub mod resolver;
pub mod services;
pub mod socks;
pub mod stack_frames;
pub mod tcp_segments;
pub mod vhost_queues;
pub mod vnet;

/// A harness: takes the fuzzer's bytes, panics on a broken promise.
pub type Harness = fn(&[u8]);

/// Every target by name, as `fuzz/fuzz_targets/NAME.rs` and the seed folders call it.
pub const TARGETS: &[(&str, Harness)] = &[
    ("stack_frames", stack_frames::run),
    ("tcp_segments", tcp_segments::run),
    ("classify", classify::run),
    ("policy_parse", policy::run),
    ("dhcp", services::dhcp),
    ("dns", services::dns),
    ("gateway", gateway::gateway),
    ("qemu_stream", qemu_stream::stream),
    ("vnet", vnet::run),
    ("vhost_queues", vhost_queues::run),
    ("resolver", resolver::run),
    ("first_bytes", first_bytes::run),
    ("socks_reply", socks::run),
    ("header_rewrite", header_rewrite::run),
    ("cluster_record", cluster_record::run),
];

/// Run the target `name` on `data`; `false` if there is no such target.
pub fn run_target(name: &str, data: &[u8]) -> bool {
    match TARGETS.iter().find(|(n, _)| *n == name) {
        Some((_, run)) => {
            run(data);
            true
        }
        None => false,
    }
}
