//! An incrementally kept state equals a full rebuild after every watch event: random streams
//! of Node, GpuNode and Pod changes (bound pods with signed, replayed, forged and malformed
//! assignments, other plugins' pods, pods bound to unlisted nodes or naming another node) are
//! applied one event at a time to [`Incremental`], rebuilding only the nodes the event touches,
//! and compared with `build_checked` over every object: the snapshot, the side tables, the
//! refusals and warnings, and the core's decisions with a memo kept warm across events.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node as KubeNode, Pod};
use proptest::prelude::*;
use serde_json::json;
use tessera_api::gpunode::GpuNode;
use tessera_api::incremental::{Incremental, NodeObjects};
use tessera_api::signing::Keyring;
use tessera_api::snapshot::{Built, SHARING_LABEL, build_checked, node_names_of};
use tessera_core::policy::{Memo, Workload, by_name, evaluate, evaluate_memo, place_memo};
use tessera_core::{Context, Demand, GpuDemand, NodeName, place};

const NODES: usize = 4;
const PODS: usize = 10;

fn node_name(i: usize) -> String {
    format!("n{i}")
}

#[derive(Clone, Debug)]
enum Event {
    Node { i: usize, gpus: u8, shared: bool, cordoned: bool, cpu: u8 },
    DeleteNode(usize),
    GpuNode { i: usize, gpus: u8, modes: [u8; 3], held: Option<(usize, u8)> },
    DeleteGpuNode(usize),
    Pod { j: usize, node: Option<usize>, assigned: usize, kind: u8, gpu: u8, phase: u8, epoch: u16 },
    DeletePod(usize),
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        3 => (0..NODES, 0u8..4, any::<bool>(), prop::bool::weighted(0.2), 1u8..5)
            .prop_map(|(i, gpus, shared, cordoned, cpu)| Event::Node { i, gpus, shared, cordoned, cpu }),
        1 => (0..NODES).prop_map(Event::DeleteNode),
        2 => (0..NODES, 0u8..4, [0u8..6, 0u8..6, 0u8..6], prop::option::of((0..PODS, 0u8..3)))
            .prop_map(|(i, gpus, modes, held)| Event::GpuNode { i, gpus, modes, held }),
        1 => (0..NODES).prop_map(Event::DeleteGpuNode),
        8 => (0..PODS, prop::option::weighted(0.9, 0..NODES + 1), 0..NODES + 1, 0u8..9, 0u8..3, 0u8..6, any::<u16>())
            .prop_map(|(j, node, assigned, kind, gpu, phase, epoch)| Event::Pod { j, node, assigned, kind, gpu, phase, epoch }),
        2 => (0..PODS).prop_map(Event::DeletePod),
    ]
}

/// The watch caches, by name.
#[derive(Default)]
struct Objects {
    nodes: BTreeMap<String, Arc<KubeNode>>,
    gpunodes: BTreeMap<String, Arc<GpuNode>>,
    pods: BTreeMap<String, Arc<Pod>>,
}

impl NodeObjects for Objects {
    fn node(&self, name: &str) -> Option<Arc<KubeNode>> {
        self.nodes.get(name).cloned()
    }
    fn gpunode(&self, name: &str) -> Option<Arc<GpuNode>> {
        self.gpunodes.get(name).cloned()
    }
    fn pods(&self, name: &str) -> Vec<Arc<Pod>> {
        self.pods.values().filter(|p| node_names_of(p).iter().any(|n| n == name)).cloned().collect()
    }
}

fn kube_node(i: usize, gpus: u8, shared: bool, cordoned: bool, cpu: u8) -> KubeNode {
    let mut labels = json!({"nvidia.com/gpu.product": "A100-80GB", "nvidia.com/gpu.memory": "81920"});
    if shared {
        labels[SHARING_LABEL] = json!("time-sliced");
    }
    serde_json::from_value(json!({
        "metadata": {"name": node_name(i), "labels": labels},
        "spec": {"unschedulable": cordoned},
        "status": {"allocatable": {"cpu": format!("{}", u32::from(cpu) * 4), "memory": "64Gi",
                                   "nvidia.com/gpu": gpus.to_string()}}
    }))
    .unwrap()
}

