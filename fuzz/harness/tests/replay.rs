//! Every input a fuzzer ever crashed on (`fuzz/regressions/<target>-<name>`)
//! and every committed seed (`fuzz/seeds/<target>/`), of every target,
//! replayed through the very harness code the fuzz targets run, as a plain
//! `cargo test`: no cargo-fuzz, no nightly. A harness assertion or a panic
//! in the stack fails the test.

use slipway_fuzz as harness;

use std::panic;
use std::path::{Path, PathBuf};

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs each input, collecting failures so one run names them all.
fn replay(inputs: Vec<(String, PathBuf)>) -> usize {
    let mut failed = Vec::new();
    for (target, path) in &inputs {
        let data = std::fs::read(path).expect("read a fuzz input");
        let ran = panic::catch_unwind(|| harness::run_target(target, &data));
        match ran {
            Ok(true) => {}
            Ok(false) => failed.push(format!("{}: no fuzz target {target}", path.display())),
            Err(_) => failed.push(format!("{} ({target})", path.display())),
        }
    }
    assert!(
        failed.is_empty(),
        "fuzz inputs that fail:\n  {}",
        failed.join("\n  ")
    );
    inputs.len()
}

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn crash_inputs_found_by_fuzzing_stay_fixed() {
    let inputs = files(&manifest().join("../regressions"))
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let target = harness::TARGETS
                .iter()
                .map(|(t, _)| *t)
                .filter(|t| name.starts_with(&format!("{t}-")))
                .max_by_key(|t| t.len())
                .unwrap_or_else(|| panic!("{name}: name it <target>-<short-name>"));
            (target.to_string(), p)
        })
        .collect();
    replay(inputs);
}

#[test]
fn seed_corpora_run_clean() {
    let seeds = manifest().join("../seeds");
    let mut inputs = Vec::new();
    for (target, _) in harness::TARGETS {
        let found = files(&seeds.join(target));
        assert!(!found.is_empty(), "no seeds for fuzz target {target}");
        inputs.extend(found.into_iter().map(|p| (target.to_string(), p)));
    }
    let n = replay(inputs);
    assert!(n >= harness::TARGETS.len());
}
