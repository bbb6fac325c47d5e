use super::*;
use crate::mig::ProfileClass;

fn alloc(pod: &str, node: &str, grants: Vec<Grant>) -> Allocation {
    Allocation {
        pod: pod.into(),
        node: node.into(),
        cpu_milli: 1000,
        memory_mib: 1024,
        grants,
        priority: 0,
        gang: None,
        reserved_until_ms: None,
        extended: Vec::new(),
    }
}

fn snap(nodes: Vec<Node>) -> Snapshot {
    Snapshot::new(nodes).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_whole_gpu_cannot_be_granted_twice() {
    let mut s = snap(vec![Node::test("n1").with_gpus(2, "H100-80GB")]);
    s.allocate(alloc("a/p1", "n1", vec![Grant::Whole { gpu: 0 }])).unwrap_or_else(|e| panic!("{e}"));
    let e = s.allocate(alloc("a/p2", "n1", vec![Grant::Whole { gpu: 0 }])).expect_err("double grant");
    assert_eq!(e.to_string(), "node n1: GPU 0 would be over-committed");
    // Two grants of the same GPU inside one allocation are caught too.
    let e = s.allocate(alloc("a/p3", "n1", vec![Grant::Whole { gpu: 1 }, Grant::Whole { gpu: 1 }]));
    assert!(e.is_err());
    assert_eq!(s.node(&"n1".into()).map(|n| n.gpus[1].used_milli()), Some(0));
}

#[test]
fn shares_add_up_to_at_most_one_gpu() {
    let mut s = snap(vec![Node::test("n1").with_shared_gpus(1, "T4")]);
    s.allocate(alloc("a/p1", "n1", vec![Grant::Share { gpu: 0, milli: 600 }])).unwrap_or_else(|e| panic!("{e}"));
    assert!(s.allocate(alloc("a/p2", "n1", vec![Grant::Share { gpu: 0, milli: 500 }])).is_err());
    s.allocate(alloc("a/p3", "n1", vec![Grant::Share { gpu: 0, milli: 400 }])).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.node(&"n1".into()).map(|n| n.gpus[0].free_milli()), Some(0));
    s.release(&"a/p1".into()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.node(&"n1".into()).map(|n| n.gpus[0].free_milli()), Some(600));
    // A whole-GPU grant on a shared GPU needs it empty.
    assert!(s.allocate(alloc("a/p4", "n1", vec![Grant::Whole { gpu: 0 }])).is_err());
}

#[test]
fn shares_are_refused_on_exclusive_gpus_and_cpu_is_counted() {
    let mut s = snap(vec![Node::test("n1").with_capacity(1500, 4096).with_gpus(1, "T4")]);
    assert!(s.allocate(alloc("a/p1", "n1", vec![Grant::Share { gpu: 0, milli: 100 }])).is_err());
    s.allocate(alloc("a/p2", "n1", vec![])).unwrap_or_else(|e| panic!("{e}"));
    let e = s.allocate(alloc("a/p3", "n1", vec![])).expect_err("cpu over-committed");
    assert!(e.to_string().contains("cpu"), "{e}");
}

#[test]
fn mig_instances_are_created_allocated_and_protected() {
    let mut s = snap(vec![Node::test("n1").with_gpus(1, "H100-80GB")]);
    let n1: NodeName = "n1".into();
    s.apply(&n1, MigOp::SetMode { gpu: 0, mode: GpuMode::Mig }).unwrap_or_else(|e| panic!("{e}"));
    s.apply(&n1, MigOp::Create { gpu: 0, class: ProfileClass::G3, start: 4 }).unwrap_or_else(|e| panic!("{e}"));
    let e = s.apply(&n1, MigOp::Create { gpu: 0, class: ProfileClass::G4, start: 0 });
    assert!(e.is_ok(), "4g+3g is legal: {e:?}");
    let bad = s.apply(&n1, MigOp::Create { gpu: 0, class: ProfileClass::G1, start: 2 }).expect_err("overlap");
    assert!(bad.to_string().contains("overlaps"), "{bad}");
    s.allocate(alloc("a/p1", "n1", vec![Grant::Mig { gpu: 0, class: ProfileClass::G3, start: 4 }]))
        .unwrap_or_else(|e| panic!("{e}"));
    let busy = s.apply(&n1, MigOp::Destroy { gpu: 0, class: ProfileClass::G3, start: 4 }).expect_err("busy");
    assert!(busy.to_string().contains("allocated"), "{busy}");
    let mode = s.apply(&n1, MigOp::SetMode { gpu: 0, mode: GpuMode::Full }).expect_err("not idle");
    assert!(mode.to_string().contains("idle"), "{mode}");
    // A grant of an instance that does not exist is refused.
    let none = s.allocate(alloc("a/p2", "n1", vec![Grant::Mig { gpu: 0, class: ProfileClass::G1, start: 6 }]));
    assert!(none.is_err());
    assert_eq!(s.reconfigs(), 2);
    assert_eq!(s.audit(), Ok(()));
}

