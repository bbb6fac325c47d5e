//! The seam to the API server for the effects of a decision: binding a pod and asking a node to
//! repartition its GPUs. [`KubeBinder`] talks to Kubernetes; [`MemoryBinder`] serves demo mode
//! and tests.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Binding, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use tessera_api::gpunode::{GpuNode, GpuSpec, Mode};
use tessera_core::PodKey;

use crate::error::{Error, Result};

/// A pod binding, with the annotations the apiserver merges into the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindRequest {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    pub annotations: BTreeMap<String, String>,
}

impl BindRequest {
    pub fn pod(&self) -> PodKey {
        PodKey::new(&self.namespace, &self.name)
    }
}

/// A MIG instance the scheduler needs on a node, by GPU index, profile name and start.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct WantedInstance {
    pub gpu: u32,
    pub profile: String,
    pub start: u8,
}

/// Effects on the cluster.
pub trait Binder: Send + Sync + fmt::Debug {
    /// POSTs `pods/{name}/binding`.
    fn bind<'a>(&'a self, req: &'a BindRequest) -> BoxFuture<'a, Result<()>>;

    /// Writes `gpus` (the desired state of the GPUs that change) into `GpuNode.spec`, merged
    /// by index into what the spec lists now. A concurrent writer (409 Conflict on the
    /// conditional patch) makes it read the object again and re-apply, a few times.
    fn write_spec<'a>(&'a self, node: &'a str, gpus: &'a [GpuSpec]) -> BoxFuture<'a, Result<()>>;

    /// Waits until `status` shows `gpus` in their desired mode with every wanted instance;
    /// returns each new instance's MIG UUID when reported.
    fn await_status<'a>(
        &'a self,
        node: &'a str,
        gpus: &'a [GpuSpec],
        wanted: &'a [WantedInstance],
        timeout: Duration,
    ) -> BoxFuture<'a, Result<BTreeMap<(u32, u8), String>>>;

    /// [`Binder::write_spec`], then [`Binder::await_status`].
    fn reconfigure<'a>(
        &'a self,
        node: &'a str,
        gpus: &'a [GpuSpec],
        wanted: &'a [WantedInstance],
        timeout: Duration,
    ) -> BoxFuture<'a, Result<BTreeMap<(u32, u8), String>>> {
        Box::pin(async move {
            self.write_spec(node, gpus).await?;
            self.await_status(node, gpus, wanted, timeout).await
        })
    }

    /// Sets (`Some`) or removes (`None`) one annotation of a pod (a merge patch). A pod that
    /// is gone (404) counts as done: there is nothing left to annotate.
    fn annotate<'a>(&'a self, pod: &'a PodKey, key: &'a str, value: Option<&'a str>) -> BoxFuture<'a, Result<()>>;

    /// Evicts a pod through the Eviction API (`pods/{name}/eviction`), which honours its
    /// PodDisruptionBudgets; `dry_run` asks the API server whether it would, changing nothing.
    fn evict<'a>(&'a self, pod: &'a PodKey, dry_run: bool) -> BoxFuture<'a, Result<()>>;

    /// Writes a PodGroup's `status` (a merge patch of the status subresource).
    fn pod_group_status<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        status: &'a tessera_api::podgroup::PodGroupStatus,
    ) -> BoxFuture<'a, Result<()>>;
}

/// Attempts of a conditional `GpuNode.spec` patch before a conflict is reported.
pub const SPEC_ATTEMPTS: u32 = 8;

/// Binds through the Kubernetes API.
#[derive(Clone)]
pub struct KubeBinder {
    client: Client,
    /// How often `GpuNode.status` is polled while waiting for a new MIG instance.
    poll: Duration,
}

impl fmt::Debug for KubeBinder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeBinder").field("poll", &self.poll).finish_non_exhaustive()
    }
}

impl KubeBinder {
    pub fn new(client: Client) -> Self {
        Self { client, poll: Duration::from_millis(500) }
    }

    pub fn with_poll(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }
}

