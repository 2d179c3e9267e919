//! Header injection end to end (issue 15): a real kernel's curl inside
//! `slipway run` talks HTTPS to servers in the world namespace, which have a
//! certificate from a CA made here and record the headers they get (they
//! never echo them). A name with a rule gets the rule's header with the
//! secret's value, over HTTP/1.1 and HTTP/2; the value is nowhere in what
//! the guest's client received nor in slipway's log; a Host that is not the
//! SNI gets 421; a server the host does not trust gets nothing; a name
//! without a rule is spliced (the guest sees the server's own certificate).

mod common;

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::World;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const RESOLVER: &str = "203.0.113.53";
const SERVER: &str = "198.51.100.1";

/// dnsmasq in the world, answering for the test's names; killed on drop.
struct Dnsmasq(Child);

impl Dnsmasq {
    fn start(w: &World) -> Dnsmasq {
        let out = w.exec(&format!("ip addr add {RESOLVER}/24 dev w0"));
        assert!(out.status.success(), "{out:?}");
        let log = w.dir.join("dnsmasq.log");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &w.name, "dnsmasq", "-k", "--no-resolv"])
            .args([
                "--no-hosts",
                "--bind-interfaces",
                "--user=root",
                "--pid-file=",
            ])
            .arg(format!("--listen-address={RESOLVER}"))
            .arg(format!("--log-facility={}", log.display()));
        for name in ["api", "plain", "bad"] {
            cmd.arg(format!("--host-record={name}.allowed.test,{SERVER}"));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dnsmasq (dnsmasq-base)");
        let d = Dnsmasq(child);
        let until = Instant::now() + Duration::from_secs(5);
        while !std::fs::read_to_string(&log).is_ok_and(|l| l.contains("started")) {
            assert!(Instant::now() < until, "dnsmasq did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a server got: one line per request (`HTTP/2.0 /path`) followed by
/// its headers, `name: value`.
type Seen = Arc<Mutex<Vec<String>>>;

/// A TCP listener on `addr` inside the world namespace: bound by a thread
/// that entered it (a network namespace is per thread), then served here.
fn listen_in_world(w: &World, addr: SocketAddr) -> std::net::TcpListener {
    let path = format!("/run/netns/{}", w.name);
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).expect("open the world's netns");
        // SAFETY: setns takes a descriptor we own and a flag; it moves only
        // this short-lived thread into the namespace.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        std::net::TcpListener::bind(addr).expect("bind in the world")
    })
    .join()
    .unwrap()
}

/// HTTPS (h2 and http/1.1 by ALPN) with `cert`, recording each request.
fn https_server(
    rt: &tokio::runtime::Runtime,
    listener: std::net::TcpListener,
    cert: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
) -> Seen {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(cert.0, cert.1)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let seen = Seen::default();
    let s = seen.clone();
    listener.set_nonblocking(true).unwrap();
    rt.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        while let Ok((tcp, peer)) = listener.accept().await {
            let (acceptor, seen) = (acceptor.clone(), s.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    let mut record = format!("{:?} {}\n", req.version(), req.uri().path());
                    for (k, v) in req.headers() {
                        record += &format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes()));
                    }
                    record += &format!("(peer {})\n", peer.ip().to_canonical());
                    seen.lock().unwrap().push(record);
                    // Never the request's headers: what the guest sees must
                    // not carry the secret unless slipway leaks it.
                    let body = format!("world says hi over {:?}\n", req.version());
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from(body),
                        )))
                    }
                });
                let io = TokioIo::new(tls);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                }
            });
        }
    });
    seen
}

/// The world's HTTPS servers: `good` (198.51.100.1:443, a certificate for
/// api/plain.allowed.test from the world's CA in `ca_file`) and `bad`
/// (:9443, self-signed for bad.allowed.test). Stopped with the runtime.
struct Servers {
    good: Seen,
    bad: Seen,
    ca_file: std::path::PathBuf,
    _rt: tokio::runtime::Runtime,
}

