//! Read-only views: packing, `/metrics`, the cluster map, explain and pending.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use tessera_api::views::{
    AllocationState, AllocationView, ClusterView, Explanation, GpuView, MigView, NodeReason, NodeResult, NodeView,
    PackingView, PendingState, PendingView,
};
use tessera_core::metrics::{Packing, packing};
use tessera_core::policy::{NodeVerdict, Workload};
use tessera_core::{Demand, Grant, NodeName, PodKey, Snapshot};

use crate::state::Scheduler;

pub(crate) fn verdict_kind(v: &NodeVerdict) -> NodeResult {
    match &v.outcome {
        Ok(_) => NodeResult::Fits,
        Err(r) if r.is_unresolvable() => NodeResult::Unresolvable,
        Err(_) => NodeResult::Unschedulable,
    }
}

impl Scheduler {
    /// Packing per pool and for the whole cluster; also updates the gauges. Measured against
    /// the shapes the cluster's allocations hold ([`allocation_workload`]), so two replicas (or
    /// one before and after a restart) with the same allocations report the same numbers.
    /// Reconfigurations are the MIG operations nodes applied for this replica's binds (demo
    /// mode: the ones its in-memory cluster applied).
    pub fn packing(&self) -> (Packing, BTreeMap<String, Packing>) {
        let inner = self.lock();
        let reconfigs = if self.settings.mode == "demo" {
            inner.snap.reconfigs().saturating_sub(inner.base_reconfigs)
        } else {
            inner.reconfigs_done
        };
        let workload = allocation_workload(&inner.snap);
        let mut pools: BTreeMap<String, Packing> = BTreeMap::new();
        let names: std::collections::BTreeSet<String> =
            inner.snap.nodes().iter().map(|n| n.pool().to_owned()).collect();
        for pool in names {
            let p = packing(&inner.snap, &workload, |n| n.pool() == pool);
            pools.insert(pool, p);
        }
        self.metrics.set_pools(&pools);
        self.metrics.mig_reconfigs.set(i64::try_from(reconfigs).unwrap_or(i64::MAX));
        let mut all = packing(&inner.snap, &workload, |_| true);
        // Report reconfigurations tessera caused, not the layouts that existed when it started.
        all.reconfigs = reconfigs;
        for p in pools.values_mut() {
            p.reconfigs = reconfigs;
        }
        let reserved = inner
            .snap
            .allocations()
            .values()
            .filter(|a| a.reserved_until_ms.is_some() || inner.cache.contains_key(&a.pod))
            .count();
        self.metrics.reservations.set(reserved as i64);
        (all, pools)
    }

    /// The `/metrics` text, with packing gauges refreshed.
    pub fn metrics_text(&self) -> String {
        let _ = self.packing();
        self.metrics.encode()
    }

    /// `GET /api/v1/cluster`.
    pub fn cluster_view(&self) -> ClusterView {
        let (all, pools) = self.packing();
        let inner = self.lock();
        let snap = &inner.snap;
        let holders = |node: &NodeName| -> HashMap<(u32, Option<u8>), Vec<String>> {
            let mut m: HashMap<(u32, Option<u8>), Vec<String>> = HashMap::new();
            for a in snap.allocations().values().filter(|a| a.node == *node) {
                for g in &a.grants {
                    let k = match *g {
                        Grant::Mig { gpu, start, .. } => (gpu, Some(start)),
                        other => (other.gpu(), None),
                    };
                    m.entry(k).or_default().push(a.pod.0.clone());
                }
            }
            m
        };
        let nodes = snap
            .nodes()
            .iter()
            .map(|n| {
                let h = holders(&n.name);
                NodeView {
                    name: n.name.0.clone(),
                    pool: n.pool().to_owned(),
                    schedulable: n.schedulable,
                    cpu_milli: n.cpu_milli,
                    used_cpu_milli: n.used_cpu_milli(),
                    memory_mib: n.memory_mib,
                    used_memory_mib: n.used_memory_mib(),
                    labels: n.labels.clone(),
                    pods: n.pods().iter().map(|p| p.0.clone()).collect(),
                    gpus: n
                        .gpus
                        .iter()
                        .map(|g| {
                            let view = tessera_core::metrics::GpuView::of(g);
                            GpuView {
                                index: g.index,
                                uuid: g.uuid.clone(),
                                model: g.model.clone(),
                                memory_mib: g.memory_mib,
                                numa: g.numa,
                                healthy: g.healthy,
                                mode: g.mode(),
                                allocated_milli: g.allocated_milli(),
                                free_milli: view.free(),
                                holders: h.get(&(g.index, None)).cloned().unwrap_or_default(),
                                largest_placeable: view.largest_placeable().map(|p| p.name.to_owned()),
                                memory_slices: g.mig_product().map(|p| p.geometry().memory_slices),
                                compute_slices: g.mig_product().map(|p| p.geometry().compute_slices),
                                mig: g
                                    .mig_layout()
                                    .map(|l| {
                                        l.instances()
                                            .iter()
                                            .map(|i| {
                                                let p = l.geometry().profile(i.class);
                                                MigView {
                                                    profile: p.map_or("?", |p| p.name).to_owned(),
                                                    start: i.start,
                                                    memory_slices: p.map_or(0, |p| p.memory_slices),
                                                    compute_slices: p.map_or(0, |p| p.compute_slices),
                                                    uuid: inner
                                                        .mig_uuids
                                                        .get(&(n.name.clone(), g.index, i.start))
                                                        .cloned(),
                                                    holder: h
                                                        .get(&(g.index, Some(i.start)))
                                                        .and_then(|v| v.first().cloned()),
                                                }
                                            })
                                            .collect()
                                    })
                                    .unwrap_or_default(),
                            }
                        })
                        .collect(),
                }
            })
            .collect();
        let allocations = snap
            .allocations()
            .values()
            .map(|a| AllocationView {
                state: if a.reserved_until_ms.is_some() {
                    AllocationState::Reserved
                } else if inner.cache.contains_key(&a.pod) {
                    AllocationState::Assumed
                } else {
                    AllocationState::Bound
                },
                allocation: a.clone(),
            })
            .collect();
        ClusterView {
            mode: self.settings.mode.to_owned(),
            policy: self.policy.name().to_owned(),
            generation: inner.generation,
            leader: Some(self.is_leader()),
            nodes,
            allocations,
            packing: PackingView { cluster: all, pools },
        }
    }

