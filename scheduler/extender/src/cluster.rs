//! Live cluster state: kube-rs reflectors of Nodes, Pods, `GpuNode`s and `PodGroup`s, turned
//! into a core [`tessera_core::Snapshot`] by [`build`] (in `tessera-api`, shared with the
//! simulator) once, then kept up to date node by node ([`Incremental`]): after a burst of watch
//! events only the nodes the events touched are rebuilt.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node as KubeNode, Pod};
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tessera_api::gpunode::GpuNode;
use tessera_api::incremental::{Incremental, NodeObjects};
use tessera_api::podgroup::{PodGroup, PodGroupSpec};
use tessera_api::snapshot::node_names_of;
pub use tessera_api::snapshot::{Built, GFD_MEMORY, GFD_PRODUCT, Refused, SHARING_LABEL, build, build_checked};

use crate::state::{Lookup, Scheduler};

/// [`Lookup`] over the reflector stores.
#[derive(Debug, Clone)]
pub struct StoreLookup {
    pub pods: Store<Pod>,
    pub groups: Store<PodGroup>,
}

impl Lookup for StoreLookup {
    fn pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        self.pods.get(&ObjectRef::new(name).within(namespace)).map(|p| (*p).clone())
    }
    fn pod_group(&self, namespace: &str, name: &str) -> Option<PodGroupSpec> {
        self.groups.get(&ObjectRef::new(name).within(namespace)).map(|g| g.spec.clone())
    }
}

/// The scheduler the pod watch reports deletions to, once [`Watch::sync`] runs.
type PodEvents = Arc<std::sync::OnceLock<Arc<Scheduler>>>;

/// How often the state is rebuilt in full even when every event was applied node by node: a
/// safety net against an event the per-node bookkeeping missed.
pub const FULL_REBUILD_EVERY: Duration = Duration::from_secs(600);

/// What the watch events changed since the state was last brought up to date, and which pods
/// name which nodes ([`node_names_of`], as the pod watch last showed them): what an event on a
/// pod touches, old object and new, and the pods a node is rebuilt from.
#[derive(Debug, Default)]
pub struct Changes {
    /// Nodes to rebuild.
    pub dirty: BTreeSet<String>,
    /// A watch relisted (or nothing is built yet): rebuild everything.
    pub full: bool,
    named: HashMap<ObjectRef<Pod>, Vec<String>>,
    by_node: HashMap<String, HashSet<ObjectRef<Pod>>>,
}

impl Changes {
    /// A pod was added or changed (`Some`), or deleted (`None`).
    pub fn pod(&mut self, pod: &Pod, now: Option<()>) {
        let r = ObjectRef::from_obj(pod);
        let names = node_names_of(pod);
        self.dirty.extend(names.iter().cloned());
        let old = match now {
            Some(()) => self.named.insert(r.clone(), names.clone()),
            None => self.named.remove(&r),
        };
        for n in old.unwrap_or_default() {
            if let Some(set) = self.by_node.get_mut(&n) {
                set.remove(&r);
                if set.is_empty() {
                    self.by_node.remove(&n);
                }
            }
            self.dirty.insert(n);
        }
        if now.is_some() {
            for n in names {
                self.by_node.entry(n).or_default().insert(r.clone());
            }
        }
    }

    /// Indexes every pod anew (after a relist) and forgets what was dirty.
    pub fn reindex(&mut self, pods: &[Arc<Pod>]) {
        self.named.clear();
        self.by_node.clear();
        for p in pods {
            self.pod(p, Some(()));
        }
        self.dirty.clear();
        self.full = false;
    }

    /// The pods that name `node`.
    pub fn pods_of(&self, node: &str) -> Vec<ObjectRef<Pod>> {
        self.by_node.get(node).map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }
}

/// The watch caches, seen node by node ([`Incremental::apply`]).
struct CacheView {
    nodes: Store<KubeNode>,
    gpunodes: Store<GpuNode>,
    pods: Store<Pod>,
    by_node: HashMap<String, Vec<ObjectRef<Pod>>>,
}

impl NodeObjects for CacheView {
    fn node(&self, name: &str) -> Option<Arc<KubeNode>> {
        self.nodes.get(&ObjectRef::new(name))
    }
    fn gpunode(&self, name: &str) -> Option<Arc<GpuNode>> {
        self.gpunodes.get(&ObjectRef::new(name))
    }
    fn pods(&self, name: &str) -> Vec<Arc<Pod>> {
        self.by_node.get(name).into_iter().flatten().filter_map(|r| self.pods.get(r)).collect()
    }
}

