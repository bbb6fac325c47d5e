//! The scenario file: GPU node pools, a model catalogue with replica counts or arrival
//! processes, gangs and the static baseline's layout, checked on load.

use std::path::Path;

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use tessera_core::cluster::{Gpu, GpuMode, Node};
use tessera_core::mig::MigProduct;
use tessera_core::testing::model_memory_mib;
use tessera_core::topology::Topology;

use super::baseline::layout_for;

/// A scenario file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub pools: Vec<Pool>,
    #[serde(default)]
    pub models: Vec<Model>,
    #[serde(default)]
    pub gangs: Vec<Gang>,
    /// The static baseline's layout and the fraction of MIG-capable GPUs it partitions.
    #[serde(default)]
    pub static_baseline: StaticBaseline,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    pub name: String,
    /// GPU product, e.g. `H100-80GB`, `A100-80GB`, `L4`.
    pub product: String,
    pub nodes: u32,
    #[serde(default = "default_gpus")]
    pub gpus_per_node: u32,
    #[serde(default = "default_cpu")]
    pub cpu_milli: u64,
    #[serde(default = "default_mem")]
    pub memory_mib: u64,
    /// `nvswitch`, `pcie`, or `islands:4,4`.
    #[serde(default = "default_topology")]
    pub topology: String,
}

pub(crate) fn default_gpus() -> u32 {
    8
}
pub(crate) fn default_cpu() -> u64 {
    192_000
}
pub(crate) fn default_mem() -> u64 {
    2 * 1024 * 1024
}
pub(crate) fn default_topology() -> String {
    "nvswitch".into()
}

/// One model served with `replicas` pods, or with pods that come and go (`arrival`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    pub name: String,
    /// Pods placed at time 0 that never leave.
    #[serde(default)]
    pub replicas: Option<u32>,
    /// Pods arriving over time, each leaving after its lifetime.
    #[serde(default)]
    pub arrival: Option<Arrival>,
    /// Device memory one replica needs (weights + KV cache + activations), MiB.
    #[serde(default)]
    pub gpu_memory_mib: Option<u64>,
    /// Compute slices (sevenths of a GPU); default: derived from memory.
    #[serde(default)]
    pub gpu_compute: Option<u8>,
    /// Whole GPUs for tensor parallelism (no MIG).
    #[serde(default)]
    pub gpus: Option<u32>,
    /// An explicit MIG profile name instead of sizing by memory.
    #[serde(default)]
    pub mig_profile: Option<String>,
    #[serde(default)]
    pub gpu_models: Vec<String>,
    #[serde(default = "default_pod_cpu")]
    pub cpu_milli: u64,
    #[serde(default = "default_pod_mem")]
    pub memory_mib: u64,
}

/// A Poisson arrival process with exponential lifetimes, active from `start_hour` for
/// `duration_hours` of simulated time.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Arrival {
    pub rate_per_hour: f64,
    pub mean_lifetime_minutes: f64,
    pub duration_hours: f64,
    #[serde(default)]
    pub start_hour: f64,
}

impl Arrival {
    fn check(&self) -> Result<()> {
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !positive(self.rate_per_hour) || !positive(self.mean_lifetime_minutes) || !positive(self.duration_hours) {
            bail!("rate_per_hour, mean_lifetime_minutes and duration_hours must be positive numbers");
        }
        if !(self.start_hour.is_finite() && self.start_hour >= 0.0) {
            bail!("start_hour {} must be a number ≥ 0", self.start_hour);
        }
        // A typo in the rate should not turn into an hour-long run.
        if self.rate_per_hour * self.duration_hours > 1e6 {
            bail!("about {:.0} arrivals expected; at most 1,000,000", self.rate_per_hour * self.duration_hours);
        }
        Ok(())
    }
}

fn default_pod_cpu() -> u64 {
    2_000
}
fn default_pod_mem() -> u64 {
    8 * 1024
}

/// A gang of identical members (e.g. a distributed job).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Gang {
    pub name: String,
    pub members: u32,
    pub gpus_per_member: u32,
    #[serde(default = "default_pod_cpu")]
    pub cpu_milli: u64,
    #[serde(default = "default_pod_mem")]
    pub memory_mib: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StaticBaseline {
    /// mig-parted style name: `all-balanced`, `all-1g`, `all-3g`, `all-7g`.
    #[serde(default = "default_layout")]
    pub layout: String,
    /// Fraction of each pool's MIG-capable GPUs that carry the layout (the rest stay whole).
    #[serde(default = "default_fraction")]
    pub fraction: f64,
}

