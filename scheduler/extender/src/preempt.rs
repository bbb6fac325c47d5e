//! The preempt verb: kube-scheduler's proposed victims, kept only where they let the pod fit, never part of a gang.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tessera_api::pod::{self as podparse};
use tessera_core::gang::{self};
use tessera_core::policy::{self};
use tessera_core::{Context, Demand, NodeName, PodKey, Snapshot};

use crate::error::Error;
use crate::wire::{ExtenderPreemptionArgs, ExtenderPreemptionResult, MetaPod, MetaVictims};

use crate::state::{Inner, Scheduler};

impl Scheduler {
    /// Accepts the candidate nodes where evicting the proposed victims lets the pod fit, keeps
    /// only the victims that are needed, and never splits a gang.
    pub fn preempt(&self, args: ExtenderPreemptionArgs) -> Result<ExtenderPreemptionResult, Error> {
        let pod = args.pod.ok_or_else(|| Error::BadRequest("ExtenderPreemptionArgs.Pod is null".into()))?;
        let key = podparse::pod_key(&pod).map_err(|e| Error::BadRequest(e.to_string()))?;
        let demand = self.demand_of(&pod).map_err(|e| Error::BadRequest(format!("pod {key}: {e}")))?;
        let candidates: BTreeMap<String, (Vec<String>, i64)> =
            match (args.node_name_to_meta_victims, args.node_name_to_victims) {
                (Some(meta), _) => meta
                    .into_iter()
                    .map(|(n, v)| {
                        (n, (v.pods.unwrap_or_default().into_iter().map(|p| p.uid).collect(), v.num_pdb_violations))
                    })
                    .collect(),
                (None, Some(full)) => full
                    .into_iter()
                    .map(|(n, v)| {
                        let uids = v.pods.unwrap_or_default().into_iter().filter_map(|p| p.metadata.uid).collect();
                        (n, (uids, v.num_pdb_violations))
                    })
                    .collect(),
                (None, None) => return Err(Error::BadRequest("no candidate nodes (both victim maps are null)".into())),
            };
        let mut inner = self.lock();
        let mut accepted = BTreeMap::new();
        // First the core's choice: the cheapest whole units (single pods or whole gangs)
        // cluster-wide, offered on every candidate node that holds all of them on that node.
        let members: Vec<Demand> = match &demand.gang {
            Some(g) => inner
                .gangs
                .get(&g.name)
                .map(|st| {
                    st.members
                        .values()
                        .map(|(d, _)| d.clone())
                        .filter(|d| inner.snap.allocation(&d.pod).is_none())
                        .collect()
                })
                .unwrap_or_else(|| vec![demand.clone()]),
            None => vec![demand.clone()],
        };
        let ctx = Context { workload: &inner.workload, seed: self.settings.seed };
        let core = gang::preemption_victims(&inner.snap, &members, self.policy.as_ref(), &ctx).unwrap_or_default();
        let by_key: HashMap<&PodKey, &String> = inner.uids.iter().map(|(u, k)| (k, u)).collect();
        for (node, (uids, pdb)) in &candidates {
            let name = NodeName(node.clone());
            let here: Vec<&PodKey> =
                core.iter().filter(|k| inner.snap.allocation(k).is_some_and(|a| a.node == name)).collect();
            let all_here = !here.is_empty() && here.len() == core.len();
            let offered = here.iter().all(|k| by_key.get(k).is_some_and(|u| uids.contains(u)));
            if all_here && offered {
                let pods = here.iter().filter_map(|k| by_key.get(k)).map(|u| MetaPod { uid: (*u).clone() }).collect();
                accepted.insert(node.clone(), MetaVictims { pods: Some(pods), num_pdb_violations: *pdb });
            }
        }
        if !accepted.is_empty() {
            self.metrics.decision("preempt", "victims");
            return Ok(ExtenderPreemptionResult { node_name_to_meta_victims: Some(accepted) });
        }
        // Otherwise per candidate node: the fewest of kube-scheduler's proposed victims that
        // let the pod fit there, whole gangs only.
        for (node, (uids, pdb)) in candidates {
            let name = NodeName(node.clone());
            let Some(chosen) = self.victims_on(&mut inner, &demand, &name, &uids) else {
                continue;
            };
            if chosen.is_empty() {
                continue;
            }
            let pods = chosen.into_iter().map(|uid| MetaPod { uid }).collect();
            accepted.insert(node, MetaVictims { pods: Some(pods), num_pdb_violations: pdb });
        }
        self.metrics.decision("preempt", if accepted.is_empty() { "none" } else { "victims" });
        Ok(ExtenderPreemptionResult { node_name_to_meta_victims: Some(accepted) })
    }

    /// The subset of `uids` whose eviction lets `demand` fit on `node`, or `None`.
    pub(crate) fn victims_on(
        &self,
        inner: &mut Inner,
        demand: &Demand,
        node: &NodeName,
        uids: &[String],
    ) -> Option<Vec<String>> {
        let mut victims: Vec<(String, PodKey, i32)> = Vec::new();
        for uid in uids {
            let key = inner.uids.get(uid)?.clone();
            let prio = inner.snap.allocation(&key).map_or(i32::MIN, |a| a.priority);
            victims.push((uid.clone(), key, prio));
        }
        // Whole gangs only: every member of a victim's gang must be a victim on this node.
        for (_, key, _) in &victims {
            if let Some(g) = inner.snap.allocation(key).and_then(|a| a.gang.clone()) {
                let all_in = inner
                    .snap
                    .allocations()
                    .values()
                    .filter(|a| a.gang.as_deref() == Some(g.as_str()))
                    .all(|a| victims.iter().any(|(_, k, _)| *k == a.pod));
                if !all_in {
                    return None;
                }
            }
        }
        let fits = |snap: &mut Snapshot, evict: &[&PodKey]| {
            let cp = snap.checkpoint();
            for k in evict {
                if snap.allocation(k).is_some() {
                    let _ = snap.release(k);
                }
            }
            let ctx = Context { workload: &inner.workload, seed: self.settings.seed };
            let ok = policy::evaluate(snap, demand, self.policy.as_ref(), &ctx, Some(std::slice::from_ref(node)))
                .is_ok_and(|v| v.first().is_some_and(|v| v.outcome.is_ok()));
            snap.rollback(cp);
            ok
        };
        let mut keep: Vec<usize> = (0..victims.len()).collect();
        if !fits(Arc::make_mut(&mut inner.snap), &keep.iter().map(|&i| &victims[i].1).collect::<Vec<_>>()) {
            return None;
        }
        // Spare the highest-priority victims first, as long as the pod still fits; gang members
        // stay (sparing part of a gang would split it).
        let mut order = keep.clone();
        order.sort_by_key(|&i| std::cmp::Reverse(victims[i].2));
        for i in order {
            if inner.snap.allocation(&victims[i].1).is_some_and(|a| a.gang.is_some()) {
                continue;
            }
            let trial: Vec<usize> = keep.iter().copied().filter(|&j| j != i).collect();
            if fits(Arc::make_mut(&mut inner.snap), &trial.iter().map(|&j| &victims[j].1).collect::<Vec<_>>()) {
                keep = trial;
            }
        }
        Some(keep.into_iter().map(|i| victims[i].0.clone()).collect())
    }
}