/// The reflectors, started.
#[derive(Debug, Clone)]
pub struct Watch {
    pub nodes: Store<KubeNode>,
    pub pods: Store<Pod>,
    pub gpunodes: Store<GpuNode>,
    pub groups: Store<PodGroup>,
    pub changed: Arc<tokio::sync::Notify>,
    /// What the events changed since the last rebuild.
    pub changes: Arc<Mutex<Changes>>,
    pod_events: PodEvents,
    /// Publishes the Events of refused assignments.
    pub events: Option<Events>,
}

/// Warning Events on pods whose assignment the rebuild does not trust.
#[derive(Clone)]
pub struct Events(kube::runtime::events::Recorder);

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Events")
    }
}

impl Events {
    pub fn new(client: Client) -> Self {
        let reporter = kube::runtime::events::Reporter { controller: "tessera-scheduler".into(), instance: None };
        Self(kube::runtime::events::Recorder::new(client, reporter))
    }

    async fn refused(&self, r: &Refused) {
        let (namespace, name) = r.pod.0.split_once('/').unwrap_or(("default", r.pod.0.as_str()));
        let reference = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(namespace.into()),
            name: Some(name.into()),
            uid: Some(r.uid.clone()),
            ..Default::default()
        };
        let counted = if r.counted {
            "its devices stay counted as held because the pod runs"
        } else {
            "its devices are not counted as held"
        };
        let ev = kube::runtime::events::Event {
            type_: kube::runtime::events::EventType::Warning,
            reason: "AssignmentRefused".into(),
            note: Some(format!(
                "tessera scheduler does not trust the assignment ({}): {}; {counted}",
                r.refusal.reason(),
                r.refusal
            )),
            action: "Rebuild".into(),
            secondary: None,
        };
        if let Err(error) = self.0.publish(&ev, &reference).await {
            tracing::warn!(pod = %r.pod, %error, "Publishing the refusal Event failed");
        }
    }
}

/// kubectl's record of the object it last applied.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops the parts of an object tessera never reads before a cache keeps it (the field-manager
/// records and kubectl's copy of the applied object), often most of a Pod.
fn slim<K: kube::Resource>(o: &mut K) {
    let meta = o.meta_mut();
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove(LAST_APPLIED);
    }
}

/// What follows a watch event once its cache has taken it: every change (added, modified,
/// deleted, relisted) goes to `on_event` and wakes `changed`.
fn taken<K>(ev: &watcher::Event<K>, on_event: &dyn Fn(&watcher::Event<K>), changed: &tokio::sync::Notify) {
    // Deletions too: a freed device must count before the next filter.
    if matches!(ev, watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone) {
        on_event(ev);
        changed.notify_one();
    }
}

/// A reflector whose every change (added, modified, deleted, relisted) wakes `changed`, and
/// whose events go to `on_event` after the store has taken them.
fn spawn_reflector<K>(
    api: Api<K>,
    changed: Arc<tokio::sync::Notify>,
    on_event: impl Fn(&watcher::Event<K>) + Send + 'static,
) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    // The caches keep every object of the cluster: only what tessera reads.
    let slim = watcher(api, watcher::Config::default()).modify(slim::<K>);
    let stream = reflector::reflector(writer, slim).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(ev) => taken(&ev, &on_event, &changed),
                Err(error) => tracing::warn!(%error, kind = %K::kind(&()), "Watch failed; retrying"),
            }
        }
    });
    store
}

type OnEvent<K> = Box<dyn Fn(&watcher::Event<K>) + Send + Sync>;

/// The watch events of a [`Watch`] made by [`Watch::fed`], given by the caller (a recorded
/// stream, a benchmark) instead of the API server: each goes through what a reflector does
/// with it (the object slimmed, the cache updated, the same handlers, the same wake-up).
pub struct Feed {
    nodes: Writer<KubeNode>,
    pods: Writer<Pod>,
    gpunodes: Writer<GpuNode>,
    groups: Writer<PodGroup>,
    on_node: OnEvent<KubeNode>,
    on_pod: OnEvent<Pod>,
    on_gpunode: OnEvent<GpuNode>,
    changed: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Feed")
    }
}

fn fed<K>(
    w: &mut Writer<K>,
    ev: watcher::Event<K>,
    on_event: &dyn Fn(&watcher::Event<K>),
    changed: &tokio::sync::Notify,
) where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let ev = ev.modify(slim::<K>);
    w.apply_watcher_event(&ev);
    taken(&ev, on_event, changed);
}

