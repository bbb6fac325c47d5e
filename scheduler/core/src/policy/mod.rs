//! Placement policies behind one trait, and the pure entry points that use them.
//!
//! A policy only ranks [`Candidate`]s produced by [`crate::placement`]; the fixed pipeline here
//! filters nodes, asks the policy for a [`Score`] per candidate, keeps each node's best, picks
//! the best node (ties broken by a seeded hash, like kube-scheduler's random pick among equals),
//! and returns data.

mod baselines;
mod fgd;
mod memo;
mod tessera;
mod twins;

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::cluster::{NodeName, Snapshot};
use crate::demand::{Demand, GpuDemand};
use crate::placement::{Candidate, Placement, Rejection, node_candidates};

pub use baselines::{BestFit, DotProd, FirstFit, GpuClustering, GpuPacking, Random};
pub use fgd::Fgd;
pub use memo::{Memo, NameCursor, demand_shape, evaluate_memo, evaluate_memo_offered, place_memo};
pub use tessera::Tessera;

/// Every policy name, ours first.
pub const NAMES: &[&str] =
    &["tessera", "fgd", "bestfit", "gpu-packing", "gpu-clustering", "dotprod", "random", "first-fit"];

/// Looks a policy up by name.
pub fn by_name(name: &str) -> Option<Box<dyn Policy>> {
    Some(match name {
        "tessera" => Box::new(Tessera),
        "fgd" => Box::new(Fgd),
        "bestfit" => Box::new(BestFit),
        "gpu-packing" => Box::new(GpuPacking),
        "gpu-clustering" => Box::new(GpuClustering),
        "dotprod" => Box::new(DotProd),
        "random" => Box::new(Random),
        "first-fit" => Box::new(FirstFit),
        _ => return None,
    })
}

/// How a policy ranks one candidate. Nodes are compared by `node` (the best of their
/// candidates); inside the chosen node, candidates are compared by `(node, device)`.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd, Default, Serialize, Deserialize)]
pub struct Score {
    pub node: f64,
    pub device: f64,
}

impl Score {
    pub fn new(node: f64, device: f64) -> Self {
        Self { node, device }
    }
}

/// One shape of demand and how often it is expected.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkloadClass {
    pub cpu_milli: u64,
    pub gpu: GpuDemand,
    /// Allowed GPU models (empty = any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpu_models: Vec<String>,
    /// Fraction of expected demand (the classes' weights sum to 1).
    pub weight: f64,
}

/// The expected demand mix (FGD's "target workload"): popularity of recent demand shapes.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Workload {
    pub classes: Vec<WorkloadClass>,
    /// The distinct GPU demands among `classes`, worked out on first use: fragmentation is
    /// computed once per distinct demand, not once per class (many classes differ only in cpu).
    #[serde(skip)]
    kinds: std::sync::OnceLock<Kinds>,
    /// Per class: its share of the expected GPU request when it needs whole GPUs, else 0
    /// ([`Workload::whole_request_weights`]).
    #[serde(skip)]
    whole: std::sync::OnceLock<Vec<f64>>,
}

impl PartialEq for Workload {
    fn eq(&self, other: &Self) -> bool {
        self.classes == other.classes
    }
}

/// Distinct GPU demands of a workload, and each class's position among them.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Kinds {
    pub gpu: Vec<GpuDemand>,
    pub of_class: Vec<usize>,
}

impl Workload {
    pub fn new(classes: Vec<WorkloadClass>) -> Self {
        Self { classes, kinds: Default::default(), whole: Default::default() }
    }

    pub(crate) fn kinds(&self) -> &Kinds {
        self.kinds.get_or_init(|| {
            let mut k = Kinds::default();
            for c in &self.classes {
                let i = k.gpu.iter().position(|g| *g == c.gpu).unwrap_or_else(|| {
                    k.gpu.push(c.gpu.clone());
                    k.gpu.len() - 1
                });
                k.of_class.push(i);
            }
            k
        })
    }

