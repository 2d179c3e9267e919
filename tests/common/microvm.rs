//! The whole-guest test bed: QEMU `-M microvm` booting a Debian kernel with a
//! busybox initramfs (built once per machine by tests/support/microvm/build.sh),
//! one virtio-net NIC on whatever netdev the test gives, and a guest script
//! whose results come back as `@slipway KEY WORDS…` lines on the serial console.
//! QEMU is killed when a run overruns its time, and always on drop.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The guest's MAC address, the same in every boot.
pub const GUEST_MAC: &str = "52:54:00:12:34:56";

/// The guest's first console marker must come within this, or QEMU is killed
/// (a guest that hangs early would otherwise burn a CPU until the test's end).
const FIRST_MARKER_WITHIN: Duration = Duration::from_secs(30);

/// How long a KVM probe boot may take before KVM counts as broken.
const KVM_PROBE_WITHIN: Duration = Duration::from_secs(8);

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// What the guest boots: an uncompressed kernel and the base initramfs.
#[derive(Debug, Clone)]
pub struct Parts {
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
}

/// How QEMU runs the guest's CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// Why a microVM test cannot run here, or None when it can. The first call
/// builds (or finds cached) the kernel and initramfs.
pub fn cannot_boot() -> Option<String> {
    if let Some(why) = super::cannot_run() {
        return Some(why);
    }
    if !super::has_tool("qemu-system-x86_64") {
        return Some("needs `qemu-system-x86_64` (apt-get install qemu-system-x86)".into());
    }
    parts().err()
}

/// Skip (with the reason printed) when the machine cannot boot the microVM
/// bed; under SLIPWAY_E2E=required that is a failure instead.
#[macro_export]
macro_rules! require_microvm {
    () => {
        if let Some(why) = common::microvm::cannot_boot() {
            if std::env::var("SLIPWAY_E2E").as_deref() == Ok("required") {
                panic!("microVM test cannot run: {why}");
            }
            eprintln!("skipped: {why}");
            return;
        }
    };
}

/// The kernel and base initramfs, built once per process (and cached on disk
/// across processes by the build script).
pub fn parts() -> Result<Parts, String> {
    static PARTS: OnceLock<Result<Parts, String>> = OnceLock::new();
    PARTS.get_or_init(build_parts).clone()
}

fn build_parts() -> Result<Parts, String> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/support/microvm/build.sh"
    );
    let cache = std::env::var_os("SLIPWAY_MICROVM_CACHE").map(PathBuf::from);
    let started = Instant::now();
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", "900", "bash", script]);
    if let Some(cache) = &cache {
        cmd.arg(cache);
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {script}: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let why = stderr.trim().lines().last().unwrap_or("").to_string();
        return Err(match out.status.code() {
            Some(3) => format!("no microVM guest: {why}"),
            _ => format!(
                "building the microVM guest failed ({}): {stderr}",
                out.status
            ),
        });
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(PathBuf::from)
            .ok_or_else(|| format!("{script} printed no {key}=: {stdout}{stderr}"))
    };
    let parts = Parts {
        vmlinux: value("vmlinux")?,
        initramfs: value("initramfs")?,
    };
    if started.elapsed() > Duration::from_secs(2) {
        eprintln!(
            "microvm: built the guest in {:.1?}: {}",
            started.elapsed(),
            parts.vmlinux.display()
        );
    }
    Ok(parts)
}

/// KVM when it works for this guest, else TCG; probed once per process.
/// SLIPWAY_MICROVM_ACCEL=kvm|tcg skips the probe.
pub fn accel() -> Accel {
    static ACCEL: OnceLock<Accel> = OnceLock::new();
    *ACCEL.get_or_init(|| match std::env::var("SLIPWAY_MICROVM_ACCEL").as_deref() {
        Ok("kvm") => Accel::Kvm,
        Ok("tcg") => Accel::Tcg,
        _ => probe_kvm(),
    })
}

fn probe_kvm() -> Accel {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !usable {
        eprintln!("microvm: no usable /dev/kvm; using TCG");
        return Accel::Tcg;
    }
    let run = MicroVm::new(
        &["-netdev".into(), "user,id=n0,restrict=on".into()],
        "mark kvm-ok",
    )
    .accel(Accel::Kvm)
    .timeout(KVM_PROBE_WITHIN)
    .first_marker_within(KVM_PROBE_WITHIN)
    .run();
    if run.mark("kvm-ok").is_some() {
        Accel::Kvm
    } else {
        let why = run
            .qemu_stderr
            .lines()
            .last()
            .unwrap_or("no console marker");
        eprintln!("microvm: KVM does not boot the guest here ({why}); using TCG");
        Accel::Tcg
    }
}

