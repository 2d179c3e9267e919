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
        while let Ok((tcp, _)) = listener.accept().await {
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
        listen_in_world(&w, format!("{SERVER}:443").parse().unwrap()),
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
        listen_in_world(&w, format!("{SERVER}:9443").parse().unwrap()),
        (vec![bad_cert.der().clone()], key_der(&bad_key)),
    );

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
    drop(rt);
}
