//! `slipway run`'s sandbox: a command in new user, network and mount
//! namespaces (for root too) whose only link besides `lo` is a tap.
//! The caller keeps the tap's fd and serves its other end with the stack.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use vmm_glue::netns::{self, GuestNetConfig, Sandboxed};
//! let argv = vec!["curl".into(), "http://example.com/".into()];
//! let Sandboxed { pid, tap, gate } = netns::spawn(&GuestNetConfig::default(), &argv)?;
//! // ... start serving `tap` with the stack ...
//! # drop(tap);
//! gate.release()?; // now the command runs
//! std::process::exit(netns::wait(pid)?);
//! # }
//! ```

mod child;
mod control;
mod iface;

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::ifreq::invalid_name_reason;
use crate::tap::{Tap, TapError};
use control::Received;

/// How the network inside the sandbox looks from the command's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNetConfig {
    /// The tap's name inside the namespace.
    pub tap_name: String,
    pub mtu: u32,
    /// The guest's (the namespace side's) MAC address.
    pub mac: [u8; 6],
    pub ipv4: Ipv4Addr,
    pub ipv4_prefix: u8,
    pub gateway_v4: Ipv4Addr,
    /// The guest's IPv6 address and prefix length; `None` for IPv4 only.
    /// Quietly left out when the kernel has IPv6 turned off.
    pub ipv6: Option<(Ipv6Addr, u8)>,
    /// The IPv6 default gateway, normally link-local on the tap.
    pub gateway_v6: Ipv6Addr,
    /// Written into a resolv.conf bind-mounted over `/etc/resolv.conf`
    /// inside; when empty, `/etc/resolv.conf` is left as it is.
    pub nameservers: Vec<IpAddr>,
    /// Open the tap with a virtio-net header (IFF_VNET_HDR), so that the
    /// returned `Tap` can turn offloads on (`Tap::enable_offloads`).
    pub vnet_hdr: bool,
    /// A CA bundle (PEM) bind-mounted over [`CA_BUNDLE`] inside, e.g. the
    /// host's bundle plus the sandbox's own CA; `None` leaves it alone.
    pub ca_bundle: Option<Vec<u8>>,
    /// Files an empty file is bind-mounted over inside (absolute paths):
    /// secrets slipway read that the command must not.
    pub hidden_files: Vec<PathBuf>,
}

/// Where Debian, Ubuntu, Alpine and Arch keep the system's CA bundle (and
/// what OpenSSL, curl, Python and Node read there).
pub const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

impl Default for GuestNetConfig {
    /// The plan every sandbox shares: 10.0.2.15/24 via 10.0.2.2, fd00::15/64
    /// via fe80::2, DNS at 10.0.2.3 and fd00::3, MTU 65520.
    fn default() -> Self {
        GuestNetConfig {
            tap_name: "tap0".to_owned(),
            mtu: 65520,
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            ipv4: Ipv4Addr::new(10, 0, 2, 15),
            ipv4_prefix: 24,
            gateway_v4: Ipv4Addr::new(10, 0, 2, 2),
            ipv6: Some((Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x15), 64)),
            gateway_v6: Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2),
            nameservers: vec![
                IpAddr::V4(Ipv4Addr::new(10, 0, 2, 3)),
                IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 3)),
            ],
            vnet_hdr: false,
            ca_bundle: None,
            hidden_files: Vec::new(),
        }
    }
}

