//! What-if on a captured cluster: can these extra pods (and gangs) fit, where, and how many nodes
//! of a given type must be added so that they all do.
//!
//! Pods are read with the scheduler's own parser ([`tessera_api::pod::demand`], in `load`) and
//! placed in file order by the simulator's [`crate::driver`], with the core entry points the
//! extender uses: [`tessera_core::place`] for a pod, [`tessera_core::gang::plan_gang`] for a gang
//! (all members at once, at its first member's place in the order). Each decision sees the ones
//! before it. `template` makes the nodes the search adds; `render` writes the answer as text.

use std::collections::{HashMap, HashSet};

use anyhow::{Result, bail};
use serde::Serialize;
use tessera_api::{AssignedDevice, Assignment};
use tessera_core::policy::{Context, Policy, Workload};
use tessera_core::{Demand, Gpu, GpuMode, MigOp, NodeName, Placement, Rejection, Snapshot};

use crate::capture::Cluster;
pub use crate::driver::Unit;
use crate::driver::{Decision, Driver};

mod load;
mod render;
mod template;

pub use load::load_pods;
pub use render::render;
pub use template::{NodeType, Template, with_nodes};

/// Where one pod goes, or why it cannot.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub pod: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gang: Option<String>,
    /// What the pod asks for, in words.
    pub demand: String,
    pub fits: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The devices, as the scheduler's `tessera.dev/assignment` annotation would name them (a MIG
    /// instance still to be created has no `mig` UUID).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<AssignedDevice>,
    /// MIG changes the node must make first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mig_changes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The scheduler would report the pod as never fitting this cluster as it is built
    /// (`FailedAndUnresolvableNodes`), not just as full now.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unresolvable: bool,
}

impl Outcome {
    fn placed(
        d: &Demand,
        p: &Placement,
        snap: &Snapshot,
        mig_uuids: &HashMap<(NodeName, u32, u8), String>,
        created: &HashSet<(NodeName, u32, u8)>,
    ) -> Self {
        let profile = |i: u32, class| {
            snap.node(&p.node)
                .and_then(|n| n.gpu(i))
                .and_then(Gpu::mig_product)
                .and_then(|m| m.geometry().profile(class))
        };
        let devices = Assignment::of(snap, p, |gpu, start| {
            let at = (p.node.clone(), gpu, start);
            if created.contains(&at) { None } else { mig_uuids.get(&at).cloned() }
        })
        .devices;
        let mig_changes = p
            .ops
            .iter()
            .map(|o| match *o {
                MigOp::SetMode { gpu, mode } => {
                    format!("GPU{gpu} to {} mode", if mode == GpuMode::Mig { "MIG" } else { "full" })
                }
                MigOp::Create { gpu, class, start } => {
                    format!("create {}@{start} on GPU{gpu}", profile(gpu, class).map_or("?", |x| x.name))
                }
                MigOp::Destroy { gpu, class, start } => {
                    format!("destroy {}@{start} on GPU{gpu}", profile(gpu, class).map_or("?", |x| x.name))
                }
            })
            .collect();
        Self {
            pod: d.pod.0.clone(),
            gang: d.gang.as_ref().map(|g| g.name.clone()),
            demand: d.gpu.to_string(),
            fits: true,
            node: Some(p.node.0.clone()),
            devices,
            mig_changes,
            reason: None,
            unresolvable: false,
        }
    }

    fn rejected(d: &Demand, r: &Rejection) -> Self {
        Self {
            pod: d.pod.0.clone(),
            gang: d.gang.as_ref().map(|g| g.name.clone()),
            demand: d.gpu.to_string(),
            fits: false,
            node: None,
            devices: Vec::new(),
            mig_changes: Vec::new(),
            reason: Some(r.to_string()),
            unresolvable: r.is_unresolvable(),
        }
    }
}

fn note_created(p: &Placement, created: &mut HashSet<(NodeName, u32, u8)>) {
    for op in &p.ops {
        if let MigOp::Create { gpu, start, .. } = *op {
            created.insert((p.node.clone(), gpu, start));
        }
    }
}

/// Places every unit in order on a copy of `base`; returns one outcome per pod (gang members in
/// the order given).
pub fn place_all(
    base: &Snapshot,
    mig_uuids: &HashMap<(NodeName, u32, u8), String>,
    units: &[Unit],
    policy: &dyn Policy,
    ctx: &Context<'_>,
) -> Result<Vec<Outcome>> {
    let mut snap = base.clone();
    let mut driver = Driver::new(policy, *ctx);
    let mut out = Vec::new();
    // MIG instances made during this run: their UUIDs are not the capture's.
    let mut created = HashSet::new();
    for u in units {
        let members = u.demands();
        match driver.place(&mut snap, u)? {
            Decision::Placed(placements) => {
                for p in &placements {
                    note_created(p, &mut created);
                }
                for (d, p) in members.iter().zip(&placements) {
                    out.push(Outcome::placed(d, p, &snap, mig_uuids, &created));
                }
            }
            Decision::Refused(r) => out.extend(members.iter().map(|d| Outcome::rejected(d, &r))),
            Decision::NeedsReconfig => bail!("a what-if driver refused a MIG change it may make"),
        }
    }
    Ok(out)
}

