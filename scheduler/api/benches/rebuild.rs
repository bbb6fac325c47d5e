//! Time of one rebuild of the scheduler's state from the objects the watch caches hold
//! (`tessera_api::snapshot::build_checked`), at cluster sizes given on the command line.
//!
//! `cargo bench -p tessera-api --bench rebuild -- --nodes 5000 --pods 50000 --rounds 5`
//!
//! Then the same state kept node by node (`tessera_api::incremental::Incremental`): one
//! `apply` after a single pod event (a pod's requests change) and after a single node event (a
//! Node's labels change), each rebuilding that one node, and the copy of the state the
//! extender hands its verbs after each update (snapshot, UID and MIG tables).
//!
//! Nodes have 8 A100-80GB GPUs each, reported by a GpuNode; pods are bound, each holding one
//! GPU through a signed `tessera.dev/assignment` (the checked path a live scheduler runs),
//! spread over the nodes; pods beyond 8 per node ask only for cpu.
#![allow(clippy::disallowed_methods)] // a benchmark: it times the rebuild

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::core::v1::{Node, Pod};
use tessera_api::gpunode::GpuNode;
use tessera_api::incremental::{Incremental, NodeObjects};
use tessera_api::signing::Keyring;
use tessera_api::snapshot::{build_checked, node_names_of};

/// The caches by node name, as the extender indexes them.
struct Objects {
    nodes: HashMap<String, Arc<Node>>,
    gpunodes: HashMap<String, Arc<GpuNode>>,
    pods: HashMap<String, Vec<Arc<Pod>>>,
}

impl NodeObjects for Objects {
    fn node(&self, name: &str) -> Option<Arc<Node>> {
        self.nodes.get(name).cloned()
    }
    fn gpunode(&self, name: &str) -> Option<Arc<GpuNode>> {
        self.gpunodes.get(name).cloned()
    }
    fn pods(&self, name: &str) -> Vec<Arc<Pod>> {
        self.pods.get(name).cloned().unwrap_or_default()
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2])
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} {v:?} is not a number")))
        .unwrap_or(default)
}

fn main() {
    let (n_nodes, n_pods, rounds) = (arg("--nodes", 5000), arg("--pods", 50_000), arg("--rounds", 5));
    let ring = Keyring::parse("k1 dGVzc2VyYS1yZWJ1aWxkLWJlbmNoLWtleS0zMmJ5dGVzLg").expect("key");
    let name = tessera_api::synthetic::node_name;
    let (nodes, gpunodes) = tessera_api::synthetic::a100_nodes(n_nodes);
    let pods: Vec<Pod> =
        (0..n_pods).map(|p| tessera_api::synthetic::bound_pod(&ring, n_nodes, p, &format!("uid-{p}"), 8)).collect();
    let mut times = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        let built = build_checked(&nodes, &gpunodes, &pods, Some(&ring));
        times.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(built.snap.nodes().len(), n_nodes);
        assert!(built.refused.is_empty(), "{:?}", built.refused.first());
        assert_eq!(built.snap.allocations().len(), n_pods);
    }
    times.sort_by(f64::total_cmp);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "rebuild of {n_nodes} nodes, {n_pods} pods: min {:.1} ms, median {:.1} ms over {rounds} rounds; load average {}",
        times[0],
        times[times.len() / 2],
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );

    // Node by node.
    let nodes: Vec<Arc<Node>> = nodes.into_iter().map(Arc::new).collect();
    let gpunodes: Vec<Arc<GpuNode>> = gpunodes.into_iter().map(Arc::new).collect();
    let pods: Vec<Arc<Pod>> = pods.into_iter().map(Arc::new).collect();
    let mut objs = Objects {
        nodes: nodes.iter().map(|n| (n.metadata.name.clone().unwrap_or_default(), n.clone())).collect(),
        gpunodes: gpunodes.iter().map(|g| (g.metadata.name.clone().unwrap_or_default(), g.clone())).collect(),
        pods: HashMap::new(),
    };
    for p in &pods {
        for n in node_names_of(p) {
            objs.pods.entry(n).or_default().push(p.clone());
        }
    }
    let t = Instant::now();
    let mut inc = Incremental::new(&nodes, &gpunodes, &pods, Some(&ring));
    let initial = ms(t);
    let target = name(n_nodes / 2);
    let (mut pod_ms, mut node_ms, mut copy_ms) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds.max(1) * 4 {
        // A pod event: the first pod on the node asks for more or less cpu.
        let p = Arc::make_mut(&mut objs.pods.get_mut(&target).expect("pods")[0]);
        let cpu = if round % 2 == 0 { "2" } else { "1" };
        for c in &mut p.spec.as_mut().expect("spec").containers {
            let r = c.resources.as_mut().expect("resources");
            for m in [r.requests.as_mut(), r.limits.as_mut()].into_iter().flatten() {
                m.insert("cpu".into(), k8s_openapi::apimachinery::pkg::api::resource::Quantity(cpu.into()));
            }
        }
        let t = Instant::now();
        inc.apply([&target], &objs, Some(&ring)).expect("pod event");
        pod_ms.push(ms(t));
        // A node event: a label changes.
        let n = Arc::make_mut(objs.nodes.get_mut(&target).expect("node"));
        n.metadata.labels.get_or_insert_default().insert("bench/round".into(), round.to_string());
        let t = Instant::now();
        inc.apply([&target], &objs, Some(&ring)).expect("node event");
        node_ms.push(ms(t));
        let t = Instant::now();
        let copy = (inc.snapshot().clone(), inc.uids().clone(), inc.mig_uuids().clone());
        copy_ms.push(ms(t));
        assert_eq!(copy.0.nodes().len(), n_nodes);
    }
    assert_eq!(inc.snapshot().allocations().len(), n_pods);
    assert_eq!(inc.refused().count(), 0);
    let ((p0, pm), (n0, nm), (c0, cm)) = (median(pod_ms), median(node_ms), median(copy_ms));
    println!(
        "incremental at {n_nodes} nodes, {n_pods} pods: initial build {initial:.1} ms; one pod event min {p0:.3} ms, median {pm:.3} ms; one node event min {n0:.3} ms, median {nm:.3} ms; copy of the state for the verbs min {c0:.1} ms, median {cm:.1} ms"
    );
}
