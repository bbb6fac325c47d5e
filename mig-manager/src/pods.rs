//! The pods on this node, as the agent needs them: who holds which device.
//!
//! Pods come through [`PodSource`] so tests (and `--standalone`) can feed them without an API
//! server; [`KubePods`] lists them from Kubernetes.

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use tessera_api::annotations::{ASSIGNMENT, ASSIGNMENT_SIGNATURE, RESOURCE_GPU};
use tessera_api::{AssignedDevice, Assignment};

use crate::error::{Error, Result};
use crate::gpu::Observed;

/// A boxed future, for object-safe async traits.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the agent knows about one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// `Pending`, `Running`, `Succeeded`, `Failed` or `Unknown`.
    pub phase: String,
    /// Creation time, seconds since the epoch (older pods are matched first).
    pub created_s: i64,
    /// The parsed `tessera.dev/assignment`, or why it could not be parsed.
    pub assignment: Option<Result<Assignment, String>>,
    /// The annotation text itself (what the signature covers).
    pub assignment_text: Option<String>,
    /// `tessera.dev/assignment-signature`.
    pub signature: Option<String>,
    /// Containers that ask for `tessera.dev/gpu`, init containers first (kubelet's order).
    pub gpu_containers: Vec<String>,
}

impl PodInfo {
    /// Reads the fields the agent needs from a pod.
    pub fn from_pod(pod: &Pod) -> Self {
        let meta = &pod.metadata;
        let annotation = |key: &str| meta.annotations.as_ref().and_then(|a| a.get(key)).cloned();
        let asks = |c: &k8s_openapi::api::core::v1::Container| {
            c.resources.as_ref().is_some_and(|r| {
                [r.limits.as_ref(), r.requests.as_ref()]
                    .into_iter()
                    .flatten()
                    .any(|m| m.get(RESOURCE_GPU).is_some_and(|q| q.0.trim() != "0"))
            })
        };
        let gpu_containers = pod
            .spec
            .iter()
            .flat_map(|s| s.init_containers.iter().flatten().chain(s.containers.iter()))
            .filter(|c| asks(c))
            .map(|c| c.name.clone())
            .collect();
        Self {
            uid: meta.uid.clone().unwrap_or_default(),
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            phase: pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default(),
            created_s: meta.creation_timestamp.as_ref().map_or(0, |t| t.0.as_second()),
            assignment: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(ASSIGNMENT))
                .map(|v| Assignment::from_annotation(v).map_err(|e| e.to_string())),
            assignment_text: annotation(ASSIGNMENT),
            signature: annotation(ASSIGNMENT_SIGNATURE),
            gpu_containers,
        }
    }

    /// Whether a container of the pod asks for `tessera.dev/gpu`.
    pub fn asks_for_gpu(&self) -> bool {
        !self.gpu_containers.is_empty()
    }

    /// A pod still holds its devices until it has finished.
    pub fn is_live(&self) -> bool {
        !matches!(self.phase.as_str(), "Succeeded" | "Failed")
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The assignment, when it parsed and names `node`.
    pub fn assignment_for(&self, node: &str) -> Option<&Assignment> {
        match &self.assignment {
            Some(Ok(a)) if a.node == node => Some(a),
            _ => None,
        }
    }
}

/// The UUID a container must see for one assigned device: the MIG UUID, or the MIG device at
/// `profile`/`start` on the assigned GPU, or the GPU itself.
pub fn resolve_device(d: &AssignedDevice, observed: &Observed) -> Option<String> {
    if let Some(mig) = &d.mig {
        return Some(mig.clone());
    }
    let gpu = observed.gpu_by_uuid(&d.gpu).or_else(|| observed.gpu(d.index));
    match (d.profile.as_ref(), d.start) {
        (Some(_), Some(start)) => gpu.and_then(|g| g.mig_uuid_at(start)).map(str::to_owned),
        _ => Some(gpu.map_or_else(|| d.gpu.clone(), |g| g.info.uuid.clone())),
    }
}

/// Every UUID of an assignment, or `None` when one cannot be resolved yet.
pub fn resolve_assignment(a: &Assignment, observed: &Observed) -> Option<Vec<String>> {
    a.devices.iter().map(|d| resolve_device(d, observed)).collect()
}

/// Devices that live pods on `node` hold according to their assignments.
pub fn held_devices(pods: &[PodInfo], node: &str, observed: &Observed) -> BTreeSet<String> {
    pods.iter()
        .filter(|p| p.is_live())
        .filter_map(|p| p.assignment_for(node))
        .flat_map(|a| a.devices.iter().filter_map(|d| resolve_device(d, observed)))
        .collect()
}

/// Where pods come from.
pub trait PodSource: Send + Sync + fmt::Debug {
    /// The pods bound to this node.
    fn pods(&self) -> BoxFuture<'_, Result<Vec<PodInfo>>>;
}

