//! Gang planning at filter and the once-a-second tick that releases lapsed plans.

use std::sync::Arc;

use tessera_core::gang::{self};
use tessera_core::policy::NodeVerdict;
use tessera_core::{Context, Demand, GangRef, NodeName, PodKey, Rejection};

use crate::state::{Inner, Scheduler};

impl Scheduler {
    /// A gang member's verdicts: wait for `minMember` members, then plan and reserve the whole
    /// gang at once; a planned member is offered only its node. `None`: the gang is already
    /// planned without this pod (a member beyond `minMember`), which is placed like any pod.
    pub(crate) fn gang_verdicts(
        &self,
        inner: &mut Inner,
        demand: &Demand,
        g: &GangRef,
        names: &[NodeName],
    ) -> Option<Vec<NodeVerdict>> {
        let now = self.now_ms();
        let st = inner.gangs.observe(g, demand, now);
        if st.plan().is_some() {
            if !st.planned(&demand.pod) {
                return None;
            }
            // Planned, yet the pod holds nothing (its reservation was released): replan.
            inner.fail_gang(&g.name, "the plan lost a member's reservation; replanning");
        }
        let st = inner.gangs.get(&g.name)?;
        let members: Vec<Demand> = st.pending_members(&inner.snap);
        let all =
            |r: Rejection| names.iter().map(|n| NodeVerdict { node: n.clone(), outcome: Err(r.clone()) }).collect();
        if (members.len() as u64) < u64::from(st.min_member) {
            return Some(all(Rejection::unschedulable(format!(
                "gang {}: {} of {} members pending; waiting for the rest before planning",
                g.name,
                members.len(),
                st.min_member
            ))));
        }
        let refused = st.refusals_at(now);
        let avoid = |pod: &PodKey, node: &NodeName| {
            refused
                .get(pod)
                .filter(|m| m.contains_key(node))
                .map(|_| format!("kube-scheduler refused this node for pod {pod} in an earlier plan"))
        };
        let ctx = Context { workload: &inner.workload, seed: self.settings.seed };
        match gang::plan_gang_avoiding(
            Arc::make_mut(&mut inner.snap),
            &members,
            self.policy.as_ref(),
            &ctx,
            now,
            &avoid,
        ) {
            Ok(plan) => {
                let previous = inner.gangs.get(&g.name).and_then(|st| st.last_failure()).unwrap_or("");
                tracing::info!(gang = %g.name, members = plan.members.len(), deadline_ms = plan.deadline_ms, previous, "Gang planned");
                inner.generation += 1;
                // Written on each member so that another replica (after a restart or a leader
                // change) can take the plan over.
                let written: Vec<_> =
                    plan.members.iter().map(|(k, p)| (k.clone(), self.reservation_of(&plan, p))).collect();
                let deadline = written.first().map(|(_, r)| r.deadline.clone());
                for (k, r) in &written {
                    inner.outbox.set(k.clone(), r);
                }
                if let Some(st) = inner.gangs.get_mut(&g.name) {
                    st.planned_with(plan, deadline);
                }
                match inner.snap.allocation(&demand.pod).map(|a| (a.node.clone(), a.grants.clone())) {
                    Some((here, grants)) => Some(self.pinned(inner, demand, &here, grants, names)),
                    None => Some(all(Rejection::unschedulable(format!(
                        "gang {}: pod {} is not in the plan",
                        g.name, demand.pod
                    )))),
                }
            }
            Err(r) => Some(all(r)),
        }
    }

    /// Releases lapsed gang reservations (failing their held binds) and refreshes the gang
    /// gauges. Run about once a second.
    pub fn tick(&self) {
        let now = self.now_ms();
        let mut inner = self.lock();
        let expired = gang::expire(Arc::make_mut(&mut inner.snap), now);
        if !expired.is_empty() {
            inner.generation += 1;
            let names = inner.gangs.planning_any(&expired);
            for n in names {
                tracing::warn!(gang = %n, "Gang reservation lapsed before every member was bound; released");
                inner.refuse_unarrived(&n, now);
                inner.fail_gang(&n, "the gang's reservation deadline passed before every member reached bind");
            }
            // The lapsed members were released above: drop the MIG instances only they assumed.
            inner.rebase();
        }
        let Inner { gangs, snap, .. } = &mut *inner;
        let pending = gangs.sweep(snap, now);
        self.metrics.pending_gangs.set(pending as i64);
        let queued = !inner.outbox.is_empty();
        drop(inner);
        if queued {
            self.writes_ready();
        }
    }
}
