//! Feasibility: every concrete way a [`Demand`] can sit on a node, or why it cannot.
//!
//! A [`Candidate`] is one option on one node: the grants (whole GPUs, shares, MIG instances)
//! plus the MIG steps needed first (switch mode, create an instance). Policies only rank
//! candidates; they never invent one, so no policy can return an infeasible placement.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::cluster::{Gpu, GpuMode, Grant, MILLI_PER_GPU, MigOp, Node, NodeName, Snapshot};
use crate::demand::{Demand, GpuDemand, smallest_fitting_profile};
use crate::mig::{Instance, Profile};

/// Whether a rejection can change: `Unschedulable` may change as pods come and go;
/// `Unresolvable` will not (maps to the extender's `FailedAndUnresolvableNodes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectionKind {
    Unschedulable,
    Unresolvable,
}

/// Why a demand does not fit: its kind, the node it is about (when it is about one) and the
/// cause on that node. Its text ([`Rejection::reason`], `Display`) is `node NAME: cause`, or
/// just the cause when no node is named.
///
/// Serialised as its kind and text (`{"kind": "unschedulable", "reason": "node a: ..."}`); a
/// deserialised rejection names no node and carries the whole text as its cause, so it reads the
/// same.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "RejectionWire", from = "RejectionWire")]
pub struct Rejection {
    kind: RejectionKind,
    /// Shared, because verdicts copy a node's rejection out of the memo on every filter.
    about: std::sync::Arc<About>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct About {
    node: Option<NodeName>,
    cause: String,
}

impl Rejection {
    fn new(kind: RejectionKind, node: Option<NodeName>, cause: String) -> Self {
        Self { kind, about: std::sync::Arc::new(About { node, cause }) }
    }

    /// A rejection that may change as pods come and go.
    pub fn unschedulable(cause: impl Into<String>) -> Self {
        Self::new(RejectionKind::Unschedulable, None, cause.into())
    }

    /// A rejection that will not change.
    pub fn unresolvable(cause: impl Into<String>) -> Self {
        Self::new(RejectionKind::Unresolvable, None, cause.into())
    }

    /// The same rejection, about `node`.
    pub fn at_node(self, node: NodeName) -> Self {
        let About { cause, .. } = std::sync::Arc::unwrap_or_clone(self.about);
        Self::new(self.kind, Some(node), cause)
    }

    pub fn kind(&self) -> RejectionKind {
        self.kind
    }

    /// The node the rejection is about, if it names one.
    pub fn node(&self) -> Option<&NodeName> {
        self.about.node.as_ref()
    }

    /// The cause, without the node.
    pub fn cause(&self) -> &str {
        &self.about.cause
    }

    /// The text: `node NAME: cause`, or the cause alone when no node is named.
    pub fn reason(&self) -> std::borrow::Cow<'_, str> {
        match self.node() {
            None => std::borrow::Cow::Borrowed(self.cause()),
            Some(_) => std::borrow::Cow::Owned(self.to_string()),
        }
    }

    pub fn is_unresolvable(&self) -> bool {
        self.kind == RejectionKind::Unresolvable
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.node() {
            Some(n) => write!(f, "node {n}: {}", self.cause()),
            None => f.write_str(self.cause()),
        }
    }
}

/// The serialised form of a [`Rejection`].
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", content = "reason", rename_all = "kebab-case")]
enum RejectionWire {
    Unschedulable(String),
    Unresolvable(String),
}

impl From<Rejection> for RejectionWire {
    fn from(r: Rejection) -> Self {
        let text = match r.node() {
            Some(_) => r.to_string(),
            None => r.cause().to_owned(),
        };
        match r.kind {
            RejectionKind::Unschedulable => Self::Unschedulable(text),
            RejectionKind::Unresolvable => Self::Unresolvable(text),
        }
    }
}

impl From<RejectionWire> for Rejection {
    fn from(w: RejectionWire) -> Self {
        match w {
            RejectionWire::Unschedulable(text) => Self::unschedulable(text),
            RejectionWire::Unresolvable(text) => Self::unresolvable(text),
        }
    }
}

/// A candidate's grants: inline up to two (nearly every pod), so copying a verdict does not
/// allocate.
pub type Grants = smallvec::SmallVec<[Grant; 2]>;

/// One feasible option on one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    /// Index of the node in [`Snapshot::nodes`].
    pub node: usize,
    pub grants: Grants,
    /// MIG steps to apply (in order) before the grants exist.
    pub ops: Vec<MigOp>,
}

