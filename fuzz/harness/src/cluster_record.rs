//! What `slipway edge` reads from the cluster store, and the target a node
//! reads from an edge's CONNECT: `ingress::record`'s parsers on hostile
//! bytes. The input is `key NUL value NUL authority`. Besides "no panic":
//! a key that parses is exactly the key of the id it names; a value that
//! parses is within the size bound and survives its own JSON (same node,
//! address, mask and token digest); error messages stay short and
//! printable; a tunnel target that parses is exactly `<id>:<port>`.

use ingress::record::{
    parse_sandbox_key, parse_tunnel_target, sandbox_key, SandboxRecord, MAX_RECORD_BYTES,
};

pub fn run(data: &[u8]) {
    let mut parts = data.splitn(3, |&b| b == 0);
    let key = parts.next().unwrap_or_default();
    let value = parts.next().unwrap_or_default();
    let authority = parts.next().unwrap_or_default();

    match parse_sandbox_key(key) {
        Ok(id) => assert_eq!(sandbox_key(&id).as_bytes(), key),
        Err(e) => printable(&e.to_string()),
    }

    match SandboxRecord::parse(value) {
        Ok(rec) => {
            assert!(value.len() <= MAX_RECORD_BYTES);
            let json = rec.to_json();
            let back = SandboxRecord::parse(json.as_bytes())
                .unwrap_or_else(|e| panic!("{json} does not parse back: {e}"));
            assert!(back.same_way(&rec), "{json}");
            match (&back.token_digest, &rec.token_digest) {
                (None, None) => {}
                (Some(a), Some(b)) => assert!(a.same_as(b), "{json}"),
                _ => panic!("publicness changed: {json}"),
            }
        }
        Err(e) => printable(&e.to_string()),
    }

    if let Ok(s) = std::str::from_utf8(authority) {
        if let Some((id, port)) = parse_tunnel_target(s) {
            assert_eq!(format!("{id}:{port}"), s);
        }
    }
}

fn printable(message: &str) {
    assert!(message.len() < 400, "{message}");
    assert!(!message.chars().any(char::is_control), "{message:?}");
}
