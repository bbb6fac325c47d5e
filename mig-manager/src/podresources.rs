//! kubelet's PodResources API (v1, gRPC on `/var/lib/kubelet/pod-resources/kubelet.sock`):
//! which devices every container on the node holds, whichever device plugin handed them out,
//! and which devices kubelet can hand out at all.
//!
//! The device plugin uses it to learn which pod kubelet is admitting (see
//! [`crate::device_plugin`]); the agent publishes what it reports in `GpuNode.status` and never
//! repartitions a device it shows as held.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::pods::BoxFuture;

/// Generated from `proto/podresources.proto`.
#[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("v1");
}

use v1::pod_resources_lister_client::PodResourcesListerClient;
use v1::{AllocatableResourcesRequest, ListPodResourcesRequest};

/// Where kubelet serves the PodResources API.
pub const DEFAULT_SOCKET: &str = "/var/lib/kubelet/pod-resources/kubelet.sock";

/// One container as kubelet reports it: devices by resource name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerView {
    pub name: String,
    pub devices: BTreeMap<String, Vec<String>>,
}

/// One pod as kubelet reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodView {
    pub namespace: String,
    pub name: String,
    pub containers: Vec<ContainerView>,
}

impl PodView {
    /// The devices of `resource` that `container` holds (none when kubelet lists no such
    /// container).
    pub fn devices(&self, container: &str, resource: &str) -> &[String] {
        self.containers
            .iter()
            .find(|c| c.name == container)
            .and_then(|c| c.devices.get(resource))
            .map_or(&[], Vec::as_slice)
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What kubelet says about devices on the node.
pub trait KubeletResources: Send + Sync + fmt::Debug {
    /// `List`: every pod kubelet knows on the node, with each container's devices.
    fn list(&self) -> BoxFuture<'_, Result<Vec<PodView>>>;
    /// `GetAllocatableResources`: the devices kubelet can hand out, by resource name.
    fn allocatable(&self) -> BoxFuture<'_, Result<BTreeMap<String, Vec<String>>>>;
}

/// The PodResources API on kubelet's unix socket.
#[derive(Debug)]
pub struct KubeletSocket {
    path: PathBuf,
    channel: Mutex<Option<tonic::transport::Channel>>,
}

impl KubeletSocket {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), channel: Mutex::new(None) }
    }

    async fn client(&self) -> Result<PodResourcesListerClient<tonic::transport::Channel>> {
        let cached = self.channel.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let channel = match cached {
            Some(c) => c,
            None => {
                let c = crate::device_plugin::server::connect_unix(&self.path).await?;
                *self.channel.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
                c
            }
        };
        Ok(PodResourcesListerClient::new(channel))
    }

    fn failed(&self, status: tonic::Status) -> Error {
        // A broken channel (kubelet restarted) is dialled again next time.
        *self.channel.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Error::PodResources { path: self.path.display().to_string(), source: Box::new(status) }
    }
}

fn devices_by_resource(list: Vec<v1::ContainerDevices>) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for d in list {
        out.entry(d.resource_name).or_default().extend(d.device_ids);
    }
    out
}

/// Converts kubelet's answer.
pub fn views(list: v1::ListPodResourcesResponse) -> Vec<PodView> {
    list.pod_resources
        .into_iter()
        .map(|p| PodView {
            namespace: p.namespace,
            name: p.name,
            containers: p
                .containers
                .into_iter()
                .map(|c| ContainerView { name: c.name, devices: devices_by_resource(c.devices) })
                .collect(),
        })
        .collect()
}

impl KubeletResources for KubeletSocket {
    fn list(&self) -> BoxFuture<'_, Result<Vec<PodView>>> {
        Box::pin(async move {
            let mut client = self.client().await?;
            let resp = client.list(ListPodResourcesRequest {}).await.map_err(|s| self.failed(s))?;
            Ok(views(resp.into_inner()))
        })
    }

    fn allocatable(&self) -> BoxFuture<'_, Result<BTreeMap<String, Vec<String>>>> {
        Box::pin(async move {
            let mut client = self.client().await?;
            let resp =
                client.get_allocatable_resources(AllocatableResourcesRequest {}).await.map_err(|s| self.failed(s))?;
            Ok(devices_by_resource(resp.into_inner().devices))
        })
    }
}

/// The physical device a kubelet device ID stands for: tessera's share slots are
/// `<GPU UUID>::<n>`, NVIDIA's time-slicing replicas `<UUID>::<n>` too; anything else is the
/// UUID itself.
pub fn physical(id: &str) -> &str {
    id.split_once("::").map_or(id, |(u, _)| u)
}

/// A fixed, settable answer (tests, and the agent when no kubelet socket is configured).
#[derive(Debug, Default)]
pub struct StaticResources {
    pods: Mutex<Vec<PodView>>,
    allocatable: Mutex<BTreeMap<String, Vec<String>>>,
}

impl StaticResources {
    pub fn set(&self, pods: Vec<PodView>) {
        *self.pods.lock().unwrap_or_else(|p| p.into_inner()) = pods;
    }
}

impl KubeletResources for StaticResources {
    fn list(&self) -> BoxFuture<'_, Result<Vec<PodView>>> {
        let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Box::pin(async move { Ok(pods) })
    }

    fn allocatable(&self) -> BoxFuture<'_, Result<BTreeMap<String, Vec<String>>>> {
        let a = self.allocatable.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Box::pin(async move { Ok(a) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_answers_become_views_and_share_slots_map_to_their_gpu() {
        let resp = v1::ListPodResourcesResponse {
            pod_resources: vec![v1::PodResources {
                name: "p".into(),
                namespace: "ml".into(),
                containers: vec![v1::ContainerResources {
                    name: "c".into(),
                    devices: vec![
                        v1::ContainerDevices {
                            resource_name: "nvidia.com/gpu".into(),
                            device_ids: vec!["GPU-a".into()],
                            topology: None,
                        },
                        v1::ContainerDevices {
                            resource_name: "nvidia.com/gpu".into(),
                            device_ids: vec!["GPU-b".into()],
                            topology: None,
                        },
                    ],
                    cpu_ids: vec![],
                }],
            }],
        };
        let v = views(resp);
        assert_eq!(v[0].key(), "ml/p");
        assert_eq!(v[0].devices("c", "nvidia.com/gpu"), ["GPU-a", "GPU-b"]);
        assert!(v[0].devices("c", "tessera.dev/gpu").is_empty());
        assert!(v[0].devices("other", "nvidia.com/gpu").is_empty());
        assert_eq!(physical("GPU-a::3"), "GPU-a");
        assert_eq!(physical("MIG-x"), "MIG-x");
    }
}
