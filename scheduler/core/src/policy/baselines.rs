//! The baselines tessera is compared against, as the FGD paper (ATC '23) and its simulator
//! define them, plus first-fit (what MIG-capable schedulers do today).
//!
//! The FGD artifact scores nodes with integers in 0..=100 and lets kube-scheduler pick at
//! random among the best; the integer truncation is kept here (`floor`) because it decides how
//! often that random pick happens, and so the numbers the baselines reach.

use super::{Context, Policy, Score, hash_str, mix};
use crate::cluster::{Grant, MILLI_PER_GPU, Node, Snapshot};
use crate::demand::{Demand, GpuDemand};
use crate::placement::{Candidate, candidate_milli};

/// kube-scheduler's `MaxNodeScore`.
pub(crate) const MAX_NODE_SCORE: f64 = 100.0;

pub(crate) fn node_of<'a>(snap: &'a Snapshot, c: &Candidate) -> &'a Node {
    &snap.nodes()[c.node]
}

/// Free milli-GPU of the GPU a single-GPU candidate uses (before placement).
pub(crate) fn gpu_free_milli(node: &Node, c: &Candidate) -> u32 {
    c.grants.first().and_then(|g| node.gpu(g.gpu())).map_or(0, |g| g.free_milli())
}

/// Sum of free milli-GPU on a node (non-MIG GPUs by shares; MIG GPUs by free compute).
pub(crate) fn node_free_milli(node: &Node) -> u32 {
    node.gpus.iter().filter(|g| g.healthy).map(|g| MILLI_PER_GPU - g.allocated_milli().min(MILLI_PER_GPU)).sum()
}

/// Device tie-break shared by the baselines: the fullest GPU that fits (least free after),
/// then the lowest index and start.
pub(crate) fn best_fit_device(node: &Node, c: &Candidate) -> f64 {
    let free = gpu_free_milli(node, c) as f64;
    let pos = first_fit_position(c) as f64;
    -free * 1000.0 - pos - c.ops.len() as f64 * 1e7
}

/// Lowest GPU index, then lowest slice start.
pub(crate) fn first_fit_position(c: &Candidate) -> u32 {
    c.grants
        .first()
        .map(|g| match *g {
            Grant::Mig { gpu, start, .. } => gpu * 8 + u32::from(start),
            other => other.gpu() * 8,
        })
        .unwrap_or(0)
}

/// Lowest node, lowest GPU index, lowest start; existing instances before new ones at the same
/// position.
#[derive(Debug, Clone, Copy, Default)]
pub struct FirstFit;

impl Policy for FirstFit {
    fn name(&self) -> &'static str {
        "first-fit"
    }
    fn score(&self, _snap: &Snapshot, _d: &Demand, c: &Candidate, _ctx: &Context<'_>) -> Score {
        Score::new(-(c.node as f64), -(first_fit_position(c) as f64) - c.ops.len() as f64 * 0.1)
    }
}

/// A seeded random node and device.
#[derive(Debug, Clone, Copy, Default)]
pub struct Random;

impl Policy for Random {
    fn name(&self) -> &'static str {
        "random"
    }
    fn memoizable(&self) -> bool {
        false
    }
    fn score(&self, snap: &Snapshot, d: &Demand, c: &Candidate, ctx: &Context<'_>) -> Score {
        // A fresh uniform pick per pod: node and device from a seeded hash of (pod, node, GPU).
        random_score(node_draw(pod_salt(ctx.seed, &d.pod.0), &node_of(snap, c).name.0), c)
    }

    fn score_node(&self, snap: &Snapshot, d: &Demand, cands: &[Candidate], ctx: &Context<'_>, out: &mut Vec<Score>) {
        let Some(first) = cands.first() else { return };
        let node = node_draw(pod_salt(ctx.seed, &d.pod.0), &node_of(snap, first).name.0);
        out.extend(cands.iter().map(|c| random_score(node, c)));
    }
}

/// `hash_str(seed, pod)`, remembered for the last pod: one decision scores every node for the
/// same pod, and hashing its name byte by byte per node was most of `random`'s time.
fn pod_salt(seed: u64, pod: &str) -> u64 {
    thread_local! {
        static LAST: std::cell::RefCell<(u64, String, u64)> = const { std::cell::RefCell::new((0, String::new(), 0)) };
    }
    LAST.with_borrow_mut(|(s, p, h)| {
        if *s != seed || p != pod || p.is_empty() {
            (*s, *h) = (seed, hash_str(seed, pod));
            pod.clone_into(p);
        }
        *h
    })
}

/// The pod's draw for a node: its name folded 8 bytes at a time (a decision hashes every
/// node's name), mixed with the pod's salt.
fn node_draw(salt: u64, name: &str) -> u64 {
    let words = name.as_bytes().chunks(8).map(|w| w.iter().rev().fold(0u64, |x, &b| x << 8 | u64::from(b)));
    mix(words.fold(salt, |h, w| mix(h ^ w)))
}

fn random_score(node: u64, c: &Candidate) -> Score {
    let dev = mix(node ^ u64::from(first_fit_position(c)));
    Score::new((node >> 11) as f64, (dev >> 11) as f64)
}

/// Best fit over (cpu, GPU): the node whose free resources, after placement, are smallest
/// relative to the largest node (weights 0.5/0.5).
#[derive(Debug, Clone, Copy, Default)]
pub struct BestFit;

impl Policy for BestFit {
    fn name(&self) -> &'static str {
        "bestfit"
    }
    fn score(&self, snap: &Snapshot, d: &Demand, c: &Candidate, _ctx: &Context<'_>) -> Score {
        let node = node_of(snap, c);
        let spec = MaxSpec::of(snap);
        let free_cpu = node.free_cpu_milli() as f64 - d.cpu_milli as f64;
        let free_gpu = node_free_milli(node) as f64 - candidate_milli(node, c) as f64;
        let s = 0.5 * free_cpu / spec.cpu + 0.5 * free_gpu / spec.gpu;
        Score::new(((1.0 - s) * MAX_NODE_SCORE).floor(), best_fit_device(node, c))
    }
}

