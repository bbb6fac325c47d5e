//! Priority preemption that tessera performs itself, through the Eviction API.
//!
//! kube-scheduler cannot preempt for most of what tessera places. Its preemption dry run
//! removes lower-priority pods from a node and re-runs its own filter plugins, never the
//! extenders: for `tessera.dev/gpu` (`ignoredByScheduler`) the plugins pass with or without the
//! victims, every victim is reprieved, and the node is dropped with `expected at least one
//! victim pod`, so `/preempt` is never called. A gang needs victims chosen for all of its
//! members at once, which kube-scheduler's pod-by-pod preemption cannot do without splitting
//! gangs. So for these pods tessera chooses the victims (the core's
//! [`tessera_core::gang::preemption_victims`]: lower priority only, whole gangs or single
//! pods, never part of a gang, the fewest units that let the preemptor fit) and evicts them
//! with `pods/{name}/eviction`, which honours PodDisruptionBudgets. Every victim is first
//! evicted in dry run; if the API server refuses any (a budget would be broken), none is
//! evicted. Pods that ask for `nvidia.com/*` names alone are left to kube-scheduler, which
//! calls `/preempt` for them.
//!
//! Filter queues a preemptor when it fits no node for lack of free devices; the preemption task
//! ([`preemptor`], leader only) works through the queue. A preemptor is not served again for
//! [`PREEMPT_BACKOFF_MS`] while its victims terminate; their deletion frees the devices and
//! nudges kube-scheduler to retry the pending pods.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use tessera_core::gang;
use tessera_core::{Context, Demand, GpuDemand, PodKey};

use crate::state::Scheduler;

/// How long a preemptor waits before tessera evicts for it again.
pub const PREEMPT_BACKOFF_MS: u64 = 60_000;

/// Whether kube-scheduler's own preemption can serve the demand (a single pod whose GPU request
/// is in NVIDIA names kube-scheduler counts); otherwise tessera preempts for it.
pub fn kube_scheduler_preempts(d: &Demand) -> bool {
    d.gang.is_none() && (d.gpu == GpuDemand::None || !d.rules.extended.is_empty())
}

/// Whether the pod may preempt at all (`preemptionPolicy: Never` may not).
pub fn may_preempt(pod: &Pod) -> bool {
    pod.spec.as_ref().and_then(|s| s.preemption_policy.as_deref()) != Some("Never")
}

/// Preemptors waiting for the preemption task, and those served lately.
#[derive(Debug, Default)]
pub(crate) struct PreemptQueue {
    /// Preemptions started, by preemptor (pod or gang), and when (ms): not repeated while
    /// their victims terminate.
    started: HashMap<String, u64>,
    /// Preemptors waiting for the preemption task: (key, members' demands).
    queue: VecDeque<(String, Vec<Demand>)>,
}

impl PreemptQueue {
    /// Queues a preemptor (a pod, or a gang by name with its pending members) unless it is
    /// queued already or was served within [`PREEMPT_BACKOFF_MS`] of `now_ms`.
    pub(crate) fn want(&mut self, key: String, members: Vec<Demand>, now_ms: u64) {
        if self.started.get(&key).is_some_and(|at| now_ms.saturating_sub(*at) < PREEMPT_BACKOFF_MS)
            || self.queue.iter().any(|(k, _)| *k == key)
        {
            return;
        }
        self.queue.push_back((key, members));
    }

    /// Every queued preemptor, in order; the queue is left empty.
    pub(crate) fn take(&mut self) -> Vec<(String, Vec<Demand>)> {
        self.queue.drain(..).collect()
    }

    /// `preemptor` is served at `now_ms`; older services past the backoff are forgotten.
    pub(crate) fn start(&mut self, preemptor: &str, now_ms: u64) {
        self.started.insert(preemptor.to_owned(), now_ms);
        self.started.retain(|_, at| now_ms.saturating_sub(*at) < PREEMPT_BACKOFF_MS);
    }
}

impl Scheduler {
    /// Serves every queued preemptor: chooses victims on the current state, checks every
    /// eviction in dry run, then evicts them. Returns the pods evicted. Only the leader evicts.
    pub async fn preempt_pass(&self) -> Vec<PodKey> {
        let queued: Vec<(String, Vec<Demand>)> = self.lock().preemptions.take();
        if queued.is_empty() || !self.is_leader() {
            return Vec::new();
        }
        let mut evicted = Vec::new();
        for (preemptor, members) in queued {
            let now = self.now_ms();
            let victims = {
                let mut inner = self.lock();
                inner.preemptions.start(&preemptor, now);
                let ctx = Context { workload: &inner.workload, seed: self.seed() };
                gang::preemption_victims(&inner.snap, &members, self.policy_ref(), &ctx)
            };
            let victims = match victims {
                Some(v) if !v.is_empty() => v,
                Some(_) => continue,
                None => {
                    tracing::info!(%preemptor, "No lower-priority pods whose eviction would let it fit");
                    self.metrics.decision("preempt", "none");
                    continue;
                }
            };
            let mut refused = None;
            for v in &victims {
                if let Err(e) = self.binder().evict(v, true).await {
                    refused = Some(e.chain());
                    break;
                }
            }
            if let Some(why) = refused {
                tracing::info!(%preemptor, victims = ?victims.iter().map(|v| v.0.as_str()).collect::<Vec<_>>(), reason = %why, "Preemption refused by the API server; no pod evicted");
                self.metrics.decision("preempt", "refused");
                continue;
            }
            for v in &victims {
                match self.binder().evict(v, false).await {
                    Ok(()) => {
                        tracing::info!(%preemptor, victim = %v, "Evicted a lower-priority pod to make room");
                        evicted.push(v.clone());
                    }
                    Err(e) => tracing::warn!(%preemptor, victim = %v, error = %e.chain(), "Eviction failed"),
                }
            }
            self.metrics.decision("preempt", "evicted");
        }
        evicted
    }
}

/// Runs [`Scheduler::preempt_pass`] whenever a preemptor is queued (and every two seconds).
pub async fn preemptor(scheduler: Arc<Scheduler>) {
    loop {
        tokio::select! {
            () = scheduler.preempts_wait() => {}
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        scheduler.preempt_pass().await;
    }
}
