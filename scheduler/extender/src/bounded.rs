//! What the last filter saw per pod, in a map capped in size.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tessera_core::policy::NodeVerdict;
use tessera_core::{Demand, PodKey, Snapshot};

/// What the last filter saw for one pod.
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    pub(crate) uid: String,
    pub(crate) demand: Result<Demand, String>,
    pub(crate) generation: u64,
    pub(crate) at_ms: u64,
    /// Shared with the filter's [`FilterReply`], which is written from them.
    pub(crate) verdicts: Arc<Vec<NodeVerdict>>,
    /// How the verdicts refuse the pod, worked out once when the filter stores them: every pod
    /// deletion asks ([`Bounded::refused_everywhere`]), and a scan of each remembered pod's
    /// verdicts on every node, under the scheduler's lock, competed with the filters.
    pub(crate) refused: Refused,
}

/// What a filter's verdicts say about the pod as a whole.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Refused {
    /// Some node was offered and every offered node refused it.
    pub(crate) everywhere: bool,
    /// Some node refused it for something freeing capacity may change (not only for what the
    /// node lacks).
    pub(crate) for_capacity: bool,
}

impl Refused {
    pub(crate) fn of(verdicts: &[NodeVerdict]) -> Self {
        Self {
            everywhere: !verdicts.is_empty() && verdicts.iter().all(|v| v.outcome.is_err()),
            for_capacity: verdicts.iter().any(|v| v.outcome.as_ref().is_err_and(|r| !r.is_unresolvable())),
        }
    }
}

/// A map that forgets its oldest entries past `cap`.
#[derive(Debug)]
pub(crate) struct Bounded<V> {
    map: HashMap<PodKey, V>,
    order: VecDeque<PodKey>,
    cap: usize,
}

impl<V> Bounded<V> {
    pub(crate) fn new(cap: usize) -> Self {
        Self { map: HashMap::new(), order: VecDeque::new(), cap }
    }
    /// Inserts; returns what was evicted or replaced, for the caller to drop outside its lock.
    pub(crate) fn insert(&mut self, k: PodKey, v: V) -> Vec<V> {
        let mut gone = Vec::new();
        match self.map.insert(k.clone(), v) {
            Some(old) => gone.push(old),
            None => self.order.push_back(k),
        }
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front().and_then(|k| self.map.remove(&k)) {
                gone.push(old);
            }
        }
        gone
    }
    pub(crate) fn get(&self, k: &PodKey) -> Option<&V> {
        self.map.get(k)
    }
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&PodKey, &V)> {
        self.map.iter()
    }
    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.map.values()
    }
}

impl Bounded<Seen> {
    /// Whether a member of `gang` was filtered (and is still remembered).
    pub(crate) fn saw_gang(&self, gang: &str) -> bool {
        self.values().any(|s| s.demand.as_ref().is_ok_and(|d| d.gang.as_ref().is_some_and(|g| g.name == gang)))
    }

    /// Pods refused on every node at their last filter within the ten minutes before `now_ms`,
    /// holding nothing in `snap`: with `any_reason`, also those refused only for what a node
    /// lacks (no GPUs yet, no GPU of the model), which a node's new GPUs may change.
    pub(crate) fn refused_everywhere(&self, snap: &Snapshot, now_ms: u64, any_reason: bool) -> Vec<PodKey> {
        self.iter()
            .filter(|(k, s)| {
                now_ms.saturating_sub(s.at_ms) <= 10 * 60_000
                    && snap.allocation(k).is_none()
                    && s.demand.is_ok()
                    && s.refused.everywhere
                    && (any_reason || s.refused.for_capacity)
            })
            .map(|(k, _)| k.clone())
            .collect()
    }
}
