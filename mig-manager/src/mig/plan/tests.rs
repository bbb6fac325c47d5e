use std::collections::BTreeSet;

use proptest::prelude::*;
use tessera_api::gpunode::{GpuSpec, MigInstanceSpec, Mode};
use tessera_core::mig::{Instance, MigProduct, ProfileClass};
use tessera_core::{GpuMode, MigOp};

use super::*;
use crate::gpu::fake::FakeGpus;
use crate::gpu::{GpuBackend, observe};

fn mig_spec(index: u32, instances: &[(&str, u8)]) -> GpuSpec {
    GpuSpec {
        index,
        mode: Mode::Mig,
        instances: instances.iter().map(|(p, s)| MigInstanceSpec { profile: (*p).into(), start: *s }).collect(),
    }
}

fn full_spec(index: u32) -> GpuSpec {
    GpuSpec { index, mode: Mode::Full, instances: Vec::new() }
}

fn h100(mig: bool) -> FakeGpus {
    FakeGpus::new(MigProduct::H100_80GB, 2, mig)
}

#[test]
fn empty_mig_gpu_gets_the_desired_instances_in_start_order() {
    let f = h100(true);
    let obs = observe(&f).unwrap();
    let p = plan(&[mig_spec(0, &[("1g.10gb", 6), ("3g.40gb", 0)])], &obs, &BTreeSet::new());
    assert_eq!(
        p.ops,
        vec![
            MigOp::Create { gpu: 0, class: ProfileClass::G3, start: 0 },
            MigOp::Create { gpu: 0, class: ProfileClass::G1, start: 6 },
        ]
    );
    assert!(p.blocked.is_empty());
}

#[test]
fn idle_extra_instances_are_destroyed_before_creates() {
    let f = h100(true).with_mig(0, &["4g.40gb"]).unwrap();
    let obs = observe(&f).unwrap();
    let p = plan(&[mig_spec(0, &[("2g.20gb", 0), ("2g.20gb", 2)])], &obs, &BTreeSet::new());
    assert_eq!(p.ops[0], MigOp::Destroy { gpu: 0, class: ProfileClass::G4, start: 0 });
    assert_eq!(p.ops.len(), 3);
}

#[test]
fn in_use_instance_is_kept_and_reported() {
    let f = h100(true).with_mig(0, &["4g.40gb", "1g.10gb"]).unwrap();
    let obs = observe(&f).unwrap();
    let busy = obs.gpus[0].mig[0].uuid.clone();
    let in_use = BTreeSet::from([busy.clone()]);
    let p = plan(&[mig_spec(0, &[("7g.80gb", 0)])], &obs, &in_use);
    // The idle 1g goes; the busy 4g stays; the 7g cannot be created beside it.
    assert_eq!(p.ops, vec![MigOp::Destroy { gpu: 0, class: ProfileClass::G1, start: 4 }]);
    assert_eq!(p.blocked, vec![Blocked { gpu: 0, reason: BlockReason::InUse { uuids: vec![busy] } }]);
}

#[test]
fn mode_switch_waits_for_an_idle_gpu() {
    let f = h100(false);
    let obs = observe(&f).unwrap();
    let gpu_uuid = obs.gpus[0].info.uuid.clone();
    let p = plan(&[mig_spec(0, &[("1g.10gb", 0)])], &obs, &BTreeSet::from([gpu_uuid.clone()]));
    assert!(p.ops.is_empty());
    assert_eq!(p.blocked[0].reason, BlockReason::InUse { uuids: vec![gpu_uuid] });
    let p = plan(&[mig_spec(0, &[("1g.10gb", 0)])], &obs, &BTreeSet::new());
    assert_eq!(p.ops[0], MigOp::SetMode { gpu: 0, mode: GpuMode::Mig });
}

#[test]
fn back_to_full_destroys_everything_then_switches_mode() {
    let f = h100(true).with_mig(1, &["3g.40gb", "3g.40gb"]).unwrap();
    let obs = observe(&f).unwrap();
    let p = plan(&[full_spec(1)], &obs, &BTreeSet::new());
    assert_eq!(p.ops.len(), 3);
    assert_eq!(p.ops[2], MigOp::SetMode { gpu: 1, mode: GpuMode::Full });
}

#[test]
fn invalid_and_impossible_specs_are_reported_not_planned() {
    let f = FakeGpus::parse("h100x1:mig,l4x1").unwrap();
    let obs = observe(&f).unwrap();
    let specs = [mig_spec(0, &[("3g.40gb", 0), ("4g.40gb", 0)]), mig_spec(1, &[]), mig_spec(5, &[]), mig_spec(0, &[])];
    let p = plan(&specs[..3], &obs, &BTreeSet::new());
    assert!(p.ops.is_empty());
    let reasons: Vec<&str> = p.blocked.iter().map(|b| b.reason.reason()).collect();
    assert_eq!(reasons, ["InvalidSpec", "NotMigCapable", "GpuMissing"]);
    let p = plan(&[mig_spec(0, &[("9g.90gb", 0)])], &obs, &BTreeSet::new());
    assert!(p.blocked[0].to_string().contains("9g.90gb"));
}