/// The Binding object kube-scheduler's DefaultBinder would write, plus our annotations.
pub fn binding(req: &BindRequest) -> Binding {
    Binding {
        metadata: ObjectMeta {
            name: Some(req.name.clone()),
            namespace: Some(req.namespace.clone()),
            uid: (!req.uid.is_empty()).then(|| req.uid.clone()),
            annotations: (!req.annotations.is_empty()).then(|| req.annotations.clone()),
            ..Default::default()
        },
        target: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(req.node.clone()),
            ..Default::default()
        },
    }
}

/// Merges the changed GPUs into the existing spec list (by index).
pub fn merge_spec(existing: &[GpuSpec], changed: &[GpuSpec]) -> Vec<GpuSpec> {
    let mut by_index: BTreeMap<u32, GpuSpec> = existing.iter().map(|g| (g.index, g.clone())).collect();
    for g in changed {
        by_index.insert(g.index, g.clone());
    }
    by_index.into_values().collect()
}

/// Whether a GpuNode's status shows every changed GPU in its desired mode and every wanted
/// instance; returns the instances' UUIDs, or `None` until then.
pub fn reported(gn: &GpuNode, gpus: &[GpuSpec], wanted: &[WantedInstance]) -> Option<BTreeMap<(u32, u8), String>> {
    let status = gn.status.as_ref()?;
    for want in gpus {
        let g = status.gpus.iter().find(|g| g.index == want.index)?;
        if g.mode != want.mode || g.pending_mode.is_some() {
            return None;
        }
    }
    let mut out = BTreeMap::new();
    for w in wanted {
        let gpu = status.gpus.iter().find(|g| g.index == w.gpu)?;
        if gpu.mode != Mode::Mig {
            return None;
        }
        let inst = gpu.instances.iter().find(|i| i.start == w.start && i.profile.eq_ignore_ascii_case(&w.profile))?;
        out.insert((w.gpu, w.start), inst.uuid.clone());
    }
    Some(out)
}