    /// Popularity of `(cpu, gpu, models)` shapes among `demands`, most popular first (equal
    /// counts: larger shape first).
    pub fn from_demands<'a>(demands: impl IntoIterator<Item = &'a Demand>) -> Self {
        Self::from_demands_top(demands, 1.0)
    }

    /// Like [`Workload::from_demands`], keeping only the most popular shapes that together
    /// cover `coverage` (0..=1) of the demands, weights renormalised (FGD keeps 95%).
    pub fn from_demands_top<'a>(demands: impl IntoIterator<Item = &'a Demand>, coverage: f64) -> Self {
        // Counts as weights of 1: sums stay exact, so the shapes and weights are the counts'.
        Self::from_weighted_top(demands.into_iter().map(|d| (d, 1.0)), coverage)
    }

    /// Like [`Workload::from_demands_top`] with a weight per demand (a decaying window of
    /// recent arrivals weighs each by its age); demands of weight 0 or less are left out.
    pub fn from_weighted_top<'a>(demands: impl IntoIterator<Item = (&'a Demand, f64)>, coverage: f64) -> Self {
        type Key = (u64, GpuDemand, Vec<String>);
        let mut counts: std::collections::HashMap<Key, f64> = Default::default();
        let mut total = 0.0;
        for (d, w) in demands {
            if w > 0.0 {
                *counts.entry((d.cpu_milli, d.gpu.clone(), d.gpu_models.clone())).or_default() += w;
                total += w;
            }
        }
        let mut ranked: Vec<(Key, f64)> = counts.into_iter().collect();
        ranked.sort_by(|(ka, a), (kb, b)| {
            b.total_cmp(a)
                .then_with(|| kb.0.cmp(&ka.0))
                .then_with(|| kb.1.nominal_milli().cmp(&ka.1.nominal_milli()))
                .then_with(|| kb.2.cmp(&ka.2))
                .then_with(|| format!("{:?}", kb.1).cmp(&format!("{:?}", ka.1)))
        });
        let need = coverage.clamp(0.0, 1.0) * total;
        let mut kept = Vec::new();
        let mut sum = 0.0;
        for (k, n) in ranked {
            if sum >= need && !kept.is_empty() {
                break;
            }
            sum += n;
            kept.push((k, n));
        }
        let classes = kept
            .into_iter()
            .map(|((cpu_milli, gpu, gpu_models), n)| WorkloadClass { cpu_milli, gpu, gpu_models, weight: n / sum })
            .collect();
        Self::new(classes)
    }

    pub fn is_empty(&self) -> bool {
        self.classes.is_empty()
    }

    /// Per class, its share of the expected GPU request if it needs whole GPUs (`Whole`, or a
    /// model no slice of an 80 GB-or-smaller MIG product holds), else 0. Popularity counts pods: a
    /// 34B model that is 2% of the arrivals is a tenth of the GPUs they ask for, and it is the
    /// one that cannot use a slice.
    pub(crate) fn whole_request_weights(&self) -> &[f64] {
        self.whole.get_or_init(|| {
            let size: Vec<(f64, bool)> = self.classes.iter().map(|c| gpu_size(&c.gpu)).collect();
            let total: f64 = self.classes.iter().zip(&size).map(|(c, (g, _))| c.weight * g).sum();
            self.classes
                .iter()
                .zip(&size)
                .map(|(c, &(g, whole))| if whole && total > 0.0 { c.weight * g / total } else { 0.0 })
                .collect()
        })
    }
}

