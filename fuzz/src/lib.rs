//! Fuzz harnesses for slipway's netstack. Each target is a plain
//! `fn(&[u8])`, so the regression test in `netstack/tests/fuzz_regressions.rs`
//! replays crash inputs and seeds through exactly the code the fuzzer ran
//! (it includes this file with `#[path]`; keep paths here `self`/`super`-relative).

pub mod check;
pub mod classify;
pub mod frames;
pub mod input;
pub mod policy;
pub mod services;
pub mod stack_frames;
pub mod tcp_segments;

/// Every target by name, as `fuzz/fuzz_targets/NAME.rs` and the seed folders call it.
/// A harness: takes the fuzzer's bytes, panics on a broken promise.
pub type Harness = fn(&[u8]);

pub const TARGETS: &[(&str, Harness)] = &[
    ("stack_frames", stack_frames::run),
    ("tcp_segments", tcp_segments::run),
    ("classify", classify::run),
    ("policy_parse", policy::run),
    ("dhcp", services::dhcp),
    ("dns", services::dns),
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
// gateway, qemu_stream, vnet and vhost_queues need ingress and vmm-glue, which the netstack replay test (tests/fuzz_regressions.rs) cannot link.
#[cfg(fuzzing)]
pub mod gateway;
#[cfg(fuzzing)]
pub mod qemu_stream;
#[cfg(fuzzing)]
pub mod vhost_queues;
#[cfg(fuzzing)]
pub mod vnet;
