//! The `slipway` binary: `run` puts a command behind a userspace stack in a
//! fresh namespace; `attach` serves one VMM's link (tap, QEMU stream or
//! dgram, vhost-user); `serve` runs many sandboxes behind a control API.

mod cli;
mod confine;
mod ctl;
mod door;
mod public_url;
mod serve;
mod transport;

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::ExitCode;

use clap::Parser;
use netstack::driver::{Driver, Parked};
use netstack::{EgressPolicy, Stack, StackConfig};
use vmm_glue::netns::{self, GuestNetConfig};
use vmm_glue::Tap;

use cli::{Cli, Command, IngressOpts, NetOpts, UsageError};

/// An error and its causes, one line: `what failed: why: the OS error`.
fn chain(e: &dyn std::error::Error) -> String {
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

fn main() -> ExitCode {
    report_panics_in_one_line();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return cli::parse_failed(e),
    };
    raise_fd_limit();
    match cli.command {
        Command::Run {
            net,
            ingress,
            confine,
            command,
        } => exit_with(run(&net, &ingress, confine.confine, &command)),
        Command::Attach {
            link,
            connect,
            peer,
            net,
            ingress,
            confine,
        } => {
            init_logging(&net, "info");
            let plan = confine
                .confine
                .then(|| confine::modes::attach(&link, connect));
            exit_with(attach(&net, &ingress, plan, (link, connect, peer)))
        }
        Command::Serve(args) => serve::main(args),
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

/// Every flow holds a host socket: lift the soft descriptor limit to the hard
/// one so the per-sandbox flow caps, not a default of 1024, are what bounds it.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write a valid, exclusive rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

enum Failure {
    Usage(UsageError),
    Other(String),
}

impl From<UsageError> for Failure {
    fn from(e: UsageError) -> Self {
        Failure::Usage(e)
    }
}

fn exit_with(result: Result<u8, Failure>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(code),
        Err(Failure::Usage(UsageError(msg))) => {
            eprintln!("slipway: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Other(msg)) => {
            eprintln!("slipway: {msg}");
            ExitCode::from(1)
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
    let listeners = public_url::bind(&plan).map_err(Failure::Other)?;
    Ok(Some((plan, listeners)))
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Other(format!("cannot start the runtime: {e}")))
}

fn run(
    net: &NetOpts,
    ingress: &IngressOpts,
    confined: bool,
    command: &[std::ffi::OsString],
) -> Result<u8, Failure> {
    let (cfg, policy) = build(net, ingress)?;
    let ingress = prepare_ingress(ingress)?;
    init_logging(net, "warn");
    let plan = &cfg.plan;
    let guest = GuestNetConfig {
        tap_name: "tap0".into(),
        mtu: cfg.mtu as u32,
        mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
        ipv4: plan.guest_v4,
        ipv4_prefix: plan.prefix_v4,
        gateway_v4: plan.gateway_v4,
        ipv6: Some((plan.guest_v6, plan.prefix_v6)),
        gateway_v6: plan.gateway_v6_link_local,
        nameservers: vec![plan.dns_v4.into(), plan.dns_v6.into()],
        vnet_hdr: net.offload,
    };
    // Fork before any thread exists: the runtime comes after.
    let netns::Sandboxed { pid, tap, gate } =
        netns::spawn(&guest, command).map_err(|e| Failure::Other(chain(&e)))?;
    let tap = transport::offload(tap, net.offload_mtu());
    // Set-up is over and no thread runs yet: confine before the runtime.
    if confined {
        let plan = confine::modes::run();
        confine::begin(&plan)
            .and_then(|()| confine::finish(&plan))
            .map_err(|e| Failure::Other(chain(&e)))?;
    }
    let rt = runtime()?;
    let code = rt.block_on(async move {
        let stack = Stack::new(cfg, policy, std::time::Instant::now());
        let driver = Driver::new(stack, tap)
            .map_err(|e| Failure::Other(format!("cannot serve the tap: {e}")))?;
        if let Some((plan, listeners)) = ingress {
            public_url::start(plan, listeners, driver.handle()).map_err(Failure::Other)?;
        }
        let child = tokio::task::spawn_blocking(move || netns::wait(pid));
        forward_signals(pid);
        if let Err(e) = gate.release() {
            // The sandbox process exits on its own (127 or 126); report it like a shell would.
            eprintln!("slipway: {e}");
            let _ = child.await;
            return Ok(e.exit_code().clamp(0, 255) as u8);
        }
        let mut code = None;
        let served = driver
            .run(async {
                code = Some(child.await);
            })
            .await;
        if let Err(e) = served {
            // The link failed: the sandbox has no network any more; end it.
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            return Err(Failure::Other(format!("the sandbox link failed: {e}")));
        }
        match code {
            Some(Ok(Ok(c))) => Ok(c.clamp(0, 255) as u8),
            Some(Ok(Err(e))) => Err(Failure::Other(format!("cannot wait for the command: {e}"))),
            _ => Err(Failure::Other("lost the command's exit status".into())),
        }
    });
    code
}

/// SIGTERM, SIGINT and SIGHUP to slipway go on to the command.
fn forward_signals(pid: libc::pid_t) {
    use tokio::signal::unix::{signal, SignalKind};
    for kind in [
        SignalKind::terminate(),
        SignalKind::interrupt(),
        SignalKind::hangup(),
    ] {
        let Ok(mut sig) = signal(kind) else { continue };
        tokio::spawn(async move {
            while sig.recv().await.is_some() {
                // SAFETY: plain kill(2) on our own child.
                unsafe { libc::kill(pid, kind.as_raw_value()) };
            }
        });
    }
}

fn adopt_fd(fd: i32, offload_mtu: Option<usize>) -> Result<Tap, Failure> {
    // SAFETY: fcntl(F_GETFD) only asks whether the number is an open descriptor.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(Failure::Usage(UsageError(format!(
            "invalid --tap-fd {fd}: no such open file descriptor"
        ))));
    }
    // SAFETY: the descriptor is open and was handed to us to own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Tap::from_fd(owned)
        .map(|tap| transport::offload(tap, offload_mtu))
        .map_err(|e| Failure::Other(chain(&e)))
}