fn unsched(node: &Node, why: impl fmt::Display) -> Rejection {
    Rejection::new(RejectionKind::Unschedulable, Some(node.name.clone()), why.to_string())
}

fn never(node: &Node, why: impl fmt::Display) -> Rejection {
    Rejection::new(RejectionKind::Unresolvable, Some(node.name.clone()), why.to_string())
}

/// A cheap, conservative test: `true` only when the node certainly cannot host the demand
/// (cpu, memory, or not enough free GPU of any kind). Used to skip nodes before building
/// candidates and reasons; [`node_candidates`] remains the judge.
pub fn quick_reject(node: &Node, demand: &Demand) -> bool {
    if !node.schedulable
        || demand.cpu_milli > node.free_cpu_milli()
        || demand.memory_mib > node.free_memory_mib()
        || demand.device_plugin && !node.device_plugin
    {
        return true;
    }
    if !demand.rules.is_empty() && !rules_hold(node, demand) {
        return true;
    }
    match &demand.gpu {
        GpuDemand::None => false,
        GpuDemand::Share { milli } => {
            !node.gpus.iter().any(|g| g.mode() == GpuMode::Shared && g.free_milli() >= *milli)
        }
        GpuDemand::Whole { count } => node.gpus.iter().filter(|g| can_be_whole(g)).count() < *count as usize,
        GpuDemand::Mig { .. } | GpuDemand::Model { .. } => {
            !node.gpus.iter().any(|g| g.healthy && (g.mode() == GpuMode::Mig || g.used_milli() == 0))
        }
    }
}

/// Checks the node-level constraints that do not depend on GPUs.
pub fn check_node(node: &Node, demand: &Demand) -> Result<(), Rejection> {
    if !node.schedulable {
        return Err(unsched(node, "not schedulable (cordoned, not ready or tainted)"));
    }
    if demand.device_plugin && !node.device_plugin {
        // Known from GPU Feature Discovery labels only: nothing on the node serves tessera.dev/gpu
        // yet, and its GPUs have no UUIDs an assignment could name. Passes once the agent reports.
        return Err(unsched(node, "tessera's node agent has not reported its GPUs yet (it serves tessera.dev/gpu)"));
    }
    for (k, v) in &demand.node_selector {
        if node.labels.get(k) != Some(v) {
            return Err(never(node, format_args!("label {k}={v} does not match")));
        }
    }
    check_rules(node, demand)?;
    if demand.cpu_milli > node.cpu_milli {
        return Err(never(node, format_args!("{}m cpu requested, node has {}m", demand.cpu_milli, node.cpu_milli)));
    }
    if demand.memory_mib > node.memory_mib {
        return Err(never(
            node,
            format_args!("{} MiB memory requested, node has {} MiB", demand.memory_mib, node.memory_mib),
        ));
    }
    if demand.cpu_milli > node.free_cpu_milli() {
        return Err(unsched(
            node,
            format_args!("{}m cpu requested, {}m free", demand.cpu_milli, node.free_cpu_milli()),
        ));
    }
    if demand.memory_mib > node.free_memory_mib() {
        return Err(unsched(
            node,
            format_args!("{} MiB memory requested, {} MiB free", demand.memory_mib, node.free_memory_mib()),
        ));
    }
    Ok(())
}

/// Whether [`check_rules`] passes, without building a reason.
fn rules_hold(node: &Node, demand: &Demand) -> bool {
    demand.rules.untolerated(&node.taints).is_none()
        && demand.rules.affinity_matches(&node.name.0, &node.labels)
        && demand
            .rules
            .extended
            .iter()
            .all(|(name, want)| node.extended_of(name).is_none_or(|(cap, used)| cap.saturating_sub(used) >= *want))
}

/// kube-scheduler's filters that tessera applies too ([`crate::rules`]): taints, required node
/// affinity, and NVIDIA extended resources against the node's allocatable less what its pods
/// request.
fn check_rules(node: &Node, demand: &Demand) -> Result<(), Rejection> {
    if let Some(t) = demand.rules.untolerated(&node.taints) {
        let kv = if t.value.is_empty() { t.key.clone() } else { format!("{}={}", t.key, t.value) };
        return Err(never(node, format_args!("taint {kv}:{} is not tolerated", t.effect)));
    }
    if !demand.rules.affinity_matches(&node.name.0, &node.labels) {
        return Err(never(node, "does not match the pod's required node affinity"));
    }
    for (name, want) in &demand.rules.extended {
        if let Some((cap, used)) = node.extended_of(name) {
            let free = cap.saturating_sub(used);
            if free < *want {
                return Err(unsched(
                    node,
                    format_args!("Insufficient {name}: {want} requested, {free} of {cap} allocatable free"),
                ));
            }
        }
    }
    Ok(())
}

