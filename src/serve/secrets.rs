//! What serve's header rules rest on, made once at start (before
//! confinement, which fences the files off): the secrets of the `[secrets]`
//! section and the upstream trust (`sandbox.upstream_ca`). The control
//! API's `/secrets` changes the store afterwards; nothing here ever shows
//! a value.

use inject::{SecretStore, UpstreamTls};

use super::settings::Settings;

/// Every sandbox's header rules share these.
#[derive(Clone, Debug)]
pub struct InjectBase {
    pub secrets: SecretStore,
    pub upstream: UpstreamTls,
}

impl InjectBase {
    /// Read the configured secrets and CA bundles; the error names the key.
    pub fn load(settings: &Settings) -> Result<InjectBase, String> {
        let secrets = SecretStore::new();
        for (name, source) in &settings.file.secrets {
            let (value, _) = crate::rules::secret_source(source)
                .map_err(|why| format!("invalid secrets.{name}: {why}"))?;
            secrets
                .put(name, value)
                .map_err(|e| format!("invalid secrets.{name}: {e}"))?;
        }
        let upstream = UpstreamTls::new(&settings.file.sandbox.upstream_ca)
            .map_err(|e| format!("invalid sandbox.upstream_ca: {}", vmm_glue::chain(&e)))?;
        Ok(InjectBase { secrets, upstream })
    }
}
