//! The kubelet device plugin for `tessera.dev/gpu` (API v1beta1, gRPC on a unix socket).
//!
//! Advertised device IDs are real UUIDs: `GPU-…` for GPUs in full mode, `MIG-…` for MIG
//! devices. kubelet picks IDs on its own, so `Allocate` does not trust them: it finds the pod
//! being admitted by its `tessera.dev/assignment` annotation and returns the UUIDs the
//! scheduler chose. `GetPreferredAllocation` steers kubelet towards the same IDs so that its
//! accounting matches.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio_stream::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::gpu::Observed;
use crate::metrics::Metrics;
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

/// The devices to advertise for a discovery result.
pub fn devices_of(observed: &Observed) -> Vec<Device> {
    let mut out = Vec::new();
    for g in &observed.gpus {
        let health = if g.info.healthy { HEALTHY } else { UNHEALTHY };
        let topology = g.info.numa_node.map(|n| TopologyInfo { nodes: vec![NumaNode { id: i64::from(n) }] });
        if g.info.mode == tessera_core::GpuMode::Mig {
            for m in &g.mig {
                out.push(Device { id: m.uuid.clone(), health: health.into(), topology: topology.clone() });
            }
        } else {
            out.push(Device { id: g.info.uuid.clone(), health: health.into(), topology });
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

/// The `DevicePlugin` gRPC service.
#[derive(Clone, Debug)]
pub struct Plugin {
    node: String,
    inventory: watch::Receiver<Observed>,
    pods: Arc<dyn PodSource>,
    allocations: Arc<Allocations>,
    metrics: Option<Arc<Metrics>>,
}

impl Plugin {
    pub fn new(
        node: &str,
        inventory: watch::Receiver<Observed>,
        pods: Arc<dyn PodSource>,
        allocations: Arc<Allocations>,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        Self { node: node.to_owned(), inventory, pods, allocations, metrics }
    }

    /// Pods being admitted on this node that carry an assignment not yet allocated, with the
    /// UUIDs of that assignment, oldest first.
    async fn candidates(&self) -> Result<Vec<(PodInfo, Vec<String>)>, Status> {
        let pods = self.pods.pods().await.map_err(|e| Status::unavailable(format!("listing pods: {e}")))?;
        let observed = self.inventory.borrow().clone();
        let mut out: Vec<(PodInfo, Vec<String>)> = pods
            .into_iter()
            .filter(|p| matches!(p.phase.as_str(), "Pending" | ""))
            .filter(|p| !self.allocations.contains_pod(&p.uid))
            .filter_map(|p| {
                let uuids = resolve_assignment(p.assignment_for(&self.node)?, &observed)?;
                Some((p, uuids))
            })
            .collect();
        out.sort_by(|a, b| (a.0.created_s, &a.0.uid).cmp(&(b.0.created_s, &b.0.uid)));
        Ok(out)
    }

    /// The pod kubelet is admitting, for a container that was given `requested`.
    fn choose(&self, candidates: &[(PodInfo, Vec<String>)], requested: &[String]) -> Result<usize, Status> {
        let want: BTreeSet<&str> = requested.iter().map(String::as_str).collect();
        let same_set = |u: &Vec<String>| u.iter().map(String::as_str).collect::<BTreeSet<_>>() == want;
        if let Some(i) = candidates.iter().position(|(_, u)| same_set(u)) {
            return Ok(i);
        }
        if let Some(i) = candidates.iter().position(|(_, u)| u.len() == requested.len()) {
            return Ok(i);
        }
        if candidates.len() == 1 {
            return Ok(0);
        }
        let names: Vec<String> = candidates.iter().map(|(p, _)| p.key()).collect();
        Err(Status::failed_precondition(format!(
            "tessera device plugin on node {}: no pending pod has a {} annotation for devices [{}] \
             (candidates: [{}]); pods using {} must be scheduled by tessera (schedulerName: tessera)",
            self.node,
            tessera_api::annotations::ASSIGNMENT,
            requested.join(","),
            names.join(","),
            tessera_api::annotations::RESOURCE_GPU,
        )))
    }

    fn count(&self, result: &'static str) {
        if let Some(m) = &self.metrics {
            m.allocation(result);
        }
    }
}

type ListAndWatchStream = Pin<Box<dyn Stream<Item = Result<ListAndWatchResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl DevicePlugin for Plugin {
    async fn get_device_plugin_options(&self, _: Request<Empty>) -> Result<Response<DevicePluginOptions>, Status> {
        Ok(Response::new(DevicePluginOptions { pre_start_required: false, get_preferred_allocation_available: true }))
    }

    type ListAndWatchStream = ListAndWatchStream;

    async fn list_and_watch(&self, _: Request<Empty>) -> Result<Response<Self::ListAndWatchStream>, Status> {
        // The full list first, then the full list again whenever discovery changes it.
        let mut last: Option<Vec<Device>> = None;
        let stream = WatchStream::new(self.inventory.clone()).filter_map(move |obs| {
            let devices = devices_of(&obs);
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
        let candidates = self.candidates().await?;
        let mut responses = Vec::new();
        for req in request.into_inner().container_requests {
            let available: BTreeSet<&str> = req.available_device_i_ds.iter().map(String::as_str).collect();
            let size = usize::try_from(req.allocation_size).unwrap_or(0);
            let fits = |u: &Vec<String>| {
                u.len() == size
                    && u.iter().all(|d| available.contains(d.as_str()))
                    && req.must_include_device_i_ds.iter().all(|m| u.contains(m))
            };
            let ids = match candidates.iter().find(|(_, u)| fits(u)) {
                Some((_, u)) => u.clone(),
                None => {
                    let mut ids = req.must_include_device_i_ds.clone();
                    for d in &req.available_device_i_ds {
                        if ids.len() >= size {
                            break;
                        }
                        if !ids.contains(d) {
                            ids.push(d.clone());
                        }
                    }
                    ids
                }
            };
            responses.push(ContainerPreferredAllocationResponse { device_i_ds: ids });
        }
        Ok(Response::new(PreferredAllocationResponse { container_responses: responses }))
    }

    async fn allocate(&self, request: Request<AllocateRequest>) -> Result<Response<AllocateResponse>, Status> {
        let mut candidates = self.candidates().await?;
        let mut responses = Vec::new();
        for req in request.into_inner().container_requests {
            let i = match self.choose(&candidates, &req.devices_ids) {
                Ok(i) => i,
                Err(status) => {
                    warn!(node = %self.node, requested = ?req.devices_ids, "Allocate found no assignment");
                    self.count("no_assignment");
                    return Err(status);
                }
            };
            let (pod, uuids) = candidates.remove(i);
            let visible = uuids.join(",");
            info!(pod = %pod.key(), devices = %visible, "Allocated devices from assignment");
            self.allocations.record(&pod.uid, uuids);
            self.count("ok");
            responses.push(ContainerAllocateResponse {
                envs: HashMap::from([
                    ("NVIDIA_VISIBLE_DEVICES".to_owned(), visible.clone()),
                    ("CUDA_VISIBLE_DEVICES".to_owned(), visible),
                ]),
                annotations: HashMap::from([("tessera.dev/allocated-pod".to_owned(), pod.key())]),
                ..Default::default()
            });
        }
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
