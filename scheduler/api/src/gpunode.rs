//! The `GpuNode` custom resource: one per GPU node, named after the node (DESIGN §6).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired GPU configuration of one node, written by the scheduler.
///
/// GPUs not listed are left as they are.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "tessera.dev",
    version = "v1alpha1",
    kind = "GpuNode",
    plural = "gpunodes",
    shortname = "gn",
    status = "GpuNodeStatus"
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = kubernetes_formats)]
pub struct GpuNodeSpec {
    #[serde(default)]
    pub gpus: Vec<GpuSpec>,
}

/// Rewrites schemars' Rust integer formats (`uint8`, `uint32`, `uint64`, ...) into the ones
/// Kubernetes structural schemas know (`int32`, `int64`); the `minimum: 0` they come with stays.
/// kube-apiserver warns about every other format (`unrecognized format "uint32"`).
pub fn kubernetes_formats(schema: &mut schemars::Schema) {
    use schemars::transform::{RecursiveTransform, Transform};
    let mut rewrite = RecursiveTransform(|s: &mut schemars::Schema| {
        let Some(obj) = s.as_object_mut() else { return };
        let known = match obj.get("format").and_then(serde_json::Value::as_str) {
            Some("int8" | "int16" | "uint8" | "uint16") => "int32",
            Some("uint32" | "uint64" | "uint" | "int" | "uint128" | "int128") => "int64",
            _ => return,
        };
        obj.insert("format".into(), known.into());
    });
    rewrite.transform(schema);
}

/// Whether a GPU is used whole or partitioned into MIG instances.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    #[default]
    Full,
    Mig,
}

/// Desired state of one GPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuSpec {
    pub index: u32,
    pub mode: Mode,
    /// MIG instances wanted when `mode` is `mig` (exactly these; others are removed when idle).
    #[serde(default)]
    pub instances: Vec<MigInstanceSpec>,
}

/// A MIG instance by profile name and first memory slice.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigInstanceSpec {
    /// NVIDIA profile name, e.g. `3g.40gb`.
    pub profile: String,
    /// First memory slice (NVML placement start).
    pub start: u8,
}

/// What the node really has, written by the node agent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = kubernetes_formats)]
pub struct GpuNodeStatus {
    #[serde(default)]
    pub gpus: Vec<GpuStatus>,
    /// Interconnect between GPU indices.
    #[serde(default)]
    pub links: Vec<GpuLink>,
    /// The `metadata.generation` of the spec last reconciled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The devices containers on the node hold, as kubelet's PodResources API reports them
    /// (whichever device plugin handed them out; tessera's own pods with the devices the agent
    /// served them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<HeldDevice>,
}

/// One device a container holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeldDevice {
    /// `namespace/name` of the pod.
    pub pod: String,
    pub container: String,
    /// The extended resource, e.g. `nvidia.com/gpu` or `tessera.dev/gpu`.
    pub resource: String,
    /// The physical device: `GPU-…` or `MIG-…`.
    pub uuid: String,
}

/// Whether a device can be used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Health {
    #[default]
    Healthy,
    Unhealthy,
}

/// One physical GPU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuStatus {
    pub index: u32,
    pub uuid: String,
    /// Product name as tessera names it, e.g. `H100-80GB`.
    pub product: String,
    pub memory_mib: u64,
    pub mig_capable: bool,
    pub mode: Mode,
    /// Set when a mode change waits for a GPU reset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_mode: Option<Mode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<u32>,
    #[serde(default)]
    pub pci_bus_id: String,
    pub health: Health,
    #[serde(default)]
    pub instances: Vec<MigInstanceStatus>,
}

/// One MIG GPU instance that exists on the GPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigInstanceStatus {
    pub profile: String,
    pub start: u8,
    /// Memory slices it occupies.
    pub size: u8,
    /// `MIG-…` UUID, the device ID the device plugin advertises.
    pub uuid: String,
}