/// Checks that `grants` (with MIG steps `ops`) are a kind of placement `demand` asks for on
/// `node`: the node-level constraints hold, every GPU exists and is an allowed model, and the
/// grants match the demand (count of whole GPUs, the share, the MIG profile, or a slice the
/// model fits in); steps touch only granted GPUs. Device availability is not checked here
/// ([`Snapshot::allocate`] does that). For placements that come from outside this process,
/// such as a persisted plan.
pub fn check_grants(node: &Node, demand: &Demand, grants: &[Grant], ops: &[MigOp]) -> Result<(), String> {
    check_node(node, demand).map_err(|r| r.to_string())?;
    let mut gpus: smallvec::SmallVec<[&Gpu; 8]> = smallvec::SmallVec::new();
    for g in grants {
        let gpu = node.gpu(g.gpu()).ok_or_else(|| format!("node {}: no GPU {}", node.name, g.gpu()))?;
        if !demand.allows_model(&gpu.model) {
            return Err(format!("node {}: GPU {} is a {}, not an allowed model", node.name, gpu.index, gpu.model));
        }
        if gpus.iter().any(|x| x.index == gpu.index) {
            return Err(format!("node {}: GPU {} is granted twice", node.name, gpu.index));
        }
        gpus.push(gpu);
    }
    let profile_of = |gpu: &Gpu, class| gpu.mig_product().and_then(|p| p.geometry().profile(class));
    let fits = match (&demand.gpu, grants) {
        (GpuDemand::None, []) => true,
        (GpuDemand::Share { milli }, [Grant::Share { milli: m, .. }]) => m == milli,
        (GpuDemand::Whole { count }, gs) => {
            gs.len() == *count as usize && gs.iter().all(|g| matches!(g, Grant::Whole { .. }))
        }
        (GpuDemand::Mig { profile }, [Grant::Mig { class, .. }]) => {
            profile_of(gpus[0], *class).is_some_and(|p| p.name.eq_ignore_ascii_case(profile))
        }
        (GpuDemand::Model { memory_mib, compute_slices }, [g]) => match *g {
            Grant::Mig { class, .. } => {
                profile_of(gpus[0], class).is_some_and(|p| fits_instance(p, *memory_mib, *compute_slices))
            }
            Grant::Whole { .. } => gpus[0].memory_mib >= *memory_mib,
            Grant::Share { .. } => false,
        },
        _ => false,
    };
    if !fits {
        return Err(format!("node {}: {grants:?} is not what {} asks for", node.name, demand.gpu));
    }
    let stray = ops.iter().find(|op| {
        let gpu = match **op {
            MigOp::SetMode { gpu, .. } | MigOp::Create { gpu, .. } | MigOp::Destroy { gpu, .. } => gpu,
        };
        !grants.iter().any(|g| g.gpu() == gpu)
    });
    if let Some(op) = stray {
        return Err(format!("node {}: {op:?} touches a GPU the placement does not hold", node.name));
    }
    Ok(())
}

