//! MIG inference-fleet scenarios: GPU node pools, a model catalogue with replica counts or
//! arrival processes, and gangs, placed through the same core entry points the extender uses.
//!
//! Gangs and replicas are placed at time 0 and stay. Models with an `arrival:` process add pods
//! that arrive as a Poisson process and leave after an exponential lifetime; the simulation is
//! an event queue, and a departing pod's devices are released through `Snapshot::release`.
//!
//! Each policy starts from the same empty pools (full-mode GPUs that tessera may partition on
//! demand). The `static` baseline instead pre-partitions a fraction of every pool's MIG-capable
//! GPUs with a fixed mig-parted layout and never reconfigures, as clusters do today.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::path::Path;

use anyhow::{Context as _, Result, bail};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tessera_core::cluster::{Allocation, Gpu, GpuMode, Grant, MigOp, Node, Snapshot};
use tessera_core::demand::{Demand, GpuDemand};
use tessera_core::gang::plan_gang;
use tessera_core::mig::{MigLayout, MigProduct};
use tessera_core::placement::Candidate;
use tessera_core::policy::{Context, Memo, Policy, Score, Workload, place_memo};
use tessera_core::testing::model_memory_mib;
use tessera_core::topology::Topology;

use crate::occupancy::Occupancy;

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

    fn end_ms(&self) -> u64 {
        hours_to_ms(self.start_hour + self.duration_hours)
    }
}

fn hours_to_ms(h: f64) -> u64 {
    (h * 3_600_000.0).round() as u64
}

/// One pod of an arrival process: when it comes, how long it stays, what it asks for.
#[derive(Debug, Clone)]
pub struct Arrived {
    pub at_ms: u64,
    pub lifetime_ms: u64,
    pub demand: Demand,
}

/// FNV-1a: a stable hash (std's hashers may change between releases).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// A draw from the exponential distribution with this mean.
fn exponential(rng: &mut ChaCha8Rng, mean: f64) -> f64 {
    // random() is in [0, 1), so 1 - u is in (0, 1] and the logarithm finite.
    -(1.0 - rng.random::<f64>()).ln() * mean
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
            for r in 0..m.replicas.unwrap_or(0) {
                pods.push(m.demand(&format!("{r}")));
            }
        }
        pods.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        (gangs, pods)
    }

    /// The pods of the arrival processes, by arrival time (ties: model order). Each model draws
    /// from the seed's stream named by the model, so adding, removing or reordering models
    /// leaves the others' arrivals as they were.
    pub fn arrivals(&self, seed: u64) -> Vec<Arrived> {
        let mut out = Vec::new();
        for m in &self.models {
            let Some(a) = &m.arrival else { continue };
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(fnv1a(&m.name));
            let (mut t, end) = (a.start_hour, a.start_hour + a.duration_hours);
            for n in 0.. {
                t += exponential(&mut rng, 1.0 / a.rate_per_hour);
                if t >= end {
                    break;
                }
                let life_min = exponential(&mut rng, a.mean_lifetime_minutes);
                out.push(Arrived {
                    at_ms: hours_to_ms(t),
                    // At least a millisecond: a pod leaves after it came.
                    lifetime_ms: ((life_min * 60_000.0).round() as u64).max(1),
                    demand: m.demand(&format!("a{n}")),
                });
            }
        }
        out.sort_by_key(|a| a.at_ms);
        out
    }

    /// Where the simulated time ends: the last arrival process's end (0 without any).
    pub fn horizon_ms(&self) -> u64 {
        self.models.iter().filter_map(|m| m.arrival.as_ref()).map(Arrival::end_ms).max().unwrap_or(0)
    }
}

