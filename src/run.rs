//! `slipway run -- CMD`: the command in a fresh user and network namespace
//! whose only link is a tap served by this process's stack; its exit status
//! is slipway's.

use netstack::driver::Driver;
use netstack::Stack;
use vmm_glue::netns::{self, GuestNetConfig};

use crate::cli::{IngressOpts, NetOpts};
use crate::rules::RuleOpts;
use crate::{build, confine, init_logging, prepare_ingress, public_url, runtime, Failure};

/// Variables that point TLS clients at the sandbox's bundle (OpenSSL and
/// what reads its variable, Python's requests, Node's extra CAs).
const CA_VARIABLES: [&str; 3] = ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"];

pub fn run(
    net: &NetOpts,
    ingress: &IngressOpts,
    rules: &RuleOpts,
    confined: bool,
    command: &[std::ffi::OsString],
) -> Result<u8, Failure> {
    let (cfg, policy) = build(net, ingress)?;
    let egress_proxy = net.egress_proxy(&policy)?;
    // The command must not learn the proxy's password: it would inherit the
    // variable that may hold it. No thread exists yet.
    std::env::remove_var(crate::cli::PROXY_PASSWORD_ENV);
    let sandbox = ingress.sandbox_id.as_deref().unwrap_or("run");
    let (policy, injection) = rules.setup(policy, sandbox)?;
    let ingress = prepare_ingress(ingress)?;
    init_logging(net, "warn");
    let plan = &cfg.plan;
    let guest = GuestNetConfig {
        tap_name: "tap0".into(),
        mtu: cfg.mtu as u32,
        mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
        ipv4: plan.guest_v4,
        ipv4_prefix: plan.prefix_v4,
        gateway_v4: plan.gateway_v4,
        ipv6: Some((plan.guest_v6, plan.prefix_v6)),
        gateway_v6: plan.gateway_v6_link_local,
        nameservers: vec![plan.dns_v4.into(), plan.dns_v6.into()],
        vnet_hdr: net.offload,
        ca_bundle: injection.as_ref().map(|i| ca_bundle(i.injector.ca_pem())),
        hidden_files: injection
            .as_ref()
            .map_or_else(Vec::new, |i| i.secret_files.clone()),
    };
    if injection.is_some() {
        // Still one thread: the command inherits these at its exec.
        for var in CA_VARIABLES {
            std::env::set_var(var, netns::CA_BUNDLE);
        }
    }
    // Fork before any thread exists: the runtime comes after.
    let netns::Sandboxed { pid, tap, gate } = netns::spawn(&guest, command)?;
    let tap = vmm_glue::transport::offload(tap, net.offload_mtu());
    // Set-up is over and no thread runs yet: confine before the runtime.
    if confined {
        let plan = confine::modes::run();
        confine::begin(&plan).and_then(|()| confine::finish(&plan))?;
    }
    let rt = runtime()?;
    let code = rt.block_on(async move {
        let stack = Stack::new(cfg, policy, std::time::Instant::now());
        let mut driver = Driver::new(stack, tap).map_err(Failure::ServeTap)?;
        driver.set_egress_proxy(egress_proxy);
        if let Some(i) = &injection {
            driver.set_interceptor(i.injector.interceptor());
        }
        if let Some((plan, listeners)) = ingress {
            public_url::start(plan, listeners, driver.handle())?;
        }
        let child = tokio::task::spawn_blocking(move || netns::wait(pid));
        forward_signals(pid);
        if let Err(e) = gate.release() {
            // The sandbox process exits on its own (127 or 126); report it like a shell would.
            eprintln!("slipway: {e}");
            let _ = child.await;
            return Ok(e.exit_code().clamp(0, 255) as u8);
        }
        let mut code = None;
        let served = driver
            .run(async {
                code = Some(child.await);
            })
            .await;
        if let Err(e) = served {
            // The link failed: the sandbox has no network any more; end it.
            vmm_glue::sys::kill(pid, libc::SIGKILL);
            return Err(Failure::LinkFailed(e));
        }
        match code {
            Some(Ok(Ok(c))) => Ok(c.clamp(0, 255) as u8),
            Some(Ok(Err(e))) => Err(Failure::Wait(e)),
            _ => Err(Failure::LostStatus),
        }
    });
    code
}

/// The host's CA bundle (when it has one) plus the sandbox's CA, for the
/// command's TLS clients to trust both.
fn ca_bundle(sandbox_ca: &str) -> Vec<u8> {
    let mut bundle = std::fs::read(netns::CA_BUNDLE).unwrap_or_default();
    if !bundle.is_empty() && !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    bundle.extend_from_slice(b"# slipway: this sandbox's CA (header rules)\n");
    bundle.extend_from_slice(sandbox_ca.as_bytes());
    bundle
}

/// SIGTERM, SIGINT and SIGHUP to slipway go on to the command.
fn forward_signals(pid: libc::pid_t) {
    use tokio::signal::unix::{signal, SignalKind};
    for kind in [
        SignalKind::terminate(),
        SignalKind::interrupt(),
        SignalKind::hangup(),
    ] {
        let Ok(mut sig) = signal(kind) else { continue };
        tokio::spawn(async move {
            while sig.recv().await.is_some() {
                vmm_glue::sys::kill(pid, kind.as_raw_value());
            }
        });
    }
}
