//! The `slipway` binary: `run` puts a command behind a userspace stack in a
//! fresh namespace; `attach` serves an existing tap for a VMM.

mod cli;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::ExitCode;

use clap::Parser;
use netstack::driver::{Driver, Link};
use netstack::stack::smol_instant;
use netstack::{EgressPolicy, Stack, StackConfig};
use vmm_glue::netns::{self, GuestNetConfig};
use vmm_glue::Tap;

use cli::{Cli, Command, NetOpts, UsageError};

/// The tap as the driver's link.
struct TapLink(Tap);

// SAFETY: the Tap owns its descriptor for as long as it lives.
unsafe impl Link for TapLink {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0
            .recv(buf)?
            .ok_or_else(|| io::ErrorKind::WouldBlock.into())
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        if self.0.send(frame)? {
            Ok(())
        } else {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }
}

impl AsRawFd for TapLink {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    raise_fd_limit();
    match cli.command {
        Command::Run { net, command } => exit_with(run(&net, &command)),
        Command::Attach { link, net } => {
            let tap = match (link.tap, link.tap_fd) {
                (Some(name), _) => Tap::open(&name).map_err(|e| Failure::Other(e.to_string())),
                (None, Some(fd)) => adopt_fd(fd),
                (None, None) => Err(Failure::Usage(UsageError(
                    "give --tap NAME or --tap-fd N".into(),
                ))),
            };
            exit_with(tap.and_then(|tap| attach(&net, tap)))
        }
    }
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

fn build(net: &NetOpts) -> Result<(StackConfig, EgressPolicy), Failure> {
    Ok((net.stack_config()?, net.policy()?))
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Other(format!("cannot start the runtime: {e}")))
}

fn run(net: &NetOpts, command: &[std::ffi::OsString]) -> Result<u8, Failure> {
    let (cfg, policy) = build(net)?;
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
    };
    // Fork before any thread exists: the runtime comes after.
    let netns::Sandboxed { pid, tap, gate } =
        netns::spawn(&guest, command).map_err(|e| Failure::Other(e.to_string()))?;
    let rt = runtime()?;
    let code = rt.block_on(async move {
        let stack = Stack::new(cfg, policy, smol_instant(std::time::Duration::ZERO));
        let driver = Driver::new(stack, TapLink(tap))
            .map_err(|e| Failure::Other(format!("cannot serve the tap: {e}")))?;
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

fn adopt_fd(fd: i32) -> Result<Tap, Failure> {
    // SAFETY: fcntl(F_GETFD) only asks whether the number is an open descriptor.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(Failure::Usage(UsageError(format!(
            "invalid --tap-fd {fd}: no such open file descriptor"
        ))));
    }
    // SAFETY: the descriptor is open and was handed to us to own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Tap::from_fd(owned).map_err(|e| Failure::Other(e.to_string()))
}

fn attach(net: &NetOpts, tap: Tap) -> Result<u8, Failure> {
    let (cfg, policy) = build(net)?;
    init_logging(net, "info");
    tracing::info!(tap = tap.name(), "serving");
    let rt = runtime()?;
    rt.block_on(async move {
        let stack = Stack::new(cfg, policy, smol_instant(std::time::Duration::ZERO));
        let driver = Driver::new(stack, TapLink(tap))
            .map_err(|e| Failure::Other(format!("cannot serve the tap: {e}")))?;
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
        driver
            .run(stop)
            .await
            .map_err(|e| Failure::Other(format!("the tap failed: {e}")))?;
        Ok(0)
    })
}
