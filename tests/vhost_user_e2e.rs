//! End to end over vhost-user-net with a whole guest: QEMU `-M microvm`
//! connects its `-netdev vhost-user` to slipway's backend, which bridges the
//! guest's virtqueues to a sandbox stack served in this process. The guest
//! takes its address by DHCP, fetches a blob from a web server on this
//! host's loopback (mapped into the sandbox at 10.0.2.2) and checks its
//! SHA-256, and meets a denied destination; the first test also times the
//! transport alone both ways (into /dev/null, from /dev/zero). Then a VMM is
//! killed mid-transfer and a second one (virtio 1.0 this time) boots against
//! the same socket and the same stack.
//!
//! Until `slipway attach --vhost-user` exists the stack runs in-process, in
//! the host's namespace; traffic stays on loopback (the denied destination
//! is refused by the stack before any host socket is opened).

mod common;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::microvm::{KillOnDrop, MicroVm, VmRun};
use common::Scratch;
use netstack::driver::{Driver, Parked};
use netstack::{EgressPolicy, PolicySpec, Stack, StackConfig};
use vmm_glue::vhost_user::{Options, Stats, VhostUserNet};

/// A boot plus a 50 MiB transfer under TCG fits well inside this.
const RUN_LIMIT: Duration = Duration::from_secs(90);
const BLOB_MIB: usize = 50;
/// The guest's memory, shared with the backend (vhost-user needs it shared).
const GUEST_MIB: u32 = 256;
const DENIED_NET: &str = "192.0.2.0/24";

/// `python3 -m http.server` on 127.0.0.1 (a free port) serving `dir`, and a
/// sink on another port that reads `BLOB_MIB` MiB per connection and then
/// hangs up. Log lines (requests, `sink got N`) are kept so a test can wait
/// for the guest's requests.
struct WebServer {
    port: u16,
    sink_port: u16,
    log: Arc<Mutex<Vec<String>>>,
    _child: KillOnDrop,
}