/// What went wrong starting the sandbox. Each message is one line a CLI can
/// print as it is; [`NetnsError::exit_code`] gives the shell-style status.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("no command given to run in the sandbox")]
    EmptyCommand,
    #[error("argument {0:?} contains a NUL byte, which no command can receive")]
    NulInArgument(OsString),
    #[error("invalid sandbox network: {0}")]
    InvalidConfig(String),
    #[error("command not found: {0}")]
    CommandNotFound(String),
    #[error("cannot create the socket pair to talk to the sandbox process")]
    Socketpair(#[source] io::Error),
    #[error("cannot fork the sandbox process")]
    Fork(#[source] io::Error),
    /// The sandbox process's own one-line account of what failed.
    #[error("cannot set up the sandbox: {0}")]
    Setup(String),
    #[error("the sandbox process ended ({0}) before its network was ready")]
    Vanished(String),
    #[error("lost contact with the sandbox process")]
    Control(#[source] io::Error),
    #[error("the tap fd the sandbox process sent is unusable")]
    Tap(#[source] TapError),
    /// exec of the command failed for a reason other than "not found".
    #[error("{0}")]
    Exec(String),
}

impl NetnsError {
    /// The exit status a shell would give: 127 when the command was not
    /// found, 126 for every other failure to start it.
    pub fn exit_code(&self) -> i32 {
        match self {
            NetnsError::CommandNotFound(_) => 127,
            _ => 126,
        }
    }
}

pub type Result<T> = std::result::Result<T, NetnsError>;

/// A sandbox whose network is ready and whose command has not started yet.
#[derive(Debug)]
pub struct Sandboxed {
    /// The sandbox process; it becomes the command at [`Gate::release`].
    /// Reap it with [`wait`].
    pub pid: libc::pid_t,
    /// The host end of the sandbox's only link.
    pub tap: Tap,
    /// Holds the command back until the stack serves `tap`.
    pub gate: Gate,
}

/// The command waits behind this until [`Gate::release`]. Dropping the gate
/// unreleased makes the sandbox process exit with status 126 without ever
/// running the command.
#[derive(Debug)]
pub struct Gate {
    control: OwnedFd,
}

impl Gate {
    /// Lets the command run. Returns once it has been exec'd, or the reason
    /// exec failed (the process then exits 127 or 126; still [`wait`] for it).
    pub fn release(self) -> Result<()> {
        let control = self.control.as_fd();
        control::send(control, control::Message::Go).map_err(NetnsError::Control)?;
        // The sandbox's end of the pair is close-on-exec: end of file is
        // the news that exec succeeded.
        match control::recv(control).map_err(NetnsError::Control)? {
            Received::Closed => Ok(()),
            Received::CommandNotFound(command) => Err(NetnsError::CommandNotFound(command)),
            Received::ExecFailed(message) => Err(NetnsError::Exec(message)),
            other => Err(NetnsError::Control(other.unexpected())),
        }
    }
}

/// Forks a sandbox process that enters new namespaces, builds the network
/// described by `cfg` around a tap, and sends the tap's fd back. Returns when
/// that fd is here; the command (`argv[0]`, looked up in `PATH` now) waits
/// until [`Gate::release`].
///
/// Must be called while this process is still single-threaded: the forked
/// child runs ordinary Rust code (it allocates) until it execs.
///
/// The sandbox gets a user namespace, mapping this user to root inside,
/// also when this user is root: the command has no capability outside its
/// namespaces, so it cannot enter slipway's own. Not root, `/dev/net/tun`
/// must be readable and writable by this user. Inside, `/sys` is a fresh sysfs (so `/sys/class/net` shows the
/// sandbox's links; the host's cgroup mount is carried over) and
/// `/etc/resolv.conf` lists `cfg.nameservers`. If this process dies, the
/// sandbox process is killed.
pub fn spawn(cfg: &GuestNetConfig, argv: &[OsString]) -> Result<Sandboxed> {
    let plan = Plan::new(cfg, argv)?;
    let (ours, theirs) = control::pair().map_err(NetnsError::Socketpair)?;
    // SAFETY: fork has no preconditions of its own. The caller keeps this
    // process single-threaded, so the child may run ordinary Rust until it
    // execs or `_exit`s, and `child::run` always ends in one of those.
    match unsafe { libc::fork() } {
        -1 => Err(NetnsError::Fork(io::Error::last_os_error())),
        0 => {
            drop(ours);
            child::run(&plan, theirs)
        }
        pid => {
            drop(theirs);
            adopt(pid, ours)
        }
    }
}

/// Waits for the sandbox process and returns its status as a shell would:
/// the exit code, or 128+N when signal N killed it.
pub fn wait(pid: libc::pid_t) -> io::Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes the status through a valid, exclusive pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc >= 0 {
            break;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    if libc::WIFSIGNALED(status) {
        Ok(128 + libc::WTERMSIG(status))
    } else {
        Ok(libc::WEXITSTATUS(status))
    }
}

/// Everything the child needs, prepared before fork so the child does as
/// little as possible.
struct Plan<'a> {
    cfg: &'a GuestNetConfig,
    /// `argv[0]` resolved against `PATH`.
    program: CString,
    argv: Vec<CString>,
    /// `argv[0]` as the user wrote it, for messages.
    command: String,
    resolv_conf: Option<Vec<u8>>,
    parent: libc::pid_t,
}

impl<'a> Plan<'a> {
    fn new(cfg: &'a GuestNetConfig, argv: &[OsString]) -> Result<Plan<'a>> {
        check_config(cfg).map_err(NetnsError::InvalidConfig)?;
        let first = argv.first().ok_or(NetnsError::EmptyCommand)?;
        let command = first.to_string_lossy().into_owned();
        let program =
            find_program(first).ok_or_else(|| NetnsError::CommandNotFound(command.clone()))?;
        let program = c_string(program.as_os_str())?;
        let argv = argv
            .iter()
            .map(|arg| c_string(arg))
            .collect::<Result<Vec<_>>>()?;
        let resolv_conf = (!cfg.nameservers.is_empty()).then(|| resolv_conf(&cfg.nameservers));
        Ok(Plan {
            cfg,
            program,
            argv,
            command,
            resolv_conf,
            // SAFETY: getpid has no preconditions.
            parent: unsafe { libc::getpid() },
        })
    }
}

fn c_string(s: &OsStr) -> Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| NetnsError::NulInArgument(s.to_owned()))
}

/// Refuses a config the kernel would refuse later with a vaguer message.
fn check_config(cfg: &GuestNetConfig) -> std::result::Result<(), String> {
    if let Some(reason) = invalid_name_reason(&cfg.tap_name) {
        return Err(format!("tap name {:?}: {reason}", cfg.tap_name));
    }
    if !(68..=65535).contains(&cfg.mtu) {
        return Err(format!("MTU {} is outside 68..=65535", cfg.mtu));
    }
    if cfg.ipv4_prefix > 32 {
        return Err(format!(
            "IPv4 prefix /{} is longer than 32",
            cfg.ipv4_prefix
        ));
    }
    let mask = u32::MAX
        .checked_shl(32 - u32::from(cfg.ipv4_prefix))
        .unwrap_or(0);
    if u32::from(cfg.ipv4) & mask != u32::from(cfg.gateway_v4) & mask {
        return Err(format!(
            "gateway {} is not inside {}/{}",
            cfg.gateway_v4, cfg.ipv4, cfg.ipv4_prefix
        ));
    }
    if let Some((addr, prefix)) = cfg.ipv6 {
        if prefix > 128 {
            return Err(format!("IPv6 prefix {addr}/{prefix} is longer than 128"));
        }
        if cfg.mtu < 1280 {
            return Err(format!(
                "IPv6 needs an MTU of at least 1280, not {}",
                cfg.mtu
            ));
        }
    }
    Ok(())
}

fn resolv_conf(nameservers: &[IpAddr]) -> Vec<u8> {
    let mut text = String::from("# written by slipway run\n");
    for ns in nameservers {
        text.push_str(&format!("nameserver {ns}\n"));
    }
    text.into_bytes()
}

/// Where exec would find `command`: as given when it has a `/`, else the
/// first executable regular file of that name in `PATH` (execvp's default
/// path when `PATH` is unset).
fn find_program(command: &OsStr) -> Option<PathBuf> {
    if command.is_empty() {
        return None;
    }
    if command.as_bytes().contains(&b'/') {
        let path = PathBuf::from(command);
        return path.exists().then_some(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/bin:/usr/bin".into());
    path.as_bytes()
        .split(|&b| b == b':')
        .map(|dir| match dir {
            b"" => Path::new(".").join(command),
            dir => Path::new(OsStr::from_bytes(dir)).join(command),
        })
        .find(|candidate| is_executable_file(candidate))
}

fn is_executable_file(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c_path` is NUL-terminated; access only reads it.
    let executable = unsafe { libc::access(c_path.as_ptr(), libc::X_OK) } == 0;
    executable && path.metadata().is_ok_and(|m| m.is_file())
}

/// Takes the sandbox process's first report: its tap fd, or why it failed.
fn adopt(pid: libc::pid_t, control: OwnedFd) -> Result<Sandboxed> {
    let report = control::recv(control.as_fd());
    let fail = |err: NetnsError| {
        // SAFETY: kill only sends a signal; `pid` is our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let _ = wait(pid);
        Err(err)
    };
    match report {
        Ok(Received::Tap(fd)) => match Tap::from_fd(fd) {
            Ok(tap) => Ok(Sandboxed {
                pid,
                tap,
                gate: Gate { control },
            }),
            Err(err) => fail(NetnsError::Tap(err)),
        },
        Ok(Received::SetupFailed(message)) => {
            // It exits right after reporting.
            let _ = wait(pid);
            Err(NetnsError::Setup(message))
        }
        Ok(Received::Closed) => {
            let how = match wait(pid) {
                Ok(code) if code > 128 => format!("killed by signal {}", code - 128),
                Ok(code) => format!("exit status {code}"),
                Err(err) => format!("status unknown: {err}"),
            };
            Err(NetnsError::Vanished(how))
        }
        Ok(other) => fail(NetnsError::Control(other.unexpected())),
        Err(err) => fail(NetnsError::Control(err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        assert_eq!(check_config(&GuestNetConfig::default()), Ok(()));
    }

    #[test]
    fn gateway_outside_the_prefix_is_refused() {
        let cfg = GuestNetConfig {
            gateway_v4: Ipv4Addr::new(10, 0, 3, 2),
            ..GuestNetConfig::default()
        };
        let err = check_config(&cfg).unwrap_err();
        assert!(err.contains("10.0.3.2 is not inside 10.0.2.15/24"), "{err}");
    }

    #[test]
    fn bad_tap_name_and_mtu_are_refused() {
        let long = GuestNetConfig {
            tap_name: "a-name-far-too-long".into(),
            ..GuestNetConfig::default()
        };
        assert!(check_config(&long).is_err());
        let tiny = GuestNetConfig {
            mtu: 1000,
            ..GuestNetConfig::default()
        };
        assert!(check_config(&tiny).unwrap_err().contains("IPv6"));
    }

    #[test]
    fn resolv_conf_lists_every_nameserver() {
        let text = resolv_conf(&GuestNetConfig::default().nameservers);
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains("nameserver 10.0.2.3\n"), "{text}");
        assert!(text.contains("nameserver fd00::3\n"), "{text}");
    }

    #[test]
    fn programs_are_found_like_execvp_finds_them() {
        assert!(find_program(OsStr::new("sh")).is_some());
        assert_eq!(find_program(OsStr::new("slipway-no-such-command")), None);
        assert_eq!(find_program(OsStr::new("/no/such/file")), None);
        assert_eq!(find_program(OsStr::new("")), None);
    }

    #[test]
    fn missing_command_is_refused_before_forking() {
        let argv = ["slipway-no-such-command".into()];
        let err = spawn(&GuestNetConfig::default(), &argv).unwrap_err();
        assert_eq!(
            err.to_string(),
            "command not found: slipway-no-such-command"
        );
        assert_eq!(err.exit_code(), 127);
    }
}

/// The host's own resolver: the first `nameserver` of /etc/resolv.conf, the
/// default upstream for the stack's DNS address. (The host's configuration
/// is read here, not in the sans-IO core.)
pub fn host_resolver() -> Option<std::net::SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    first_nameserver(&text)
}

fn first_nameserver(resolv_conf: &str) -> Option<std::net::SocketAddr> {
    resolv_conf.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next()? == "nameserver")
            .then(|| words.next()?.parse::<std::net::IpAddr>().ok())
            .flatten()
            .map(|ip| std::net::SocketAddr::new(ip, 53))
    })
}

#[cfg(test)]
mod resolver_tests {
    use super::first_nameserver;

    #[test]
    fn the_first_nameserver_line_with_an_address_wins() {
        let conf = "# a comment\nsearch test\nnameserver not-an-ip\nnameserver 192.0.2.53\nnameserver 2001:db8::53\n";
        assert_eq!(
            first_nameserver(conf),
            Some("192.0.2.53:53".parse().unwrap())
        );
        assert_eq!(
            first_nameserver("nameserver 2001:db8::53"),
            Some("[2001:db8::53]:53".parse().unwrap())
        );
        assert_eq!(first_nameserver("search test\n"), None);
    }
}
