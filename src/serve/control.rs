//! The control API: HTTP/1.1 and JSON on a unix socket, one route table.
//! With `control.token` set every request needs `Authorization: Bearer …`.
//! The caller's pid (SO_PEERCRED) goes with each request, for `tapFd`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use ingress::SandboxId;
use tokio::net::UnixListener;

use vmm_glue::tap::TapError;
use vmm_glue::{TransportError, TransportSpec};

use super::api::{self, ApiError};
use super::registry::RegistryError;
use super::{clustered, Shared};

/// Largest request body taken.
const MAX_BODY: usize = 1 << 20;

type Reply = Response<Full<Bytes>>;

/// Accept and serve control connections until the task is dropped.
pub async fn serve(listener: UnixListener, shared: Arc<Shared>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "control socket: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let caller = stream.peer_cred().ok().and_then(|c| c.pid());
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, caller, req).await) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "control connection ended");
            }
        });
    }
}

async fn handle(shared: &Shared, caller: Option<i32>, req: Request<Incoming>) -> Reply {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let reply = match route(shared, caller, req).await {
        Ok(reply) => reply,
        Err(e) => error(&e),
    };
    tracing::debug!(target: "slipway::control", %method, %path, status = reply.status().as_u16(), "request");
    reply
}

async fn route(
    shared: &Shared,
    caller: Option<i32>,
    req: Request<Incoming>,
) -> Result<Reply, ApiError> {
    authorize(shared, &req)?;
    let segments: Vec<String> = req
        .uri()
        .path()
        .trim_matches('/')
        .split('/')
        .map(str::to_string)
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let method = req.method().clone();
    let registry = &shared.registry;
    match (&method, segments.as_slice()) {
        (&Method::GET, ["health"]) => Ok(json(
            StatusCode::OK,
            &serde_json::json!({"status": "ok", "sandboxes": registry.len()}),
        )),
        (&Method::GET, ["sandboxes"]) => Ok(json(StatusCode::OK, &registry.list())),
        (&Method::POST, ["sandboxes"]) => {
            let body = body(req).await?;
            let settings = shared.settings();
            let create = api::parse_create(&body, &settings.sandbox.allow_internal)?;
            let view = registry.create(create, caller, &settings.sandbox)?;
            let view = clustered::claim_created(shared, view).await?;
            Ok(json(StatusCode::CREATED, &view))
        }
        (&Method::GET, ["sandboxes", id]) => {
            let view = registry.describe(&sandbox_id(id)?).await?;
            Ok(json(StatusCode::OK, &view))
        }
        (&Method::DELETE, ["sandboxes", id]) => {
            let id = sandbox_id(id)?;
            registry.delete(&id).await?;
            clustered::release_deleted(shared, &id).await;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        (&Method::PUT, ["sandboxes", id, "network"]) => {
            let id = sandbox_id(id)?;
            registry.get(&id)?;
            let body = body(req).await?;
            let settings = shared.settings();
            let update = api::parse_network_update(&body, &settings.sandbox.allow_internal)?;
            registry.set_network(&id, update)?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        (&Method::GET, ["sandboxes", id, "ca.pem"]) => {
            let pem = registry.ca_pem(&sandbox_id(id)?)?;
            let mut reply = Response::new(Full::new(Bytes::from(pem)));
            reply.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/x-pem-file"),
            );
            Ok(reply)
        }
        // Secrets are write-only: no answer ever holds a value.
        (&Method::GET, ["secrets"]) => Ok(json(
            StatusCode::OK,
            &serde_json::json!({"secrets": registry.secret_names()}),
        )),
        (&Method::PUT, ["secrets", name]) => {
            // The raw body is the value (a trailing newline is dropped).
            let value = body(req).await?;
            let copy = value.to_vec();
            if let Ok(mut buf) = value.try_into_mut() {
                // The store wipes its copy when done; wipe this one now.
                buf.as_mut().fill(0);
            }
            registry.put_secret(name, copy)?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        (&Method::DELETE, ["secrets", name]) => {
            registry.delete_secret(name)?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        (&Method::POST, ["sandboxes", id, "token"]) => {
            let id = sandbox_id(id)?;
            let token = clustered::rotate_token(shared, &id).await?;
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({"sandboxID": id.as_str(), "trafficAccessToken": token}),
            ))
        }
        (
            _,
            ["health"]
            | ["sandboxes"]
            | ["sandboxes", _]
            | ["sandboxes", _, "network" | "token" | "ca.pem"]
            | ["secrets"]
            | ["secrets", _],
        ) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {}", req.uri().path()),
        )),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no such endpoint: {method} {}", req.uri().path()),
        )),
    }
}

