//! The gang book: every gang this replica schedules, each with its members seen at filter and
//! its lifecycle as one [`Phase`]:
//!
//! ```text
//!                                   restored from the
//!                                   members' annotations
//!                                            │
//!                                            ▼
//!   ┌─────────┐  minMember pending,     ┌─────────┐  every planned member   ┌──────┐
//!   │ Waiting │ ──────────────────────► │ Planned │ ──────────────────────► │ Open │
//!   └─────────┘  the plan fits          └─────────┘  reached bind           └──────┘
//!                                         │     ▲                               │
//!            deadline passed, a member    │     │ next filter: minMember        │ any of the
//!            deleted, a node refused,     │     │ pending, the plan fits        │ same causes
//!            a bind failed, the cluster   │     │                               │
//!            changed under the plan       ▼     │                               │
//!                                       ┌─────────────┐                         │
//!                                       │ Failed(why) │ ◄───────────────────────┘
//!                                       └─────────────┘
//!   Planned or Open with every planned member bound: forgotten.
//!   No plan, and no member filtered for two minutes: forgotten.
//! ```
//!
//! The book holds no snapshot and reads no clock: its methods take the snapshot and the time
//! (`now_ms`, the scheduler's monotonic milliseconds) and return what the caller must do as
//! data (pods whose reservations to release or unannotate), so it never sees the
//! [`crate::state::Scheduler`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use tessera_core::gang::GangPlan;
use tessera_core::{Demand, GangRef, NodeName, PodKey, Snapshot};
use tokio::sync::watch;

/// How long a node kube-scheduler refused for a gang member stays out of that member's plans.
pub const REFUSAL_MS: u64 = 5 * 60_000;

/// What a held bind sees of its gang's plan (the barrier's value).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Barrier {
    /// Some planned members have not reached bind yet.
    Waiting,
    /// Every planned member reached bind: each goes ahead.
    Open,
    /// The plan was dropped (deadline or an error); every held bind fails with this.
    Failed(String),
}

/// A gang's lifecycle.
#[derive(Debug)]
pub(crate) enum Phase {
    /// Members gather at filter; nothing is reserved.
    Waiting,
    /// Every planned member holds its devices until the plan's deadline; binds that reach the
    /// barrier wait for the members that have not.
    Planned { plan: GangPlan, deadline: Option<String>, arrived: BTreeSet<PodKey>, barrier: watch::Sender<Barrier> },
    /// Every planned member reached bind: their binds go ahead.
    Open { plan: GangPlan, deadline: Option<String>, barrier: watch::Sender<Barrier> },
    /// The last plan was dropped, with why; nothing is reserved and the next filter plans again
    /// (as from `Waiting`).
    Failed(String),
}

/// A bind that reached its gang's barrier.
#[derive(Debug)]
pub(crate) struct Arrival {
    /// Resolves when the barrier opens or the plan fails.
    pub(crate) barrier: watch::Receiver<Barrier>,
    pub(crate) deadline_ms: u64,
    /// This arrival was the last one: the barrier opened.
    pub(crate) opened: bool,
}

/// One gang: members seen at filter, the refused nodes, and its [`Phase`].
#[derive(Debug)]
pub(crate) struct GangState {
    pub(crate) min_member: u32,
    pub(crate) timeout_ms: u64,
    /// Pending members and when filter last saw each (ms).
    pub(crate) members: BTreeMap<PodKey, (Demand, u64)>,
    /// Nodes kube-scheduler refused for a member (its filter came without the planned node,
    /// or the plan lapsed before the member reached bind), until when (ms): later plans leave
    /// them out for that member.
    pub(crate) refused: BTreeMap<PodKey, BTreeMap<NodeName, u64>>,
    phase: Phase,
}

impl GangState {
    pub(crate) fn new(g: &GangRef) -> Self {
        Self {
            min_member: g.min_member,
            timeout_ms: g.timeout_ms,
            members: BTreeMap::new(),
            refused: BTreeMap::new(),
            phase: Phase::Waiting,
        }
    }

    /// A member seen at filter at `now_ms`; members not seen for a while are forgotten
    /// (kube-scheduler retries pending pods every few seconds).
    pub(crate) fn observe(&mut self, g: &GangRef, demand: &Demand, now_ms: u64) {
        self.min_member = g.min_member;
        self.timeout_ms = g.timeout_ms;
        self.members.insert(demand.pod.clone(), (demand.clone(), now_ms));
        let keep_ms = g.timeout_ms.max(30_000);
        self.members.retain(|_, (_, seen)| now_ms.saturating_sub(*seen) <= keep_ms);
    }