/// Host TSC rate in kHz: under TCG the guest's TSC runs at the host's, and
/// the kernel's own calibration (against the PIT) fails often enough under
/// emulation to hang the boot; microvm has no HPET or PM timer to fall back on.
fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let constant = info
        .lines()
        .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "constant_tsc"));
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    (constant && mhz > 0.0).then_some((mhz * 1000.0) as u64)
}

/// One boot of the guest: what to attach and what to run.
pub struct MicroVm {
    netdev: Vec<String>,
    script: String,
    netns: Option<String>,
    timeout: Duration,
    first_marker_within: Duration,
    accel: Option<Accel>,
    memory_mib: u32,
    extra_append: String,
}

/// How a boot ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEnd {
    /// QEMU exited by itself (the guest powered off, or QEMU failed).
    Exited(ExitStatus),
    /// The guest printed nothing of ours within the first-marker limit.
    NoFirstMarker(Duration),
    /// The whole run overran its limit.
    TimedOut(Duration),
}

/// What a boot printed and how it ended.
#[derive(Debug)]
pub struct VmRun {
    /// The serial console, kernel lines and the guest's alike.
    pub console: String,
    /// QEMU's own stderr.
    pub qemu_stderr: String,
    pub status: VmEnd,
    pub accel: Accel,
    /// Host time from spawning QEMU to the guest's `@slipway init` line.
    pub boot: Option<Duration>,
    /// Host time from spawning QEMU to its end.
    pub took: Duration,
}

impl MicroVm {
    /// `netdev_args` are QEMU arguments that define the netdev `n0` (e.g.
    /// `-netdev user,id=n0`); the NIC is added here. `guest_script` runs (as
    /// `. /guest.sh` in busybox sh, after DHCP) with the helpers of
    /// tests/support/microvm/slipway.sh: `mark`, `now_ms`, `timed`.
    pub fn new(netdev_args: &[String], guest_script: &str) -> MicroVm {
        MicroVm {
            netdev: netdev_args.to_vec(),
            script: guest_script.to_string(),
            netns: None,
            timeout: Duration::from_secs(90),
            first_marker_within: FIRST_MARKER_WITHIN,
            accel: None,
            memory_mib: 256,
            extra_append: String::new(),
        }
    }

    /// Boot and wait for the end: the one-call form.
    pub fn boot(netdev_args: &[String], guest_script: &str, timeout: Duration) -> VmRun {
        Self::new(netdev_args, guest_script).timeout(timeout).run()
    }

