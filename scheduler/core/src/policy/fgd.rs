//! FGD (Fragmentation Gradient Descent, Weng et al., ATC '23): place where the expected
//! fragmentation of the target workload grows least. Node score
//! `floor(100 · sigmoid((F_before − F_after) / 1000))`, as the artifact computes it; inside
//! the node, the GPU with the best (integer) score, lowest index first.

use super::baselines::{MAX_NODE_SCORE, first_fit_position, node_of};
use super::{Context, Policy, Score};
use crate::cluster::Node;
use crate::cluster::Snapshot;
use crate::demand::Demand;
use crate::metrics::{GpuView, node_fragmentation, node_model, views, views_after};
use crate::placement::Candidate;

#[derive(Debug, Clone, Copy, Default)]
pub struct Fgd;

pub(crate) fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// The node's fragmentation before any candidate (all candidates of one call share a node).
pub(crate) fn frag_before(snap: &Snapshot, c: &Candidate, ctx: &Context<'_>) -> f64 {
    let node = node_of(snap, c);
    node_fragmentation(&views(node), node.free_cpu_milli(), node_model(node), ctx.workload)
}

/// `F_before − F_after` for a candidate, in milli-GPU (positive = less fragmentation).
pub(crate) fn frag_gain(snap: &Snapshot, d: &Demand, c: &Candidate, ctx: &Context<'_>, before: f64) -> f64 {
    let node = node_of(snap, c);
    frag_gain_with(node, d, &views_after(node, c), ctx, before)
}

/// [`frag_gain`] given the node's views after the candidate.
pub(crate) fn frag_gain_with(node: &Node, d: &Demand, after: &[GpuView<'_>], ctx: &Context<'_>, before: f64) -> f64 {
    let after_cpu = node.free_cpu_milli().saturating_sub(d.cpu_milli);
    let after = node_fragmentation(after, after_cpu, node_model(node), ctx.workload);
    before - after
}

impl Policy for Fgd {
    fn name(&self) -> &'static str {
        "fgd"
    }
    fn score(&self, snap: &Snapshot, d: &Demand, c: &Candidate, ctx: &Context<'_>) -> Score {
        self.score_with(snap, d, c, ctx, frag_before(snap, c, ctx))
    }

    fn score_node(&self, snap: &Snapshot, d: &Demand, cands: &[Candidate], ctx: &Context<'_>, out: &mut Vec<Score>) {
        let Some(first) = cands.first() else { return };
        let before = frag_before(snap, first, ctx);
        out.extend(cands.iter().map(|c| self.score_with(snap, d, c, ctx, before)));
    }
}

impl Fgd {
    fn score_with(&self, snap: &Snapshot, d: &Demand, c: &Candidate, ctx: &Context<'_>, before: f64) -> Score {
        let s = (sigmoid(frag_gain(snap, d, c, ctx, before) / 1000.0) * MAX_NODE_SCORE).floor();
        Score::new(s, s * 1000.0 - first_fit_position(c) as f64)
    }
}
