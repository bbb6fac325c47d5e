//! The assume cache: pods this replica bound (or is binding) that the informer has not shown
//! yet, and the last rebuild of the cluster they are laid over.
//!
//! In live mode the state is a rebuild from the API with this replica's own knowledge laid
//! over it: the assumed pods and every gang plan's reservations ([`AssumeCache::lay_over`]).
//! Laying over again after a plan is dropped makes the MIG instances only it assumed disappear.

use std::collections::BTreeMap;
use std::sync::Arc;

use tessera_core::gang::GangPlan;
use tessera_core::{Allocation, Demand, Placement, PodKey, Snapshot};

use crate::gangs::GangBook;

/// A pod this replica bound (or is binding) that the informer has not reported bound yet.
#[derive(Clone, Debug)]
pub(crate) struct Assumed {
    pub(crate) placement: Placement,
    pub(crate) demand: Demand,
    pub(crate) at_ms: u64,
}

/// The assumed pods and the last rebuild.
#[derive(Debug, Default)]
pub(crate) struct AssumeCache {
    assumed: BTreeMap<PodKey, Assumed>,
    /// The cluster as last rebuilt from the API (live mode), before the assume cache and the
    /// gang reservations are laid over it: what the nodes report, nothing planned.
    base: Option<Arc<Snapshot>>,
}

impl AssumeCache {
    pub(crate) fn insert(&mut self, pod: PodKey, a: Assumed) {
        self.assumed.insert(pod, a);
    }

    pub(crate) fn remove(&mut self, pod: &PodKey) {
        self.assumed.remove(pod);
    }

    pub(crate) fn contains_key(&self, pod: &PodKey) -> bool {
        self.assumed.contains_key(pod)
    }

    pub(crate) fn len(&self) -> usize {
        self.assumed.len()
    }

    /// The last rebuild (live mode).
    pub(crate) fn base(&self) -> Option<&Arc<Snapshot>> {
        self.base.as_ref()
    }

    pub(crate) fn set_base(&mut self, snap: Arc<Snapshot>) {
        self.base = Some(snap);
    }

    /// Whether the last rebuild and `state` are one snapshot (nothing laid over it).
    pub(crate) fn shares_base(&self, state: &Arc<Snapshot>) -> bool {
        self.base.as_ref().is_some_and(|b| Arc::ptr_eq(b, state))
    }

    /// `pod` was released from the state: release it from the last rebuild too (`shared`: the
    /// two were one snapshot before, and `state` serves as both again).
    pub(crate) fn release_from_base(&mut self, pod: &PodKey, shared: bool, state: &Arc<Snapshot>) {
        if shared {
            self.base = Some(state.clone());
        } else if let Some(base) = self.base.as_mut()
            && base.allocation(pod).is_some()
        {
            let _ = Arc::make_mut(base).release(pod);
        }
    }

