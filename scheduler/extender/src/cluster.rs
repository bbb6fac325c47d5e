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
pub use tessera_api::snapshot::{Built, GFD_MEMORY, GFD_PRODUCT, SHARING_LABEL, build};

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
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
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
        }
    }

    pub fn lookup(&self) -> StoreLookup {
        StoreLookup { pods: self.pods.clone(), groups: self.groups.clone() }
    }

    /// Waits for the first full list of Nodes, Pods and GpuNodes, then rebuilds the
    /// scheduler's snapshot after every change (coalescing bursts for `debounce`).
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
        loop {
            let built = build(&self.nodes.state(), &self.gpunodes.state(), &self.pods.state());
            for w in built.warnings.iter().take(20) {
                tracing::debug!(warning = %w, "Cluster state");
            }
            tracing::debug!(
                nodes = built.snap.nodes().len(),
                pods = built.snap.allocations().len(),
                "Rebuilt cluster state"
            );
            scheduler.replace_base(built.snap, built.uids, built.mig_uuids);
            // Gang plans another replica made (before a restart or a leader change).
            scheduler.restore_reservations(&self.pods.state());
            scheduler.queue_pod_group_status(&self.groups.state(), &self.pods.state());
            scheduler.set_synced(true);
            self.changed.notified().await;
            tokio::time::sleep(debounce).await;
        }
    }
}