/// Appends every candidate for `demand` on node `ni` to `out`, or says why there is none.
pub fn node_candidates(snap: &Snapshot, ni: usize, demand: &Demand, out: &mut Vec<Candidate>) -> Result<(), Rejection> {
    let node = &snap.nodes()[ni];
    check_node(node, demand)?;
    let start = out.len();
    let gpus: smallvec::SmallVec<[&Gpu; 8]> = node.gpus.iter().filter(|g| demand.allows_model(&g.model)).collect();
    if demand.gpu != GpuDemand::None && gpus.is_empty() {
        let models: Vec<&str> = node.gpus.iter().map(|g| g.model.as_str()).collect();
        return Err(if models.is_empty() {
            never(node, "has no GPUs")
        } else {
            never(node, format_args!("GPU model {} is not in {}", models[0], demand.gpu_models.join("|")))
        });
    }
    match &demand.gpu {
        GpuDemand::None => out.push(Candidate { node: ni, grants: Grants::new(), ops: Vec::new() }),
        GpuDemand::Share { milli } => share(node, ni, &gpus, *milli, out)?,
        GpuDemand::Whole { count } => whole(node, ni, &gpus, *count, out)?,
        GpuDemand::Mig { profile } => {
            let mut any_product = false;
            let mut seen = Vec::new();
            for g in &gpus {
                if let Some(p) = g.mig_product().and_then(|p| p.geometry().profile_by_name(profile)) {
                    any_product = true;
                    if first_of_its_state(g, &mut seen) {
                        mig_on_gpu(g, ni, p, out);
                    }
                }
            }
            if !any_product {
                return Err(never(node, format_args!("no GPU offers MIG profile {profile}")));
            }
            if out.len() == start {
                return Err(mig_near_miss(node, &gpus, |g| {
                    g.mig_product().and_then(|p| p.geometry().profile_by_name(profile))
                }));
            }
        }
        GpuDemand::Model { memory_mib, compute_slices } => {
            model(node, ni, &gpus, *memory_mib, *compute_slices, out)?;
        }
    }
    if out.len() == start {
        return Err(unsched(node, format_args!("no free capacity for {}", demand.gpu)));
    }
    Ok(())
}

fn share(node: &Node, ni: usize, gpus: &[&Gpu], milli: u32, out: &mut Vec<Candidate>) -> Result<(), Rejection> {
    let shared: smallvec::SmallVec<[&&Gpu; 8]> = gpus.iter().filter(|g| g.mode() == GpuMode::Shared).collect();
    if shared.is_empty() {
        return Err(never(node, "no GPU is in shared (time-sliced) mode"));
    }
    // GPUs with the same free share are interchangeable for a share: keep the lowest index.
    let mut seen: smallvec::SmallVec<[u32; 8]> = smallvec::SmallVec::new();
    for g in &shared {
        if g.healthy && g.free_milli() >= milli && !seen.contains(&g.free_milli()) {
            seen.push(g.free_milli());
            out.push(Candidate {
                node: ni,
                grants: smallvec::smallvec![Grant::Share { gpu: g.index, milli }],
                ops: Vec::new(),
            });
        }
    }
    if out.iter().all(|c| c.node != ni) {
        let best = shared.iter().map(|g| g.free_milli()).max().unwrap_or(0);
        return Err(unsched(node, format_args!("largest free share is {best} milli-GPU, {milli} requested")));
    }
    Ok(())
}

/// A GPU that can be handed out whole: free non-MIG, or MIG with no instance held by a pod
/// (its free instances are destroyed and it is switched back to full mode first).
fn whole_ready(g: &Gpu) -> Option<Vec<MigOp>> {
    if !can_be_whole(g) {
        return None;
    }
    match g.mode() {
        GpuMode::Full | GpuMode::Shared => Some(Vec::new()),
        GpuMode::Mig => {
            let mut ops: Vec<MigOp> =
                g.free_instances().map(|i| MigOp::Destroy { gpu: g.index, class: i.class, start: i.start }).collect();
            ops.push(MigOp::SetMode { gpu: g.index, mode: GpuMode::Full });
            Some(ops)
        }
    }
}

/// Whether [`whole_ready`] would hand the GPU out, without building its steps.
fn can_be_whole(g: &Gpu) -> bool {
    g.healthy && if g.mode() == GpuMode::Mig { g.is_unused() } else { g.used_milli() == 0 }
}

