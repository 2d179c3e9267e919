//! Release builds of the `slipway` binary are linked for a small resident
//! set, with lld (rustc's default linker on x86_64 Linux since 1.90) only:
//!
//! - The functions a sandbox runs go side by side (link/slipway.order,
//!   made by scripts/symbol-order): the kernel maps code 64 KiB around each
//!   page first executed, so packed together they keep about 3 MiB less of
//!   the executable resident per process. `SLIPWAY_SYMBOL_ORDER=0` turns
//!   it off.
//! - Relative relocations are packed (`-z pack-relative-relocs`, DT_RELR):
//!   a few KiB are read at start-up instead of 430 KiB of `.rela.dyn`.
//!   Only when the build machine's glibc has it (2.36): a dynamically
//!   linked binary then needs 2.36 where it runs; a static one (below)
//!   relocates itself and needs no glibc at all there.
//!
//! Cargo links the binary with glibc statically (a static PIE) through
//! link/rustc-wrapper, which .cargo/config.toml names and `SLIPWAY_STATIC=0`
//! turns off; the two `rerun-if` lines below make Cargo relink when either
//! changes.

use std::env;
use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=link/slipway.order");
    println!("cargo:rerun-if-env-changed=SLIPWAY_SYMBOL_ORDER");
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    println!("cargo:rerun-if-changed=link/rustc-wrapper");
    println!("cargo:rerun-if-env-changed=SLIPWAY_STATIC");
    if env::var("PROFILE").as_deref() != Ok("release")
        || env::var("TARGET").as_deref() != Ok("x86_64-unknown-linux-gnu")
        || !rustc_links_with_lld()
    {
        return;
    }
    let order = Path::new(&env::var("CARGO_MANIFEST_DIR").unwrap()).join("link/slipway.order");
    let ordered = !env::var("SLIPWAY_SYMBOL_ORDER").is_ok_and(|v| v == "0");
    if ordered && order.exists() {
        println!(
            "cargo:rustc-link-arg-bin=slipway=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        // Names the binary no longer has (code changed since the list was
        // made) are skipped, not errors.
        println!("cargo:rustc-link-arg-bin=slipway=-Wl,--no-warn-symbol-ordering");
    }
    if env::var("HOST") == env::var("TARGET") && glibc_at_least(2, 36) {
        println!("cargo:rustc-link-arg-bin=slipway=-Wl,-z,pack-relative-relocs");
    }
}

/// Whether this machine's glibc is at least `major.minor`.
fn glibc_at_least(major: u32, minor: u32) -> bool {
    let Ok(out) = Command::new("getconf").arg("GNU_LIBC_VERSION").output() else {
        return false;
    };
    // "glibc 2.36"
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(version) = text.trim().strip_prefix("glibc ") else {
        return false;
    };
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (major, minor)
}

/// Whether rustc links with its own lld: the default from 1.90 on, unless
/// the build picks another linker (a `linker` in Cargo's config, which
/// Cargo hands build scripts as RUSTC_LINKER, or linker flags).
fn rustc_links_with_lld() -> bool {
    if env::var_os("RUSTC_LINKER").is_some() {
        return false;
    }
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if flags.contains("linker") {
        return false;
    }
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(out) = Command::new(rustc).arg("-vV").output() else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(release) = text.lines().find_map(|l| l.strip_prefix("release: ")) else {
        return false;
    };
    let mut parts = release
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (1, 90)
}
