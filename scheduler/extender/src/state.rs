//! The scheduler's state and the four extender verbs over it, independent of HTTP.
//!
//! One [`Scheduler`] owns the core [`Snapshot`] (behind a mutex: decisions are short and
//! CPU-bound), the assume cache of pods this replica bound but the informer has not shown yet,
//! the last filter verdicts per pod (for prioritize and for `explain`), and the effects seam
//! ([`Binder`]). In live mode the snapshot's base is rebuilt from the reflectors
//! ([`Scheduler::replace_base`]) and the assume cache is laid over it, so a pod being bound
//! counts at once and is never counted twice.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use serde::Serialize;
use tessera_api::Assignment;
use tessera_api::annotations;
use tessera_api::gpunode::{GpuSpec, MigInstanceSpec, Mode};
use tessera_api::pod::{self as podparse, PodError};
use tessera_api::podgroup::PodGroupSpec;
use tessera_api::views::{
    AllocationState, AllocationView, ClusterView, Explanation, GpuView, MigView, NodeReason, NodeResult, NodeView,
    PackingView, PendingState, PendingView,
};
use tessera_core::gang::{self, GangPlan};
use tessera_core::metrics::{Packing, packing};
use tessera_core::policy::{self, NodeVerdict, Workload};
use tessera_core::{
    Allocation, Context, Demand, GangRef, GpuMode, Grant, MigOp, NodeName, Placement, PodKey, Policy, Rejection,
    Snapshot,
};

use crate::binder::{BindRequest, Binder, WantedInstance};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::reservations::Outbox;
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
    /// Threads one filter may use to evaluate a long node list.
    pub threads: usize,
    /// Write planned gang members' reservations on the pods (live mode with
    /// [`crate::reservations::writer`] running); off, nothing is queued.
    pub persist_reservations: bool,
    /// kube-scheduler's `httpTimeout` for this extender: every verb answers within it. A bind
    /// that must wait longer (a gang whose members have not all reached bind, a node creating
    /// a MIG instance) answers an error before it, keeping its devices reserved, and
    /// kube-scheduler retries; the retried bind joins the one in progress.
    pub http_timeout: Duration,
    /// Evict lower-priority pods (whole gangs or single pods) through the Eviction API when a
    /// pod kube-scheduler cannot preempt for (tessera.dev/gpu, gangs) fits no node.
    pub preemption: bool,
    /// Keys that sign assignments (and check them at rebuild); `None`: unsigned.
    pub assignment_keys: Option<Arc<tessera_api::signing::Keys>>,
}

impl Settings {
    /// How long a verb may take before it must answer: `http_timeout` less a margin for the
    /// network and kube-scheduler (a tenth, at least 1 s, at most 5 s).
    pub fn reply_budget(&self) -> Duration {
        let margin = (self.http_timeout / 10).clamp(Duration::from_secs(1), Duration::from_secs(5));
        self.http_timeout.saturating_sub(margin).max(Duration::from_millis(100))
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            mode: "demo",
            mig_timeout: Duration::from_secs(30),
            seed: 0,
            assume_ttl: Duration::from_secs(300),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            persist_reservations: false,
            http_timeout: Duration::from_secs(45),
            preemption: true,
            assignment_keys: None,
        }
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
    /// Shared with the filter's [`FilterReply`], which is written from them.
    verdicts: Arc<Vec<NodeVerdict>>,
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
    /// Inserts; returns what was evicted or replaced, for the caller to drop outside its lock.
    fn insert(&mut self, k: PodKey, v: V) -> Vec<V> {
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
    fn get(&self, k: &PodKey) -> Option<&V> {
        self.map.get(k)
    }
}

/// Where a planned gang's held binds stand.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Barrier {
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
    min_member: u32,
    timeout_ms: u64,
    /// Pending members and when filter last saw each (ms).
    pub(crate) members: BTreeMap<PodKey, (Demand, u64)>,
    pub(crate) plan: Option<GangPlan>,
    /// The plan's deadline as written in its members' reservation annotations.
    pub(crate) deadline: Option<String>,
    arrived: BTreeSet<PodKey>,
    barrier: tokio::sync::watch::Sender<Barrier>,
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
    fn refuse(&mut self, pod: &PodKey, node: &NodeName, now_ms: u64) {
        self.refused.entry(pod.clone()).or_default().insert(node.clone(), now_ms + REFUSAL_MS);
    }