fn gpunode(i: usize, gpus: u8, modes: [u8; 3], held: Option<(usize, u8)>) -> GpuNode {
    let n = node_name(i);
    let gpus: Vec<_> = (0..gpus)
        .map(|g| {
            let m = modes[usize::from(g) % 3];
            let mig = m == 1 || m == 2;
            let instances = if mig {
                let mut v =
                    vec![json!({"profile": "3g.40gb", "start": 0, "size": 4, "uuid": format!("MIG-{n}-{g}-0")})];
                if m == 1 {
                    v.push(json!({"profile": "3g.40gb", "start": 4, "size": 4, "uuid": format!("MIG-{n}-{g}-4")}));
                }
                v
            } else {
                vec![]
            };
            let mut s = json!({"index": g, "uuid": format!("GPU-{n}-{g}"), "product": "A100-80GB", "memoryMib": 81920,
                               "migCapable": true, "mode": if mig { "mig" } else { "full" },
                               "health": if m == 5 { "Unhealthy" } else { "Healthy" }, "instances": instances});
            if m == 3 {
                s["pendingMode"] = json!("mig");
            }
            s
        })
        .collect();
    let held: Vec<_> = held
        .map(|(j, g)| json!({"pod": format!("ml/p{j}"), "container": "c", "resource": "nvidia.com/gpu", "uuid": format!("GPU-{n}-{g}")}))
        .into_iter()
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "tessera.dev/v1alpha1", "kind": "GpuNode", "metadata": {"name": n}, "spec": {},
        "status": {"gpus": gpus, "held": held}
    }))
    .unwrap()
}

#[allow(clippy::too_many_arguments)]
fn pod(
    ring: &Keyring,
    j: usize,
    node: Option<usize>,
    assigned: usize,
    kind: u8,
    gpu: u8,
    phase: u8,
    epoch: u16,
) -> Pod {
    let uid = format!("u{j}-{epoch}");
    let target = node_name(assigned);
    let devices = match kind {
        6 => {
            json!([{"gpu": format!("GPU-{target}-{gpu}"), "index": gpu, "profile": "3g.40gb", "start": (epoch % 2) * 4}])
        }
        7 => json!([{"gpu": format!("GPU-{target}-{gpu}"), "index": gpu, "share": 300}]),
        _ => json!([{"gpu": format!("GPU-{target}-{gpu}"), "index": gpu}]),
    };
    let a = json!({"node": target, "devices": devices}).to_string();
    let mut ann = serde_json::Map::new();
    let mut limits = json!({"cpu": "4", "memory": "8Gi"});
    match kind {
        0 | 6 | 7 => {
            ann.insert("tessera.dev/assignment-signature".into(), ring.sign(&uid, &target, &a).into());
        }
        1 => {
            ann.insert("tessera.dev/assignment-signature".into(), ring.sign("u-gone", &target, &a).into());
        }
        _ => {}
    }
    match kind {
        0..=2 | 6 | 7 => {
            ann.insert("tessera.dev/assignment".into(), a.into());
            limits["tessera.dev/gpu"] = json!("1");
        }
        3 => {
            ann.insert("tessera.dev/assignment".into(), "{not json".into());
            limits["tessera.dev/gpu"] = json!("1");
        }
        4 => limits["nvidia.com/gpu"] = json!("1"),
        _ => {}
    }
    let mut spec = json!({"containers": [{"name": "c", "resources": {"limits": limits, "requests": limits}}]});
    if let Some(n) = node {
        spec["nodeName"] = json!(node_name(n));
    }
    let phase = ["Running", "Running", "Pending", "Running", "Succeeded", "Failed"][usize::from(phase)];
    serde_json::from_value(json!({
        "metadata": {"name": format!("p{j}"), "namespace": "ml", "uid": uid, "annotations": ann},
        "spec": spec, "status": {"phase": phase}
    }))
    .unwrap()
}

