//! Gang reservations on the scheduler: the annotation of a planned member, plans restored from
//! the pods after a restart or a leader change, and the outbox drained by the writer
//! ([`crate::reservations`] holds the format, the pure restore and the writer task).

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use tessera_api::pod as podparse;
use tessera_core::Placement;
use tessera_core::gang::GangPlan;

use crate::reservations::{self, Drain, Reservation, collect};
use crate::state::Scheduler;

impl Scheduler {
    /// The wall-clock time of a [`Scheduler::now_ms`] instant.
    pub fn wall_at(&self, ms: u64) -> Timestamp {
        let ahead = SignedDuration::from_millis(i64::try_from(ms).unwrap_or(i64::MAX));
        self.origin_wall().checked_add(ahead).unwrap_or(Timestamp::MAX)
    }

    /// The reservation annotation of a plan member.
    pub(crate) fn reservation_of(&self, plan: &GangPlan, placement: &Placement) -> Reservation {
        Reservation {
            gang: plan.gang.clone(),
            node: placement.node.clone(),
            grants: placement.grants.clone(),
            ops: placement.ops.clone(),
            deadline: reservations::deadline_text(self.wall_at(plan.deadline_ms)),
            members: u32::try_from(plan.members.len()).unwrap_or(u32::MAX),
        }
    }

    /// Reserves again the complete, unexpired gang plans that pending pods carry, unless this
    /// replica already holds a plan for the gang or dropped that very plan; queues the removal
    /// of reservations that will never be used. Returns the gangs restored.
    #[allow(clippy::disallowed_methods)] // the entry point for a live rebuild; restore_reservations_at takes the time
    pub fn restore_reservations(&self, pods: &[Arc<Pod>]) -> Vec<String> {
        self.restore_reservations_at(pods, Timestamp::now())
    }

    /// [`Scheduler::restore_reservations`] at wall-clock `now`.
    pub fn restore_reservations_at(&self, pods: &[Arc<Pod>], now: Timestamp) -> Vec<String> {
        let found = collect(pods, now);
        if found.plans.is_empty() && found.stale.is_empty() {
            return Vec::new();
        }
        // Demands first: the PodGroup lookup takes its own locks.
        let mut plans = Vec::new();
        let mut stale = found.stale;
        'plans: for ((gang, deadline), members) in found.plans {
            let mut with_demand = Vec::new();
            for (pod, r) in members {
                let Ok(key) = podparse::pod_key(&pod) else { continue 'plans };
                match self.demand_of(&pod) {
                    Ok(d) if d.gang.as_ref().is_some_and(|g| g.name == gang) => with_demand.push((d, r)),
                    Ok(_) => stale.push((key, format!("the pod is no longer a member of gang {gang}"), true)),
                    Err(e) => stale.push((key, e.to_string(), true)),
                }
            }
            plans.push((gang, deadline, with_demand));
        }
        let now_ms = self.now_ms();
        let (restored, has_writes) = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            let restored =
                reservations::restore(plans, stale, &mut inner.snap, &mut inner.gangs, &mut inner.outbox, now, now_ms);
            inner.generation += restored.len() as u64;
            (restored, !inner.outbox.is_empty())
        };
        if has_writes {
            self.writes_ready();
        }
        restored
    }

    /// Performs the queued annotation writes; returns how many succeeded. A follower drops them:
    /// only the leader writes (it is the one that plans and binds).
    pub async fn write_reservations(&self) -> usize {
        let writes = self.lock().outbox.take();
        if writes.is_empty() || !self.is_leader() {
            return 0;
        }
        let mut done = 0;
        for (pod, key, value) in writes {
            // A pod deleted while its write waited: nothing to write to.
            if self.is_deleted(&pod) {
                continue;
            }
            match self.binder().annotate(&pod, key, value.as_deref()).await {
                Ok(()) => done += 1,
                // A lost write costs only the plan's survival across a restart (or one early
                // retry), never a bind.
                Err(e) => tracing::warn!(%pod, annotation = key, error = %e.chain(), "Writing a pod annotation failed"),
            }
        }
        done
    }
}

impl Drain for Scheduler {
    fn wait(&self) -> impl Future<Output = ()> + Send {
        self.writes_wait()
    }

    async fn drain(&self) {
        self.write_reservations().await;
        self.write_pod_group_status().await;
    }
}