impl Servers {
    fn start(w: &World) -> Servers {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        // The world's CA, which only slipway (--upstream-ca) trusts.
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // rcgen's default subject is the same for every certificate; OpenSSL
        // would take a leaf with its issuer's name for self-signed.
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "slipway test world CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let ca_file = w.dir.join("world-ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let names = ["api.allowed.test", "plain.allowed.test"].map(String::from);
        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(names.to_vec()).unwrap();
        leaf.distinguished_name
            .push(rcgen::DnType::CommonName, "api.allowed.test");
        let leaf = leaf.signed_by(&leaf_key, &ca, &ca_key).unwrap();
        let good = https_server(
            &rt,
            listen_in_world(w, format!("{SERVER}:443").parse().unwrap()),
            (vec![leaf.der().clone()], key_der(&leaf_key)),
        );
        // A server whose certificate no one trusts.
        let bad_key = KeyPair::generate().unwrap();
        let bad_cert = CertificateParams::new(vec!["bad.allowed.test".to_string()])
            .unwrap()
            .self_signed(&bad_key)
            .unwrap();
        let bad = https_server(
            &rt,
            listen_in_world(w, format!("{SERVER}:9443").parse().unwrap()),
            (vec![bad_cert.der().clone()], key_der(&bad_key)),
        );
        Servers {
            good,
            bad,
            ca_file,
            _rt: rt,
        }
    }
}

