//! Hostile guests and VMMs against real slipway processes (issue 11): a real
//! kernel in `slipway run` sends the frames that crashed the stack and
//! aborts handshakes; a connect that hangs must not spin the stack; a VMM
//! that stops reading must not grow slipway; a stack that panics stays
//! inside its sandbox.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Scratch, World};

const HOSTILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/support/hostile_guest.py"
);
const PROBE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/probe.py");

#[test]
fn the_frames_that_crashed_run_do_not_and_aborted_handshakes_are_freed() {
    require_world!();
    let w = World::new();
    // The crash, then six handshakes the guest's kernel resets, with room
    // for six flows: each must be freed, or the echo after them is refused.
    let script = format!(
        "set -e
         python3 {HOSTILE} crash 192.0.2.1 7
         python3 {HOSTILE} abort 6 192.0.2.1 7
         python3 {PROBE} tcp-echo 192.0.2.1 7"
    );
    let run = w.run(
        &[
            "--max-flows",
            "6",
            "--max-half-open",
            "6",
            "--dns-upstream",
            "192.0.2.53",
        ],
        &script,
    );
    let (out, log) = (run.stdout(), run.stderr());
    assert_eq!(run.code(), Some(0), "stdout: {out}\nstderr: {log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(out.contains("echo-ok"), "stdout: {out}\nstderr: {log}");
    assert!(!log.contains("max_tcp_flows"), "{log}");
}

/// CPU time (user + system) a process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no memory preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

fn wait_with_limit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[test]
fn a_pending_host_connect_does_not_spin_the_stack() {
    require_world!();
    let w = World::new();
    // SYNs to a neighbour that is never there (a fixed MAC nobody owns on
    // the world's link) vanish: the host connect stays pending.
    let out = w.exec("ip neigh replace 192.0.2.99 lladdr 02:00:00:00:00:99 dev w0 nud permanent");
    assert!(out.status.success(), "{out:?}");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &w.name, common::slipway(), "run"])
        .args(["--dns-upstream", "192.0.2.53", "--"])
        .args([
            "sh",
            "-c",
            "curl -sS --max-time 5 http://192.0.2.99/ ; echo curl-exit-$?",
        ])
        .env("SLIPWAY_LOG", "slipway::flow=info,warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start slipway run");
    // `ip netns exec` execs slipway: same pid. (The world's drop kills
    // whatever is left in its namespace if an assertion fails.)
    let pid = child.id();
    std::thread::sleep(Duration::from_millis(1500));
    let before = cpu_time(pid);
    let window = Duration::from_secs(2);
    std::thread::sleep(window);
    let used = cpu_time(pid) - before;
    let status = wait_with_limit(&mut child, Duration::from_secs(20));
    let mut out = String::new();
    let mut log = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(status.is_some(), "slipway run did not end: {log}");
    // The connect really was pending the whole time (curl timed out)...
    assert!(out.contains("curl-exit-28"), "stdout: {out}\nstderr: {log}");
    assert!(log.contains("192.0.2.99:80"), "{log}");
    // ... and the stack slept meanwhile: under 5% of a core.
    assert!(
        used < window / 20,
        "slipway used {used:?} of CPU in {window:?} while a connect was pending"
    );
}

// ----- a VMM that stops reading ------------------------------------------

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const GATEWAY_MAC: [u8; 6] = [0x52, 0x55, 0x0a, 0x00, 0x02, 0x02];

fn sum16(data: &[u8]) -> u16 {
    let mut s: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// An Ethernet frame with an ICMP echo request from the guest to the gateway.
fn ping_frame(seq: u16, data_len: usize) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34];
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend(std::iter::repeat_n(0x5a, data_len));
    let c = sum16(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 1, 0, 0, 10, 0, 2, 15, 10, 0, 2, 2]);
    let c = sum16(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut frame = GATEWAY_MAC.to_vec();
    frame.extend_from_slice(&GUEST_MAC);
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&icmp);
    frame
}

/// The guest asking who has the gateway's address.
fn arp_frame() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[10, 0, 2, 15]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[10, 0, 2, 2]);
    f
}

fn send_frame(s: &mut UnixStream, frame: &[u8]) {
    s.write_all(&(frame.len() as u32).to_be_bytes()).unwrap();
    s.write_all(frame).unwrap();
}

/// Frames QEMU would read from the stream within `limit`.
fn read_frames(s: &mut UnixStream, limit: Duration) -> Vec<Vec<u8>> {
    let until = Instant::now() + limit;
    let mut frames = Vec::new();
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return frames;
        }
        s.set_read_timeout(Some(left)).unwrap();
        let mut len = [0u8; 4];
        if s.read_exact(&mut len).is_err() {
            return frames;
        }
        let mut frame = vec![0; u32::from_be_bytes(len) as usize];
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.read_exact(&mut frame).unwrap();
        frames.push(frame);
    }
}

/// The sequence numbers of the echo replies among `frames`.
fn echo_replies(frames: &[Vec<u8>]) -> Vec<u16> {
    frames
        .iter()
        .filter(|f| f.len() >= 42 && f[12..14] == [0x08, 0x00] && f[23] == 1 && f[34] == 0)
        .map(|f| u16::from_be_bytes([f[40], f[41]]))
        .collect()
}

/// A child process that is killed when the test ends, passed or failed.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

#[test]
fn a_vmm_that_stops_reading_cannot_grow_slipway_nor_leave_it_stale_frames() {
    let dir = Scratch::new("stall");
    let path = dir.0.join("net.sock");
    let child = Command::new(common::slipway())
        .args(["attach", "--qemu-stream"])
        .arg(&path)
        .args(["--log", "warn"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start slipway attach");
    let child = KillOnDrop(child);
    let pid = child.0.id();
    let until = Instant::now() + Duration::from_secs(10);
    let mut vmm = loop {
        match UnixStream::connect(&path) {
            Ok(s) => break s,
            Err(_) if Instant::now() < until => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("cannot reach slipway's stream socket: {e}"),
        }
    };
    vmm.set_write_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    send_frame(&mut vmm, &arp_frame());
    send_frame(&mut vmm, &ping_frame(1, 8));
    assert!(
        echo_replies(&read_frames(&mut vmm, Duration::from_millis(500))).contains(&1),
        "the gateway does not answer pings"
    );
    let before = rss_kib(pid);
    // 3000 pings of 60 KB, and never a frame read back.
    for seq in 0..3000u16 {
        send_frame(&mut vmm, &ping_frame(seq, 60_000));
    }
    // Let the stack take the last of them.
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_kib(pid);
    assert!(
        after < before + 48 * 1024,
        "slipway grew from {before} KiB to {after} KiB"
    );

    // The VMM goes; the next one gets no reply meant for the old guest.
    drop(vmm);
    std::thread::sleep(Duration::from_millis(300));
    let mut vmm = UnixStream::connect(&path).expect("reconnect");
    vmm.set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let stale = echo_replies(&read_frames(&mut vmm, Duration::from_millis(500)));
    assert!(stale.is_empty(), "{} stale replies", stale.len());
    send_frame(&mut vmm, &arp_frame());
    send_frame(&mut vmm, &ping_frame(9999, 8));
    let fresh = echo_replies(&read_frames(&mut vmm, Duration::from_millis(800)));
    assert_eq!(fresh, [9999]);
    eprintln!("RSS {before} KiB before, {after} KiB after 3000 unread 60 KB replies");
    drop(child);
}