    #[cfg(test)]
    pub(crate) fn phase(&self) -> &Phase {
        &self.phase
    }

    /// Why the last plan was dropped, while no new one is held.
    pub(crate) fn last_failure(&self) -> Option<&str> {
        match &self.phase {
            Phase::Failed(why) => Some(why),
            _ => None,
        }
    }

    /// The plan, while one is held (planned or open).
    pub(crate) fn plan(&self) -> Option<&GangPlan> {
        match &self.phase {
            Phase::Planned { plan, .. } | Phase::Open { plan, .. } => Some(plan),
            Phase::Waiting | Phase::Failed(_) => None,
        }
    }

    /// Waiting → Planned (or a restored plan): a fresh barrier that no bind waits at yet.
    /// `deadline` is the plan's deadline as written in its members' reservation annotations.
    pub(crate) fn planned_with(&mut self, plan: GangPlan, deadline: Option<String>) {
        let barrier = watch::channel(Barrier::Waiting).0;
        self.phase = Phase::Planned { plan, deadline, arrived: BTreeSet::new(), barrier };
    }

    /// A planned member's bind reached the barrier: Planned → Open once every member has.
    /// `None`: the pod is not in a plan.
    pub(crate) fn arrive(&mut self, pod: &PodKey) -> Option<Arrival> {
        if !self.planned(pod) {
            return None;
        }
        let opened = match &mut self.phase {
            Phase::Planned { plan, arrived, .. } => {
                arrived.insert(pod.clone());
                plan.members.iter().all(|(k, _)| arrived.contains(k))
            }
            // Open already (a retried bind): it goes ahead.
            _ => false,
        };
        if opened {
            let Phase::Planned { plan, deadline, barrier, .. } = std::mem::replace(&mut self.phase, Phase::Waiting)
            else {
                return None;
            };
            barrier.send_replace(Barrier::Open);
            self.phase = Phase::Open { plan, deadline, barrier };
        }
        match &self.phase {
            Phase::Planned { plan, barrier, .. } | Phase::Open { plan, barrier, .. } => {
                Some(Arrival { barrier: barrier.subscribe(), deadline_ms: plan.deadline_ms, opened })
            }
            Phase::Waiting | Phase::Failed(_) => None,
        }
    }

    /// Planned or Open → Failed: every held bind fails with `why`. Returns the plan dropped and
    /// its deadline as annotated; `None` when no plan was held.
    pub(crate) fn fail(&mut self, why: &str) -> Option<(GangPlan, Option<String>)> {
        match std::mem::replace(&mut self.phase, Phase::Failed(why.to_owned())) {
            Phase::Planned { plan, deadline, barrier, .. } | Phase::Open { plan, deadline, barrier } => {
                // Binds waiting at the barrier hold its receiver: they see this after it is dropped.
                barrier.send_replace(Barrier::Failed(why.to_owned()));
                Some((plan, deadline))
            }
            other => {
                self.phase = other;
                None
            }
        }
    }

    /// Remembers that kube-scheduler will not put `pod` on `node` (for [`REFUSAL_MS`]).
    pub(crate) fn refuse(&mut self, pod: &PodKey, node: &NodeName, now_ms: u64) {
        self.refused.entry(pod.clone()).or_default().insert(node.clone(), now_ms + REFUSAL_MS);
    }

    /// The refusals still in force at `now_ms`.
    pub(crate) fn refusals_at(&self, now_ms: u64) -> BTreeMap<PodKey, BTreeMap<NodeName, u64>> {
        self.refused
            .iter()
            .map(|(k, m)| {
                (k.clone(), m.iter().filter(|(_, until)| **until > now_ms).map(|(n, u)| (n.clone(), *u)).collect())
            })
            .collect()
    }

    /// Members of the plan that have not reached bind, with their planned nodes (none once
    /// the barrier opened).
    pub(crate) fn unarrived(&self) -> Vec<(PodKey, NodeName)> {
        match &self.phase {
            Phase::Planned { plan, arrived, .. } => plan
                .members
                .iter()
                .filter(|(k, _)| !arrived.contains(k))
                .map(|(k, p)| (k.clone(), p.node.clone()))
                .collect(),
            _ => Vec::new(),
        }
    }

