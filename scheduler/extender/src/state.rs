//! The scheduler's state and the four extender verbs over it, independent of HTTP.
//!
//! One [`Scheduler`] owns the core [`Snapshot`] (behind a mutex: decisions are short and
//! CPU-bound), the assume cache of pods this replica bound but the informer has not shown yet,
//! the last filter verdicts per pod (for prioritize and for `explain`), and the effects seam
//! ([`Binder`]). In live mode the snapshot's base is rebuilt from the reflectors
//! ([`Scheduler::replace_base`]) and the assume cache is laid over it, so a pod being bound
//! counts at once and is never counted twice.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use serde::Serialize;
use tessera_api::annotations;
use tessera_api::gpunode::{GpuSpec, MigInstanceSpec, Mode};
use tessera_api::pod::{self as podparse, PodError};
use tessera_api::podgroup::PodGroupSpec;
use tessera_api::{AssignedDevice, Assignment};
use tessera_core::metrics::{Packing, packing};
use tessera_core::policy::{self, NodeVerdict, Workload};
use tessera_core::{Allocation, Context, Demand, GpuMode, Grant, MigOp, NodeName, Placement, PodKey, Policy, Snapshot};

use crate::binder::{BindRequest, Binder, WantedInstance};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::wire::{
    ExtenderArgs, ExtenderBindingArgs, ExtenderBindingResult, ExtenderFilterResult, ExtenderPreemptionArgs,
    ExtenderPreemptionResult, FailedNodesMap, HostPriority, MetaPod, MetaVictims, NodeList,
};

/// Pods and PodGroups by name, from the reflector stores (live) or memory (demo).
pub trait Lookup: Send + Sync + fmt::Debug {
    fn pod(&self, namespace: &str, name: &str) -> Option<Pod>;
    fn pod_group(&self, namespace: &str, name: &str) -> Option<PodGroupSpec>;
}

/// A [`Lookup`] held in memory: demo mode and tests.
#[derive(Debug, Default)]
pub struct MemoryLookup {
    pub pods: RwLock<BTreeMap<(String, String), Pod>>,
    pub groups: RwLock<BTreeMap<(String, String), PodGroupSpec>>,
}

impl MemoryLookup {
    pub fn add_group(&self, namespace: &str, name: &str, spec: PodGroupSpec) {
        if let Ok(mut g) = self.groups.write() {
            g.insert((namespace.to_owned(), name.to_owned()), spec);
        }
    }
}

impl Lookup for MemoryLookup {
    fn pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        self.pods.read().ok()?.get(&(namespace.to_owned(), name.to_owned())).cloned()
    }
    fn pod_group(&self, namespace: &str, name: &str) -> Option<PodGroupSpec> {
        self.groups.read().ok()?.get(&(namespace.to_owned(), name.to_owned())).cloned()
    }
}

/// Tunables of the verbs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `demo` or `live`, shown by `/api/v1/cluster`.
    pub mode: &'static str,
    /// How long a bind may wait for a node to report a new MIG instance.
    pub mig_timeout: Duration,
    /// Seed for policy tie-breaks.
    pub seed: u64,
    /// How long an assumed pod waits to be seen bound before it is forgotten.
    pub assume_ttl: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self { mode: "demo", mig_timeout: Duration::from_secs(30), seed: 0, assume_ttl: Duration::from_secs(300) }
    }
}

/// A pod this replica bound (or is binding) that the informer has not reported bound yet.
#[derive(Clone, Debug)]
struct Assumed {
    placement: Placement,
    demand: Demand,
    at_ms: u64,
}

/// What the last filter saw for one pod.
#[derive(Clone, Debug)]
struct Seen {
    uid: String,
    demand: Result<Demand, String>,
    generation: u64,
    at_ms: u64,
    verdicts: Vec<NodeVerdict>,
}

/// A map that forgets its oldest entries past `cap`.
#[derive(Debug)]
struct Bounded<V> {
    map: HashMap<PodKey, V>,
    order: VecDeque<PodKey>,
    cap: usize,
}

