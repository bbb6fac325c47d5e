//! The kubelet device plugin for `tessera.dev/gpu` (API v1beta1, gRPC on a unix socket).
//!
//! kubelet's device IDs are admission slots: a whole-mode GPU is advertised as its UUID plus
//! `share_slots - 1` more IDs `<UUID>::<n>` (so as many `tessera.dev/gpu-share` pods per GPU
//! can be admitted as the scheduler plans), a MIG device as its MIG UUID. Which device a
//! container gets never depends on the ID kubelet picked: `Allocate` finds **the pod kubelet is
//! admitting right now** and serves that pod's signed `tessera.dev/assignment`.
//!
//! kubelet admits pods one at a time (its sync loop adds a pod to its pod manager, then runs the
//! admit handlers, the device manager's allocation among them, before it takes the next pod),
//! and it records a container's devices only after `Allocate` returns. So while kubelet waits
//! for `GetPreferredAllocation` or `Allocate`, its PodResources API lists exactly one container
//! that asks for `tessera.dev/gpu` and holds none: the one being admitted. The plugin serves
//! that pod, or refuses when it cannot find exactly one (it never guesses). Without a
//! PodResources socket it serves only when exactly one tessera pod on the node is pending and
//! not yet served, and refuses otherwise.
//!
//! Before serving, the assignment's signature is checked (`tessera_api::signing`): unsigned,
//! forged, copied, replayed and foreign-node assignments, and ones naming a device another
//! live pod holds, are refused with an Event, a log line and a metric.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tessera_api::Assignment;
use tessera_api::annotations::{ASSIGNMENT, RESOURCE_GPU};
use tessera_api::signing::{Keys, Refusal};
use tokio::sync::watch;
use tokio_stream::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::events::RefusalSink;
use crate::gpu::Observed;
use crate::metrics::Metrics;
use crate::podresources::{KubeletResources, PodView, physical};
use crate::pods::{PodInfo, PodSource, resolve_assignment};

pub mod server;

/// Generated from `proto/deviceplugin.proto`.
#[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod v1beta1 {
    tonic::include_proto!("v1beta1");
}

use v1beta1::device_plugin_server::DevicePlugin;
use v1beta1::{
    AllocateRequest, AllocateResponse, ContainerAllocateResponse, ContainerPreferredAllocationResponse, Device,
    DevicePluginOptions, Empty, ListAndWatchResponse, NumaNode, PreStartContainerRequest, PreStartContainerResponse,
    PreferredAllocationRequest, PreferredAllocationResponse, TopologyInfo,
};

/// API version sent at registration.
pub const VERSION: &str = "v1beta1";
pub const HEALTHY: &str = "Healthy";
pub const UNHEALTHY: &str = "Unhealthy";
/// Where kubelet looks for device-plugin sockets.
pub const DEFAULT_DIR: &str = "/var/lib/kubelet/device-plugins";
/// kubelet's registration socket, inside [`DEFAULT_DIR`].
pub const KUBELET_SOCKET: &str = "kubelet.sock";
/// Our socket's file name inside the device-plugin directory.
pub const SOCKET_NAME: &str = "tessera-gpu.sock";
/// Admission slots per whole-mode GPU, by default: up to this many pods (shares) per GPU.
pub const DEFAULT_SHARE_SLOTS: u32 = 10;
/// Container annotation naming the pod whose assignment a container was given.
pub const ALLOCATED_POD: &str = "tessera.dev/allocated-pod";

/// The devices to advertise for a discovery result: per whole-mode GPU its UUID and
/// `share_slots - 1` slots `<UUID>::<n>`, per MIG device its UUID.
pub fn devices_of(observed: &Observed, share_slots: u32) -> Vec<Device> {
    let mut out = Vec::new();
    for g in &observed.gpus {
        let health = if g.info.healthy { HEALTHY } else { UNHEALTHY };
        let topology = g.info.numa_node.map(|n| TopologyInfo { nodes: vec![NumaNode { id: i64::from(n) }] });
        if g.info.mode == tessera_core::GpuMode::Mig {
            for m in &g.mig {
                out.push(Device { id: m.uuid.clone(), health: health.into(), topology: topology.clone() });
            }
        } else {
            out.push(Device { id: g.info.uuid.clone(), health: health.into(), topology: topology.clone() });
            for n in 1..share_slots.max(1) {
                out.push(Device {
                    id: format!("{}::{n}", g.info.uuid),
                    health: health.into(),
                    topology: topology.clone(),
                });
            }
        }
    }
    out
}

