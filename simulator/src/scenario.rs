//! MIG inference-fleet scenarios: GPU node pools, a model catalogue with replica counts, and
//! gangs, placed through the same core entry points the extender uses.
//!
//! Each policy starts from the same empty pools (full-mode GPUs that tessera may partition on
//! demand). The `static` baseline instead pre-partitions a fraction of every pool's MIG-capable
//! GPUs with a fixed mig-parted layout and never reconfigures, as clusters do today.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context as _, Result, bail};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tessera_core::cluster::{Gpu, GpuMode, Grant, MigOp, Node, Snapshot};
use tessera_core::demand::{Demand, GpuDemand};
use tessera_core::gang::plan_gang;
use tessera_core::mig::{MigLayout, MigProduct};
use tessera_core::placement::Candidate;
use tessera_core::policy::{Context, Memo, Policy, Score, Workload, place_memo};
use tessera_core::testing::model_memory_mib;
use tessera_core::topology::Topology;

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

/// One model served with `replicas` pods.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    pub name: String,
    pub replicas: u32,
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

    fn check(&self) -> Result<()> {
        if self.pools.is_empty() {
            bail!("scenario {}: no pools", self.name);
        }
        for p in &self.pools {
            parse_topology(&p.topology, p.gpus_per_node).with_context(|| format!("pool {}", p.name))?;
        }
        for m in &self.models {
            let kinds = [m.gpu_memory_mib.is_some(), m.gpus.is_some(), m.mig_profile.is_some()];
            if kinds.iter().filter(|k| **k).count() != 1 {
                bail!("model {}: set exactly one of gpu_memory_mib, gpus, mig_profile", m.name);
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
                let gpus = (0..p.gpus_per_node)
                    .map(|g| {
                        let mut gpu = Gpu::new(g, &p.product, mem, GpuMode::Full);
                        gpu.uuid = format!("GPU-{name}-{g}");
                        gpu
                    })
                    .collect();
                let mut node = Node::new(&name, p.cpu_milli, p.memory_mib, gpus);
                node.labels.insert("tessera.dev/pool".into(), p.name.clone());
                node.topology = std::sync::Arc::new(parse_topology(&p.topology, p.gpus_per_node)?);
                out.push(node);
            }
        }
        Ok(out)
    }

    /// Every demand in arrival order: gangs first (they need whole islands), then model replicas
    /// shuffled with the seed.
    pub fn demands(&self, seed: u64) -> (Vec<Vec<Demand>>, Vec<Demand>) {
        let gangs = self
            .gangs
            .iter()
            .map(|g| {
                (0..g.members)
                    .map(|i| {
                        Demand::new(
                            format!("jobs/{}-{i}", g.name).as_str(),
                            GpuDemand::Whole { count: g.gpus_per_member },
                        )
                        .with_cpu(g.cpu_milli, g.memory_mib)
                        .in_gang(&g.name, g.members, 60_000)
                    })
                    .collect()
            })
            .collect();
        let mut pods = Vec::new();
        for m in &self.models {
            let gpu = match (m.gpus, m.gpu_memory_mib, &m.mig_profile) {
                (Some(n), _, _) => GpuDemand::Whole { count: n },
                (_, Some(mem), _) => GpuDemand::Model { memory_mib: mem, compute_slices: m.gpu_compute },
                (_, _, Some(p)) => GpuDemand::Mig { profile: p.clone() },
                _ => GpuDemand::None,
            };
            for r in 0..m.replicas {
                let mut d = Demand::new(format!("serving/{}-{r}", m.name).as_str(), gpu.clone())
                    .with_cpu(m.cpu_milli, m.memory_mib);
                d.gpu_models = m.gpu_models.clone();
                pods.push(d);
            }
        }
        pods.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        (gangs, pods)
    }
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

/// mig-parted style fixed layouts.
fn layout_for(name: &str, product: MigProduct) -> Result<Vec<&'static str>> {
    let g = product.geometry();
    let n = |c| g.profile(c).map(|p| p.name).unwrap_or("");
    use tessera_core::mig::ProfileClass::*;
    Ok(match name {
        "all-balanced" => vec![n(G1), n(G1), n(G2), n(G3)],
        "all-1g" => vec![n(G1); 7],
        "all-3g" => vec![n(G3), n(G3)],
        "all-7g" => vec![n(G7)],
        other => bail!("unknown static layout {other:?}; use all-balanced, all-1g, all-3g or all-7g"),
    })
}