impl<V> Bounded<V> {
    fn new(cap: usize) -> Self {
        Self { map: HashMap::new(), order: VecDeque::new(), cap }
    }
    fn insert(&mut self, k: PodKey, v: V) {
        if self.map.insert(k.clone(), v).is_none() {
            self.order.push_back(k);
        }
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }
    fn get(&self, k: &PodKey) -> Option<&V> {
        self.map.get(k)
    }
}

#[derive(Debug)]
struct Inner {
    snap: Snapshot,
    /// Bumped on every change of `snap`; cached verdicts are valid only for their generation.
    generation: u64,
    workload: Workload,
    recent: VecDeque<Demand>,
    seen: Bounded<Seen>,
    uids: HashMap<String, PodKey>,
    assumed: BTreeMap<PodKey, Assumed>,
    /// MIG instance UUIDs by (node, gpu, start), as the node agents report them.
    mig_uuids: HashMap<(NodeName, u32, u8), String>,
    /// Reconfigurations counted by the snapshot when its base was built (layouts that existed).
    base_reconfigs: u64,
}

/// The scheduler: state plus the extender verbs.
pub struct Scheduler {
    inner: Mutex<Inner>,
    policy: Box<dyn Policy>,
    binder: Arc<dyn Binder>,
    lookup: Arc<dyn Lookup>,
    pub metrics: Metrics,
    settings: Settings,
    origin: tokio::time::Instant,
    leader: AtomicBool,
    synced: AtomicBool,
}

impl fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scheduler").field("policy", &self.policy.name()).field("settings", &self.settings).finish()
    }
}

const RECENT_DEMANDS: usize = 512;
const SEEN_PODS: usize = 4096;

fn verdict_kind(v: &NodeVerdict) -> &'static str {
    match &v.outcome {
        Ok(_) => "fits",
        Err(r) if r.is_unresolvable() => "unresolvable",
        Err(_) => "unschedulable",
    }
}

/// Names of the offered nodes: `NodeNames` (nodeCacheCapable) or the names in `Nodes`.
fn offered(nodes: &Option<NodeList>, names: &Option<Vec<String>>) -> Result<Vec<NodeName>, String> {
    match (names, nodes) {
        (Some(n), _) => Ok(n.iter().map(|s| NodeName(s.clone())).collect()),
        (None, Some(list)) => list
            .items
            .iter()
            .map(|n| {
                n.metadata.name.clone().map(NodeName).ok_or_else(|| "a node in Nodes has no metadata.name".to_owned())
            })
            .collect(),
        (None, None) => Err("both NodeNames and Nodes are null; nothing to filter".to_owned()),
    }
}

