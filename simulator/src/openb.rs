//! openb replay, as the FGD paper's simulator does it.
//!
//! Pods are sorted by name, shuffled with the seed, then "tuned": random copies of the original
//! pods (with replacement) are appended until the GPU request reaches `tune` × capacity. Each
//! pod is placed once, in order, by the [`crate::driver`] (`tessera_core::policy::place_memo`,
//! the extender's entry point with its evaluations reused); pods never leave, and a pod that fits
//! nowhere is recorded as failed and dropped.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Context as _;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tessera_core::cluster::{Node, Snapshot};
use tessera_core::demand::Demand;
use tessera_core::metrics::packing;
use tessera_core::policy::{Context, Policy, Workload};

use crate::driver::{Decision, Driver};
use crate::occupancy::Occupancy;
use crate::trace::PodRow;

/// The replay order for one seed: shuffled originals followed by tuned copies.
pub fn tuned_order(pods: &[PodRow], capacity_milli: u64, tune: f64, seed: u64) -> Vec<PodRow> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut sorted: Vec<PodRow> = pods.to_vec();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut order = sorted.clone();
    order.shuffle(&mut rng);
    let target = (tune * capacity_milli as f64) as u64;
    let mut total: u64 = order.iter().map(PodRow::gpu_request_milli).sum();
    if total > target {
        while total > target && !order.is_empty() {
            let i = rng.random_range(0..order.len());
            total -= order.remove(i).gpu_request_milli();
        }
    } else {
        // Like the artifact: sample with replacement from the name-sorted originals and stop at
        // the first sample whose per-GPU request would overflow the target.
        let mut j = 0;
        loop {
            let mut q = sorted[rng.random_range(0..sorted.len())].clone();
            let per_gpu = if q.num_gpu == 0 { 0 } else { u64::from(q.gpu_milli) };
            if total + per_gpu > target {
                break;
            }
            total += q.gpu_request_milli();
            q.name = format!("{}-tuned-{j}", q.name);
            order.push(q);
            j += 1;
        }
    }
    order
}

/// One policy's runs on one trace: the `--json` contract of `tessera-sim openb`.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyReport {
    pub policy: String,
    pub trace: String,
    pub tune: f64,
    pub runs: Vec<Run>,
    /// Mean over the runs (fraction).
    pub mean_allocation_ratio: f64,
    pub elapsed_seconds: f64,
    /// The certified upper bound for the same trace, tune and seeds (the same in every policy's
    /// report); absent with `--no-bound`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upper_bound: Option<crate::bound::Summary>,
}

/// One seed's result.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub seed: u64,
    /// Allocated / total GPU at the end (fraction).
    pub allocation_ratio: f64,
    /// Total GPUs minus allocated GPUs at the end (in GPUs, fractional).
    pub unallocated_gpus: f64,
    pub failed_pods: u64,
    pub pods: u64,
    /// Failed pods by the kind of demand that failed.
    pub failed_by_reason: BTreeMap<String, u64>,
    /// `[arrived %, allocated %]` for arrived = 0..=130 (the paper's discretisation).
    pub curve: Vec<(u32, f64)>,
    /// FGD fragmentation at the end, % of cluster GPU.
    pub fragmentation_pct: f64,
    pub elapsed_seconds: f64,
    /// The final cluster state, for the HTML report's slice map.
    #[serde(skip)]
    pub occupancy: Occupancy,
}

