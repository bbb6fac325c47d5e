//! The scheduler's read-only JSON API: `GET /api/v1/cluster`, `/api/v1/pending` and
//! `/api/v1/explain/{namespace}/{pod}`.
//!
//! One schema for every side: the extender builds these types, the simulator's capture reader
//! and `kubectl tessera` decode them, and the dashboard page reads the same JSON. The view's own
//! fields are camelCase; the core records it embeds ([`Allocation`], [`Demand`], [`Packing`])
//! keep their snake_case serde names, as in the scheduler's other outputs. The golden files
//! under `scheduler/api/fixtures/views/` hold the extender's answers for its demo cluster.
//!
//! Fields a reader can do without carry serde defaults, so a hand-written dump of the cluster
//! (nodes, GPUs, MIG instances, allocations) still reads.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tessera_core::metrics::Packing;
use tessera_core::{Allocation, Demand, GpuMode};

fn yes() -> bool {
    true
}

/// A GPU's mode, refused with the value and the names it may take.
fn gpu_mode<'de, D: serde::Deserializer<'de>>(d: D) -> Result<GpuMode, D::Error> {
    let name = String::deserialize(d)?;
    match name.as_str() {
        "full" => Ok(GpuMode::Full),
        "shared" => Ok(GpuMode::Shared),
        "mig" => Ok(GpuMode::Mig),
        _ => Err(serde::de::Error::custom(format!("mode {name:?}; expected full, shared or mig"))),
    }
}

