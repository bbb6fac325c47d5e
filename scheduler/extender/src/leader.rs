//! Who binds. tessera-scheduler runs as a sidecar of a kube-scheduler that already elects a
//! leader with a Lease (`leaderElection.resourceName`). Only the leading kube-scheduler calls
//! its extender, so the extender replica that must bind is the one in the same pod. Rather
//! than a second election that could pick a different pod, the extender follows that Lease:
//! it is the leader while the Lease's holder identity (`<hostname>_<uuid>`, the hostname
//! being the pod's, shared by both containers) names its own pod and the Lease is fresh.
//!
//! A follower answers filter, prioritize and preempt from its own cache (all replicas watch
//! the same cluster) and refuses bind with an error, so kube-scheduler retries.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::{Api, Client};

use crate::state::Scheduler;

/// Whether `lease` is held, and still valid at `now`, by a process on host `hostname`.
pub fn held_by(lease: &Lease, hostname: &str, now: Timestamp) -> bool {
    let Some(spec) = lease.spec.as_ref() else { return false };
    let Some(holder) = spec.holder_identity.as_deref() else { return false };
    let mine = holder == hostname || holder.strip_prefix(hostname).is_some_and(|rest| rest.starts_with('_'));
    let fresh = match (spec.renew_time.as_ref(), spec.lease_duration_seconds) {
        (Some(renew), Some(secs)) => renew.0 + SignedDuration::from_secs(i64::from(secs)) > now,
        _ => false,
    };
    mine && fresh
}

/// Follows the Lease `namespace/name` every `period`, setting the scheduler's leadership.
#[allow(clippy::disallowed_methods)] // a Lease is judged against the wall clock of this follower
pub async fn follow(
    client: Client,
    namespace: String,
    name: String,
    hostname: String,
    scheduler: Arc<Scheduler>,
    period: Duration,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let mut was = None;
    loop {
        let leader = match api.get_opt(&name).await {
            Ok(Some(lease)) => held_by(&lease, &hostname, Timestamp::now()),
            Ok(None) => false,
            Err(error) => {
                tracing::warn!(%error, lease = %name, "Reading the leader Lease failed; not binding until it succeeds");
                false
            }
        };
        scheduler.set_leader(leader);
        if was != Some(leader) {
            tracing::info!(leader, lease = %format!("{namespace}/{name}"), "Leadership");
            was = Some(leader);
        }
        tokio::time::sleep(period).await;
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    use super::*;

    fn lease(holder: &str, renewed: Timestamp, secs: i32) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                renew_time: Some(MicroTime(renewed)),
                lease_duration_seconds: Some(secs),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_pod_whose_kube_scheduler_holds_a_fresh_lease_leads() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let l = lease("tessera-7f9c-abcde_1b2c3d4e-0000", now - SignedDuration::from_secs(5), 15);
        assert!(held_by(&l, "tessera-7f9c-abcde", now));
        // Another pod whose name shares a prefix does not.
        assert!(!held_by(&l, "tessera-7f9c-abc", now));
    }

    #[test]
    fn an_expired_or_empty_lease_has_no_leader() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let l = lease("host-a_1", now - SignedDuration::from_secs(20), 15);
        assert!(!held_by(&l, "host-a", now));
        assert!(!held_by(&Lease::default(), "host-a", now));
    }
}