    /// Run QEMU inside network namespace `name` (`ip netns exec`).
    pub fn netns(mut self, name: &str) -> Self {
        self.netns = Some(name.to_string());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn first_marker_within(mut self, limit: Duration) -> Self {
        self.first_marker_within = limit;
        self
    }

    pub fn accel(mut self, accel: Accel) -> Self {
        self.accel = Some(accel);
        self
    }

    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// More kernel command line.
    pub fn append(mut self, args: &str) -> Self {
        self.extra_append = args.to_string();
        self
    }

    /// Boot, wait for poweroff (or kill QEMU at a limit), return what it printed.
    /// Panics only when the bed itself is broken (parts missing, QEMU not
    /// startable).
    pub fn run(self) -> VmRun {
        let parts = parts().unwrap_or_else(|e| panic!("{e}"));
        let accel = self.accel.unwrap_or_else(accel);
        let dir = super::Scratch::new("vm");
        let initrd = dir.0.join("initrd.cpio");
        write_initrd(&parts.initramfs, &self.script, &initrd)
            .unwrap_or_else(|e| panic!("write {}: {e}", initrd.display()));

        let mut append = String::from("console=ttyS0 quiet panic=-1");
        if accel == Accel::Tcg {
            if let Some(khz) = host_tsc_khz() {
                append.push_str(&format!(" tsc_early_khz={khz}"));
            }
        }
        if !self.extra_append.is_empty() {
            append.push(' ');
            append.push_str(&self.extra_append);
        }

        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
                c
            }
            None => Command::new("qemu-system-x86_64"),
        };
        cmd.args(["-M", "microvm", "-m", &self.memory_mib.to_string()])
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .args(["-serial", "stdio"]);
        match accel {
            Accel::Kvm => cmd.args(["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => cmd.args(["-accel", "tcg", "-cpu", "max"]),
        };
        cmd.arg("-kernel")
            .arg(&parts.vmlinux)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", &append])
            .args([
                "-device",
                &format!("virtio-net-device,netdev=n0,mac={GUEST_MAC}"),
            ])
            .args(&self.netdev)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());

        die_with_parent(&mut cmd);
        let started = Instant::now();
        let mut qemu = KillOnDrop(cmd.spawn().expect("start qemu-system-x86_64"));
        let stderr = collect(qemu.0.stderr.take().unwrap());
        let (tx, lines) = mpsc::channel::<String>();
        let stdout = qemu.0.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            while let Ok(n) = reader.read_until(b'\n', &mut buf) {
                if n == 0 {
                    break;
                }
                let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                buf.clear();
                if tx.send(line).is_err() {
                    break;
                }
            }
        });

        let mut console = String::new();
        let mut boot = None;
        let end = loop {
            let now = started.elapsed();
            let limit = if boot.is_none() {
                self.first_marker_within.min(self.timeout)
            } else {
                self.timeout
            };
            if now >= limit {
                break if boot.is_none() {
                    VmEnd::NoFirstMarker(limit)
                } else {
                    VmEnd::TimedOut(limit)
                };
            }
            match lines.recv_timeout(limit - now) {
                Ok(line) => {
                    if boot.is_none() && line.starts_with("@slipway init") {
                        boot = Some(started.elapsed());
                    }
                    console.push_str(&line);
                    console.push('\n');
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // Console closed: QEMU is exiting; give it a moment.
                    break match wait_for(&mut qemu.0, Duration::from_secs(5)) {
                        Some(status) => VmEnd::Exited(status),
                        None => VmEnd::TimedOut(started.elapsed()),
                    };
                }
            }
        };
        drop(qemu);
        let took = started.elapsed();
        let qemu_stderr = stderr.lock().map(|s| s.clone()).unwrap_or_default();
        VmRun {
            console,
            qemu_stderr,
            status: end,
            accel,
            boot,
            took,
        }
    }
}

impl VmRun {
    /// The words after `@slipway KEY` on each such console line, in order.
    pub fn marks(&self, key: &str) -> Vec<&str> {
        self.console
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix("@slipway ")?;
                let (k, words) = rest.split_once(' ').unwrap_or((rest, ""));
                (k == key).then_some(words)
            })
            .collect()
    }

    /// The first `@slipway KEY` line's words.
    pub fn mark(&self, key: &str) -> Option<&str> {
        self.marks(key).into_iter().next()
    }

    /// `NAME=VALUE` from the first `@slipway KEY` line.
    pub fn field(&self, key: &str, name: &str) -> Option<&str> {
        self.mark(key)?
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
    }

    /// The guest script's exit status (`@slipway exit N`).
    pub fn guest_exit(&self) -> Option<i32> {
        self.mark("exit")?.split_whitespace().next()?.parse().ok()
    }

    /// Everything this run printed, for assertion messages.
    pub fn report(&self) -> String {
        format!(
            "{:?} after {:.1?} (accel {:?}, boot {:?})\n--- console ---\n{}--- qemu stderr ---\n{}",
            self.status, self.took, self.accel, self.boot, self.console, self.qemu_stderr
        )
    }

    /// The checks every boot behind slipway shares: the guest's script
    /// exited 0, the lease is 10.0.2.15/24 via 10.0.2.2, the `fetch` worked
    /// and its `sha256` mark is `want_sha`, and the `deny` connect was
    /// refused (not timed out) within a second. `stack` adds the stack's side
    /// to every failure message. Returns the denied connect's milliseconds.
    pub fn assert_leased_fetched_denied(&self, want_sha: &str, stack: &dyn Fn() -> String) -> u64 {
        let report = || format!("{}\n{}", self.report(), stack());
        assert!(
            matches!(self.guest_exit(), Some(0)),
            "guest script failed: {}",
            report()
        );
        assert_eq!(
            self.field("dhcp", "ip"),
            Some("10.0.2.15/24"),
            "{}",
            report()
        );
        assert_eq!(
            self.field("dhcp", "router"),
            Some("10.0.2.2"),
            "{}",
            report()
        );
        assert_eq!(self.field("fetch", "exit"), Some("0"), "{}", report());
        assert_eq!(self.mark("sha256"), Some(want_sha), "{}", report());
        // Denied: refused at once (an RST from the stack), not a timeout.
        assert_ne!(self.field("deny", "exit"), Some("0"), "{}", report());
        let deny_ms: u64 = self
            .field("deny", "ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no deny timing: {}", report()));
        assert!(
            deny_ms < 1000,
            "denied connect took {deny_ms} ms: {}",
            report()
        );
        assert!(
            self.field("deny", "err")
                .is_some_and(|e| e.contains("refused")),
            "{}",
            report()
        );
        deny_ms
    }

    /// Panics with the whole console unless the guest's script exited 0 and
    /// the guest powered off.
    pub fn ok(&self) -> &Self {
        let powered_off = matches!(&self.status, VmEnd::Exited(s) if s.success());
        assert!(
            powered_off && self.guest_exit() == Some(0),
            "microVM run failed: {}",
            self.report()
        );
        self
    }
}

