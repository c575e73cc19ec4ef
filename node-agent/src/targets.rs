//! Keeps the kernel's target set equal to the configuration: literal
//! addresses and CIDRs as given, host names resolved with the system
//! resolver (so /etc/hosts and nsswitch apply, as for the jobs themselves)
//! and resolved again every `dns.refresh_secs`, so that changed records
//! are followed.
use std::{collections::BTreeSet, sync::Arc, time::Duration};

use ipnet::IpNet;
use tracing::{info, warn};

use crate::{
    config::Target,
    redirect::{Redirector, TargetEntry},
};

/// Entries for the parts of the configuration that need no DNS.
fn static_entries(targets: &[Target]) -> BTreeSet<TargetEntry> {
    let mut out = BTreeSet::new();
    for (id, t) in targets.iter().enumerate() {
        for a in &t.addresses {
            push(&mut out, a.0, t, id as u32);
        }
    }
    out
}

fn push(out: &mut BTreeSet<TargetEntry>, net: IpNet, t: &Target, target_id: u32) {
    if t.ports.is_empty() {
        out.insert(TargetEntry {
            net,
            port: 0,
            target_id,
        });
    }
    for &port in &t.ports {
        out.insert(TargetEntry {
            net,
            port,
            target_id,
        });
    }
}

/// Resolves every host name; a name that fails keeps its previous
/// addresses rather than dropping out of the set (a DNS hiccup must not
/// open a bypass).
async fn resolve_all(
    targets: &[Target],
    previous: &BTreeSet<TargetEntry>,
) -> BTreeSet<TargetEntry> {
    let mut out = static_entries(targets);
    for (id, t) in targets.iter().enumerate() {
        for host in &t.hosts {
            match tokio::net::lookup_host((host.as_str(), 0)).await {
                Ok(addrs) => {
                    for a in addrs {
                        push(&mut out, IpNet::from(a.ip()), t, id as u32);
                    }
                }
                Err(e) => {
                    warn!(target_name = %t.name, %host, error = %e, "cannot resolve target host; keeping previous addresses");
                    let prev_hosts: Vec<_> = previous
                        .iter()
                        .filter(|e| e.target_id == id as u32)
                        .copied()
                        .collect();
                    out.extend(prev_hosts);
                }
            }
        }
    }
    out
}

/// Installs the initial set, then refreshes it forever.
pub async fn maintain(redirector: Arc<Redirector>, targets: Arc<Vec<Target>>, refresh: Duration) {
    let mut current = BTreeSet::new();
    loop {
        let wanted = resolve_all(&targets, &current).await;
        if wanted != current {
            match redirector.sync(&wanted) {
                Ok(()) => {
                    info!(entries = wanted.len(), "target set updated");
                    current = wanted;
                }
                Err(e) => warn!(error = %e, "updating the kernel target set failed"),
            }
        }
        tokio::time::sleep(refresh).await;
    }
}

/// Installs the literal part of the target set synchronously, before the
/// node reports ready.
pub fn install_static(
    redirector: &Redirector,
    targets: &[Target],
) -> Result<(), crate::redirect::RedirectError> {
    redirector.sync(&static_entries(targets))
}