/// A demand's size in GPUs (MIG-sized ones by the smallest share of a GPU any product gives
/// them; a whole GPU for a model too large for the slices of 80 GB-class products), and whether
/// it needs whole GPUs.
fn gpu_size(g: &GpuDemand) -> (f64, bool) {
    use crate::mig::MigProduct;
    let sub = |f: &dyn Fn(&crate::mig::Geometry) -> Option<&'static crate::mig::Profile>| {
        MigProduct::ALL
            .iter()
            .filter_map(|p| {
                let geom = p.geometry();
                f(geom).map(|pr| f64::from(pr.compute_slices) / f64::from(geom.compute_slices))
            })
            .fold(None, |a: Option<f64>, x| Some(a.map_or(x, |a| a.min(x))))
    };
    match g {
        GpuDemand::None => (0.0, false),
        GpuDemand::Share { milli } => (f64::from(*milli) / 1000.0, false),
        GpuDemand::Whole { count } => (f64::from(*count), true),
        GpuDemand::Mig { profile } => (sub(&|geom| geom.profile_by_name(profile)).unwrap_or(1.0), false),
        GpuDemand::Model { memory_mib, compute_slices } => {
            // Large: no slice of any MIG product of 80 GB or less holds it (bigger boards slice
            // such models, but a fleet of them is not what whole-GPU headroom is about).
            let somewhere_whole = MigProduct::ALL
                .iter()
                .filter(|p| p.geometry().memory_mib <= 81_920)
                .all(|p| crate::demand::smallest_fitting_profile(p.geometry(), *memory_mib, *compute_slices).is_none());
            if somewhere_whole {
                (1.0, true)
            } else {
                (
                    sub(&|geom| crate::demand::smallest_fitting_profile(geom, *memory_mib, *compute_slices))
                        .unwrap_or(1.0),
                    false,
                )
            }
        }
    }
}

/// Inputs a decision may use besides the snapshot: the expected workload and a seed.
#[derive(Clone, Copy, Debug)]
pub struct Context<'a> {
    pub workload: &'a Workload,
    pub seed: u64,
}

/// A placement policy: ranks feasible candidates, higher is better.
pub trait Policy: fmt::Debug + Send + Sync {
    fn name(&self) -> &'static str;
    fn score(&self, snap: &Snapshot, demand: &Demand, cand: &Candidate, ctx: &Context<'_>) -> Score;

    /// Whether scores depend only on the node's state, the demand's shape, the workload, the
    /// seed and the cluster's largest node — not on the pod's identity — so verdicts can be
    /// memoised across decisions ([`Memo`]).
    fn memoizable(&self) -> bool {
        true
    }

    /// Whether a node's verdict follows from its GPUs, cpu, memory and interconnect alone
    /// (after its node-level checks): then nodes in equal states share one evaluation per
    /// decision (`twins`). Not for scores that read the node's name or its pods.
    fn twins(&self) -> bool {
        false
    }

    /// Scores all candidates of one node into `out` (same order). Policies whose score has a
    /// per-node part override this to compute it once.
    fn score_node(
        &self,
        snap: &Snapshot,
        demand: &Demand,
        cands: &[Candidate],
        ctx: &Context<'_>,
        out: &mut Vec<Score>,
    ) {
        out.extend(cands.iter().map(|c| self.score(snap, demand, c, ctx)));
    }
}

/// A node's verdict for one demand.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeVerdict {
    pub node: NodeName,
    pub outcome: Result<(Candidate, Score), Rejection>,
}

/// Filters and scores every node (or the named ones), in node-name order.
pub fn evaluate(
    snap: &Snapshot,
    demand: &Demand,
    policy: &dyn Policy,
    ctx: &Context<'_>,
    only: Option<&[NodeName]>,
) -> Result<Vec<NodeVerdict>, crate::Error> {
    demand.validate()?;
    Ok(match only {
        None => evaluate_at(snap, demand, policy, ctx, 0..snap.nodes().len()),
        Some(names) => {
            let mut out = Vec::with_capacity(names.len());
            for name in names {
                match snap.node_index(name) {
                    Some(ni) => out.extend(evaluate_at(snap, demand, policy, ctx, std::iter::once(ni))),
                    None => out.push(NodeVerdict {
                        node: name.clone(),
                        outcome: Err(Rejection::unresolvable("unknown to tessera").at_node(name.clone())),
                    }),
                }
            }
            out
        }
    })
}

