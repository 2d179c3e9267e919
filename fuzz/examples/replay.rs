//! Replay one input through a target outside libFuzzer, printing the decoded
//! input first: `cargo run --example replay -- TARGET FILE`.

use arbitrary::{Arbitrary, Unstructured};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, target, file] = &args[..] else {
        eprintln!("usage: replay TARGET FILE");
        std::process::exit(2);
    };
    let data = std::fs::read(file).expect("read the input file");
    if target == "stack_frames" {
        slipway_fuzz::stack_frames::TRACE.store(true, std::sync::atomic::Ordering::Relaxed);
        let input =
            slipway_fuzz::stack_frames::Input::arbitrary_take_rest(Unstructured::new(&data));
        if std::env::var_os("SHOW_INPUT").is_some() {
            println!("{input:#?}");
        }
    }
    if target == "tcp_segments" {
        slipway_fuzz::stack_frames::TRACE.store(true, std::sync::atomic::Ordering::Relaxed);
        let input =
            slipway_fuzz::tcp_segments::Input::arbitrary_take_rest(Unstructured::new(&data));
        if std::env::var_os("SHOW_INPUT").is_some() {
            println!("{input:#?}");
        }
    }
    if target == "resolver" && std::env::var_os("SHOW_INPUT").is_some() {
        let input = slipway_fuzz::resolver::Input::arbitrary_take_rest(Unstructured::new(&data));
        println!("{input:#?}");
    }
    if !slipway_fuzz::run_target(target, &data) {
        eprintln!("no target {target}");
        std::process::exit(2);
    }
    println!("ok");
}