#[test]
fn unlisted_gpus_are_left_alone_and_a_converged_node_plans_nothing() {
    let f = h100(true).with_mig(0, &["7g.80gb"]).unwrap();
    let obs = observe(&f).unwrap();
    let p = plan(&[mig_spec(0, &[("7g.80gb", 0)])], &obs, &BTreeSet::new());
    assert!(p.is_converged());
}

// ---- property test -------------------------------------------------------------------------

const PRODUCTS: [MigProduct; 3] = [MigProduct::H100_80GB, MigProduct::A100_40GB, MigProduct::A30_24GB];

/// Instances from random (profile, start) attempts, keeping those NVIDIA accepts.
fn build_layout(product: MigProduct, attempts: &[(usize, u8)]) -> Vec<Instance> {
    let geom = product.geometry();
    let mut layout = tessera_core::mig::MigLayout::empty(product);
    for &(p, s) in attempts {
        let profile = &geom.profiles[p % geom.profiles.len()];
        let start = profile.starts[s as usize % profile.starts.len()];
        let _ = layout.create(profile.class, start);
    }
    layout.instances().to_vec()
}

#[derive(Clone, Debug)]
struct Case {
    product: MigProduct,
    observed_mig: bool,
    observed: Vec<Instance>,
    desired_mig: bool,
    desired: Vec<Instance>,
    busy_mask: u8,
    gpu_busy: bool,
}

fn arb_case() -> impl Strategy<Value = Case> {
    (
        0..PRODUCTS.len(),
        any::<bool>(),
        prop::collection::vec((0usize..8, 0u8..8), 0..8),
        any::<bool>(),
        prop::collection::vec((0usize..8, 0u8..8), 0..8),
        any::<u8>(),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(p, om, oa, dm, da, busy_mask, gpu_busy)| {
            let product = PRODUCTS[p];
            Case {
                product,
                observed_mig: om,
                observed: if om { build_layout(product, &oa) } else { Vec::new() },
                desired_mig: dm,
                desired: if dm { build_layout(product, &da) } else { Vec::new() },
                busy_mask,
                gpu_busy,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn plan_never_touches_in_use_instances_and_reaches_the_desired_layout_when_reachable(c in arb_case()) {
        let fake = FakeGpus::new(c.product, 1, c.observed_mig);
        for i in &c.observed {
            fake.apply(&MigOp::Create { gpu: 0, class: i.class, start: i.start }).unwrap();
        }
        let before = observe(&fake).unwrap();
        let gpu = &before.gpus[0];
        let mut in_use: BTreeSet<String> = gpu
            .mig
            .iter()
            .enumerate()
            .filter(|(n, _)| c.busy_mask & (1 << n) != 0)
            .map(|(_, m)| m.uuid.clone())
            .collect();
        if c.gpu_busy {
            in_use.insert(gpu.info.uuid.clone());
        }
        let busy_instances: Vec<Instance> =
            gpu.mig.iter().filter(|m| in_use.contains(&m.uuid)).map(|m| m.instance).collect();
        let geom = c.product.geometry();
        let spec = GpuSpec {
            index: 0,
            mode: if c.desired_mig { Mode::Mig } else { Mode::Full },
            instances: c
                .desired
                .iter()
                .map(|i| MigInstanceSpec { profile: geom.profile(i.class).unwrap().name.into(), start: i.start })
                .collect(),
        };
        let p = plan(std::slice::from_ref(&spec), &before, &in_use);

        // Every op is one NVIDIA accepts, and none destroys an in-use instance.
        for op in &p.ops {
            if let MigOp::Destroy { class, start, .. } = op {
                prop_assert!(!busy_instances.contains(&Instance { class: *class, start: *start }), "destroyed in-use {op:?}");
            }
            if let MigOp::SetMode { .. } = op {
                prop_assert!(in_use.is_empty(), "mode switch on a busy GPU");
            }
            prop_assert!(fake.apply(op).is_ok(), "op refused: {op:?}");
        }
        let after = observe(&fake).unwrap();
        let g = &after.gpus[0];
        for b in &busy_instances {
            prop_assert!(g.mig.iter().any(|m| m.instance == *b), "in-use instance vanished");
        }

        let any_busy = !in_use.is_empty();
        let reachable = match (c.desired_mig, c.observed_mig) {
            (false, false) => true,
            (false, true) | (true, false) => !any_busy,
            (true, true) => busy_instances.iter().all(|b| c.desired.contains(b)),
        };
        if reachable {
            prop_assert!(p.blocked.is_empty(), "reachable but blocked: {:?}", p.blocked);
            let mode = if c.desired_mig { GpuMode::Mig } else { GpuMode::Full };
            prop_assert_eq!(g.info.mode, mode);
            let have: Vec<Instance> = g.mig.iter().map(|m| m.instance).collect();
            prop_assert_eq!(have, c.desired.clone());
            prop_assert!(plan(std::slice::from_ref(&spec), &after, &in_use).is_converged());
        } else {
            prop_assert!(!p.blocked.is_empty(), "unreachable but not reported");
        }
    }
}
