//! `run` and `attach`'s header rules (E2B's `rules`): `--header-rule`,
//! `--secret`, `--upstream-ca`, `--ca-out` become an `inject::Injector`
//! and the policy that carries the rules' keys. A secret's value is read
//! here, from a file or the environment, and never from the command line.

use std::path::PathBuf;

use clap::Args;
use inject::{HeaderRules, Injector, SecretStore, UpstreamTls};
use netstack::EgressPolicy;

use crate::cli::UsageError;
use crate::Failure;

#[derive(Args, Debug, Clone, Default)]
#[command(next_help_heading = "Header injection (E2B's rules)")]
pub struct RuleOpts {
    /// Give HTTPS requests to NAME (api.example.com, or *.example.com) the
    /// header `Header: value`; the value may hold ${e2b.secrets.X}. One header
    /// per flag; repeat the NAME for more. NAME must be allowed by name
    /// (--allow-out NAME with --deny-out ALL_TRAFFIC): slipway then terminates
    /// the guest's TLS with the sandbox's own CA and re-originates it, verified.
    #[arg(long = "header-rule", value_name = "NAME=Header: value")]
    pub header_rule: Vec<String>,
    /// A secret for ${e2b.secrets.NAME}: `NAME=@FILE` (the file stays
    /// unreadable inside `run`'s sandbox) or `NAME=env:VAR` (VAR is removed
    /// from the command's environment). Repeatable.
    #[arg(long = "secret", value_name = "NAME=@FILE|NAME=env:VAR")]
    pub secret: Vec<String>,
    /// PEM bundle of CAs trusted for the servers behind rules, besides
    /// Mozilla's roots (e.g. /etc/ssl/certs/ca-certificates.crt for the
    /// system's). Repeatable.
    #[arg(long = "upstream-ca", value_name = "FILE")]
    pub upstream_ca: Vec<PathBuf>,
    /// Write the sandbox's CA certificate (PEM) to FILE, for the guest to
    /// trust (`run` installs it inside by itself).
    #[arg(long = "ca-out", value_name = "FILE")]
    pub ca_out: Option<PathBuf>,
}

/// Header injection for one sandbox, ready to serve.
pub struct Injection {
    pub injector: Injector,
    /// Secret files, to hide inside `run`'s sandbox.
    pub secret_files: Vec<PathBuf>,
}

impl RuleOpts {
    /// The rules, their secrets and the policy that carries their keys;
    /// `None` when no `--header-rule` is given.
    pub fn setup(
        &self,
        policy: EgressPolicy,
        sandbox: &str,
    ) -> Result<(EgressPolicy, Option<Injection>), Failure> {
        if self.header_rule.is_empty() {
            if !self.secret.is_empty() || !self.upstream_ca.is_empty() || self.ca_out.is_some() {
                return Err(UsageError(
                    "--secret, --upstream-ca and --ca-out need a --header-rule".into(),
                )
                .into());
            }
            return Ok((policy, None));
        }
        let usage = |m: String| Failure::Usage(UsageError(m));
        let rules = HeaderRules::from_flags(&self.header_rule).map_err(|e| usage(e.to_string()))?;
        let secrets = SecretStore::new();
        let mut secret_files = Vec::new();
        for flag in &self.secret {
            if let Some(file) = read_secret(flag, &secrets)? {
                secret_files.push(file);
            }
        }
        rules.check_secrets(|n| secrets.contains(n)).map_err(|e| {
            usage(format!(
                "{e} (give it with --secret {}=@FILE)",
                secret_named(&e)
            ))
        })?;
        rules
            .check_allowed(&policy)
            .map_err(|e| usage(e.to_string()))?;
        let upstream = UpstreamTls::new(&self.upstream_ca)
            .map_err(|e| usage(format!("--upstream-ca: {}", vmm_glue::chain(&e))))?;
        let policy = policy.with_intercepts(rules.keys());
        let injector = Injector::new(sandbox, rules, secrets, upstream)?;
        if let Some(path) = &self.ca_out {
            std::fs::write(path, injector.ca_pem()).map_err(|source| Failure::CaOut {
                path: path.display().to_string(),
                source,
            })?;
        }
        Ok((
            policy,
            Some(Injection {
                injector,
                secret_files,
            }),
        ))
    }
}

fn secret_named(e: &inject::RuleError) -> &str {
    match e {
        inject::RuleError::UnknownSecret { secret, .. } => secret,
        _ => "NAME",
    }
}

/// One `--secret` flag into `store`; the file it was read from, if any.
fn read_secret(flag: &str, store: &SecretStore) -> Result<Option<PathBuf>, Failure> {
    let usage = |m: String| Failure::Usage(UsageError(m));
    // The flag is never echoed whole: a value pasted in by mistake is a secret.
    let Some((name, source)) = flag.split_once('=') else {
        return Err(usage(format!("invalid --secret: {HOW}")));
    };
    if !inject::rules::valid_secret_name(name) {
        let e = inject::SecretError::BadName(inject::rules::echo(name));
        return Err(usage(format!("invalid --secret: {e}")));
    }
    if store.contains(name) {
        return Err(usage(format!("--secret {name} is given twice")));
    }
    let (value, file) =
        secret_source(source).map_err(|why| usage(format!("--secret {name}=…: {why}")))?;
    store.put(name, value).map_err(|e| usage(e.to_string()))?;
    Ok(file)
}

const HOW: &str =
    "write NAME=@FILE or NAME=env:VAR (a secret's value never goes on the command line)";

/// A secret's value from `source`: `@FILE` (read now) or `env:VAR` (taken
/// out of this process's environment, so that a command started later
/// does not inherit it); and the file it came from. The error never shows
/// `source` unless it is a file or a variable's name.
pub fn secret_source(source: &str) -> Result<(Vec<u8>, Option<PathBuf>), String> {
    if let Some(path) = source.strip_prefix('@') {
        let value = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
        let file = std::fs::canonicalize(path).map_err(|e| format!("{path}: {e}"))?;
        Ok((value, Some(file)))
    } else if let Some(var) = source.strip_prefix("env:") {
        let Some(value) = std::env::var_os(var).filter(|_| !var.is_empty()) else {
            return Err(format!("the variable {var} is not set"));
        };
        std::env::remove_var(var);
        Ok((std::os::unix::ffi::OsStringExt::into_vec(value), None))
    } else {
        Err(HOW.to_string())
    }
}
