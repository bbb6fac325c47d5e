//! Property: no policy ever returns an infeasible placement. Random demands on random
//! synthetic clusters are placed one after another under every policy; every placement must
//! apply cleanly (MIG steps legal, nothing over-committed) and leave a consistent snapshot.

use proptest::prelude::*;
use tessera_core::demand::{Demand, GpuDemand};
use tessera_core::policy::{Context, Memo, NAMES, Workload, by_name, place, place_memo};
use tessera_core::testing::synth_cluster;

fn arb_demand() -> impl Strategy<Value = GpuDemand> {
    prop_oneof![
        Just(GpuDemand::None),
        (1u32..9).prop_map(|count| GpuDemand::Whole { count }),
        prop_oneof![
            Just("1g.10gb"),
            Just("1g.20gb"),
            Just("2g.20gb"),
            Just("3g.40gb"),
            Just("4g.40gb"),
            Just("7g.80gb")
        ]
        .prop_map(|p| GpuDemand::Mig { profile: p.into() }),
        (1u64..90_000, prop::option::of(1u8..8))
            .prop_map(|(m, c)| GpuDemand::Model { memory_mib: m, compute_slices: c }),
        (1u32..1000).prop_map(|milli| GpuDemand::Share { milli }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn no_policy_returns_an_infeasible_placement(
        seed in 0u64..10_000,
        policy in 0usize..NAMES.len(),
        demands in prop::collection::vec((arb_demand(), 0u64..40_000), 1..40),
    ) {
        let mut snap = synth_cluster(seed, 4);
        let p = by_name(NAMES[policy]).unwrap_or_else(|| unreachable!());
        let mix: Vec<Demand> = demands.iter().enumerate().map(|(i, (g, _))| Demand::new(format!("w/{i}").as_str(), g.clone())).collect();
        let w = Workload::from_demands(mix.iter());
        let ctx = Context { workload: &w, seed };
        let mut memo = Memo::new();
        for (i, (gpu, cpu)) in demands.into_iter().enumerate() {
            let d = Demand::new(format!("ns/p{i}").as_str(), gpu).with_cpu(cpu, cpu / 4);
            let fresh = place(&snap, &d, p.as_ref(), &ctx);
            let cached = place_memo(&snap, &d, p.as_ref(), &ctx, &mut memo);
            prop_assert_eq!(&fresh, &cached);
            if let Ok(pl) = fresh {
                let applied = pl.apply(&mut snap, &d, None);
                prop_assert!(applied.is_ok(), "{} returned an infeasible placement: {:?}", NAMES[policy], applied);
                prop_assert_eq!(snap.audit(), Ok(()));
            }
        }
    }
}