/// [`evaluate`] over node indices (the demand is already validated).
pub(crate) fn evaluate_at(
    snap: &Snapshot,
    demand: &Demand,
    policy: &dyn Policy,
    ctx: &Context<'_>,
    indices: impl Iterator<Item = usize>,
) -> Vec<NodeVerdict> {
    let mut cands = Vec::new();
    let mut scores = Vec::new();
    let mut twins = twins::Twins::default();
    indices
        .map(|ni| NodeVerdict {
            node: snap.nodes()[ni].name.clone(),
            outcome: twins.verdict(snap, ni, demand, policy, ctx, &mut cands, &mut scores),
        })
        .collect()
}

/// One node's verdict: its best candidate and score, or why it has none. `cands` and
/// `scores` are scratch buffers, reused across calls.
pub(crate) fn node_verdict(
    snap: &Snapshot,
    ni: usize,
    demand: &Demand,
    policy: &dyn Policy,
    ctx: &Context<'_>,
    cands: &mut Vec<Candidate>,
    scores: &mut Vec<Score>,
) -> Result<(Candidate, Score), Rejection> {
    cands.clear();
    scores.clear();
    node_candidates(snap, ni, demand, cands)?;
    policy.score_node(snap, demand, cands, ctx, scores);
    let (i, s) = best_candidate(scores);
    Ok((cands.swap_remove(i), s))
}

/// The position and score of a node's best candidate: highest `(node, device)`, the first
/// of equals.
pub(crate) fn best_candidate(scores: &[Score]) -> (usize, Score) {
    let mut best: Option<(usize, Score)> = None;
    for (i, &s) in scores.iter().enumerate() {
        if best.is_none_or(|(_, b)| (s.node, s.device) > (b.node, b.device)) {
            best = Some((i, s));
        }
    }
    best.unwrap_or((0, Score::default()))
}

/// A 64-bit mix for seeded tie-breaks (SplitMix64 finaliser).
pub(crate) fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

pub(crate) fn hash_str(seed: u64, s: &str) -> u64 {
    s.bytes().fold(mix(seed), |h, b| mix(h ^ u64::from(b)))
}

/// Picks the best verdict: highest node score. Equal scores go to the first node of a fixed,
/// seeded permutation of node names, so ties keep landing on the same nodes (which packs)
/// rather than being spread at random: the behaviour of the FGD paper's simulator, whose
/// nodes are listed in a seeded random order.
pub fn choose<'a>(verdicts: &'a [NodeVerdict], ctx: &Context<'_>) -> Option<&'a NodeVerdict> {
    let salt = mix(ctx.seed);
    let mut best: Option<(&NodeVerdict, f64)> = None;
    for v in verdicts {
        let Ok((_, s)) = &v.outcome else { continue };
        // The order hash is computed only on ties.
        let better = match best {
            None => true,
            Some((b, bs)) => s.node > bs || s.node == bs && hash_str(salt, &v.node.0) > hash_str(salt, &b.node.0),
        };
        if better {
            best = Some((v, s.node));
        }
    }
    best.map(|(v, _)| v)
}

/// Places one demand: the best candidate over all nodes, or one rejection that explains why
/// none fits. Nodes that certainly cannot host the demand are skipped without building their
/// reasons; the reasons are built only when no node fits.
pub fn place(snap: &Snapshot, demand: &Demand, policy: &dyn Policy, ctx: &Context<'_>) -> Result<Placement, Rejection> {
    demand.validate().map_err(|e| Rejection::unresolvable(e.to_string()))?;
    let n = snap.nodes().len();
    let open: Vec<bool> = snap.nodes().iter().map(|node| !crate::placement::quick_reject(node, demand)).collect();
    let verdicts = evaluate_at(snap, demand, policy, ctx, (0..n).filter(|&i| open[i]));
    if let Some(NodeVerdict { node, outcome: Ok((c, s)) }) = choose(&verdicts, ctx) {
        return Ok(Placement { node: node.clone(), grants: c.grants.to_vec(), ops: c.ops.clone(), score: s.node });
    }
    // Every open node refused and says why: explain the skipped ones too, in node order.
    let mut skipped = evaluate_at(snap, demand, policy, ctx, (0..n).filter(|&i| !open[i])).into_iter();
    let mut refused = verdicts.into_iter();
    let all: Vec<NodeVerdict> = open.iter().filter_map(|&o| if o { refused.next() } else { skipped.next() }).collect();
    Err(summarize(demand, &all))
}

