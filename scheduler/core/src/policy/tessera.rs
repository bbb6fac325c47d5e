//! tessera's policy: fragmentation-aware across whole GPUs, shares and MIG.
//!
//! The score of a candidate is the change in expected fragmentation of the workload on its
//! node (FGD's measure extended to MIG, at full precision rather than FGD's 0..100 integer
//! buckets), minus a cost per MIG reconfiguration step, plus small terms that pack onto
//! already-used GPUs and nodes so that empty GPUs and NVLink islands stay whole for the large
//! demands. See `docs/algorithms.md`.

use super::baselines::{first_fit_position, node_of};
use super::fgd::{frag_before, frag_gain};
use super::{Context, Policy, Score};
use crate::cluster::{MILLI_PER_GPU, MigOp, Snapshot};
use crate::demand::Demand;
use crate::metrics::{GpuView, views, views_after};
use crate::placement::Candidate;

#[derive(Debug, Clone, Copy, Default)]
pub struct Tessera;

/// Cost of one MIG create/mode step, in milli-GPU of fragmentation: reconfiguring is only
/// worth it when it saves more than a quarter GPU of expected fragmentation.
const RECONFIG_COST: f64 = 250.0;
/// Weight of packing onto fuller GPUs/nodes (tie-break scale).
const PACK_WEIGHT: f64 = 0.01;

impl Policy for Tessera {
    fn name(&self) -> &'static str {
        "tessera"
    }
    fn score(&self, snap: &Snapshot, d: &Demand, c: &Candidate, ctx: &Context<'_>) -> Score {
        let before = if ctx.workload.is_empty() { 0.0 } else { frag_before(snap, c, ctx) };
        self.score_with(snap, d, c, ctx, before)
    }

    fn score_node(&self, snap: &Snapshot, d: &Demand, cands: &[Candidate], ctx: &Context<'_>, out: &mut Vec<Score>) {
        let Some(first) = cands.first() else { return };
        let before = if ctx.workload.is_empty() { 0.0 } else { frag_before(snap, first, ctx) };
        out.extend(cands.iter().map(|c| self.score_with(snap, d, c, ctx, before)));
    }
}

impl Tessera {
    fn score_with(&self, snap: &Snapshot, d: &Demand, c: &Candidate, ctx: &Context<'_>, before: f64) -> Score {
        let node = node_of(snap, c);
        let gain = if ctx.workload.is_empty() { 0.0 } else { frag_gain(snap, d, c, ctx, before) };
        let steps = c.ops.iter().filter(|op| !matches!(op, MigOp::Destroy { .. })).count() as f64;
        let before: Vec<GpuView<'_>> = views(node);
        let after = views_after(node, c);
        // Whole idle GPUs left on the node, and the free capacity left on the GPUs touched.
        let idle_before = before.iter().filter(|v| v.idle()).count() as f64;
        let idle_after = after.iter().filter(|v| v.idle()).count() as f64;
        let touched_free: f64 = c
            .grants
            .iter()
            .filter_map(|g| node.gpus.iter().position(|x| x.index == g.gpu()))
            .map(|i| f64::from(after[i].free()))
            .sum();
        let node_free: f64 = after.iter().map(|v| f64::from(v.free())).sum();
        let total = (node.gpus.len().max(1) as u32 * MILLI_PER_GPU) as f64;
        let s = gain
            - RECONFIG_COST * steps
            - 100.0 * (idle_before - idle_after)
            - PACK_WEIGHT * (touched_free + node_free / total * 100.0);
        Score::new(s, s - 1e-6 * first_fit_position(c) as f64)
    }
}
