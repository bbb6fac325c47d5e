//! Live cluster state: kube-rs reflectors of Nodes, Pods, `GpuNode`s and `PodGroup`s, turned
//! into a core [`tessera_core::Snapshot`] by [`build`] (in `tessera-api`, shared with the
//! simulator) after every change.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node as KubeNode, Pod};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tessera_api::gpunode::GpuNode;
use tessera_api::podgroup::{PodGroup, PodGroupSpec};
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

/// The reflectors, started.
#[derive(Debug, Clone)]
pub struct Watch {
    pub nodes: Store<KubeNode>,
    pub pods: Store<Pod>,
    pub gpunodes: Store<GpuNode>,
    pub groups: Store<PodGroup>,
    pub changed: Arc<tokio::sync::Notify>,
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
    // The caches keep every object of the cluster: drop the parts tessera never reads (the
    // field-manager records and kubectl's copy of the applied object), often most of a Pod.
    let slim = watcher(api, watcher::Config::default()).modify(|o: &mut K| {
        let meta = o.meta_mut();
        meta.managed_fields = None;
        if let Some(a) = meta.annotations.as_mut() {
            a.remove(LAST_APPLIED);
        }
    });
    let stream = reflector::reflector(writer, slim).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            match item {
                // Deletions too: a freed device must count before the next filter.
                Ok(ev @ (watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone)) => {
                    on_event(&ev);
                    changed.notify_one();
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, kind = %K::kind(&()), "Watch failed; retrying"),
            }
        }
    });
    store
}

impl Watch {
    /// Starts the four reflectors. PodGroups are optional (the CRD may not be installed).
    pub fn start(client: &Client) -> Self {
        let changed = Arc::new(tokio::sync::Notify::new());
        let pod_events: PodEvents = Arc::default();
        let to = pod_events.clone();
        // Pod deletions (and pods that finished) are applied to the scheduler's state as the
        // watch reports them, before the debounced rebuild: the very next filter sees the
        // freed devices.
        let on_pod = move |ev: &watcher::Event<Pod>| {
            if let Some(s) = to.get() {
                match ev {
                    watcher::Event::Delete(p) => s.pod_deleted(p),
                    watcher::Event::Apply(p) => s.pod_changed(p),
                    _ => {}
                }
            }
        };
        Self {
            nodes: spawn_reflector(Api::all(client.clone()), changed.clone(), |_| {}),
            pods: spawn_reflector(Api::all(client.clone()), changed.clone(), on_pod),
            gpunodes: spawn_reflector(Api::all(client.clone()), changed.clone(), |_| {}),
            groups: spawn_reflector(Api::all(client.clone()), changed.clone(), |_| {}),
            changed,
            pod_events,
            events: Some(Events::new(client.clone())),
        }
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
            // Whole-cluster work: off the runtime's workers, which serve the verbs meanwhile.
            let (nodes, gpunodes, pods) = (self.nodes.state(), self.gpunodes.state(), self.pods.state());
            let built =
                match tokio::task::spawn_blocking(move || build_checked(&nodes, &gpunodes, &pods, keys.as_deref()))
                    .await
                {
                    Ok(built) => built,
                    Err(error) => {
                        tracing::error!(%error, "Rebuilding the cluster state failed; keeping the last one");
                        self.changed.notified().await;
                        continue;
                    }
                };
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