fn key_der(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

fn has_dnsmasq() -> bool {
    Command::new("dnsmasq")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn a_rules_header_carries_the_secret_to_its_server_and_nowhere_else() {
    require_world!();
    if !has_dnsmasq() {
        assert_ne!(
            std::env::var("SLIPWAY_E2E").as_deref(),
            Ok("required"),
            "dnsmasq is missing (apt-get install dnsmasq-base)"
        );
        eprintln!("skipped: no dnsmasq (apt-get install dnsmasq-base)");
        return;
    }
    let w = World::new();
    let _dns = Dnsmasq::start(&w);
    let servers = Servers::start(&w);
    let (good, bad, ca_file) = (&servers.good, &servers.bad, &servers.ca_file);

    let secret = format!("sk-e2e-{}-c0ffee", std::process::id());
    let secret_file = w.dir.join("api-key");
    std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
    let org = "org-e2e-7";
    let ca = ca_file.display();
    let curl = "curl -sS --max-time 10 -D -";
    let script = [
        format!("{curl} --http1.1 -H 'Authorization: guest' -H 'X-Mine: ${{e2b.secrets.API_KEY}}' https://api.allowed.test/h1; echo h1-exit-$?"),
        format!("{curl} --http2 https://api.allowed.test/h2; echo h2-exit-$?"),
        format!("{curl} --http1.1 -H 'Host: plain.allowed.test' https://api.allowed.test/misdirected; echo h1-421-exit-$?"),
        format!("{curl} --http2 -H 'Host: plain.allowed.test' https://api.allowed.test/misdirected2; echo h2-421-exit-$?"),
        // No rule: spliced. The guest sees the world's own certificate.
        format!("{curl} https://plain.allowed.test/spliced; echo plain-sandbox-ca-exit-$?"),
        format!("{curl} --cacert {ca} https://plain.allowed.test/spliced; echo plain-world-ca-exit-$?"),
        // A rule, but a server slipway does not trust: nothing goes out.
        format!("{curl} https://bad.allowed.test:9443/untrusted; echo bad-exit-$?"),
        format!("cat {}; echo secret-file-exit-$?", secret_file.display()),
        "echo \"org-var=[$SLIPWAY_TEST_ORG] cert-file=$SSL_CERT_FILE\"".into(),
    ]
    .join("\n");
    let api_rule = "api.allowed.test=Authorization: Bearer ${e2b.secrets.API_KEY}";
    let org_rule = "api.allowed.test=X-Org: ${e2b.secrets.ORG}";
    let bad_rule = "bad.allowed.test=Authorization: Bearer ${e2b.secrets.API_KEY}";
    let secret_arg = format!("API_KEY=@{}", secret_file.display());
    let run = {
        let args = [
            "--allow-out",
            "*.allowed.test",
            "--deny-out",
            "ALL_TRAFFIC",
            "--dns-upstream",
            RESOLVER,
            "--header-rule",
            api_rule,
            "--header-rule",
            org_rule,
            "--header-rule",
            bad_rule,
            "--secret",
            &secret_arg,
            "--secret",
            "ORG=env:SLIPWAY_TEST_ORG",
            "--upstream-ca",
            &ca_file.to_string_lossy(),
            // Everything slipway logs, to look for the secret in it.
            "--log",
            "debug",
        ];
        let started = Instant::now();
        let output = Command::new("timeout")
            .args([
                "-k",
                "5",
                "120",
                "ip",
                "netns",
                "exec",
                &w.name,
                common::slipway(),
                "run",
            ])
            .args(args)
            .args(["--", "sh", "-c", &script])
            .env("SLIPWAY_TEST_ORG", org)
            .output()
            .expect("run slipway");
        common::Run {
            output,
            took: started.elapsed(),
        }
    };
    let (out, log) = (run.stdout(), run.stderr());
    let both = format!("stdout:\n{out}\nstderr:\n{log}");
    let good_seen = good.lock().unwrap().clone();
    let bad_seen = bad.lock().unwrap().clone();
    let seen = good_seen.join("\n");

    // The rule's headers reached the server, over HTTP/1.1 and HTTP/2.
    assert!(
        out.contains("h1-exit-0") && out.contains("h2-exit-0"),
        "{both}"
    );
    assert!(out.contains("world says hi over HTTP/1.1"), "{both}");
    assert!(out.contains("world says hi over HTTP/2.0"), "{both}");
    let h1 = good_seen
        .iter()
        .find(|r| r.starts_with("HTTP/1.1 /h1"))
        .expect(&seen);
    assert!(
        h1.contains(&format!("authorization: Bearer {secret}\n")),
        "{seen}"
    );
    assert!(
        !h1.contains("authorization: guest"),
        "the rule overrides: {seen}"
    );
    assert!(h1.contains(&format!("x-org: {org}\n")), "{seen}");
    // A placeholder the guest writes goes as written.
    assert!(h1.contains("x-mine: ${e2b.secrets.API_KEY}\n"), "{seen}");
    let h2 = good_seen
        .iter()
        .find(|r| r.starts_with("HTTP/2.0 /h2"))
        .expect(&seen);
    assert!(
        h2.contains(&format!("authorization: Bearer {secret}\n")),
        "{seen}"
    );

    // A Host that is not the SNI: 421, and nothing reached the server.
    assert!(out.contains("HTTP/1.1 421 Misdirected Request"), "{both}");
    assert!(out.contains("HTTP/2 421"), "{both}");
    assert!(
        out.contains("the request names plain.allowed.test"),
        "{both}"
    );
    assert!(!seen.contains("/misdirected"), "{seen}");

    // No rule, no interception: the sandbox's CA does not vouch for it,
    // the world's CA does (the guest sees the real certificate).
    assert!(!out.contains("plain-sandbox-ca-exit-0"), "{both}");
    assert!(out.contains("plain-world-ca-exit-0"), "{both}");
    let spliced = good_seen
        .iter()
        .find(|r| r.contains(" /spliced"))
        .expect(&seen);
    assert!(!spliced.contains("authorization"), "{seen}");

    // An untrusted server: a 502 for the guest, no request for the server.
    assert!(out.contains("502"), "{both}");
    assert!(
        out.contains("certificate for bad.allowed.test is not trusted"),
        "{both}"
    );
    assert!(bad_seen.is_empty(), "{bad_seen:?}");

    // The secrets stay outside: the file reads empty, the variable is gone.
    assert!(out.contains("secret-file-exit-0"), "{both}");
    assert!(
        out.contains("org-var=[] cert-file=/etc/ssl/certs/ca-certificates.crt"),
        "{both}"
    );

    // Not in anything the guest's clients got, nor in slipway's log.
    assert!(!out.contains(&secret), "the guest saw the secret:\n{both}");
    assert!(!log.contains(&secret), "the log holds the secret:\n{log}");
    assert!(!both.contains(org), "the second secret leaked:\n{both}");
    // The flow log marks what was intercepted.
    assert!(
        log.contains("intercepted=\"api.allowed.test\"")
            || log.contains("intercepted=api.allowed.test"),
        "{log}"
    );
}

/// `slipway serve` in the world, its stderr collected; stopped on drop.
struct Serve {
    child: Child,
    log: Arc<Mutex<String>>,
    socket: std::path::PathBuf,
}

impl Serve {
    fn start(w: &World, extra: &str) -> Serve {
        let socket = w.dir.join("control.sock");
        let config = w.dir.join("serve.toml");
        std::fs::write(
            &config,
            format!(
                "log = \"trace\"\n[control]\nsocket = \"{}\"\n[gateway]\nlisten = \"off\"\n\
                 [metrics]\nlisten = \"127.0.0.1:19464\"\n{extra}",
                socket.display()
            ),
        )
        .unwrap();
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &w.name,
                common::slipway(),
                "serve",
                "--config",
            ])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start slipway serve");
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let serve = Serve { child, log, socket };
        let until = Instant::now() + Duration::from_secs(10);
        while !serve.log().contains("slipway: serving") {
            assert!(
                Instant::now() < until,
                "serve did not start: {}",
                serve.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        serve
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// `slipway ctl ARGS`: exit code, stdout, stderr.
    fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(common::slipway())
            .arg("ctl")
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (
            out.status.code().unwrap_or(-1),
            text(&out.stdout),
            text(&out.stderr),
        )
    }

    fn ctl_ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.ctl(args);
        assert_eq!(
            code,
            0,
            "ctl {args:?}: {err}\n--- serve ---\n{}",
            self.log()
        );
        out
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) on our own child (ip netns exec execs slipway).
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A guest namespace on the tap serve made for a sandbox; removed on drop.
struct TapGuest(String);

impl TapGuest {
    fn adopt(w: &World, tap: &str) -> TapGuest {
        let ns = format!("{}g", w.name);
        let script = format!(
            "ip netns add {ns}
             ip -n {w} link set {tap} netns {ns}
             ip -n {ns} link set lo up
             ip -n {ns} link set {tap} up
             ip -n {ns} addr add 10.0.2.15/24 dev {tap}
             ip -n {ns} route add default via 10.0.2.2",
            w = w.name
        );
        let out = Command::new("sh").args(["-ec", &script]).output().unwrap();
        assert!(out.status.success(), "{script}: {out:?}");
        TapGuest(ns)
    }

    fn sh(&self, script: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "sh", "-c", script])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }
}