/// Replays one trace under one policy and seed. `now` is only used for timing the run.
pub fn replay(
    nodes: &[Node],
    pods: &[PodRow],
    policy: &dyn Policy,
    tune: f64,
    seed: u64,
    progress: &dyn Fn(u64, u64),
) -> anyhow::Result<Run> {
    #[allow(clippy::disallowed_methods)] // times the replay for its report
    let started = std::time::Instant::now();
    let mut snap = Snapshot::new(nodes.iter().cloned())?;
    let total_gpus: u64 = nodes.iter().map(|n| n.gpus.len() as u64).sum();
    let capacity = total_gpus * 1000;
    // FGD's target workload: the original pods' shapes covering 95% of them.
    let originals: Vec<Demand> = pods.iter().map(|p| p.demand(p.name.clone())).collect();
    let workload = Workload::from_demands_top(originals.iter(), 0.95);
    let ctx = Context { workload: &workload, seed };
    let order = tuned_order(pods, capacity, tune, seed);
    let mut arrived: u64 = 0;
    let mut allocated: u64 = 0;
    let mut failed = 0u64;
    let mut failed_by_reason: BTreeMap<String, u64> = BTreeMap::new();
    // Per event: (arrived %, allocated %), discretised below.
    let mut events: Vec<(i64, f64)> = Vec::with_capacity(order.len());
    let n = order.len() as u64;
    let mut driver = Driver::new(policy, ctx).memoized();
    for (i, pod) in order.iter().enumerate() {
        let demand = pod.demand(format!("openb/{}#{i}", pod.name));
        arrived += pod.gpu_request_milli();
        match driver.place_pod(&mut snap, &demand)? {
            Decision::Placed(_) => allocated += pod.gpu_request_milli(),
            Decision::Refused(_) | Decision::NeedsReconfig => {
                failed += 1;
                let kind = match pod.num_gpu {
                    0 => "cpu-only".to_owned(),
                    1 if pod.gpu_milli < 1000 => "gpu-share".to_owned(),
                    k => format!("{k}-gpu"),
                };
                *failed_by_reason.entry(kind).or_default() += 1;
            }
        }
        let arrive_pct = round_half_even(arrived as f64 / total_gpus as f64 / 10.0);
        events.push((arrive_pct, allocated as f64 / total_gpus as f64 / 10.0));
        if i % 256 == 0 {
            progress(i as u64, n);
        }
    }
    progress(n, n);
    let curve = discretise(&events, 130);
    let pack = packing(&snap, &workload, |_| true);
    debug_assert_eq!(pack.allocated_milli, allocated);
    Ok(Run {
        seed,
        allocation_ratio: allocated as f64 / capacity as f64,
        unallocated_gpus: (capacity - allocated) as f64 / 1000.0,
        failed_pods: failed,
        pods: n,
        failed_by_reason,
        curve,
        fragmentation_pct: 100.0 * pack.fragmentation_milli / capacity as f64,
        elapsed_seconds: started.elapsed().as_secs_f64(),
        occupancy: Occupancy::of(&snap),
    })
}

/// Python's `round` (half to even), used by the paper's analysis scripts.
fn round_half_even(x: f64) -> i64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && (r as i64) % 2 != 0 { (r - x.signum()) as i64 } else { r as i64 }
}

/// Column `x` = mean allocation % over events whose rounded arrival % is `x`; empty buckets
/// borrow from `x±1`; still-empty buckets are omitted.
pub fn discretise(events: &[(i64, f64)], max: u32) -> Vec<(u32, f64)> {
    let mut out = Vec::new();
    for x in 0..=max {
        let xi = i64::from(x);
        let mut vals: Vec<f64> = events.iter().filter(|(a, _)| *a == xi).map(|(_, v)| *v).collect();
        if vals.is_empty() {
            vals = events.iter().filter(|(a, _)| (xi - 1..=xi + 1).contains(a)).map(|(_, v)| *v).collect();
        }
        if !vals.is_empty() {
            let mean = vals.iter().sum::<f64>() / vals.len() as f64;
            out.push((x, (mean * 100.0).round() / 100.0));
        }
    }
    out
}

/// One replay's progress display: told `(done, total)` pods as it goes, dropped when it ends.
pub trait Bar {
    fn set(&self, done: u64, total: u64);
}

impl Bar for () {
    fn set(&self, _: u64, _: u64) {}
}

/// Replays the trace under the policy named `policy` for every seed, the seeds on all cores;
/// `bar(policy, seed)` makes each replay's progress display.
#[allow(clippy::too_many_arguments)]
pub fn run_policy<B: Bar>(
    nodes: &[Node],
    pods: &[PodRow],
    trace: &str,
    policy: &str,
    tune: f64,
    seeds: &[u64],
    upper_bound: Option<&crate::bound::Summary>,
    bar: &(dyn Fn(&str, u64) -> B + Sync),
) -> anyhow::Result<PolicyReport> {
    let p = tessera_core::policy::by_name(policy).with_context(|| format!("unknown policy {policy:?}"))?;
    #[allow(clippy::disallowed_methods)] // times the runs for their report
    let started = std::time::Instant::now();
    let mut runs = crate::seeds::each("replay", seeds, &|seed| {
        let b = bar(policy, seed);
        replay(nodes, pods, p.as_ref(), tune, seed, &|done, total| b.set(done, total))
    })?;
    runs.sort_by_key(|r| r.seed);
    let mean = runs.iter().map(|r| r.allocation_ratio).sum::<f64>() / runs.len() as f64;
    Ok(PolicyReport {
        policy: policy.to_owned(),
        trace: trace.to_owned(),
        tune,
        runs,
        mean_allocation_ratio: mean,
        elapsed_seconds: started.elapsed().as_secs_f64(),
        upper_bound: upper_bound.cloned(),
    })
}