/// Pre-partitions the static baseline's share of MIG-capable GPUs.
fn apply_static(snap: &mut Snapshot, sc: &Scenario) -> Result<()> {
    let names: Vec<_> = snap.nodes().iter().map(|n| n.name.clone()).collect();
    for name in names {
        let gpus: Vec<(u32, MigProduct)> = snap
            .node(&name)
            .map(|n| n.gpus.iter().filter_map(|g| g.mig_product().map(|p| (g.index, p))).collect())
            .unwrap_or_default();
        let take = (gpus.len() as f64 * sc.static_baseline.fraction).round() as usize;
        for &(gpu, product) in gpus.iter().take(take) {
            snap.apply(&name, MigOp::SetMode { gpu, mode: GpuMode::Mig })?;
            let mut layout = MigLayout::empty(product);
            for prof in layout_for(&sc.static_baseline.layout, product)? {
                let Some(p) = product.geometry().profile_by_name(prof) else { continue };
                let Some(&start) = layout.placements(p.class).first() else { continue };
                layout.create(p.class, start)?;
                snap.apply(&name, MigOp::Create { gpu, class: p.class, start })?;
            }
        }
    }
    Ok(())
}

/// Forbids reconfiguration: candidates with MIG steps lose to any candidate without.
#[derive(Debug)]
struct NoReconfig<'a>(&'a dyn Policy);

const FORBIDDEN: f64 = 1e15;

impl Policy for NoReconfig<'_> {
    fn name(&self) -> &'static str {
        "static"
    }
    fn score(&self, snap: &Snapshot, d: &Demand, c: &Candidate, ctx: &Context<'_>) -> Score {
        let s = self.0.score(snap, d, c, ctx);
        if c.ops.is_empty() { s } else { Score::new(s.node - FORBIDDEN, s.device) }
    }
}

/// Result of one policy on one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub policy: String,
    pub placed: u32,
    pub rejected: u32,
    pub rejected_by_model: BTreeMap<String, u32>,
    /// GPUs holding at least one pod, per product.
    pub gpus_used: BTreeMap<String, u32>,
    /// max(Σ compute slices / 7, Σ memory slices / 8) per product over what was placed there.
    pub lower_bound: BTreeMap<String, u32>,
    pub mig_reconfigs: u64,
}