impl Binder for KubeBinder {
    fn annotate<'a>(&'a self, pod: &'a PodKey, key: &'a str, value: Option<&'a str>) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let (ns, name) = pod.0.split_once('/').unwrap_or(("default", pod.0.as_str()));
            let api: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(self.client.clone(), ns);
            // In a merge patch, null deletes the key.
            let patch = serde_json::json!({"metadata": {"annotations": {key: value}}});
            match api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => Ok(()),
                Err(e) if tessera_api::kube_error::is_not_found(&e) => Ok(()),
                Err(e) => Err(Error::Annotate { pod: pod.clone(), api: Box::new(e) }),
            }
        })
    }

    fn evict<'a>(&'a self, pod: &'a PodKey, dry_run: bool) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let (ns, name) = pod.0.split_once('/').unwrap_or(("default", pod.0.as_str()));
            let api: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(self.client.clone(), ns);
            let params = kube::api::EvictParams {
                delete_options: Some(kube::api::DeleteParams { dry_run, ..Default::default() }),
                post_options: PostParams { dry_run, ..Default::default() },
            };
            match api.evict(name, &params).await {
                Ok(_) => Ok(()),
                // Gone already: what an eviction wants.
                Err(e) if tessera_api::kube_error::is_not_found(&e) => Ok(()),
                Err(e) => Err(Error::Evict { pod: pod.clone(), api: Box::new(e) }),
            }
        })
    }

    fn pod_group_status<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        status: &'a tessera_api::podgroup::PodGroupStatus,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let api: Api<tessera_api::PodGroup> = Api::namespaced(self.client.clone(), namespace);
            let patch = serde_json::json!({ "status": status });
            match api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => Ok(()),
                Err(e) if tessera_api::kube_error::is_not_found(&e) => Ok(()),
                Err(e) => Err(Error::PodGroupStatus { group: format!("{namespace}/{name}"), api: Box::new(e) }),
            }
        })
    }

    fn bind<'a>(&'a self, req: &'a BindRequest) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let api: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(self.client.clone(), &req.namespace);
            api.create_subresource::<Binding, serde_json::Value>(
                "binding",
                &req.name,
                &PostParams::default(),
                &binding(req),
            )
            .await
            .map_err(|e| Error::Bind { pod: req.pod(), node: req.node.clone(), api: Box::new(e) })?;
            Ok(())
        })
    }

    fn write_spec<'a>(&'a self, node: &'a str, gpus: &'a [GpuSpec]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let api: Api<GpuNode> = Api::all(self.client.clone());
            let patch_err = |e| Error::PatchGpuNode { node: node.to_owned(), api: Box::new(e) };
            let mut attempt = 0;
            loop {
                attempt += 1;
                let current = api.get(node).await.map_err(patch_err)?;
                let spec = merge_spec(&current.spec.gpus, gpus);
                // resourceVersion makes the merge patch conditional: a concurrent writer (another
                // bind, the node agent's status) fails us instead of being overwritten; then the
                // object is read again and the change re-applied.
                let patch = serde_json::json!({
                    "metadata": {"resourceVersion": current.metadata.resource_version},
                    "spec": {"gpus": spec},
                });
                match api.patch(node, &PatchParams::default(), &Patch::Merge(&patch)).await {
                    Ok(_) => return Ok(()),
                    Err(e) if tessera_api::kube_error::is_conflict(&e) && attempt < SPEC_ATTEMPTS => {
                        tracing::debug!(%node, attempt, "GpuNode changed under the spec patch; reading it again");
                        tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
                    }
                    Err(e) => return Err(patch_err(e)),
                }
            }
        })
    }

    fn await_status<'a>(
        &'a self,
        node: &'a str,
        gpus: &'a [GpuSpec],
        wanted: &'a [WantedInstance],
        timeout: Duration,
    ) -> BoxFuture<'a, Result<BTreeMap<(u32, u8), String>>> {
        Box::pin(async move {
            let api: Api<GpuNode> = Api::all(self.client.clone());
            let patch_err = |e| Error::PatchGpuNode { node: node.to_owned(), api: Box::new(e) };
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                // The object itself carries status; reading it needs only `get` on gpunodes.
                let gn = api.get(node).await.map_err(patch_err)?;
                if let Some(found) = reported(&gn, gpus, wanted) {
                    return Ok(found);
                }
                if tokio::time::Instant::now() + self.poll > deadline {
                    let mut what: Vec<String> =
                        wanted.iter().map(|w| format!("GPU {} {} at {}", w.gpu, w.profile, w.start)).collect();
                    if what.is_empty() {
                        what = gpus.iter().map(|g| format!("GPU {} in {:?} mode", g.index, g.mode)).collect();
                    }
                    return Err(Error::MigTimeout { node: node.to_owned(), what: what.join(", "), timeout });
                }
                tokio::time::sleep(self.poll).await;
            }
        })
    }
}

/// Records bindings in memory and creates MIG instances at once: demo mode and tests.
#[derive(Debug, Default)]
pub struct MemoryBinder {
    bound: Mutex<Vec<BindRequest>>,
    reconfigured: Mutex<Vec<(String, Vec<GpuSpec>)>>,
    /// Every annotation write, in order: (pod, key, value or `None` for a removal).
    annotated: Mutex<Vec<(PodKey, String, Option<String>)>>,
    /// Pods evicted (not dry runs), in order.
    evicted: Mutex<Vec<PodKey>>,
    /// PodGroup status writes, in order.
    group_status: Mutex<Vec<(String, tessera_api::podgroup::PodGroupStatus)>>,
    /// Makes every bind fail with this message (tests of the failure path).
    pub fail_binds: Option<String>,
    /// Pods whose eviction the "API server" refuses (a PodDisruptionBudget), with its message.
    pub refuse_evictions: Mutex<BTreeMap<PodKey, String>>,
    /// The next this many binds answer 409 Conflict, as the API server does for a pod that is
    /// bound already.
    pub conflict_binds: std::sync::atomic::AtomicUsize,
}

impl MemoryBinder {
    /// A binder whose binds all fail with `message`.
    pub fn failing(message: &str) -> Self {
        Self { fail_binds: Some(message.to_owned()), ..Default::default() }
    }

    pub fn bound(&self) -> Vec<BindRequest> {
        self.bound.lock().map(|b| b.clone()).unwrap_or_default()
    }