fn authorize(shared: &Shared, req: &Request<Incoming>) -> Result<(), ApiError> {
    let Some(expected) = shared.settings().control.token else {
        return Ok(());
    };
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(token) if expected.matches(token.trim().as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "the bearer token is wrong",
        )),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this API needs a bearer token (Authorization: Bearer …)",
        )),
    }
}

fn sandbox_id(raw: &str) -> Result<SandboxId, ApiError> {
    SandboxId::parse(raw).map_err(|_| {
        ApiError::bad(
            "sandboxID",
            format!("invalid sandboxID {raw:?}: give 1 to 57 of a-z, 0-9 and inner '-'"),
        )
    })
}

async fn body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is over {MAX_BODY} bytes"),
        )),
        Err(e) => Err(ApiError::bad(
            "body",
            format!("cannot read the request body: {e}"),
        )),
    }
}

/// The one place registry outcomes become HTTP: 404 for a sandbox that is
/// not there, 409 for a clash with one that is, 429 at the sandbox limit,
/// 503 while draining, 400 for a transport the request got wrong and 500
/// (or 409 for a busy tap) for the host's own troubles.
impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let (status, field) = match &e {
            RegistryError::Draining => (StatusCode::SERVICE_UNAVAILABLE, None),
            RegistryError::NotFound(_) => (StatusCode::NOT_FOUND, None),
            RegistryError::Exists(_) => (StatusCode::CONFLICT, Some("sandboxID")),
            RegistryError::Full(_) => (StatusCode::TOO_MANY_REQUESTS, None),
            RegistryError::SocketTaken { .. } => (StatusCode::CONFLICT, Some("transport")),
            RegistryError::Fenced { spec, .. } => (StatusCode::BAD_REQUEST, Some(field_of(spec))),
            RegistryError::Transport { spec, source } => {
                (transport_status(source), Some(field_of(spec)))
            }
            RegistryError::Random(_) => (StatusCode::INTERNAL_SERVER_ERROR, None),
            RegistryError::NotRunning { .. } | RegistryError::NoToken(_) => {
                (StatusCode::CONFLICT, None)
            }
            RegistryError::Rules(_) => (StatusCode::BAD_REQUEST, Some("network.rules")),
            RegistryError::Secret(_) => (StatusCode::BAD_REQUEST, Some("secret")),
            RegistryError::NoSecret(_) => (StatusCode::NOT_FOUND, None),
            RegistryError::SecretInUse { .. } => (StatusCode::CONFLICT, None),
            RegistryError::Ca { .. } => (StatusCode::INTERNAL_SERVER_ERROR, None),
        };
        ApiError {
            status,
            message: vmm_glue::chain(&e),
            field,
        }
    }
}

/// The request field a transport came from.
fn field_of(spec: &TransportSpec) -> &'static str {
    match spec {
        TransportSpec::Tap(_) => "transport.tap",
        TransportSpec::TapFd(_) => "transport.tapFd",
        TransportSpec::QemuStream { .. } => "transport.qemuStream",
        TransportSpec::QemuDgram { .. } => "transport.qemuDgram",
        TransportSpec::VhostUser { .. } => "transport.vhostUser",
    }
}

