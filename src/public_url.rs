//! The public URL gateway for `run` and `attach`: one sandbox in the
//! directory, reached through its driver; the listeners are bound before
//! the sandbox starts so that a taken port is a clear error up front.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use ingress::{Directory, Forward, ForwardSpec, Gateway, Route};
use netstack::driver::DriverHandle;

use crate::cli::IngressPlan;
use crate::door::StackDoor;

/// Why the public URL gateway could not start; each names the address.
#[derive(Debug, thiserror::Error)]
pub enum PublicUrlError {
    #[error("cannot listen on {addr} for {what}")]
    Listen {
        addr: SocketAddr,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Route(#[from] ingress::token::NoRandomness),
    #[error("cannot serve a bound listener")]
    Serve(#[source] std::io::Error),
}

/// Sockets bound before the sandbox starts.
pub struct Listeners {
    http: Option<std::net::TcpListener>,
    forwards: Vec<(std::net::TcpListener, ForwardSpec)>,
}

/// A non-blocking TCP listener on `addr`, for `what` (named in the error).
pub fn listen(
    addr: SocketAddr,
    what: &'static str,
) -> Result<std::net::TcpListener, PublicUrlError> {
    let failed = |source| PublicUrlError::Listen { addr, what, source };
    let l = std::net::TcpListener::bind(addr).map_err(failed)?;
    l.set_nonblocking(true).map_err(failed)?;
    Ok(l)
}

pub fn bind(plan: &IngressPlan) -> Result<Listeners, PublicUrlError> {
    let http = match plan.addr {
        Some(addr) => Some(listen(addr, "--ingress")?),
        None => None,
    };
    let ip = plan
        .addr
        .map(|a| a.ip())
        .unwrap_or(Ipv4Addr::LOCALHOST.into());
    let forwards = plan
        .forwards
        .iter()
        .map(|f| {
            let addr = SocketAddr::new(ip, f.host_port);
            Ok((listen(addr, "--forward")?, f.clone()))
        })
        .collect::<Result<Vec<_>, PublicUrlError>>()?;
    Ok(Listeners { http, forwards })
}

/// Put the sandbox in a directory and serve it. Call inside the runtime.
pub fn start(
    plan: IngressPlan,
    listeners: Listeners,
    handle: DriverHandle,
) -> Result<(), PublicUrlError> {
    let directory = Arc::new(Directory::new());
    let door = StackDoor::new(handle, Arc::default());
    let (route, token) = Route::new(Arc::new(door), plan.route)?;
    let route = directory.insert(plan.sandbox.clone(), route);
    let domain = plan.gateway.domain.to_string();
    let gateway = Gateway::new(plan.gateway, directory);
    let id = &plan.sandbox;
    eprintln!("slipway: sandbox id: {id}");
    if let Some(l) = listeners.http {
        let addr = l.local_addr().map_err(PublicUrlError::Serve)?;
        let scheme = if gateway.is_tls() { "https" } else { "http" };
        eprintln!(
            "slipway: public URLs: {scheme}://<port>-{id}.{domain}:{} (gateway on {addr})",
            addr.port()
        );
        let l = tokio::net::TcpListener::from_std(l).map_err(PublicUrlError::Serve)?;
        tokio::spawn(gateway.clone().serve(l));
    }
    for (l, spec) in listeners.forwards {
        let addr = l.local_addr().map_err(PublicUrlError::Serve)?;
        eprintln!(
            "slipway: forwarding tcp {addr} to guest port {}{}",
            spec.guest_port,
            if spec.proxy_v2 { " (PROXY v2)" } else { "" }
        );
        let l = tokio::net::TcpListener::from_std(l).map_err(PublicUrlError::Serve)?;
        let forward = Forward {
            sandbox: plan.sandbox.clone(),
            spec,
        };
        tokio::spawn(gateway.clone().serve_forward(l, forward));
    }
    if let Some(token) = token {
        eprintln!("slipway: traffic access token: {}", token.as_str());
        rotate_on_sigusr1(route);
    }
    Ok(())
}

/// SIGUSR1 rotates the traffic access token; the new one is printed like the first.
fn rotate_on_sigusr1(route: Arc<Route>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut sig) = signal(SignalKind::user_defined1()) else {
        return;
    };
    tokio::spawn(async move {
        while sig.recv().await.is_some() {
            match route.rotate_token() {
                Ok(Some(token)) => eprintln!("slipway: traffic access token: {}", token.as_str()),
                Ok(None) => {}
                Err(e) => eprintln!("slipway: {e}"),
            }
        }
    });
}
