//! The gateway's own answers when a request cannot reach the guest: a status
//! code, a machine-readable reason, and a message that tells the cases apart.
//! JSON for API clients, a small HTML page for browsers (`Accept: text/html`).
//! Where E2B's gateway has a message for the case, `message` is E2B's words
//! (clients match on them); `error`, `sandboxId` and `port` are slipway's.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::clients::ClientKey;
use crate::target::{BadTarget, GuestPort, SandboxId};
use crate::Body;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    BadTarget(BadTarget),
    UnknownSandbox(SandboxId),
    TokenMissing(SandboxId),
    TokenInvalid(SandboxId),
    /// Over the sandbox's incoming-connection cap, which it names.
    OverCap(SandboxId, usize),
    /// The gateway has no local port left for another connection into the
    /// sandbox: a 503 (the gateway's own shortage), never the guest's 429.
    NoLocalPort(SandboxId, GuestPort),
    /// The client's address has its cap's worth of connections open.
    ClientOverCap(ClientKey),
    PortNotOpen(SandboxId, GuestPort),
    GuestTimedOut(SandboxId, GuestPort),
    /// The guest's server closed or sent something that is not HTTP.
    GuestBroke(SandboxId, GuestPort),
    /// A private sandbox, and the gateway's routes may be stale: it has
    /// lost the cluster store for longer than it trusts its copy.
    RoutesStale(SandboxId),
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::BadTarget(_) => StatusCode::BAD_REQUEST,
            Refusal::TokenMissing(_) | Refusal::TokenInvalid(_) => StatusCode::FORBIDDEN,
            Refusal::OverCap(..) | Refusal::ClientOverCap(_) => StatusCode::TOO_MANY_REQUESTS,
            Refusal::NoLocalPort(..) | Refusal::RoutesStale(_) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::GuestTimedOut(..) => StatusCode::GATEWAY_TIMEOUT,
            Refusal::UnknownSandbox(_) | Refusal::PortNotOpen(..) | Refusal::GuestBroke(..) => {
                StatusCode::BAD_GATEWAY
            }
        }
    }

    /// A stable name for programs.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::BadTarget(_) => "invalid_host",
            Refusal::UnknownSandbox(_) => "sandbox_not_found",
            Refusal::TokenMissing(_) => "missing_traffic_access_token",
            Refusal::TokenInvalid(_) => "invalid_traffic_access_token",
            Refusal::OverCap(..) => "too_many_connections",
            Refusal::ClientOverCap(_) => "too_many_client_connections",
            Refusal::NoLocalPort(..) => "gateway_out_of_ports",
            Refusal::PortNotOpen(..) => "port_not_open",
            Refusal::GuestTimedOut(..) => "sandbox_timed_out",
            Refusal::GuestBroke(..) => "bad_upstream_response",
            Refusal::RoutesStale(_) => "routes_stale",
        }
    }

    /// A sentence for people.
    pub fn message(&self) -> String {
        match self {
            Refusal::BadTarget(e) => e.to_string(),
            // E2B's words, for the cases E2B's gateway has.
            Refusal::UnknownSandbox(_) => "The sandbox was not found".into(),
            Refusal::TokenMissing(_) => "Sandbox is secured with traffic access token. \
                 Token header 'e2b-traffic-access-token' is missing"
                .into(),
            Refusal::TokenInvalid(_) => "Sandbox is secured with traffic access token. \
                 Provided token in header 'e2b-traffic-access-token' is invalid"
                .into(),
            Refusal::OverCap(_, limit) => {
                format!("The sandbox has too many concurrent incoming connections (limit: {limit})")
            }
            Refusal::PortNotOpen(..) => "The sandbox is running but port is not open".into(),
            Refusal::NoLocalPort(id, port) => format!(
                "The gateway ran out of local ports for connections to port {port} \
                 of sandbox {id}; try again when some have closed."
            ),
            Refusal::ClientOverCap(client) => format!(
                "Too many connections from {client} are open at once; \
                 close some and try again."
            ),
            Refusal::GuestTimedOut(id, port) => {
                format!("The sandbox {id} did not answer on port {port} in time.")
            }
            Refusal::GuestBroke(id, port) => format!(
                "The server on port {port} in sandbox {id} closed the connection \
                 or did not answer with HTTP."
            ),
            Refusal::RoutesStale(id) => format!(
                "The gateway has lost its route store; the sandbox {id} does not allow \
                 public traffic and is refused until the store is back."
            ),
        }
    }

    fn ids(&self) -> (Option<&SandboxId>, Option<GuestPort>) {
        match self {
            Refusal::BadTarget(_) | Refusal::ClientOverCap(_) => (None, None),
            Refusal::UnknownSandbox(id)
            | Refusal::TokenMissing(id)
            | Refusal::TokenInvalid(id)
            | Refusal::OverCap(id, _)
            | Refusal::RoutesStale(id) => (Some(id), None),
            Refusal::PortNotOpen(id, p)
            | Refusal::NoLocalPort(id, p)
            | Refusal::GuestTimedOut(id, p)
            | Refusal::GuestBroke(id, p) => (Some(id), Some(*p)),
        }
    }

    pub fn to_json(&self) -> String {
        let mut s = format!(
            "{{\"code\":{},\"error\":\"{}\",\"message\":{}",
            self.status().as_u16(),
            self.reason(),
            json_string(&self.message())
        );
        let (id, port) = self.ids();
        if let Some(id) = id {
            s.push_str(&format!(",\"sandboxId\":\"{id}\""));
        }
        if let Some(port) = port {
            s.push_str(&format!(",\"port\":{port}"));
        }
        s.push_str("}\n");
        s
    }

    pub fn to_html(&self) -> String {
        let status = self.status();
        let title = format!(
            "{} {}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("Error")
        );
        format!(
            "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>\
             <style>body{{font-family:sans-serif;max-width:40em;margin:4em auto;color:#222}}\
             code{{color:#666}}</style></head>\n<body><h1>{title}</h1>\n<p>{}</p>\n\
             <p><code>{}</code></p></body></html>\n",
            html_text(&self.message()),
            html_text(&self.detail())
        )
    }

    /// The reason, and the sandbox and port when there are: E2B's messages
    /// name neither, and a person reading the page wants to know which.
    fn detail(&self) -> String {
        let mut detail = self.reason().to_string();
        let (id, port) = self.ids();
        if let Some(id) = id {
            detail.push_str(&format!(" · sandbox {id}"));
        }
        if let Some(port) = port {
            detail.push_str(&format!(" · port {port}"));
        }
        detail
    }

    /// The whole HTTP/1.1 response as bytes, `Connection: close`, for a
    /// connection the gateway answers without serving it.
    pub fn to_http1(&self, wants_html: bool) -> Vec<u8> {
        let (body, kind) = self.body(wants_html);
        let status = self.status();
        let mut out = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: {kind}\r\ncache-control: no-store\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("Error"),
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(body.as_bytes());
        out
    }

    fn body(&self, wants_html: bool) -> (String, &'static str) {
        if wants_html {
            (self.to_html(), "text/html; charset=utf-8")
        } else {
            (self.to_json(), "application/json")
        }
    }

    /// The response, in the form the client asked for.
    pub fn into_response(self, wants_html: bool) -> Response<Body> {
        let (body, kind) = self.body(wants_html);
        let mut resp = Response::new(
            Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed(),
        );
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        resp
    }
}

