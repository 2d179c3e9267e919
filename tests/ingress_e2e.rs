//! The public URL gateway end to end: `slipway run --ingress …` in a world
//! namespace, a real guest (a network namespace behind the stack) running an
//! HTTP server, a WebSocket echo, an SSE stream and raw TCP servers
//! (tests/support/ingress_guest.py), and real clients in the world: curl
//! (HTTP/1.1, HTTP/2 over TLS, h2c) and tests/support/ingress_client.py.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::World;

const GUEST: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/support/ingress_guest.py"
);
const CLIENT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/support/ingress_client.py"
);
const DOMAIN: &str = "slipway.test";

/// A `slipway run --ingress` whose guest serves ingress_guest.py; ended on drop.
struct Sandbox {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Sandbox {
    fn start(w: &World, args: &[&str], blob: Option<&std::path::Path>) -> Sandbox {
        let blob = blob.map(|b| b.to_string_lossy().into_owned());
        let guest_args: Vec<&str> = match &blob {
            Some(b) => vec!["--blob", b],
            None => vec![],
        };
        Self::start_guest(w, args, &guest_args)
    }

    /// `slipway run ARGS -- python3 ingress_guest.py GUEST_ARGS`.
    fn start_guest(w: &World, args: &[&str], guest_args: &[&str]) -> Sandbox {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &w.name, common::slipway(), "run"])
            .args(args)
            .args(["--", "python3", GUEST])
            .args(guest_args);
        let mut child = cmd
            .env("SLIPWAY_LOG", "slipway::ingress=info,warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start slipway");
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next().and_then(Result::ok));
            for _ in lines {}
        });
        let sandbox = Sandbox { child, log };
        let ready = rx.recv_timeout(Duration::from_secs(30)).ok().flatten();
        assert_eq!(
            ready.as_deref(),
            Some("ready"),
            "guest servers did not start; slipway said:\n{}",
            sandbox.log()
        );
        sandbox
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Every traffic access token printed so far, oldest first.
    fn tokens(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter_map(|l| l.strip_prefix("slipway: traffic access token: "))
            .map(str::to_string)
            .collect()
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: plain kill(2) on our own child (ip netns exec execs slipway).
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // SIGTERM goes on to the guest; slipway exits with it.
        self.signal(libc::SIGTERM);
        let until = Instant::now() + Duration::from_secs(5);
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

/// Run a shell command in the world; its stdout, with stderr on failure.
fn sh(w: &World, script: &str) -> String {
    let out = w.exec(script);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script}\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// curl through the gateway on 127.0.0.1:PORT with Host HOST; prints
/// "<code> <http version>" after the body.
fn curl(w: &World, port: u16, host: &str, extra: &str, path: &str) -> (u16, String, String) {
    let out = sh(
        w,
        &format!(
            "curl -sS --max-time 30 {extra} -H 'Host: {host}' -w '\\n%{{http_code}} %{{http_version}}' \
             http://127.0.0.1:{port}{path}"
        ),
    );
    let (body, tail) = out.rsplit_once('\n').unwrap();
    let mut t = tail.split(' ');
    let code = t.next().unwrap().parse().unwrap();
    let version = t.next().unwrap_or("").to_string();
    (code, version, body.to_string())
}

fn client(w: &World, args: &str) -> String {
    sh(w, &format!("timeout 60 python3 {CLIENT} {args}"))
}

/// The headers the guest's server received, from its /headers JSON, as "name: value" lines.
fn seen_headers(body: &str) -> Vec<String> {
    let start = body.find("\"headers\": [").expect("headers json") + 12;
    let end = body[start..]
        .find("]]")
        .map(|i| start + i + 1)
        .unwrap_or(body.len());
    body[start..end]
        .split("], [")
        .map(|pair| {
            pair.trim_matches(|c| c == '[' || c == ']')
                .replacen("\", \"", ": ", 1)
                .trim_matches('"')
                .to_string()
        })
        .collect()
}

#[test]
fn public_urls_reach_the_guest_over_http1_h2c_websocket_and_sse() {
    require_world!();
    let w = World::new();
    let _sb = Sandbox::start(
        &w,
        &[
            "--ingress",
            "127.0.0.1:18080",
            "--sandbox-id",
            "pub1",
            "--domain",
            DOMAIN,
        ],
        None,
    );
    let host = format!("8000-pub1.{DOMAIN}:18080");
    let (code, version, body) = curl(&w, 18080, &host, "--http1.1", "/headers");
    assert_eq!((code, version.as_str()), (200, "1.1"), "{body}");
    let seen = seen_headers(&body);
    for want in [
        format!("host: {host}"),
        format!("x-forwarded-host: {host}"),
        "x-forwarded-for: 127.0.0.1".into(),
        "x-forwarded-proto: http".into(),
    ] {
        assert!(seen.contains(&want), "guest did not see {want}: {seen:?}");
    }
    // Clients cannot forge what the gateway says about them, in any of the
    // headers servers read a client's address from, over HTTP/1.1 or h2c.
    let forged = "-H 'X-Forwarded-For: 203.0.113.9' -H 'X-Forwarded-Proto: https' \
                  -H 'Forwarded: for=203.0.113.9;proto=https' -H 'Forwarded: for=203.0.113.10' \
                  -H 'X-Real-IP: 203.0.113.9' -H 'True-Client-IP: 203.0.113.9'";
    for version in ["--http1.1", "--http2-prior-knowledge"] {
        let (_, _, body) = curl(&w, 18080, &host, &format!("{version} {forged}"), "/headers");
        let seen = seen_headers(&body);
        for want in [
            "x-forwarded-for: 127.0.0.1".to_string(),
            "x-forwarded-proto: http".into(),
            "x-real-ip: 127.0.0.1".into(),
            format!("forwarded: for=127.0.0.1;host=\\\"{host}\\\";proto=http"),
        ] {
            assert!(seen.contains(&want), "{version}: no {want}: {seen:?}");
        }
        assert!(
            !body.contains("203.0.113."),
            "{version}: a forged address arrived: {body}"
        );
        assert!(!body.contains("true-client-ip"), "{version}: {body}");
    }

    let (code, version, _) = curl(&w, 18080, &host, "--http2-prior-knowledge", "/headers");
    assert_eq!((code, version.as_str()), (200, "2"));
    // curl --http2 on plain http asks to upgrade to h2c: answered in HTTP/1.1.
    let (code, version, _) = curl(&w, 18080, &host, "--http2", "/headers");
    assert_eq!((code, version.as_str()), (200, "1.1"));

    // The header form, on localhost, an IP address and sandbox.<domain>.
    for h in ["localhost:18080", "127.0.0.1", "sandbox.slipway.test"] {
        let (code, _, body) = curl(
            &w,
            18080,
            h,
            "-H 'E2b-Sandbox-Id: pub1' -H 'E2b-Sandbox-Port: 8000'",
            "/headers",
        );
        assert_eq!(code, 200, "{h}: {body}");
    }

    let ws = client(&w, &format!("ws 127.0.0.1 18080 {host}"));
    assert_eq!(ws.trim(), "ws-ok");

    // 10 events 150 ms apart arrive as they are sent, not all at the end.
    let sse = client(&w, &format!("sse 127.0.0.1 18080 {host} 10 150"));
    let f: Vec<&str> = sse.split_whitespace().collect();
    assert_eq!(&f[..2], ["sse-ok", "10"], "{sse}");
    let (first, last): (u64, u64) = (f[2].parse().unwrap(), f[3].parse().unwrap());
    assert!(first < 1000 && last >= first + 1000, "not streamed: {sse}");
    let (code, version, body) = curl(
        &w,
        18080,
        &host,
        "-N --http2-prior-knowledge",
        "/sse?n=3&ms=10",
    );
    assert_eq!((code, version.as_str()), (200, "2"));
    assert_eq!(body.matches("data: event").count(), 3, "{body}");
}

#[test]
fn every_row_of_the_status_table() {
    require_world!();
    let w = World::new();
    let sb = Sandbox::start(
        &w,
        &[
            "--ingress",
            "127.0.0.1:18080",
            "--sandbox-id",
            "rows1",
            "--domain",
            DOMAIN,
            "--max-inbound",
            "3",
        ],
        None,
    );
    let rows: &[(&str, &str, u16, &str)] = &[
        ("8000-rows1.slipway.test", "", 200, "\"method\": \"GET\""),
        (
            "0-rows1.slipway.test",
            "",
            400,
            "\"error\":\"invalid_host\"",
        ),
        ("65536-rows1.slipway.test", "", 400, "invalid port"),
        ("8000-bad_id.slipway.test", "", 400, "invalid"),
        (
            "8000-rows1.elsewhere.test",
            "",
            400,
            "is not <port>-<sandboxId>",
        ),
        ("localhost", "", 400, "e2b-sandbox-id is missing"),
        (
            "localhost",
            "-H 'E2b-Sandbox-Id: rows1' -H 'E2b-Sandbox-Port: x'",
            400,
            "invalid port",
        ),
        (
            "8000-nosuch.slipway.test",
            "",
            502,
            "\"error\":\"sandbox_not_found\"",
        ),
        (
            "8001-rows1.slipway.test",
            "",
            502,
            "\"error\":\"port_not_open\"",
        ),
    ];
    for (host, extra, want, text) in rows {
        let (code, _, body) = curl(&w, 18080, host, extra, "/headers");
        assert_eq!(code, *want, "{host} {extra}: {body}");
        assert!(body.contains(text), "{host}: {body} lacks {text}");
    }
    // The two 502s say different things; browsers get a page.
    let (code, _, page) = curl(
        &w,
        18080,
        "8001-rows1.slipway.test",
        "-H 'Accept: text/html'",
        "/",
    );
    assert_eq!(code, 502);
    assert!(
        page.starts_with("<!doctype html>")
            && page.contains("The sandbox is running but port is not open")
            && page.contains("port_not_open · sandbox rows1 · port 8001"),
        "{page}"
    );
    let (_, _, page) = curl(
        &w,
        18080,
        "8000-nosuch.slipway.test",
        "-H 'Accept: text/html'",
        "/",
    );
    assert!(
        page.contains("The sandbox was not found") && page.contains("sandbox nosuch"),
        "{page}"
    );

    // 429 over the sandbox's cap of 3 connections; the cap frees again.
    let held = client(&w, "hold 127.0.0.1 18080 8000-rows1.slipway.test 3");
    assert!(
        held.starts_with("held 3 extra 429")
            && held.contains("too_many_connections")
            && held.contains("The sandbox has too many concurrent incoming connections (limit: 3)"),
        "{held}\n{}",
        sb.log()
    );
    let mut freed = false;
    for _ in 0..50 {
        if curl(&w, 18080, "8000-rows1.slipway.test", "", "/headers").0 == 200 {
            freed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(freed, "the cap did not free up: {}", sb.log());
}

/// A test CA and a wildcard certificate for *.slipway.test, as PEM files.
fn make_certs(dir: &std::path::Path) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "slipway test CA");
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![format!("*.{DOMAIN}"), DOMAIN.to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    std::fs::write(path("ca.pem"), ca.pem()).unwrap();
    std::fs::write(path("cert.pem"), leaf.pem()).unwrap();
    std::fs::write(path("key.pem"), key.serialize_pem()).unwrap();
    (path("ca.pem"), path("cert.pem"), path("key.pem"))
}

#[test]
fn private_sandbox_needs_its_token_over_tls_and_sees_a_masked_host() {
    require_world!();
    let w = World::new();
    let (ca, cert, key) = make_certs(&w.dir);
    let sb = Sandbox::start(
        &w,
        &[
            "--ingress",
            "127.0.0.1:18443",
            "--sandbox-id",
            "priv1",
            "--domain",
            DOMAIN,
            "--public-traffic=false",
            "--mask-request-host",
            "localhost:${PORT}",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
        None,
    );
    let tokens = sb.tokens();
    assert_eq!(tokens.len(), 1, "{}", sb.log());
    let token = tokens[0].clone();
    let host = format!("8000-priv1.{DOMAIN}");
    let https = |extra: &str, path: &str| -> (u16, String, String) {
        let out = sh(
            &w,
            &format!(
                "curl -sS --max-time 30 --cacert {ca} --resolve {host}:18443:127.0.0.1 {extra} \
                 -w '\\n%{{http_code}} %{{http_version}}' https://{host}:18443{path}"
            ),
        );
        let (body, tail) = out.rsplit_once('\n').unwrap();
        let (code, version) = tail.split_once(' ').unwrap();
        (code.parse().unwrap(), version.to_string(), body.to_string())
    };
    let (code, _, body) = https("", "/headers");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("missing_traffic_access_token"), "{body}");
    assert!(
        body.contains("Token header 'e2b-traffic-access-token' is missing"),
        "{body}"
    );
    let (code, _, body) = https("-H 'e2b-traffic-access-token: guess'", "/headers");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("invalid_traffic_access_token"), "{body}");
    assert!(
        body.contains("Provided token in header 'e2b-traffic-access-token' is invalid"),
        "{body}"
    );

    let with_token = format!("-H 'e2b-traffic-access-token: {token}'");
    let (code, version, body) = https(&with_token, "/headers");
    assert_eq!((code, version.as_str()), (200, "2"), "ALPN h2: {body}");
    let seen = seen_headers(&body);
    for want in [
        "host: localhost:8000".to_string(),
        format!("x-forwarded-host: {host}:18443"),
        "x-forwarded-proto: https".into(),
        "x-forwarded-for: 127.0.0.1".into(),
    ] {
        assert!(seen.contains(&want), "guest did not see {want}: {seen:?}");
    }
    assert!(
        !body.to_ascii_lowercase().contains("traffic-access-token") && !body.contains(&token),
        "the token reached the guest: {body}"
    );
    let (code, version, _) = https(&format!("--http1.1 {with_token}"), "/headers");
    assert_eq!((code, version.as_str()), (200, "1.1"));

    // SIGUSR1 rotates: the old token stops working at once, the new one works.
    sb.signal(libc::SIGUSR1);
    let until = Instant::now() + Duration::from_secs(10);
    while sb.tokens().len() < 2 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    let tokens = sb.tokens();
    assert_eq!(tokens.len(), 2, "no rotation: {}", sb.log());
    assert_ne!(tokens[0], tokens[1]);
    let (code, _, body) = https(&with_token, "/headers");
    assert_eq!(code, 403);
    assert!(body.contains("invalid_traffic_access_token"), "{body}");
    let (code, _, _) = https(
        &format!("-H 'e2b-traffic-access-token: {}'", tokens[1]),
        "/headers",
    );
    assert_eq!(code, 200);
}

/// A self-signed certificate for the guest's own HTTPS server, made now.
fn guest_certificate(dir: &std::path::Path) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["guest.internal".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    std::fs::write(path("guest-cert.pem"), cert.pem()).unwrap();
    std::fs::write(path("guest-key.pem"), key.serialize_pem()).unwrap();
    (path("guest-cert.pem"), path("guest-key.pem"))
}

#[test]
fn https_ports_reach_a_guest_https_server_with_a_self_signed_certificate() {
    require_world!();
    let w = World::new();
    let (cert, key) = guest_certificate(&w.dir);
    let guest_tls = ["--tls-cert", cert.as_str(), "--tls-key", key.as_str()];
    let sb = Sandbox::start_guest(
        &w,
        &[
            "--ingress",
            "127.0.0.1:18090",
            "--sandbox-id",
            "tls1",
            "--domain",
            DOMAIN,
            "--https-port",
            "8443",
        ],
        &guest_tls,
    );
    let host = format!("8443-tls1.{DOMAIN}:18090");
    // The public side is unchanged: HTTP/1.1 and h2c to the client, TLS to the guest.
    for (flag, version) in [("--http1.1", "1.1"), ("--http2-prior-knowledge", "2")] {
        let (code, got, body) = curl(&w, 18090, &host, flag, "/headers");
        assert_eq!((code, got.as_str()), (200, version), "{body}\n{}", sb.log());
        // SNI is the Host the guest sees, without the port; only http/1.1 was offered.
        assert!(
            body.contains(r#""tls": {"sni": "8443-tls1.slipway.test", "alpn": "http/1.1"}"#),
            "{body}"
        );
        assert!(
            seen_headers(&body).contains(&format!("host: {host}")),
            "{body}"
        );
    }
    // The header form with an IP literal as Host: no SNI at all.
    let (code, _, body) = curl(
        &w,
        18090,
        "127.0.0.1:18090",
        "-H 'E2b-Sandbox-Id: tls1' -H 'E2b-Sandbox-Port: 8443'",
        "/headers",
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""sni": null"#), "{body}");
    // A WebSocket rides the guest's TLS too; plain port 8000 stays plain.
    let ws = client(&w, &format!("ws 127.0.0.1 18090 {host}"));
    assert_eq!(ws.trim(), "ws-ok");
    let (code, _, body) = curl(&w, 18090, &format!("8000-tls1.{DOMAIN}"), "", "/headers");
    assert_eq!(code, 200, "{body}");
    assert!(!body.contains("\"tls\""), "{body}");
    drop(sb);

    // The same guest port without --https-port: plain HTTP to a TLS server, as before.
    let _sb = Sandbox::start_guest(
        &w,
        &[
            "--ingress",
            "127.0.0.1:18091",
            "--sandbox-id",
            "tls2",
            "--domain",
            DOMAIN,
        ],
        &guest_tls,
    );
    let (code, _, body) = curl(&w, 18091, &format!("8443-tls2.{DOMAIN}"), "", "/headers");
    assert_eq!(code, 502, "{body}");
    assert!(
        body.contains("\"error\":\"bad_upstream_response\""),
        "{body}"
    );
}

#[test]
fn https_port_needs_ingress_and_a_real_port() {
    let run = |args: &[&str]| {
        Command::new(common::slipway())
            .arg("run")
            .args(args)
            .args(["--", "true"])
            .output()
            .unwrap()
    };
    let out = run(&["--https-port", "443"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--ingress"),
        "{out:?}"
    );
    for (args, want) in [
        (
            ["--https-port", "0"],
            "invalid --https-port: invalid HTTPS port 0: give a port from 1 to 65535",
        ),
        (
            ["--https-port", "443,443"],
            "invalid --https-port: HTTPS port 443 is given twice",
        ),
    ] {
        let out = run(&[&["--ingress", "127.0.0.1:0"][..], &args[..]].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert_eq!(err.trim(), format!("slipway: {want}"));
    }
}

#[test]
fn hostile_clients_are_cut_off() {
    require_world!();
    let w = World::new();
    let sb = Sandbox::start(
        &w,
        &[
            "--ingress",
            "127.0.0.1:18080",
            "--sandbox-id",
            "hard1",
            "--domain",
            DOMAIN,
            "--ingress-header-timeout",
            "2",
            "--ingress-idle-timeout",
            "4",
        ],
        None,
    );
    let host = format!("8000-hard1.{DOMAIN}");
    // Slowloris: headers a byte at a time are cut at the header timeout.
    let out = client(&w, &format!("slowloris 127.0.0.1 18080 {host}"));
    let secs: f64 = out
        .trim()
        .strip_prefix("closed-after ")
        .unwrap_or_else(|| panic!("{out}"))
        .parse()
        .unwrap();
    assert!((1.5..6.0).contains(&secs), "{out}");
    // Oversized headers: refused, not buffered.
    let out = client(&w, &format!("bighead 127.0.0.1 18080 {host} 200"));
    assert!(
        out.trim() == "status 431" || out.trim() == "closed",
        "{out}"
    );
    // Content-Length with Transfer-Encoding: the chunked framing wins, the
    // smuggled request never becomes a second request, the connection closes.
    let out = client(&w, &format!("smuggle 127.0.0.1 18080 {host}"));
    assert!(out.starts_with("responses 1\n"), "{out}");
    assert!(out.contains("\"body_len\": 0"), "{out}");
    // Two different Content-Lengths: refused before anything reaches the guest.
    let out = client(&w, &format!("double_length 127.0.0.1 18080 {host}"));
    assert!(
        out.trim() == "status 400" || out.trim() == "closed",
        "{out}"
    );
    // Silent connections are closed after the idle timeout.
    let out = client(&w, "idle 127.0.0.1 18080 50 8");
    assert_eq!(out.trim(), "closed 50 of 50 within 8", "{}", sb.log());
    // And the gateway still serves.
    assert_eq!(curl(&w, 18080, &host, "", "/headers").0, 200);
}

#[test]
fn one_client_address_over_its_cap_gets_429_and_another_is_served() {
    require_world!();
    let w = World::new();
    let sb = Sandbox::start(
        &w,
        &[
            "--ingress",
            "127.0.0.1:18080",
            "--sandbox-id",
            "cap1",
            "--domain",
            DOMAIN,
            "--ingress-max-connections-per-client",
            "4",
        ],
        None,
    );
    let out = client(&w, &format!("percap 127.0.0.1 18080 8000-cap1.{DOMAIN} 4"));
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with(r#"over 429 {"code":429,"error":"too_many_client_connections""#)
            && lines[0].contains("Too many connections from 127.0.0.1"),
        "{out}\n{}",
        sb.log()
    );
    assert_eq!(
        lines[1..],
        ["over-html 429 page", "other 200", "freed 200"],
        "{out}"
    );
    assert!(
        sb.log().contains("client over its connection cap"),
        "{}",
        sb.log()
    );
}

#[test]
fn the_per_client_cap_flag_refuses_0_and_text_with_exit_2() {
    for bad in ["0", "many", "-3"] {
        let out = Command::new(common::slipway())
            .args([
                "run",
                "--ingress-max-connections-per-client",
                bad,
                "--",
                "true",
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--ingress-max-connections-per-client"),
            "{bad}: {err}"
        );
    }
}

/// Every byte but letters and digits as %XX, for a query value.
fn pct(raw: &[u8]) -> String {
    raw.iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[test]
fn guest_cookies_stay_on_their_sandbox_host() {
    require_world!();
    let w = World::new();
    let sb = Sandbox::start(
        &w,
        &[
            "--ingress",
            "127.0.0.1:18080",
            "--sandbox-id",
            "cook1",
            "--domain",
            DOMAIN,
        ],
        None,
    );
    let own = format!("8000-cook1.{DOMAIN}");
    // What the guest sets, and what must reach the client.
    let rows: [(&[u8], &str); 6] = [
        (b"parent=1; Domain=slipway.test; Path=/", "parent=1; Path=/"),
        (
            b"dotted=1; Domain=.SLIPWAY.test; Path=/",
            "dotted=1; Path=/",
        ),
        (
            b"other=1; Domain=8000-other.slipway.test; Path=/",
            "other=1; Path=/",
        ),
        (
            b"own=1; Domain=8000-cook1.slipway.test; Path=/; HttpOnly",
            "own=1; Domain=8000-cook1.slipway.test; Path=/; HttpOnly",
        ),
        (b"plain=1; Path=/", "plain=1; Path=/"),
        (b"raw=\xff; Domain=slipway.test", "raw=\u{fffd}"),
    ];
    let query: Vec<String> = rows.iter().map(|(c, _)| format!("c={}", pct(c))).collect();
    let url = format!("http://{own}:18080/set-cookie?{}", query.join("&"));
    let jar = w.dir.join("jar");
    let resolve = |h: &str| format!("--resolve {h}:18080:127.0.0.1");
    for version in ["--http1.1", "--http2-prior-knowledge"] {
        let head = sh(
            &w,
            &format!(
                "curl -sS --fail --max-time 30 {version} {} -c {} -D - -o /dev/null '{url}'",
                resolve(&own),
                jar.display()
            ),
        );
        let got: Vec<&str> = head
            .lines()
            .filter_map(|l| {
                l.trim_end()
                    .split_once(": ")
                    .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
                    .map(|(_, v)| v)
            })
            .collect();
        let want: Vec<&str> = rows.iter().map(|(_, w)| *w).collect();
        assert_eq!(got, want, "{version}\n{head}\n{}", sb.log());
    }
    // With that jar, curl sends the sandbox's cookies back to its own host
    // only: a host that stands for any other sandbox's URL gets none.
    let cookies_at = |host: &str, extra: &str| -> String {
        let body = sh(
            &w,
            &format!(
                "curl -sS --fail --max-time 30 {} -b {} {extra} http://{host}:18080/headers",
                resolve(host),
                jar.display()
            ),
        );
        seen_headers(&body)
            .into_iter()
            .find_map(|h| h.strip_prefix("cookie: ").map(str::to_string))
            .unwrap_or_default()
    };
    let back = cookies_at(&own, "");
    for c in ["parent=1", "dotted=1", "own=1", "plain=1"] {
        assert!(back.contains(c), "{c} did not come back: {back}");
    }
    let elsewhere = cookies_at(
        &format!("sandbox.{DOMAIN}"),
        "-H 'E2b-Sandbox-Id: cook1' -H 'E2b-Sandbox-Port: 8000'",
    );
    assert_eq!(elsewhere, "", "cookies left their sandbox's host");
}

#[test]
fn raw_tcp_forwards_with_and_without_proxy_v2() {
    require_world!();
    let w = World::new();
    let sb = Sandbox::start(
        &w,
        &[
            "--ingress",
            "127.0.0.1:18080",
            "--sandbox-id",
            "fwd1",
            "--forward",
            "tcp:17000:7000:proxy-v2",
            "--forward",
            "tcp:17001:7001",
        ],
        None,
    );
    let out = client(&w, "tcp 127.0.0.1 17000 hello-proxied");
    let mut lines = out.lines();
    let first = lines.next().unwrap_or("");
    assert!(
        first.starts_with("proxy 127.0.0.1:") && first.ends_with(" -> 127.0.0.1:17000"),
        "{out}\n{}",
        sb.log()
    );
    assert_eq!(lines.next(), Some("hello-proxied"));
    let out = client(&w, "tcp 127.0.0.1 17001 hello-plain");
    assert_eq!(out, "hello-plain\n");
}

#[test]
fn transfers_200_mb_byte_exact_through_the_gateway() {
    require_world!();
    let w = World::new();
    let blob = w.dir.join("gw-blob");
    let made = Command::new("sh")
        .args([
            "-c",
            &format!("head -c 200M /dev/urandom > {}", blob.display()),
        ])
        .status()
        .unwrap();
    assert!(made.success());
    let want = common::sha256_file(&blob);
    let _sb = Sandbox::start(
        &w,
        &[
            "--ingress",
            "127.0.0.1:18080",
            "--sandbox-id",
            "big1",
            "--domain",
            DOMAIN,
        ],
        Some(&blob),
    );
    let host = format!("8000-big1.{DOMAIN}");
    let down = sh(
        &w,
        &format!(
            "curl -sS --fail --max-time 120 -H 'Host: {host}' http://127.0.0.1:18080/blob | sha256sum"
        ),
    );
    assert_eq!(
        down.split_whitespace().next(),
        Some(want.as_str()),
        "download"
    );
    let up = sh(
        &w,
        &format!(
            "curl -sS --fail --max-time 120 -H 'Host: {host}' -T {} http://127.0.0.1:18080/upload",
            blob.display()
        ),
    );
    assert_eq!(up.trim(), format!("{want} {}", 200 << 20), "upload");
    // The same both ways over h2c, where the gateway turns HTTP/2 into HTTP/1.1.
    let up = sh(
        &w,
        &format!(
            "curl -sS --fail --max-time 120 --http2-prior-knowledge -H 'Host: {host}' -T {} \
             http://127.0.0.1:18080/upload",
            blob.display()
        ),
    );
    assert_eq!(up.trim(), format!("{want} {}", 200 << 20), "h2c upload");
    let down = sh(
        &w,
        &format!(
            "curl -sS --fail --max-time 120 --http2-prior-knowledge -H 'Host: {host}' \
             http://127.0.0.1:18080/blob | sha256sum"
        ),
    );
    assert_eq!(
        down.split_whitespace().next(),
        Some(want.as_str()),
        "h2c download"
    );
}