    pub(crate) fn planned(&self, pod: &PodKey) -> bool {
        self.plan().is_some_and(|p| p.members.iter().any(|(k, _)| k == pod))
    }

    /// Members seen at filter that hold nothing in `snap`.
    pub(crate) fn pending_members(&self, snap: &Snapshot) -> Vec<Demand> {
        self.members.values().filter(|(d, _)| snap.allocation(&d.pod).is_none()).map(|(d, _)| d.clone()).collect()
    }

    /// Every planned member is bound in `snap` (holds devices that are no reservation).
    pub(crate) fn all_bound(&self, snap: &Snapshot) -> bool {
        self.plan().is_some_and(|p| {
            p.members.iter().all(|(k, _)| snap.allocation(k).is_some_and(|a| a.reserved_until_ms.is_none()))
        })
    }
}

/// What dropping a plan leaves the caller to do.
#[derive(Debug, Default)]
pub(crate) struct Dropped {
    /// Every planned member: its reservation annotation is to be removed.
    pub(crate) members: Vec<PodKey>,
    /// The members whose reservations were released from the snapshot.
    pub(crate) released: Vec<PodKey>,
}

/// Every gang, by `namespace/name`, and the plans dropped here.
#[derive(Debug, Default)]
pub(crate) struct GangBook {
    gangs: BTreeMap<String, GangState>,
    /// Plans this replica dropped, by (gang, deadline as annotated), until their deadline (ms):
    /// their annotations may still be visible, and must not bring them back.
    dropped: HashMap<(String, String), u64>,
}

impl GangBook {
    /// The gang of a member seen at filter at `now_ms` ([`GangState::observe`]).
    pub(crate) fn observe(&mut self, g: &GangRef, demand: &Demand, now_ms: u64) -> &mut GangState {
        let st = self.gangs.entry(g.name.clone()).or_insert_with(|| GangState::new(g));
        st.observe(g, demand, now_ms);
        st
    }

    pub(crate) fn get(&self, name: &str) -> Option<&GangState> {
        self.gangs.get(name)
    }

    pub(crate) fn get_mut(&mut self, name: &str) -> Option<&mut GangState> {
        self.gangs.get_mut(name)
    }

