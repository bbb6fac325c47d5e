//! Discovery → `GpuNode.status`, and reading `GpuNode.spec`, through a [`NodeApi`] seam:
//! [`KubeNodeApi`] talks to the API server, [`LocalNodeApi`] serves `--standalone` runs.

use std::fmt;
use std::path::PathBuf;
use std::sync::Mutex;

use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use tessera_api::gpunode::{Condition, GpuLink, GpuSpec, GpuStatus, Health, MigInstanceStatus, Mode, condition};
use tessera_api::{GpuNode, GpuNodeSpec, GpuNodeStatus};
use tessera_core::GpuMode;

use crate::error::{Error, Result};
use crate::gpu::{GpuError, Link, Observed};
use crate::mig::reconcile::Outcome;
use crate::pods::BoxFuture;

/// The field manager name the agent writes with.
pub const FIELD_MANAGER: &str = "tessera-mig-manager";

fn mode(m: GpuMode) -> Mode {
    if m == GpuMode::Mig { Mode::Mig } else { Mode::Full }
}

/// The per-GPU part of the status.
pub fn gpu_statuses(observed: &Observed) -> Vec<GpuStatus> {
    observed
        .gpus
        .iter()
        .map(|g| {
            let geom = g.info.product.map(|p| p.geometry());
            GpuStatus {
                index: g.info.index,
                uuid: g.info.uuid.clone(),
                product: g.info.product_name(),
                memory_mib: g.info.memory_mib,
                mig_capable: g.info.product.is_some(),
                mode: mode(g.info.mode),
                pending_mode: g.info.pending_mode.map(mode),
                numa_node: g.info.numa_node,
                pci_bus_id: g.info.pci_bus_id.clone(),
                health: if g.info.healthy { Health::Healthy } else { Health::Unhealthy },
                instances: g
                    .mig
                    .iter()
                    .map(|m| {
                        let p = geom.and_then(|ge| ge.profile(m.instance.class));
                        MigInstanceStatus {
                            profile: p.map_or_else(|| format!("{:?}", m.instance.class), |p| p.name.to_owned()),
                            start: m.instance.start,
                            size: p.map_or(0, |p| p.memory_slices),
                            uuid: m.uuid.clone(),
                        }
                    })
                    .collect(),
            }
        })
        .collect()
}

/// The links part of the status.
pub fn links(links: &[Link]) -> Vec<GpuLink> {
    links.iter().map(|l| GpuLink { a: l.a, b: l.b, kind: l.kind, lanes: l.lanes }).collect()
}

fn cond(type_: &str, ok: bool, reason: &str, message: String) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if ok { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time: None,
    }
}

/// What one agent pass learned, turned into conditions.
#[derive(Debug)]
pub struct PassReport<'a> {
    /// `Err` when discovery failed (e.g. no NVML).
    pub discovery: std::result::Result<(), &'a GpuError>,
    /// `None` when the GpuNode lists no GPU or reconcile did not run.
    pub outcome: Option<&'a Outcome>,
    /// Whether a spec was read (the GpuNode exists and lists GPUs).
    pub has_spec: bool,
    /// `None` when the device plugin is disabled.
    pub registered: Option<bool>,
}

/// The conditions for a pass; a condition whose status did not change keeps its
/// `lastTransitionTime` from `previous`.
pub fn conditions(report: &PassReport<'_>, previous: &[Condition], now: &str) -> Vec<Condition> {
    let mut out = Vec::new();
    out.push(match report.discovery {
        Ok(()) => cond(condition::NVML_READY, true, "Discovered", String::new()),
        Err(GpuError::NoNvml(why)) => {
            cond(condition::NVML_READY, false, "NoNvml", format!("NVML is not available: {why}; no devices are served"))
        }
        Err(e) => cond(condition::NVML_READY, false, "DiscoveryFailed", e.to_string()),
    });
    let reconciled = match (report.has_spec, report.outcome) {
        (false, _) => cond(condition::RECONCILED, true, "NoSpec", "GpuNode.spec lists no GPU; nothing to apply".into()),
        (true, None) => cond(condition::RECONCILED, false, "NotRun", "reconcile could not run; see NvmlReady".into()),
        (true, Some(o)) if o.converged => cond(condition::RECONCILED, true, "Converged", String::new()),
        (true, Some(o)) if !o.blocked.is_empty() => {
            let msg: Vec<String> = o.blocked.iter().map(ToString::to_string).collect();
            cond(condition::RECONCILED, false, o.blocked[0].reason.reason(), msg.join("; "))
        }
        (true, Some(o)) if !o.failed.is_empty() => {
            let msg: Vec<String> = o.failed.iter().map(|(op, e)| format!("{op:?}: {e}")).collect();
            cond(condition::RECONCILED, false, "OpFailed", format!("{}; will retry", msg.join("; ")))
        }
        (true, Some(_)) => cond(condition::RECONCILED, false, "Progressing", "MIG changes are being applied".into()),
    };
    out.push(reconciled);
    if let Some(reg) = report.registered {
        out.push(if reg {
            cond(condition::DEVICE_PLUGIN_REGISTERED, true, "Registered", String::new())
        } else {
            cond(
                condition::DEVICE_PLUGIN_REGISTERED,
                false,
                "NotRegistered",
                "kubelet has not accepted the device plugin".into(),
            )
        });
    }
    for c in &mut out {
        let prev = previous.iter().find(|p| p.type_ == c.type_ && p.status == c.status);
        c.last_transition_time =
            Some(prev.and_then(|p| p.last_transition_time.clone()).unwrap_or_else(|| now.to_owned()));
    }
    out
}