/// Devices this plugin handed to pods, by pod UID, until the pod is gone from the node.
#[derive(Debug, Default)]
pub struct Allocations {
    by_pod: Mutex<BTreeMap<String, Vec<String>>>,
}

impl Allocations {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<String>>> {
        self.by_pod.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn record(&self, pod_uid: &str, uuids: Vec<String>) {
        self.lock().insert(pod_uid.to_owned(), uuids);
    }

    pub fn contains_pod(&self, pod_uid: &str) -> bool {
        self.lock().contains_key(pod_uid)
    }

    /// The devices handed to one pod.
    pub fn of(&self, pod_uid: &str) -> Option<Vec<String>> {
        self.lock().get(pod_uid).cloned()
    }

    /// Every UUID handed out.
    pub fn held(&self) -> BTreeSet<String> {
        self.lock().values().flatten().cloned().collect()
    }

    /// Forgets pods that are no longer live on the node.
    pub fn retain_live(&self, pods: &[PodInfo]) {
        let live: BTreeSet<&str> = pods.iter().filter(|p| p.is_live()).map(|p| p.uid.as_str()).collect();
        self.lock().retain(|uid, _| live.contains(uid.as_str()));
    }
}

/// How assignments are checked before a device is handed out.
#[derive(Clone, Debug)]
pub enum Trust {
    /// Only assignments signed with one of these keys, for this pod and node.
    Signed(Arc<Keys>),
    /// Any assignment for this node (`--insecure-accept-unsigned`, `--standalone`).
    Unchecked,
}

/// The pod kubelet is admitting, and what is known around it.
struct Admission {
    pod: PodInfo,
    /// Every pod the API lists on this node.
    pods: Vec<PodInfo>,
    /// kubelet's view, when the PodResources API is used.
    kubelet: Option<Vec<PodView>>,
}

/// Why an `Allocate` is not served.
enum Denied {
    /// The assignment is not trusted: Event, log line and metric.
    Refused(Box<PodInfo>, Refusal),
    /// Anything else (no single pod being admitted, no assignment, a MIG device not there yet).
    Status(&'static str, Status),
}

/// One device of a trusted assignment, resolved to a UUID.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Resolved {
    uuid: String,
    /// The GPU's UUID (the same as `uuid` for whole GPUs and shares).
    gpu: String,
    share: bool,
}

/// The `DevicePlugin` gRPC service.
#[derive(Clone, Debug)]
pub struct Plugin {
    node: String,
    inventory: watch::Receiver<Observed>,
    pods: Arc<dyn PodSource>,
    allocations: Arc<Allocations>,
    metrics: Option<Arc<Metrics>>,
    kubelet: Option<Arc<dyn KubeletResources>>,
    trust: Trust,
    refusals: Option<Arc<dyn RefusalSink>>,
    share_slots: u32,
    /// One admission at a time, even if something other than kubelet calls concurrently.
    gate: Arc<tokio::sync::Mutex<()>>,
}

impl Plugin {
    /// A plugin that checks nothing and finds the admitted pod from the API alone; see the
    /// `with_*` methods.
    pub fn new(
        node: &str,
        inventory: watch::Receiver<Observed>,
        pods: Arc<dyn PodSource>,
        allocations: Arc<Allocations>,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        Self {
            node: node.to_owned(),
            inventory,
            pods,
            allocations,
            metrics,
            kubelet: None,
            trust: Trust::Unchecked,
            refusals: None,
            share_slots: DEFAULT_SHARE_SLOTS,
            gate: Arc::default(),
        }
    }

    /// Finds the pod being admitted through kubelet's PodResources API.
    pub fn with_kubelet(mut self, kubelet: Arc<dyn KubeletResources>) -> Self {
        self.kubelet = Some(kubelet);
        self
    }

    pub fn with_trust(mut self, trust: Trust) -> Self {
        self.trust = trust;
        self
    }

