//! `slipway attach`: one sandbox served over one VMM's link, from its flags;
//! the sandbox outlives its VMM (vmm_glue::transport::serve).

use std::path::PathBuf;

use netstack::driver::Parked;
use netstack::Stack;
use vmm_glue::transport::{FdOwner, OpenOptions};
use vmm_glue::TransportError;

use crate::cli::{AttachLink, IngressOpts, NetOpts, UsageError};
use crate::rules::RuleOpts;
use crate::{build, confine, prepare_ingress, public_url, runtime, Failure};

pub fn attach(
    net: &NetOpts,
    ingress: &IngressOpts,
    rules: &RuleOpts,
    confined: Option<confine::Plan>,
    (link, connect, peer): (AttachLink, bool, Option<PathBuf>),
) -> Result<u8, Failure> {
    let (cfg, policy) = build(net, ingress)?;
    let egress_proxy = net.egress_proxy(&policy)?;
    let sandbox = ingress.sandbox_id.as_deref().unwrap_or("attach");
    let (policy, injection) = rules.setup(policy, sandbox)?;
    let ingress = prepare_ingress(ingress)?;
    let spec = link.spec(connect, peer)?;
    // Confined in two steps around opening the link: vhost-user starts
    // threads there, which must inherit Landlock and the capabilities left.
    let confine = |step: fn(&confine::Plan) -> confine::Result<()>| match &confined {
        Some(plan) => step(plan),
        None => Ok(()),
    };
    confine(confine::begin)?;
    let options = OpenOptions {
        offload_mtu: net.offload_mtu(),
        fd_owner: FdOwner::Inherited,
    };
    let link = spec.open(options).map_err(|e| match e {
        // A descriptor that is not open is the command line's mistake.
        TransportError::NoSuchFd { fd } => Failure::Usage(UsageError(format!(
            "invalid --tap-fd {fd}: no such open file descriptor"
        ))),
        e => Failure::Transport(e),
    })?;
    confine(confine::finish)?;
    tracing::info!(link = %link.describe(), "serving");
    let rt = runtime()?;
    rt.block_on(async move {
        let mut parked = Parked::new(Stack::new(cfg, policy, std::time::Instant::now()));
        if let Some(p) = &egress_proxy {
            tracing::info!(proxy = %p.address(), tls = p.tls().is_some(), "TCP flows go through the egress proxy");
        }
        parked.set_egress_proxy(egress_proxy);
        if let Some(i) = &injection {
            parked.set_interceptor(i.injector.interceptor());
            tracing::info!(rules = i.injector.rules().keys().len(), ca_out = ?rules.ca_out,
                "header rules: TLS to their names is intercepted with this sandbox's CA");
        }
        if let Some((plan, listeners)) = ingress {
            public_url::start(plan, listeners, parked.handle())?;
        }
        let stop = async {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return std::future::pending().await;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        vmm_glue::transport::serve(parked, link, std::pin::pin!(stop)).await?;
        Ok(0)
    })
}