/// A watch's first list: `Init`, every object, `InitDone`.
fn listing<K>(objects: Vec<K>) -> impl Iterator<Item = watcher::Event<K>> {
    std::iter::once(watcher::Event::Init)
        .chain(objects.into_iter().map(watcher::Event::InitApply))
        .chain(std::iter::once(watcher::Event::InitDone))
}

impl Feed {
    pub fn node(&mut self, ev: watcher::Event<KubeNode>) {
        fed(&mut self.nodes, ev, &self.on_node, &self.changed);
    }
    pub fn pod(&mut self, ev: watcher::Event<Pod>) {
        fed(&mut self.pods, ev, &self.on_pod, &self.changed);
    }
    pub fn gpunode(&mut self, ev: watcher::Event<GpuNode>) {
        fed(&mut self.gpunodes, ev, &self.on_gpunode, &self.changed);
    }
    pub fn group(&mut self, ev: watcher::Event<PodGroup>) {
        fed(&mut self.groups, ev, &|_| {}, &self.changed);
    }

    /// Every watch's first list, as the four reflectors receive it at startup.
    pub fn list(&mut self, nodes: Vec<KubeNode>, gpunodes: Vec<GpuNode>, pods: Vec<Pod>, groups: Vec<PodGroup>) {
        listing(nodes).for_each(|ev| self.node(ev));
        listing(gpunodes).for_each(|ev| self.gpunode(ev));
        listing(pods).for_each(|ev| self.pod(ev));
        listing(groups).for_each(|ev| self.group(ev));
    }
}

/// Marks the node an event on a Node or `GpuNode` (named as its node) touches; a relist marks
/// everything.
fn by_name<K: kube::Resource>(changes: &Arc<Mutex<Changes>>) -> impl Fn(&watcher::Event<K>) + Send + Sync + 'static {
    let changes = changes.clone();
    move |ev| {
        let mut c = changes.lock().unwrap_or_else(|p| p.into_inner());
        match ev {
            watcher::Event::Apply(o) | watcher::Event::Delete(o) => {
                if let Some(name) = o.meta().name.clone() {
                    c.dirty.insert(name);
                }
            }
            _ => c.full = true,
        }
    }
}

/// Marks the nodes a pod event touches, and applies deletions (and pods that finished) to the
/// scheduler's state as the watch reports them, before the debounced rebuild: the very next
/// filter sees the freed devices.
fn on_pod(changes: &Arc<Mutex<Changes>>, to: &PodEvents) -> impl Fn(&watcher::Event<Pod>) + Send + Sync + 'static {
    let (changes, to) = (changes.clone(), to.clone());
    move |ev| {
        {
            let mut c = changes.lock().unwrap_or_else(|p| p.into_inner());
            match ev {
                watcher::Event::Delete(p) => c.pod(p, None),
                watcher::Event::Apply(p) => c.pod(p, Some(())),
                _ => c.full = true,
            }
        }
        if let Some(s) = to.get() {
            match ev {
                watcher::Event::Delete(p) => s.pod_deleted(p),
                watcher::Event::Apply(p) => s.pod_changed(p),
                _ => {}
            }
        }
    }
}

impl Watch {
    /// Starts the four reflectors. PodGroups are optional (the CRD may not be installed).
    pub fn start(client: &Client) -> Self {
        let changed = Arc::new(tokio::sync::Notify::new());
        let changes = Arc::new(Mutex::new(Changes { full: true, ..Changes::default() }));
        let pod_events: PodEvents = Arc::default();
        Self {
            nodes: spawn_reflector(Api::all(client.clone()), changed.clone(), by_name(&changes)),
            pods: spawn_reflector(Api::all(client.clone()), changed.clone(), on_pod(&changes, &pod_events)),
            gpunodes: spawn_reflector(Api::all(client.clone()), changed.clone(), by_name(&changes)),
            groups: spawn_reflector(Api::all(client.clone()), changed.clone(), |_| {}),
            changed,
            changes,
            pod_events,
            events: Some(Events::new(client.clone())),
        }
    }

