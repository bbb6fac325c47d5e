//! The live cluster state: rebuilds from the API and pod events.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use tessera_api::annotations;
use tessera_api::pod::{self as podparse};
use tessera_core::{PodKey, Snapshot};

use crate::state::{Inner, Scheduler};

/// A pod deleted recently, by UID: a rebuild from a store that has not caught up yet must not
/// bring its devices back.
#[derive(Clone, Debug)]
pub(crate) struct Deleted {
    pub(crate) uid: String,
    pub(crate) pod: PodKey,
    pub(crate) at_ms: u64,
}

/// How long deletions are remembered for rebuilds ([`Deleted`]).
pub(crate) const DELETED_MS: u64 = 30_000;

/// Whether `new` has a healthy GPU that `old` did not (a node or GPU added, a GPU healthy again).
pub(crate) fn gains_gpus(old: &Snapshot, new: &Snapshot) -> bool {
    // The same GPU is one with the same index, UUID, product and memory: a node first seen
    // through GPU Feature Discovery labels (no UUIDs, often no memory) and then through its
    // agent's GpuNode gains GPUs it can now place on.
    new.nodes().iter().any(|n| {
        n.gpus.iter().filter(|g| g.healthy).any(|g| {
            !old.node(&n.name).and_then(|o| o.gpus.iter().find(|og| og.index == g.index)).is_some_and(|og| {
                og.healthy && og.uuid == g.uuid && og.model == g.model && og.memory_mib >= g.memory_mib
            })
        })
    })
}

impl Scheduler {
    /// Replaces the snapshot with one rebuilt from the API, then lays the assume cache over it:
    /// pods the rebuild already shows bound leave the cache; the rest are re-applied. Pods
    /// deleted since (their UIDs, [`Scheduler::pod_deleted`]) stay released even when the
    /// stores the rebuild read had not caught up yet.
    pub fn replace_base(
        &self,
        mut snap: Snapshot,
        uids: tessera_api::snapshot::Uids,
        mig_uuids: tessera_api::snapshot::MigUuids,
    ) {
        let now = self.now_ms();
        let ttl = u64::try_from(self.settings.assume_ttl.as_millis()).unwrap_or(u64::MAX);
        let mut inner = self.lock();
        inner.deleted.retain(|d| now.saturating_sub(d.at_ms) <= DELETED_MS);
        for d in &inner.deleted {
            if uids.get(&d.uid) == Some(&d.pod) && snap.allocation(&d.pod).is_some() {
                let _ = snap.release(&d.pod);
            }
        }
        inner.base_reconfigs = snap.reconfigs();
        // Nodes the rebuild shows unchanged keep their versions, so their cached verdicts stay
        // valid: a rebuild after one pod event costs the next filter that node, not the cluster.
        let old = inner.cache.base().cloned().unwrap_or_else(|| inner.snap.clone());
        snap.keep_versions(&old);
        let snap = Arc::new(snap);
        // kube-scheduler does not watch GpuNodes: when a node gains usable GPUs (its agent
        // started, a GPU became healthy again) nothing tells it to retry the pods it parked
        // until its periodic flush of unschedulable pods, minutes later. Nudge them.
        let gained = inner.cache.base().is_some_and(|old| gains_gpus(old, &snap));
        if self.settings.mode == "live" {
            inner.cache.set_base(snap.clone());
        }
        inner.lay_over(snap, Some((now, ttl)));
        inner.uids = uids;
        inner.mig_uuids = mig_uuids;
        inner.bound_here.retain(|_, (_, at)| now.saturating_sub(*at) <= ttl);
        let mut waiting = Vec::new();
        if gained {
            waiting = inner.refused_everywhere(now, true);
            if !waiting.is_empty() {
                tracing::info!(
                    pods = waiting.len(),
                    "A node gained GPUs; asking kube-scheduler to retry the pods it refused"
                );
            }
        }
        self.nudge_and_unlock(inner, waiting, now);
    }

    /// Asks kube-scheduler to retry `pods` now (a `tessera.dev/requeue` annotation is a pod
    /// update it watches), then publishes the reservation gauge, unlocks, and wakes the
    /// annotation writer if anything is queued.
    fn nudge_and_unlock(&self, mut inner: std::sync::MutexGuard<'_, Inner>, pods: Vec<PodKey>, now: u64) {
        if !pods.is_empty() {
            let stamp = self.wall_at(now).to_string();
            for p in pods {
                inner.outbox.annotate(p, annotations::REQUEUE, Some(stamp.clone()));
            }
        }
        let queued = !inner.outbox.is_empty();
        self.metrics.reservations.set(inner.cache.len() as i64);
        drop(inner);
        if queued {
            self.writes_ready();
        }
    }

    /// A pod was deleted (a watch event): whatever it held is free for the very next filter,
    /// its gang's plan (if it was a planned member) is dropped so the other members' devices
    /// are released too, and queued annotation writes to it are dropped. Pods refused for lack
    /// of devices are nudged so that kube-scheduler retries them now.
    pub fn pod_deleted(&self, pod: &Pod) {
        let Ok(key) = podparse::pod_key(pod) else { return };
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        self.forget_pod(&key, &uid, true);
    }

    /// A pod changed (a watch event): one that finished (Succeeded/Failed) frees its devices at
    /// once, as a deleted one does.
    pub fn pod_changed(&self, pod: &Pod) {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if !matches!(phase, Some("Succeeded" | "Failed")) {
            return;
        }
        let Ok(key) = podparse::pod_key(pod) else { return };
        if self.lock().snap.allocation(&key).is_some() {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            self.forget_pod(&key, &uid, false);
        }
    }

    pub(crate) fn forget_pod(&self, key: &PodKey, uid: &str, deleted: bool) {
        let now = self.now_ms();
        let mut inner = self.lock();
        let mut freed = false;
        let mut dropped_plan = false;
        if deleted {
            inner.outbox.forget(key);
            inner.deleted.push_back(Deleted { uid: uid.to_owned(), pod: key.clone(), at_ms: now });
            inner.uids.remove(uid);
            // A planned member is gone: the plan cannot complete; release every reservation.
            let gangs: Vec<String> = inner
                .gangs
                .iter()
                .filter(|(_, st)| st.planned(key) || st.members.contains_key(key))
                .map(|(n, _)| n.clone())
                .collect();
            for g in gangs {
                let planned = inner.gangs.get(&g).is_some_and(|st| st.planned(key));
                if let Some(st) = inner.gangs.get_mut(&g) {
                    st.members.remove(key);
                    st.refused.remove(key);
                }
                if planned {
                    tracing::info!(gang = %g, pod = %key, "A planned gang member was deleted; its plan is dropped");
                    let why = format!("member {key} was deleted");
                    let released = !inner.drop_plan(&g, &why).is_empty();
                    freed |= released;
                    dropped_plan |= released;
                }
            }
        }
        inner.cache.remove(key);
        inner.bound_here.remove(key);
        // The state and the last rebuild often are one snapshot (nothing laid over it): then
        // one copy serves both.
        let shared = inner.cache.shares_base(&inner.snap);
        if inner.snap.allocation(key).is_some() && Arc::make_mut(&mut inner.snap).release(key).is_ok() {
            freed = true;
        }
        let Inner { cache, snap, .. } = &mut *inner;
        cache.release_from_base(key, shared, snap);
        if dropped_plan {
            // The plan's MIG instances no node created go with it.
            inner.rebase();
        }
        let mut waiting = Vec::new();
        if freed {
            inner.generation += 1;
            waiting = inner.waiting_for_capacity(now);
        }
        self.nudge_and_unlock(inner, waiting, now);
    }
}
