//! The `slipway` binary: `run` puts a command behind a userspace stack in a
//! fresh namespace; `attach` serves one VMM's link (tap, QEMU stream or
//! dgram, vhost-user); `serve` runs many sandboxes behind a control API;
//! `ctl` drives a running `serve`; `edge` is the public gateway for many
//! `serve` hosts. This file only dispatches and reports.

mod attach;
mod cli;
mod cluster;
mod confine;
mod ctl;
mod door;
mod edge;
mod public_url;
mod rules;
mod run;
mod serve;

use std::io;
use std::process::ExitCode;

use clap::Parser;
use netstack::{EgressPolicy, StackConfig};

use cli::{Cli, Command, IngressOpts, NetOpts, UsageError};

fn main() -> ExitCode {
    report_panics_in_one_line();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return cli::parse_failed(e),
    };
    // Every flow holds a host socket: lift the soft descriptor limit to the
    // hard one so the per-sandbox flow caps, not a default of 1024, bound it.
    vmm_glue::sys::raise_fd_limit();
    vmm_glue::sys::tune_allocator();
    match cli.command {
        Command::Run {
            net,
            ingress,
            rules,
            confine,
            command,
        } => exit_with(run::run(&net, &ingress, &rules, confine.confine, &command)),
        Command::Attach {
            link,
            connect,
            peer,
            net,
            ingress,
            rules,
            confine,
        } => {
            init_logging(&net, "info");
            let plan = confine
                .confine
                .then(|| confine::modes::attach(&link, connect));
            exit_with(attach::attach(
                &net,
                &ingress,
                &rules,
                plan,
                (link, connect, peer),
            ))
        }
        Command::Serve(args) => serve::main(args),
        Command::Edge(args) => edge::main(args),
        Command::Ctl(args) => ctl::main(args),
    }
}

/// A panic is reported in one line, without a backtrace: a sandbox's stack
/// catches its own panics and logs them with the guest frame that caused
/// them (`netstack::driver`), and after confinement the backtrace printer's
/// file and path lookups are not allowed anyway.
fn report_panics_in_one_line() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        eprintln!("slipway: thread '{name}' panicked: {info}");
    }));
}

/// Why `run` or `attach` ended in failure: a usage error (exit 2) or the
/// host's (exit 1). Printed as one line with its causes.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Usage(#[from] UsageError),
    #[error(transparent)]
    Namespace(#[from] vmm_glue::netns::NetnsError),
    #[error(transparent)]
    Confine(#[from] confine::ConfineError),
    #[error(transparent)]
    Transport(#[from] vmm_glue::TransportError),
    #[error(transparent)]
    PublicUrl(#[from] public_url::PublicUrlError),
    #[error(transparent)]
    Ca(#[from] inject::CaError),
    #[error("cannot write the sandbox's CA certificate to {path}")]
    CaOut {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the runtime")]
    Runtime(#[source] io::Error),
    #[error("cannot serve the tap")]
    ServeTap(#[source] io::Error),
    #[error("the sandbox link failed")]
    LinkFailed(#[source] io::Error),
    #[error("cannot wait for the command")]
    Wait(#[source] io::Error),
    #[error("lost the command's exit status")]
    LostStatus,
}

fn exit_with(result: Result<u8, Failure>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("slipway: {}", vmm_glue::chain(&e));
            ExitCode::from(if matches!(e, Failure::Usage(_)) { 2 } else { 1 })
        }
    }
}

fn init_logging(net: &NetOpts, default: &str) {
    let filter = net
        .log
        .clone()
        .or_else(|| std::env::var("SLIPWAY_LOG").ok())
        .unwrap_or_else(|| default.to_string());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&io::stderr()))
        .with_target(true)
        .init();
}

/// The stack's configuration and policy from the flags `run` and `attach` share.
fn build(net: &NetOpts, ingress: &IngressOpts) -> Result<(StackConfig, EgressPolicy), Failure> {
    let mut cfg = net.stack_config()?;
    // The gateway keeps a few idle connections into the guest besides the
    // ones that serve requests (which its own cap counts).
    cfg.caps.max_inbound = ingress.max_inbound as usize + ingress::pool::MAX_IDLE;
    Ok((cfg, net.policy()?))
}

/// The gateway's plan and its bound listeners, before the sandbox starts.
fn prepare_ingress(
    ingress: &IngressOpts,
) -> Result<Option<(cli::IngressPlan, public_url::Listeners)>, Failure> {
    let Some(plan) = ingress.plan()? else {
        return Ok(None);
    };
    let listeners = public_url::bind(&plan)?;
    Ok(Some((plan, listeners)))
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Failure::Runtime)
}