/// Largest node capacities in the cluster, to normalise resource vectors.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MaxSpec {
    pub cpu: f64,
    pub gpu: f64,
}

impl MaxSpec {
    pub fn of(snap: &Snapshot) -> Self {
        let cpu = snap.max_node_cpu_milli().max(1) as f64;
        let gpu = snap.max_node_gpus().max(1) as f64 * MILLI_PER_GPU as f64;
        Self { cpu, gpu }
    }
}

/// GPU packing: prefer GPUs already shared, then free GPUs on used nodes, then empty nodes.
#[derive(Debug, Clone, Copy, Default)]
pub struct GpuPacking;

impl Policy for GpuPacking {
    fn name(&self) -> &'static str {
        "gpu-packing"
    }
    fn score(&self, snap: &Snapshot, _d: &Demand, c: &Candidate, _ctx: &Context<'_>) -> Score {
        let node = node_of(snap, c);
        let dev = best_fit_device(node, c);
        if c.grants.is_empty() {
            return Score::new(0.0, dev);
        }
        let fully_free = node.gpus.iter().filter(|g| g.is_unused()).count() as f64;
        if fully_free as usize == node.gpus.len() {
            return Score::new(((MAX_NODE_SCORE / 3.0).floor() - fully_free).max(fully_free), dev);
        }
        let uses_free = c.grants.iter().filter(|g| node.gpu(g.gpu()).is_some_and(|x| x.is_unused())).count() as f64;
        if uses_free > 0.0 {
            return Score::new(((MAX_NODE_SCORE / 2.0).floor() - uses_free).max((MAX_NODE_SCORE / 3.0).floor()), dev);
        }
        let free_pct: f64 = c
            .grants
            .iter()
            .filter_map(|g| node.gpu(g.gpu()))
            .map(|g| (u64::from(g.free_milli()) * 100 / u64::from(MILLI_PER_GPU)) as f64)
            .sum();
        Score::new((MAX_NODE_SCORE - (free_pct / 10.0).floor()).max((MAX_NODE_SCORE / 2.0).floor()), dev)
    }
}

/// GPU clustering: put pods with the same GPU request shape together.
#[derive(Debug, Clone, Copy, Default)]
pub struct GpuClustering;

/// The affinity tag of a demand, as the artifact's `gpu-affinity`: `share-gpu` for any
/// fractional request, `<n>-gpu` for whole GPUs (MIG counts as sharing).
fn affinity_tag(gpu: &GpuDemand) -> Option<String> {
    match gpu {
        GpuDemand::None => None,
        GpuDemand::Share { .. } | GpuDemand::Mig { .. } | GpuDemand::Model { .. } => Some("share-gpu".to_owned()),
        GpuDemand::Whole { count } => Some(format!("{count}-gpu")),
    }
}

fn grant_tag(snap: &Snapshot, pod: &crate::cluster::PodKey) -> Option<String> {
    let a = snap.allocation(pod)?;
    match a.grants.as_slice() {
        [] => None,
        [Grant::Share { .. }] | [Grant::Mig { .. }] => Some("share-gpu".to_owned()),
        many => Some(format!("{}-gpu", many.len())),
    }
}

impl Policy for GpuClustering {
    fn name(&self) -> &'static str {
        "gpu-clustering"
    }
    fn score(&self, snap: &Snapshot, d: &Demand, c: &Candidate, _ctx: &Context<'_>) -> Score {
        let node = node_of(snap, c);
        let dev = best_fit_device(node, c);
        let Some(tag) = affinity_tag(&d.gpu) else { return Score::new(0.0, dev) };
        let spec_gpu = MaxSpec::of(snap).gpu;
        let used = (spec_gpu - node_free_milli(node) as f64).max(0.0);
        let quarter = MAX_NODE_SCORE / 4.0;
        // The artifact's integer arithmetic: 25 * (8000 - left) / 8000, truncated.
        let fill = (quarter * used / spec_gpu).floor();
        let tags: std::collections::BTreeSet<String> = node.pods().iter().filter_map(|p| grant_tag(snap, p)).collect();
        let band = match (tags.contains(&tag), tags.len()) {
            (true, 1) => 3.0,
            (true, _) => 2.0,
            (false, 0) => 1.0,
            (false, _) => 0.0,
        };
        Score::new(fill + band * quarter, dev)
    }
}

/// Tetris-style alignment: the smallest dot product between the node's free resources and the
/// request (both normalised by the node's capacity), per GPU.
#[derive(Debug, Clone, Copy, Default)]
pub struct DotProd;

impl Policy for DotProd {
    fn name(&self) -> &'static str {
        "dotprod"
    }
    fn score(&self, snap: &Snapshot, d: &Demand, c: &Candidate, _ctx: &Context<'_>) -> Score {
        let node = node_of(snap, c);
        let spec = MaxSpec::of(snap);
        // The paper's configuration: one merged (cpu, total GPU) vector, normalised by the
        // largest node; the smaller the dot product, the higher the score.
        let nv = [node.free_cpu_milli() as f64 / spec.cpu, node_free_milli(node) as f64 / spec.gpu];
        let pv = [d.cpu_milli as f64 / spec.cpu, candidate_milli(node, c) as f64 / spec.gpu];
        let dot = (nv[0] * pv[0] + nv[1] * pv[1]) / 2.0;
        Score::new((MAX_NODE_SCORE * (1.0 - dot)).floor(), best_fit_device(node, c))
    }
}