impl Drop for TapGuest {
    fn drop(&mut self) {
        let _ = Command::new("sh")
            .args([
                "-c",
                &format!("ip netns pids {} | xargs -r kill -9", self.0),
            ])
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// serve's side (issue 15 items 1, 4, 6, 7): rules in E2B's JSON through
/// `slipway ctl`, a secret from the `[secrets]` section and then rotated
/// through `PUT /secrets/{name}`, the sandbox's CA from its create answer
/// and `GET /sandboxes/{id}/ca.pem`, rules replaced live, refusals (400,
/// 409), counters and metrics; no secret in any answer or log line. The
/// guest aims at an address nobody resolved: the name-dial path.
#[test]
fn serve_takes_rules_and_secrets_and_a_rotated_secret_reaches_the_next_request() {
    require_world!();
    let w = World::new();
    let _dns = Dnsmasq::start(&w);
    let servers = Servers::start(&w);
    let first = format!("sk-serve-{}-one", std::process::id());
    let second = format!("sk-serve-{}-two", std::process::id());
    let key_file = w.dir.join("key-one");
    std::fs::write(&key_file, &first).unwrap();
    let serve = Serve::start(
        &w,
        &format!(
            "[sandbox]\ndns_upstream = \"{RESOLVER}\"\nupstream_ca = [\"{}\"]\n\
             [secrets]\nAPI_KEY = \"@{}\"\n",
            servers.ca_file.display(),
            key_file.display()
        ),
    );
    let rule = "api.allowed.test=Authorization: Bearer ${e2b.secrets.API_KEY}";
    let egress = ["--allow-out", "*.allowed.test", "--deny-out", "ALL_TRAFFIC"];
    let mut create = vec!["create", "inj", "--tap", "swinj"];
    create.extend(egress);
    create.extend(["--header-rule", rule]);
    let created: serde_json::Value = serde_json::from_str(&serve.ctl_ok(&create)).unwrap();
    let ca = created["caCert"].as_str().expect("caCert").to_string();
    assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"), "{created}");
    assert_eq!(
        serve.ctl_ok(&["ca", "inj"]),
        ca,
        "ca.pem is the create answer's caCert"
    );
    assert_eq!(
        created["network"]["rules"]["api.allowed.test"][0]["transform"]["headers"]["authorization"],
        "Bearer ${e2b.secrets.API_KEY}",
        "{created}"
    );
    let guest = TapGuest::adopt(&w, "swinj");
    let ca_file = w.dir.join("sandbox-ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();
    // 203.0.113.77: no answer gave it; the stack dials the SNI's name.
    let curl = |path: &str| {
        guest.sh(&format!(
            "curl -sS --max-time 10 -D - --cacert {} --resolve api.allowed.test:443:203.0.113.77 \
             https://api.allowed.test{path}; echo exit-$?",
            ca_file.display()
        ))
    };
    let out = curl("/one");
    assert!(
        out.contains("world says hi") && out.contains("exit-0"),
        "{out}\n{}",
        serve.log()
    );

    // Rotate the secret through the API: the next request carries it.
    let key_two = w.dir.join("key-two");
    std::fs::write(&key_two, format!("{second}\n")).unwrap();
    serve.ctl_ok(&["secret-put", "API_KEY", &format!("@{}", key_two.display())]);
    let out2 = curl("/two");
    assert!(out2.contains("exit-0"), "{out2}");
    let seen = servers.good.lock().unwrap().clone();
    let auth_of = |path: &str| {
        seen.iter()
            .find(|r| r.contains(&format!(" {path}\n")))
            .and_then(|r| r.lines().find(|l| l.starts_with("authorization: ")))
            .map(str::to_string)
    };
    assert_eq!(
        auth_of("/one"),
        Some(format!("authorization: Bearer {first}")),
        "{seen:?}"
    );
    assert_eq!(
        auth_of("/two"),
        Some(format!("authorization: Bearer {second}")),
        "{seen:?}"
    );

    // Replace the rules live (PUT): the next connection gets the new header.
    let mut set = vec!["set-network", "inj"];
    set.extend(egress);
    set.extend([
        "--header-rule",
        "api.allowed.test=X-Team: t-${e2b.secrets.API_KEY}",
    ]);
    serve.ctl_ok(&set);
    assert!(curl("/three").contains("exit-0"));
    let seen = servers.good.lock().unwrap().clone();
    let three = seen
        .iter()
        .find(|r| r.contains(" /three\n"))
        .expect("/three");
    assert!(three.contains(&format!("x-team: t-{second}\n")), "{three}");
    assert!(!three.contains("authorization"), "{three}");

    // Refusals, each naming what was wrong.
    let refused = |args: &[&str], want: &str| {
        let (code, _, err) = serve.ctl(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    };
    let mut unknown = vec!["set-network", "inj"];
    unknown.extend(egress);
    unknown.extend(["--header-rule", "api.allowed.test=X: ${e2b.secrets.NOPE}"]);
    refused(&unknown, "uses secret NOPE, which is not set (400");
    refused(
        &["secret-delete", "API_KEY"],
        "secret API_KEY is used by the header rules of sandbox inj",
    );
    refused(&["secret-delete", "NOPE"], "secret NOPE is not set (404");
    let mut bare = vec!["set-network", "inj"];
    bare.extend(egress);
    bare.extend(["--header-rule", "*=X: 1"]);
    refused(&bare, "invalid rule domain *");
    let mut unallowed = vec!["set-network", "inj"];
    unallowed.extend(egress);
    unallowed.extend(["--header-rule", "api.other.test=X: 1"]);
    refused(
        &unallowed,
        "rules for api.other.test: it covers no name allowOut allows",
    );
    // The refused updates left the last good rules in place.
    assert!(curl("/four").contains("exit-0"));

    // Names only, ever.
    let names = serve.ctl_ok(&["secrets"]);
    assert!(names.contains("API_KEY"), "{names}");
    let got = serve.ctl_ok(&["get", "inj"]);
    let counters: serde_json::Value = serde_json::from_str(&got).unwrap();
    let c = &counters["counters"];
    assert_eq!(c["interceptedFlows"], 4, "{c}");
    assert_eq!(c["requestsTransformed"], 4, "{c}");
    let m = w.exec("curl -sS --max-time 5 http://127.0.0.1:19464/metrics");
    let m = String::from_utf8_lossy(&m.stdout).into_owned();
    assert!(
        m.contains(r#"slipway_header_rules_total{sandbox="inj",kind="transformed"} 4"#),
        "{m}"
    );
    let answers = format!("{created}{names}{got}{m}");
    let log = serve.log();
    for secret in [&first, &second] {
        assert!(
            !answers.contains(secret.as_str()),
            "an answer shows a secret"
        );
        assert!(
            !log.contains(secret.as_str()),
            "the log shows a secret:\n{log}"
        );
        assert!(!out.contains(secret.as_str()) && !out2.contains(secret.as_str()));
    }
    assert!(
        log.contains("intercepted=\"api.allowed.test\"")
            || log.contains("intercepted=api.allowed.test"),
        "{log}"
    );
}

#[test]
fn bad_rules_and_secrets_are_refused_before_anything_starts() {
    let rows: &[(&[&str], &str)] = &[
        (
            &["--header-rule", "a.test=X: ${e2b.secrets.K}", "--allow-out", "a.test", "--deny-out", "ALL_TRAFFIC"],
            "slipway: rules for a.test: header x uses secret K, which is not set (give it with --secret K=@FILE)",
        ),
        (
            &["--header-rule", "a.test=X: 1"],
            "slipway: rules for a.test: it covers no name allowOut allows by name",
        ),
        (
            &["--header-rule", "*=X: 1", "--allow-out", "*", "--deny-out", "ALL_TRAFFIC"],
            "slipway: invalid rule domain *: ",
        ),
        (
            &["--header-rule", "a.test=Host: evil.test", "--allow-out", "a.test", "--deny-out", "ALL_TRAFFIC"],
            "slipway: rules for a.test: header Host cannot be set by a rule",
        ),
        (
            &["--header-rule", "a.test=X: 1", "--secret", "K=sk-pasted-by-mistake", "--allow-out", "a.test", "--deny-out", "ALL_TRAFFIC"],
            "slipway: --secret K=…: write NAME=@FILE or NAME=env:VAR",
        ),
        (
            &["--header-rule", "a.test=X: 1", "--secret", "K=env:SLIPWAY_NO_SUCH_VAR", "--allow-out", "a.test", "--deny-out", "ALL_TRAFFIC"],
            "slipway: --secret K=…: the variable SLIPWAY_NO_SUCH_VAR is not set",
        ),
        (
            &["--secret", "K=env:HOME"],
            "slipway: --secret, --upstream-ca and --ca-out need a --header-rule",
        ),
        (
            &["--header-rule", "a.test=X: 1", "--upstream-ca", "/nonexistent.pem", "--allow-out", "a.test", "--deny-out", "ALL_TRAFFIC"],
            "slipway: --upstream-ca: cannot read the upstream CA bundle /nonexistent.pem",
        ),
    ];
    for (args, want) in rows {
        let out = Command::new(common::slipway())
            .arg("run")
            .args(*args)
            .args(["--", "true"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.starts_with(want), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(!err.contains("sk-pasted"), "{err}");
    }
}

/// The egress proxy and header rules together: the interceptor's TLS to
/// the server rides in the proxy's tunnel (a real microsocks in the world,
/// which resolves the names it is given with the world's dnsmasq), on the
/// name-dial path and on a pinned address alike.
#[test]
fn an_intercepted_flow_goes_through_the_egress_proxy() {
    require_world!();
    if !has_dnsmasq() || !common::has_tool("microsocks") {
        assert_ne!(
            std::env::var("SLIPWAY_E2E").as_deref(),
            Ok("required"),
            "dnsmasq or microsocks is missing (apt-get install dnsmasq-base microsocks)"
        );
        eprintln!("skipped: no dnsmasq or microsocks");
        return;
    }
    const SOCKS: &str = "198.51.100.10";
    let w = World::new();
    let _dns = Dnsmasq::start(&w);
    let servers = Servers::start(&w);
    // `ip netns exec` puts /etc/netns/NAME/* over /etc for microsocks.
    struct EtcNetns(std::path::PathBuf);
    impl Drop for EtcNetns {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let etc = EtcNetns(std::path::PathBuf::from("/etc/netns").join(&w.name));
    std::fs::create_dir_all(&etc.0).unwrap();
    std::fs::write(
        etc.0.join("resolv.conf"),
        format!("nameserver {RESOLVER}\n"),
    )
    .unwrap();
    let out = w.exec(&format!("ip addr add {SOCKS}/24 dev w0"));
    assert!(out.status.success(), "{out:?}");
    struct Killed(Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _socks = Killed(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &w.name,
                "microsocks",
                "-i",
                SOCKS,
                "-p",
                "1080",
                "-b",
                SOCKS,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start microsocks"),
    );
    let until = Instant::now() + Duration::from_secs(10);
    let listening = format!("import socket; socket.create_connection(('{SOCKS}', 1080), 1)");
    while !w
        .exec(&format!("python3 -c \"{listening}\""))
        .status
        .success()
    {
        assert!(Instant::now() < until, "microsocks does not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let secret = format!("sk-socks-{}", std::process::id());
    let key_file = w.dir.join("key");
    std::fs::write(&key_file, &secret).unwrap();
    let curl = "curl -sS --max-time 10 -D -";
    let script = [
        // An address no answer gave: the name-dial path.
        format!("{curl} --resolve api.allowed.test:443:203.0.113.77 https://api.allowed.test/dialed; echo dialed-exit-$?"),
        // Through the resolver: a pinned address.
        format!("{curl} --http2 https://api.allowed.test/pinned; echo pinned-exit-$?"),
    ]
    .join("\n");
    let rule = "api.allowed.test=Authorization: Bearer ${e2b.secrets.KEY}";
    let secret_arg = format!("KEY=@{}", key_file.display());
    let ca = servers.ca_file.display().to_string();
    let args = [
        "--allow-out",
        "*.allowed.test",
        "--deny-out",
        "ALL_TRAFFIC",
        "--dns-upstream",
        RESOLVER,
        "--egress-proxy",
        "socks5://198.51.100.10:1080",
        "--header-rule",
        rule,
        "--secret",
        &secret_arg,
        "--upstream-ca",
        &ca,
    ];
    let output = Command::new("timeout")
        .args([
            "-k",
            "5",
            "120",
            "ip",
            "netns",
            "exec",
            &w.name,
            common::slipway(),
            "run",
        ])
        .args(args)
        .args(["--", "sh", "-c", &script])
        .env("SLIPWAY_LOG", "slipway::flow=info,warn")
        .output()
        .expect("run slipway");
    let (out, log) = (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    );
    let both = format!("stdout:\n{out}\nstderr:\n{log}");
    assert!(
        out.contains("dialed-exit-0") && out.contains("pinned-exit-0"),
        "{both}"
    );
    let seen = servers.good.lock().unwrap().clone();
    for path in ["/dialed", "/pinned"] {
        let r = seen
            .iter()
            .find(|r| r.contains(&format!(" {path}\n")))
            .unwrap_or_else(|| panic!("no {path}: {seen:?}\n{both}"));
        assert!(
            r.contains(&format!("authorization: Bearer {secret}\n")),
            "{r}"
        );
        // The server saw the proxy, not slipway's host address.
        assert!(r.contains(&format!("(peer {SOCKS})")), "{r}");
    }
    assert!(!out.contains(&secret) && !log.contains(&secret), "{both}");
}