/// Browsers say `Accept: text/html`; API clients and tools do not.
pub fn wants_html(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("text/html"))
}

/// `wants_html` over a raw HTTP/1.1 request head (or as much of it as came):
/// any `Accept` line naming `text/html`. Bytes, any length; never panics.
pub fn head_wants_html(head: &[u8]) -> bool {
    const ACCEPT: &[u8] = b"accept:";
    const HTML: &[u8] = b"text/html";
    head.split(|&b| b == b'\n').any(|line| {
        line.len() >= ACCEPT.len()
            && line[..ACCEPT.len()].eq_ignore_ascii_case(ACCEPT)
            && line[ACCEPT.len()..]
                .windows(HTML.len())
                .any(|w| w.eq_ignore_ascii_case(HTML))
    })
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn html_text(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> SandboxId {
        SandboxId::parse("abc").unwrap()
    }

    #[test]
    fn the_status_table() {
        let port = GuestPort::new(80).unwrap();
        let rows = [
            (Refusal::BadTarget(BadTarget::NoHost), 400),
            (Refusal::TokenMissing(id()), 403),
            (Refusal::TokenInvalid(id()), 403),
            (Refusal::OverCap(id(), 3), 429),
            (
                Refusal::ClientOverCap(ClientKey::of([192, 0, 2, 1].into())),
                429,
            ),
            (Refusal::UnknownSandbox(id()), 502),
            (Refusal::PortNotOpen(id(), port), 502),
            (Refusal::GuestTimedOut(id(), port), 504),
            (Refusal::NoLocalPort(id(), port), 503),
            (Refusal::RoutesStale(id()), 503),
        ];
        for (r, code) in rows {
            assert_eq!(r.status().as_u16(), code, "{r:?}");
        }
    }

    /// E2B's gateway words, exactly: clients written for E2B match on them.
    #[test]
    fn messages_are_e2bs_where_e2b_has_one() {
        let port = GuestPort::new(3000).unwrap();
        let rows = [
            (
                Refusal::UnknownSandbox(id()),
                "sandbox_not_found",
                "The sandbox was not found",
            ),
            (
                Refusal::PortNotOpen(id(), port),
                "port_not_open",
                "The sandbox is running but port is not open",
            ),
            (
                Refusal::TokenMissing(id()),
                "missing_traffic_access_token",
                "Sandbox is secured with traffic access token. \
                 Token header 'e2b-traffic-access-token' is missing",
            ),
            (
                Refusal::TokenInvalid(id()),
                "invalid_traffic_access_token",
                "Sandbox is secured with traffic access token. \
                 Provided token in header 'e2b-traffic-access-token' is invalid",
            ),
            (
                Refusal::OverCap(id(), 3),
                "too_many_connections",
                "The sandbox has too many concurrent incoming connections (limit: 3)",
            ),
        ];
        for (r, reason, message) in rows {
            assert_eq!((r.reason(), r.message().as_str()), (reason, message));
            // The JSON keeps slipway's code and the sandbox beside E2B's words.
            let j = r.to_json();
            assert!(j.contains(&format!("\"error\":\"{reason}\"")), "{j}");
            assert!(j.contains(&format!("\"message\":\"{message}\"")), "{j}");
            assert!(j.contains("\"sandboxId\":\"abc\""), "{j}");
        }
        // A browser's page still says which sandbox and port.
        let page = Refusal::PortNotOpen(id(), port).to_html();
        assert!(
            page.contains("port_not_open · sandbox abc · port 3000"),
            "{page}"
        );
    }

    #[test]
    fn json_carries_reason_sandbox_and_port() {
        let j = Refusal::PortNotOpen(id(), GuestPort::new(3000).unwrap()).to_json();
        assert!(
            j.starts_with("{\"code\":502,\"error\":\"port_not_open\""),
            "{j}"
        );
        assert!(
            j.contains("\"sandboxId\":\"abc\"") && j.contains("\"port\":3000"),
            "{j}"
        );
    }

    #[test]
    fn hostile_input_is_escaped_in_json_and_html() {
        let r = Refusal::BadTarget(BadTarget::MalformedHost("<script>\"x\\".into()));
        let j = r.to_json();
        assert!(j.contains(r#"\"<script>\\\"x\\\\\""#), "{j}");
        let h = r.to_html();
        assert!(
            !h.contains("<script>") && h.contains("&lt;script&gt;"),
            "{h}"
        );
    }

    #[test]
    fn a_connection_answered_without_hyper_gets_a_whole_response() {
        let r = Refusal::ClientOverCap(ClientKey::of([192, 0, 2, 1].into()));
        let bytes = r.to_http1(false);
        let text = String::from_utf8(bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 429 Too Many Requests\r\n"),
            "{head}"
        );
        assert!(head.contains("connection: close"), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        assert!(
            body.contains("\"error\":\"too_many_client_connections\""),
            "{body}"
        );
        assert!(body.contains("192.0.2.1"), "{body}");
        let page = String::from_utf8(r.to_http1(true)).unwrap();
        assert!(page.contains("content-type: text/html"), "{page}");
    }

    #[test]
    fn raw_heads_asking_for_html_are_seen() {
        let rows: [(&[u8], bool); 7] = [
            (
                b"GET / HTTP/1.1\r\nHost: x\r\nAccept: text/html,*/*\r\n\r\n",
                true,
            ),
            (b"GET / HTTP/1.1\r\nACCEPT:TEXT/HTML\r\n", true),
            (b"GET / HTTP/1.1\r\nAccept: application/json\r\n\r\n", false),
            (b"GET / HTTP/1.1\r\nX-Accept: text/html\r\n\r\n", false),
            (b"GET /text/html HTTP/1.1\r\n\r\n", false),
            (b"\xff\xfe\naccept:\xfftext/htm", false),
            (b"", false),
        ];
        for (head, want) in rows {
            assert_eq!(
                head_wants_html(head),
                want,
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn browsers_get_html() {
        let mut h = http::HeaderMap::new();
        assert!(!wants_html(&h));
        h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        assert!(!wants_html(&h));
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/html,application/xhtml+xml;q=0.9"),
        );
        assert!(wants_html(&h));
    }
}
