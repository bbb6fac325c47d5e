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
//! − RECONFIG_COST · steps   MIG steps: mode switches, instance creations and destructions
//! − PACK · free left        among equals, the fuller GPU
//! − 2 · oversize            compute granted beyond the smallest fitting profile (a model
//!                           taking a larger free MIG instance as is)
//! ```
//!
//! Why: the openb replay shows the free capacity left at the end is mostly GPUs stranded on
//! nodes whose cpu ran out, and FGD's measure sees cpu only as a yes/no per demand class. See
//! `docs/algorithms.md`.

use super::baselines::{first_fit_position, node_of};
use super::fgd::Before;
use super::{Context, Policy, Score};
use crate::cluster::{Node, Snapshot};
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
/// Milli-GPU of score per milli-GPU of compute a model-sized demand is granted beyond its
/// smallest fitting profile. Fragmentation alone rewards a small model taking a large free
/// instance (less free capacity, less fragment); under churn that starves the large profiles.
const OVERSIZE_WEIGHT: f64 = 2.0;

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
        self.score_with(d, c, ctx, &Before::of(node_of(snap, c), ctx), cpu_per_gpu(ctx))
    }

    fn score_node(&self, snap: &Snapshot, d: &Demand, cands: &[Candidate], ctx: &Context<'_>, out: &mut Vec<Score>) {
        let Some(first) = cands.first() else { return };
        let before = Before::of(node_of(snap, first), ctx);
        let ratio = cpu_per_gpu(ctx);
        out.extend(cands.iter().map(|c| self.score_with(d, c, ctx, &before, ratio)));
    }
}

/// Milli-GPU of compute granted beyond what a model-sized demand needs (a larger free MIG
/// instance taken as is).
fn oversize(node: &Node, d: &Demand, c: &Candidate) -> u32 {
    let GpuDemand::Model { memory_mib, compute_slices } = d.gpu else { return 0 };
    c.grants
        .iter()
        .filter_map(|g| match *g {
            crate::cluster::Grant::Mig { gpu, class, .. } => {
                let geom = node.gpu(gpu)?.mig_product()?.geometry();
                let got = geom.profile(class)?.compute_slices;
                let need = crate::demand::smallest_fitting_profile(geom, memory_mib, compute_slices)?.compute_slices;
                Some(
                    u32::from(got.saturating_sub(need)) * crate::cluster::MILLI_PER_GPU
                        / u32::from(geom.compute_slices),
                )
            }
            _ => None,
        })
        .sum()
}

impl Tessera {
    fn score_with(&self, d: &Demand, c: &Candidate, ctx: &Context<'_>, before: &Before<'_>, ratio: f64) -> Score {
        let node = before.node;
        let after = before.after(c);
        let gain = if ctx.workload.is_empty() { 0.0 } else { before.gain(d, c, &after, ctx) };
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
        // Every step counts: each is a driver call that briefly blocks the GPU's other tenants.
        let steps = c.ops.len() as f64;
        let s = gain + BALANCE_WEIGHT * balance
            - RECONFIG_COST * steps
            - PACK_WEIGHT * touched_free
            - OVERSIZE_WEIGHT * f64::from(oversize(node, d, c));
        Score::new(s, s - 1e-6 * f64::from(first_fit_position(c)))
    }
}