/// Applies one event to the caches; returns the node names it touches.
fn apply(objs: &mut Objects, ring: &Keyring, ev: &Event) -> BTreeSet<String> {
    let mut dirty = BTreeSet::new();
    match *ev {
        Event::Node { i, gpus, shared, cordoned, cpu } => {
            objs.nodes.insert(node_name(i), Arc::new(kube_node(i, gpus, shared, cordoned, cpu)));
            dirty.insert(node_name(i));
        }
        Event::DeleteNode(i) => {
            objs.nodes.remove(&node_name(i));
            dirty.insert(node_name(i));
        }
        Event::GpuNode { i, gpus, modes, held } => {
            objs.gpunodes.insert(node_name(i), Arc::new(gpunode(i, gpus, modes, held)));
            dirty.insert(node_name(i));
        }
        Event::DeleteGpuNode(i) => {
            objs.gpunodes.remove(&node_name(i));
            dirty.insert(node_name(i));
        }
        Event::Pod { j, node, assigned, kind, gpu, phase, epoch } => {
            let p = Arc::new(pod(ring, j, node, assigned, kind, gpu, phase, epoch));
            dirty.extend(node_names_of(&p));
            if let Some(old) = objs.pods.insert(format!("p{j}"), p) {
                dirty.extend(node_names_of(&old));
            }
        }
        Event::DeletePod(j) => {
            if let Some(old) = objs.pods.remove(&format!("p{j}")) {
                dirty.extend(node_names_of(&old));
            }
        }
    }
    dirty
}

fn sorted<T: std::fmt::Debug>(it: impl IntoIterator<Item = T>) -> Vec<String> {
    let mut v: Vec<String> = it.into_iter().map(|x| format!("{x:?}")).collect();
    v.sort();
    v
}

fn demands() -> Vec<Demand> {
    [
        GpuDemand::Whole { count: 1 },
        GpuDemand::Whole { count: 2 },
        GpuDemand::Share { milli: 300 },
        GpuDemand::Mig { profile: "3g.40gb".into() },
    ]
    .into_iter()
    .enumerate()
    .map(|(i, g)| Demand::new(format!("ml/new-{i}").as_str(), g).with_cpu(2000, 4096))
    .collect()
}

fn check(inc: &Incremental, full: &Built, memos: &mut [(Memo, Memo)], step: usize) {
    let snap = inc.snapshot();
    assert_eq!(snap, &full.snap, "step {step}: snapshots differ");
    snap.audit().unwrap_or_else(|e| panic!("step {step}: {e}"));
    assert_eq!(snap.reconfigs(), full.snap.reconfigs(), "step {step}");
    assert_eq!(snap.max_node_cpu_milli(), full.snap.max_node_cpu_milli(), "step {step}");
    assert_eq!(snap.max_node_gpus(), full.snap.max_node_gpus(), "step {step}");
    for n in snap.nodes() {
        assert_eq!(snap.node(&n.name).map(|x| &x.name), Some(&n.name), "step {step}: name index");
    }
    assert_eq!(inc.uids(), &full.uids, "step {step}: uids");
    assert_eq!(inc.mig_uuids(), &full.mig_uuids, "step {step}: MIG uuids");
    assert_eq!(sorted(inc.refused()), sorted(&full.refused), "step {step}: refusals");
    assert_eq!(sorted(inc.warnings()), sorted(&full.warnings), "step {step}: warnings");
    let ds = demands();
    let workload = Workload::from_demands(ds.iter());
    let ctx = Context { workload: &workload, seed: 3 };
    let policy = by_name("tessera").unwrap();
    for (d, (pm, em)) in ds.iter().zip(memos.iter_mut()) {
        assert_eq!(
            place(&full.snap, d, policy.as_ref(), &ctx),
            place_memo(snap, d, policy.as_ref(), &ctx, pm),
            "step {step}: placement of {:?}",
            d.gpu
        );
        assert_eq!(
            evaluate(&full.snap, d, policy.as_ref(), &ctx, None).ok(),
            evaluate_memo(snap, d, policy.as_ref(), &ctx, None, em).ok(),
            "step {step}: verdicts for {:?}",
            d.gpu
        );
    }
}