/// The link `attach` serves, from its flags.
fn open_transport(
    link: cli::AttachLink,
    connect: bool,
    peer: Option<std::path::PathBuf>,
    offload_mtu: Option<usize>,
) -> Result<transport::Transport, Failure> {
    use transport::Transport;
    if let Some(name) = link.tap {
        return transport::open_tap(&name, offload_mtu)
            .map(Transport::Tap)
            .map_err(|e| Failure::Other(chain(&e)));
    }
    if let Some(fd) = link.tap_fd {
        return adopt_fd(fd, offload_mtu).map(Transport::Tap);
    }
    if let Some(path) = link.qemu_stream {
        return transport::qemu_stream(path, connect).map_err(Failure::Other);
    }
    if let Some(path) = link.qemu_dgram {
        return transport::qemu_dgram(path, peer).map_err(Failure::Other);
    }
    if let Some(path) = link.vhost_user {
        return transport::vhost_user(path, offload_mtu).map_err(Failure::Other);
    }
    Err(Failure::Usage(UsageError(
        "give one of --tap, --tap-fd, --qemu-stream, --qemu-dgram, --vhost-user".into(),
    )))
}

fn attach(
    net: &NetOpts,
    ingress: &IngressOpts,
    confined: Option<confine::Plan>,
    (link, connect, peer): (cli::AttachLink, bool, Option<std::path::PathBuf>),
) -> Result<u8, Failure> {
    let (cfg, policy) = build(net, ingress)?;
    let ingress = prepare_ingress(ingress)?;
    // Confined in two steps around opening the link: vhost-user starts
    // threads there, which must inherit Landlock and the capabilities left.
    let confine = |step: fn(&confine::Plan) -> confine::Result<()>| match &confined {
        Some(plan) => step(plan).map_err(|e| Failure::Other(chain(&e))),
        None => Ok(()),
    };
    confine(confine::begin)?;
    let link = open_transport(link, connect, peer, net.offload_mtu())?;
    confine(confine::finish)?;
    tracing::info!(link = %link.describe(), "serving");
    let rt = runtime()?;
    rt.block_on(async move {
        let parked = Parked::new(Stack::new(cfg, policy, std::time::Instant::now()));
        if let Some((plan, listeners)) = ingress {
            public_url::start(plan, listeners, parked.handle()).map_err(Failure::Other)?;
        }
        let stop = async {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return std::future::pending().await;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        transport::serve(parked, link, std::pin::pin!(stop))
            .await
            .map_err(Failure::Other)?;
        Ok(0)
    })
}