/// The policies side by side as a table (with the paper's numbers when `expected` is given).
pub fn render(reports: &[PolicyReport], expected: Option<&crate::compare::Expected>) -> String {
    let mut s = String::new();
    s.push('\n');
    let _ = write!(
        s,
        "{:<16} {:>10} {:>11} {:>10} {:>9} {:>9} {:>10}",
        "policy", "alloc %", "unalloc GPU", "failed", "frag %", "s/run", "total s"
    );
    if expected.is_some() {
        let _ = write!(s, " {:>12} {:>10}", "paper alloc%", "paper pol.");
    }
    s.push('\n');
    for r in reports {
        let n = r.runs.len() as f64;
        let unalloc = r.runs.iter().map(|x| x.unallocated_gpus).sum::<f64>() / n;
        let failed = r.runs.iter().map(|x| x.failed_pods as f64).sum::<f64>() / n;
        let frag = r.runs.iter().map(|x| x.fragmentation_pct).sum::<f64>() / n;
        let per_run = r.runs.iter().map(|x| x.elapsed_seconds).sum::<f64>() / n;
        let _ = write!(
            s,
            "{:<16} {:>10.2} {:>11.1} {:>10.1} {:>9.2} {:>9.2} {:>10.1}",
            r.policy,
            100.0 * r.mean_allocation_ratio,
            unalloc,
            failed,
            frag,
            per_run,
            r.elapsed_seconds
        );
        if let Some(e) = expected {
            let seeds: Vec<u64> = r.runs.iter().map(|x| x.seed).collect();
            let _ = match crate::compare::paper_policy(&r.policy)
                .and_then(|p| e.mean_final(&r.trace, p, &seeds).map(|v| (p, v)))
            {
                Some((p, v)) => write!(s, " {v:>12.2} {p:>10}"),
                None => write!(s, " {:>12} {:>10}", "-", "-"),
            };
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, num_gpu: u32, gpu_milli: u32) -> PodRow {
        PodRow { name: name.into(), cpu_milli: 1000, memory_mib: 1024, num_gpu, gpu_milli, gpu_spec: String::new() }
    }

    #[test]
    fn tuning_appends_copies_until_the_target_and_is_seeded() {
        let pods = vec![pod("a", 1, 500), pod("b", 2, 1000), pod("c", 0, 0)];
        let order = tuned_order(&pods, 10_000, 1.3, 42);
        let total: u64 = order.iter().map(PodRow::gpu_request_milli).sum();
        assert!(total <= 13_000 + 1000, "{total}");
        assert!(total > 13_000 - 2000, "{total}");
        // Originals first (a permutation), then tuned copies.
        let mut first: Vec<&str> = order[..3].iter().map(|p| p.name.as_str()).collect();
        first.sort();
        assert_eq!(first, ["a", "b", "c"]);
        assert!(order[3..].iter().all(|p| p.name.contains("-tuned-")));
        assert_eq!(order, tuned_order(&pods, 10_000, 1.3, 42));
        assert_ne!(order, tuned_order(&pods, 10_000, 1.3, 43));
        // Too much demand is tuned down.
        let many: Vec<PodRow> = (0..40).map(|i| pod(&format!("p{i:02}"), 1, 1000)).collect();
        let down = tuned_order(&many, 10_000, 1.3, 1);
        assert_eq!(down.iter().map(PodRow::gpu_request_milli).sum::<u64>(), 13_000);
    }

    #[test]
    fn discretisation_averages_buckets_and_borrows_neighbours() {
        let ev = vec![(0, 0.0), (1, 1.0), (1, 2.0), (3, 3.0)];
        let c = discretise(&ev, 4);
        assert_eq!(c, vec![(0, 0.0), (1, 1.5), (2, 2.0), (3, 3.0), (4, 3.0)]);
        assert_eq!(round_half_even(2.5), 2);
        assert_eq!(round_half_even(3.5), 4);
        assert_eq!(round_half_even(3.4), 3);
    }
}
