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
    t!(gang_that_cannot_fit_holds_nothing);
    t!(deletion_frees_devices_at_once);
    t!(nvidia_resource_names);
    t!(malformed_annotations_leave_pods_pending_with_an_event);
}

/// A pod of a gang: `tessera.dev/gang-name` and `tessera.dev/gang-size` plus `extra` annotations.
pub fn gang_pod(name: &str, gang: &str, size: u32, limits: Value, extra: Value) -> Value {
    let mut a = json!({"tessera.dev/gang-name": gang, "tessera.dev/gang-size": size.to_string()});
    if let (Some(a), Some(e)) = (a.as_object_mut(), extra.as_object()) {
        a.extend(e.clone());
    }
    pod(name, limits, a)
}

fn whole_gpus(n: u32) -> (Value, Value) {
    (json!({"tessera.dev/gpu": "1"}), json!({"tessera.dev/gpus": n.to_string()}))
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

/// A gang of 3 × 2 whole GPUs on a 4-GPU node: no member is bound and none carries a reservation,
/// every member is told why, and meanwhile a 4-GPU pod takes all those GPUs.
async fn gang_that_cannot_fit_holds_nothing(ctx: Ctx) -> Result<()> {
    let opts = Options { nodes: vec![NodeSpec::new("gpu-a", "h100x4")], ..Options::default() };
    let c = Cluster::start(&ctx.bins, &ctx.dir, opts).await?;
    let (limits, two) = whole_gpus(2);
    for i in 0..3 {
        c.create_pod(gang_pod(&format!("big-{i}"), "big", 3, limits.clone(), two.clone())).await?;
    }
    let (_, msg) = c
        .wait_event("default", "big-0", Duration::from_secs(30), |r, m| {
            // The bottleneck is the third member, once two hold all four GPUs.
            r == "FailedScheduling"
                && m.contains("gang default/big: member default/big-2 (2 whole GPUs) does not fit after 2 of 3 members were placed")
        })
        .await?;
    println!("big-0: {msg}");
    let (l4, four) = whole_gpus(4);
    c.create_pod(pod("all-four", l4, four)).await?;
    let (_, a) = c.wait_bound("default", "all-four", Duration::from_secs(30)).await?;
    ensure!(a.devices.len() == 4, "all-four got {:?}", a.devices);
    // Nothing of the gang is bound or reserved, then or a little later.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for i in 0..3 {
        let p = c.pods("default").get(&format!("big-{i}")).await?;
        ensure!(p.spec.as_ref().and_then(|s| s.node_name.clone()).is_none(), "big-{i} was bound");
        let ann = p.metadata.annotations.unwrap_or_default();
        ensure!(!ann.contains_key(tessera_api::annotations::RESERVATION), "big-{i} holds a reservation: {ann:?}");
    }
    Ok(())
}

/// A pod waiting for GPUs binds within seconds of the holder's deletion (defect 4: the freed
/// devices are visible to the next filter, and kube-scheduler is told to retry at once instead
/// of at its 5-minute flush of unschedulable pods).
async fn deletion_frees_devices_at_once(ctx: Ctx) -> Result<()> {
    let opts = Options { nodes: vec![NodeSpec::new("gpu-a", "h100x2")], ..Options::default() };
    let c = Cluster::start(&ctx.bins, &ctx.dir, opts).await?;
    let (limits, two) = whole_gpus(2);
    c.create_pod(pod("holder", limits.clone(), two.clone())).await?;
    let (_, held) = c.wait_bound("default", "holder", Duration::from_secs(30)).await?;
    c.create_pod(pod("waiter", limits, two)).await?;
    c.wait_event("default", "waiter", Duration::from_secs(30), |r, _| r == "FailedScheduling").await?;
    // Long enough for kube-scheduler to park it as unschedulable.
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(!c.is_bound("default", "waiter").await?, "waiter bound while holder held both GPUs");
    let t0 = std::time::Instant::now();
    c.force_delete("default", "holder").await?;
    let (_, got) = c.wait_bound("default", "waiter", Duration::from_secs(30)).await?;
    let took = t0.elapsed();
    println!("waiter bound {took:?} after the holder's deletion");
    ensure!(took < Duration::from_secs(10), "waiter bound {took:?} after the deletion");
    let (mut a, mut b): (Vec<u32>, Vec<u32>) =
        (held.devices.iter().map(|d| d.index).collect(), got.devices.iter().map(|d| d.index).collect());
    a.sort();
    b.sort();
    ensure!(a == b, "the waiter should get the freed GPUs {a:?}, got {b:?}");
    Ok(())
}

