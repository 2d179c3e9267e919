//! serve's hooks into the cluster store, when `[cluster]` is set: a create
//! claims its id cluster-wide (and is undone when that fails: 409 when
//! another node holds the id, 503 when the store cannot be reached); a
//! token rotation goes through the store before it takes effect here; a
//! delete takes the record out. Without `[cluster]` each is the plain local
//! operation.

use hyper::StatusCode;
use ingress::{AccessToken, SandboxId};

use super::api::{self, ApiError};
use super::registry::RegistryError;
use super::view::SandboxView;
use super::Shared;
use crate::cluster::node::ClusterError;

/// After a local create: claim the id, or undo the create.
pub async fn claim_created(shared: &Shared, view: SandboxView) -> api::Result<SandboxView> {
    let Some(node) = shared.cluster.get() else {
        return Ok(view);
    };
    let id = SandboxId::parse(&view.sandbox_id)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let route = shared.registry.get(&id)?.route().clone();
    let record = node.record(
        route.token_digest(),
        route.mask().cloned(),
        route.https_ports(),
    );
    match node.claim(&id, record).await {
        Ok(()) => Ok(view),
        Err(e) => {
            // Nothing is left behind: the sandbox goes, its tap with it.
            let _ = shared.registry.delete(&id).await;
            tracing::info!(target: "slipway::cluster", sandbox = %id, error = %vmm_glue::chain(&e),
                "create undone: the id could not be claimed cluster-wide");
            Err(from_cluster(e))
        }
    }
}

/// A new token: its digest goes to the store first, then it replaces the
/// old one here (where the tunnels check it), then it is shown.
pub async fn rotate_token(shared: &Shared, id: &SandboxId) -> api::Result<String> {
    let Some(node) = shared.cluster.get() else {
        return Ok(shared.registry.rotate_token(id)?);
    };
    let route = shared.registry.get(id)?.route().clone();
    if route.is_public() {
        return Err(RegistryError::NoToken(id.clone()).into());
    }
    let fresh = AccessToken::generate().map_err(RegistryError::Random)?;
    let record = node.record(
        Some(fresh.digest()),
        route.mask().cloned(),
        route.https_ports(),
    );
    node.update(id, record).await.map_err(from_cluster)?;
    route.install_token(&fresh);
    tracing::info!(sandbox = %id, "traffic access token rotated");
    Ok(fresh.as_str().to_string())
}

/// After a local delete: take the record out of the store (later, if the
/// store cannot be reached now).
pub async fn release_deleted(shared: &Shared, id: &SandboxId) {
    if let Some(node) = shared.cluster.get() {
        node.release(id).await;
    }
}

fn from_cluster(e: ClusterError) -> ApiError {
    let (status, field) = match &e {
        ClusterError::Taken { .. } => (StatusCode::CONFLICT, Some("sandboxID")),
        ClusterError::Unreachable(_) | ClusterError::Leaving => {
            (StatusCode::SERVICE_UNAVAILABLE, None)
        }
    };
    ApiError {
        status,
        message: vmm_glue::chain(&e),
        field,
    }
}
