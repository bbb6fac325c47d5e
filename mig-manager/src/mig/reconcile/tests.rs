use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use tessera_api::gpunode::{GpuSpec, MigInstanceSpec, Mode};
use tessera_core::MigOp;
use tessera_core::mig::MigProduct;

use super::*;
use crate::gpu::fake::{FakeGpus, OpMatch};
use crate::mig::plan::BlockReason;

fn spec(index: u32, instances: &[(&str, u8)]) -> GpuSpec {
    GpuSpec {
        index,
        mode: Mode::Mig,
        instances: instances.iter().map(|(p, s)| MigInstanceSpec { profile: (*p).into(), start: *s }).collect(),
    }
}

fn setup() -> (Arc<FakeGpus>, Reconciler) {
    let fake = Arc::new(FakeGpus::new(MigProduct::H100_80GB, 2, true).with_mig(0, &["4g.40gb", "1g.10gb"]).unwrap());
    let r = Reconciler::new(fake.clone());
    (fake, r)
}

fn uuid_at(fake: &FakeGpus, gpu: u32, start: u8) -> String {
    fake.mig_devices(gpu).unwrap().into_iter().find(|m| m.instance.start == start).unwrap().uuid
}

fn present(fake: &FakeGpus, uuid: &str) -> bool {
    fake.devices().unwrap().iter().any(|g| fake.mig_devices(g.index).unwrap().iter().any(|m| m.uuid == uuid))
}

fn desired() -> Vec<GpuSpec> {
    vec![spec(0, &[("4g.40gb", 0), ("2g.20gb", 4), ("1g.10gb", 6)]), spec(1, &[("3g.40gb", 0), ("3g.40gb", 4)])]
}

#[test]
fn reconcile_converges_and_a_second_pass_does_nothing() {
    let (fake, r) = setup();
    let none = BTreeSet::new;
    let out = r.reconcile(&desired(), &none).unwrap();
    assert!(out.converged, "{out:?}");
    assert!(out.failed.is_empty());
    let again = r.reconcile(&desired(), &none).unwrap();
    assert!(again.applied.is_empty() && again.converged);
    assert_eq!(fake.mig_devices(1).unwrap().len(), 2);
}

#[test]
fn failing_op_is_retried_by_the_next_pass() {
    let (fake, r) = setup();
    let busy = uuid_at(&fake, 0, 0);
    let in_use = || BTreeSet::from([busy.clone()]);
    fake.fail_next(OpMatch::AnyCreate, 2);
    let out = r.reconcile(&desired(), &in_use).unwrap();
    assert!(!out.converged);
    assert_eq!(out.failed.len(), 2, "one failure per GPU, the rest skipped");
    assert!(out.failed.iter().all(|(_, e)| e.kind() == "injected"));
    let out = r.reconcile(&desired(), &in_use).unwrap();
    assert!(out.converged, "{out:?}");
    assert!(present(&fake, &busy));
}

#[test]
fn vanished_gpu_is_reported_and_converges_when_it_returns() {
    let (fake, r) = setup();
    fake.remove_gpu(1);
    let none = BTreeSet::new;
    let out = r.reconcile(&desired(), &none).unwrap();
    assert!(!out.converged);
    assert_eq!(out.blocked, vec![Blocked { gpu: 1, reason: BlockReason::GpuMissing }]);
    assert_eq!(fake.mig_devices(0).unwrap().len(), 3, "the other GPU converged");
    fake.restore_gpu(1);
    assert!(r.reconcile(&desired(), &none).unwrap().converged);
}

#[test]
fn device_allocated_after_planning_is_not_destroyed() {
    let (fake, r) = setup();
    fake.set_slow(Duration::from_millis(5));
    let victim = uuid_at(&fake, 0, 4); // the 1g.10gb at 4, which the spec wants gone
    let calls = AtomicUsize::new(0);
    // The first read (planning) sees nothing in use; from then on the device plugin holds it.
    let in_use = || {
        if calls.fetch_add(1, Ordering::SeqCst) == 0 { BTreeSet::new() } else { BTreeSet::from([victim.clone()]) }
    };
    let out = r.reconcile(&desired(), &in_use).unwrap();
    assert!(present(&fake, &victim));
    assert!(out.skipped.contains(&MigOp::Destroy { gpu: 0, class: tessera_core::mig::ProfileClass::G1, start: 4 }));
    assert!(matches!(out.blocked[0].reason, BlockReason::InUse { .. }));
}

#[test]
fn crash_mid_plan_then_restart_converges_without_destroying_in_use() {
    let (fake, r) = setup();
    let busy = uuid_at(&fake, 0, 0);
    let in_use = || BTreeSet::from([busy.clone()]);
    fake.crash_after(2);
    let out = r.reconcile(&desired(), &in_use).unwrap();
    assert_eq!(out.applied.len(), 2);
    assert!(!out.converged);
    // The agent restarts: a fresh reconciler with no memory of the earlier pass.
    fake.recover();
    let restarted = Reconciler::new(fake.clone());
    let out = restarted.reconcile(&desired(), &in_use).unwrap();
    assert!(out.converged, "{out:?}");
    assert!(present(&fake, &busy));
}

#[test]
fn running_process_blocks_destroy_even_without_an_assignment() {
    let (fake, r) = setup();
    let busy = uuid_at(&fake, 0, 4);
    fake.set_busy(&busy, true);
    let out = r.reconcile(&[spec(0, &[("7g.80gb", 0)])], &BTreeSet::new).unwrap();
    assert!(present(&fake, &busy));
    assert!(!out.converged);
    assert!(out.failed.is_empty(), "the planner must not even try");
}