fn whole(node: &Node, ni: usize, gpus: &[&Gpu], count: u32, out: &mut Vec<Candidate>) -> Result<(), Rejection> {
    let k = count as usize;
    if gpus.len() < k {
        return Err(never(node, format_args!("needs {count} whole GPUs, node has {}", gpus.len())));
    }
    let ready: smallvec::SmallVec<[(u32, Vec<MigOp>); 8]> =
        gpus.iter().filter_map(|g| whole_ready(g).map(|ops| (g.index, ops))).collect();
    if ready.len() < k {
        return Err(unsched(node, format_args!("needs {count} whole GPUs, {} free", ready.len())));
    }
    let emit = |set: &[u32], out: &mut Vec<Candidate>| {
        let mut ops = Vec::new();
        for g in set {
            if let Some((_, o)) = ready.iter().find(|(i, _)| i == g) {
                ops.extend(o.iter().copied());
            }
        }
        let grants = set.iter().map(|&gpu| Grant::Whole { gpu }).collect();
        out.push(Candidate { node: ni, grants, ops });
    };
    if k == 1 {
        // Without NVLink, idle GPUs of one mode are interchangeable: offer the lowest index of
        // each (mode, needs-reconfiguration) kind; with NVLink the choice of island matters.
        // A MIG GPU's free layout is part of its kind: layouts differ in what they strand.
        let flat = !node.topology.has_nvlink();
        let mut kinds: Vec<(GpuMode, Option<&[Instance]>)> = Vec::new();
        for (g, _) in &ready {
            if flat {
                let gpu = node.gpu(*g);
                let kind =
                    (gpu.map_or(GpuMode::Full, |x| x.mode()), gpu.and_then(|x| x.mig_layout()).map(|l| l.instances()));
                if kinds.contains(&kind) {
                    continue;
                }
                kinds.push(kind);
            }
            emit(&[*g], out);
        }
        return Ok(());
    }
    // Multi-GPU: the best-connected set overall, plus the best set inside each NVLink island
    // that can hold the demand (so a policy can choose which island to spend) — once among
    // the GPUs ready as they are, and once also counting MIG GPUs whose free instances would
    // be destroyed (so a policy can choose not to reconfigure).
    let free: Vec<u32> = ready.iter().map(|(g, _)| *g).collect();
    let plain: Vec<u32> = ready.iter().filter(|(_, ops)| ops.is_empty()).map(|(g, _)| *g).collect();
    let mut sets: Vec<Vec<u32>> = Vec::new();
    for pool in [&plain, &free] {
        for island in node.topology.nvlink_islands().iter() {
            let in_island: Vec<u32> = pool.iter().copied().filter(|g| island.contains(g)).collect();
            if let Some(s) = node.topology.best_set(&in_island, k) {
                sets.push(s);
            }
        }
        if let Some(s) = node.topology.best_set(pool, k) {
            sets.push(s);
        }
    }
    sets.sort();
    sets.dedup();
    for s in &sets {
        emit(s, out);
    }
    Ok(())
}

/// The state that decides a single GPU's MIG options: model, mode, health, layout, held starts.
type GpuState<'a> = (&'a str, GpuMode, bool, Option<&'a [Instance]>, u8, u32);

/// Whether `g` is the first GPU of its state on this node. GPUs in the same state are
/// interchangeable for a single-GPU MIG or model demand (all of a node's GPUs share its NVLink
/// fabric or none of them matters for one GPU), so only the lowest index is offered.
fn first_of_its_state<'a>(g: &'a Gpu, seen: &mut Vec<GpuState<'a>>) -> bool {
    let key =
        (g.model.as_str(), g.mode(), g.healthy, g.mig_layout().map(|l| l.instances()), g.mig_busy, g.used_milli());
    if seen.contains(&key) {
        return false;
    }
    seen.push(key);
    true
}

/// Existing free instances of the profile's class, then every legal new placement (switching
/// an idle full-mode GPU to MIG when needed).
fn mig_on_gpu(g: &Gpu, ni: usize, p: &Profile, out: &mut Vec<Candidate>) {
    if !g.healthy {
        return;
    }
    match g.mode() {
        GpuMode::Mig => {
            let before = out.len();
            for inst in g.free_instances().filter(|i| i.class == p.class) {
                out.push(Candidate {
                    node: ni,
                    grants: smallvec::smallvec![Grant::Mig { gpu: g.index, class: inst.class, start: inst.start }],
                    ops: Vec::new(),
                });
            }
            if let Some(layout) = g.mig_layout() {
                for start in layout.placements(p.class) {
                    out.push(Candidate {
                        node: ni,
                        grants: smallvec::smallvec![Grant::Mig { gpu: g.index, class: p.class, start }],
                        ops: vec![MigOp::Create { gpu: g.index, class: p.class, start }],
                    });
                }
                if out.len() == before {
                    repartition(g, ni, layout, p, out);
                }
            }
        }
        GpuMode::Full | GpuMode::Shared if g.used_milli() == 0 => {
            for &start in p.starts {
                out.push(Candidate {
                    node: ni,
                    grants: smallvec::smallvec![Grant::Mig { gpu: g.index, class: p.class, start }],
                    ops: vec![
                        MigOp::SetMode { gpu: g.index, mode: GpuMode::Mig },
                        MigOp::Create { gpu: g.index, class: p.class, start },
                    ],
                });
            }
        }
        _ => {}
    }
}

