//! Model-based property test of gangs: after any sequence of plan / bind / expire / release,
//! the snapshot's counters equal the sum of live allocations and no gang is ever partially
//! placed.

use std::collections::BTreeMap;

use proptest::prelude::*;
use tessera_core::demand::{Demand, GpuDemand};
use tessera_core::gang::{bind, expire, plan_gang, release_gang};
use tessera_core::policy::{Context, NAMES, Workload, by_name};
use tessera_core::testing::synth_cluster;

#[derive(Clone, Debug)]
enum Op {
    Plan { size: u32, kind: u8, amount: u32 },
    Bind { pick: usize },
    Expire { advance_ms: u64 },
    Release { pick: usize },
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u32..5, 0u8..3, 1u32..9).prop_map(|(size, kind, amount)| Op::Plan { size, kind, amount }),
        2 => (0usize..16).prop_map(|pick| Op::Bind { pick }),
        1 => (0u64..40_000).prop_map(|advance_ms| Op::Expire { advance_ms }),
        1 => (0usize..16).prop_map(|pick| Op::Release { pick }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn gangs_are_all_or_nothing_and_accounting_is_exact(
        seed in 0u64..1000,
        policy in 0usize..NAMES.len(),
        ops in prop::collection::vec(arb_op(), 1..24),
    ) {
        let mut snap = synth_cluster(seed, 3);
        let policy = by_name(NAMES[policy]).unwrap_or_else(|| unreachable!());
        let w = Workload::default();
        let ctx = Context { workload: &w, seed };
        let mut now = 0u64;
        // Gang name -> planned member count.
        let mut gangs: BTreeMap<String, usize> = BTreeMap::new();
        for (n, op) in ops.into_iter().enumerate() {
            match op {
                Op::Plan { size, kind, amount } => {
                    let name = format!("g{n}");
                    let gpu = match kind {
                        0 => GpuDemand::Whole { count: amount.min(8) },
                        1 => GpuDemand::Mig { profile: ["1g.10gb", "2g.20gb", "3g.40gb"][amount as usize % 3].into() },
                        _ => GpuDemand::Share { milli: amount * 100 },
                    };
                    let members: Vec<Demand> = (0..size)
                        .map(|i| Demand::new(format!("ns/{name}-{i}").as_str(), gpu.clone()).in_gang(&name, size, 10_000))
                        .collect();
                    let before = snap.clone();
                    match plan_gang(&mut snap, &members, policy.as_ref(), &ctx, now) {
                        Ok(plan) => {
                            prop_assert_eq!(plan.members.len(), size as usize);
                            gangs.insert(name, size as usize);
                        }
                        Err(_) => prop_assert_eq!(&snap, &before),
                    }
                }
                Op::Bind { pick } => {
                    let reserved: Vec<_> = snap.allocations().values().filter(|a| a.reserved_until_ms.is_some()).map(|a| a.pod.clone()).collect();
                    if !reserved.is_empty() {
                        let pod = &reserved[pick % reserved.len()];
                        prop_assert!(bind(&mut snap, pod).is_ok());
                    }
                }
                Op::Expire { advance_ms } => {
                    now += advance_ms;
                    expire(&mut snap, now);
                }
                Op::Release { pick } => {
                    let names: Vec<String> = gangs.keys().cloned().collect();
                    if !names.is_empty() {
                        let g = &names[pick % names.len()];
                        release_gang(&mut snap, g);
                        gangs.remove(g);
                    }
                }
            }
            prop_assert_eq!(snap.audit(), Ok(()));
            // Every gang holds all of its planned members or none of them.
            let mut held: BTreeMap<String, usize> = BTreeMap::new();
            for a in snap.allocations().values() {
                if let Some(g) = &a.gang {
                    *held.entry(g.clone()).or_default() += 1;
                }
            }
            for (g, n) in &held {
                let planned = gangs.get(g).copied().unwrap_or(0);
                // Members of one gang lapse together, bound ones stay: a mix is only possible
                // when some were bound before the deadline.
                let reserved = snap.allocations().values().filter(|a| a.gang.as_ref() == Some(g) && a.reserved_until_ms.is_some()).count();
                prop_assert!(*n == planned || reserved == 0, "gang {} holds {} of {} with {} still reserved", g, n, planned, reserved);
            }
        }
    }
}