    /// Where refusals are published as Events.
    pub fn with_refusals(mut self, sink: Arc<dyn RefusalSink>) -> Self {
        self.refusals = Some(sink);
        self
    }

    pub fn with_share_slots(mut self, slots: u32) -> Self {
        self.share_slots = slots.max(1);
        self
    }

    /// The pod kubelet is admitting now.
    async fn admission(&self) -> Result<Admission, Denied> {
        let pods = self
            .pods
            .pods()
            .await
            .map_err(|e| Denied::Status("list_pods", Status::unavailable(format!("listing pods: {e}"))))?;
        let asking: Vec<&PodInfo> = pods.iter().filter(|p| p.is_live() && p.asks_for_gpu()).collect();
        let (waiting, kubelet, whose): (Vec<PodInfo>, _, &str) = match &self.kubelet {
            Some(k) => {
                let views =
                    k.list().await.map_err(|e| Denied::Status("pod_resources", Status::unavailable(e.to_string())))?;
                // A container that asks for tessera.dev/gpu and holds none yet: kubelet records
                // devices only after Allocate returns, and admits one pod at a time.
                let waiting = views
                    .iter()
                    .filter_map(|v| {
                        let p = asking.iter().find(|p| p.namespace == v.namespace && p.name == v.name)?;
                        p.gpu_containers.iter().any(|c| v.devices(c, RESOURCE_GPU).is_empty()).then(|| (*p).clone())
                    })
                    .collect();
                (waiting, Some(views), "kubelet's PodResources API lists")
            }
            None => {
                let waiting = asking
                    .iter()
                    .filter(|p| matches!(p.phase.as_str(), "Pending" | ""))
                    .filter(|p| !self.allocations.contains_pod(&p.uid))
                    .map(|p| (*p).clone())
                    .collect();
                (waiting, None, "the API lists")
            }
        };
        match waiting.len() {
            1 => {
                let pod = waiting.into_iter().next().unwrap_or_else(|| unreachable!("one pod"));
                Ok(Admission { pod, pods, kubelet })
            }
            0 => Err(Denied::Status(
                "no_assignment",
                Status::failed_precondition(format!(
                    "tessera device plugin on node {}: {whose} no pod waiting for {RESOURCE_GPU}; pods using \
                     {RESOURCE_GPU} must be scheduled by tessera (schedulerName: tessera), which writes {ASSIGNMENT}",
                    self.node
                )),
            )),
            _ => {
                let names: Vec<String> = waiting.iter().map(PodInfo::key).collect();
                Err(Denied::Status(
                    "ambiguous",
                    Status::unavailable(format!(
                        "tessera device plugin on node {}: {whose} {} pods waiting for {RESOURCE_GPU} ({}); refusing \
                         to guess which one kubelet admits{}",
                        self.node,
                        names.len(),
                        names.join(", "),
                        if self.kubelet.is_none() { " (serve the PodResources socket to the agent)" } else { "" }
                    )),
                ))
            }
        }
    }

    /// A pod's assignment, if it is trusted for this node.
    fn trusted(&self, pod: &PodInfo) -> Result<Assignment, Refusal> {
        let text = pod.assignment_text.as_deref().unwrap_or_default();
        match &self.trust {
            Trust::Signed(keys) => {
                let ring = keys.current().map_err(|e| Refusal::Malformed(format!("no usable assignment keys: {e}")))?;
                ring.verify(&pod.uid, &self.node, text, pod.signature.as_deref())
            }
            Trust::Unchecked => {
                let a = Assignment::from_annotation(text).map_err(|e| Refusal::BadAssignment(e.to_string()))?;
                if a.node != self.node {
                    return Err(Refusal::OtherNode { signed_for: a.node });
                }
                Ok(a)
            }
        }
    }

    fn resolve(&self, a: &Assignment) -> Option<Vec<Resolved>> {
        let observed = self.inventory.borrow().clone();
        let uuids = resolve_assignment(a, &observed)?;
        Some(
            a.devices
                .iter()
                .zip(uuids)
                .map(|(d, uuid)| {
                    let gpu = observed.gpu_by_uuid(&d.gpu).or_else(|| observed.gpu(d.index));
                    Resolved {
                        gpu: gpu.map_or_else(|| d.gpu.clone(), |g| g.info.uuid.clone()),
                        uuid,
                        share: d.share.is_some(),
                    }
                })
                .collect(),
        )
    }

