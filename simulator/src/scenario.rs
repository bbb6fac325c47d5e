//! MIG inference-fleet scenarios: GPU node pools, a model catalogue with replica counts or
//! arrival processes, and gangs, placed through the same core entry points the extender uses.
//!
//! Gangs and replicas are placed at time 0 and stay. Models with an `arrival:` process add pods
//! that arrive as a Poisson process and leave after an exponential lifetime; the simulation is
//! an event queue, and a departing pod's devices are released through `Snapshot::release`.
//!
//! Each policy starts from the same empty pools (full-mode GPUs that tessera may partition on
//! demand). The `static` baseline instead pre-partitions a fraction of every pool's MIG-capable
//! GPUs with a fixed mig-parted layout and never reconfigures, as clusters do today.
//!
//! By concern: [`schema`] (the file), [`arrivals`] (the pods it asks for), `baseline` (the
//! static layout), `policy` (the policy by name, `static` wrapped), `events` (the event loop);
//! this module runs one policy and counts the outcome.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Result;
use serde::Serialize;
use tessera_core::cluster::Snapshot;
use tessera_core::demand::{Demand, GpuDemand};
use tessera_core::mig::MigProduct;
use tessera_core::policy::{Context, Workload};

use crate::driver::{Decision, Driver};
use crate::occupancy::Occupancy;

pub mod arrivals;
mod baseline;
mod events;
mod policy;
mod recent;
pub mod schema;

pub use arrivals::Arrived;
pub use events::Dynamics;
pub use recent::Recent;
pub use schema::{Arrival, Gang, Model, Pool, Scenario, StaticBaseline};
pub(crate) use schema::{default_cpu, default_gpus, default_mem, default_topology, idle_node, parse_topology};

/// Result of one policy on one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub policy: String,
    pub placed: u32,
    pub rejected: u32,
    pub rejected_by_model: BTreeMap<String, u32>,
    /// Rejected pods (gang members included) that need whole GPUs on every product of the
    /// scenario's pools (tensor-parallel groups, models larger than any MIG slice), and the rest.
    pub rejected_large: u32,
    pub rejected_small: u32,
    /// GPUs holding at least one pod at the end, per product.
    pub gpus_used: BTreeMap<String, u32>,
    /// max(Σ compute slices / 7, Σ memory slices / 8) per product over what is placed at the end.
    pub lower_bound: BTreeMap<String, u32>,
    pub mig_reconfigs: u64,
    /// Over time, when the scenario has arrival processes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dynamics: Option<Dynamics>,
    /// The final cluster state, for the HTML report's slice map.
    #[serde(skip)]
    pub occupancy: Occupancy,
}

impl Outcome {
    fn empty(policy: &str) -> Self {
        Self {
            policy: policy.to_owned(),
            placed: 0,
            rejected: 0,
            rejected_by_model: BTreeMap::new(),
            rejected_large: 0,
            rejected_small: 0,
            gpus_used: BTreeMap::new(),
            lower_bound: BTreeMap::new(),
            mig_reconfigs: 0,
            dynamics: None,
            occupancy: Occupancy::default(),
        }
    }
}

/// Whether a demand needs whole GPUs wherever it goes: several GPUs, or a model that no MIG
/// slice of any of the pools' MIG products holds.
fn needs_whole_gpus(g: &GpuDemand, products: &[MigProduct]) -> bool {
    match g {
        GpuDemand::Whole { .. } => true,
        GpuDemand::Model { memory_mib, compute_slices } => products.iter().all(|p| {
            tessera_core::demand::smallest_fitting_profile(p.geometry(), *memory_mib, *compute_slices).is_none()
        }),
        _ => false,
    }
}

/// The model a pod `serving/{model}-{suffix}` serves.
fn model_of(d: &Demand) -> String {
    d.pod.0.split('/').nth(1).and_then(|n| n.rsplit_once('-')).map_or(String::new(), |(m, _)| m.to_owned())
}

/// Places one pod (under `workload` when given, else the driver's), counting it in `out`;
/// returns whether it was placed.
fn place_counted(
    driver: &mut Driver<'_>,
    snap: &mut Snapshot,
    d: &Demand,
    workload: Option<&Workload>,
    products: &[MigProduct],
    out: &mut Outcome,
) -> Result<bool> {
    let decision = match workload {
        Some(w) => driver.place_pod_under(snap, d, w)?,
        None => driver.place_pod(snap, d)?,
    };
    if let Decision::Placed(_) = decision {
        out.placed += 1;
        return Ok(true);
    }
    out.rejected += 1;
    if needs_whole_gpus(&d.gpu, products) {
        out.rejected_large += 1;
    } else {
        out.rejected_small += 1;
    }
    *out.rejected_by_model.entry(model_of(d)).or_default() += 1;
    Ok(false)
}

/// Where a scenario's decisions take the expected workload from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum WorkloadSource {
    /// Arrivals weighed by age ([`Recent`]); pods placed at time 0 start it.
    Recent,
    /// Every pod of the scenario, arrivals included, known from the start.
    #[default]
    Day,
}

