//! Time of one rebuild of the scheduler's state from the objects the watch caches hold
//! (`tessera_api::snapshot::build_checked`), at cluster sizes given on the command line.
//!
//! `cargo bench -p tessera-api --bench rebuild -- --nodes 5000 --pods 50000 --rounds 5`
//!
//! Nodes have 8 A100-80GB GPUs each, reported by a GpuNode; pods are bound, each holding one
//! GPU through a signed `tessera.dev/assignment` (the checked path a live scheduler runs),
//! spread over the nodes; pods beyond 8 per node ask only for cpu.
#![allow(clippy::disallowed_methods)] // a benchmark: it times the rebuild

use std::time::Instant;

use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::json;
use tessera_api::gpunode::GpuNode;
use tessera_api::signing::Keyring;
use tessera_api::snapshot::build_checked;

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
    let name = |i: usize| format!("node-{i:05}");
    let nodes: Vec<Node> = (0..n_nodes)
        .map(|i| {
            serde_json::from_value(json!({
                "metadata": {"name": name(i), "labels": {"kubernetes.io/hostname": name(i), "tessera.dev/gpu-node": "true"}},
                "status": {"allocatable": {"cpu": "128", "memory": "1024Gi", "pods": "110", "nvidia.com/gpu": "8", "tessera.dev/gpu": "8"}}
            }))
            .expect("node")
        })
        .collect();
    let gpunodes: Vec<GpuNode> = (0..n_nodes)
        .map(|i| {
            let gpus: Vec<_> = (0..8)
                .map(|g| {
                    json!({"index": g, "uuid": format!("GPU-{i}-{g}"), "product": "A100-80GB", "memoryMib": 81920,
                           "migCapable": true, "mode": "full", "health": "Healthy", "instances": []})
                })
                .collect();
            serde_json::from_value(json!({"apiVersion": "tessera.dev/v1alpha1", "kind": "GpuNode",
                "metadata": {"name": name(i)}, "spec": {}, "status": {"gpus": gpus}}))
            .expect("gpunode")
        })
        .collect();
    let pods: Vec<Pod> = (0..n_pods)
        .map(|p| {
            let (node, slot) = (p % n_nodes, p / n_nodes);
            let uid = format!("uid-{p}");
            let mut ann = serde_json::Map::new();
            let mut limits = json!({"cpu": "1", "memory": "1Gi"});
            if slot < 8 {
                let a = format!(r#"{{"node":"{}","devices":[{{"gpu":"GPU-{node}-{slot}","index":{slot}}}]}}"#, name(node));
                ann.insert("tessera.dev/assignment-signature".into(), ring.sign(&uid, &name(node), &a).into());
                ann.insert("tessera.dev/assignment".into(), a.into());
                limits["tessera.dev/gpu"] = json!("1");
            }
            serde_json::from_value(json!({
                "metadata": {"name": format!("p-{p}"), "namespace": "bench", "uid": uid, "annotations": ann},
                "spec": {"nodeName": name(node), "containers": [{"name": "c", "resources": {"limits": limits, "requests": limits}}]},
                "status": {"phase": "Running"}
            }))
            .expect("pod")
        })
        .collect();
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
}