impl Default for StaticBaseline {
    fn default() -> Self {
        Self { layout: default_layout(), fraction: default_fraction() }
    }
}

fn default_layout() -> String {
    "all-balanced".into()
}
fn default_fraction() -> f64 {
    0.5
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let s: Scenario = serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        s.check()?;
        Ok(s)
    }

    pub(super) fn check(&self) -> Result<()> {
        if self.pools.is_empty() {
            bail!("scenario {}: no pools", self.name);
        }
        for p in &self.pools {
            parse_topology(&p.topology, p.gpus_per_node).with_context(|| format!("pool {}", p.name))?;
        }
        let mut names = std::collections::BTreeSet::new();
        for m in &self.models {
            // Names key the pods and the arrival streams.
            if !names.insert(m.name.as_str()) {
                bail!("model {}: the name is used twice", m.name);
            }
            let kinds = [m.gpu_memory_mib.is_some(), m.gpus.is_some(), m.mig_profile.is_some()];
            if kinds.iter().filter(|k| **k).count() != 1 {
                bail!("model {}: set exactly one of gpu_memory_mib, gpus, mig_profile", m.name);
            }
            match (&m.replicas, &m.arrival) {
                (Some(_), None) => {}
                (None, Some(a)) => a.check().with_context(|| format!("model {}: arrival", m.name))?,
                (Some(_), Some(_)) => bail!("model {}: set exactly one of replicas, arrival (both are set)", m.name),
                (None, None) => bail!("model {}: set exactly one of replicas, arrival (neither is set)", m.name),
            }
        }
        if !(0.0..=1.0).contains(&self.static_baseline.fraction) {
            bail!("static_baseline.fraction {} is outside 0..=1", self.static_baseline.fraction);
        }
        layout_for(&self.static_baseline.layout, MigProduct::H100_80GB)?;
        Ok(())
    }

    /// The cluster: pools expanded into nodes, GPUs in full mode.
    pub fn nodes(&self) -> Result<Vec<Node>> {
        let mut out = Vec::new();
        for p in &self.pools {
            let mem = model_memory_mib(&p.product);
            for i in 0..p.nodes {
                let name = format!("{}-{i:03}", p.name);
                let mut node =
                    idle_node(&name, &p.product, mem, p.gpus_per_node, p.cpu_milli, p.memory_mib, &p.topology)?;
                node.labels.insert("tessera.dev/pool".into(), p.name.clone());
                node.pool = Some(p.name.clone());
                out.push(node);
            }
        }
        Ok(out)
    }

    /// The MIG products among the pools.
    pub(super) fn mig_products(&self) -> Vec<MigProduct> {
        self.pools.iter().filter_map(|p| MigProduct::from_name(&p.product)).collect()
    }
}

/// An idle node with a pool's keys: `gpus` full-mode GPUs of `product` named `GPU-{name}-{index}`.
pub(crate) fn idle_node(
    name: &str,
    product: &str,
    gpu_memory_mib: u64,
    gpus: u32,
    cpu_milli: u64,
    memory_mib: u64,
    topology: &str,
) -> Result<Node> {
    let devices = (0..gpus)
        .map(|g| {
            let mut gpu = Gpu::new(g, product, gpu_memory_mib, GpuMode::Full);
            gpu.uuid = format!("GPU-{name}-{g}");
            gpu
        })
        .collect();
    let mut node = Node::new(name, cpu_milli, memory_mib, devices);
    node.topology = std::sync::Arc::new(parse_topology(topology, gpus)?);
    Ok(node)
}

pub(crate) fn parse_topology(spec: &str, gpus: u32) -> Result<Topology> {
    Ok(match spec {
        "nvswitch" => Topology::nvswitch(gpus),
        "pcie" => Topology::pcie(gpus, 2, 2),
        s if s.starts_with("islands:") => {
            let sizes: Vec<u32> = s["islands:".len()..]
                .split(',')
                .map(|x| x.trim().parse::<u32>())
                .collect::<Result<_, _>>()
                .with_context(|| format!("topology {s:?}"))?;
            if sizes.iter().sum::<u32>() != gpus {
                bail!("topology {s:?} covers {} GPUs, pool has {gpus}", sizes.iter().sum::<u32>());
            }
            Topology::islands(&sizes, 12)
        }
        other => bail!("unknown topology {other:?}; use nvswitch, pcie or islands:A,B"),
    })
}
