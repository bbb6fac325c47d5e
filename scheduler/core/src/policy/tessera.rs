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

/// Milli-GPU of score per milli-GPU of whole-GPU room a slice takes from the large classes
/// the workload expects ([`headroom_loss`]). 1 already helps; from 3 on the churn scenarios'
/// large-model rejections stop falling.
const HEADROOM_WEIGHT: f64 = 3.0;

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

    fn twins(&self) -> bool {
        true
    }

    fn score(&self, snap: &Snapshot, d: &Demand, c: &Candidate, ctx: &Context<'_>) -> Score {
        let before = Before::of(node_of(snap, c), ctx);
        let headroom = Headroom::of(before.node, &before, d, ctx);
        self.score_with(d, c, ctx, &before, &headroom, cpu_per_gpu(ctx))
    }

    fn score_node(&self, snap: &Snapshot, d: &Demand, cands: &[Candidate], ctx: &Context<'_>, out: &mut Vec<Score>) {
        let Some(first) = cands.first() else { return };
        let before = Before::of(node_of(snap, first), ctx);
        let headroom = Headroom::of(before.node, &before, d, ctx);
        let ratio = cpu_per_gpu(ctx);
        out.extend(cands.iter().map(|c| self.score_with(d, c, ctx, &before, &headroom, ratio)));
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

/// How many pods of a whole-GPU class the node could start on the GPUs `views` describe: idle
/// GPUs with the memory, or (several GPUs) idle GPUs per NVLink island in whole groups.
fn whole_slots(node: &Node, views: &[crate::metrics::GpuView<'_>], class: &GpuDemand, cpu_ok: bool) -> u32 {
    if !cpu_ok {
        return 0;
    }
    let idle = |i: usize| views[i].healthy && views[i].idle() && views[i].free() > 0;
    match *class {
        GpuDemand::Whole { count: 0 } => 0,
        GpuDemand::Whole { count: 1 } => (0..views.len()).filter(|&i| idle(i)).count() as u32,
        GpuDemand::Whole { count } => {
            if !node.topology.has_nvlink() {
                return (0..views.len()).filter(|&i| idle(i)).count() as u32 / count;
            }
            node.topology
                .nvlink_islands()
                .iter()
                .map(|island| {
                    let n = (0..views.len()).filter(|&i| idle(i) && island.contains(&node.gpus[i].index)).count();
                    n as u32 / count
                })
                .sum()
        }
        GpuDemand::Model { memory_mib, compute_slices } => (0..views.len())
            .filter(|&i| {
                // A slot only where the model needs the whole GPU: not where a slice holds it.
                let slice = views[i]
                    .product
                    .and_then(|p| crate::demand::smallest_fitting_profile(p.geometry(), memory_mib, compute_slices));
                idle(i) && slice.is_none() && views[i].memory_mib >= memory_mib
            })
            .count() as u32,
        _ => 0,
    }
}

/// What [`headroom_loss`] needs that is the same for every candidate on a node: per expected
/// class that could use the node's whole GPUs, its weight, its size and its slots before.
struct Headroom {
    classes: smallvec::SmallVec<[(usize, f64, f64, u32); 8]>,
}

impl Headroom {
    fn of(node: &Node, before: &Before<'_>, d: &Demand, ctx: &Context<'_>) -> Self {
        let mut classes = smallvec::SmallVec::new();
        // Only slices pay for whole-GPU room (see `score_with`).
        if !matches!(d.gpu, GpuDemand::Mig { .. } | GpuDemand::Model { .. }) {
            return Self { classes };
        }
        let w = ctx.workload.whole_request_weights();
        let model = crate::metrics::node_model(node);
        for (k, (m, &wm)) in ctx.workload.classes.iter().zip(w).enumerate() {
            if wm == 0.0 || !(m.gpu_models.is_empty() || m.gpu_models.iter().any(|x| x.eq_ignore_ascii_case(model))) {
                continue;
            }
            let b = whole_slots(node, &before.views, &m.gpu, m.cpu_milli <= node.free_cpu_milli());
            let size = match m.gpu {
                GpuDemand::Whole { count } => f64::from(count),
                _ => 1.0,
            };
            classes.push((k, wm, size, b));
        }
        Self { classes }
    }
}

/// Milli-GPU of whole-GPU room for the expected large classes a candidate takes away on its
/// node: per class, slots lost × its size × its share of the expected GPU request.
fn headroom_loss(
    node: &Node,
    base: &Headroom,
    after: &[crate::metrics::GpuView<'_>],
    d: &Demand,
    ctx: &Context<'_>,
) -> f64 {
    let cpu_after = node.free_cpu_milli().saturating_sub(d.cpu_milli);
    let mut loss = 0.0;
    for &(k, wm, size, b) in &base.classes {
        let m = &ctx.workload.classes[k];
        let a = whole_slots(node, after, &m.gpu, m.cpu_milli <= cpu_after);
        loss += wm * f64::from(b.saturating_sub(a)) * size * f64::from(crate::cluster::MILLI_PER_GPU);
    }
    loss
}

impl Tessera {
    fn score_with(
        &self,
        d: &Demand,
        c: &Candidate,
        ctx: &Context<'_>,
        before: &Before<'_>,
        base: &Headroom,
        ratio: f64,
    ) -> Score {
        let node = before.node;
        let after = before.after(c);
        let gain = if ctx.workload.is_empty() { 0.0 } else { before.gain(d, c, &after, ctx) };
        // Only slices pay for whole-GPU room: shares and whole GPUs are what FGD's measure is
        // about, and they keep its behaviour (the openb replay is unchanged).
        let headroom = match d.gpu {
            GpuDemand::Mig { .. } | GpuDemand::Model { .. } => headroom_loss(node, base, &after, d, ctx),
            _ => 0.0,
        };
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
        let s = gain - HEADROOM_WEIGHT * headroom + BALANCE_WEIGHT * balance
            - RECONFIG_COST * steps
            - PACK_WEIGHT * touched_free
            - OVERSIZE_WEIGHT * f64::from(oversize(node, d, c));
        Score::new(s, s - 1e-6 * f64::from(first_fit_position(c)))
    }
}