impl Scheduler {
    pub fn new(
        snap: Snapshot,
        policy: Box<dyn Policy>,
        binder: Arc<dyn Binder>,
        lookup: Arc<dyn Lookup>,
        settings: Settings,
    ) -> Self {
        let base_reconfigs = snap.reconfigs();
        Self {
            inner: Mutex::new(Inner {
                snap,
                generation: 1,
                workload: Workload::default(),
                recent: VecDeque::new(),
                seen: Bounded::new(SEEN_PODS),
                uids: HashMap::new(),
                assumed: BTreeMap::new(),
                mig_uuids: HashMap::new(),
                base_reconfigs,
            }),
            policy,
            binder,
            lookup,
            metrics: Metrics::new(),
            settings,
            origin: tokio::time::Instant::now(),
            leader: AtomicBool::new(true),
            synced: AtomicBool::new(true),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the snapshot half-changed (every change
        // is one checked call), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn policy_name(&self) -> &'static str {
        self.policy.name()
    }

    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Ordering::Relaxed);
        self.metrics.leader.set(i64::from(leader));
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    pub fn set_synced(&self, synced: bool) {
        self.synced.store(synced, Ordering::Relaxed);
    }

    /// Ready to answer: the cluster state has been read at least once.
    pub fn is_ready(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// Seeds the expected workload (demo mode: the placed model mix).
    pub fn set_workload(&self, workload: Workload) {
        self.lock().workload = workload;
    }

    /// Registers a pod UID (victims in preempt arrive by UID).
    pub fn remember_uid(&self, uid: &str, pod: PodKey) {
        self.lock().uids.insert(uid.to_owned(), pod);
    }

    /// Reads a pod's demand, looking up its PodGroup.
    pub fn demand_of(&self, pod: &Pod) -> Result<Demand, PodError> {
        let group = podparse::pod_group_name(pod).and_then(|g| {
            let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
            self.lookup.pod_group(ns, g)
        });
        podparse::demand(pod, group.as_ref())
    }

    /// Runs `f` on the snapshot (read only).
    pub fn with_snapshot<T>(&self, f: impl FnOnce(&Snapshot) -> T) -> T {
        f(&self.lock().snap)
    }

    // ---- filter ------------------------------------------------------------------------

    pub fn filter(&self, args: ExtenderArgs) -> ExtenderFilterResult {
        let names = match offered(&args.nodes, &args.node_names) {
            Ok(n) => n,
            Err(msg) => {
                self.metrics.decision("filter", "error");
                return ExtenderFilterResult::error(msg);
            }
        };
        let Some(pod) = args.pod else {
            self.metrics.decision("filter", "error");
            return ExtenderFilterResult::error("ExtenderArgs.Pod is null");
        };
        let key = match podparse::pod_key(&pod) {
            Ok(k) => k,
            Err(e) => {
                self.metrics.decision("filter", "error");
                return ExtenderFilterResult::error(e.to_string());
            }
        };
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let demand = self.demand_of(&pod);
        let mut inner = self.lock();
        if !uid.is_empty() {
            inner.uids.insert(uid.clone(), key.clone());
        }
        let verdicts = match &demand {
            Ok(d) => self.verdicts(&mut inner, d, &names),
            Err(e) => {
                let reason = format!("pod {key}: {e}");
                let outcome = |_: &NodeName| {
                    Err(if e.is_permanent() {
                        tessera_core::Rejection::Unresolvable(reason.clone())
                    } else {
                        tessera_core::Rejection::Unschedulable(reason.clone())
                    })
                };
                names.iter().map(|n| NodeVerdict { node: n.clone(), outcome: outcome(n) }).collect()
            }
        };
        let mut out = ExtenderFilterResult {
            failed_nodes: Some(FailedNodesMap::new()),
            failed_and_unresolvable_nodes: Some(FailedNodesMap::new()),
            ..Default::default()
        };
        let mut pass = Vec::new();
        for v in &verdicts {
            match &v.outcome {
                Ok(_) => pass.push(v.node.0.clone()),
                Err(r) => {
                    let map = if r.is_unresolvable() {
                        out.failed_and_unresolvable_nodes.as_mut()
                    } else {
                        out.failed_nodes.as_mut()
                    };
                    if let Some(m) = map {
                        m.insert(v.node.0.clone(), r.reason().to_owned());
                    }
                }
            }
        }
        let result = if pass.is_empty() { "unschedulable" } else { "fits" };
        self.metrics.decision("filter", if demand.is_err() { "invalid_pod" } else { result });
        let generation = inner.generation;
        let at_ms = self.now_ms();
        inner.seen.insert(key, Seen { uid, demand: demand.map_err(|e| e.to_string()), generation, at_ms, verdicts });
        drop(inner);
        match args.nodes {
            // Not nodeCacheCapable: answer with the Node objects that pass.
            Some(mut list) if args.node_names.is_none() => {
                list.items.retain(|n| n.metadata.name.as_ref().is_some_and(|name| pass.contains(name)));
                out.nodes = Some(list);
            }
            _ => out.node_names = Some(pass),
        }
        out
    }

    /// Per-node verdicts for a demand on the offered nodes.
    fn verdicts(&self, inner: &mut Inner, demand: &Demand, names: &[NodeName]) -> Vec<NodeVerdict> {
        inner.recent.push_back(demand.clone());
        if inner.recent.len() > RECENT_DEMANDS {
            inner.recent.pop_front();
        }
        // FGD's target workload: the popular shapes among recent demands (95% coverage).
        if inner.recent.len() % 64 == 1 || inner.workload.is_empty() {
            inner.workload = Workload::from_demands_top(inner.recent.iter(), 0.95);
        }
        if let Some(a) = inner.snap.allocation(&demand.pod) {
            // Already assumed or reserved: only its node.
            let here = a.node.clone();
            return names
                .iter()
                .map(|n| NodeVerdict {
                    node: n.clone(),
                    outcome: if *n == here {
                        Ok((
                            tessera_core::Candidate { node: 0, grants: a.grants.clone(), ops: Vec::new() },
                            policy::Score::default(),
                        ))
                    } else {
                        Err(tessera_core::Rejection::Unschedulable(format!(
                            "node {n}: pod {} already holds devices on {here}",
                            demand.pod
                        )))
                    },
                })
                .collect();
        }
        if let Some(g) = demand.gang.as_ref().filter(|g| g.min_member > 1) {
            // Gang planning is not wired into the extender: refusing is the only answer that
            // keeps all-or-nothing (placing members one by one could strand a partial gang).
            let reason = format!(
                "pod {}: gang {} (minMember {}) needs all-or-nothing planning, which this tessera-scheduler build does not do yet",
                demand.pod, g.name, g.min_member
            );
            return names
                .iter()
                .map(|n| NodeVerdict {
                    node: n.clone(),
                    outcome: Err(tessera_core::Rejection::Unschedulable(reason.clone())),
                })
                .collect();
        }
        let ctx = Context { workload: &inner.workload, seed: self.settings.seed };
        match policy::evaluate(&inner.snap, demand, self.policy.as_ref(), &ctx, Some(names)) {
            Ok(v) => v,
            Err(e) => names
                .iter()
                .map(|n| NodeVerdict {
                    node: n.clone(),
                    outcome: Err(tessera_core::Rejection::Unresolvable(format!("pod {}: {e}", demand.pod))),
                })
                .collect(),
        }
    }

    // ---- prioritize --------------------------------------------------------------------

    pub fn prioritize(&self, args: ExtenderArgs) -> Result<Vec<HostPriority>, Error> {
        let names = offered(&args.nodes, &args.node_names).map_err(Error::BadRequest)?;
        let pod = args.pod.ok_or_else(|| Error::BadRequest("ExtenderArgs.Pod is null".into()))?;
        let key = podparse::pod_key(&pod).map_err(|e| Error::BadRequest(e.to_string()))?;
        let mut inner = self.lock();
        let cached = inner.seen.get(&key).filter(|s| s.generation == inner.generation).and_then(|s| {
            let by_node: HashMap<&NodeName, &NodeVerdict> = s.verdicts.iter().map(|v| (&v.node, v)).collect();
            names.iter().map(|n| by_node.get(n).map(|v| (*v).clone())).collect::<Option<Vec<_>>>()
        });
        let verdicts = match cached {
            Some(v) => v,
            None => {
                let demand = self.demand_of(&pod).map_err(|e| Error::BadRequest(format!("pod {key}: {e}")))?;
                self.verdicts(&mut inner, &demand, &names)
            }
        };
        drop(inner);
        let scores: HashMap<NodeName, i64> = policy::extender_scores(&verdicts).into_iter().collect();
        self.metrics.decision("prioritize", "scored");
        Ok(names
            .iter()
            .map(|n| HostPriority { host: n.0.clone(), score: scores.get(n).copied().unwrap_or(0) })
            .collect())
    }

    // ---- bind --------------------------------------------------------------------------

    pub async fn bind(&self, args: ExtenderBindingArgs) -> ExtenderBindingResult {
        match self.try_bind(&args).await {
            Ok(()) => {
                self.metrics.decision("bind", "bound");
                ExtenderBindingResult::default()
            }
            Err(e) => {
                self.metrics.decision("bind", e.kind());
                tracing::warn!(error = %e.chain(), pod = %args.pod_name, node = %args.node, "Bind failed");
                ExtenderBindingResult { error: e.chain() }
            }
        }
    }

    async fn try_bind(&self, args: &ExtenderBindingArgs) -> Result<(), Error> {
        for (field, v) in [("PodName", &args.pod_name), ("PodNamespace", &args.pod_namespace), ("Node", &args.node)] {
            if v.is_empty() {
                return Err(Error::BadRequest(format!("ExtenderBindingArgs.{field} is empty")));
            }
        }
        if !self.is_leader() {
            return Err(Error::NotLeader);
        }
        let key = PodKey::new(&args.pod_namespace, &args.pod_name);
        let node = NodeName(args.node.clone());
        let prepared = self.reserve(&key, &node, &args.pod_uid)?;
        match self.effect(args, &key, &prepared).await {
            Ok(mig_uuids) => {
                let mut inner = self.lock();
                for ((gpu, start), uuid) in mig_uuids {
                    inner.mig_uuids.insert((node.clone(), gpu, start), uuid);
                }
                inner.snap.confirm(&key)?;
                inner.generation += 1;
                self.metrics.reservations.set(inner.assumed.len() as i64);
                Ok(())
            }
            Err(e) => {
                let mut inner = self.lock();
                if inner.snap.release(&key).is_ok() {
                    inner.generation += 1;
                }
                inner.assumed.remove(&key);
                self.metrics.reservations.set(inner.assumed.len() as i64);
                Err(e)
            }
        }
    }

    /// Reserves the exact devices for the pod on `node` in the snapshot (so it counts at once)
    /// and returns what must happen on the cluster.
    fn reserve(&self, key: &PodKey, node: &NodeName, uid: &str) -> Result<Prepared, Error> {
        let looked_up = match self.lock().seen.get(key).map(|s| s.demand.clone()) {
            Some(Ok(d)) => Some(d),
            Some(Err(msg)) => return Err(Error::Unplaceable { pod: key.clone(), reason: msg }),
            None => None,
        };
        let demand = match looked_up {
            Some(d) => d,
            None => {
                let (ns, name) = key.0.split_once('/').unwrap_or(("default", &key.0));
                let pod = self.lookup.pod(ns, name).ok_or_else(|| Error::UnknownPod(key.clone()))?;
                self.demand_of(&pod).map_err(|e| Error::Unplaceable { pod: key.clone(), reason: e.to_string() })?
            }
        };
        let mut inner = self.lock();
        if !uid.is_empty() {
            inner.uids.insert(uid.to_owned(), key.clone());
        }
        let placement = match inner.snap.allocation(key).cloned() {
            Some(a) if a.node == *node => {
                Placement { node: node.clone(), grants: a.grants, ops: Vec::new(), score: 0.0 }
            }
            Some(a) => {
                // kube-scheduler chose another node than the one held for the pod: move it.
                inner.snap.release(key)?;
                inner.assumed.remove(key);
                inner.generation += 1;
                tracing::info!(pod = %key, from = %a.node, to = %node, "Moving held devices to the bound node");
                self.place_on(&inner, &demand, node)?
            }
            None => self.place_on(&inner, &demand, node)?,
        };
        if inner.snap.allocation(key).is_none() {
            let until = self.now_ms() + u64::try_from(self.settings.mig_timeout.as_millis()).unwrap_or(u64::MAX) * 2;
            placement.apply(&mut inner.snap, &demand, Some(until))?;
            inner.generation += 1;
        }
        let at_ms = self.now_ms();
        inner.assumed.insert(key.clone(), Assumed { placement: placement.clone(), demand: demand.clone(), at_ms });
        self.metrics.reservations.set(inner.assumed.len() as i64);
        let n = inner.snap.node(node).ok_or_else(|| Error::Core(tessera_core::Error::UnknownNode(node.clone())))?;
        let mut wanted = Vec::new();
        let mut changed: Vec<u32> = Vec::new();
        for op in &placement.ops {
            let gpu = match *op {
                MigOp::SetMode { gpu, .. } | MigOp::Destroy { gpu, .. } => gpu,
                MigOp::Create { gpu, class, start } => {
                    let profile = n
                        .gpu(gpu)
                        .and_then(|g| g.mig_product())
                        .and_then(|p| p.geometry().profile(class))
                        .map_or_else(|| format!("{class:?}"), |p| p.name.to_owned());
                    wanted.push(WantedInstance { gpu, profile, start });
                    gpu
                }
            };
            if !changed.contains(&gpu) {
                changed.push(gpu);
            }
        }
        let gpus = changed.iter().filter_map(|&i| n.gpu(i)).map(gpu_spec).collect();
        let devices = placement
            .grants
            .iter()
            .map(|g| {
                let gpu = n.gpu(g.gpu());
                let uuid = gpu.map(|x| x.uuid.clone()).unwrap_or_default();
                let (profile, start, share) = match *g {
                    Grant::Whole { .. } => (None, None, None),
                    Grant::Share { milli, .. } => (None, None, Some(milli)),
                    Grant::Mig { class, start, .. } => (
                        gpu.and_then(|x| x.mig_product())
                            .and_then(|p| p.geometry().profile(class))
                            .map(|p| p.name.to_owned()),
                        Some(start),
                        None,
                    ),
                };
                let mig = start.and_then(|s| inner.mig_uuids.get(&(node.clone(), g.gpu(), s)).cloned());
                AssignedDevice { gpu: uuid, index: g.gpu(), profile, start, mig, share }
            })
            .collect();
        Ok(Prepared { gpus, wanted, assignment: Assignment { node: node.0.clone(), devices } })
    }

    fn place_on(&self, inner: &Inner, demand: &Demand, node: &NodeName) -> Result<Placement, Error> {
        let ctx = Context { workload: &inner.workload, seed: self.settings.seed };
        let verdicts =
            policy::evaluate(&inner.snap, demand, self.policy.as_ref(), &ctx, Some(std::slice::from_ref(node)))?;
        match verdicts.into_iter().next().map(|v| v.outcome) {
            Some(Ok((c, s))) => Ok(Placement { node: node.clone(), grants: c.grants, ops: c.ops, score: s.node }),
            Some(Err(r)) => Err(Error::Unplaceable { pod: demand.pod.clone(), reason: r.reason().to_owned() }),
            None => Err(Error::Unplaceable { pod: demand.pod.clone(), reason: format!("node {node} not evaluated") }),
        }
    }

    /// The cluster side of a bind: new MIG instances first, then the Binding.
    async fn effect(
        &self,
        args: &ExtenderBindingArgs,
        key: &PodKey,
        prepared: &Prepared,
    ) -> Result<BTreeMap<(u32, u8), String>, Error> {
        let mut assignment = prepared.assignment.clone();
        let mut uuids = BTreeMap::new();
        if !prepared.wanted.is_empty() {
            self.metrics.mig_reconfig_requests_total.inc();
            uuids = self
                .binder
                .reconfigure(&args.node, &prepared.gpus, &prepared.wanted, self.settings.mig_timeout)
                .await?;
            for d in &mut assignment.devices {
                if let Some(s) = d.start
                    && d.mig.is_none()
                {
                    d.mig = uuids.get(&(d.index, s)).cloned().filter(|u| !u.is_empty());
                }
            }
        }
        let req = BindRequest {
            namespace: args.pod_namespace.clone(),
            name: args.pod_name.clone(),
            uid: args.pod_uid.clone(),
            node: args.node.clone(),
            annotations: [(annotations::ASSIGNMENT.to_owned(), assignment.to_annotation())].into(),
        };
        tracing::debug!(pod = %key, node = %args.node, "Binding");
        self.binder.bind(&req).await?;
        Ok(uuids)
    }

    // ---- preempt -----------------------------------------------------------------------

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
    fn victims_on(&self, inner: &mut Inner, demand: &Demand, node: &NodeName, uids: &[String]) -> Option<Vec<String>> {
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
        if !fits(&mut inner.snap, &keep.iter().map(|&i| &victims[i].1).collect::<Vec<_>>()) {
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
            if fits(&mut inner.snap, &trial.iter().map(|&j| &victims[j].1).collect::<Vec<_>>()) {
                keep = trial;
            }
        }
        Some(keep.into_iter().map(|i| victims[i].0.clone()).collect())
    }

    // ---- live cluster state ------------------------------------------------------------

    /// Replaces the snapshot with one rebuilt from the API, then lays the assume cache over it:
    /// pods the rebuild already shows bound leave the cache; the rest are re-applied.
    pub fn replace_base(
        &self,
        mut snap: Snapshot,
        uids: HashMap<String, PodKey>,
        mig_uuids: HashMap<(NodeName, u32, u8), String>,
    ) {
        let now = self.now_ms();
        let ttl = u64::try_from(self.settings.assume_ttl.as_millis()).unwrap_or(u64::MAX);
        let mut inner = self.lock();
        let base_reconfigs = snap.reconfigs();
        let mut keep = BTreeMap::new();
        for (key, a) in std::mem::take(&mut inner.assumed) {
            if snap.allocation(&key).is_some() || now.saturating_sub(a.at_ms) > ttl {
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
            };
            // The instances may exist by now (node agent done); if not, create them again.
            let ok = snap.allocate(alloc).is_ok() || a.placement.apply(&mut snap, &a.demand, None).is_ok();
            if ok {
                keep.insert(key, a);
            } else {
                tracing::warn!(pod = %key, node = %a.placement.node, "Assumed pod no longer fits the observed state; forgetting it");
            }
        }
        inner.assumed = keep;
        inner.snap = snap;
        inner.base_reconfigs = base_reconfigs;
        inner.uids = uids;
        inner.mig_uuids = mig_uuids;
        inner.generation += 1;
        self.metrics.reservations.set(inner.assumed.len() as i64);
    }

    // ---- read-only views ---------------------------------------------------------------

    /// Packing per pool and for the whole cluster; also updates the gauges.
    pub fn packing(&self) -> (Packing, BTreeMap<String, Packing>) {
        let inner = self.lock();
        let reconfigs = inner.snap.reconfigs().saturating_sub(inner.base_reconfigs);
        let mut pools: BTreeMap<String, Packing> = BTreeMap::new();
        let names: std::collections::BTreeSet<String> =
            inner.snap.nodes().iter().map(|n| n.pool().to_owned()).collect();
        for pool in names {
            let p = packing(&inner.snap, &inner.workload, |n| n.pool() == pool);
            self.metrics.set_packing(&pool, &p, reconfigs);
            pools.insert(pool, p);
        }
        let all = packing(&inner.snap, &inner.workload, |_| true);
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
                                mode: mode_name(g.mode()),
                                allocated_milli: g.allocated_milli(),
                                free_milli: view.free(),
                                holders: h.get(&(g.index, None)).cloned().unwrap_or_default(),
                                largest_placeable: view.largest_placeable().map(|p| p.name),
                                mig: g
                                    .mig_layout()
                                    .map(|l| {
                                        l.instances()
                                            .iter()
                                            .map(|i| {
                                                let p = l.geometry().profile(i.class);
                                                MigView {
                                                    profile: p.map_or("?", |p| p.name),
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
                    "reserved"
                } else if inner.assumed.contains_key(&a.pod) {
                    "assumed"
                } else {
                    "bound"
                },
                allocation: a.clone(),
            })
            .collect();
        ClusterView {
            mode: self.settings.mode,
            policy: self.policy.name(),
            generation: inner.generation,
            leader: self.is_leader(),
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
                            reason: v.outcome.as_ref().err().map(|r| r.reason().to_owned()),
                            score: v.outcome.as_ref().ok().map(|(_, s)| s.node),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            allocation,
        })
    }
}

/// What a bind must do on the cluster.
#[derive(Debug)]
struct Prepared {
    gpus: Vec<GpuSpec>,
    wanted: Vec<WantedInstance>,
    assignment: Assignment,
}

fn mode_name(m: GpuMode) -> &'static str {
    match m {
        GpuMode::Full => "full",
        GpuMode::Shared => "shared",
        GpuMode::Mig => "mig",
    }
}

/// The desired `GpuNode.spec` entry of a GPU as the snapshot has it.
pub fn gpu_spec(g: &tessera_core::Gpu) -> GpuSpec {
    match g.mig_layout() {
        Some(l) if g.mode() == GpuMode::Mig => GpuSpec {
            index: g.index,
            mode: Mode::Mig,
            instances: l
                .instances()
                .iter()
                .filter_map(|i| {
                    l.geometry()
                        .profile(i.class)
                        .map(|p| MigInstanceSpec { profile: p.name.to_owned(), start: i.start })
                })
                .collect(),
        },
        _ => GpuSpec { index: g.index, mode: Mode::Full, instances: Vec::new() },
    }
}

/// `GET /api/v1/cluster`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterView {
    pub mode: &'static str,
    pub policy: &'static str,
    pub generation: u64,
    pub leader: bool,
    pub nodes: Vec<NodeView>,
    pub allocations: Vec<AllocationView>,
    pub packing: PackingView,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeView {
    pub name: String,
    pub pool: String,
    pub schedulable: bool,
    pub cpu_milli: u64,
    pub used_cpu_milli: u64,
    pub memory_mib: u64,
    pub used_memory_mib: u64,
    pub labels: BTreeMap<String, String>,
    pub pods: Vec<String>,
    pub gpus: Vec<GpuView>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuView {
    pub index: u32,
    pub uuid: String,
    pub model: String,
    pub memory_mib: u64,
    pub numa: Option<u32>,
    pub healthy: bool,
    /// `full`, `shared` or `mig`.
    pub mode: &'static str,
    /// Allocated milli-GPU (MIG instances by compute slices).
    pub allocated_milli: u32,
    pub free_milli: u32,
    /// Pods holding the GPU whole or a share of it.
    pub holders: Vec<String>,
    /// Largest MIG profile that could still be created (MIG-capable GPUs).
    pub largest_placeable: Option<&'static str>,
    pub mig: Vec<MigView>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MigView {
    pub profile: &'static str,
    pub start: u8,
    pub memory_slices: u8,
    pub compute_slices: u8,
    pub uuid: Option<String>,
    pub holder: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocationView {
    /// `bound`, `assumed` (bound by this replica, not yet seen by the informer) or `reserved`
    /// (devices held while the bind is in progress).
    pub state: &'static str,
    #[serde(flatten)]
    pub allocation: Allocation,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PackingView {
    pub cluster: Packing,
    pub pools: BTreeMap<String, Packing>,
}

/// `GET /api/v1/explain/{ns}/{pod}`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    pub pod: String,
    pub uid: String,
    pub demand: Option<Demand>,
    /// Why the pod's demand could not be read.
    pub error: Option<String>,
    pub filtered_at_ms: Option<u64>,
    /// The cluster changed since that filter.
    pub stale: bool,
    pub nodes: Vec<NodeReason>,
    pub allocation: Option<Allocation>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeReason {
    pub node: String,
    /// `fits`, `unschedulable` or `unresolvable`.
    pub result: &'static str,
    pub reason: Option<String>,
    pub score: Option<f64>,
}