/// The spec to apply and its generation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub gpus: Vec<GpuSpec>,
    pub generation: Option<i64>,
}

/// Where the spec comes from and the status goes.
pub trait NodeApi: Send + Sync + fmt::Debug {
    /// Reads `GpuNode.spec` (creating the GpuNode, with an empty spec, when missing).
    fn desired(&self) -> BoxFuture<'_, Result<Desired>>;
    /// Writes `GpuNode.status`.
    fn publish(&self, status: GpuNodeStatus) -> BoxFuture<'_, Result<()>>;
}

/// The GpuNode named after this node, through the API server.
#[derive(Clone)]
pub struct KubeNodeApi {
    api: Api<GpuNode>,
    name: String,
}

impl fmt::Debug for KubeNodeApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeNodeApi").field("name", &self.name).finish()
    }
}

impl KubeNodeApi {
    pub fn new(client: kube::Client, node: &str) -> Self {
        Self { api: Api::all(client), name: node.to_owned() }
    }
}

impl NodeApi for KubeNodeApi {
    fn desired(&self) -> BoxFuture<'_, Result<Desired>> {
        Box::pin(async move {
            let get = |e| Error::GetGpuNode { name: self.name.clone(), source: Box::new(e) };
            let obj = match self.api.get_opt(&self.name).await.map_err(get)? {
                Some(o) => o,
                None => {
                    let fresh = GpuNode::new(&self.name, GpuNodeSpec::default());
                    self.api
                        .create(&PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() }, &fresh)
                        .await
                        .map_err(|e| Error::CreateGpuNode { name: self.name.clone(), source: Box::new(e) })?
                }
            };
            Ok(Desired { gpus: obj.spec.gpus, generation: obj.metadata.generation })
        })
    }

    fn publish(&self, status: GpuNodeStatus) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let patch = serde_json::json!({ "status": status });
            self.api
                .patch_status(
                    &self.name,
                    &PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() },
                    &Patch::Merge(&patch),
                )
                .await
                .map_err(|e| Error::PublishStatus { name: self.name.clone(), source: Box::new(e) })?;
            Ok(())
        })
    }
}

/// Watches this node's GpuNode and notifies `trigger` whenever its spec generation changes.
/// Status writes do not change the generation, so the agent's own patches do not loop.
pub async fn watch_spec(client: kube::Client, node: String, trigger: std::sync::Arc<tokio::sync::Notify>) {
    use kube::runtime::watcher;
    use tokio_stream::StreamExt;

    let api: Api<GpuNode> = Api::all(client);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={node}"));
    let mut last: Option<i64> = None;
    let mut events = std::pin::pin!(watcher::watcher(api, cfg));
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(obj) | watcher::Event::InitApply(obj)) => {
                let generation = obj.metadata.generation;
                if generation != last {
                    last = generation;
                    trigger.notify_one();
                }
            }
            Ok(_) => {}
            Err(error) => tracing::debug!(%error, "GpuNode watch error; the watcher retries"),
        }
    }
}

/// `--standalone`: the spec comes from an optional JSON file (a `GpuNodeSpec`), re-read every
/// pass; the last status is kept in memory and served on `/status`.
#[derive(Debug, Default)]
pub struct LocalNodeApi {
    spec_file: Option<PathBuf>,
    last: Mutex<Option<GpuNodeStatus>>,
}

impl LocalNodeApi {
    pub fn new(spec_file: Option<PathBuf>) -> Self {
        Self { spec_file, last: Mutex::default() }
    }

    /// The last published status.
    pub fn last(&self) -> Option<GpuNodeStatus> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl NodeApi for LocalNodeApi {
    fn desired(&self) -> BoxFuture<'_, Result<Desired>> {
        Box::pin(async move {
            let Some(path) = &self.spec_file else { return Ok(Desired::default()) };
            let text = tokio::fs::read_to_string(path)
                .await
                .map_err(|e| Error::SpecFile { path: path.display().to_string(), why: e.to_string() })?;
            let spec: GpuNodeSpec = serde_json::from_str(&text)
                .map_err(|e| Error::SpecFile { path: path.display().to_string(), why: e.to_string() })?;
            Ok(Desired { gpus: spec.gpus, generation: None })
        })
    }

    fn publish(&self, status: GpuNodeStatus) -> BoxFuture<'_, Result<()>> {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests;