/// `GET /api/v1/cluster`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterView {
    /// `live` or `demo`.
    #[serde(default)]
    pub mode: String,
    #[serde(default)]
    pub policy: String,
    #[serde(default)]
    pub generation: u64,
    /// Whether this replica binds; `None` where a dump leaves it out.
    #[serde(default)]
    pub leader: Option<bool>,
    pub nodes: Vec<NodeView>,
    pub allocations: Vec<AllocationView>,
    #[serde(default)]
    pub packing: PackingView,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeView {
    pub name: String,
    #[serde(default)]
    pub pool: String,
    #[serde(default = "yes")]
    pub schedulable: bool,
    pub cpu_milli: u64,
    #[serde(default)]
    pub used_cpu_milli: u64,
    pub memory_mib: u64,
    #[serde(default)]
    pub used_memory_mib: u64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub pods: Vec<String>,
    #[serde(default)]
    pub gpus: Vec<GpuView>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuView {
    pub index: u32,
    #[serde(default)]
    pub uuid: String,
    pub model: String,
    pub memory_mib: u64,
    #[serde(default)]
    pub numa: Option<u32>,
    #[serde(default = "yes")]
    pub healthy: bool,
    /// `full`, `shared` or `mig`.
    #[serde(deserialize_with = "gpu_mode")]
    pub mode: GpuMode,
    /// Allocated milli-GPU (MIG instances by compute slices).
    #[serde(default)]
    pub allocated_milli: u32,
    #[serde(default)]
    pub free_milli: u32,
    /// Pods holding the GPU whole or a share of it.
    #[serde(default)]
    pub holders: Vec<String>,
    /// Largest MIG profile that could still be created (MIG-capable GPUs).
    #[serde(default)]
    pub largest_placeable: Option<String>,
    /// Memory and compute slices of the GPU's MIG geometry (MIG-capable GPUs): where
    /// instances start and how wide they are is counted in memory slices.
    #[serde(default)]
    pub memory_slices: Option<u8>,
    #[serde(default)]
    pub compute_slices: Option<u8>,
    #[serde(default)]
    pub mig: Vec<MigView>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigView {
    pub profile: String,
    pub start: u8,
    #[serde(default)]
    pub memory_slices: u8,
    #[serde(default)]
    pub compute_slices: u8,
    #[serde(default)]
    pub uuid: Option<String>,
    #[serde(default)]
    pub holder: Option<String>,
}

/// How an allocation holds its devices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AllocationState {
    /// The cluster shows the pod bound.
    #[default]
    Bound,
    /// Bound by this replica, not yet seen by the informer.
    Assumed,
    /// Devices held while the bind (or the gang's barrier) is in progress.
    Reserved,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocationView {
    #[serde(default)]
    pub state: AllocationState,
    #[serde(flatten)]
    pub allocation: Allocation,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PackingView {
    pub cluster: Packing,
    pub pools: BTreeMap<String, Packing>,
}

/// `GET /api/v1/explain/{ns}/{pod}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    pub pod: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub demand: Option<Demand>,
    /// Why the pod's demand could not be read.
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub filtered_at_ms: Option<u64>,
    /// The cluster changed since that filter.
    #[serde(default)]
    pub stale: bool,
    #[serde(default)]
    pub nodes: Vec<NodeReason>,
    #[serde(default)]
    pub allocation: Option<Allocation>,
}

/// One node's verdict in the last filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeResult {
    Fits,
    /// Cannot host the pod now (capacity may free up).
    Unschedulable,
    /// Never can, as the node is built.
    Unresolvable,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeReason {
    pub node: String,
    pub result: NodeResult,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub score: Option<f64>,
}

/// Whether a pending pod holds anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PendingState {
    /// Holds nothing.
    Pending,
    /// Holds its gang's reservation until every member reaches bind.
    Reserved,
}

/// `GET /api/v1/pending`: one pod the replica filtered that is not running yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingView {
    pub pod: String,
    pub state: PendingState,
    #[serde(default)]
    pub gang: Option<String>,
    /// The demand in words, or why the pod's demand could not be read.
    pub demand: String,
    pub filtered_at_ms: u64,
    /// The cluster changed since that filter.
    #[serde(default)]
    pub stale: bool,
    /// Offered nodes that fit, of all offered.
    pub fits: usize,
    pub nodes: usize,
    /// The reason most offered nodes gave (the gang's bottleneck for a gang member).
    #[serde(default)]
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The extender's answers for its demo cluster (written by the extender's golden test).
    fn golden(name: &str) -> String {
        let path = format!("{}/fixtures/views/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// Decoding a golden answer and writing it again gives the same JSON: no field is dropped,
    /// renamed or added by the schema.
    fn round_trips<T: Serialize + serde::de::DeserializeOwned>(name: &str) -> T {
        let text = golden(name);
        let want: serde_json::Value = serde_json::from_str(&text).unwrap();
        let typed: T = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(serde_json::to_value(&typed).unwrap(), want, "{name}");
        typed
    }

    #[test]
    fn the_golden_answers_decode_and_encode_unchanged() {
        let c: ClusterView = round_trips("cluster.json");
        assert!(c.nodes.iter().any(|n| n.gpus.iter().any(|g| g.mode == GpuMode::Mig && !g.mig.is_empty())));
        assert!(c.allocations.iter().any(|a| a.state == AllocationState::Reserved));
        let p: Vec<PendingView> = round_trips("pending.json");
        assert!(p.iter().any(|p| p.state == PendingState::Reserved) && p.iter().any(|p| p.reason.is_some()));
        let e: Explanation = round_trips("explain.json");
        assert!(e.demand.is_some() && e.allocation.is_some());
        assert!(e.nodes.iter().any(|n| n.result == NodeResult::Fits));
    }

    #[test]
    fn a_minimal_cluster_dump_reads_with_defaults() {
        let c: ClusterView = serde_json::from_str(
            r#"{"nodes":[{"name":"n1","cpuMilli":1000,"memoryMib":1024,
                "gpus":[{"index":0,"model":"H100-80GB","memoryMib":81559,"mode":"mig",
                         "mig":[{"profile":"1g.10gb","start":0}]}]}],
                "allocations":[]}"#,
        )
        .unwrap();
        let n = &c.nodes[0];
        assert!(n.schedulable && n.gpus[0].healthy);
        assert_eq!(c.leader, None);
        assert_eq!(n.gpus[0].mig[0].uuid, None);
    }

    #[test]
    fn an_unknown_gpu_mode_is_refused_with_the_expected_names() {
        let e = serde_json::from_str::<GpuView>(r#"{"index":0,"model":"L4","memoryMib":1,"mode":"half"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("half") && e.contains("full") && e.contains("mig"), "{e}");
    }
}
