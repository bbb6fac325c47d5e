//! Generated cluster objects for benchmarks: GPU nodes named `node-00000`, `node-00001`, …, each
//! with 8 A100-80GB GPUs (MIG-capable, full mode, healthy) reported by its `GpuNode`.

use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::json;

use crate::gpunode::GpuNode;
use crate::signing::Keyring;

/// The name of generated node `i`.
pub fn node_name(i: usize) -> String {
    format!("node-{i:05}")
}

/// `n` Nodes (128 cpu, 1 TiB, 8 GPUs allocatable) and their `GpuNode`s, in name order.
pub fn a100_nodes(n: usize) -> (Vec<Node>, Vec<GpuNode>) {
    let nodes = (0..n)
        .map(|i| {
            serde_json::from_value(json!({
                "metadata": {"name": node_name(i), "labels": {"kubernetes.io/hostname": node_name(i), "tessera.dev/gpu-node": "true"}},
                "status": {"allocatable": {"cpu": "128", "memory": "1024Gi", "pods": "110", "nvidia.com/gpu": "8", "tessera.dev/gpu": "8"}}
            }))
            .expect("a generated Node decodes")
        })
        .collect();
    let gpunodes = (0..n)
        .map(|i| {
            let gpus: Vec<_> = (0..8)
                .map(|g| {
                    json!({"index": g, "uuid": format!("GPU-{i}-{g}"), "product": "A100-80GB", "memoryMib": 81920,
                           "migCapable": true, "mode": "full", "health": "Healthy", "instances": []})
                })
                .collect();
            serde_json::from_value(json!({"apiVersion": "tessera.dev/v1alpha1", "kind": "GpuNode",
                "metadata": {"name": node_name(i)}, "spec": {}, "status": {"gpus": gpus}}))
            .expect("a generated GpuNode decodes")
        })
        .collect();
    (nodes, gpunodes)
}

/// Running pod `p` (`bench/p-{p}`, UID `uid`) bound to node `p % nodes`, asking for 1 cpu and
/// 1 GiB; the first `gpu_pods_per_node` pods of each node also hold GPU `p / nodes` through an
/// assignment signed with `ring`.
pub fn bound_pod(ring: &Keyring, nodes: usize, p: usize, uid: &str, gpu_pods_per_node: usize) -> Pod {
    let (node, slot) = (p % nodes, p / nodes);
    let mut ann = serde_json::Map::new();
    let mut limits = json!({"cpu": "1", "memory": "1Gi"});
    if slot < gpu_pods_per_node {
        let a = format!(r#"{{"node":"{}","devices":[{{"gpu":"GPU-{node}-{slot}","index":{slot}}}]}}"#, node_name(node));
        ann.insert("tessera.dev/assignment-signature".into(), ring.sign(uid, &node_name(node), &a).into());
        ann.insert("tessera.dev/assignment".into(), a.into());
        limits["tessera.dev/gpu"] = json!("1");
    }
    serde_json::from_value(json!({
        "metadata": {"name": format!("p-{p}"), "namespace": "bench", "uid": uid, "annotations": ann},
        "spec": {"nodeName": node_name(node), "containers": [{"name": "c", "resources": {"limits": limits, "requests": limits}}]},
        "status": {"phase": "Running"}
    }))
    .expect("a generated Pod decodes")
}

#[cfg(test)]
mod tests {
    #[test]
    fn generated_nodes_build_a_snapshot_of_eight_gpus_each() {
        let (nodes, gpunodes) = super::a100_nodes(3);
        let built =
            crate::snapshot::build_checked::<_, _, k8s_openapi::api::core::v1::Pod>(&nodes, &gpunodes, &[], None);
        assert_eq!(built.snap.nodes().len(), 3);
        assert!(built.snap.nodes().iter().all(|n| n.gpus.len() == 8 && n.gpus[0].model == "A100-80GB"));
        assert_eq!(built.snap.nodes()[2].name.0, super::node_name(2));
    }

    #[test]
    fn generated_pods_hold_the_gpus_their_signed_assignments_name() {
        let ring = crate::signing::Keyring::parse("k1 dGVzc2VyYS1yZWJ1aWxkLWJlbmNoLWtleS0zMmJ5dGVzLg").expect("key");
        let (nodes, gpunodes) = super::a100_nodes(2);
        let pods: Vec<_> = (0..6).map(|p| super::bound_pod(&ring, 2, p, &format!("uid-{p}"), 2)).collect();
        let built = crate::snapshot::build_checked(&nodes, &gpunodes, &pods, Some(&ring));
        assert_eq!(built.snap.allocations().len(), 6);
        let gpu_holders = built.snap.allocations().values().filter(|a| !a.grants.is_empty()).count();
        assert_eq!(gpu_holders, 4, "pods 0-3 hold a GPU, 4-5 only cpu");
    }
}