/// The base initramfs with a second cpio archive appended that holds
/// /guest.sh: the kernel unpacks concatenated archives one after another.
fn write_initrd(base: &Path, script: &str, out: &Path) -> std::io::Result<()> {
    let mut data = std::fs::read(base)?;
    data.resize(data.len().next_multiple_of(512), 0);
    let mut overlay = Vec::new();
    cpio_newc_entry(&mut overlay, "guest.sh", 0o100755, script.as_bytes());
    cpio_newc_entry(&mut overlay, "TRAILER!!!", 0, &[]);
    data.extend_from_slice(&overlay);
    std::fs::File::create(out)?.write_all(&data)
}

/// One entry of a "newc" cpio archive (what the kernel's initramfs takes).
fn cpio_newc_entry(out: &mut Vec<u8>, name: &str, mode: u32, body: &[u8]) {
    let ino = NEXT.fetch_add(1, Ordering::SeqCst) as u32 + 0x5000_0000;
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        body.len() as u32,
        0,
        0,
        0,
        0,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    out.resize(out.len().next_multiple_of(4), 0);
    out.extend_from_slice(body);
    out.resize(out.len().next_multiple_of(4), 0);
}

fn collect(mut from: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Ok(mut s) = sink.lock() {
                s.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
    });
    text
}

/// SIGKILL the child if the thread that started it dies first (a test
/// process killed outright cannot run its Drop guards).
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the hook runs between fork and exec and only calls prctl,
    // which is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn wait_for(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let until = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process that is killed (and reaped) when this goes out of scope.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// `slipway attach ARGS` running inside a network namespace, stopped (SIGTERM,
/// then SIGKILL) on drop. Its stderr (the flow log) is kept for reports.
pub struct Attached {
    child: Option<Child>,
    log: Arc<Mutex<String>>,
}

impl Attached {
    /// Start it and wait (up to 10 s) for its "serving" log line.
    pub fn start(netns: &str, args: &[&str]) -> Attached {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns, super::slipway(), "attach"])
            .args(args)
            .env("SLIPWAY_LOG", "slipway::flow=info,info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        die_with_parent(&mut cmd);
        let child = cmd.spawn().expect("start slipway attach");
        let mut attached = Attached {
            child: Some(child),
            log: Arc::new(Mutex::new(String::new())),
        };
        let stderr = attached.child.as_mut().unwrap().stderr.take().unwrap();
        attached.log = collect(stderr);
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            if attached.log().contains("serving") {
                return attached;
            }
            if let Ok(Some(status)) = attached.child.as_mut().unwrap().try_wait() {
                panic!(
                    "slipway attach {args:?} exited ({status}): {}",
                    attached.log()
                );
            }
            assert!(
                Instant::now() < until,
                "slipway attach {args:?} did not start serving in 10 s: {}",
                attached.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            // SAFETY: kill has no memory preconditions; the pid is our child's,
            // not yet reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            if wait_for(&mut child, Duration::from_secs(3)).is_none() {
                let _ = child.kill();
            }
        }
        let _ = child.wait();
    }
}