impl WebServer {
    fn start(dir: &Path) -> WebServer {
        let mut child = Command::new("python3")
            .args(["-c", WEB_SERVER])
            .arg(dir)
            .arg((BLOB_MIB << 20).to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start python3 http.server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let mut ports = line.split_whitespace().map(|p| p.parse().expect("a port"));
        let (port, sink_port) = (ports.next().unwrap(), ports.next().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        WebServer {
            port,
            sink_port,
            log,
            _child: KillOnDrop(child),
        }
    }

    /// Wait (up to `limit`) for a request whose log line contains `path`.
    fn wait_for_request(&self, path: &str, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if self.log.lock().unwrap().iter().any(|l| l.contains(path)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

const WEB_SERVER: &str = r#"
import functools, http.server, socket, sys, threading
h = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), h)
sink = socket.socket()
sink.bind(("127.0.0.1", 0))
sink.listen(8)
want = int(sys.argv[2])
def one(c):
    got = 0
    while got < want:
        b = c.recv(1 << 20)
        if not b:
            break
        got += len(b)
    sys.stderr.write("sink got %d\n" % got)
    sys.stderr.flush()
    c.close()
def accept():
    while True:
        c, _ = sink.accept()
        threading.Thread(target=one, args=(c,), daemon=True).start()
threading.Thread(target=accept, daemon=True).start()
print(s.server_address[1], sink.getsockname()[1], flush=True)
s.serve_forever()
"#;

/// A sandbox network served in this process over a vhost-user backend, the
/// way `slipway attach --vhost-user` will: when the VMM leaves, the stack is
/// parked and resumed over a new link to the same backend.
struct Sandbox {
    net: Arc<VhostUserNet>,
    /// Times a `Driver::serve` ended because the VMM left.
    vmm_gone: Arc<AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Sandbox {
    fn start(socket: &Path) -> Sandbox {
        Self::start_at(socket, StackConfig::default().mtu)
    }

    /// A sandbox whose guest gets MTU `mtu` by DHCP.
    fn start_at(socket: &Path, mtu: usize) -> Sandbox {
        // SLIPWAY_VHOST_USER_OFFLOADS=0 measures without the checksum and TSO offers.
        let offloads = std::env::var("SLIPWAY_VHOST_USER_OFFLOADS").as_deref() != Ok("0");
        let options = Options {
            guest_csum: offloads,
            csum: offloads,
            tso: offloads,
            mtu,
        };
        let net = Arc::new(VhostUserNet::listen_with(socket, options).expect("listen for the VMM"));
        let cfg = StackConfig {
            mtu,
            host_loopback_aliases: vec![IpAddr::V4(Ipv4Addr::new(10, 0, 2, 2))],
            ..StackConfig::default()
        };
        let policy = EgressPolicy::from_spec(&PolicySpec {
            deny_out: vec![DENIED_NET.into()],
            ..PolicySpec::default()
        })
        .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let vmm_gone = Arc::new(AtomicUsize::new(0));
        let (net2, gone2) = (net.clone(), vmm_gone.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut parked = Parked::new(Stack::new(cfg, policy, std::time::Instant::now()));
                let mut stopped = std::pin::pin!(stopped);
                loop {
                    let link = net2.link().expect("a link to the backend");
                    let driver = Driver::resume(parked, link).expect("serve the link");
                    let (back, ended) = driver
                        .serve(async {
                            let _ = stopped.as_mut().await;
                        })
                        .await;
                    parked = back;
                    match ended {
                        None => return,
                        Some(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                            gone2.fetch_add(1, Ordering::SeqCst);
                        }
                        Some(e) => panic!("the sandbox link failed: {e}"),
                    }
                }
            });
        });
        Sandbox {
            net,
            vmm_gone,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn stats(&self) -> Stats {
        self.net.stats()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn init_logs() {
    let filter = std::env::var("SLIPWAY_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_test_writer()
        .try_init();
}

/// QEMU arguments for netdev `n0` over vhost-user at `socket`.
fn vhost_user_netdev(socket: &Path) -> Vec<String> {
    [
        "-chardev",
        &format!("socket,id=c0,path={}", socket.display()),
        "-netdev",
        "vhost-user,id=n0,chardev=c0",
        "-object",
        &format!("memory-backend-memfd,id=mem,size={GUEST_MIB}M,share=on"),
        "-machine",
        "memory-backend=mem",
    ]
    .map(String::from)
    .to_vec()
}

fn make_blob(dir: &Path) -> String {
    let blob = dir.join("blob");
    let ok = Command::new("sh")
        .args([
            "-c",
            &format!("head -c {BLOB_MIB}M /dev/urandom > {}", blob.display()),
        ])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    common::sha256_file(&blob)
}

/// Guest side: fetch the blob and hash it; connect to the denied network.
fn fetch_and_deny(port: u16) -> String {
    format!(
        "timed fetch sh -c 'set -o pipefail; wget -q -O - http://10.0.2.2:{port}/blob | sha256sum >/tmp/sum'
         mark sha256 $(cut -c1-64 /tmp/sum)
         timed deny nc -w 5 192.0.2.1 80 </dev/null
         true"
    )
}

fn check_fetch_and_deny(run: &VmRun, want_sha: &str, stats: &Stats, label: &str) {
    let deny_ms =
        run.assert_leased_fetched_denied(want_sha, &|| format!("--- backend ---\n{stats:?}"));
    eprintln!(
        "{label}: accel {:?}, boot {:.2?}, dhcp {} ms (mtu {}), {BLOB_MIB} MiB fetched and hashed \
         in {} ms ({:.0} Mbit/s), denied connect failed in {deny_ms} ms, whole run {:.1?}; \
         features {:#x}, bad chains {}, dropped {}",
        run.accel,
        run.boot.unwrap_or_default(),
        run.field("dhcp-done", "ms").unwrap_or("?"),
        run.field("dhcp", "mtu").unwrap_or("?"),
        run.field("fetch", "ms").unwrap_or("?"),
        mbit(run, "fetch"),
        run.took,
        stats.features,
        stats.bad_chains,
        stats.dropped_frames,
    );
}

#[test]
fn microvm_over_vhost_user_fetches_and_is_denied() {
    require_microvm!();
    init_logs();
    let dir = Scratch::new("vu-fetch");
    let want = make_blob(&dir.0);
    let web = WebServer::start(&dir.0);
    let socket = dir.0.join("vhost-user.sock");
    let sandbox = Sandbox::start(&socket);
    // Then the transport alone, both ways: host→guest into /dev/null (no
    // hashing in the guest), guest→host from /dev/zero into the sink.
    let script = format!(
        "{}
         timed fetch-null wget -q -O /dev/null http://10.0.2.2:{port}/blob
         {}
         true",
        fetch_and_deny(web.port),
        upload(&web),
        port = web.port,
    );
    let run = boot(&socket, &script);
    let stats = sandbox.stats();
    check_fetch_and_deny(&run, &want, &stats, "vhost-user + in-process stack");
    assert_eq!(
        run.field("fetch-null", "exit"),
        Some("0"),
        "{}",
        run.report()
    );
    assert_sink_got_the_upload(&web, &run);
    eprintln!(
        "vhost-user transport: host→guest {BLOB_MIB} MiB in {} ms ({:.0} Mbit/s), \
         guest→host {BLOB_MIB} MiB in {} ms ({:.0} Mbit/s); {stats:?}",
        run.field("fetch-null", "ms").unwrap_or("?"),
        mbit(&run, "fetch-null"),
        run.field("upload", "ms").unwrap_or("?"),
        mbit(&run, "upload"),
    );
    assert_eq!(stats.bad_chains, 0, "{stats:?}");
    assert_eq!(stats.connections, 1, "{stats:?}");
}

/// At MTU 1500 the guest's kernel acks TSO both ways: segments over the MTU
/// cross the virtqueues whole, and the bytes still arrive exact.
#[test]
fn microvm_over_vhost_user_at_mtu_1500_moves_64k_segments() {
    require_microvm!();
    if std::env::var("SLIPWAY_VHOST_USER_OFFLOADS").as_deref() == Ok("0") {
        eprintln!("skipped: SLIPWAY_VHOST_USER_OFFLOADS=0");
        return;
    }
    init_logs();
    let dir = Scratch::new("vu-tso");
    let want = make_blob(&dir.0);
    let web = WebServer::start(&dir.0);
    let socket = dir.0.join("vhost-user.sock");
    let sandbox = Sandbox::start_at(&socket, 1500);
    let script = format!("{}\n{}\ntrue", fetch_and_deny(web.port), upload(&web));
    let run = boot(&socket, &script);
    let stats = sandbox.stats();
    check_fetch_and_deny(&run, &want, &stats, "vhost-user at MTU 1500");
    assert_eq!(run.field("dhcp", "mtu"), Some("1500"), "{}", run.report());
    assert_sink_got_the_upload(&web, &run);
    // virtio 1.x §5.1.3: GUEST_TSO4 7, GUEST_TSO6 8, HOST_TSO4 11.
    for bit in [7, 8, 11] {
        assert_ne!(
            stats.features & (1 << bit),
            0,
            "feature {bit} not acked: {stats:?}"
        );
    }
    let (to_guest, from_guest) = (stats.largest_frame_to_guest, stats.largest_frame_from_guest);
    eprintln!(
        "vhost-user at MTU 1500: largest frame {to_guest} bytes to the guest, {from_guest} \
         from it; fetch {:.0} Mbit/s, upload {:.0} Mbit/s; {stats:?}",
        mbit(&run, "fetch"),
        mbit(&run, "upload"),
    );
    // Without TSO no frame exceeds 1514 bytes at MTU 1500. (Under TCG the
    // guest's kernel sizes its TSO bursts by its slow pacing rate, so they
    // stay a few segments long.)
    assert!(
        to_guest > 1514,
        "largest frame to the guest {to_guest}: {stats:?}"
    );
    assert!(
        from_guest > 1514,
        "largest frame from the guest {from_guest}: {stats:?}"
    );
    assert_eq!(stats.bad_chains, 0, "{stats:?}");
}

/// Guest script: send `BLOB_MIB` MiB from /dev/zero to the web server's sink,
/// timed as `upload`.
fn upload(web: &WebServer) -> String {
    format!(
        "timed upload sh -c 'dd if=/dev/zero bs=65536 count={blocks} 2>/dev/null | nc 10.0.2.2 {sink}'",
        sink = web.sink_port,
        blocks = BLOB_MIB * 16,
    )
}

/// Boot the guest on the vhost-user backend at `socket` and run `script`.
fn boot(socket: &Path, script: &str) -> VmRun {
    MicroVm::new(&vhost_user_netdev(socket), script)
        .memory_mib(GUEST_MIB)
        .timeout(RUN_LIMIT)
        .run()
}

/// The guest's `upload` of `BLOB_MIB` MiB reached the web server's sink.
fn assert_sink_got_the_upload(web: &WebServer, run: &VmRun) {
    assert!(
        web.wait_for_request(
            &format!("sink got {}", BLOB_MIB << 20),
            Duration::from_secs(5)
        ),
        "the sink did not get {BLOB_MIB} MiB: {:?}\n{}",
        web.log.lock().unwrap(),
        run.report()
    );
}

/// Throughput of a `BLOB_MIB` MiB transfer timed as `key`.
fn mbit(run: &VmRun, key: &str) -> f64 {
    let ms: f64 = run
        .field(key, "ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    (BLOB_MIB as f64 * 8.0 * 1.048_576) / (ms.max(1.0) / 1000.0)
}

/// QEMU children of this process whose command line names `socket`.
fn qemu_using(socket: &Path) -> Vec<libc::pid_t> {
    let me = std::process::id().to_string();
    let needle = socket.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<libc::pid_t>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // Fields after the command name (which may hold spaces): state, ppid, …
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1).map(str::to_owned));
        if ppid.as_deref() != Some(me.as_str()) {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            pids.push(pid);
        }
    }
    pids
}

fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

#[test]
fn vhost_user_backend_serves_a_second_vmm_after_the_first_is_killed() {
    require_microvm!();
    init_logs();
    let dir = Scratch::new("vu-reconnect");
    let want = make_blob(&dir.0);
    std::fs::write(dir.0.join("ready"), b"ready\n").unwrap();
    let web = WebServer::start(&dir.0);
    let socket = dir.0.join("vhost-user.sock");
    let sandbox = Sandbox::start(&socket);

    // First VMM: says it is up, starts the big fetch, and is SIGKILLed
    // mid-way (no orderly vhost-user shutdown at all).
    let first = {
        let args = vhost_user_netdev(&socket);
        let script = format!(
            "wget -q -O /dev/null http://10.0.2.2:{port}/ready
             wget -q -O /dev/null http://10.0.2.2:{port}/blob
             sleep 100",
            port = web.port
        );
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let run = MicroVm::new(&args, &script)
                .memory_mib(GUEST_MIB)
                .timeout(RUN_LIMIT)
                .run();
            let _ = tx.send(run);
        });
        rx
    };
    assert!(
        web.wait_for_request("GET /ready", RUN_LIMIT),
        "the first guest never reached the web server: {:?}",
        sandbox.stats()
    );
    // Let the big fetch begin, then pull the plug.
    web.wait_for_request("GET /blob", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(300));
    let pids = qemu_using(&socket);
    assert_eq!(pids.len(), 1, "expected one QEMU on {}", socket.display());
    // SAFETY: kill(2) on our own child QEMU, found by its unique socket path.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    let killed_at = Instant::now();
    let first = first
        .recv_timeout(Duration::from_secs(30))
        .expect("the first boot ends once QEMU is killed");
    assert!(
        wait_until(Duration::from_secs(10), || sandbox
            .vmm_gone
            .load(Ordering::SeqCst)
            == 1),
        "the stack was not told that the VMM left: {:?}\n{}",
        sandbox.stats(),
        first.report()
    );
    eprintln!(
        "first VMM killed; the stack knew after {:.0?}: {:?}",
        killed_at.elapsed(),
        sandbox.stats()
    );
    assert!(!sandbox.stats().connected);

    // Second VMM on the same socket, same stack: same lease, full transfer.
    // This one speaks virtio 1.0 (modern virtio-mmio), the first legacy.
    let mut args = vhost_user_netdev(&socket);
    args.extend(["-global", "virtio-mmio.force-legacy=false"].map(String::from));
    let run = MicroVm::new(&args, &fetch_and_deny(web.port))
        .memory_mib(GUEST_MIB)
        .timeout(RUN_LIMIT)
        .run();
    let stats = sandbox.stats();
    check_fetch_and_deny(&run, &want, &stats, "vhost-user, second VMM");
    assert_eq!(stats.connections, 2, "{stats:?}");
    assert_eq!(stats.bad_chains, 0, "{stats:?}");
    assert!(
        stats.features & (1 << 32) != 0,
        "the second guest did not ack VIRTIO_F_VERSION_1: {stats:?}"
    );
}