    /// A watch over caches the returned [`Feed`] fills, with the reflectors' own handlers: the
    /// live state path ([`Watch::sync`]) driven by a recorded stream or a benchmark. Publishes
    /// no Events.
    pub fn fed() -> (Self, Feed) {
        let changed = Arc::new(tokio::sync::Notify::new());
        let changes = Arc::new(Mutex::new(Changes { full: true, ..Changes::default() }));
        let pod_events: PodEvents = Arc::default();
        let (nodes, nw) = reflector::store();
        let (pods, pw) = reflector::store();
        let (gpunodes, gw) = reflector::store();
        let (groups, grw) = reflector::store();
        let feed = Feed {
            nodes: nw,
            pods: pw,
            gpunodes: gw,
            groups: grw,
            on_node: Box::new(by_name(&changes)),
            on_pod: Box::new(on_pod(&changes, &pod_events)),
            on_gpunode: Box::new(by_name(&changes)),
            changed: changed.clone(),
        };
        (Self { nodes, pods, gpunodes, groups, changed, changes, pod_events, events: None }, feed)
    }

    pub fn lookup(&self) -> StoreLookup {
        StoreLookup { pods: self.pods.clone(), groups: self.groups.clone() }
    }

    /// Waits for the first full list of Nodes, Pods and GpuNodes, then rebuilds the
    /// scheduler's snapshot after every change (coalescing bursts for `debounce`, or for twice
    /// the last rebuild's time when that is longer).
    pub async fn sync(self, scheduler: Arc<Scheduler>, debounce: Duration) {
        let _ = self.pod_events.set(scheduler.clone());
        for (kind, ready) in [
            ("Node", self.nodes.wait_until_ready().await.is_ok()),
            ("Pod", self.pods.wait_until_ready().await.is_ok()),
            ("GpuNode", self.gpunodes.wait_until_ready().await.is_ok()),
        ] {
            if !ready {
                tracing::error!(kind, "Reflector stopped before its first list");
                return;
            }
        }
        // Each pod's refusal is reported once (log, metric, Event), not at every rebuild.
        let mut reported: std::collections::HashSet<(String, &'static str)> = Default::default();
        let mut state: Option<Incremental> = None;
        let mut built_with: Option<Arc<tessera_api::signing::Keyring>> = None;
        #[allow(clippy::disallowed_methods)] // paces full rebuilds
        let mut last_full = std::time::Instant::now();
        loop {
            let keys = match scheduler.assignment_keys().map(|k| k.current()) {
                Some(Ok(ring)) => Some(ring),
                Some(Err(error)) => {
                    // Binds fail with the same error; node agents still check every assignment.
                    tracing::error!(%error, "Assignment keys unusable; this rebuild does not check signatures");
                    None
                }
                None => None,
            };
            #[allow(clippy::disallowed_methods)] // times a rebuild for its metric
            let started = std::time::Instant::now();
            // Off the runtime's workers, which serve the verbs meanwhile. In full at the start,
            // after a watch relisted, when the keys changed, after a failed update and every
            // FULL_REBUILD_EVERY; else only the nodes the events since touched.
            let same_keys = match (&keys, &built_with) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            };
            let (full, dirty, view) = {
                let mut c = self.changes.lock().unwrap_or_else(|p| p.into_inner());
                let full = c.full || state.is_none() || !same_keys || last_full.elapsed() >= FULL_REBUILD_EVERY;
                let (nodes, gpunodes, pods) = (self.nodes.clone(), self.gpunodes.clone(), self.pods.clone());
                if full {
                    let pod_list = pods.state();
                    c.reindex(&pod_list);
                    (true, Vec::new(), CacheView { nodes, gpunodes, pods, by_node: HashMap::new() })
                } else {
                    let dirty: Vec<String> = std::mem::take(&mut c.dirty).into_iter().collect();
                    let by_node = dirty.iter().map(|n| (n.clone(), c.pods_of(n))).collect();
                    (false, dirty, CacheView { nodes, gpunodes, pods, by_node })
                }
            };
            let ring = keys.clone();
            let previous = state.take();
            let job = tokio::task::spawn_blocking(move || {
                let ring = ring.as_deref();
                if !full && let Some(mut inc) = previous {
                    match inc.apply(&dirty, &view, ring) {
                        Ok(()) => return (inc, false, dirty.len()),
                        Err(error) => {
                            tracing::warn!(%error, "Updating the cluster state node by node failed; rebuilding it in full")
                        }
                    }
                }
                let (nodes, gpunodes, pods) = (view.nodes.state(), view.gpunodes.state(), view.pods.state());
                let n = nodes.len();
                (Incremental::new(&nodes, &gpunodes, &pods, ring), true, n)
            });
            let (inc, was_full, rebuilt) = match job.await {
                Ok(done) => done,
                Err(error) => {
                    tracing::error!(%error, "Rebuilding the cluster state failed; keeping the last one");
                    self.changes.lock().unwrap_or_else(|p| p.into_inner()).full = true;
                    self.changed.notified().await;
                    continue;
                }
            };
            if was_full {
                last_full = started;
            }
            built_with = keys;
            let built = Built {
                snap: inc.snapshot().clone(),
                uids: inc.uids().clone(),
                mig_uuids: inc.mig_uuids().clone(),
                warnings: inc.warnings().take(20).cloned().collect(),
                refused: inc.refused().cloned().collect(),
            };
            state = Some(inc);
            let live: std::collections::HashSet<&str> = built.refused.iter().map(|r| r.uid.as_str()).collect();
            reported.retain(|(uid, _)| live.contains(uid.as_str()));
            for r in &built.refused {
                if !reported.insert((r.uid.clone(), r.refusal.reason())) {
                    continue;
                }
                tracing::warn!(pod = %r.pod, uid = %r.uid, node = %r.node, reason = r.refusal.reason(), why = %r.refusal,
                               counted = r.counted, "Assignment not trusted");
                scheduler
                    .metrics
                    .assignment_refusals_total
                    .get_or_create(&crate::metrics::ReasonLabels { reason: r.refusal.reason().to_owned() })
                    .inc();
                if let Some(events) = &self.events {
                    events.refused(r).await;
                }
            }
            for w in built.warnings.iter().take(20) {
                tracing::debug!(warning = %w, "Cluster state");
            }
            tracing::debug!(
                nodes = built.snap.nodes().len(),
                pods = built.snap.allocations().len(),
                full = was_full,
                rebuilt,
                "Rebuilt cluster state"
            );
            scheduler.replace_base(built.snap, built.uids, built.mig_uuids);
            let took = started.elapsed();
            scheduler.metrics.rebuild_duration_seconds.observe(took.as_secs_f64());
            // Gang plans another replica made (before a restart or a leader change).
            scheduler.restore_reservations(&self.pods.state());
            scheduler.queue_pod_group_status(&self.groups.state(), &self.pods.state());
            scheduler.set_synced(true);
            self.changed.notified().await;
            // Under a steady stream of events (every bind changes a pod) rebuild at most a third
            // of the time: deletions, finished pods and this replica's own binds are applied
            // as they happen, so what waits is only what other writers changed.
            tokio::time::sleep(debounce.max(took * 2)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(node: Option<&str>, assigned: Option<&str>) -> Pod {
        let mut p = json!({"metadata": {"name": "p", "namespace": "ml"}, "spec": {"containers": []}});
        if let Some(n) = node {
            p["spec"]["nodeName"] = json!(n);
        }
        if let Some(a) = assigned {
            let text = json!({"node": a, "devices": [{"gpu": "GPU-0", "index": 0}]}).to_string();
            p["metadata"]["annotations"] = json!({"tessera.dev/assignment": text});
        }
        serde_json::from_value(p).unwrap()
    }

    fn take(c: &mut Changes) -> Vec<String> {
        std::mem::take(&mut c.dirty).into_iter().collect()
    }

    #[test]
    fn a_pod_event_marks_the_nodes_its_old_and_new_objects_name_and_indexes_it_by_them() {
        let mut c = Changes::default();
        c.pod(&pod(None, Some("b")), Some(()));
        assert_eq!(take(&mut c), ["b"]);
        c.pod(&pod(Some("a"), Some("b")), Some(()));
        assert_eq!(take(&mut c), ["a", "b"]);
        assert_eq!(c.pods_of("a").len(), 1);
        // Recreated elsewhere: the node it left is rebuilt too and no longer lists it.
        c.pod(&pod(Some("c"), None), Some(()));
        assert_eq!(take(&mut c), ["a", "b", "c"]);
        assert!(c.pods_of("a").is_empty() && c.pods_of("b").is_empty());
        assert_eq!(c.pods_of("c").len(), 1);
        c.pod(&pod(Some("c"), None), None);
        assert_eq!(take(&mut c), ["c"]);
        assert!(c.pods_of("c").is_empty());
        c.reindex(&[Arc::new(pod(Some("d"), None))]);
        assert!(c.dirty.is_empty() && !c.full);
        assert_eq!(c.pods_of("d").len(), 1);
    }
}