impl Model {
    /// A pod of this model named `serving/{model}-{suffix}`.
    fn demand(&self, suffix: &str) -> Demand {
        let gpu = match (self.gpus, self.gpu_memory_mib, &self.mig_profile) {
            (Some(n), _, _) => GpuDemand::Whole { count: n },
            (_, Some(mem), _) => GpuDemand::Model { memory_mib: mem, compute_slices: self.gpu_compute },
            (_, _, Some(p)) => GpuDemand::Mig { profile: p.clone() },
            _ => GpuDemand::None,
        };
        let mut d = Demand::new(format!("serving/{}-{suffix}", self.name).as_str(), gpu)
            .with_cpu(self.cpu_milli, self.memory_mib);
        d.gpu_models = self.gpu_models.clone();
        d
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
    /// Rejected pods (gang members included) that need whole GPUs on every product of the
    /// scenario's pools (tensor-parallel groups, models larger than any MIG slice), and the rest.
    pub rejected_large: u32,
    pub rejected_small: u32,
    /// GPUs holding at least one pod at the end, per product.
    pub gpus_used: BTreeMap<String, u32>,
    /// max(Σ compute slices / 7, Σ memory slices / 8) per product over what is placed at the end.
    pub lower_bound: BTreeMap<String, u32>,
    pub mig_reconfigs: u64,
    /// Over time, when the scenario has arrival processes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dynamics: Option<Dynamics>,
    /// The final cluster state, for the HTML report's slice map.
    #[serde(skip)]
    pub occupancy: Occupancy,
}

/// GPUs in use over simulated time (all products together).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Dynamics {
    pub horizon_hours: f64,
    pub arrivals: u32,
    pub departures: u32,
    pub peak_gpus_used: u32,
    /// Time-weighted over `[0, horizon]`.
    pub mean_gpus_used: f64,
    /// The lower bound (as in `lower_bound`, summed over products) of what was placed at the time.
    pub peak_lower_bound: u32,
    pub mean_lower_bound: f64,
    /// `[hours, GPUs used, lower bound, MIG reconfigurations so far]` at every change.
    pub timeline: Vec<(f64, u32, u32, u64)>,
}

/// Compute and memory share of one GPU that a grant takes, with the GPU's product.
fn grant_share(snap: &Snapshot, alloc: &Allocation) -> Vec<(String, f64, f64)> {
    let Some(node) = snap.node(&alloc.node) else { return vec![] };
    alloc
        .grants
        .iter()
        .filter_map(|gr| {
            let g = node.gpu(gr.gpu())?;
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
            Some((g.model.clone(), c, m))
        })
        .collect()
}

/// Σ over products of ⌈max(compute, memory)⌉.
fn bound_of(shares: &BTreeMap<String, (f64, f64)>) -> BTreeMap<String, u32> {
    shares.iter().map(|(k, &(c, m))| (k.clone(), (c.max(m) - 1e-9).ceil().max(0.0) as u32)).collect()
}

fn gpus_in_use(snap: &Snapshot) -> u32 {
    snap.nodes().iter().flat_map(|n| n.gpus.iter()).filter(|g| !g.is_unused()).count() as u32
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
    let arrivals = sc.arrivals(seed);
    let all: Vec<Demand> =
        gangs.iter().flatten().chain(pods.iter()).chain(arrivals.iter().map(|a| &a.demand)).cloned().collect();
    let workload = Workload::from_demands(all.iter());
    let ctx = Context { workload: &workload, seed };
    let mut out = Outcome {
        policy: policy_name.to_owned(),
        placed: 0,
        rejected: 0,
        rejected_by_model: BTreeMap::new(),
        rejected_large: 0,
        rejected_small: 0,
        gpus_used: BTreeMap::new(),
        lower_bound: BTreeMap::new(),
        mig_reconfigs: 0,
        dynamics: None,
        occupancy: Occupancy::default(),
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
                out.rejected_large += g.len() as u32;
                *out.rejected_by_model.entry(format!("gang {gang_name}")).or_default() += g.len() as u32;
            }
        }
    }
    let products: Vec<MigProduct> = sc.pools.iter().filter_map(|p| MigProduct::from_name(&p.product)).collect();
    let mut memo = Memo::new();
    let mut place_one = |snap: &mut Snapshot, d: &Demand, out: &mut Outcome| -> Result<bool> {
        match place_memo(snap, d, policy, &ctx, &mut memo) {
            Ok(p) if !is_static || p.ops.is_empty() => {
                p.apply(snap, d, None)?;
                out.placed += 1;
                Ok(true)
            }
            _ => {
                out.rejected += 1;
                if needs_whole_gpus(&d.gpu, &products) {
                    out.rejected_large += 1;
                } else {
                    out.rejected_small += 1;
                }
                *out.rejected_by_model.entry(model_of(d)).or_default() += 1;
                Ok(false)
            }
        }
    };
    for d in &pods {
        place_one(&mut snap, d, &mut out)?;
    }
    if sc.horizon_ms() > 0 {
        let dynamics = simulate(
            sc,
            &mut snap,
            &arrivals,
            reconfigs_before,
            &mut |snap, d, out| place_one(snap, d, out),
            &mut out,
        )?;
        out.dynamics = Some(dynamics);
    }
    out.mig_reconfigs = snap.reconfigs() - reconfigs_before;
    for n in snap.nodes() {
        for g in &n.gpus {
            if g.is_unused() {
                continue;
            }
            *out.gpus_used.entry(g.model.clone()).or_default() += 1;
        }
    }
    let mut shares: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for a in snap.allocations().values() {
        for (model, c, m) in grant_share(&snap, a) {
            let e = shares.entry(model).or_default();
            e.0 += c;
            e.1 += m;
        }
    }
    out.lower_bound = bound_of(&shares);
    out.occupancy = Occupancy::of(&snap);
    Ok(out)
}

