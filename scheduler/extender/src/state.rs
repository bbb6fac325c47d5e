//! The [`Scheduler`]: its state behind one mutex, its constructor and accessors.
//!
//! One [`Scheduler`] owns the core [`Snapshot`] (behind a mutex: decisions are short and
//! CPU-bound), the assume cache of pods this replica bound but the informer has not shown yet,
//! the last filter verdicts per pod (for prioritize and for `explain`), and the effects seam
//! ([`Binder`]). In live mode the snapshot's base is rebuilt from the reflectors
//! ([`Scheduler::replace_base`]) and the assume cache is laid over it, so a pod being bound
//! counts at once and is never counted twice.
//!
//! The verbs live one per module: `filter`, `prioritize`, `bind`,
//! `preempt`; gang planning and the tick in `planning`; rebuilds and pod
//! events in `live`; the read-only views in `views`.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use k8s_openapi::api::core::v1::Pod;
use tessera_api::pod::{self as podparse, PodError};
use tessera_core::policy::{self, Workload};
use tessera_core::{Demand, PodKey, Policy, Snapshot};

use crate::assume::AssumeCache;
use crate::bind::Inflight;
use crate::binder::Binder;
use crate::bounded::{Bounded, Seen};
use crate::live::Deleted;
use crate::metrics::Metrics;
use crate::podgroups::GroupWrites;
use crate::preemption::PreemptQueue;
use crate::reservations::Outbox;

pub use crate::bind::gpu_spec;
pub use crate::filter::FilterReply;
use crate::gangs::GangBook;
pub use crate::gangs::REFUSAL_MS;
pub use crate::lookup::{Lookup, MemoryLookup};
pub use crate::settings::Settings;
pub use crate::views::allocation_workload;

/// Everything behind the scheduler's lock: the snapshot and the components the verbs share.
#[derive(Debug)]
pub(crate) struct Inner {
    /// Shared with filters evaluating outside the lock; writers copy on write.
    pub(crate) snap: Arc<Snapshot>,
    /// Bumped on every change of `snap`; cached verdicts are valid only for their generation.
    pub(crate) generation: u64,
    /// The expected workload (FGD's target), from the recent demands.
    pub(crate) workload: Arc<Workload>,
    pub(crate) recent: VecDeque<Demand>,
    /// Filters answered, for how often the workload is worked out again.
    pub(crate) filtered: u64,
    /// The last filter of each pod, for prioritize, bind and the views.
    pub(crate) seen: Bounded<Seen>,
    /// Pod keys by UID (preempt names victims by UID).
    pub(crate) uids: tessera_api::snapshot::Uids,
    /// Assumed pods and the last rebuild they are laid over.
    pub(crate) cache: AssumeCache,
    /// MIG instance UUIDs by (node, gpu, start), as the node agents report them.
    pub(crate) mig_uuids: tessera_api::snapshot::MigUuids,
    /// Reconfigurations counted by the snapshot when its base was built (layouts that existed).
    pub(crate) base_reconfigs: u64,
    /// Every gang's members, refusals and lifecycle.
    pub(crate) gangs: GangBook,
    /// Reservation annotations to write or remove (the leader's [`crate::reservations::writer`]).
    pub(crate) outbox: Outbox,
    /// MIG operations (instances created or destroyed, mode switches) that nodes applied for
    /// this replica's binds.
    pub(crate) reconfigs_done: u64,
    /// Binds in progress, joined by kube-scheduler's retries.
    pub(crate) inflight: HashMap<PodKey, Inflight>,
    /// Pods this replica bound, with the node, until the informer has surely reported them
    /// (a retried bind of one of them is answered from here).
    pub(crate) bound_here: HashMap<PodKey, (String, u64)>,
    /// Pods deleted lately, which a lagging rebuild must not bring back.
    pub(crate) deleted: VecDeque<Deleted>,
    /// Preemptors queued for tessera's own preemption, and those served lately.
    pub(crate) preemptions: PreemptQueue,
    /// PodGroup status writes waiting for the writer, and the last status queued per group.
    pub(crate) group_writes: GroupWrites,
}

impl Inner {
    /// Drops a gang's plan: releases its members still reserved (bound ones stay) and fails
    /// every held bind with `why`. In live mode the state is then laid over the last rebuild
    /// again, so MIG instances the plan assumed but no node created disappear with it.
    pub(crate) fn fail_gang(&mut self, name: &str, why: &str) -> Vec<PodKey> {
        let released = self.drop_plan(name, why);
        if !released.is_empty() {
            self.rebase();
        }
        released
    }

