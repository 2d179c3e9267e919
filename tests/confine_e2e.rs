//! slipway confines itself once set up: the `/proc/PID/status` of running
//! `run`, `attach` and `serve` processes shows the seccomp filter, no_new_privs
//! and the capabilities each mode keeps; `--confine false` shows none of it;
//! a forbidden system call kills the process with a line naming it.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Scratch, World};

/// CAP_NET_ADMIN alone: serve with confine.tap_fd = false.
const NET_ADMIN_ONLY: &str = "0000000000001000";
/// CAP_NET_ADMIN and CAP_SYS_PTRACE: serve by default (tapFd).
const NET_ADMIN_AND_PTRACE: &str = "0000000000081000";
const NONE: &str = "0000000000000000";

/// The confinement lines of a status file: Seccomp, NoNewPrivs, CapEff, CapBnd.
fn confinement(status: &str) -> [String; 4] {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    [
        field("Seccomp"),
        field("NoNewPrivs"),
        field("CapEff"),
        field("CapBnd"),
    ]
}

/// A slipway process of our own, killed and reaped on drop.
struct Running(Child);

impl Running {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Running {
        let mut cmd = Command::new(common::slipway());
        cmd.args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env("SLIPWAY_LOG", "warn");
        for (k, v) in env {
            cmd.env(k, v);
        }
        Running(cmd.spawn().expect("start slipway"))
    }

    /// Its status file once `ready` exists (set-up over), plus a moment.
    fn status_when(&mut self, ready: &Path) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            if let Ok(Some(st)) = self.0.try_wait() {
                panic!("slipway exited early: {st:?}: {}", self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "{} never appeared",
                ready.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        std::fs::read_to_string(format!("/proc/{}/status", self.0.id())).unwrap()
    }

    /// SIGTERM, then its exit status (bounded).
    fn stop(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own, not yet reaped child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        self.wait()
    }

    fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = self.0.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "slipway did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stderr(&mut self) -> String {
        let mut text = String::new();
        if let Some(mut err) = self.0.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut err, &mut text);
        }
        text
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `slipway run` reads its own status from inside: the command's parent is slipway.
fn run_status(w: &World, args: &[&str]) -> [String; 4] {
    let run = w.run(args, "cat /proc/$PPID/status");
    run.ok();
    confinement(&run.stdout())
}

#[test]
fn run_is_confined_after_set_up() {
    require_world!();
    let w = World::new();
    let [seccomp, nnp, eff, bnd] = run_status(&w, &[]);
    assert_eq!((seccomp.as_str(), nnp.as_str()), ("2", "1"));
    assert_eq!((eff.as_str(), bnd.as_str()), (NONE, NONE));
    let [seccomp, nnp, eff, _] = run_status(&w, &["--confine", "false"]);
    assert_eq!((seccomp.as_str(), nnp.as_str()), ("0", "0"));
    assert_ne!(eff, NONE, "root keeps its capabilities unconfined");
}

#[test]
fn attach_is_confined_and_still_cleans_up() {
    require_world!();
    let dir = Scratch::new("confine-attach");
    for confined in [true, false] {
        let sock = dir.0.join(format!("dgram-{confined}.sock"));
        let flag = if confined { "true" } else { "false" };
        let mut slipway = Running::start(
            &[
                "attach",
                "--qemu-dgram",
                sock.to_str().unwrap(),
                "--confine",
                flag,
            ],
            &[],
        );
        let [seccomp, nnp, eff, bnd] = confinement(&slipway.status_when(&sock));
        if confined {
            assert_eq!([seccomp, nnp, eff, bnd], ["2", "1", NONE, NONE]);
        } else {
            assert_eq!([seccomp.as_str(), nnp.as_str()], ["0", "0"]);
            assert_ne!(eff, NONE);
        }
        let st = slipway.stop();
        assert_eq!(st.code(), Some(0), "{}", slipway.stderr());
        // Landlock still lets it remove its own socket at exit.
        assert!(!sock.exists(), "{} left behind", sock.display());
    }
}