/// The node-addition search's answer.
#[derive(Debug, Clone, Serialize)]
pub struct Added {
    /// The template, in words.
    pub template: String,
    pub max: u32,
    /// Smallest number of added nodes with which every pod fits; `None`: not even `max`.
    pub nodes: Option<u32>,
    /// Pods placed with 0, 1, … added nodes, as far as the search went.
    pub placed_by_count: Vec<usize>,
}

/// Finds the smallest number of template nodes (0..=`max`) with which every unit fits, and the
/// outcomes at that count (or at `max` when none is enough).
///
/// Linear, from 0: the answer is the first count at which the scheduler's own sequence of
/// decisions places everything. Greedy placement makes "fits with k more nodes" monotone only
/// in practice (an extra node can change an early choice and, rarely, strand a later pod), so a
/// binary search would assume what the linear one checks; each trial is one pass over the pods.
pub fn search(
    cluster: &Cluster,
    units: &[Unit],
    template: &Template,
    max: u32,
    policy: &dyn Policy,
    ctx: &Context<'_>,
) -> Result<(Added, Vec<Outcome>)> {
    let mut placed_by_count = Vec::new();
    let mut last = Vec::new();
    for k in 0..=max {
        let snap = with_nodes(&cluster.snap, template, k)?;
        let outcomes = place_all(&snap, &cluster.mig_uuids, units, policy, ctx)?;
        let placed = outcomes.iter().filter(|o| o.fits).count();
        placed_by_count.push(placed);
        if placed == outcomes.len() {
            return Ok((Added { template: template.describe(), max, nodes: Some(k), placed_by_count }, outcomes));
        }
        last = outcomes;
    }
    Ok((Added { template: template.describe(), max, nodes: None, placed_by_count }, last))
}

/// The capture in numbers.
#[derive(Debug, Clone, Serialize)]
pub struct CaptureSummary {
    /// `objects` (Nodes, Pods, GpuNodes) or `scheduler` (the `/api/v1/cluster` dump).
    pub source: &'static str,
    pub nodes: usize,
    pub gpus: usize,
    /// Pods holding resources (bound, or reserved by the scheduler).
    pub pods: usize,
    pub warnings: Vec<String>,
}

impl CaptureSummary {
    pub fn of(cluster: &Cluster) -> Self {
        Self {
            source: cluster.kind,
            nodes: cluster.snap.nodes().len(),
            gpus: cluster.snap.nodes().iter().map(|n| n.gpus.len()).sum(),
            pods: cluster.snap.allocations().len(),
            warnings: cluster.warnings.clone(),
        }
    }
}

/// Everything `tessera-sim whatif` answers (also its `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub policy: String,
    pub seed: u64,
    pub capture: CaptureSummary,
    /// Pods asked about, and how many fit.
    pub pods: usize,
    pub placed: usize,
    /// Every pod fits (with the added nodes, when a search ran).
    pub fits: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub added: Option<Added>,
    pub outcomes: Vec<Outcome>,
}

/// The what-if: places `units` on the captured cluster, and with `add = Some((template, max))`
/// searches for the fewest added nodes.
pub fn run(
    cluster: &Cluster,
    units: &[Unit],
    policy: &dyn Policy,
    seed: u64,
    add: Option<(&Template, u32)>,
) -> Result<Report> {
    let extra: Vec<&Demand> = units.iter().flat_map(Unit::demands).collect();
    // The expected workload, as the extender keeps it: popular shapes among the demands it has
    // seen (here: the running pods and the ones asked about).
    let workload = Workload::from_demands_top(cluster.running.iter().chain(extra.iter().copied()), 0.95);
    let ctx = Context { workload: &workload, seed };
    let mut summary = CaptureSummary::of(cluster);
    let (added, outcomes) = match add {
        Some((t, max)) => {
            summary.warnings.extend(t.check(&cluster.snap)?);
            let (a, o) = search(cluster, units, t, max, policy, &ctx)?;
            (Some(a), o)
        }
        None => (None, place_all(&cluster.snap, &cluster.mig_uuids, units, policy, &ctx)?),
    };
    let placed = outcomes.iter().filter(|o| o.fits).count();
    Ok(Report {
        policy: policy.name().to_owned(),
        seed,
        capture: summary,
        pods: outcomes.len(),
        placed,
        fits: placed == outcomes.len(),
        added,
        outcomes,
    })
}

#[cfg(test)]
mod tests;