/// Places a scenario under `policy` (`static` = first-fit on the fixed layout, no reconfig).
pub fn run(sc: &Scenario, policy_name: &str, seed: u64) -> Result<Outcome> {
    let is_static = policy_name == "static";
    let base = tessera_core::policy::by_name(if is_static { "first-fit" } else { policy_name })
        .with_context(|| format!("unknown policy {policy_name:?}"))?;
    let wrapped = NoReconfig(base.as_ref());
    let policy: &dyn Policy = if is_static { &wrapped } else { base.as_ref() };
    let mut snap = Snapshot::new(sc.nodes()?)?;
    if is_static {
        apply_static(&mut snap, sc)?;
    }
    let reconfigs_before = snap.reconfigs();
    let (gangs, pods) = sc.demands(seed);
    let all: Vec<Demand> = gangs.iter().flatten().chain(pods.iter()).cloned().collect();
    let workload = Workload::from_demands(all.iter());
    let ctx = Context { workload: &workload, seed };
    let mut out = Outcome {
        policy: policy_name.to_owned(),
        placed: 0,
        rejected: 0,
        rejected_by_model: BTreeMap::new(),
        gpus_used: BTreeMap::new(),
        lower_bound: BTreeMap::new(),
        mig_reconfigs: 0,
    };
    let model_of = |d: &Demand| {
        d.pod.0.split('/').nth(1).and_then(|n| n.rsplit_once('-')).map_or(String::new(), |(m, _)| m.to_owned())
    };
    for g in &gangs {
        let gang_name = g[0].gang.as_ref().map_or_else(String::new, |x| x.name.clone());
        let cp = snap.checkpoint();
        match plan_gang(&mut snap, g, policy, &ctx, 0) {
            Ok(plan) if !is_static || plan.members.iter().all(|(_, p)| p.ops.is_empty()) => {
                snap.commit(cp);
                out.placed += g.len() as u32;
            }
            // The static baseline may not reconfigure; a failed plan reserved nothing.
            _ => {
                snap.rollback(cp);
                out.rejected += g.len() as u32;
                *out.rejected_by_model.entry(format!("gang {gang_name}")).or_default() += g.len() as u32;
            }
        }
    }
    let mut memo = Memo::new();
    for d in &pods {
        match place_memo(&snap, d, policy, &ctx, &mut memo) {
            Ok(p) if !is_static || p.ops.is_empty() => {
                p.apply(&mut snap, d, None)?;
                out.placed += 1;
            }
            _ => {
                out.rejected += 1;
                *out.rejected_by_model.entry(model_of(d)).or_default() += 1;
            }
        }
    }
    out.mig_reconfigs = snap.reconfigs() - reconfigs_before;
    let mut compute: BTreeMap<String, f64> = BTreeMap::new();
    let mut memory: BTreeMap<String, f64> = BTreeMap::new();
    for n in snap.nodes() {
        for g in &n.gpus {
            if g.is_unused() {
                continue;
            }
            *out.gpus_used.entry(g.model.clone()).or_default() += 1;
        }
    }
    for a in snap.allocations().values() {
        let Some(node) = snap.node(&a.node) else { continue };
        for gr in &a.grants {
            let Some(g) = node.gpu(gr.gpu()) else { continue };
            let (c, m) = match *gr {
                Grant::Whole { .. } => (1.0, 1.0),
                Grant::Share { milli, .. } => (f64::from(milli) / 1000.0, f64::from(milli) / 1000.0),
                Grant::Mig { class, .. } => g
                    .mig_product()
                    .and_then(|p| {
                        let geom = p.geometry();
                        geom.profile(class).map(|pr| {
                            (
                                f64::from(pr.compute_slices) / f64::from(geom.compute_slices),
                                f64::from(pr.memory_slices) / f64::from(geom.memory_slices),
                            )
                        })
                    })
                    .unwrap_or((0.0, 0.0)),
            };
            *compute.entry(g.model.clone()).or_default() += c;
            *memory.entry(g.model.clone()).or_default() += m;
        }
    }
    for (model, c) in compute {
        let m = memory.get(&model).copied().unwrap_or(0.0);
        out.lower_bound.insert(model, (c.max(m) - 1e-9).ceil().max(0.0) as u32);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = r#"
name: small
pools:
  - { name: h100, product: H100-80GB, nodes: 1 }
models:
  - { name: embed, replicas: 7, gpu_memory_mib: 4096 }
  - { name: llm13b, replicas: 2, gpu_memory_mib: 30000 }
  - { name: vlm34b, replicas: 2, gpu_memory_mib: 70000 }
gangs:
  - { name: tp, members: 1, gpus_per_member: 4 }
static_baseline: { layout: all-balanced, fraction: 0.5 }
"#;

    #[test]
    fn small_scenario_places_everything_with_tessera_and_not_with_static_layouts() {
        let sc: Scenario = serde_yaml::from_str(SMALL).unwrap_or_else(|e| panic!("{e}"));
        sc.check().unwrap_or_else(|e| panic!("{e:#}"));
        let t = run(&sc, "tessera", 1).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!((t.placed, t.rejected), (12, 0), "{t:?}");
        // 4 whole (gang) + 2 whole (VLM) + 2×3g + 7×1g = 6 GPUs + 13/7 compute → bound 8.
        assert_eq!(t.lower_bound.get("H100-80GB"), Some(&8), "{t:?}");
        assert!(t.gpus_used["H100-80GB"] <= 8, "{t:?}");
        assert!(t.mig_reconfigs > 0);
        let s = run(&sc, "static", 1).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(s.rejected > 0, "a half-partitioned node cannot hold the whole-GPU demands: {s:?}");
        assert_eq!(s.mig_reconfigs, 0);
    }

    #[test]
    fn malformed_scenarios_are_refused_with_a_reason() {
        let bad = SMALL.replace("gpu_memory_mib: 4096", "gpu_memory_mib: 4096, gpus: 2");
        let sc: Scenario = serde_yaml::from_str(&bad).unwrap_or_else(|e| panic!("{e}"));
        let e = sc.check().expect_err("two kinds");
        assert!(e.to_string().contains("exactly one"), "{e}");
        let bad = SMALL.replace("nodes: 1", "nodes: 1, topology: ring");
        let sc: Scenario = serde_yaml::from_str(&bad).unwrap_or_else(|e| panic!("{e}"));
        assert!(sc.check().is_err());
        assert!(serde_yaml::from_str::<Scenario>("name: x\npools: []\nbogus: 1\n").is_err());
    }

    #[test]
    fn bundled_scenarios_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{e}")) {
            let p = e.unwrap_or_else(|e| panic!("{e}")).path();
            if p.extension().is_some_and(|x| x == "yaml") {
                Scenario::load(&p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
                n += 1;
            }
        }
        assert!(n >= 1);
    }
}