/// When the profile has no free instance and no free slices on a MIG GPU: every legal start
/// whose slices are covered only by free instances, destroying those first. Without this,
/// layouts only ever grow as pods come and go.
fn repartition(g: &Gpu, ni: usize, layout: &crate::mig::MigLayout, p: &Profile, out: &mut Vec<Candidate>) {
    let geom = layout.geometry();
    for &start in p.starts {
        let want = p.mask_at(start);
        let in_the_way: smallvec::SmallVec<[Instance; 7]> = layout
            .instances()
            .iter()
            .copied()
            .filter(|i| geom.profile(i.class).is_some_and(|ip| ip.mask_at(i.start) & want != 0))
            .collect();
        if in_the_way.is_empty() || in_the_way.iter().any(|i| g.instance_busy(i.start)) {
            continue;
        }
        let mut after = layout.clone();
        if in_the_way.iter().any(|i| after.destroy(i.class, i.start).is_err()) || after.check(p.class, start).is_err() {
            continue;
        }
        let mut ops: Vec<MigOp> =
            in_the_way.iter().map(|i| MigOp::Destroy { gpu: g.index, class: i.class, start: i.start }).collect();
        ops.push(MigOp::Create { gpu: g.index, class: p.class, start });
        out.push(Candidate {
            node: ni,
            grants: smallvec::smallvec![Grant::Mig { gpu: g.index, class: p.class, start }],
            ops,
        });
    }
}

fn model(
    node: &Node,
    ni: usize,
    gpus: &[&Gpu],
    memory_mib: u64,
    compute: Option<u8>,
    out: &mut Vec<Candidate>,
) -> Result<(), Rejection> {
    let start = out.len();
    let mut fits_somewhere = false;
    let mut seen = Vec::new();
    for g in gpus {
        if !first_of_its_state(g, &mut seen) {
            // An identical GPU earlier on this node offers the same options.
            continue;
        }
        let sub = g.mig_product().and_then(|p| smallest_fitting_profile(p.geometry(), memory_mib, compute));
        match sub {
            Some(p) => {
                fits_somewhere = true;
                mig_on_gpu(g, ni, p, out);
                // A larger free instance that already exists also serves (no reconfiguration).
                if g.mode() == GpuMode::Mig
                    && let Some(geom) = g.mig_product().map(|p| p.geometry())
                {
                    for inst in g.free_instances() {
                        let Some(ip) = geom.profile(inst.class) else { continue };
                        if inst.class != p.class && fits_instance(ip, memory_mib, compute) {
                            out.push(Candidate {
                                node: ni,
                                grants: smallvec::smallvec![Grant::Mig {
                                    gpu: g.index,
                                    class: inst.class,
                                    start: inst.start
                                }],
                                ops: Vec::new(),
                            });
                        }
                    }
                }
            }
            None if memory_mib <= g.memory_mib => {
                fits_somewhere = true;
                // Larger than any sub-GPU profile (or no MIG): a whole exclusive GPU.
                if g.mode() != GpuMode::Shared
                    && let Some(ops) = whole_ready(g)
                {
                    out.push(Candidate { node: ni, grants: smallvec::smallvec![Grant::Whole { gpu: g.index }], ops });
                }
            }
            None => {}
        }
    }
    if !fits_somewhere {
        let biggest = gpus.iter().map(|g| g.memory_mib).max().unwrap_or(0);
        return Err(never(
            node,
            format_args!(
                "model needs {memory_mib} MiB on one GPU, largest GPU has {biggest} MiB (set tessera.dev/gpus for tensor parallelism)"
            ),
        ));
    }
    if out.len() == start {
        return Err(mig_near_miss(node, gpus, |g| {
            g.mig_product().and_then(|p| smallest_fitting_profile(p.geometry(), memory_mib, compute))
        }));
    }
    Ok(())
}

fn fits_instance(p: &Profile, memory_mib: u64, compute: Option<u8>) -> bool {
    p.memory_mib >= memory_mib && compute.is_none_or(|c| p.compute_slices >= c)
}