/// One rejection for the whole cluster, kube-scheduler style: "0/N nodes fit ...".
pub fn summarize(demand: &Demand, verdicts: &[NodeVerdict]) -> Rejection {
    summarize_rejections(demand, verdicts.len(), verdicts.iter().filter_map(|v| v.outcome.as_ref().err()))
}

/// [`summarize`] over the rejections of `nodes` nodes.
pub(crate) fn summarize_rejections<'a>(
    demand: &Demand,
    nodes: usize,
    rejections: impl Iterator<Item = &'a Rejection>,
) -> Rejection {
    let mut msg = format!("0/{nodes} nodes can host {} ({})", demand.pod, demand.gpu);
    let (mut count, mut all_never) = (0usize, true);
    for r in rejections {
        if count < 3 {
            use std::fmt::Write;
            let _ = write!(msg, "; {r}");
        }
        count += 1;
        all_never &= r.is_unresolvable();
    }
    if count > 3 {
        msg.push_str(&format!("; and {} more", count - 3));
    }
    if count > 0 && all_never { Rejection::unresolvable(msg) } else { Rejection::unschedulable(msg) }
}

/// Maps node scores to kube-scheduler's extender range 0..=10 (min-max over the feasible
/// nodes; all-equal scores give 10).
pub fn extender_scores(verdicts: &[NodeVerdict]) -> Vec<(NodeName, i64)> {
    let range = score_range(verdicts);
    verdicts
        .iter()
        .filter_map(|v| v.outcome.as_ref().ok().map(|(_, s)| (v.node.clone(), extender_score(range, s.node))))
        .collect()
}

/// [`extender_scores`] of the offered `names`, in their order (0 for a name whose verdict does
/// not fit), when `names` are the verdicts' nodes in order with only nodes that do not fit left
/// out: what kube-scheduler offers prioritize after a filter. No name is copied or hashed.
/// `None` when `names` are not covered so (then the scores over `verdicts` would not be the
/// offered nodes' scores).
pub fn extender_scores_covering(verdicts: &[NodeVerdict], names: &[NodeName]) -> Option<Vec<i64>> {
    let names: Vec<&str> = names.iter().map(|n| n.0.as_str()).collect();
    extender_scores_covering_names(verdicts, &names)
}

/// [`extender_scores_covering`] with the names as strings (borrowed from a request).
pub fn extender_scores_covering_names(verdicts: &[NodeVerdict], names: &[&str]) -> Option<Vec<i64>> {
    let range = score_range(verdicts);
    let mut out = Vec::with_capacity(names.len());
    let mut vs = verdicts.iter();
    for n in names {
        loop {
            let v = vs.next()?;
            if v.node.0 == *n {
                out.push(v.outcome.as_ref().map_or(0, |(_, s)| extender_score(range, s.node)));
                break;
            }
            if v.outcome.is_ok() {
                return None;
            }
        }
    }
    vs.all(|v| v.outcome.is_err()).then_some(out)
}

/// Lowest and highest node score among the verdicts that fit.
fn score_range(verdicts: &[NodeVerdict]) -> (f64, f64) {
    verdicts
        .iter()
        .filter_map(|v| v.outcome.as_ref().ok().map(|(_, s)| s.node))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), s| (lo.min(s), hi.max(s)))
}

fn extender_score((lo, hi): (f64, f64), s: f64) -> i64 {
    let v = if hi - lo < 1e-12 { 10.0 } else { 10.0 * (s - lo) / (hi - lo) };
    v.round().clamp(0.0, 10.0) as i64
}

#[cfg(test)]
mod tests;
