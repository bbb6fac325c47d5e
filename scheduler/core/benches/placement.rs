//! Placement throughput: one decision (filter + score + choose) over synthetic clusters of
//! 1,000 and 5,000 nodes × 8 GPUs with mixed MIG (`testing::synth_cluster`).
//!
//! Run: `cargo bench -p tessera-core --bench placement`. Group `filter`: each iteration places
//! one demand on an unchanged snapshot from scratch (`place`), so the time is one cold
//! scheduling decision. Group `memo`: the same with a warm [`Memo`] (`place_memo`), the steady
//! state of a running scheduler, where only nodes changed since the last decision of the same
//! shape are evaluated again. Group `steady`: as `memo`, but each iteration also binds the
//! chosen placement and releases it again, so every decision finds one node changed since the
//! last one (a running scheduler between two binds). Group `verdicts`: the extender's filter
//! with every node of a 5,000-node cluster named, memo warm (name lookups, verdict copies).
//! Group `cold`: the same with an empty memo, the first filter of a new demand shape.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tessera_core::cluster::NodeName;
use tessera_core::demand::{Demand, GpuDemand};
use tessera_core::policy::{Context, Memo, Workload, by_name, evaluate_memo, place, place_memo};
use tessera_core::testing::synth_cluster;

fn demands() -> Vec<(&'static str, Demand)> {
    vec![
        ("mig-1g", Demand::new("bench/mig", GpuDemand::Mig { profile: "1g.10gb".into() }).with_cpu(2000, 8192)),
        ("model-18gi", Demand::new("bench/model", GpuDemand::Model { memory_mib: 18 * 1024, compute_slices: None })),
        ("share-300", Demand::new("bench/share", GpuDemand::Share { milli: 300 })),
        ("whole-4", Demand::new("bench/tp4", GpuDemand::Whole { count: 4 }).with_cpu(16_000, 65_536)),
    ]
}

fn filter_and_score(c: &mut Criterion) {
    let mix: Vec<Demand> = demands().into_iter().map(|(_, d)| d).collect();
    let workload = Workload::from_demands(mix.iter());
    let mut group = c.benchmark_group("filter");
    group.sample_size(20);
    for nodes in [1_000usize, 5_000] {
        let snap = synth_cluster(7, nodes);
        for policy in ["tessera", "fgd", "first-fit"] {
            let p = by_name(policy).unwrap_or_else(|| unreachable!());
            for (kind, d) in demands() {
                let param = format!("nodes={nodes},gpus=8,mig=mixed,policy={policy},demand={kind}");
                group.throughput(Throughput::Elements(1));
                group.bench_with_input(BenchmarkId::from_parameter(param), &d, |b, d| {
                    let ctx = Context { workload: &workload, seed: 1 };
                    b.iter(|| place(&snap, d, p.as_ref(), &ctx));
                });
            }
        }
    }
    group.finish();
}

fn memoised(c: &mut Criterion) {
    warm(c, "memo", false);
}

fn steady(c: &mut Criterion) {
    warm(c, "steady", true);
}

/// A warm memo per case; with `bind`, each decision is bound and released again.
fn warm(c: &mut Criterion, name: &str, bind: bool) {
    let mix: Vec<Demand> = demands().into_iter().map(|(_, d)| d).collect();
    let workload = Workload::from_demands(mix.iter());
    let mut group = c.benchmark_group(name);
    group.sample_size(20);
    for nodes in [1_000usize, 5_000] {
        let mut snap = synth_cluster(7, nodes);
        for policy in ["tessera", "fgd"] {
            let p = by_name(policy).unwrap_or_else(|| unreachable!());
            for (kind, d) in demands() {
                let param = format!("nodes={nodes},gpus=8,mig=mixed,policy={policy},demand={kind}");
                let ctx = Context { workload: &workload, seed: 1 };
                let mut memo = Memo::new();
                let _ = place_memo(&snap, &d, p.as_ref(), &ctx, &mut memo);
                group.throughput(Throughput::Elements(1));
                group.bench_function(BenchmarkId::from_parameter(param), |b| {
                    b.iter(|| {
                        let decision = place_memo(&snap, &d, p.as_ref(), &ctx, &mut memo);
                        if bind {
                            let pl = decision.unwrap_or_else(|r| panic!("the bench cluster has room: {r}"));
                            pl.apply(&mut snap, &d, None).unwrap_or_else(|e| panic!("{e}"));
                            snap.release(&d.pod).unwrap_or_else(|e| panic!("{e}"));
                        }
                    });
                });
            }
        }
    }
    group.finish();
}

/// The extender's filter at full cluster size: per-node verdicts for all 5,000 nodes named in
/// the request (`evaluate_memo` with every name), memo warm. The time is the name lookups and
/// the verdict copies the filter reply is written from.
fn verdicts_by_name(c: &mut Criterion) {
    let mix: Vec<Demand> = demands().into_iter().map(|(_, d)| d).collect();
    let workload = Workload::from_demands(mix.iter());
    let mut group = c.benchmark_group("verdicts");
    group.sample_size(20);
    let snap = synth_cluster(7, 5_000);
    let names: Vec<NodeName> = snap.nodes().iter().map(|n| n.name.clone()).collect();
    // kube-scheduler's order: its node list from a rotating start.
    let rotated: Vec<NodeName> = names[1234..].iter().chain(&names[..1234]).cloned().collect();
    let p = by_name("tessera").unwrap_or_else(|| unreachable!());
    let ctx = Context { workload: &workload, seed: 1 };
    for (order, names) in [("sorted", &names), ("rotated", &rotated)] {
        for (kind, d) in demands() {
            let mut memo = Memo::new();
            let _ = evaluate_memo(&snap, &d, p.as_ref(), &ctx, Some(names), &mut memo);
            let param = format!("nodes=5000,named=5000,order={order},policy=tessera,demand={kind}");
            group.throughput(Throughput::Elements(1));
            group.bench_function(BenchmarkId::from_parameter(param), |b| {
                b.iter(|| evaluate_memo(&snap, &d, p.as_ref(), &ctx, Some(names), &mut memo));
            });
        }
    }
    group.finish();
}

/// The extender's first filter of a new demand shape: `evaluate_memo` with all 5,000 names and
/// an empty memo, as a filter after a workload change or for a shape never seen. Unlike
/// `filter` (`place`), every refusal carries its reason, as the filter reply needs.
fn cold_by_name(c: &mut Criterion) {
    let mix: Vec<Demand> = demands().into_iter().map(|(_, d)| d).collect();
    let workload = Workload::from_demands(mix.iter());
    let mut group = c.benchmark_group("cold");
    group.sample_size(20);
    let snap = synth_cluster(7, 5_000);
    let names: Vec<NodeName> = snap.nodes().iter().map(|n| n.name.clone()).collect();
    let ctx = Context { workload: &workload, seed: 1 };
    for policy in ["tessera", "fgd"] {
        let p = by_name(policy).unwrap_or_else(|| unreachable!());
        for (kind, d) in demands() {
            let param = format!("nodes=5000,named=5000,policy={policy},demand={kind}");
            group.throughput(Throughput::Elements(1));
            group.bench_function(BenchmarkId::from_parameter(param), |b| {
                b.iter(|| evaluate_memo(&snap, &d, p.as_ref(), &ctx, Some(&names), &mut Memo::new()));
            });
        }
    }
    group.finish();
}

criterion_group!(benches, filter_and_score, memoised, steady, verdicts_by_name, cold_by_name);
criterion_main!(benches);
