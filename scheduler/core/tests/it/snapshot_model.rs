//! Model-based property test of the snapshot: random sequences of MIG create/destroy, mode
//! changes, allocate/release and checkpoint/rollback/commit never over-commit a GPU or slice,
//! always leave legal MIG layouts, and rollback restores an equal snapshot.

use proptest::prelude::*;
use tessera_core::mig::ProfileClass;
use tessera_core::{Allocation, GpuMode, Grant, MigOp, Node, NodeName, Snapshot};

#[derive(Clone, Debug)]
enum Op {
    SetMode { node: usize, gpu: u32, mode: GpuMode },
    Create { node: usize, gpu: u32, class: ProfileClass, start: u8 },
    Destroy { node: usize, gpu: u32, pick: usize },
    Allocate { pod: u8, node: usize, grants: Vec<(u32, u8, u32)>, cpu: u64 },
    Release { pod: u8 },
    Checkpoint,
    Rollback,
    Commit,
}

fn arb_class() -> impl Strategy<Value = ProfileClass> {
    prop_oneof![
        Just(ProfileClass::G1),
        Just(ProfileClass::G1Me),
        Just(ProfileClass::G1X2),
        Just(ProfileClass::G2),
        Just(ProfileClass::G3),
        Just(ProfileClass::G4),
        Just(ProfileClass::G7),
    ]
}

fn arb_op() -> impl Strategy<Value = Op> {
    let node = 0usize..3;
    prop_oneof![
        1 => (node.clone(), 0u32..4, prop_oneof![Just(GpuMode::Full), Just(GpuMode::Shared), Just(GpuMode::Mig)])
            .prop_map(|(node, gpu, mode)| Op::SetMode { node, gpu, mode }),
        3 => (node.clone(), 0u32..4, arb_class(), 0u8..8).prop_map(|(node, gpu, class, start)| Op::Create { node, gpu, class, start }),
        1 => (node.clone(), 0u32..4, 0usize..8).prop_map(|(node, gpu, pick)| Op::Destroy { node, gpu, pick }),
        // grant kind: 0 whole, 1 share, 2 MIG (instance picked by index)
        4 => (0u8..12, node, prop::collection::vec((0u32..4, 0u8..3, 1u32..1000), 0..3), 0u64..40_000)
            .prop_map(|(pod, node, grants, cpu)| Op::Allocate { pod, node, grants, cpu }),
        2 => (0u8..12).prop_map(|pod| Op::Release { pod }),
        1 => Just(Op::Checkpoint),
        1 => Just(Op::Rollback),
        1 => Just(Op::Commit),
    ]
}

fn cluster() -> Snapshot {
    Snapshot::new([
        Node::test("a").with_capacity(64_000, 65_536).with_gpus(4, "H100-80GB"),
        Node::test("b").with_capacity(64_000, 65_536).with_shared_gpus(4, "A100-40GB"),
        Node::test("c").with_capacity(64_000, 65_536).with_gpus(4, "A30-24GB").with_mig(1, &["2g.12gb"]),
    ])
    .unwrap_or_default()
}

fn name(s: &Snapshot, i: usize) -> NodeName {
    s.nodes()[i].name.clone()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn snapshot_never_overcommits_and_rollback_is_exact(ops in prop::collection::vec(arb_op(), 1..60)) {
        let mut s = cluster();
        // Each open checkpoint with a copy of the state it must restore.
        let mut open: Vec<(tessera_core::Checkpoint, Snapshot)> = Vec::new();
        for op in ops {
            match op {
                Op::SetMode { node, gpu, mode } => {
                    let n = name(&s, node);
                    let _ = s.apply(&n, MigOp::SetMode { gpu, mode });
                }
                Op::Create { node, gpu, class, start } => {
                    let n = name(&s, node);
                    let _ = s.apply(&n, MigOp::Create { gpu, class, start });
                }
                Op::Destroy { node, gpu, pick } => {
                    let n = name(&s, node);
                    let inst = s.nodes()[node].gpu(gpu).and_then(|g| g.mig_layout()).and_then(|l| {
                        let v = l.instances();
                        (!v.is_empty()).then(|| v[pick % v.len()])
                    });
                    if let Some(i) = inst {
                        let _ = s.apply(&n, MigOp::Destroy { gpu, class: i.class, start: i.start });
                    }
                }
                Op::Allocate { pod, node, grants, cpu } => {
                    let n = &s.nodes()[node];
                    let grants = grants.into_iter().filter_map(|(gpu, kind, milli)| match kind {
                        0 => Some(Grant::Whole { gpu }),
                        1 => Some(Grant::Share { gpu, milli }),
                        _ => n.gpu(gpu).and_then(|g| g.mig_layout()).and_then(|l| {
                            let v = l.instances();
                            (!v.is_empty()).then(|| {
                                let i = v[milli as usize % v.len()];
                                Grant::Mig { gpu, class: i.class, start: i.start }
                            })
                        }),
                    }).collect();
                    let before = s.clone();
                    let a = Allocation {
                        pod: format!("ns/p{pod}").as_str().into(),
                        node: n.name.clone(),
                        cpu_milli: cpu,
                        memory_mib: cpu / 2,
                        grants,
                        priority: 0,
                        gang: None,
                        reserved_until_ms: None,
                        extended: Vec::new(),
                    };
                    if s.allocate(a).is_err() {
                        // A refused allocation changes nothing.
                        prop_assert_eq!(&s, &before);
                    }
                }
                Op::Release { pod } => {
                    let _ = s.release(&format!("ns/p{pod}").as_str().into());
                }
                Op::Checkpoint => {
                    let copy = s.clone();
                    open.push((s.checkpoint(), copy));
                }
                Op::Rollback => {
                    if let Some((cp, copy)) = open.pop() {
                        s.rollback(cp);
                        prop_assert_eq!(&s, &copy);
                    }
                }
                Op::Commit => {
                    if let Some((cp, _)) = open.pop() {
                        s.commit(cp);
                    }
                }
            }
            // Counters equal the sum of live allocations, no share exceeds a GPU, layouts are legal.
            prop_assert_eq!(s.audit(), Ok(()));
            for n in s.nodes() {
                prop_assert!(n.used_cpu_milli() <= n.cpu_milli);
                for g in &n.gpus {
                    prop_assert!(g.used_milli() <= 1000);
                    if let Some(l) = g.mig_layout() {
                        prop_assert!(l.used_compute() <= l.geometry().compute_slices);
                    }
                }
            }
        }
        while let Some((cp, copy)) = open.pop() {
            s.rollback(cp);
            prop_assert_eq!(&s, &copy);
        }
    }
}