/// A serve with its control socket, settings and VMM sockets under `dir`.
fn serve_config(dir: &Path, extra: &str) -> PathBuf {
    let config = dir.join("slipway.toml");
    std::fs::write(
        &config,
        format!(
            "[control]\nsocket = \"{}\"\n[gateway]\nlisten = \"off\"\n[metrics]\nlisten = \"off\"\n\
             [confine]\nsocket_dirs = [\"{}\"]\ntap_fd = false\n{extra}",
            dir.join("control.sock").display(),
            dir.join("vmm").display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("vmm")).unwrap();
    config
}

fn ctl(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(common::slipway())
        .args(["ctl", "--socket"])
        .arg(dir.join("control.sock"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn serve_keeps_net_admin_only_and_its_socket_dirs() {
    require_world!();
    let dir = Scratch::new("confine-serve");
    let config = serve_config(&dir.0, "");
    let mut serve = Running::start(&["serve", "--config", config.to_str().unwrap()], &[]);
    let [seccomp, nnp, eff, bnd] = confinement(&serve.status_when(&dir.0.join("control.sock")));
    assert_eq!([seccomp, nnp], ["2", "1"]);
    assert_eq!([eff, bnd], [NET_ADMIN_ONLY, NET_ADMIN_ONLY]);

    // A VMM socket inside confine.socket_dirs is made (and a vhost-user
    // backend with its private directory), one outside is refused by name.
    let inside = dir.0.join("vmm/q.sock");
    let out = ctl(
        &dir.0,
        &["create", "in1", "--qemu-dgram", inside.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(inside.exists());
    let vhost = dir.0.join("vmm/vhost.sock");
    let out = ctl(
        &dir.0,
        &["create", "in2", "--vhost-user", vhost.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let outside = dir.0.join("q.sock");
    let out = ctl(
        &dir.0,
        &["create", "out1", "--qemu-dgram", outside.to_str().unwrap()],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("outside confine.socket_dirs"), "{err}");
    assert!(!outside.exists());
    // Deleting removes the socket file: Landlock lets it.
    let out = ctl(&dir.0, &["delete", "in1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!inside.exists());
    // SIGHUP re-reads the settings file.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(serve.0.id() as i32, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(300));
    let st = serve.stop();
    let err = serve.stderr();
    assert_eq!(st.code(), Some(0), "{err}");
    assert!(err.contains("slipway: reloaded"), "{err}");
    assert!(!dir.0.join("control.sock").exists(), "{err}");

    // By default tapFd works: CAP_SYS_PTRACE is kept for pidfd_getfd.
    let default = dir.0.join("default.toml");
    std::fs::write(
        &default,
        format!(
            "[control]\nsocket = \"{}\"\n[gateway]\nlisten = \"off\"\n[metrics]\nlisten = \"off\"\n",
            dir.0.join("control.sock").display()
        ),
    )
    .unwrap();
    let mut serve = Running::start(&["serve", "--config", default.to_str().unwrap()], &[]);
    let [seccomp, nnp, eff, _] = confinement(&serve.status_when(&dir.0.join("control.sock")));
    assert_eq!([seccomp, nnp], ["2", "1"]);
    assert_eq!(eff, NET_ADMIN_AND_PTRACE);
    assert_eq!(serve.stop().code(), Some(0));

    let mut serve = Running::start(
        &[
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--confine",
            "false",
        ],
        &[],
    );
    let [seccomp, nnp, eff, _] = confinement(&serve.status_when(&dir.0.join("control.sock")));
    assert_eq!([seccomp.as_str(), nnp.as_str()], ["0", "0"]);
    assert_ne!(eff, NET_ADMIN_ONLY);
    assert_eq!(serve.stop().code(), Some(0));
}

/// Debug builds of slipway have a door for this test only: with
/// SLIPWAY_CONFINE_SELFTEST=execve they try execve right after confining.
#[test]
fn a_forbidden_system_call_kills_slipway_naming_the_call() {
    require_world!();
    if !cfg!(debug_assertions) {
        eprintln!("skipped: the self-test door exists in debug builds only");
        return;
    }
    let selftest = [("SLIPWAY_CONFINE_SELFTEST", "execve")];
    let dir = Scratch::new("confine-selftest");
    let sock = dir.0.join("s.sock");
    let config = serve_config(&dir.0, "");
    let w = World::new();
    let cases: [(&str, Vec<String>); 3] = [
        (
            "run",
            vec![
                "ip".into(),
                "netns".into(),
                "exec".into(),
                w.name.clone(),
                common::slipway().into(),
                "run".into(),
                "--".into(),
                "sleep".into(),
                "5".into(),
            ],
        ),
        (
            "attach",
            vec![
                common::slipway().into(),
                "attach".into(),
                "--qemu-dgram".into(),
                sock.display().to_string(),
            ],
        ),
        (
            "serve",
            vec![
                common::slipway().into(),
                "serve".into(),
                "--config".into(),
                config.display().to_string(),
            ],
        ),
    ];
    for (mode, argv) in cases {
        let out = Command::new("timeout")
            .args(["-k", "5", "30"])
            .args(&argv)
            .envs(selftest)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        // `ip netns exec` execs slipway, `timeout` reports the signal as 128+N.
        let sigsys = out.status.signal() == Some(libc::SIGSYS)
            || out.status.code() == Some(128 + libc::SIGSYS);
        assert!(sigsys, "{mode}: {:?}: {err}", out.status);
        assert!(
            err.contains("slipway: confinement refused system call 59 (execve)"),
            "{mode}: {err}"
        );
    }
}