/// Places a scenario under `policy` (`static` = first-fit on the fixed layout, no reconfig),
/// the workload known for the whole day.
pub fn run(sc: &Scenario, policy_name: &str, seed: u64) -> Result<Outcome> {
    run_with(sc, policy_name, seed, WorkloadSource::Day)
}

/// [`run`] with the expected workload taken from `source`.
pub fn run_with(sc: &Scenario, policy_name: &str, seed: u64, source: WorkloadSource) -> Result<Outcome> {
    let is_static = policy_name == policy::STATIC;
    let policy = policy::by_name(policy_name)?;
    let mut snap = Snapshot::new(sc.nodes()?)?;
    if is_static {
        baseline::apply_static(&mut snap, sc)?;
    }
    let reconfigs_before = snap.reconfigs();
    let (gangs, pods) = sc.demands(seed);
    let arrivals = sc.arrivals(seed);
    let at_start = || gangs.iter().flatten().chain(pods.iter());
    let workload = match source {
        WorkloadSource::Day => Workload::from_demands(at_start().chain(arrivals.iter().map(|a| &a.demand))),
        WorkloadSource::Recent => Workload::from_demands(at_start()),
    };
    let mut recent = (source == WorkloadSource::Recent).then(|| Recent::new(workload.clone()));
    let mut driver = Driver::new(policy.as_ref(), Context { workload: &workload, seed }).memoized();
    if is_static {
        // The static baseline may not reconfigure.
        driver = driver.fixed_layout();
    }
    let mut out = Outcome::empty(policy_name);
    for g in &gangs {
        let n = g.len() as u32;
        if let Decision::Placed(_) = driver.place_gang(&mut snap, g)? {
            out.placed += n;
        } else {
            let gang_name = g[0].gang.as_ref().map_or_else(String::new, |x| x.name.clone());
            out.rejected += n;
            out.rejected_large += n;
            *out.rejected_by_model.entry(format!("gang {gang_name}")).or_default() += n;
        }
    }
    let products = sc.mig_products();
    for d in &pods {
        place_counted(&mut driver, &mut snap, d, None, &products, &mut out)?;
    }
    let horizon = sc.horizon_ms();
    if horizon > 0 {
        let mut place = |snap: &mut Snapshot, t: u64, d: &Demand| {
            let now = recent.as_mut().map(|r| r.arrive(t, d));
            place_counted(&mut driver, snap, d, now, &products, &mut out)
        };
        let dynamics = events::simulate(horizon, &mut snap, &arrivals, reconfigs_before, &mut place)?;
        out.dynamics = Some(dynamics);
    }
    out.mig_reconfigs = snap.reconfigs() - reconfigs_before;
    for n in snap.nodes() {
        for g in &n.gpus {
            if g.is_unused() {
                continue;
            }
            *out.gpus_used.entry(g.model.clone()).or_default() += 1;
        }
    }
    out.lower_bound = events::Shares::of(&snap).bound();
    out.occupancy = Occupancy::of(&snap);
    Ok(out)
}

/// The policies' outcomes side by side as tables (the last one only with arrival processes).
pub fn render(outcomes: &[Outcome]) -> String {
    let mut s = String::new();
    s.push('\n');
    let _ = writeln!(
        s,
        "{:<16} {:>7} {:>9} {:>10} {:>34}  rejected",
        "policy", "placed", "rejected", "reconfigs", "GPUs used / lower bound"
    );
    for o in outcomes {
        let used: Vec<String> = o
            .lower_bound
            .keys()
            .chain(o.gpus_used.keys())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .map(|k| format!("{k} {}/{}", o.gpus_used.get(k).unwrap_or(&0), o.lower_bound.get(k).unwrap_or(&0)))
            .collect();
        let rej: Vec<String> = o.rejected_by_model.iter().map(|(k, v)| format!("{k}×{v}")).collect();
        let _ = writeln!(
            s,
            "{:<16} {:>7} {:>9} {:>10} {:>34}  {}",
            o.policy,
            o.placed,
            o.rejected,
            o.mig_reconfigs,
            used.join(", "),
            if rej.is_empty() { "-".to_owned() } else { rej.join(" ") }
        );
    }
    s.push('\n');
    let _ = writeln!(s, "{:<16} {:>15} {:>15}", "rejected", "need whole GPUs", "slices");
    for o in outcomes {
        let _ = writeln!(s, "{:<16} {:>15} {:>15}", o.policy, o.rejected_large, o.rejected_small);
    }
    if outcomes.iter().any(|o| o.dynamics.is_some()) {
        s.push('\n');
        let _ = writeln!(
            s,
            "{:<16} {:>8} {:>10} {:>9} {:>10} {:>9} {:>10}",
            "over time", "arrivals", "departures", "peak GPUs", "peak bound", "mean GPUs", "mean bound"
        );
        for o in outcomes {
            if let Some(d) = &o.dynamics {
                let _ = writeln!(
                    s,
                    "{:<16} {:>8} {:>10} {:>9} {:>10} {:>9.1} {:>10.1}",
                    o.policy,
                    d.arrivals,
                    d.departures,
                    d.peak_gpus_used,
                    d.peak_lower_bound,
                    d.mean_gpus_used,
                    d.mean_lower_bound
                );
            }
        }
    }
    s
}

#[cfg(test)]
mod tests;