/// The most useful explanation of why no GPU on the node can take the profile: the GPU with
/// the most free memory slices, and what the profile would need.
fn mig_near_miss(node: &Node, gpus: &[&Gpu], profile_of: impl Fn(&Gpu) -> Option<&'static Profile>) -> Rejection {
    let mut best: Option<(u8, String)> = None;
    for g in gpus {
        let Some(p) = profile_of(g) else { continue };
        let (free, why) = match (g.mode(), g.mig_layout()) {
            (GpuMode::Mig, Some(layout)) => {
                let free_mask = !layout.used_mask() & layout.geometry().full_mask();
                let free = free_mask.count_ones() as u8;
                let slices: Vec<String> = (0..8).filter(|b| free_mask & (1 << b) != 0).map(|b| b.to_string()).collect();
                let starts: Vec<String> = p.starts.iter().map(|s| s.to_string()).collect();
                let msg = if free == 0 {
                    format!("GPU {} has no free memory slices", g.index)
                } else {
                    format!(
                        "GPU {} has {free} free memory slices ({}) but {} needs {} starting at {}",
                        g.index,
                        slices.join(","),
                        p.name,
                        p.memory_slices,
                        starts.join(" or ")
                    )
                };
                (free, msg)
            }
            _ => (0, format!("GPU {} is in use in {} mode", g.index, mode_name(g.mode()))),
        };
        if best.as_ref().is_none_or(|(f, _)| free > *f) {
            best = Some((free, why));
        }
    }
    match best {
        Some((_, why)) => unsched(node, why),
        None => unsched(node, "no GPU can host the requested MIG profile"),
    }
}

fn mode_name(m: GpuMode) -> &'static str {
    match m {
        GpuMode::Full => "full",
        GpuMode::Shared => "shared",
        GpuMode::Mig => "MIG",
    }
}

/// A decision: where the demand goes and what must happen first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub node: NodeName,
    pub grants: Vec<Grant>,
    pub ops: Vec<MigOp>,
    /// The policy's score of the chosen candidate (higher is better).
    pub score: f64,
}

impl Placement {
    /// Applies the MIG steps and records the allocation in the snapshot.
    pub fn apply(&self, snap: &mut Snapshot, demand: &Demand, reserved_until_ms: Option<u64>) -> crate::Result<()> {
        let cp = snap.checkpoint();
        let result = (|| {
            for op in &self.ops {
                snap.apply(&self.node, *op)?;
            }
            snap.allocate(crate::cluster::Allocation {
                pod: demand.pod.clone(),
                node: self.node.clone(),
                cpu_milli: demand.cpu_milli,
                memory_mib: demand.memory_mib,
                grants: self.grants.clone(),
                priority: demand.priority,
                gang: demand.gang.as_ref().map(|g| g.name.clone()),
                reserved_until_ms,
                extended: demand.rules.extended.clone(),
            })
        })();
        match result {
            Ok(()) => snap.commit(cp),
            Err(_) => snap.rollback(cp),
        }
        result
    }
}

