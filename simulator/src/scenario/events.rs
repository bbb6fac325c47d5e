//! The scenario's event loop over simulated time: arrivals are placed (or rejected and dropped),
//! placed pods leave after their lifetime, and GPUs in use are tracked against the lower bound.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use serde::Serialize;
use tessera_core::cluster::{Allocation, Grant, Snapshot};
use tessera_core::demand::Demand;

use super::arrivals::Arrived;
use crate::driver::{Event, EventQueue};

/// GPUs in use over simulated time (all products together).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Dynamics {
    pub horizon_hours: f64,
    pub arrivals: u32,
    pub departures: u32,
    pub peak_gpus_used: u32,
    /// Time-weighted over `[0, horizon]`.
    pub mean_gpus_used: f64,
    /// The lower bound (as in `lower_bound`, summed over products) of what was placed at the time.
    pub peak_lower_bound: u32,
    pub mean_lower_bound: f64,
    /// `[hours, GPUs used, lower bound, MIG reconfigurations so far]` at every change.
    pub timeline: Vec<(f64, u32, u32, u64)>,
}

/// Compute and memory shares of GPUs taken by placed pods, per product: what the lower bound is
/// computed from.
#[derive(Debug, Default)]
pub(super) struct Shares(BTreeMap<String, (f64, f64)>);

impl Shares {
    /// Over every allocation of the snapshot.
    pub(super) fn of(snap: &Snapshot) -> Self {
        let mut s = Self::default();
        for a in snap.allocations().values() {
            s.add(snap, a);
        }
        s
    }

    fn add(&mut self, snap: &Snapshot, alloc: &Allocation) {
        for (model, c, m) in grant_share(snap, alloc) {
            let e = self.0.entry(model).or_default();
            e.0 += c;
            e.1 += m;
        }
    }

    fn remove(&mut self, snap: &Snapshot, alloc: &Allocation) {
        for (model, c, m) in grant_share(snap, alloc) {
            let e = self.0.entry(model).or_default();
            e.0 -= c;
            e.1 -= m;
        }
    }

    /// Per product, ⌈max(compute, memory)⌉.
    pub(super) fn bound(&self) -> BTreeMap<String, u32> {
        self.0.iter().map(|(k, &(c, m))| (k.clone(), (c.max(m) - 1e-9).ceil().max(0.0) as u32)).collect()
    }

    fn bound_total(&self) -> u32 {
        self.bound().values().sum()
    }
}

/// Compute and memory share of one GPU that a grant takes, with the GPU's product.
fn grant_share(snap: &Snapshot, alloc: &Allocation) -> Vec<(String, f64, f64)> {
    let Some(node) = snap.node(&alloc.node) else { return vec![] };
    alloc
        .grants
        .iter()
        .filter_map(|gr| {
            let g = node.gpu(gr.gpu())?;
            let (c, m) = match *gr {
                Grant::Whole { .. } => (1.0, 1.0),
                Grant::Share { milli, .. } => (f64::from(milli) / 1000.0, f64::from(milli) / 1000.0),
                Grant::Mig { class, .. } => g
                    .mig_product()
                    .and_then(|p| {
                        let geom = p.geometry();
                        geom.profile(class).map(|pr| {
                            (
                                f64::from(pr.compute_slices) / f64::from(geom.compute_slices),
                                f64::from(pr.memory_slices) / f64::from(geom.memory_slices),
                            )
                        })
                    })
                    .unwrap_or((0.0, 0.0)),
            };
            Some((g.model.clone(), c, m))
        })
        .collect()
}

pub(super) fn gpus_in_use(snap: &Snapshot) -> u32 {
    snap.nodes().iter().flat_map(|n| n.gpus.iter()).filter(|g| !g.is_unused()).count() as u32
}

/// Runs the arrivals up to `horizon_ms`: `place` places one pod in the snapshot at a time (ms)
/// and says whether it did; departures release through `Snapshot::release`.
pub(super) fn simulate(
    horizon: u64,
    snap: &mut Snapshot,
    arrivals: &[Arrived],
    reconfigs_before: u64,
    place: &mut dyn FnMut(&mut Snapshot, u64, &Demand) -> Result<bool>,
) -> Result<Dynamics> {
    let mut queue = EventQueue::arrivals(arrivals.iter().map(|a| a.at_ms));
    let mut shares = Shares::of(snap);
    let (mut used, mut bound) = (gpus_in_use(snap), shares.bound_total());
    let mut d = Dynamics {
        horizon_hours: horizon as f64 / 3_600_000.0,
        arrivals: 0,
        departures: 0,
        peak_gpus_used: used,
        mean_gpus_used: 0.0,
        peak_lower_bound: bound,
        mean_lower_bound: 0.0,
        timeline: vec![(0.0, used, bound, snap.reconfigs() - reconfigs_before)],
    };
    let (mut area_used, mut area_bound, mut last) = (0.0, 0.0, 0u64);
    while let Some((t, event)) = queue.pop() {
        if t > horizon {
            break;
        }
        let dt = (t - last) as f64;
        area_used += f64::from(used) * dt;
        area_bound += f64::from(bound) * dt;
        last = t;
        match event {
            Event::Arrive(i) => {
                let a = &arrivals[i];
                d.arrivals += 1;
                if place(snap, t, &a.demand)? {
                    let alloc = snap.allocation(&a.demand.pod).context("placed pod has no allocation")?;
                    shares.add(snap, alloc);
                    queue.depart(t + a.lifetime_ms, i);
                }
            }
            Event::Depart(i) => {
                d.departures += 1;
                let alloc = snap.release(&arrivals[i].demand.pod)?;
                shares.remove(snap, &alloc);
            }
        }
        (used, bound) = (gpus_in_use(snap), shares.bound_total());
        d.peak_gpus_used = d.peak_gpus_used.max(used);
        d.peak_lower_bound = d.peak_lower_bound.max(bound);
        let hours = t as f64 / 3_600_000.0;
        let reconfigs = snap.reconfigs() - reconfigs_before;
        match d.timeline.last_mut() {
            // Several events at one instant: keep the state after the last of them.
            Some(p) if p.0 == hours => *p = (hours, used, bound, reconfigs),
            Some(p) if (p.1, p.2, p.3) == (used, bound, reconfigs) => {}
            _ => d.timeline.push((hours, used, bound, reconfigs)),
        }
    }
    let dt = (horizon - last) as f64;
    area_used += f64::from(used) * dt;
    area_bound += f64::from(bound) * dt;
    d.mean_gpus_used = area_used / horizon as f64;
    d.mean_lower_bound = area_bound / horizon as f64;
    d.timeline.push((d.horizon_hours, used, bound, snap.reconfigs() - reconfigs_before));
    Ok(d)
}
