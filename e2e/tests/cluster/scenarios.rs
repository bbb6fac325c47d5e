//! One test per scenario.

use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::{Value, json};
use tessera_e2e::{Cluster, NodeSpec, Options};

use crate::{Ctx, TestFn};

pub fn register(tests: &mut Vec<(String, TestFn)>) {
    macro_rules! t {
        ($f:ident) => {
            tests.push((stringify!($f).to_owned(), Box::new(|ctx| Box::pin($f(ctx)))))
        };
    }
    t!(pods_are_bound_where_tessera_said);
}

/// A single-container pod for the `tessera` profile.
pub fn pod(name: &str, limits: Value, annotations: Value) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "default", "annotations": annotations},
        "spec": {"schedulerName": "tessera", "terminationGracePeriodSeconds": 0,
                 "containers": [{"name": "c", "image": "registry.example.com/none:1", "resources": {"limits": limits}}]}
    })
}

/// Two H100 nodes (one in MIG mode, one whole) advertising `nvidia.com/gpu: 4` as NVIDIA's device
/// plugin would; whole-GPU, multi-GPU, MIG-sized and plain NVIDIA pods each land where tessera's
/// signed assignment says, MIG slices are created through GpuNode spec and reported in status,
/// and the CRDs apply without warnings.
async fn pods_are_bound_where_tessera_said(ctx: Ctx) -> Result<()> {
    let opts = Options {
        nodes: vec![
            NodeSpec::new("gpu-a", "h100x4:mig").resource("nvidia.com/gpu", "4"),
            NodeSpec::new("gpu-b", "h100x4").resource("nvidia.com/gpu", "4"),
        ],
        ..Options::default()
    };
    let c = Cluster::start(&ctx.bins, &ctx.dir, opts).await?;
    ensure!(c.crd_warnings.is_empty(), "the CRDs applied with warnings: {:?}", c.crd_warnings);
    let specs = [
        ("embed-0", json!({"tessera.dev/gpu": "1"}), json!({"tessera.dev/gpu-memory": "4Gi"})),
        ("vlm-0", json!({"tessera.dev/gpu": "1"}), json!({"tessera.dev/gpus": "2"})),
        ("legacy-0", json!({"nvidia.com/gpu": "1"}), json!({})),
    ];
    for (name, limits, annotations) in &specs {
        c.create_pod(pod(name, limits.clone(), annotations.clone())).await?;
    }
    let (node, a) = c.wait_bound("default", "embed-0", Duration::from_secs(60)).await?;
    ensure!(a.devices.len() == 1, "embed-0 got {:?}", a.devices);
    let d = &a.devices[0];
    ensure!(d.profile.is_some() && d.mig.is_some(), "embed-0 (4Gi) should get a MIG slice, got {d:?}");
    let gn = c.gpunodes().get(&node).await?;
    let status = gn.status.unwrap_or_default();
    let gpu = status.gpus.iter().find(|g| g.index == d.index);
    let found = gpu.is_some_and(|g| g.instances.iter().any(|i| Some(&i.uuid) == d.mig.as_ref()));
    ensure!(found, "GpuNode {node} status has no instance {:?} on GPU {}: {:?}", d.mig, d.index, gpu);

    let (vnode, a) = c.wait_bound("default", "vlm-0", Duration::from_secs(60)).await?;
    ensure!(a.devices.len() == 2, "vlm-0 asked for 2 GPUs, got {:?}", a.devices);
    ensure!(a.devices.iter().all(|d| d.profile.is_none()), "vlm-0 should get whole GPUs: {:?}", a.devices);
    let (_, a) = c.wait_bound("default", "legacy-0", Duration::from_secs(60)).await?;
    ensure!(a.devices.len() == 1, "legacy-0 asked for nvidia.com/gpu: 1, got {:?}", a.devices);
    println!("embed-0 on {node}, vlm-0 on {vnode}");
    Ok(())
}