    /// The devices other live, admitted pods on the node hold, with their holder.
    fn held_by_others(&self, adm: &Admission) -> Vec<(Resolved, String)> {
        let mut out = Vec::new();
        // Devices of any other plugin (NVIDIA's), as kubelet reports them.
        for v in adm.kubelet.iter().flatten() {
            if v.namespace == adm.pod.namespace && v.name == adm.pod.name {
                continue;
            }
            for c in &v.containers {
                for (_, ids) in c.devices.iter().filter(|(r, _)| r.as_str() != RESOURCE_GPU) {
                    for id in ids {
                        let uuid = physical(id).to_owned();
                        out.push((Resolved { gpu: uuid.clone(), uuid, share: false }, v.key()));
                    }
                }
            }
        }
        // Other tessera pods kubelet has admitted, by their trusted assignments.
        for p in &adm.pods {
            if p.uid == adm.pod.uid || !p.is_live() || !p.asks_for_gpu() {
                continue;
            }
            let view =
                adm.kubelet.as_ref().and_then(|v| v.iter().find(|v| v.namespace == p.namespace && v.name == p.name));
            let admitted = self.allocations.contains_pod(&p.uid)
                || p.phase == "Running"
                || view.is_some_and(|v| p.gpu_containers.iter().all(|c| !v.devices(c, RESOURCE_GPU).is_empty()));
            if !admitted {
                continue;
            }
            if let Some(devices) = self.trusted(p).ok().and_then(|a| self.resolve(&a)) {
                out.extend(devices.into_iter().map(|d| (d, p.key())));
            }
        }
        out
    }

    /// Finds the admitted pod and checks its assignment; the devices to serve.
    async fn serve(&self) -> Result<(Admission, Vec<Resolved>), Denied> {
        let adm = self.admission().await?;
        let a = self.trusted(&adm.pod).map_err(|r| Denied::Refused(Box::new(adm.pod.clone()), r))?;
        let Some(devices) = self.resolve(&a) else {
            return Err(Denied::Status(
                "not_ready",
                Status::unavailable(format!(
                    "pod {}: a MIG device of its assignment does not exist on node {} yet",
                    adm.pod.key(),
                    self.node
                )),
            ));
        };
        for (held, holder) in self.held_by_others(&adm) {
            if let Some(mine) = devices.iter().find(|d| {
                let same = d.uuid == held.uuid || d.gpu == held.uuid || held.gpu == d.uuid;
                same && !(d.share && held.share)
            }) {
                let refusal = Refusal::DeviceHeld { device: mine.uuid.clone(), holder };
                return Err(Denied::Refused(Box::new(adm.pod.clone()), refusal));
            }
        }
        Ok((adm, devices))
    }

    async fn deny(&self, denied: Denied) -> Status {
        match denied {
            Denied::Refused(pod, refusal) => {
                warn!(pod = %pod.key(), uid = %pod.uid, node = %self.node, reason = refusal.reason(), why = %refusal,
                      "Refused the device assignment");
                if let Some(m) = &self.metrics {
                    m.refused(refusal.reason());
                    m.allocation("refused");
                }
                if let Some(sink) = &self.refusals {
                    sink.refused(&pod, &self.node, &refusal).await;
                }
                Status::permission_denied(format!("pod {}: {}", pod.key(), crate::events::note(&self.node, &refusal)))
            }
            Denied::Status(result, status) => {
                warn!(node = %self.node, result, message = status.message(), "Allocate not served");
                self.count(result);
                status
            }
        }
    }