/// How two GPUs are connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum LinkKind {
    Nvlink,
    /// Behind the same PCIe switch.
    PcieSwitch,
    /// Same host bridge / NUMA node.
    SameNuma,
    CrossSocket,
}

/// A link between GPU `a` and GPU `b` (`a < b`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuLink {
    pub a: u32,
    pub b: u32,
    pub kind: LinkKind,
    /// NVLink lanes between the two, for `nvlink`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lanes: Option<u32>,
}

/// A status condition in the usual Kubernetes shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    #[serde(default)]
    pub message: String,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

/// Condition types the node agent reports.
pub mod condition {
    /// NVML started and the GPUs could be listed.
    pub const NVML_READY: &str = "NvmlReady";
    /// The observed MIG layout equals `spec` for every GPU it lists.
    pub const RECONCILED: &str = "Reconciled";
    /// kubelet accepted the device plugin's registration.
    pub const DEVICE_PLUGIN_REGISTERED: &str = "DevicePluginRegistered";
}

#[cfg(test)]
pub(crate) mod tests {
    use kube::CustomResourceExt;

    use super::*;

    const CRD_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../manifests/crds/gpunodes.tessera.dev.yaml");

    fn generated_yaml() -> String {
        let crd = GpuNode::crd();
        format!(
            "# Generated from tessera-api's GpuNode type; regenerate with\n# TESSERA_BLESS=1 cargo test -p tessera-api\n{}",
            serde_yaml::to_string(&crd).unwrap()
        )
    }

    #[test]
    fn crd_manifest_equals_what_the_type_generates() {
        let want = generated_yaml();
        if std::env::var_os("TESSERA_BLESS").is_some() {
            std::fs::write(CRD_PATH, &want).unwrap();
        }
        let have = std::fs::read_to_string(CRD_PATH).unwrap_or_default();
        assert!(
            have == want,
            "manifests/crds/gpunodes.tessera.dev.yaml is stale; run TESSERA_BLESS=1 cargo test -p tessera-api"
        );
    }

    /// Every `format` in a schema, depth first.
    pub(crate) fn formats(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(f) = m.get("format").and_then(serde_json::Value::as_str) {
                    out.push(f.to_owned());
                }
                m.values().for_each(|x| formats(x, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| formats(x, out)),
            _ => {}
        }
    }

    #[test]
    fn the_crd_uses_only_formats_kubernetes_knows() {
        let mut found = Vec::new();
        formats(&serde_json::to_value(GpuNode::crd()).unwrap(), &mut found);
        assert!(found.iter().any(|f| f == "int64"), "{found:?}");
        let unknown: Vec<&String> =
            found.iter().filter(|f| !["int32", "int64", "double", "float"].contains(&f.as_str())).collect();
        assert!(unknown.is_empty(), "kube-apiserver warns about formats {unknown:?}");
    }

    #[test]
    fn gpunode_is_cluster_scoped_with_a_status_subresource() {
        let crd = GpuNode::crd();
        assert_eq!(crd.metadata.name.as_deref(), Some("gpunodes.tessera.dev"));
        assert_eq!(crd.spec.scope, "Cluster");
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(v.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
    }

    #[test]
    fn spec_reads_the_scheduler_json() {
        let spec: GpuNodeSpec = serde_json::from_str(
            r#"{"gpus":[{"index":0,"mode":"mig","instances":[{"profile":"3g.40gb","start":0},{"profile":"1g.10gb","start":6}]},{"index":1,"mode":"full"}]}"#,
        )
        .unwrap();
        assert_eq!(spec.gpus[0].mode, Mode::Mig);
        assert_eq!(spec.gpus[0].instances[1], MigInstanceSpec { profile: "1g.10gb".into(), start: 6 });
        assert!(spec.gpus[1].instances.is_empty());
    }

    #[test]
    fn status_uses_camel_case_keys() {
        let status = GpuNodeStatus { observed_generation: Some(3), ..Default::default() };
        let v = serde_json::to_value(&status).unwrap();
        assert_eq!(v["observedGeneration"], 3);
    }
}