    pub fn reconfigured(&self) -> Vec<(String, Vec<GpuSpec>)> {
        self.reconfigured.lock().map(|b| b.clone()).unwrap_or_default()
    }

    pub fn annotated(&self) -> Vec<(PodKey, String, Option<String>)> {
        self.annotated.lock().map(|b| b.clone()).unwrap_or_default()
    }

    pub fn evicted(&self) -> Vec<PodKey> {
        self.evicted.lock().map(|b| b.clone()).unwrap_or_default()
    }

    pub fn group_status(&self) -> Vec<(String, tessera_api::podgroup::PodGroupStatus)> {
        self.group_status.lock().map(|b| b.clone()).unwrap_or_default()
    }

    /// The value each (pod, key) holds after every write so far.
    pub fn annotations(&self) -> BTreeMap<(PodKey, String), String> {
        let mut out = BTreeMap::new();
        for (pod, key, value) in self.annotated() {
            match value {
                Some(v) => out.insert((pod, key), v),
                None => out.remove(&(pod, key)),
            };
        }
        out
    }
}

/// An API server's answer with `code`, `reason` and `message`, as kube reports it.
pub fn api_status(code: u16, reason: &str, message: &str) -> kube::Error {
    kube::Error::Api(Box::new(kube::core::Status {
        status: Some(kube::core::response::StatusSummary::Failure),
        code,
        message: message.to_owned(),
        reason: reason.to_owned(),
        metadata: None,
        details: None,
    }))
}

impl Binder for MemoryBinder {
    fn annotate<'a>(&'a self, pod: &'a PodKey, key: &'a str, value: Option<&'a str>) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if let Ok(mut a) = self.annotated.lock() {
                a.push((pod.clone(), key.to_owned(), value.map(str::to_owned)));
            }
            Ok(())
        })
    }

    fn bind<'a>(&'a self, req: &'a BindRequest) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if let Some(msg) = &self.fail_binds {
                return Err(Error::BadRequest(msg.clone()));
            }
            let conflicts = &self.conflict_binds;
            if conflicts.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                let msg = format!(
                    "Operation cannot be fulfilled on pods/binding \"{}\": pod {} is already assigned to node \"{}\"",
                    req.name, req.name, req.node
                );
                return Err(Error::Bind {
                    pod: req.pod(),
                    node: req.node.clone(),
                    api: Box::new(api_status(409, "Conflict", &msg)),
                });
            }
            if let Ok(mut b) = self.bound.lock() {
                b.push(req.clone());
            }
            Ok(())
        })
    }

    fn write_spec<'a>(&'a self, node: &'a str, gpus: &'a [GpuSpec]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if let Ok(mut r) = self.reconfigured.lock() {
                r.push((node.to_owned(), gpus.to_vec()));
            }
            Ok(())
        })
    }

    fn await_status<'a>(
        &'a self,
        node: &'a str,
        _gpus: &'a [GpuSpec],
        wanted: &'a [WantedInstance],
        _timeout: Duration,
    ) -> BoxFuture<'a, Result<BTreeMap<(u32, u8), String>>> {
        Box::pin(async move {
            Ok(wanted.iter().map(|w| ((w.gpu, w.start), format!("MIG-demo-{node}-{}-{}", w.gpu, w.start))).collect())
        })
    }

    fn evict<'a>(&'a self, pod: &'a PodKey, dry_run: bool) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if let Some(msg) = self.refuse_evictions.lock().ok().and_then(|r| r.get(pod).cloned()) {
                return Err(Error::Evict { pod: pod.clone(), api: Box::new(api_status(429, "TooManyRequests", &msg)) });
            }
            if !dry_run && let Ok(mut e) = self.evicted.lock() {
                e.push(pod.clone());
            }
            Ok(())
        })
    }

    fn pod_group_status<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        status: &'a tessera_api::podgroup::PodGroupStatus,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if let Ok(mut g) = self.group_status.lock() {
                g.push((format!("{namespace}/{name}"), status.clone()));
            }
            Ok(())
        })
    }
}