    fn count(&self, result: &'static str) {
        if let Some(m) = &self.metrics {
            m.allocation(result);
        }
    }
}

type ListAndWatchStream = Pin<Box<dyn Stream<Item = Result<ListAndWatchResponse, Status>> + Send + 'static>>;

/// The IDs to prefer for the admitted pod: an available ID of each assigned device (its UUID,
/// or for a share a slot of its GPU), `must_include` first, `size` in all.
fn preferred(devices: &[Resolved], available: &[String], must_include: &[String], size: usize) -> Vec<String> {
    let mut ids: Vec<String> = must_include.to_vec();
    for d in devices {
        if ids.len() >= size {
            break;
        }
        let pick = available
            .iter()
            .filter(|id| !ids.contains(id))
            .find(|id| if d.share { physical(id) == d.gpu } else { id.as_str() == d.uuid });
        if let Some(id) = pick {
            ids.push(id.clone());
        }
    }
    for id in available {
        if ids.len() >= size {
            break;
        }
        if !ids.contains(id) {
            ids.push(id.clone());
        }
    }
    ids
}

#[tonic::async_trait]
impl DevicePlugin for Plugin {
    async fn get_device_plugin_options(&self, _: Request<Empty>) -> Result<Response<DevicePluginOptions>, Status> {
        Ok(Response::new(DevicePluginOptions { pre_start_required: false, get_preferred_allocation_available: true }))
    }

    type ListAndWatchStream = ListAndWatchStream;

    async fn list_and_watch(&self, _: Request<Empty>) -> Result<Response<Self::ListAndWatchStream>, Status> {
        // The full list first, then the full list again whenever discovery changes it.
        let mut last: Option<Vec<Device>> = None;
        let slots = self.share_slots;
        let stream = WatchStream::new(self.inventory.clone()).filter_map(move |obs| {
            let devices = devices_of(&obs, slots);
            if last.as_ref() == Some(&devices) {
                return None;
            }
            last = Some(devices.clone());
            Some(Ok(ListAndWatchResponse { devices }))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_preferred_allocation(
        &self,
        request: Request<PreferredAllocationRequest>,
    ) -> Result<Response<PreferredAllocationResponse>, Status> {
        // Only a hint, so kubelet's accounting shows the assigned device: a pod that cannot be
        // served gets an ordinary pick here and its refusal at Allocate.
        let devices = {
            let _one = self.gate.lock().await;
            self.serve().await.map(|(_, d)| d).unwrap_or_default()
        };
        let responses = request
            .into_inner()
            .container_requests
            .into_iter()
            .map(|req| {
                let size = usize::try_from(req.allocation_size).unwrap_or(0);
                ContainerPreferredAllocationResponse {
                    device_i_ds: preferred(&devices, &req.available_device_i_ds, &req.must_include_device_i_ds, size),
                }
            })
            .collect();
        Ok(Response::new(PreferredAllocationResponse { container_responses: responses }))
    }

    async fn allocate(&self, request: Request<AllocateRequest>) -> Result<Response<AllocateResponse>, Status> {
        #[allow(clippy::disallowed_methods)] // times an Allocate for its metric
        let started = Instant::now();
        let _one = self.gate.lock().await;
        let (adm, devices) = match self.serve().await {
            Ok(x) => x,
            Err(denied) => return Err(self.deny(denied).await),
        };
        let uuids: Vec<String> = devices.iter().map(|d| d.uuid.clone()).collect();
        let visible = uuids.join(",");
        let requests = request.into_inner().container_requests;
        let kubelet_ids: Vec<&str> = requests.iter().flat_map(|r| r.devices_ids.iter().map(String::as_str)).collect();
        info!(pod = %adm.pod.key(), uid = %adm.pod.uid, devices = %visible, kubelet_ids = %kubelet_ids.join(","),
              "Allocated devices from the signed assignment");
        self.allocations.record(&adm.pod.uid, uuids);
        self.count("ok");
        if let Some(m) = &self.metrics {
            m.allocate_duration_seconds.observe(started.elapsed().as_secs_f64());
        }
        let responses = requests
            .iter()
            .map(|_| ContainerAllocateResponse {
                envs: HashMap::from([
                    ("NVIDIA_VISIBLE_DEVICES".to_owned(), visible.clone()),
                    ("CUDA_VISIBLE_DEVICES".to_owned(), visible.clone()),
                ]),
                annotations: HashMap::from([(ALLOCATED_POD.to_owned(), adm.pod.key())]),
                ..Default::default()
            })
            .collect();
        Ok(Response::new(AllocateResponse { container_responses: responses }))
    }

    async fn pre_start_container(
        &self,
        _: Request<PreStartContainerRequest>,
    ) -> Result<Response<PreStartContainerResponse>, Status> {
        Ok(Response::new(PreStartContainerResponse {}))
    }
}

#[cfg(test)]
mod tests;