/// Pods asking for `nvidia.com/gpu` and `nvidia.com/mig-*` go only where the node advertises
/// them, within what it advertises; tessera's assignment names distinct devices.
async fn nvidia_resource_names(ctx: Ctx) -> Result<()> {
    let opts = Options {
        nodes: vec![
            NodeSpec::new("gpu-a", "h100x4").resource("nvidia.com/gpu", "2"),
            NodeSpec::new("gpu-b", "h100x2:mig").resource("nvidia.com/mig-1g.10gb", "14"),
        ],
        ..Options::default()
    };
    let c = Cluster::start(&ctx.bins, &ctx.dir, opts).await?;
    for i in 0..3 {
        c.create_pod(pod(&format!("cuda-{i}"), json!({"nvidia.com/gpu": "1"}), json!({}))).await?;
    }
    c.create_pod(pod("slice", json!({"nvidia.com/mig-1g.10gb": "1"}), json!({}))).await?;
    let (node, a) = c.wait_bound("default", "slice", Duration::from_secs(60)).await?;
    ensure!(node == "gpu-b", "only gpu-b advertises nvidia.com/mig-1g.10gb; slice is on {node}");
    ensure!(a.devices.iter().all(|d| d.profile.as_deref() == Some("1g.10gb")), "slice got {:?}", a.devices);
    let mut bound = Vec::new();
    let t0 = std::time::Instant::now();
    while bound.len() < 2 && t0.elapsed() < Duration::from_secs(60) {
        bound.clear();
        for i in 0..3 {
            let p = c.pods("default").get(&format!("cuda-{i}")).await?;
            if p.spec.as_ref().is_some_and(|s| s.node_name.is_some()) {
                bound.push(c.check_assignment(&p)?);
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    ensure!(bound.len() == 2, "2 of 3 nvidia.com/gpu pods should bind (gpu-a advertises 2), {} did", bound.len());
    for (node, _) in &bound {
        ensure!(node == "gpu-a", "an nvidia.com/gpu pod is on {node}, which does not advertise it");
    }
    crate::examples::no_device_twice(bound.iter().map(|(_, a)| a))?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pending: Vec<String> = {
        let mut v = Vec::new();
        for i in 0..3 {
            if !c.is_bound("default", &format!("cuda-{i}")).await? {
                v.push(format!("cuda-{i}"));
            }
        }
        v
    };
    ensure!(pending.len() == 1, "exactly one nvidia.com/gpu pod should wait: {pending:?}");
    c.wait_event("default", &pending[0], Duration::from_secs(30), |r, m| {
        r == "FailedScheduling" && m.contains("nvidia.com/gpu")
    })
    .await?;
    Ok(())
}

/// Malformed or contradictory annotations: the pod stays Pending and its FailedScheduling event
/// names the annotation and the value.
async fn malformed_annotations_leave_pods_pending_with_an_event(ctx: Ctx) -> Result<()> {
    let opts = Options { nodes: vec![NodeSpec::new("gpu-a", "h100x2:mig")], ..Options::default() };
    let c = Cluster::start(&ctx.bins, &ctx.dir, opts).await?;
    let one = json!({"tessera.dev/gpu": "1"});
    let cases = [
        ("bad-memory", json!({"tessera.dev/gpu-memory": "lots"}), "tessera.dev/gpu-memory", "lots"),
        ("bad-gpus", json!({"tessera.dev/gpus": "-2"}), "tessera.dev/gpus", "-2"),
        ("bad-compute", json!({"tessera.dev/gpu-compute": "9"}), "tessera.dev/gpu-compute", "9"),
        (
            "bad-gang-size",
            json!({"tessera.dev/gang-name": "g", "tessera.dev/gang-size": "many"}),
            "tessera.dev/gang-size",
            "many",
        ),
    ];
    for (name, ann, _, _) in &cases {
        c.create_pod(pod(name, one.clone(), ann.clone())).await?;
    }
    for (name, _, key, value) in &cases {
        let (_, msg) = c
            .wait_event("default", name, Duration::from_secs(30), |r, m| {
                r == "FailedScheduling" && m.contains(key) && m.contains(value)
            })
            .await?;
        println!("{name}: {msg}");
        ensure!(!c.is_bound("default", name).await?, "{name} was bound");
    }
    Ok(())
}