fn transport_status(e: &TransportError) -> StatusCode {
    // The host's own troubles are the operator's (500); the rest is the request's.
    match e {
        TransportError::Tap(
            TapError::NoTunDevice(_)
            | TapError::TunPermission(_)
            | TapError::OpenTun(_)
            | TapError::NotPermitted { .. }
            | TapError::SetIff { .. }
            | TapError::Configure { .. },
        ) => StatusCode::INTERNAL_SERVER_ERROR,
        TransportError::Tap(TapError::Busy { .. }) => StatusCode::CONFLICT,
        _ => StatusCode::BAD_REQUEST,
    }
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Reply {
    let mut text = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    text.push(b'\n');
    let mut reply = Response::new(Full::new(Bytes::from(text)));
    *reply.status_mut() = status;
    reply
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    reply
}

fn empty(status: StatusCode) -> Reply {
    let mut reply = Response::new(Full::new(Bytes::new()));
    *reply.status_mut() = status;
    reply
}

fn error(e: &ApiError) -> Reply {
    let mut reply = json(e.status, &e.body());
    if e.status == StatusCode::UNAUTHORIZED {
        reply
            .headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SandboxId {
        SandboxId::parse(s).unwrap()
    }

    /// Each registry outcome, as the API answers it: status, field, message.
    #[test]
    fn registry_errors_become_statuses_here_alone() {
        let dgram = TransportSpec::QemuDgram {
            path: "/run/a.sock".into(),
            peer: None,
        };
        let rows: Vec<(RegistryError, u16, Option<&str>, &str)> = vec![
            (
                RegistryError::Draining,
                503,
                None,
                "slipway is shutting down",
            ),
            (
                RegistryError::NotFound(id("a")),
                404,
                None,
                "sandbox a not found",
            ),
            (
                RegistryError::Exists(id("a")),
                409,
                Some("sandboxID"),
                "sandbox a already exists",
            ),
            (
                RegistryError::Full(3),
                429,
                None,
                "this slipway serves its limit of 3 sandboxes (sandbox.max_sandboxes)",
            ),
            (
                RegistryError::SocketTaken {
                    path: "/run/a.sock".into(),
                    owner: id("b"),
                },
                409,
                Some("transport"),
                "/run/a.sock is sandbox b's socket",
            ),
            (
                RegistryError::Fenced {
                    spec: dgram.clone(),
                    why: "outside confine.socket_dirs".into(),
                },
                400,
                Some("transport.qemuDgram"),
                "outside confine.socket_dirs",
            ),
            (
                RegistryError::Transport {
                    spec: dgram,
                    source: TransportError::Bind {
                        path: "/run/a.sock".into(),
                        source: std::io::Error::from_raw_os_error(libc::EACCES),
                    },
                },
                400,
                Some("transport.qemuDgram"),
                "cannot bind /run/a.sock: Permission denied (os error 13)",
            ),
            (
                RegistryError::Transport {
                    spec: TransportSpec::Tap("tap0".into()),
                    source: TransportError::Tap(TapError::OpenTun(
                        std::io::Error::from_raw_os_error(libc::EIO),
                    )),
                },
                500,
                Some("transport.tap"),
                "cannot open /dev/net/tun: Input/output error (os error 5)",
            ),
            (
                RegistryError::Transport {
                    spec: TransportSpec::TapFd(5),
                    source: TransportError::NoCaller,
                },
                400,
                Some("transport.tapFd"),
                "tapFd needs a caller whose pid slipway can see (SO_PEERCRED)",
            ),
            (
                RegistryError::NotRunning {
                    id: id("a"),
                    state: "stopped".into(),
                },
                409,
                None,
                "sandbox a's network is not running (stopped): delete it",
            ),
            (
                RegistryError::NoToken(id("a")),
                409,
                None,
                "sandbox a allows public traffic: it has no traffic access token",
            ),
        ];
        for (e, status, field, message) in rows {
            let api = ApiError::from(e);
            assert_eq!(
                (api.status.as_u16(), api.field, api.message.as_str()),
                (status, field, message)
            );
        }
    }
}