    /// Members of the plan that have not reached bind, with their planned nodes.
    fn unarrived(&self) -> Vec<(PodKey, NodeName)> {
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

/// A bind in progress: retries of the same pod's bind wait for it instead of starting another.
#[derive(Clone, Debug)]
struct Inflight {
    node: String,
    /// What the bind waits for now, for the answer given when the reply budget runs out.
    stage: Arc<Mutex<String>>,
    done: tokio::sync::watch::Receiver<Option<Result<(), (&'static str, String)>>>,
}

/// A pod deleted recently, by UID: a rebuild from a store that has not caught up yet must not
/// bring its devices back.
#[derive(Clone, Debug)]
struct Deleted {
    uid: String,
    pod: PodKey,
    at_ms: u64,
}

/// How long deletions are remembered for rebuilds ([`Deleted`]).
const DELETED_MS: u64 = 30_000;

#[derive(Debug)]
pub(crate) struct Inner {
    /// Shared with filters evaluating outside the lock; writers copy on write.
    pub(crate) snap: Arc<Snapshot>,
    /// Bumped on every change of `snap`; cached verdicts are valid only for their generation.
    pub(crate) generation: u64,
    pub(crate) workload: Arc<Workload>,
    recent: VecDeque<Demand>,
    filtered: u64,
    seen: Bounded<Seen>,
    uids: HashMap<String, PodKey>,
    assumed: BTreeMap<PodKey, Assumed>,
    /// MIG instance UUIDs by (node, gpu, start), as the node agents report them.
    mig_uuids: HashMap<(NodeName, u32, u8), String>,
    /// Reconfigurations counted by the snapshot when its base was built (layouts that existed).
    base_reconfigs: u64,
    pub(crate) gangs: BTreeMap<String, GangState>,
    /// Reservation annotations to write or remove (the leader's [`crate::reservations::writer`]).
    pub(crate) outbox: Outbox,
    /// Plans this replica dropped, by (gang, deadline as annotated), until their deadline (ms):
    /// their annotations may still be visible, and must not bring them back.
    pub(crate) dropped_plans: HashMap<(String, String), u64>,
    /// The cluster as last rebuilt from the API (live mode), before the assume cache and the
    /// gang reservations are laid over it: what the nodes report, nothing planned.
    base: Option<Arc<Snapshot>>,
    /// MIG operations (instances created or destroyed, mode switches) that nodes applied for
    /// this replica's binds.
    reconfigs_done: u64,
    inflight: HashMap<PodKey, Inflight>,
    /// Pods this replica bound, with the node, until the informer has surely reported them
    /// (a retried bind of one of them is answered from here).
    bound_here: HashMap<PodKey, (String, u64)>,
    deleted: VecDeque<Deleted>,
    /// Preemptions started, by preemptor (pod or gang), and when (ms): not repeated while
    /// their victims terminate.
    pub(crate) preempting: HashMap<String, u64>,
    /// Preemptors waiting for the preemption task: (key, members' demands).
    pub(crate) preempt_queue: VecDeque<(String, Vec<Demand>)>,
    /// PodGroup status writes waiting for the writer, and the last status queued per group.
    pub(crate) group_writes: Vec<(String, String, tessera_api::podgroup::PodGroupStatus)>,
    pub(crate) group_written: HashMap<String, tessera_api::podgroup::PodGroupStatus>,
}

impl Inner {
    /// Drops a gang's plan: releases its members still reserved (bound ones stay) and fails
    /// every held bind with `why`. In live mode the state is then laid over the last rebuild
    /// again, so MIG instances the plan assumed but no node created disappear with it.
    fn fail_gang(&mut self, name: &str, why: &str) -> Vec<PodKey> {
        let released = self.drop_plan(name, why);
        if !released.is_empty() {
            self.rebase();
        }
        released
    }

    /// Lays the assume cache and the live gang plans over the last rebuild again (live mode).
    fn rebase(&mut self) {
        if let Some(base) = self.base.clone() {
            self.lay_over(base, None);
        }
    }

    /// Makes `snap` (a rebuild) the state: pods the rebuild shows leave the assume cache (and,
    /// with `expire` = (now, ttl), assumed pods older than ttl); the rest and every live gang
    /// plan are applied again. Plans that no longer fit are dropped.
    fn lay_over(&mut self, mut snap: Arc<Snapshot>, expire: Option<(u64, u64)>) {
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
        self.snap = snap;
        // Gang reservations exist only here: lay them over the rebuilt state again.
        let mut broken = Vec::new();
        let plans: Vec<(String, GangPlan)> =
            self.gangs.iter().filter_map(|(n, st)| st.plan.clone().map(|p| (n.clone(), p))).collect();
        for (name, plan) in plans {
            for (pod, placement) in &plan.members {
                if self.snap.allocation(pod).is_some() {
                    continue;
                }
                let Some(demand) = self.gangs.get(&name).and_then(|st| st.members.get(pod)).map(|(d, _)| d.clone())
                else {
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
                let ok = Arc::make_mut(&mut self.snap).allocate(alloc).is_ok()
                    || placement.apply(Arc::make_mut(&mut self.snap), &demand, Some(plan.deadline_ms)).is_ok();
                if !ok {
                    broken.push(name.clone());
                    break;
                }
            }
        }
        let mut released = false;
        for name in broken {
            tracing::warn!(gang = %name, "Gang plan no longer fits the observed state; dropped");
            released |= !self.drop_plan(&name, "the cluster changed under the plan; replanning").is_empty();
        }
        self.generation += 1;
        if released {
            self.rebase();
        }
    }

    /// [`Inner::fail_gang`] without laying the state over the rebuild again.
    fn drop_plan(&mut self, name: &str, why: &str) -> Vec<PodKey> {
        let Some(st) = self.gangs.get_mut(name) else { return Vec::new() };
        let mut released = Vec::new();
        if let Some(plan) = st.plan.take() {
            if let Some(d) = st.deadline.take() {
                self.dropped_plans.insert((name.to_owned(), d), plan.deadline_ms);
            }
            for (pod, _) in &plan.members {
                self.outbox.clear(pod.clone());
                if self.snap.allocation(pod).is_some_and(|a| a.reserved_until_ms.is_some())
                    && Arc::make_mut(&mut self.snap).release(pod).is_ok()
                {
                    self.assumed.remove(pod);
                    released.push(pod.clone());
                }
            }
        }
        st.arrived.clear();
        st.barrier.send_replace(Barrier::Failed(why.to_owned()));
        // Later plans get a fresh barrier; waiters of this one already hold its receiver.
        st.barrier = tokio::sync::watch::channel(Barrier::Waiting).0;
        if !released.is_empty() {
            self.generation += 1;
        }
        released
    }

    fn gang_of(&self, pod: &PodKey) -> Option<String> {
        self.gangs.iter().find(|(_, st)| st.planned(pod)).map(|(n, _)| n.clone())
    }

    /// Whether this replica filtered a member of `gang` recently.
    pub(crate) fn seen_gang(&self, gang: &str) -> bool {
        self.seen.map.values().any(|s| s.demand.as_ref().is_ok_and(|d| d.gang.as_ref().is_some_and(|g| g.name == gang)))
    }

    /// Records that kube-scheduler did not take the plan's node for members that never reached
    /// bind, so the next plan of the gang leaves those nodes out for them.
    fn refuse_unarrived(&mut self, gang: &str, now_ms: u64) {
        if let Some(st) = self.gangs.get_mut(gang) {
            for (pod, node) in st.unarrived() {
                tracing::info!(%gang, %pod, %node, "Member never reached bind on its planned node; the next plan avoids it");
                st.refuse(&pod, &node, now_ms);
            }
        }
    }

    /// Pods this replica refused for lack of free devices at their last filter, not holding
    /// anything now, filtered within the last ten minutes: the ones kube-scheduler may park
    /// until its periodic flush.
    fn waiting_for_capacity(&self, now_ms: u64) -> Vec<PodKey> {
        self.refused_everywhere(now_ms, false)
    }

    /// Pods refused on every node at their last filter within the last ten minutes, holding
    /// nothing: with `any_reason`, also those refused only for what a node lacks (no GPUs yet,
    /// no GPU of the model), which a node's new GPUs may change.
    fn refused_everywhere(&self, now_ms: u64, any_reason: bool) -> Vec<PodKey> {
        self.seen
            .map
            .iter()
            .filter(|(k, s)| {
                now_ms.saturating_sub(s.at_ms) <= 10 * 60_000
                    && self.snap.allocation(k).is_none()
                    && s.demand.is_ok()
                    && !s.verdicts.is_empty()
                    && s.verdicts.iter().all(|v| v.outcome.is_err())
                    && (any_reason
                        || s.verdicts.iter().any(|v| v.outcome.as_ref().is_err_and(|r| !r.is_unresolvable())))
            })
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// Whether `new` has a healthy GPU that `old` did not (a node or GPU added, a GPU healthy again).
fn gains_gpus(old: &Snapshot, new: &Snapshot) -> bool {
    // The same GPU is one with the same index, UUID, product and memory: a node first seen
    // through GPU Feature Discovery labels (no UUIDs, often no memory) and then through its
    // agent's GpuNode gains GPUs it can now place on.
    new.nodes().iter().any(|n| {
        n.gpus.iter().filter(|g| g.healthy).any(|g| {
            !old.node(&n.name).and_then(|o| o.gpus.iter().find(|og| og.index == g.index)).is_some_and(|og| {
                og.healthy && og.uuid == g.uuid && og.model == g.model && og.memory_mib >= g.memory_mib
            })
        })
    })
}

/// The scheduler: state plus the extender verbs.
pub struct Scheduler {
    inner: Mutex<Inner>,
    policy: Box<dyn Policy>,
    /// Per-node verdicts reused while a node's state is unchanged (the core's `Memo`), one
    /// per thread, each holding the demand shapes that hash to it: filters of different
    /// shapes evaluate at the same time instead of queueing on one lock, and no verdict is
    /// worked out twice.
    memos: Vec<Mutex<policy::Memo>>,
    binder: Arc<dyn Binder>,
    lookup: Arc<dyn Lookup>,
    pub metrics: Metrics,
    settings: Settings,
    origin: tokio::time::Instant,
    /// The wall-clock time at `origin`: reservation deadlines are written in wall-clock time.
    origin_wall: k8s_openapi::jiff::Timestamp,
    /// Wakes the reservation writer.
    writes: tokio::sync::Notify,
    /// Orders `GpuNode.spec` writes per node ([`Scheduler::node_lock`]).
    spec_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Wakes the preemption task.
    preempts: tokio::sync::Notify,
    leader: AtomicBool,
    synced: AtomicBool,
}

impl fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scheduler").field("policy", &self.policy.name()).field("settings", &self.settings).finish()
    }
}

impl Scheduler {
    /// The keys that sign assignments, when configured.
    pub fn assignment_keys(&self) -> Option<&Arc<tessera_api::signing::Keys>> {
        self.settings.assignment_keys.as_ref()
    }
}

const RECENT_DEMANDS: usize = 512;
/// Pods whose last filter verdicts are kept (for prioritize and explain). Each holds one
/// verdict per offered node, so this bounds memory on large clusters.
const SEEN_PODS: usize = 256;

fn verdict_kind(v: &NodeVerdict) -> NodeResult {
    match &v.outcome {
        Ok(_) => NodeResult::Fits,
        Err(r) if r.is_unresolvable() => NodeResult::Unresolvable,
        Err(_) => NodeResult::Unschedulable,
    }
}

/// How far a workload class's share may move before the workload is replaced.
const WORKLOAD_SHARE_DRIFT: f64 = 0.05;

/// Whether `fresh` differs from `current` by more than noise: another set of classes, or a
/// class whose share moved by more than [`WORKLOAD_SHARE_DRIFT`].
fn drifted(current: &Workload, fresh: &Workload) -> bool {
    if current.classes.len() != fresh.classes.len() {
        return true;
    }
    fresh.classes.iter().any(|f| {
        let same = |c: &&tessera_core::policy::WorkloadClass| {
            c.cpu_milli == f.cpu_milli && c.gpu == f.gpu && c.gpu_models == f.gpu_models
        };
        current.classes.iter().find(same).is_none_or(|c| (c.weight - f.weight).abs() > WORKLOAD_SHARE_DRIFT)
    })
}

/// Whether scoring all of `verdicts` gives the offered nodes' scores: the names are the
/// verdicts' nodes in order, with only nodes that do not fit left out (kube-scheduler offers
/// prioritize the nodes that passed filter). Scores are normalised over the nodes that fit, so
/// the two agree exactly then.
fn covers(verdicts: &[NodeVerdict], names: &[NodeName]) -> bool {
    let mut vs = verdicts.iter();
    for n in names {
        loop {
            match vs.next() {
                Some(v) if v.node == *n => break,
                Some(v) if v.outcome.is_err() => continue,
                _ => return false,
            }
        }
    }
    vs.all(|v| v.outcome.is_err())
}

/// Names of the offered nodes: `NodeNames` (nodeCacheCapable) or the names in `Nodes`.
/// Takes the names rather than copying them: a long list is thousands of strings.
fn offered(nodes: &Option<NodeList>, names: Option<Vec<String>>) -> Result<Vec<NodeName>, String> {
    match (names, nodes) {
        (Some(n), _) => Ok(n.into_iter().map(NodeName).collect()),
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
        let s = Self {
            inner: Mutex::new(Inner {
                snap: Arc::new(snap),
                generation: 1,
                workload: Arc::new(Workload::default()),
                recent: VecDeque::new(),
                filtered: 0,
                seen: Bounded::new(SEEN_PODS),
                uids: HashMap::new(),
                assumed: BTreeMap::new(),
                mig_uuids: HashMap::new(),
                base_reconfigs,
                gangs: BTreeMap::new(),
                outbox: Outbox::new(settings.persist_reservations),
                dropped_plans: HashMap::new(),
                base: None,
                reconfigs_done: 0,
                inflight: HashMap::new(),
                bound_here: HashMap::new(),
                deleted: VecDeque::new(),
                preempting: HashMap::new(),
                preempt_queue: VecDeque::new(),
                group_writes: Vec::new(),
                group_written: HashMap::new(),
            }),
            memos: (0..settings.threads.clamp(1, 8)).map(|_| Mutex::new(policy::Memo::new())).collect(),
            policy,
            binder,
            lookup,
            metrics: Metrics::new(),
            settings,
            origin: tokio::time::Instant::now(),
            origin_wall: k8s_openapi::jiff::Timestamp::now(),
            writes: tokio::sync::Notify::new(),
            spec_locks: Mutex::new(HashMap::new()),
            preempts: tokio::sync::Notify::new(),
            leader: AtomicBool::new(true),
            synced: AtomicBool::new(true),
        };
        s.metrics.leader.set(1);
        s
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the snapshot half-changed (every change
        // is one checked call), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn origin_wall(&self) -> k8s_openapi::jiff::Timestamp {
        self.origin_wall
    }

    pub(crate) fn binder(&self) -> &dyn Binder {
        self.binder.as_ref()
    }

    /// Wakes the reservation writer (something is queued).
    pub(crate) fn writes_ready(&self) {
        self.writes.notify_one();
    }

    /// Wakes the preemption task.
    pub(crate) fn preempts_ready(&self) {
        self.preempts.notify_one();
    }

    /// Resolves when a preemptor is queued.
    pub(crate) async fn preempts_wait(&self) {
        self.preempts.notified().await;
    }

    pub(crate) fn seed(&self) -> u64 {
        self.settings.seed
    }

    pub(crate) fn policy_ref(&self) -> &dyn Policy {
        self.policy.as_ref()
    }

    /// Whether `pod` was deleted recently (and no pod of that name exists again).
    pub(crate) fn is_deleted(&self, pod: &PodKey) -> bool {
        let uids: Vec<String> = self.lock().deleted.iter().filter(|d| d.pod == *pod).map(|d| d.uid.clone()).collect();
        if uids.is_empty() {
            return false;
        }
        let (ns, name) = pod.0.split_once('/').unwrap_or(("default", pod.0.as_str()));
        self.lookup.pod(ns, name).is_none_or(|p| p.metadata.uid.as_ref().is_some_and(|u| uids.contains(u)))
    }

    /// Resolves when something is queued for the reservation writer.
    pub(crate) async fn writes_wait(&self) {
        self.writes.notified().await;
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
        self.lock().workload = Arc::new(workload);
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
        self.filter_reply(args).into_result()
    }

    /// The filter, answered as a [`FilterReply`] that serialises straight from the verdicts
    /// (the HTTP path: no per-node copies of names and reasons).
    pub fn filter_reply(&self, mut args: ExtenderArgs) -> FilterReply {
        let by_name = args.node_names.is_some();
        let names = match offered(&args.nodes, args.node_names.take()) {
            Ok(n) => n,
            Err(msg) => {
                self.metrics.decision("filter", "error");
                return FilterReply::error(msg);
            }
        };
        let Some(pod) = args.pod else {
            self.metrics.decision("filter", "error");
            return FilterReply::error("ExtenderArgs.Pod is null");
        };
        let key = match podparse::pod_key(&pod) {
            Ok(k) => k,
            Err(e) => {
                self.metrics.decision("filter", "error");
                return FilterReply::error(e.to_string());
            }
        };
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let demand = self.demand_of(&pod);
        let (plan, generation, queued) = {
            let mut inner = self.lock();
            if !uid.is_empty() {
                inner.uids.insert(uid.clone(), key.clone());
            }
            let plan = match &demand {
                Ok(d) => self.prepare(&mut inner, d, &names),
                Err(e) => {
                    let reason = format!("pod {key}: {e}");
                    let r = if e.is_permanent() {
                        Rejection::Unresolvable(reason)
                    } else {
                        Rejection::Unschedulable(reason)
                    };
                    Verdicts::Done(
                        names.iter().map(|n| NodeVerdict { node: n.clone(), outcome: Err(r.clone()) }).collect(),
                    )
                }
            };
            (plan, inner.generation, !inner.outbox.is_empty())
        };
        if queued {
            self.writes_ready();
        }
        // The expensive part runs without the lock, on the snapshot as it was.
        let verdicts = match (plan, &demand) {
            (Verdicts::Evaluate { snap, workload }, Ok(d)) => self.evaluate(&snap, &workload, d, &names),
            (Verdicts::Evaluate { .. }, Err(_)) => Vec::new(),
            (Verdicts::Done(v), _) => v,
        };
        let fits = verdicts.iter().any(|v| v.outcome.is_ok());
        if !fits
            && self.settings.preemption
            && crate::preemption::may_preempt(&pod)
            && let Ok(d) = &demand
            && !crate::preemption::kube_scheduler_preempts(d)
            && verdicts.iter().any(|v| v.outcome.as_ref().is_err_and(|r| !r.is_unresolvable()))
        {
            self.queue_preemption(d);
        }
        let result = if fits { "fits" } else { "unschedulable" };
        self.metrics.decision("filter", if demand.is_err() { "invalid_pod" } else { result });
        let at_ms = self.now_ms();
        let verdicts = Arc::new(verdicts);
        let seen =
            Seen { uid, demand: demand.map_err(|e| e.to_string()), generation, at_ms, verdicts: verdicts.clone() };
        // Evicted entries hold a verdict per node: dropped after the lock is released.
        let evicted = self.lock().seen.insert(key, seen);
        drop(evicted);
        let nodes = match args.nodes {
            // Not nodeCacheCapable: answer with the Node objects that pass.
            Some(mut list) if !by_name => {
                let pass: HashSet<&str> =
                    verdicts.iter().filter(|v| v.outcome.is_ok()).map(|v| v.node.0.as_str()).collect();
                list.items.retain(|n| n.metadata.name.as_deref().is_some_and(|name| pass.contains(name)));
                Some(list)
            }
            _ => None,
        };
        FilterReply { verdicts, nodes, error: None }
    }

    /// Queues `d` (or its whole gang, once `minMember` members are pending) for tessera's own
    /// preemption ([`crate::preemption`]).
    fn queue_preemption(&self, d: &Demand) {
        let now = self.now_ms();
        let mut inner = self.lock();
        let (key, members) = match &d.gang {
            Some(g) => {
                let Some(st) = inner.gangs.get(&g.name) else { return };
                let members: Vec<Demand> = st
                    .members
                    .values()
                    .map(|(m, _)| m.clone())
                    .filter(|m| inner.snap.allocation(&m.pod).is_none())
                    .collect();
                if (members.len() as u64) < u64::from(g.min_member) || st.plan.is_some() {
                    return;
                }
                (format!("gang {}", g.name), members)
            }
            None => (format!("pod {}", d.pod), vec![d.clone()]),
        };
        inner.want_preemption(key, members, now);
        drop(inner);
        self.preempts_ready();
    }

    /// Decides under the lock what a demand's verdicts need: answered already (held devices,
    /// gangs: they change the snapshot) or a plain evaluation, done by the caller unlocked.
    fn prepare(&self, inner: &mut Inner, demand: &Demand, names: &[NodeName]) -> Verdicts {
        inner.recent.push_back(demand.clone());
        if inner.recent.len() > RECENT_DEMANDS {
            inner.recent.pop_front();
        }
        inner.filtered += 1;
        // FGD's target workload: the popular shapes among recent demands (95% coverage). Kept
        // while the shapes and their shares hold steady: every new workload empties the core's
        // memo, and replacing it for sampling noise would make every shape cold every 64 filters.
        if inner.filtered % 64 == 1 || inner.workload.is_empty() {
            let fresh = Workload::from_demands_top(inner.recent.iter(), 0.95);
            if drifted(&inner.workload, &fresh) {
                inner.workload = Arc::new(fresh);
            }
        }
        if let Some(a) = inner.snap.allocation(&demand.pod) {
            // Already assumed or reserved: only its node.
            let (here, grants, reserved) = (a.node.clone(), a.grants.clone(), a.reserved_until_ms.is_some());
            match &demand.gang {
                // A planned member whose filter comes without its planned node: kube-scheduler's
                // own filters refused that node for it (resources it counts, taints, affinity).
                // Holding the plan would only wait for the deadline; plan again without it.
                Some(g) if reserved && !names.contains(&here) => {
                    let now = self.now_ms();
                    if let Some(st) = inner.gangs.get_mut(&g.name) {
                        st.refuse(&demand.pod, &here, now);
                    }
                    tracing::info!(gang = %g.name, pod = %demand.pod, node = %here, "kube-scheduler did not offer the planned node; replanning without it");
                    let why = format!("kube-scheduler refused node {here} for pod {}; replanning", demand.pod);
                    inner.fail_gang(&g.name, &why);
                }
                _ => return Verdicts::Done(self.pinned(inner, demand, &here, grants, names)),
            }
        }
        if let Some(g) = &demand.gang
            && let Some(v) = self.gang_verdicts(inner, demand, g, names)
        {
            return Verdicts::Done(v);
        }
        Verdicts::Evaluate { snap: inner.snap.clone(), workload: inner.workload.clone() }
    }

    /// The memo that holds `demand`'s shape (what a verdict depends on besides the node).
    fn memo_for(&self, demand: &Demand) -> Option<&Mutex<policy::Memo>> {
        let i = usize::try_from(policy::demand_shape(demand) % self.memos.len().max(1) as u64).unwrap_or(0);
        self.memos.get(i)
    }

    /// The core's verdicts on the offered nodes, split across threads for long node lists
    /// (nodes are independent, so the result is the same as one call).
    fn evaluate(&self, snap: &Snapshot, workload: &Workload, demand: &Demand, names: &[NodeName]) -> Vec<NodeVerdict> {
        let ctx = Context { workload, seed: self.settings.seed };
        let run = |chunk: &[NodeName]| policy::evaluate(snap, demand, self.policy.as_ref(), &ctx, Some(chunk));
        let parts = self.settings.threads.max(1).min(names.len() / PARALLEL_MIN_NODES).max(1);
        // Memoised: only nodes whose state changed since this demand shape was last filtered are
        // scored again (same verdicts as a fresh evaluation). A poisoned memo lock falls back to
        // the fresh, threaded path.
        let memo = if self.policy.memoizable() { self.memo_for(demand).and_then(|m| m.lock().ok()) } else { None };
        let result = if let Some(mut memo) = memo {
            policy::evaluate_memo(snap, demand, self.policy.as_ref(), &ctx, Some(names), &mut memo)
        } else if parts == 1 {
            run(names)
        } else {
            let size = names.len().div_ceil(parts);
            std::thread::scope(|scope| {
                let mut chunks = names.chunks(size);
                let first = chunks.next().unwrap_or(&[]);
                let handles: Vec<_> = chunks.map(|c| scope.spawn(move || run(c))).collect();
                let mut out = run(first)?;
                for h in handles {
                    match h.join() {
                        Ok(v) => out.extend(v?),
                        Err(_) => return Err(tessera_core::Error::Invalid("evaluation thread panicked".into())),
                    }
                }
                Ok(out)
            })
        };
        match result {
            Ok(v) => v,
            Err(e) => names
                .iter()
                .map(|n| NodeVerdict {
                    node: n.clone(),
                    outcome: Err(Rejection::Unresolvable(format!("pod {}: {e}", demand.pod))),
                })
                .collect(),
        }
    }

    /// Verdicts for a pod that already holds devices on `here`: that node fits; every other
    /// node is refused, keeping "never fits" where the core says so.
    fn pinned(
        &self,
        inner: &Inner,
        demand: &Demand,
        here: &NodeName,
        grants: Vec<Grant>,
        names: &[NodeName],
    ) -> Vec<NodeVerdict> {
        let others: Vec<NodeName> = names.iter().filter(|n| *n != here).cloned().collect();
        let ctx = Context { workload: &inner.workload, seed: self.settings.seed };
        let mut never: HashMap<NodeName, Rejection> = HashMap::new();
        if let Ok(vs) = policy::evaluate(&inner.snap, demand, self.policy.as_ref(), &ctx, Some(&others)) {
            for v in vs {
                if let Err(r) = v.outcome
                    && r.is_unresolvable()
                {
                    never.insert(v.node, r);
                }
            }
        }
        let held = match &demand.gang {
            Some(g) => format!("gang {} placed pod {} on {here}", g.name, demand.pod),
            None => format!("pod {} already holds devices on {here}", demand.pod),
        };
        names
            .iter()
            .map(|n| NodeVerdict {
                node: n.clone(),
                outcome: if n == here {
                    Ok((
                        tessera_core::Candidate { node: 0, grants: grants.clone(), ops: Vec::new() },
                        policy::Score::default(),
                    ))
                } else if let Some(r) = never.remove(n) {
                    Err(r)
                } else {
                    Err(Rejection::Unschedulable(format!("node {n}: {held}")))
                },
            })
            .collect()
    }

    /// A gang member's verdicts: wait for `minMember` members, then plan and reserve the whole
    /// gang at once; a planned member is offered only its node. `None`: the gang is already
    /// planned without this pod (a member beyond `minMember`), which is placed like any pod.
    fn gang_verdicts(
        &self,
        inner: &mut Inner,
        demand: &Demand,
        g: &GangRef,
        names: &[NodeName],
    ) -> Option<Vec<NodeVerdict>> {
        let now = self.now_ms();
        let st = inner.gangs.entry(g.name.clone()).or_insert_with(|| GangState::new(g));
        st.min_member = g.min_member;
        st.timeout_ms = g.timeout_ms;
        st.members.insert(demand.pod.clone(), (demand.clone(), now));
        // Members not filtered for a while are gone (kube-scheduler retries pending pods
        // every few seconds).
        let keep_ms = g.timeout_ms.max(30_000);
        st.members.retain(|_, (_, seen)| now.saturating_sub(*seen) <= keep_ms);
        if st.plan.is_some() {
            if !st.planned(&demand.pod) {
                return None;
            }
            // Planned, yet the pod holds nothing (its reservation was released): replan.
            inner.fail_gang(&g.name, "the plan lost a member's reservation; replanning");
        }
        let st = inner.gangs.get(&g.name)?;
        let members: Vec<Demand> = st
            .members
            .values()
            .filter(|(d, _)| inner.snap.allocation(&d.pod).is_none())
            .map(|(d, _)| d.clone())
            .collect();
        let all =
            |r: Rejection| names.iter().map(|n| NodeVerdict { node: n.clone(), outcome: Err(r.clone()) }).collect();
        if (members.len() as u64) < u64::from(st.min_member) {
            return Some(all(Rejection::Unschedulable(format!(
                "gang {}: {} of {} members pending; waiting for the rest before planning",
                g.name,
                members.len(),
                st.min_member
            ))));
        }
        let refused: BTreeMap<PodKey, BTreeMap<NodeName, u64>> = st
            .refused
            .iter()
            .map(|(k, m)| {
                (k.clone(), m.iter().filter(|(_, until)| **until > now).map(|(n, u)| (n.clone(), *u)).collect())
            })
            .collect();
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
                tracing::info!(gang = %g.name, members = plan.members.len(), deadline_ms = plan.deadline_ms, "Gang planned");
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
                    st.deadline = deadline;
                    st.plan = Some(plan);
                    st.arrived.clear();
                    st.barrier.send_replace(Barrier::Waiting);
                }
                match inner.snap.allocation(&demand.pod).map(|a| (a.node.clone(), a.grants.clone())) {
                    Some((here, grants)) => Some(self.pinned(inner, demand, &here, grants, names)),
                    None => Some(all(Rejection::Unschedulable(format!(
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
            let names: Vec<String> = inner
                .gangs
                .iter()
                .filter(|(_, st)| expired.iter().any(|p| st.planned(p)))
                .map(|(n, _)| n.clone())
                .collect();
            for n in names {
                tracing::warn!(gang = %n, "Gang reservation lapsed before every member was bound; released");
                inner.refuse_unarrived(&n, now);
                inner.fail_gang(&n, "the gang's reservation deadline passed before every member reached bind");
            }
            // The lapsed members were released above: drop the MIG instances only they assumed.
            inner.rebase();
        }
        inner.dropped_plans.retain(|_, deadline_ms| *deadline_ms > now);
        // Plans whose members all bound elsewhere (a follower's restored plan, the leader
        // binding) are finished: forget them, so the gang's name can be planned afresh.
        let Inner { gangs, snap, .. } = &mut *inner;
        gangs.retain(|_, st| {
            st.plan.as_ref().is_none_or(|p| {
                !p.members.iter().all(|(k, _)| snap.allocation(k).is_some_and(|a| a.reserved_until_ms.is_none()))
            })
        });
        let stale = 2 * 60_000;
        inner.gangs.retain(|_, st| {
            st.plan.is_some() || st.members.values().any(|(_, seen)| now.saturating_sub(*seen) <= stale)
        });
        let pending = inner.gangs.values().filter(|st| st.plan.is_none()).count();
        self.metrics.pending_gangs.set(pending as i64);
        let queued = !inner.outbox.is_empty();
        drop(inner);
        if queued {
            self.writes_ready();
        }
    }

    // ---- prioritize --------------------------------------------------------------------

    pub fn prioritize(&self, mut args: ExtenderArgs) -> Result<Vec<HostPriority>, Error> {
        let names = offered(&args.nodes, args.node_names.take()).map_err(Error::BadRequest)?;
        let pod = args.pod.ok_or_else(|| Error::BadRequest("ExtenderArgs.Pod is null".into()))?;
        let key = podparse::pod_key(&pod).map_err(|e| Error::BadRequest(e.to_string()))?;
        // From the pod's filter verdicts when the state has not changed since: scored in place
        // when they cover the offered nodes (the usual case), else the needed ones are copied.
        enum Cached {
            Scores(HashMap<NodeName, i64>),
            Verdicts(Vec<NodeVerdict>),
        }
        let cached = {
            let inner = self.lock();
            inner.seen.get(&key).filter(|s| s.generation == inner.generation).and_then(|s| {
                if covers(&s.verdicts, &names) {
                    return Some(Cached::Scores(policy::extender_scores(&s.verdicts).into_iter().collect()));
                }
                let by_node: HashMap<&NodeName, &NodeVerdict> = s.verdicts.iter().map(|v| (&v.node, v)).collect();
                names
                    .iter()
                    .map(|n| by_node.get(n).map(|v| (*v).clone()))
                    .collect::<Option<Vec<_>>>()
                    .map(Cached::Verdicts)
            })
        };
        let verdicts = match cached {
            Some(Cached::Scores(scores)) => return Ok(self.scored(&names, &scores)),
            Some(Cached::Verdicts(v)) => v,
            None => {
                let demand = self.demand_of(&pod).map_err(|e| Error::BadRequest(format!("pod {key}: {e}")))?;
                let plan = self.prepare(&mut self.lock(), &demand, &names);
                match plan {
                    Verdicts::Done(v) => v,
                    Verdicts::Evaluate { snap, workload } => self.evaluate(&snap, &workload, &demand, &names),
                }
            }
        };
        let scores: HashMap<NodeName, i64> = policy::extender_scores(&verdicts).into_iter().collect();
        Ok(self.scored(&names, &scores))
    }

    fn scored(&self, names: &[NodeName], scores: &HashMap<NodeName, i64>) -> Vec<HostPriority> {
        self.metrics.decision("prioritize", "scored");
        names.iter().map(|n| HostPriority { host: n.0.clone(), score: scores.get(n).copied().unwrap_or(0) }).collect()
    }

    // ---- bind --------------------------------------------------------------------------

    /// The bind verb. It answers within [`Settings::reply_budget`]: the work runs in its own
    /// task, which goes on when the answer is due (a gang waiting for its members, a node
    /// creating a MIG instance); then the answer is an error, the devices stay reserved, and
    /// kube-scheduler's retry of the same pod on the same node joins the bind in progress
    /// instead of starting a second one. A retry after the bind finished is answered from
    /// its outcome.
    pub async fn bind(self: &Arc<Self>, args: ExtenderBindingArgs) -> ExtenderBindingResult {
        let budget = self.settings.reply_budget();
        match self.bind_within(args.clone(), budget).await {
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

    async fn bind_within(self: &Arc<Self>, args: ExtenderBindingArgs, budget: Duration) -> Result<(), Error> {
        for (field, v) in [("PodName", &args.pod_name), ("PodNamespace", &args.pod_namespace), ("Node", &args.node)] {
            if v.is_empty() {
                return Err(Error::BadRequest(format!("ExtenderBindingArgs.{field} is empty")));
            }
        }
        if !self.is_leader() {
            return Err(Error::NotLeader);
        }
        let key = PodKey::new(&args.pod_namespace, &args.pod_name);
        let flight = {
            let mut inner = self.lock();
            match inner.inflight.get(&key) {
                Some(f) if f.node == args.node => f.clone(),
                Some(f) => {
                    return Err(Error::Binding {
                        pod: key,
                        node: f.node.clone(),
                        why: format!("a bind to {} waits until it ends", args.node),
                    });
                }
                None => {
                    if inner.bound_here.get(&key).is_some_and(|(n, _)| *n == args.node) {
                        // Bound by an earlier request whose answer kube-scheduler did not get.
                        return Ok(());
                    }
                    let (tx, rx) = tokio::sync::watch::channel(None);
                    let stage = Arc::new(Mutex::new("starting".to_owned()));
                    let f = Inflight { node: args.node.clone(), stage: stage.clone(), done: rx };
                    inner.inflight.insert(key.clone(), f.clone());
                    drop(inner);
                    let me = self.clone();
                    let k = key.clone();
                    tokio::spawn(async move {
                        let result = me.try_bind(&args, &stage).await.map_err(|e| (e.kind(), e.chain()));
                        let mut inner = me.lock();
                        inner.inflight.remove(&k);
                        if result.is_ok() {
                            let now = me.now_ms();
                            inner.bound_here.insert(k, (args.node.clone(), now));
                        }
                        drop(inner);
                        tx.send_replace(Some(result));
                    });
                    f
                }
            }
        };
        let mut rx = flight.done.clone();
        match tokio::time::timeout(budget, rx.wait_for(Option::is_some)).await {
            Ok(Ok(r)) => match &*r {
                Some(Ok(())) => Ok(()),
                Some(Err((kind, message))) => Err(Error::Relayed { kind, message: message.clone() }),
                None => Err(Error::Relayed { kind: "internal", message: "the bind ended without an outcome".into() }),
            },
            Ok(Err(_)) => {
                Err(Error::Relayed { kind: "internal", message: "the bind task ended without an outcome".into() })
            }
            Err(_) => {
                let stage = flight.stage.lock().map(|s| s.clone()).unwrap_or_default();
                Err(Error::Binding {
                    pod: key,
                    node: flight.node,
                    why: format!(
                        "it is {stage}, longer than the {budget:?} kube-scheduler's httpTimeout leaves; the devices stay reserved and a retry of this bind joins it"
                    ),
                })
            }
        }
    }

    async fn try_bind(&self, args: &ExtenderBindingArgs, stage: &Mutex<String>) -> Result<(), Error> {
        let key = PodKey::new(&args.pod_namespace, &args.pod_name);
        let node = NodeName(args.node.clone());
        let set_stage = |s: String| {
            if let Ok(mut st) = stage.lock() {
                *st = s;
            }
        };
        if let Some(g) = self.lock().gang_of(&key) {
            set_stage(format!("waiting for every member of gang {g} to reach bind"));
        }
        let gang = self.hold_for_gang(&key).await?;
        let prepared = match self.reserve(&key, &node, &args.pod_uid) {
            Ok(p) => p,
            Err(e) => {
                if let Some(g) = &gang {
                    self.lock().fail_gang(g, &e.chain());
                }
                return Err(e);
            }
        };
        set_stage(if prepared.gpus.is_empty() {
            "binding".to_owned()
        } else {
            format!("waiting for node {node} to create its MIG instances")
        });
        match self.effect(args, &key, &prepared).await {
            Ok(mig_uuids) => {
                let mut inner = self.lock();
                for ((gpu, start), uuid) in mig_uuids {
                    inner.mig_uuids.insert((node.clone(), gpu, start), uuid);
                }
                Arc::make_mut(&mut inner.snap).confirm(&key)?;
                inner.generation += 1;
                if self.settings.mode == "demo" {
                    // No informer will ever report the pod: the bind is the last word.
                    inner.assumed.remove(&key);
                }
                if let Some(g) = &gang {
                    // Bound: its reservation annotation has served.
                    inner.outbox.clear(key.clone());
                    // Every planned member bound: the gang is done.
                    let done = inner.gangs.get(g).and_then(|st| st.plan.as_ref()).is_some_and(|p| {
                        p.members
                            .iter()
                            .all(|(k, _)| inner.snap.allocation(k).is_some_and(|a| a.reserved_until_ms.is_none()))
                    });
                    if done {
                        inner.gangs.remove(g);
                    }
                }
                self.metrics.reservations.set(inner.assumed.len() as i64);
                drop(inner);
                if gang.is_some() {
                    self.writes_ready();
                }
                Ok(())
            }
            Err(e) if e.api().is_some_and(tessera_api::kube_error::is_conflict) => {
                // The API server already has a binding for the pod: an earlier bind of ours won,
                // or someone else bound it. Either way the pod may hold these devices now, so
                // they are never released here; the informer settles which (an assumed pod the
                // rebuild shows elsewhere is dropped then).
                let (ns, name) = (&args.pod_namespace, &args.pod_name);
                let bound_to = self.lookup.pod(ns, name).and_then(|p| p.spec.and_then(|s| s.node_name));
                let mut inner = self.lock();
                let _ = Arc::make_mut(&mut inner.snap).confirm(&key);
                inner.generation += 1;
                if gang.is_some() {
                    inner.outbox.clear(key.clone());
                }
                drop(inner);
                match bound_to {
                    Some(n) if n == args.node => {
                        tracing::info!(pod = %key, node = %n, "The pod is bound already (an earlier bind won); keeping its devices");
                        Ok(())
                    }
                    _ => Err(e),
                }
            }
            Err(e) => {
                let mut inner = self.lock();
                // Out of the assume cache first: dropping the gang's plan lays the state over
                // the last rebuild again, which must not bring this pod back.
                inner.assumed.remove(&key);
                if Arc::make_mut(&mut inner.snap).release(&key).is_ok() {
                    inner.generation += 1;
                }
                if let Some(g) = &gang {
                    inner.fail_gang(g, &e.chain());
                }
                self.metrics.reservations.set(inner.assumed.len() as i64);
                drop(inner);
                if gang.is_some() {
                    self.writes_ready();
                }
                Err(e)
            }
        }
    }

    /// Holds a planned gang member's bind until every planned member has reached bind (or the
    /// plan's deadline passes, which fails them all). Returns the gang's name for members.
    async fn hold_for_gang(&self, key: &PodKey) -> Result<Option<String>, Error> {
        let (name, mut rx, deadline_ms) = {
            let mut inner = self.lock();
            let Some(name) = inner.gang_of(key) else { return Ok(None) };
            let Some(st) = inner.gangs.get_mut(&name) else { return Ok(None) };
            st.arrived.insert(key.clone());
            let (all_in, deadline_ms) = match &st.plan {
                Some(p) => (p.members.iter().all(|(k, _)| st.arrived.contains(k)), p.deadline_ms),
                None => (false, 0),
            };
            if all_in {
                tracing::info!(gang = %name, "Every gang member reached bind; binding all");
                st.barrier.send_replace(Barrier::Open);
            }
            (name, st.barrier.subscribe(), deadline_ms)
        };
        let deadline = self.origin + Duration::from_millis(deadline_ms);
        let outcome = tokio::time::timeout_at(deadline, rx.wait_for(|b| *b != Barrier::Waiting)).await;
        match outcome {
            Ok(Ok(b)) => match &*b {
                Barrier::Failed(why) => Err(Error::Gang { gang: name, why: why.clone() }),
                _ => Ok(Some(name)),
            },
            Ok(Err(_)) => Err(Error::Gang { gang: name, why: "the plan was dropped".into() }),
            Err(_) => {
                let why = "the reservation deadline passed before every member reached bind";
                let now = self.now_ms();
                let mut inner = self.lock();
                inner.refuse_unarrived(&name, now);
                inner.fail_gang(&name, why);
                Err(Error::Gang { gang: name, why: why.into() })
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
                Arc::make_mut(&mut inner.snap).release(key)?;
                inner.assumed.remove(key);
                inner.generation += 1;
                tracing::info!(pod = %key, from = %a.node, to = %node, "Moving held devices to the bound node");
                self.place_on(&inner, &demand, node)?
            }
            None => self.place_on(&inner, &demand, node)?,
        };
        if inner.snap.allocation(key).is_none() {
            // Assumed, not lapsing: the bind itself releases it if anything fails.
            placement.apply(Arc::make_mut(&mut inner.snap), &demand, None)?;
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
        let assignment = Assignment::of(&inner.snap, &placement, |gpu, start| {
            inner.mig_uuids.get(&(node.clone(), gpu, start)).cloned()
        });
        Ok(Prepared { gpus, wanted, assignment, ops: placement.ops.len() })
    }

    /// The lock that orders `GpuNode.spec` writes to one node.
    fn node_lock(&self, node: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.spec_locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(node.to_owned()).or_default().clone()
    }

    /// The desired spec of the GPUs in `changed`, from the state as it is now (the bind's own
    /// reservation and those of binds on the same GPUs included).
    fn fresh_specs(&self, node: &str, changed: &[GpuSpec]) -> Vec<GpuSpec> {
        let inner = self.lock();
        let Some(n) = inner.snap.node(&NodeName(node.to_owned())) else { return changed.to_vec() };
        changed.iter().map(|g| n.gpu(g.index).map_or_else(|| g.clone(), gpu_spec)).collect()
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
        // New instances, or a GPU switching mode (an idle MIG GPU handed out whole).
        if !prepared.gpus.is_empty() {
            self.metrics.mig_reconfig_requests_total.inc();
            let gpus = {
                // One spec write per node at a time, each from the state as it is now: a
                // concurrent bind's instances on the same GPU are in it (its reservation is),
                // so no write drops another's instance.
                let lock = self.node_lock(&args.node);
                let _held = lock.lock().await;
                let gpus = self.fresh_specs(&args.node, &prepared.gpus);
                self.binder.write_spec(&args.node, &gpus).await?;
                gpus
            };
            uuids = self.binder.await_status(&args.node, &gpus, &prepared.wanted, self.settings.mig_timeout).await?;
            self.lock().reconfigs_done += prepared.ops as u64;
            for d in &mut assignment.devices {
                if let Some(s) = d.start
                    && d.mig.is_none()
                {
                    d.mig = uuids.get(&(d.index, s)).cloned().filter(|u| !u.is_empty());
                }
            }
        }
        let text = assignment.to_annotation();
        let mut ann = BTreeMap::from([(annotations::ASSIGNMENT.to_owned(), text.clone())]);
        if let Some(keys) = &self.settings.assignment_keys {
            if args.pod_uid.is_empty() {
                return Err(Error::BadRequest(format!(
                    "pod {key}: the binding has no pod UID to sign the assignment for"
                )));
            }
            let ring =
                keys.current().map_err(|e| Error::BadRequest(format!("signing the assignment of {key}: {e}")))?;
            ann.insert(annotations::ASSIGNMENT_SIGNATURE.to_owned(), ring.sign(&args.pod_uid, &args.node, &text));
        }
        let req = BindRequest {
            namespace: args.pod_namespace.clone(),
            name: args.pod_name.clone(),
            uid: args.pod_uid.clone(),
            node: args.node.clone(),
            annotations: ann,
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

    // ---- live cluster state ------------------------------------------------------------

    /// Replaces the snapshot with one rebuilt from the API, then lays the assume cache over it:
    /// pods the rebuild already shows bound leave the cache; the rest are re-applied. Pods
    /// deleted since (their UIDs, [`Scheduler::pod_deleted`]) stay released even when the
    /// stores the rebuild read had not caught up yet.
    pub fn replace_base(
        &self,
        mut snap: Snapshot,
        uids: HashMap<String, PodKey>,
        mig_uuids: HashMap<(NodeName, u32, u8), String>,
    ) {
        let now = self.now_ms();
        let ttl = u64::try_from(self.settings.assume_ttl.as_millis()).unwrap_or(u64::MAX);
        let mut inner = self.lock();
        inner.deleted.retain(|d| now.saturating_sub(d.at_ms) <= DELETED_MS);
        for d in &inner.deleted {
            if uids.get(&d.uid) == Some(&d.pod) && snap.allocation(&d.pod).is_some() {
                let _ = snap.release(&d.pod);
            }
        }
        inner.base_reconfigs = snap.reconfigs();
        // Nodes the rebuild shows unchanged keep their versions, so their cached verdicts stay
        // valid: a rebuild after one pod event costs the next filter that node, not the cluster.
        let old = inner.base.clone().unwrap_or_else(|| inner.snap.clone());
        snap.keep_versions(&old);
        let snap = Arc::new(snap);
        // kube-scheduler does not watch GpuNodes: when a node gains usable GPUs (its agent
        // started, a GPU became healthy again) nothing tells it to retry the pods it parked
        // until its periodic flush of unschedulable pods, minutes later. Nudge them.
        let gained = inner.base.as_ref().is_some_and(|old| gains_gpus(old, &snap));
        if self.settings.mode == "live" {
            inner.base = Some(snap.clone());
        }
        inner.lay_over(snap, Some((now, ttl)));
        inner.uids = uids;
        inner.mig_uuids = mig_uuids;
        inner.bound_here.retain(|_, (_, at)| now.saturating_sub(*at) <= ttl);
        if gained {
            let waiting = inner.refused_everywhere(now, true);
            if !waiting.is_empty() {
                tracing::info!(
                    pods = waiting.len(),
                    "A node gained GPUs; asking kube-scheduler to retry the pods it refused"
                );
                let stamp = self.wall_at(now).to_string();
                for p in waiting {
                    inner.outbox.annotate(p, annotations::REQUEUE, Some(stamp.clone()));
                }
            }
        }
        let queued = !inner.outbox.is_empty();
        self.metrics.reservations.set(inner.assumed.len() as i64);
        drop(inner);
        if queued {
            self.writes_ready();
        }
    }

    /// A pod was deleted (a watch event): whatever it held is free for the very next filter,
    /// its gang's plan (if it was a planned member) is dropped so the other members' devices
    /// are released too, and queued annotation writes to it are dropped. Pods refused for lack
    /// of devices are nudged so that kube-scheduler retries them now.
    pub fn pod_deleted(&self, pod: &Pod) {
        let Ok(key) = podparse::pod_key(pod) else { return };
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        self.forget_pod(&key, &uid, true);
    }

    /// A pod changed (a watch event): one that finished (Succeeded/Failed) frees its devices at
    /// once, as a deleted one does.
    pub fn pod_changed(&self, pod: &Pod) {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if !matches!(phase, Some("Succeeded" | "Failed")) {
            return;
        }
        let Ok(key) = podparse::pod_key(pod) else { return };
        if self.lock().snap.allocation(&key).is_some() {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            self.forget_pod(&key, &uid, false);
        }
    }

    fn forget_pod(&self, key: &PodKey, uid: &str, deleted: bool) {
        let now = self.now_ms();
        let mut inner = self.lock();
        let mut freed = false;
        let mut dropped_plan = false;
        if deleted {
            inner.outbox.forget(key);
            inner.deleted.push_back(Deleted { uid: uid.to_owned(), pod: key.clone(), at_ms: now });
            inner.uids.remove(uid);
            // A planned member is gone: the plan cannot complete; release every reservation.
            let gangs: Vec<String> = inner
                .gangs
                .iter()
                .filter(|(_, st)| st.planned(key) || st.members.contains_key(key))
                .map(|(n, _)| n.clone())
                .collect();
            for g in gangs {
                let planned = inner.gangs.get(&g).is_some_and(|st| st.planned(key));
                if let Some(st) = inner.gangs.get_mut(&g) {
                    st.members.remove(key);
                    st.refused.remove(key);
                }
                if planned {
                    tracing::info!(gang = %g, pod = %key, "A planned gang member was deleted; its plan is dropped");
                    let why = format!("member {key} was deleted");
                    let released = !inner.drop_plan(&g, &why).is_empty();
                    freed |= released;
                    dropped_plan |= released;
                }
            }
        }
        inner.assumed.remove(key);
        inner.bound_here.remove(key);
        // The state and the last rebuild often are one snapshot (nothing laid over it): then
        // one copy serves both.
        let shared = inner.base.as_ref().is_some_and(|b| Arc::ptr_eq(b, &inner.snap));
        if inner.snap.allocation(key).is_some() && Arc::make_mut(&mut inner.snap).release(key).is_ok() {
            freed = true;
        }
        if shared {
            inner.base = Some(inner.snap.clone());
        } else if let Some(base) = inner.base.as_mut()
            && base.allocation(key).is_some()
        {
            let _ = Arc::make_mut(base).release(key);
        }
        if dropped_plan {
            // The plan's MIG instances no node created go with it.
            inner.rebase();
        }
        if freed {
            inner.generation += 1;
            let waiting = inner.waiting_for_capacity(now);
            let stamp = self.wall_at(now).to_string();
            for p in waiting {
                inner.outbox.annotate(p, annotations::REQUEUE, Some(stamp.clone()));
            }
        }
        let queued = !inner.outbox.is_empty();
        self.metrics.reservations.set(inner.assumed.len() as i64);
        drop(inner);
        if queued {
            self.writes_ready();
        }
    }

    // ---- read-only views ---------------------------------------------------------------

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
            .filter(|a| a.reserved_until_ms.is_some() || inner.assumed.contains_key(&a.pod))
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
                } else if inner.assumed.contains_key(&a.pod) {
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

/// A filter's answer, written on the wire straight from the verdicts (shared with the pod's
/// cached verdicts): the same JSON as the [`ExtenderFilterResult`] of [`FilterReply::into_result`].
#[derive(Debug)]
pub struct FilterReply {
    verdicts: Arc<Vec<NodeVerdict>>,
    /// The passing Node objects, when the request carried Node objects instead of names.
    nodes: Option<NodeList>,
    /// The call failed: kube-scheduler fails this scheduling cycle with this message.
    error: Option<String>,
}

impl FilterReply {
    fn error(message: impl Into<String>) -> Self {
        Self { verdicts: Arc::default(), nodes: None, error: Some(message.into()) }
    }

    fn passing(&self) -> impl Iterator<Item = &str> {
        self.verdicts.iter().filter(|v| v.outcome.is_ok()).map(|v| v.node.0.as_str())
    }

    fn failing(&self, unresolvable: bool) -> impl Iterator<Item = (&str, &str)> {
        self.verdicts.iter().filter_map(move |v| match &v.outcome {
            Err(r) if r.is_unresolvable() == unresolvable => Some((v.node.0.as_str(), r.reason())),
            _ => None,
        })
    }

    /// The reply as the wire type.
    pub fn into_result(self) -> ExtenderFilterResult {
        if let Some(e) = self.error {
            return ExtenderFilterResult::error(e);
        }
        let map = |u| -> FailedNodesMap { self.failing(u).map(|(n, r)| (n.to_owned(), r.to_owned())).collect() };
        ExtenderFilterResult {
            node_names: self.nodes.is_none().then(|| self.passing().map(str::to_owned).collect()),
            failed_nodes: Some(map(false)),
            failed_and_unresolvable_nodes: Some(map(true)),
            nodes: self.nodes,
            error: String::new(),
        }
    }
}

impl Serialize for FilterReply {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        struct Seq<I>(std::cell::Cell<Option<I>>);
        impl<'a, I: Iterator<Item = &'a str>> Serialize for Seq<I> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq(self.0.take().into_iter().flatten())
            }
        }
        struct Map<I>(std::cell::Cell<Option<I>>);
        impl<'a, I: Iterator<Item = (&'a str, &'a str)>> Serialize for Map<I> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_map(self.0.take().into_iter().flatten())
            }
        }
        let mut st = serializer.serialize_struct("ExtenderFilterResult", 5)?;
        if let Some(e) = &self.error {
            st.serialize_field("Nodes", &None::<NodeList>)?;
            st.serialize_field("NodeNames", &None::<Vec<String>>)?;
            st.serialize_field("FailedNodes", &None::<FailedNodesMap>)?;
            st.serialize_field("FailedAndUnresolvableNodes", &None::<FailedNodesMap>)?;
            st.serialize_field("Error", e)?;
            return st.end();
        }
        st.serialize_field("Nodes", &self.nodes)?;
        match self.nodes {
            Some(_) => st.serialize_field("NodeNames", &None::<Vec<String>>)?,
            None => st.serialize_field("NodeNames", &Seq(std::cell::Cell::new(Some(self.passing()))))?,
        }
        st.serialize_field("FailedNodes", &Map(std::cell::Cell::new(Some(self.failing(false)))))?;
        st.serialize_field("FailedAndUnresolvableNodes", &Map(std::cell::Cell::new(Some(self.failing(true)))))?;
        st.serialize_field("Error", "")?;
        st.end()
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

/// What a filter or prioritize still has to do after the locked part.
enum Verdicts {
    Done(Vec<NodeVerdict>),
    Evaluate { snap: Arc<Snapshot>, workload: Arc<Workload> },
}

/// Below this many offered nodes per thread, splitting an evaluation costs more than it saves.
const PARALLEL_MIN_NODES: usize = 128;

/// What a bind must do on the cluster.
#[derive(Debug)]
struct Prepared {
    gpus: Vec<GpuSpec>,
    wanted: Vec<WantedInstance>,
    assignment: Assignment,
    /// MIG operations the placement needs (counted as reconfigurations once applied).
    ops: usize,
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

impl Scheduler {
    /// Pods filtered by this replica that hold no devices or only a gang reservation, sorted by
    /// name. Pods the cluster reports bound, finished or gone are left out.
    pub fn pending(&self) -> Vec<PendingView> {
        let mut out: Vec<PendingView> = {
            let inner = self.lock();
            inner
                .seen
                .map
                .iter()
                .filter_map(|(key, seen)| {
                    let state = match inner.snap.allocation(key) {
                        None => PendingState::Pending,
                        Some(a) if a.reserved_until_ms.is_some() => PendingState::Reserved,
                        Some(_) => return None,
                    };
                    // Counted without the `node NAME: ` prefix, so one cause on many nodes adds up.
                    // Reasons that can change (unschedulable now) come before "never fits".
                    let mut reasons: BTreeMap<(bool, &str), usize> = BTreeMap::new();
                    for v in seen.verdicts.iter() {
                        if let Err(r) = &v.outcome {
                            let why = r.reason();
                            let why = why
                                .strip_prefix("node ")
                                .and_then(|w| w.strip_prefix(v.node.0.as_str()))
                                .and_then(|w| w.strip_prefix(": "))
                                .unwrap_or(why);
                            *reasons.entry((!r.is_unresolvable(), why)).or_default() += 1;
                        }
                    }
                    let reason = reasons
                        .iter()
                        .max_by_key(|((changeable, why), n)| (*changeable, **n, std::cmp::Reverse(*why)))
                        .map(|((_, why), _)| (*why).to_owned());
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

#[cfg(test)]
mod tests {
    use tessera_core::{Candidate, GpuDemand};

    use super::*;

    fn workload(counts: &[(GpuDemand, usize)]) -> Workload {
        let demands: Vec<Demand> = counts
            .iter()
            .flat_map(|(g, n)| (0..*n).map(move |i| Demand::new(format!("ml/p{i}").as_str(), g.clone())))
            .collect();
        Workload::from_demands_top(demands.iter(), 1.0)
    }

    #[test]
    fn the_workload_is_replaced_only_when_its_mix_really_moves() {
        let mig = GpuDemand::Mig { profile: "1g.10gb".into() };
        let whole = GpuDemand::Whole { count: 1 };
        let base = workload(&[(mig.clone(), 50), (whole.clone(), 50)]);
        assert!(drifted(&Workload::default(), &base));
        // Sampling noise: 52/48 is the same mix.
        assert!(!drifted(&base, &workload(&[(mig.clone(), 52), (whole.clone(), 48)])));
        // A real shift, a new class, a lost class.
        assert!(drifted(&base, &workload(&[(mig.clone(), 70), (whole.clone(), 30)])));
        assert!(drifted(&base, &workload(&[(mig.clone(), 50), (whole, 40), (GpuDemand::Share { milli: 300 }, 10)])));
        assert!(drifted(&base, &workload(&[(mig, 100)])));
    }

    fn verdict(node: &str, fits: bool) -> NodeVerdict {
        NodeVerdict {
            node: NodeName(node.into()),
            outcome: if fits {
                Ok((Candidate { node: 0, grants: Vec::new(), ops: Vec::new() }, policy::Score::default()))
            } else {
                Err(Rejection::Unschedulable(format!("node {node}: full")))
            },
        }
    }

    #[test]
    fn filter_verdicts_cover_the_same_list_or_the_nodes_that_passed() {
        let vs = [verdict("a", true), verdict("b", false), verdict("c", true)];
        let names = |ns: &[&str]| ns.iter().map(|n| NodeName((*n).into())).collect::<Vec<_>>();
        assert!(covers(&vs, &names(&["a", "b", "c"])));
        assert!(covers(&vs, &names(&["a", "c"])));
        // A fitting node left out would change the normalisation; order and unknown names too.
        assert!(!covers(&vs, &names(&["a"])));
        assert!(!covers(&vs, &names(&["c", "a"])));
        assert!(!covers(&vs, &names(&["a", "c", "d"])));
    }
}