fn run(events: &[Event], checked: bool) {
    let ring = Keyring::parse("k1 dGVzc2VyYS1zbmFwc2hvdC10ZXN0LWtleS0zMmJ5dGVz").unwrap();
    let keys = checked.then_some(&ring);
    let mut objs = Objects::default();
    let mut inc = Incremental::new(&[], &[], &[], keys);
    let mut memos: Vec<(Memo, Memo)> = demands().iter().map(|_| (Memo::new(), Memo::new())).collect();
    for (step, ev) in events.iter().enumerate() {
        let dirty = apply(&mut objs, &ring, ev);
        let before: BTreeMap<NodeName, u64> =
            inc.snapshot().nodes().iter().map(|n| (n.name.clone(), n.version())).collect();
        inc.apply(&dirty, &objs, keys).unwrap_or_else(|e| panic!("step {step}: {e}"));
        // Nodes the event did not touch keep their versions (the memo stays warm for them).
        for n in inc.snapshot().nodes() {
            if !dirty.contains(&n.name.0) {
                assert_eq!(before.get(&n.name), Some(&n.version()), "step {step}: {} was not touched", n.name);
            }
        }
        // The caches list objects in no particular order: the full rebuild reads them reversed.
        let nodes: Vec<_> = objs.nodes.values().rev().cloned().collect();
        let gns: Vec<_> = objs.gpunodes.values().rev().cloned().collect();
        let pods: Vec<_> = objs.pods.values().rev().cloned().collect();
        let full = build_checked(&nodes, &gns, &pods, keys);
        check(&inc, &full, &mut memos, step);
        // A fresh incremental state built in full is the same too.
        if step % 10 == 9 {
            let again = Incremental::new(&nodes, &gns, &pods, keys);
            assert_eq!(again.snapshot(), &full.snap, "step {step}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]

    #[test]
    fn incremental_rebuilds_equal_full_rebuilds(events in prop::collection::vec(event(), 1..40), checked in prop::bool::weighted(0.8)) {
        run(&events, checked);
    }
}

#[test]
fn a_pod_recreated_on_another_node_moves_with_both_nodes_rebuilt_in_one_batch() {
    let ring = Keyring::parse("k1 dGVzc2VyYS1zbmFwc2hvdC10ZXN0LWtleS0zMmJ5dGVz").unwrap();
    let mut objs = Objects::default();
    let mut dirty = BTreeSet::new();
    for i in 0..2 {
        dirty.extend(apply(&mut objs, &ring, &Event::Node { i, gpus: 2, shared: false, cordoned: false, cpu: 4 }));
    }
    let mut inc = Incremental::new(&[], &[], &[], Some(&ring));
    inc.apply(&dirty, &objs, Some(&ring)).unwrap();
    let on = |node| Event::Pod { j: 0, node: Some(node), assigned: node, kind: 4, gpu: 0, phase: 0, epoch: 0 };
    let d = apply(&mut objs, &ring, &on(1));
    inc.apply(&d, &objs, Some(&ring)).unwrap();
    // Deleted and recreated on n0 before the state catches up: one batch names both nodes,
    // n0 first.
    let mut d = apply(&mut objs, &ring, &Event::DeletePod(0));
    d.extend(apply(&mut objs, &ring, &on(0)));
    inc.apply(&d, &objs, Some(&ring)).unwrap();
    let a = inc.snapshot().allocation(&"ml/p0".into()).map(|a| a.node.0.clone());
    assert_eq!(a.as_deref(), Some("n0"));
    inc.snapshot().audit().unwrap();
}