#[test]
fn mig_mode_is_refused_on_gpus_without_mig() {
    let mut s = snap(vec![Node::test("n1").with_gpus(1, "T4")]);
    let e = s.apply(&"n1".into(), MigOp::SetMode { gpu: 0, mode: GpuMode::Mig }).expect_err("T4 has no MIG");
    assert_eq!(e.to_string(), "node n1 GPU 0 (T4) does not support MIG");
}

#[test]
fn rollback_restores_an_equal_snapshot_and_commit_keeps_changes() {
    let mut s = snap(vec![Node::test("n1").with_gpus(8, "H100-80GB").with_mig(0, &["3g.40gb"])]);
    let before = s.clone();
    let n1: NodeName = "n1".into();
    let cp = s.checkpoint();
    s.allocate(alloc("a/p1", "n1", vec![Grant::Whole { gpu: 1 }])).unwrap_or_else(|e| panic!("{e}"));
    let inner = s.checkpoint();
    s.apply(&n1, MigOp::Create { gpu: 0, class: ProfileClass::G3, start: 4 }).unwrap_or_else(|e| panic!("{e}"));
    s.apply(&n1, MigOp::SetMode { gpu: 2, mode: GpuMode::Mig }).unwrap_or_else(|e| panic!("{e}"));
    s.add_node(Node::test("n2")).unwrap_or_else(|e| panic!("{e}"));
    s.rollback(inner);
    assert_eq!(s.node(&"n2".into()), None);
    assert_eq!(s.node(&n1).map(|n| n.gpus[2].mode()), Some(GpuMode::Full));
    s.release(&"a/p1".into()).unwrap_or_else(|e| panic!("{e}"));
    s.rollback(cp);
    assert_eq!(s, before);

    let cp = s.checkpoint();
    s.allocate(alloc("a/p1", "n1", vec![Grant::Whole { gpu: 1 }])).unwrap_or_else(|e| panic!("{e}"));
    s.commit(cp);
    assert!(s.allocation(&"a/p1".into()).is_some());
    assert_eq!(s.audit(), Ok(()));
}

#[test]
fn nodes_holding_pods_cannot_be_removed() {
    let mut s = snap(vec![Node::test("n1").with_gpus(1, "T4")]);
    s.allocate(alloc("a/p1", "n1", vec![Grant::Whole { gpu: 0 }])).unwrap_or_else(|e| panic!("{e}"));
    let e = s.remove_node(&"n1".into()).expect_err("in use");
    assert_eq!(e.to_string(), "node n1 still holds pod a/p1");
    assert!(matches!(s.add_node(Node::test("n1")), Err(Error::DuplicateNode(_))));
}

#[test]
fn iteration_is_in_name_order_whatever_the_insert_order() {
    let s = snap(vec![Node::test("b"), Node::test("c"), Node::test("a")]);
    let names: Vec<&str> = s.nodes().iter().map(|n| n.name.0.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
}

#[test]
fn reservations_are_confirmed_in_place() {
    let mut s = snap(vec![Node::test("n1").with_gpus(1, "T4")]);
    let mut a = alloc("a/p1", "n1", vec![Grant::Whole { gpu: 0 }]);
    a.reserved_until_ms = Some(5_000);
    s.allocate(a).unwrap_or_else(|e| panic!("{e}"));
    s.confirm(&"a/p1".into()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.allocation(&"a/p1".into()).and_then(|a| a.reserved_until_ms), None);
    assert_eq!(s.audit(), Ok(()));
}

#[test]
fn nodes_added_at_once_are_sorted_indexed_and_checked_like_one_by_one() {
    let mut s = snap(vec![Node::test("b").with_gpus(1, "H100-80GB")]);
    let mut busy = Node::test("x").with_gpus(1, "H100-80GB");
    busy.used_cpu_milli = 1;
    let errors = s.add_nodes([
        Node::test("d").with_gpus(2, "H100-80GB"),
        Node::test("a").with_gpus(1, "H100-80GB"),
        Node::test("b").with_gpus(1, "H100-80GB"),
        Node::test("c"),
        Node::test("a"),
        busy,
    ]);
    let why: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(why.len(), 3, "{why:?}");
    assert!(matches!(errors[0], Error::DuplicateNode(ref n) if n.0 == "b"), "{why:?}");
    assert!(matches!(errors[1], Error::DuplicateNode(ref n) if n.0 == "a"), "{why:?}");
    assert!(why[2].contains("added with allocations"), "{why:?}");
    let names: Vec<&str> = s.nodes().iter().map(|n| n.name.0.as_str()).collect();
    assert_eq!(names, ["a", "b", "c", "d"]);
    for (i, n) in s.nodes().iter().enumerate() {
        assert_eq!(s.node_index(&n.name), Some(i));
    }
    assert_eq!(s.max_node_gpus(), 2);
    // Journaled like add_node: a rollback takes them out again.
    let cp = s.checkpoint();
    assert!(s.add_nodes([Node::test("e")]).is_empty());
    s.rollback(cp);
    assert!(s.node(&"e".into()).is_none());
}
