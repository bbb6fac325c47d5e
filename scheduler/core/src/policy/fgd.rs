//! FGD (Fragmentation Gradient Descent, Weng et al., ATC '23): place where the expected
//! fragmentation of the target workload grows least. Node score
//! `floor(100 · sigmoid((F_before − F_after) / 1000))`, as the artifact computes it; inside
//! the node, the GPU with the best (integer) score, lowest index first.

use super::baselines::{MAX_NODE_SCORE, first_fit_position, node_of};
use super::{Context, Policy, Score};
use crate::cluster::{Node, Snapshot};
use crate::demand::Demand;
use crate::metrics::{FragBase, GpuView, Views, apply_candidate, node_model, touched, views};
use crate::placement::Candidate;

#[derive(Debug, Clone, Copy, Default)]
pub struct Fgd;

pub(crate) fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// A node's fragmentation before any candidate, and what is needed to evaluate candidates.
pub(crate) struct Before<'a> {
    pub node: &'a Node,
    pub views: Views<'a>,
    pub base: FragBase,
    pub frag: f64,
}

impl<'a> Before<'a> {
    pub fn of(node: &'a Node, ctx: &Context<'_>) -> Self {
        let views = views(node);
        let base = FragBase::new(&views, ctx.workload);
        let frag = base.fragmentation(node.free_cpu_milli(), node_model(node), ctx.workload);
        Self { node, views, base, frag }
    }

    /// The node's GPU views after `c` (only the GPUs it touches differ from `views`).
    pub fn after(&self, c: &Candidate) -> Views<'a> {
        let mut vs = self.views.clone();
        apply_candidate(&mut vs, self.node, c);
        vs
    }

    /// `F_before − F_after` for a candidate whose views after placement are `after`, in
    /// milli-GPU (positive = less fragmentation). Only the GPUs the candidate touches are
    /// re-evaluated.
    pub fn gain(&self, d: &Demand, c: &Candidate, after: &[GpuView<'_>], ctx: &Context<'_>) -> f64 {
        let node = self.node;
        let touched = touched(node, c);
        let cpu = node.free_cpu_milli().saturating_sub(d.cpu_milli);
        self.frag - self.base.fragmentation_after(&self.views, after, &touched, cpu, node_model(node), ctx.workload)
    }
}

impl Policy for Fgd {
    fn name(&self) -> &'static str {
        "fgd"
    }

    fn twins(&self) -> bool {
        true
    }

    fn score(&self, snap: &Snapshot, d: &Demand, c: &Candidate, ctx: &Context<'_>) -> Score {
        self.score_with(d, c, ctx, &Before::of(node_of(snap, c), ctx))
    }

    fn score_node(&self, snap: &Snapshot, d: &Demand, cands: &[Candidate], ctx: &Context<'_>, out: &mut Vec<Score>) {
        let Some(first) = cands.first() else { return };
        let before = Before::of(node_of(snap, first), ctx);
        out.extend(cands.iter().map(|c| self.score_with(d, c, ctx, &before)));
    }
}

impl Fgd {
    fn score_with(&self, d: &Demand, c: &Candidate, ctx: &Context<'_>, before: &Before<'_>) -> Score {
        let gain = before.gain(d, c, &before.after(c), ctx);
        let s = (sigmoid(gain / 1000.0) * MAX_NODE_SCORE).floor();
        Score::new(s, s * 1000.0 - f64::from(first_fit_position(c)))
    }
}