    pub(crate) fn contains_key(&self, name: &str) -> bool {
        self.gangs.contains_key(name)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&String, &GangState)> {
        self.gangs.iter()
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &GangState> {
        self.gangs.values()
    }

    pub(crate) fn insert(&mut self, name: String, st: GangState) {
        self.gangs.insert(name, st);
    }

    pub(crate) fn remove(&mut self, name: &str) {
        self.gangs.remove(name);
    }

    /// Whether a plan is held for `name`.
    pub(crate) fn has_plan(&self, name: &str) -> bool {
        self.gangs.get(name).is_some_and(|st| st.plan().is_some())
    }

    /// The gang whose plan holds `pod`.
    pub(crate) fn gang_of(&self, pod: &PodKey) -> Option<String> {
        self.gangs.iter().find(|(_, st)| st.planned(pod)).map(|(n, _)| n.clone())
    }

    /// Every plan held, with the gang's name.
    pub(crate) fn plans(&self) -> Vec<(String, GangPlan)> {
        self.gangs.iter().filter_map(|(n, st)| st.plan().cloned().map(|p| (n.clone(), p))).collect()
    }

    /// Fails `name`'s plan with `why` ([`GangState::fail`]) and releases its members still
    /// reserved in `snap` (bound ones stay). The plan is remembered as dropped until its
    /// deadline.
    pub(crate) fn drop_plan(&mut self, name: &str, why: &str, snap: &mut Arc<Snapshot>) -> Dropped {
        let Some(st) = self.gangs.get_mut(name) else { return Dropped::default() };
        let mut out = Dropped::default();
        if let Some((plan, deadline)) = st.fail(why) {
            if let Some(d) = deadline {
                self.dropped.insert((name.to_owned(), d), plan.deadline_ms);
            }
            for (pod, _) in &plan.members {
                out.members.push(pod.clone());
                if snap.allocation(pod).is_some_and(|a| a.reserved_until_ms.is_some())
                    && Arc::make_mut(snap).release(pod).is_ok()
                {
                    out.released.push(pod.clone());
                }
            }
        }
        out
    }

    /// Whether this replica dropped the plan of `gang` with that annotated deadline.
    pub(crate) fn was_dropped(&self, gang: &str, deadline: &str) -> bool {
        self.dropped.contains_key(&(gang.to_owned(), deadline.to_owned()))
    }

    /// Remembers a plan as dropped until `until_ms`.
    pub(crate) fn remember_dropped(&mut self, gang: String, deadline: String, until_ms: u64) {
        self.dropped.insert((gang, deadline), until_ms);
    }

    /// Records at `now_ms` that kube-scheduler did not take the plan's node for members of
    /// `gang` that never reached bind, so the next plan leaves those nodes out for them.
    pub(crate) fn refuse_unarrived(&mut self, gang: &str, now_ms: u64) {
        if let Some(st) = self.gangs.get_mut(gang) {
            for (pod, node) in st.unarrived() {
                tracing::info!(%gang, %pod, %node, "Member never reached bind on its planned node; the next plan avoids it");
                st.refuse(&pod, &node, now_ms);
            }
        }
    }

    /// Gangs whose plan holds any of `pods`.
    pub(crate) fn planning_any(&self, pods: &[PodKey]) -> Vec<String> {
        self.gangs.iter().filter(|(_, st)| pods.iter().any(|p| st.planned(p))).map(|(n, _)| n.clone()).collect()
    }

    /// The tick's bookkeeping at `now_ms`: dropped plans past their deadline are forgotten;
    /// plans whose members all bound (a follower's restored plan, the leader binding) are
    /// finished and forgotten, so the gang's name can be planned afresh; gangs without a plan
    /// whose members were not seen for two minutes are forgotten. Returns the gangs without a
    /// plan.
    pub(crate) fn sweep(&mut self, snap: &Snapshot, now_ms: u64) -> usize {
        self.dropped.retain(|_, deadline_ms| *deadline_ms > now_ms);
        self.gangs.retain(|_, st| !st.all_bound(snap));
        let stale = 2 * 60_000;
        self.gangs.retain(|_, st| {
            st.plan().is_some() || st.members.values().any(|(_, seen)| now_ms.saturating_sub(*seen) <= stale)
        });
        self.gangs.values().filter(|st| st.plan().is_none()).count()
    }
}

#[cfg(test)]
mod tests {
    use tessera_core::{GpuDemand, Placement};

    use super::*;

    fn gang(min: u32) -> GangRef {
        GangRef { name: "ml/g".into(), min_member: min, timeout_ms: 60_000 }
    }

    fn plan(members: &[&str]) -> GangPlan {
        GangPlan {
            gang: "ml/g".into(),
            members: members
                .iter()
                .map(|m| {
                    (
                        PodKey::from(*m),
                        Placement { node: NodeName("n1".into()), grants: Vec::new(), ops: Vec::new(), score: 0.0 },
                    )
                })
                .collect(),
            deadline_ms: 10_000,
        }
    }

    #[test]
    fn the_barrier_opens_when_the_last_member_arrives_and_a_failure_reaches_every_waiter() {
        let mut st = GangState::new(&gang(2));
        st.observe(&gang(2), &Demand::new("ml/a", GpuDemand::Whole { count: 1 }), 0);
        assert!(matches!(st.phase(), Phase::Waiting));
        assert!(st.arrive(&PodKey::from("ml/a")).is_none());
        st.planned_with(plan(&["ml/a", "ml/b"]), Some("d".into()));
        let a = st.arrive(&PodKey::from("ml/a")).unwrap();
        assert!(!a.opened && *a.barrier.borrow() == Barrier::Waiting);
        assert_eq!(st.unarrived(), vec![(PodKey::from("ml/b"), NodeName("n1".into()))]);
        let b = st.arrive(&PodKey::from("ml/b")).unwrap();
        assert!(b.opened && matches!(st.phase(), Phase::Open { .. }));
        assert_eq!(*a.barrier.borrow(), Barrier::Open);
        assert!(st.unarrived().is_empty());

        st.planned_with(plan(&["ml/a", "ml/b"]), None);
        let a = st.arrive(&PodKey::from("ml/a")).unwrap();
        let (dropped, _) = st.fail("gone").unwrap();
        assert_eq!(dropped.members.len(), 2);
        assert_eq!(*a.barrier.borrow(), Barrier::Failed("gone".into()));
        assert!(matches!(st.phase(), Phase::Failed(_)) && st.plan().is_none());
        assert!(st.fail("again").is_none());
    }
}