/// A fixed, settable list of pods (tests, `--standalone`).
#[derive(Debug, Default)]
pub struct StaticPods {
    pods: Mutex<Vec<PodInfo>>,
}

impl StaticPods {
    pub fn new(pods: Vec<PodInfo>) -> Self {
        Self { pods: Mutex::new(pods) }
    }

    pub fn set(&self, pods: Vec<PodInfo>) {
        *self.pods.lock().unwrap_or_else(|p| p.into_inner()) = pods;
    }
}

impl PodSource for StaticPods {
    fn pods(&self) -> BoxFuture<'_, Result<Vec<PodInfo>>> {
        let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Box::pin(async move { Ok(pods) })
    }
}

/// Lists this node's pods from the API server (`spec.nodeName=<node>`).
#[derive(Clone)]
pub struct KubePods {
    api: Api<Pod>,
    node: String,
}

impl fmt::Debug for KubePods {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubePods").field("node", &self.node).finish()
    }
}

impl KubePods {
    pub fn new(client: kube::Client, node: &str) -> Self {
        Self { api: Api::all(client), node: node.to_owned() }
    }
}

impl PodSource for KubePods {
    fn pods(&self) -> BoxFuture<'_, Result<Vec<PodInfo>>> {
        Box::pin(async move {
            let lp = ListParams::default().fields(&format!("spec.nodeName={}", self.node));
            let list = self
                .api
                .list(&lp)
                .await
                .map_err(|e| Error::ListPods { node: self.node.clone(), source: Box::new(e) })?;
            Ok(list.items.iter().map(PodInfo::from_pod).collect())
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use tessera_core::mig::MigProduct;

    use super::*;
    use crate::gpu::fake::FakeGpus;
    use crate::gpu::observe;

    /// A pending pod with an assignment.
    pub(crate) fn pod(name: &str, created_s: i64, a: Assignment) -> PodInfo {
        PodInfo {
            uid: format!("uid-{name}"),
            namespace: "ml".into(),
            name: name.into(),
            phase: "Pending".into(),
            created_s,
            assignment_text: Some(a.to_annotation()),
            assignment: Some(Ok(a)),
            signature: None,
            gpu_containers: vec!["main".into()],
        }
    }

    pub(crate) fn mig_device(gpu: &str, index: u32, profile: &str, start: u8, mig: Option<&str>) -> AssignedDevice {
        AssignedDevice {
            gpu: gpu.into(),
            index,
            profile: Some(profile.into()),
            start: Some(start),
            mig: mig.map(str::to_owned),
            share: None,
        }
    }

    #[test]
    fn held_devices_resolve_mig_by_start_and_skip_finished_pods() {
        let fake = FakeGpus::new(MigProduct::H100_80GB, 1, true).with_mig(0, &["3g.40gb", "3g.40gb"]).unwrap();
        let obs = observe(&fake).unwrap();
        let g = &obs.gpus[0];
        let a = Assignment { node: "n1".into(), devices: vec![mig_device(&g.info.uuid, 0, "3g.40gb", 4, None)] };
        let mut done =
            pod("done", 1, Assignment { node: "n1".into(), devices: vec![mig_device("GPU-x", 0, "3g.40gb", 0, None)] });
        done.phase = "Succeeded".into();
        let other_node = pod(
            "elsewhere",
            1,
            Assignment { node: "n2".into(), devices: vec![mig_device("GPU-x", 0, "3g.40gb", 0, None)] },
        );
        let held = held_devices(&[pod("p", 1, a), done, other_node], "n1", &obs);
        assert_eq!(held, BTreeSet::from([g.mig[1].uuid.clone()]));
    }

    #[test]
    fn pod_info_reads_the_assignment_annotation() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "embed-0", "namespace": "ml", "uid": "u1",
                "creationTimestamp": "2026-01-02T03:04:05Z",
                "annotations": {"tessera.dev/assignment": "{\"node\":\"n1\",\"devices\":[{\"gpu\":\"GPU-1\",\"index\":0}]}"}},
            "spec": {"initContainers": [{"name": "fetch"}],
                     "containers": [{"name": "sidecar"},
                                    {"name": "model", "resources": {"limits": {"tessera.dev/gpu": "1"}}}]},
            "status": {"phase": "Pending"}
        }))
        .unwrap();
        let info = PodInfo::from_pod(&pod);
        assert_eq!(info.key(), "ml/embed-0");
        assert!(info.created_s > 0);
        assert_eq!(info.assignment_for("n1").unwrap().devices[0].gpu, "GPU-1");
        assert!(info.assignment_for("n2").is_none());
        assert_eq!(info.gpu_containers, ["model"]);
        assert!(info.signature.is_none());
    }
}