/// Milli-GPU a candidate takes from each GPU it touches (MIG by compute slices).
pub fn candidate_milli(node: &Node, c: &Candidate) -> u32 {
    c.grants
        .iter()
        .map(|g| match *g {
            Grant::Whole { .. } => MILLI_PER_GPU,
            Grant::Share { milli, .. } => milli,
            Grant::Mig { gpu, class, .. } => node
                .gpu(gpu)
                .and_then(|g| g.mig_product())
                .and_then(|p| {
                    let geom = p.geometry();
                    geom.profile(class)
                        .map(|pr| u32::from(pr.compute_slices) * MILLI_PER_GPU / u32::from(geom.compute_slices))
                })
                .unwrap_or(0),
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mig::ProfileClass;

    #[test]
    fn check_grants_accepts_what_the_demand_asks_for_and_nothing_else() {
        let node = Node::test("n").with_gpus(2, "H100-80GB").with_mig_at(1, &[("3g.40gb", 4)]);
        let whole = Demand::new("ns/w", GpuDemand::Whole { count: 1 });
        assert_eq!(check_grants(&node, &whole, &[Grant::Whole { gpu: 0 }], &[]), Ok(()));
        // More GPUs than asked, a GPU the node lacks, the same GPU twice.
        let three = [Grant::Whole { gpu: 0 }, Grant::Whole { gpu: 1 }];
        assert!(check_grants(&node, &whole, &three, &[]).is_err());
        assert!(check_grants(&node, &whole, &[Grant::Whole { gpu: 7 }], &[]).unwrap_err().contains("no GPU 7"));
        let twice = Demand::new("ns/w2", GpuDemand::Whole { count: 2 });
        let dup = [Grant::Whole { gpu: 0 }, Grant::Whole { gpu: 0 }];
        assert!(check_grants(&node, &twice, &dup, &[]).unwrap_err().contains("twice"));
        // A MIG profile: the right class only; steps only on the granted GPU.
        let mig = Demand::new("ns/m", GpuDemand::Mig { profile: "3g.40gb".into() });
        let g3 = Grant::Mig { gpu: 1, class: ProfileClass::G3, start: 4 };
        assert_eq!(check_grants(&node, &mig, &[g3], &[]), Ok(()));
        let g1 = Grant::Mig { gpu: 1, class: ProfileClass::G1, start: 0 };
        assert!(check_grants(&node, &mig, &[g1], &[]).is_err());
        let stray = MigOp::SetMode { gpu: 0, mode: GpuMode::Mig };
        assert!(check_grants(&node, &mig, &[g3], &[stray]).unwrap_err().contains("does not hold"));
        // A model fits a slice at least its size, or a whole GPU with the memory.
        let small = Demand::new("ns/s", GpuDemand::Model { memory_mib: 3000, compute_slices: None });
        assert_eq!(check_grants(&node, &small, &[g3], &[]), Ok(()));
        let big = Demand::new("ns/b", GpuDemand::Model { memory_mib: 60_000, compute_slices: None });
        assert!(check_grants(&node, &big, &[g3], &[]).is_err());
        assert_eq!(check_grants(&node, &big, &[Grant::Whole { gpu: 0 }], &[]), Ok(()));
        // Models and node constraints.
        let l4 = whole.clone().with_models(&["L4"]);
        assert!(check_grants(&node, &l4, &[Grant::Whole { gpu: 0 }], &[]).unwrap_err().contains("allowed model"));
        let hungry = whole.clone().with_cpu(1 << 40, 0);
        assert!(check_grants(&node, &hungry, &[Grant::Whole { gpu: 0 }], &[]).is_err());
        let cpu = Demand::new("ns/c", GpuDemand::None);
        assert_eq!(check_grants(&node, &cpu, &[], &[]), Ok(()));
        assert!(check_grants(&node, &cpu, &[Grant::Whole { gpu: 0 }], &[]).is_err());
    }

    #[test]
    fn a_device_plugin_demand_needs_a_node_whose_agent_reported() {
        let mut labelled = Node::test("n").with_gpus(2, "H100-80GB");
        labelled.device_plugin = false;
        let mut d = Demand::new("ns/p", GpuDemand::Whole { count: 1 });
        // NVIDIA-named: NVIDIA's plugin serves it, so the labels are enough.
        assert!(!quick_reject(&labelled, &d));
        assert_eq!(check_node(&labelled, &d), Ok(()));
        d.device_plugin = true;
        assert!(quick_reject(&labelled, &d));
        let r = check_node(&labelled, &d).unwrap_err();
        assert!(!r.is_unresolvable(), "retried once the agent reports");
        assert!(r.reason().contains("node agent has not reported"), "{r}");
        labelled.device_plugin = true;
        assert_eq!(check_node(&labelled, &d), Ok(()));
    }

    #[test]
    fn a_rejection_names_its_node_as_data_and_reads_as_before() {
        let node = Node::test("n7").with_gpus(1, "H100-80GB");
        let cpu = Demand::new("ns/c", GpuDemand::None).with_cpu(1 << 40, 0);
        let r = check_node(&node, &cpu).expect_err("too much cpu");
        assert_eq!(r.node(), Some(&NodeName::from("n7")));
        assert!(r.is_unresolvable());
        assert!(!r.cause().starts_with("node "), "{r}");
        assert_eq!(r.reason(), format!("node n7: {}", r.cause()));
        assert_eq!(r.to_string(), r.reason());
        // The serialised form is the kind and the whole text; reading it back reads the same.
        let json = serde_json::to_value(&r).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(json, serde_json::json!({ "kind": "unresolvable", "reason": r.reason() }));
        let back: Rejection = serde_json::from_value(json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((back.reason(), back.is_unresolvable(), back.node()), (r.reason(), true, None));
        let plain = Rejection::unschedulable("gang g: waiting");
        assert_eq!((plain.reason(), plain.to_string()), ("gang g: waiting".into(), "gang g: waiting".to_owned()));
        let json = serde_json::to_string(&plain).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(json, r#"{"kind":"unschedulable","reason":"gang g: waiting"}"#);
    }
}
