//! tessera's policy: fragmentation-aware across whole GPUs, shares and MIG, and balanced
//! between cpu and GPU.
//!
//! A candidate's score is, in milli-GPU:
//!
//! ```text
//! gain                      expected fragmentation removed on the node (FGD's measure, extended
//!                           to MIG by usable capacity), at full precision
//! + λ · balance             cpu/GPU balance (λ = 0.003): a GPU pod should leave the node's free cpu close to
//!                           what its free GPUs will need at the workload's cpu-per-GPU; a
//!                           cpu-only pod should go where cpu is in surplus, not eat the cpu
//!                           that GPUs on another node still need
//! − RECONFIG_COST · steps   MIG mode switches and instance creations
//! − PACK · free left        among equals, the fuller GPU
//! ```
//!
//! Why: the openb replay shows the free capacity left at the end is mostly GPUs stranded on
//! nodes whose cpu ran out, and FGD's measure sees cpu only as a yes/no per demand class. See
//! `docs/algorithms.md`.

use super::baselines::{first_fit_position, node_of};
use super::fgd::Before;
use super::{Context, Policy, Score};
use crate::cluster::{MigOp, Node, Snapshot};
use crate::demand::{Demand, GpuDemand};
use crate::placement::Candidate;

#[derive(Debug, Clone, Copy, Default)]
pub struct Tessera;

/// Cost of one MIG create/mode step, in milli-GPU of fragmentation: reconfiguring is only
/// worth it when it saves more than a quarter GPU of expected fragmentation.
const RECONFIG_COST: f64 = 250.0;
/// Milli-GPU of score per milli-core of cpu imbalance.
const BALANCE_WEIGHT: f64 = 0.003;
/// Milli-GPU of score per milli-GPU left free on the GPUs a candidate touches.
const PACK_WEIGHT: f64 = 0.001;

/// Expected cpu (milli-cores) per GPU of the workload's GPU demand; 0 when unknown.
fn cpu_per_gpu(ctx: &Context<'_>) -> f64 {
    let (mut cpu, mut gpu) = (0.0, 0.0);
    for m in &ctx.workload.classes {
        let g = f64::from(m.gpu.nominal_milli()) / 1000.0;
        if g > 0.0 {
            cpu += m.weight * m.cpu_milli as f64;
            gpu += m.weight * g;
        }
    }
    if gpu > 0.0 { cpu / gpu } else { 0.0 }
}

impl Policy for Tessera {
    fn name(&self) -> &'static str {
        "tessera"
    }

    fn score(&self, snap: &Snapshot, d: &Demand, c: &Candidate, ctx: &Context<'_>) -> Score {
        let node = node_of(snap, c);
        self.score_with(node, d, c, ctx, &Before::of(node, ctx), cpu_per_gpu(ctx))
    }

    fn score_node(&self, snap: &Snapshot, d: &Demand, cands: &[Candidate], ctx: &Context<'_>, out: &mut Vec<Score>) {
        let Some(first) = cands.first() else { return };
        let node = node_of(snap, first);
        let before = Before::of(node, ctx);
        let ratio = cpu_per_gpu(ctx);
        out.extend(cands.iter().map(|c| self.score_with(node, d, c, ctx, &before, ratio)));
    }
}

impl Tessera {
    fn score_with<'a>(
        &self,
        node: &'a Node,
        d: &Demand,
        c: &Candidate,
        ctx: &Context<'_>,
        before: &Before<'a>,
        ratio: f64,
    ) -> Score {
        let after = before.after(node, c);
        let gain = if ctx.workload.is_empty() { 0.0 } else { before.gain(node, d, c, &after, ctx) };
        let node_free: f64 = after.iter().map(|v| f64::from(v.free())).sum();
        let touched_free: f64 = c
            .grants
            .iter()
            .filter_map(|g| node.gpus.iter().position(|x| x.index == g.gpu()))
            .map(|i| f64::from(after[i].free()))
            .sum();
        let balance = if ratio > 0.0 {
            let surplus = node.free_cpu_milli().saturating_sub(d.cpu_milli) as f64 - node_free / 1000.0 * ratio;
            if d.gpu == GpuDemand::None { surplus } else { -surplus.abs() }
        } else {
            0.0
        };
        let steps = c.ops.iter().filter(|op| !matches!(op, MigOp::Destroy { .. })).count() as f64;
        let s = gain + BALANCE_WEIGHT * balance - RECONFIG_COST * steps - PACK_WEIGHT * touched_free;
        Score::new(s, s - 1e-6 * f64::from(first_fit_position(c)))
    }
}
