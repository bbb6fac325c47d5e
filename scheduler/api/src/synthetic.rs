//! Generated cluster objects for benchmarks: GPU nodes named `node-00000`, `node-00001`, …, each
//! with 8 A100-80GB GPUs (MIG-capable, full mode, healthy) reported by its `GpuNode`.

use k8s_openapi::api::core::v1::Node;
use serde_json::json;

use crate::gpunode::GpuNode;

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
}