    /// Lays the cache over `snap` (a rebuild): pods the rebuild shows leave the cache (and,
    /// with `expire` = (now, ttl), assumed pods older than ttl); the rest and every plan in
    /// `gangs` are applied again. Returns the state and the gangs whose plans no longer fit.
    pub(crate) fn lay_over(
        &mut self,
        mut snap: Arc<Snapshot>,
        expire: Option<(u64, u64)>,
        gangs: &GangBook,
    ) -> (Arc<Snapshot>, Vec<String>) {
        // Shared with `base` until something is laid over it: a rebuild with nothing assumed and
        // no plan costs no copy.
        let mut keep = BTreeMap::new();
        for (key, a) in std::mem::take(&mut self.assumed) {
            if snap.allocation(&key).is_some() || expire.is_some_and(|(now, ttl)| now.saturating_sub(a.at_ms) > ttl) {
                continue;
            }
            let alloc = Allocation {
                pod: key.clone(),
                node: a.placement.node.clone(),
                cpu_milli: a.demand.cpu_milli,
                memory_mib: a.demand.memory_mib,
                grants: a.placement.grants.clone(),
                priority: a.demand.priority,
                gang: a.demand.gang.as_ref().map(|g| g.name.clone()),
                reserved_until_ms: None,
                extended: a.demand.rules.extended.clone(),
            };
            // The instances may exist by now (node agent done); if not, create them again.
            let s = Arc::make_mut(&mut snap);
            let ok = s.allocate(alloc).is_ok() || a.placement.apply(s, &a.demand, None).is_ok();
            if ok {
                keep.insert(key, a);
            } else {
                tracing::warn!(pod = %key, node = %a.placement.node, "Assumed pod no longer fits the observed state; forgetting it");
            }
        }
        self.assumed = keep;
        // Gang reservations exist only here: lay them over the rebuilt state again.
        let mut broken = Vec::new();
        let plans: Vec<(String, GangPlan)> = gangs.plans();
        for (name, plan) in plans {
            for (pod, placement) in &plan.members {
                if snap.allocation(pod).is_some() {
                    continue;
                }
                let Some(demand) = gangs.get(&name).and_then(|st| st.members.get(pod)).map(|(d, _)| d.clone()) else {
                    broken.push(name.clone());
                    break;
                };
                let alloc = Allocation {
                    pod: pod.clone(),
                    node: placement.node.clone(),
                    cpu_milli: demand.cpu_milli,
                    memory_mib: demand.memory_mib,
                    grants: placement.grants.clone(),
                    priority: demand.priority,
                    gang: Some(name.clone()),
                    reserved_until_ms: Some(plan.deadline_ms),
                    extended: demand.rules.extended.clone(),
                };
                let ok = Arc::make_mut(&mut snap).allocate(alloc).is_ok()
                    || placement.apply(Arc::make_mut(&mut snap), &demand, Some(plan.deadline_ms)).is_ok();
                if !ok {
                    broken.push(name.clone());
                    break;
                }
            }
        }
        (snap, broken)
    }
}

#[cfg(test)]
mod tests {
    use tessera_core::{GpuDemand, Grant, Node, NodeName};

    use super::*;

    fn whole(pod: &str, gpu: u32) -> (Placement, Demand) {
        let placement =
            Placement { node: NodeName("n1".into()), grants: vec![Grant::Whole { gpu }], ops: Vec::new(), score: 0.0 };
        (placement, Demand::new(pod, GpuDemand::Whole { count: 1 }))
    }

    #[test]
    fn assumed_pods_are_laid_over_a_rebuild_until_it_shows_them_or_they_expire() {
        let rebuild = || Arc::new(Snapshot::new([Node::test("n1").with_gpus(2, "H100-80GB")]).unwrap());
        let mut cache = AssumeCache::default();
        for (pod, gpu, at_ms) in [("ml/a", 0, 0), ("ml/b", 1, 9_000)] {
            let (placement, demand) = whole(pod, gpu);
            cache.insert(PodKey::from(pod), Assumed { placement, demand, at_ms });
        }
        let base = rebuild();
        let (snap, broken) = cache.lay_over(base.clone(), None, &GangBook::default());
        assert!(broken.is_empty());
        assert!(snap.allocation(&PodKey::from("ml/a")).is_some() && snap.allocation(&PodKey::from("ml/b")).is_some());
        // The rebuild itself is left as the API showed it.
        assert!(base.allocation(&PodKey::from("ml/a")).is_none());
        assert_eq!(cache.len(), 2);

        // A rebuild that shows ml/a bound takes it out of the cache; ml/a is older than the ttl.
        let mut shown = Snapshot::new([Node::test("n1").with_gpus(2, "H100-80GB")]).unwrap();
        let (placement, demand) = whole("ml/a", 0);
        placement.apply(&mut shown, &demand, None).unwrap();
        let (snap, _) = cache.lay_over(Arc::new(shown), Some((10_000, 5_000)), &GangBook::default());
        assert!(!cache.contains_key(&PodKey::from("ml/a")) && cache.contains_key(&PodKey::from("ml/b")));
        assert!(snap.allocation(&PodKey::from("ml/b")).is_some());

        // Past its ttl, ml/b is forgotten too; the last rebuild is then the state as it is.
        let (snap, _) = cache.lay_over(rebuild(), Some((20_000, 5_000)), &GangBook::default());
        assert_eq!(cache.len(), 0);
        assert!(snap.allocations().is_empty());
    }
}