    /// `GET /api/v1/explain/{ns}/{pod}`: the parsed demand and every node's verdict from the
    /// last filter of that pod, plus what it holds now.
    pub fn explain(&self, key: &PodKey) -> Option<Explanation> {
        let inner = self.lock();
        let seen = inner.seen.get(key);
        let allocation = inner.snap.allocation(key).cloned();
        if seen.is_none() && allocation.is_none() {
            return None;
        }
        Some(Explanation {
            pod: key.0.clone(),
            uid: seen.map(|s| s.uid.clone()).unwrap_or_default(),
            demand: seen.and_then(|s| s.demand.as_ref().ok().cloned()),
            error: seen.and_then(|s| s.demand.as_ref().err().cloned()),
            filtered_at_ms: seen.map(|s| s.at_ms),
            stale: seen.is_some_and(|s| s.generation != inner.generation),
            nodes: seen
                .map(|s| {
                    s.verdicts
                        .iter()
                        .map(|v| NodeReason {
                            node: v.node.0.clone(),
                            result: verdict_kind(v),
                            reason: v.outcome.as_ref().err().map(|r| r.to_string()),
                            score: v.outcome.as_ref().ok().map(|(_, s)| s.node),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            allocation,
        })
    }
}

/// The workload packing metrics are measured against: the shapes the allocations hold (MIG
/// profile, whole-GPU count, share), as many times as they are held. A function of the
/// allocations alone, never of what this process happened to filter.
pub fn allocation_workload(snap: &Snapshot) -> Workload {
    use tessera_core::GpuDemand;
    let demands: Vec<Demand> = snap
        .allocations()
        .values()
        .filter_map(|a| {
            let node = snap.node(&a.node)?;
            let gpu = match a.grants.as_slice() {
                [] => GpuDemand::None,
                [Grant::Mig { gpu, class, .. }] => GpuDemand::Mig {
                    profile: node.gpu(*gpu)?.mig_product()?.geometry().profile(*class)?.name.to_owned(),
                },
                [Grant::Share { milli, .. }] => GpuDemand::Share { milli: *milli },
                gs => GpuDemand::Whole { count: u32::try_from(gs.len()).unwrap_or(u32::MAX) },
            };
            Some(Demand::new(a.pod.clone(), gpu).with_cpu(a.cpu_milli, a.memory_mib))
        })
        .collect();
    Workload::from_demands_top(demands.iter(), 0.95)
}

impl Scheduler {
    /// Pods filtered by this replica that hold no devices or only a gang reservation, sorted by
    /// name. Pods the cluster reports bound, finished or gone are left out.
    pub fn pending(&self) -> Vec<PendingView> {
        let mut out: Vec<PendingView> = {
            let inner = self.lock();
            inner
                .seen
                .iter()
                .filter_map(|(key, seen)| {
                    let state = match inner.snap.allocation(key) {
                        None => PendingState::Pending,
                        Some(a) if a.reserved_until_ms.is_some() => PendingState::Reserved,
                        Some(_) => return None,
                    };
                    // Counted without the `node NAME: ` prefix, so one cause on many nodes adds up.
                    // Reasons that can change (unschedulable now) come before "never fits".
                    let mut reasons: BTreeMap<(bool, Cow<'_, str>), usize> = BTreeMap::new();
                    for v in seen.verdicts.iter() {
                        if let Err(r) = &v.outcome {
                            let why = match r.node() {
                                Some(n) if *n != v.node => r.reason(),
                                _ => Cow::Borrowed(r.cause()),
                            };
                            *reasons.entry((!r.is_unresolvable(), why)).or_default() += 1;
                        }
                    }
                    let reason = reasons
                        .iter()
                        .max_by_key(|((changeable, why), n)| (*changeable, **n, std::cmp::Reverse(why)))
                        .map(|((_, why), _)| why.to_string());
                    Some(PendingView {
                        pod: key.0.clone(),
                        state,
                        gang: seen.demand.as_ref().ok().and_then(|d| d.gang.as_ref()).map(|g| g.name.clone()),
                        demand: match &seen.demand {
                            Ok(d) => d.gpu.to_string(),
                            Err(e) => format!("invalid: {e}"),
                        },
                        filtered_at_ms: seen.at_ms,
                        stale: seen.generation != inner.generation,
                        fits: seen.verdicts.iter().filter(|v| v.outcome.is_ok()).count(),
                        nodes: seen.verdicts.len(),
                        reason,
                    })
                })
                .collect()
        };
        // The lookup takes its own locks; ask it without ours.
        out.retain(|p| {
            let Some((ns, name)) = p.pod.split_once('/') else { return false };
            self.lookup.pod(ns, name).is_some_and(|pod| {
                let bound = pod.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
                let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
                !bound && !matches!(phase, Some("Succeeded" | "Failed"))
            })
        });
        out.sort_by(|a, b| a.pod.cmp(&b.pod));
        out
    }
}