    /// Lays the assume cache and the live gang plans over the last rebuild again (live mode).
    pub(crate) fn rebase(&mut self) {
        if let Some(base) = self.cache.base().cloned() {
            self.lay_over(base, None);
        }
    }

    /// Makes `snap` (a rebuild) the state: pods the rebuild shows leave the assume cache (and,
    /// with `expire` = (now, ttl), assumed pods older than ttl); the rest and every live gang
    /// plan are applied again. Plans that no longer fit are dropped.
    pub(crate) fn lay_over(&mut self, snap: Arc<Snapshot>, expire: Option<(u64, u64)>) {
        let (snap, broken) = self.cache.lay_over(snap, expire, &self.gangs);
        self.snap = snap;
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
    pub(crate) fn drop_plan(&mut self, name: &str, why: &str) -> Vec<PodKey> {
        let dropped = self.gangs.drop_plan(name, why, &mut self.snap);
        for pod in dropped.members {
            self.outbox.clear(pod);
        }
        for pod in &dropped.released {
            self.cache.remove(pod);
        }
        if !dropped.released.is_empty() {
            self.generation += 1;
        }
        dropped.released
    }

    pub(crate) fn gang_of(&self, pod: &PodKey) -> Option<String> {
        self.gangs.gang_of(pod)
    }

    /// Whether this replica filtered a member of `gang` recently.
    pub(crate) fn seen_gang(&self, gang: &str) -> bool {
        self.seen.saw_gang(gang)
    }

    /// Records that kube-scheduler did not take the plan's node for members that never reached
    /// bind, so the next plan of the gang leaves those nodes out for them.
    pub(crate) fn refuse_unarrived(&mut self, gang: &str, now_ms: u64) {
        self.gangs.refuse_unarrived(gang, now_ms);
    }

    /// Pods this replica refused for lack of free devices at their last filter, not holding
    /// anything now, filtered within the last ten minutes: the ones kube-scheduler may park
    /// until its periodic flush.
    pub(crate) fn waiting_for_capacity(&self, now_ms: u64) -> Vec<PodKey> {
        self.seen.refused_everywhere(&self.snap, now_ms, false)
    }

    /// [`Bounded::refused_everywhere`] on the state as it is.
    pub(crate) fn refused_everywhere(&self, now_ms: u64, any_reason: bool) -> Vec<PodKey> {
        self.seen.refused_everywhere(&self.snap, now_ms, any_reason)
    }
}

/// The scheduler: state plus the extender verbs.
pub struct Scheduler {
    pub(crate) inner: Mutex<Inner>,
    pub(crate) policy: Box<dyn Policy>,
    /// Per-node verdicts reused while a node's state is unchanged (the core's `Memo`), one
    /// per thread, each holding the demand shapes that hash to it: filters of different
    /// shapes evaluate at the same time instead of queueing on one lock, and no verdict is
    /// worked out twice.
    pub(crate) memos: Vec<Mutex<policy::Memo>>,
    pub(crate) binder: Arc<dyn Binder>,
    pub(crate) lookup: Arc<dyn Lookup>,
    pub metrics: Metrics,
    pub(crate) settings: Settings,
    pub(crate) origin: tokio::time::Instant,
    /// The wall-clock time at `origin`: reservation deadlines are written in wall-clock time.
    pub(crate) origin_wall: k8s_openapi::jiff::Timestamp,
    /// Wakes the reservation writer.
    pub(crate) writes: tokio::sync::Notify,
    /// Orders `GpuNode.spec` writes per node ([`Scheduler::node_lock`]).
    pub(crate) spec_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Wakes the preemption task.
    pub(crate) preempts: tokio::sync::Notify,
    pub(crate) leader: AtomicBool,
    pub(crate) synced: AtomicBool,
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

/// Pods whose last filter verdicts are kept (for prioritize and explain). Each holds one
/// verdict per offered node, so this bounds memory on large clusters.
const SEEN_PODS: usize = 256;

impl Scheduler {
    #[allow(clippy::disallowed_methods)] // the scheduler's clock starts here: one wall and one monotonic origin, read once
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
                uids: Default::default(),
                cache: AssumeCache::default(),
                mig_uuids: Default::default(),
                base_reconfigs,
                gangs: GangBook::default(),
                outbox: Outbox::new(settings.persist_reservations),
                reconfigs_done: 0,
                inflight: HashMap::new(),
                bound_here: HashMap::new(),
                deleted: VecDeque::new(),
                preemptions: PreemptQueue::default(),
                group_writes: GroupWrites::default(),
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
}
