//! Gang state: the members seen at filter, the reserved plan and the bind barrier.

use std::collections::{BTreeMap, BTreeSet};

use tessera_core::gang::GangPlan;
use tessera_core::{Demand, GangRef, NodeName, PodKey};

/// Where a planned gang's held binds stand.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Barrier {
    /// Some planned members have not reached bind yet.
    Waiting,
    /// Every planned member reached bind: each goes ahead.
    Open,
    /// The plan was dropped (deadline or an error); every held bind fails with this.
    Failed(String),
}

/// One gang: members seen at filter, the reserved plan, and the bind barrier.
#[derive(Debug)]
pub(crate) struct GangState {
    pub(crate) min_member: u32,
    pub(crate) timeout_ms: u64,
    /// Pending members and when filter last saw each (ms).
    pub(crate) members: BTreeMap<PodKey, (Demand, u64)>,
    pub(crate) plan: Option<GangPlan>,
    /// The plan's deadline as written in its members' reservation annotations.
    pub(crate) deadline: Option<String>,
    pub(crate) arrived: BTreeSet<PodKey>,
    pub(crate) barrier: tokio::sync::watch::Sender<Barrier>,
    /// Nodes kube-scheduler refused for a member (its filter came without the planned node,
    /// or the plan lapsed before the member reached bind), until when (ms): later plans leave
    /// them out for that member.
    pub(crate) refused: BTreeMap<PodKey, BTreeMap<NodeName, u64>>,
}

impl GangState {
    pub(crate) fn new(g: &GangRef) -> Self {
        Self {
            min_member: g.min_member,
            timeout_ms: g.timeout_ms,
            members: BTreeMap::new(),
            plan: None,
            deadline: None,
            arrived: BTreeSet::new(),
            barrier: tokio::sync::watch::channel(Barrier::Waiting).0,
            refused: BTreeMap::new(),
        }
    }

    /// Remembers that kube-scheduler will not put `pod` on `node` (for [`REFUSAL_MS`]).
    pub(crate) fn refuse(&mut self, pod: &PodKey, node: &NodeName, now_ms: u64) {
        self.refused.entry(pod.clone()).or_default().insert(node.clone(), now_ms + REFUSAL_MS);
    }

    /// Members of the plan that have not reached bind, with their planned nodes.
    pub(crate) fn unarrived(&self) -> Vec<(PodKey, NodeName)> {
        self.plan
            .iter()
            .flat_map(|p| p.members.iter())
            .filter(|(k, _)| !self.arrived.contains(k))
            .map(|(k, p)| (k.clone(), p.node.clone()))
            .collect()
    }

    pub(crate) fn planned(&self, pod: &PodKey) -> bool {
        self.plan.as_ref().is_some_and(|p| p.members.iter().any(|(k, _)| k == pod))
    }
}

/// How long a node kube-scheduler refused for a gang member stays out of that member's plans.
pub const REFUSAL_MS: u64 = 5 * 60_000;