/// Whether a demand needs whole GPUs wherever it goes: several GPUs, or a model that no MIG
/// slice of any of the pools' MIG products holds.
fn needs_whole_gpus(g: &GpuDemand, products: &[MigProduct]) -> bool {
    match g {
        GpuDemand::Whole { .. } => true,
        GpuDemand::Model { memory_mib, compute_slices } => products.iter().all(|p| {
            tessera_core::demand::smallest_fitting_profile(p.geometry(), *memory_mib, *compute_slices).is_none()
        }),
        _ => false,
    }
}

type PlaceFn<'a> = dyn FnMut(&mut Snapshot, &Demand, &mut Outcome) -> Result<bool> + 'a;

/// The event queue: arrivals are placed (or rejected and dropped), placed pods leave after their
/// lifetime. Departures at the same millisecond go before arrivals, so freed devices are reusable.
fn simulate(
    sc: &Scenario,
    snap: &mut Snapshot,
    arrivals: &[Arrived],
    reconfigs_before: u64,
    place: &mut PlaceFn<'_>,
    out: &mut Outcome,
) -> Result<Dynamics> {
    const DEPART: u8 = 0;
    const ARRIVE: u8 = 1;
    let horizon = sc.horizon_ms();
    let mut queue: BinaryHeap<Reverse<(u64, u8, usize)>> =
        arrivals.iter().enumerate().map(|(i, a)| Reverse((a.at_ms, ARRIVE, i))).collect();
    let mut shares: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for a in snap.allocations().values() {
        for (model, c, m) in grant_share(snap, a) {
            let e = shares.entry(model).or_default();
            e.0 += c;
            e.1 += m;
        }
    }
    let bound_now = |shares: &BTreeMap<String, (f64, f64)>| bound_of(shares).values().sum::<u32>();
    let (mut used, mut bound) = (gpus_in_use(snap), bound_now(&shares));
    let mut d = Dynamics {
        horizon_hours: horizon as f64 / 3_600_000.0,
        arrivals: 0,
        departures: 0,
        peak_gpus_used: used,
        mean_gpus_used: 0.0,
        peak_lower_bound: bound,
        mean_lower_bound: 0.0,
        timeline: vec![(0.0, used, bound, snap.reconfigs() - reconfigs_before)],
    };
    let (mut area_used, mut area_bound, mut last) = (0.0, 0.0, 0u64);
    while let Some(Reverse((t, kind, i))) = queue.pop() {
        if t > horizon {
            break;
        }
        let dt = (t - last) as f64;
        area_used += f64::from(used) * dt;
        area_bound += f64::from(bound) * dt;
        last = t;
        let a = &arrivals[i];
        if kind == ARRIVE {
            d.arrivals += 1;
            if place(snap, &a.demand, out)? {
                let alloc = snap.allocation(&a.demand.pod).context("placed pod has no allocation")?;
                for (model, c, m) in grant_share(snap, alloc) {
                    let e = shares.entry(model).or_default();
                    e.0 += c;
                    e.1 += m;
                }
                queue.push(Reverse((t + a.lifetime_ms, DEPART, i)));
            }
        } else {
            d.departures += 1;
            let alloc = snap.release(&a.demand.pod)?;
            for (model, c, m) in grant_share(snap, &alloc) {
                let e = shares.entry(model).or_default();
                e.0 -= c;
                e.1 -= m;
            }
        }
        (used, bound) = (gpus_in_use(snap), bound_now(&shares));
        d.peak_gpus_used = d.peak_gpus_used.max(used);
        d.peak_lower_bound = d.peak_lower_bound.max(bound);
        let hours = t as f64 / 3_600_000.0;
        let reconfigs = snap.reconfigs() - reconfigs_before;
        match d.timeline.last_mut() {
            // Several events at one instant: keep the state after the last of them.
            Some(p) if p.0 == hours => *p = (hours, used, bound, reconfigs),
            Some(p) if (p.1, p.2, p.3) == (used, bound, reconfigs) => {}
            _ => d.timeline.push((hours, used, bound, reconfigs)),
        }
    }
    let dt = (horizon - last) as f64;
    area_used += f64::from(used) * dt;
    area_bound += f64::from(bound) * dt;
    d.mean_gpus_used = area_used / horizon as f64;
    d.mean_lower_bound = area_bound / horizon as f64;
    d.timeline.push((d.horizon_hours, used, bound, snap.reconfigs() - reconfigs_before));
    Ok(d)
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

    const ONE_GPU: &str = r#"
name: one-gpu
pools:
  - { name: h100, product: H100-80GB, nodes: 1, gpus_per_node: 1 }
models:
  - name: job
    gpus: 1
    arrival: { rate_per_hour: 6, mean_lifetime_minutes: 1, duration_hours: 20 }
"#;

    #[test]
    fn departures_free_capacity() {
        // One GPU, about 120 whole-GPU pods that stay a minute each: without departures only the
        // first could ever be placed.
        let sc: Scenario = serde_yaml::from_str(ONE_GPU).unwrap_or_else(|e| panic!("{e}"));
        sc.check().unwrap_or_else(|e| panic!("{e:#}"));
        let arrivals = sc.arrivals(7);
        assert!(arrivals.len() > 60, "{}", arrivals.len());
        let o = run(&sc, "tessera", 7).unwrap_or_else(|e| panic!("{e:#}"));
        let d = o.dynamics.clone().unwrap_or_else(|| panic!("no dynamics: {o:?}"));
        assert_eq!(d.arrivals as usize, arrivals.len());
        assert_eq!(o.placed + o.rejected, d.arrivals);
        assert!(o.placed as usize > arrivals.len() / 2, "{o:?}");
        assert!(d.departures + 1 >= o.placed, "every placed pod but the last leaves: {d:?}");
        assert_eq!(d.peak_gpus_used, 1);
        // Busy about a minute in ten: the time-weighted mean is far below the peak.
        assert!(d.mean_gpus_used > 0.0 && d.mean_gpus_used < 0.5, "{d:?}");
        assert_eq!(d.horizon_hours, 20.0);
    }

    #[test]
    fn arrivals_are_seeded() {
        let sc: Scenario = serde_yaml::from_str(ONE_GPU).unwrap_or_else(|e| panic!("{e}"));
        let times = |seed| sc.arrivals(seed).iter().map(|a| (a.at_ms, a.lifetime_ms)).collect::<Vec<_>>();
        assert_eq!(times(3), times(3));
        assert_ne!(times(3), times(4));
        let a = run(&sc, "tessera", 3).unwrap_or_else(|e| panic!("{e:#}"));
        let b = run(&sc, "tessera", 3).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(serde_json::to_string(&a).ok(), serde_json::to_string(&b).ok());
        assert_eq!(a.occupancy, b.occupancy);
        // Another model, listed first, leaves this one's arrivals as they were.
        let more = ONE_GPU.replace(
            "models:\n",
            "models:\n  - { name: ocr, gpu_memory_mib: 6000, arrival: { rate_per_hour: 3, mean_lifetime_minutes: 5, duration_hours: 2 } }\n",
        );
        let more: Scenario = serde_yaml::from_str(&more).unwrap_or_else(|e| panic!("{e}"));
        let jobs = |a: Vec<Arrived>| {
            a.into_iter()
                .filter(|x| x.demand.pod.0.contains("/job-"))
                .map(|x| (x.at_ms, x.lifetime_ms))
                .collect::<Vec<_>>()
        };
        assert!(more.arrivals(3).len() > times(3).len());
        assert_eq!(jobs(more.arrivals(3)), times(3));
        // Arrivals are within the window and ordered.
        let all = sc.arrivals(3);
        assert!(all.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
        assert!(all.iter().all(|x| x.at_ms < 20 * 3_600_000 && x.lifetime_ms > 0));
    }

    #[test]
    fn a_model_needs_exactly_one_of_replicas_and_arrival() {
        let both = ONE_GPU.replace("gpus: 1\n", "gpus: 1\n    replicas: 2\n");
        let sc: Scenario = serde_yaml::from_str(&both).unwrap_or_else(|e| panic!("{e}"));
        let e = sc.check().expect_err("both accepted");
        assert!(e.to_string().contains("exactly one of replicas, arrival (both"), "{e}");
        let neither = SMALL.replace("replicas: 7, ", "");
        let sc: Scenario = serde_yaml::from_str(&neither).unwrap_or_else(|e| panic!("{e}"));
        let e = sc.check().expect_err("neither accepted");
        assert!(e.to_string().contains("model embed: set exactly one of replicas, arrival (neither"), "{e}");
        let bad = ONE_GPU.replace("rate_per_hour: 6", "rate_per_hour: 0");
        let sc: Scenario = serde_yaml::from_str(&bad).unwrap_or_else(|e| panic!("{e}"));
        let e = sc.check().expect_err("zero rate accepted");
        assert!(format!("{e:#}").contains("model job: arrival: rate_per_hour"), "{e:#}");
        let twice = SMALL.replace("name: llm13b", "name: embed");
        let sc: Scenario = serde_yaml::from_str(&twice).unwrap_or_else(|e| panic!("{e}"));
        assert!(sc.check().expect_err("duplicate name").to_string().contains("embed: the name is used twice"));
        let typo = ONE_GPU.replace("duration_hours", "duration_hour");
        assert!(serde_yaml::from_str::<Scenario>(&typo).is_err());
    }

    #[test]
    fn scenario_report_has_charts_for_every_policy() {
        let text = SMALL.replace(
            "gangs:",
            "  - { name: ocr, gpu_memory_mib: 9000, arrival: { rate_per_hour: 20, mean_lifetime_minutes: 30, duration_hours: 4 } }\ngangs:",
        );
        let sc: Scenario = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        sc.check().unwrap_or_else(|e| panic!("{e:#}"));
        let outcomes: Vec<Outcome> = ["tessera", "first-fit", "static"]
            .iter()
            .map(|p| run(&sc, p, 1).unwrap_or_else(|e| panic!("{e:#}")))
            .collect();
        assert!(outcomes.iter().all(|o| o.dynamics.as_ref().is_some_and(|d| d.arrivals > 20)));
        let html = crate::report::scenario_html(&sc, &outcomes, "tessera-sim scenario x.yaml --html r.html")
            .unwrap_or_else(|e| panic!("{e:#}"));
        // Used vs bound, reconfigurations, over time, and one slice map per policy.
        assert_eq!(html.matches("<svg").count(), 3 + outcomes.len());
        for name in ["tessera", "first-fit", "static"] {
            assert!(html.contains(&format!("<td>{name}</td>")), "{name}");
        }
        assert!(html.contains("lower bound (tessera)"));
        assert_eq!(crate::report::check::external_refs(&html), Vec::<String>::new());
        crate::report::check::balanced(&html).unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn churn_scenarios_have_large_arrivals_and_tessera_keeps_room_for_them() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        for name in ["churn-mixed-fleet", "churn-vlm-day", "churn-tp4-night"] {
            let sc = Scenario::load(&dir.join(format!("{name}.yaml"))).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            let products: Vec<MigProduct> = sc.pools.iter().filter_map(|p| MigProduct::from_name(&p.product)).collect();
            let arrivals = sc.arrivals(1);
            let large = arrivals.iter().filter(|a| needs_whole_gpus(&a.demand.gpu, &products)).count();
            assert!(large >= 10 && large * 5 < arrivals.len(), "{name}: {large} of {}", arrivals.len());
            assert!(
                sc.pools.iter().any(|p| p.product == "A100-40GB") && sc.pools.iter().any(|p| p.product == "H100-80GB")
            );
        }
        // The scenario tuned on, one seed: fewer large-model rejections than fgd, no more small.
        let sc = Scenario::load(&dir.join("churn-mixed-fleet.yaml")).unwrap_or_else(|e| panic!("{e:#}"));
        let t = run(&sc, "tessera", 1).unwrap_or_else(|e| panic!("{e:#}"));
        let f = run(&sc, "fgd", 1).unwrap_or_else(|e| panic!("{e:#}"));
        for o in [&t, &f] {
            assert_eq!(o.rejected_large + o.rejected_small, o.rejected, "{o:?}");
        }
        assert!(t.rejected_large < f.rejected_large, "tessera {} vs fgd {}", t.rejected_large, f.rejected_large);
        assert!(t.rejected_small <= f.rejected_small, "tessera {} vs fgd {}", t.rejected_small, f.rejected_small);
    }

    #[test]
    fn large_means_whole_gpus_on_every_product() {
        let h100 = [MigProduct::H100_80GB];
        let both = [MigProduct::H100_80GB, MigProduct::A100_40GB];
        let model = |m| GpuDemand::Model { memory_mib: m, compute_slices: None };
        assert!(needs_whole_gpus(&GpuDemand::Whole { count: 4 }, &both));
        assert!(needs_whole_gpus(&model(76_000), &both));
        // 30 GB fits a 3g.40gb slice of an H100, not any slice of an A100-40GB.
        assert!(!needs_whole_gpus(&model(30_000), &both));
        assert!(needs_whole_gpus(&model(30_000), &[MigProduct::A100_40GB]));
        assert!(!needs_whole_gpus(&model(3_000), &h100));
        assert!(!needs_whole_gpus(&GpuDemand::Mig { profile: "1g.10gb".into() }, &h100));
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