// Random faults between passes: in-use devices survive every pass, and once faults stop the
// node converges (when reachable) within one pass.
#[derive(Clone, Debug)]
enum Fault {
    None,
    FailCreate,
    FailDestroy,
    Crash(usize),
    Vanish(u32),
    Slow,
}

fn arb_fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        Just(Fault::None),
        Just(Fault::FailCreate),
        Just(Fault::FailDestroy),
        (0usize..4).prop_map(Fault::Crash),
        (0u32..2).prop_map(Fault::Vanish),
        Just(Fault::Slow),
    ]
}

const LAYOUTS: &[&[(&str, u8)]] = &[
    &[("7g.80gb", 0)],
    &[("4g.40gb", 0), ("3g.40gb", 4)],
    &[("3g.40gb", 0), ("3g.40gb", 4)],
    &[("2g.20gb", 0), ("2g.20gb", 2), ("2g.20gb", 4), ("1g.10gb", 6)],
    &[("1g.10gb", 0), ("1g.10gb", 1), ("1g.10gb", 2), ("1g.10gb", 3), ("1g.10gb", 4), ("1g.10gb", 5), ("1g.10gb", 6)],
    &[],
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn faults_never_destroy_in_use_devices_and_the_node_converges_after_each(
        steps in prop::collection::vec((0..LAYOUTS.len(), 0..LAYOUTS.len(), arb_fault(), any::<u8>()), 1..6)
    ) {
        let fake = Arc::new(FakeGpus::new(MigProduct::H100_80GB, 2, true));
        let in_use: Arc<Mutex<BTreeSet<String>>> = Arc::default();
        for (l0, l1, fault, pick) in steps {
            let want = vec![spec(0, LAYOUTS[l0]), spec(1, LAYOUTS[l1])];
            // Hand a few existing devices to "containers".
            {
                let mut held = in_use.lock().unwrap();
                held.clear();
                for (n, u) in fake.all_mig_uuids().into_iter().enumerate() {
                    if pick & (1 << (n % 8)) != 0 { held.insert(u); }
                }
            }
            let held: BTreeSet<String> = in_use.lock().unwrap().clone();
            match fault {
                Fault::None => {}
                Fault::FailCreate => fake.fail_next(OpMatch::AnyCreate, 1),
                Fault::FailDestroy => fake.fail_next(OpMatch::AnyDestroy, 1),
                Fault::Crash(n) => fake.crash_after(n),
                Fault::Vanish(g) => fake.remove_gpu(g),
                Fault::Slow => fake.set_slow(Duration::from_millis(1)),
            }
            let read = || in_use.lock().unwrap().clone();
            let _ = Reconciler::new(fake.clone()).reconcile(&want, &read).unwrap();
            for u in &held {
                prop_assert!(fake.all_mig_uuids().contains(u), "in-use {} destroyed by a faulty pass", u);
            }
            // Faults stop (the GPU comes back); a restarted agent converges in one pass.
            fake.recover();
            fake.restore_gpu(0);
            fake.restore_gpu(1);
            fake.set_slow(Duration::ZERO);
            let out = Reconciler::new(fake.clone()).reconcile(&want, &read).unwrap();
            for u in &held {
                prop_assert!(present(&fake, u), "in-use {} destroyed", u);
            }
            let reachable = out.observed.gpus.iter().all(|g| {
                g.mig.iter().filter(|m| held.contains(&m.uuid)).all(|m| {
                    want[g.info.index as usize].instances.iter().any(|i| {
                        i.start == m.instance.start
                            && MigProduct::H100_80GB.geometry().profile_by_name(&i.profile).map(|p| p.class) == Some(m.instance.class)
                    })
                })
            });
            if reachable {
                prop_assert!(out.converged, "not converged: {:?}", out.blocked);
            } else {
                prop_assert!(out.blocked.iter().any(|b| matches!(b.reason, BlockReason::InUse { .. })), "unreachable but no InUse: {:?}", out.blocked);
            }
        }
    }
}

#[test]
fn a_mode_change_that_needs_a_reset_waits_while_the_gpu_is_used_and_resets_once_idle() {
    let fake = Arc::new(FakeGpus::new(MigProduct::H100_80GB, 1, false).with_reset_required());
    let gpu = fake.devices().unwrap()[0].uuid.clone();
    let r = Reconciler::new(fake.clone());
    let want = [spec(0, &[("7g.80gb", 0)])];
    // The mode is set but stays pending: the instance cannot be created yet.
    let out = r.reconcile(&want, &BTreeSet::new).unwrap();
    assert!(!out.converged);
    assert_eq!(fake.devices().unwrap()[0].pending_mode, Some(tessera_core::GpuMode::Mig));
    // A container holds the GPU: no reset, reported as waiting for one.
    let held = BTreeSet::from([gpu.clone()]);
    let out = r.reconcile(&want, &|| held.clone()).unwrap();
    assert!(out.resets.is_empty() && fake.resets().is_empty());
    assert!(matches!(out.blocked[0].reason, BlockReason::ModePending), "{:?}", out.blocked);
    assert!(out.blocked[0].to_string().contains("GPU reset"));
    // The container is gone: one reset, then the layout.
    let out = r.reconcile(&want, &BTreeSet::new).unwrap();
    assert_eq!(out.resets, [0]);
    assert!(out.converged, "{:?}", out.blocked);
    assert_eq!(fake.devices().unwrap()[0].mode, tessera_core::GpuMode::Mig);
    assert_eq!(fake.mig_devices(0).unwrap().len(), 1);
    let out = r.reconcile(&want, &BTreeSet::new).unwrap();
    assert!(out.resets.is_empty() && out.converged, "a converged GPU is not reset again");
}
