//! One test per scenario.

use std::time::Duration;

use anyhow::{Result, bail, ensure};
use serde_json::{Value, json};
use tessera_e2e::{Cluster, NodeSpec, Options, until};

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
    t!(gang_timeout_fails_the_held_binds);
    t!(deleting_a_gang_member_releases_the_plan);
    t!(kill_9_between_reserve_and_bind);
    t!(leader_failover);
    t!(preemption_of_single_pods);
    t!(preemption_of_a_whole_gang);
    t!(kubectl_tessera_against_the_cluster);
    t!(metrics_count_reconfigs_and_survive_a_restart);
    t!(preemption_for_nvidia_pods);
    t!(held_binds_answer_within_the_http_timeout);
    t!(a_node_agent_starting_late_gets_the_waiting_pods);
    t!(a_dropped_plan_leaves_no_phantom_slices);
}

/// tessera's `/metrics` (after `/api/v1/cluster`, which refreshes the packing gauges) as
/// `name{labels}` → value.
async fn metrics(c: &Cluster, replica: usize) -> Result<std::collections::BTreeMap<String, f64>> {
    let port = c.replicas[replica].read_port;
    tessera_e2e::cluster::http_get(port, "/api/v1/cluster").await?;
    let (code, body) = tessera_e2e::cluster::http_get(port, "/metrics").await?;
    ensure!(code == 200, "/metrics answered {code}");
    Ok(body
        .lines()
        .filter(|l| l.starts_with("tessera_"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(k, v)| v.parse().ok().map(|v| (k.to_owned(), v))))
        .collect())
}

/// A StorageClass that waits for the first consumer, a PV and a PVC of it: a pod mounting the PVC
/// passes every filter (so tessera counts it as a gang member and plans) and then waits in
/// kube-scheduler's PreBind for the PV controller, which only kube-controller-manager runs. It
/// never reaches tessera's bind until the test starts kube-controller-manager.
async fn slow_volume(c: &Cluster) -> Result<()> {
    for obj in [
        json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "slow"},
               "provisioner": "kubernetes.io/no-provisioner", "volumeBindingMode": "WaitForFirstConsumer"}),
        json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "slow"},
               "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "slow",
                        "hostPath": {"path": "/nonexistent/slow"}}}),
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "slow", "namespace": "default"},
               "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "slow", "resources": {"requests": {"storage": "1Gi"}}}}),
    ] {
        tessera_e2e::apply::apply(&c.client, &obj).await?;
    }
    // The PV controller would mark it Available; kube-scheduler only matches Available volumes.
    let pvs: kube::Api<k8s_openapi::api::core::v1::PersistentVolume> = kube::Api::all(c.client.clone());
    let status = json!({"status": {"phase": "Available"}});
    pvs.patch_status("slow", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&status)).await?;
    Ok(())
}

fn with_slow_volume(mut pod: Value) -> Value {
    pod["spec"]["volumes"] = json!([{"name": "slow", "persistentVolumeClaim": {"claimName": "slow"}}]);
    pod
}

fn in_group(mut pod: Value, group: &str) -> Value {
    pod["metadata"]["labels"] = json!({"scheduling.x-k8s.io/pod-group": group});
    pod
}

async fn reservation(c: &Cluster, name: &str) -> Result<Option<String>> {
    let p = c.pods("default").get(name).await?;
    Ok(p.metadata.annotations.and_then(|a| a.get(tessera_api::annotations::RESERVATION).cloned()))
}

/// A PodGroup gang (minMember 3, scheduleTimeoutSeconds 10) whose third member never reaches
/// bind: the first two are planned and reserved (`tessera.dev/reservation`), their binds are
/// held, and when the deadline passes every held bind fails together with the reason.
async fn gang_timeout_fails_the_held_binds(ctx: Ctx) -> Result<()> {
    let opts = Options { nodes: vec![NodeSpec::new("gpu-a", "h100x4")], ..Options::default() };
    let c = Cluster::start(&ctx.bins, &ctx.dir, opts).await?;
    slow_volume(&c).await?;
    tessera_e2e::apply::apply(
        &c.client,
        &json!({"apiVersion": "scheduling.x-k8s.io/v1alpha1", "kind": "PodGroup",
        "metadata": {"name": "tg", "namespace": "default"}, "spec": {"minMember": 3, "scheduleTimeoutSeconds": 10}}),
    )
    .await?;
    let (limits, one) = whole_gpus(1);
    for i in 0..3 {
        let p = in_group(pod(&format!("tg-{i}"), limits.clone(), one.clone()), "tg");
        c.create_pod(if i == 2 { with_slow_volume(p) } else { p }).await?;
    }
    until("tg-0 and tg-1 to be reserved", Duration::from_secs(30), || async {
        Ok((reservation(&c, "tg-0").await?.is_some() && reservation(&c, "tg-1").await?.is_some()).then_some(()))
    })
    .await?;
    let t0 = std::time::Instant::now();
    let (_, msg) = c
        .wait_event("default", "tg-0", Duration::from_secs(40), |_, m| {
            m.contains("reservation deadline passed before every member reached bind")
        })
        .await?;
    println!("tg-0 after {:?}: {msg}", t0.elapsed());
    for i in 0..3 {
        ensure!(!c.is_bound("default", &format!("tg-{i}")).await?, "tg-{i} was bound");
    }
    Ok(())
}

/// Deleting a planned member drops the gang's plan at once (defect 6): the other members'
/// reservations are removed long before the 60 s deadline, and a pod needing all the GPUs binds.
async fn deleting_a_gang_member_releases_the_plan(ctx: Ctx) -> Result<()> {
    let opts = Options { nodes: vec![NodeSpec::new("gpu-a", "h100x2")], ..Options::default() };
    let c = Cluster::start(&ctx.bins, &ctx.dir, opts).await?;
    slow_volume(&c).await?;
    let (limits, one) = whole_gpus(1);
    for i in 0..2 {
        let p = gang_pod(&format!("dg-{i}"), "dg", 2, limits.clone(), one.clone());
        c.create_pod(if i == 1 { with_slow_volume(p) } else { p }).await?;
    }
    until("dg-0 to be reserved", Duration::from_secs(30), || async { Ok(reservation(&c, "dg-0").await?.map(|_| ())) })
        .await?;
    let t0 = std::time::Instant::now();
    c.force_delete("default", "dg-1").await?;
    until("dg-0's reservation to be removed", Duration::from_secs(15), || async {
        Ok(reservation(&c, "dg-0").await?.is_none().then_some(()))
    })
    .await?;
    println!("dg-0's reservation removed {:?} after dg-1's deletion", t0.elapsed());
    let (l2, two) = whole_gpus(2);
    c.create_pod(pod("both", l2, two)).await?;
    c.wait_bound("default", "both", Duration::from_secs(20)).await?;
    ensure!(!c.is_bound("default", "dg-0").await?, "dg-0 bound without its gang");
    // Nothing complains about the deleted member.
    for (obj, reason, msg) in c.all_events("default").await? {
        ensure!(!msg.contains("not found"), "event on {obj} ({reason}): {msg}");
    }
    Ok(())
}

/// `kill -9` of tessera-scheduler while a gang is reserved and two of its binds are held; after
/// the restart the plan is taken over from the reservation annotations, every member binds to
/// the devices reserved for it, and a pod created while tessera was down gets none of them.
async fn kill_9_between_reserve_and_bind(ctx: Ctx) -> Result<()> {
    let opts = Options { nodes: vec![NodeSpec::new("gpu-a", "h100x4")], ..Options::default() };
    let c = Cluster::start(&ctx.bins, &ctx.dir, opts).await?;
    slow_volume(&c).await?;
    let (limits, one) = whole_gpus(1);
    for i in 0..3 {
        let p = gang_pod(&format!("kg-{i}"), "kg", 3, limits.clone(), one.clone());
        c.create_pod(if i == 2 { with_slow_volume(p) } else { p }).await?;
    }
    let mut reserved = Vec::new();
    for i in 0..3 {
        let name = format!("kg-{i}");
        let r = until(&format!("{name} to be reserved"), Duration::from_secs(30), || async {
            reservation(&c, &name).await
        })
        .await?;
        reserved.push(serde_json::from_str::<Value>(&r)?);
    }
    ensure!(c.kill9(&Cluster::tessera_name(0)), "tessera-scheduler was not running");
    let (l2, two) = whole_gpus(2);
    c.create_pod(pod("filler", l2, two)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.start_tessera(0)?;
    c.wait_tessera_ready(0).await?;
    c.wait_tessera_sees_gpus(0).await?;
    // The PV controller lets kg-2 past PreBind.
    c.start_controller_manager()?;
    let mut gang = Vec::new();
    for i in 0..3 {
        let name = format!("kg-{i}");
        match c.wait_bound("default", &name, Duration::from_secs(60)).await {
            Ok((_, a)) => gang.push(a),
            Err(e) => bail!("{e:#}; filler bound: {}", c.is_bound("default", "filler").await.unwrap_or(false)),
        }
    }
    crate::examples::no_device_twice(&gang)?;
    for (i, (r, a)) in reserved.iter().zip(&gang).enumerate() {
        let want: Vec<u64> = r["grants"].as_array().into_iter().flatten().filter_map(|g| g["gpu"].as_u64()).collect();
        let got: Vec<u64> = a.devices.iter().map(|d| u64::from(d.index)).collect();
        ensure!(want == got, "kg-{i} was reserved GPU {want:?} but bound to {got:?} (reservation {r})");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(!c.is_bound("default", "filler").await?, "filler bound: 2 GPUs were not free");
    Ok(())
}

/// Two replicas follow kube-scheduler's Lease; `kill -9` of the leading pair hands binding to
/// the other within the Lease's 15 s, and the new leader does not reuse the old one's devices.
async fn leader_failover(ctx: Ctx) -> Result<()> {
    let opts = Options { nodes: vec![NodeSpec::new("gpu-a", "h100x2")], replicas: 2, ..Options::default() };
    let c = Cluster::start(&ctx.bins, &ctx.dir, opts).await?;
    let leader = until("a leader", Duration::from_secs(30), || async { c.leader().await }).await?;
    let (limits, one) = whole_gpus(1);
    c.create_pod(pod("before", limits.clone(), one.clone())).await?;
    let (_, a1) = c.wait_bound("default", "before", Duration::from_secs(30)).await?;
    let t0 = std::time::Instant::now();
    c.kill_replica(leader);
    c.create_pod(pod("after", limits.clone(), one.clone())).await?;
    let (_, a2) = c.wait_bound("default", "after", Duration::from_secs(60)).await?;
    println!("after bound {:?} after the leader's kill -9", t0.elapsed());
    let now = c.leader().await?;
    ensure!(now == Some(1 - leader), "the Lease should be held by replica {}, is {now:?}", 1 - leader);
    crate::examples::no_device_twice([&a1, &a2])?;
    c.create_pod(pod("third", limits, one)).await?;
    c.wait_event("default", "third", Duration::from_secs(30), |r, _| r == "FailedScheduling").await?;
    ensure!(!c.is_bound("default", "third").await?, "third bound on a node with no GPU left");
    Ok(())
}

async fn priority_classes(c: &Cluster) -> Result<()> {
    for (name, value) in [("low", 100), ("high", 100000)] {
        tessera_e2e::apply::apply(
            &c.client,
            &json!({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
            "metadata": {"name": name}, "value": value}),
        )
        .await?;
    }
    Ok(())
}

fn with_priority(mut pod: Value, class: &str) -> Value {
    pod["spec"]["priorityClassName"] = class.into();
    pod
}

/// A high-priority pod that fits nowhere evicts one lower-priority pod (through the Eviction
/// API) and binds to its GPU; the other low-priority pod stays.
async fn preemption_of_single_pods(ctx: Ctx) -> Result<()> {
    let opts = Options { nodes: vec![NodeSpec::new("gpu-a", "h100x2")], ..Options::default() };
    let c = Cluster::start(&ctx.bins, &ctx.dir, opts).await?;
    priority_classes(&c).await?;
    let (limits, one) = whole_gpus(1);
    for n in ["low-0", "low-1"] {
        c.create_pod(with_priority(pod(n, limits.clone(), one.clone()), "low")).await?;
        c.wait_bound("default", n, Duration::from_secs(30)).await?;
    }
    c.create_pod(with_priority(pod("high", limits, one), "high")).await?;
    let (_, a) = c.wait_bound("default", "high", Duration::from_secs(60)).await?;
    let mut left = Vec::new();
    for n in ["low-0", "low-1"] {
        if c.pods("default").get_opt(n).await?.is_some() {
            left.push(c.check_assignment(&c.pods("default").get(n).await?)?.1);
        }
    }
    ensure!(left.len() == 1, "exactly one low-priority pod should be evicted, {} remain", left.len());
    crate::examples::no_device_twice([&a, &left[0]])?;
    Ok(())
}

/// A high-priority pod evicts a lower-priority gang whole, never one member of it.
async fn preemption_of_a_whole_gang(ctx: Ctx) -> Result<()> {
    let opts = Options { nodes: vec![NodeSpec::new("gpu-a", "h100x2")], ..Options::default() };
    let c = Cluster::start(&ctx.bins, &ctx.dir, opts).await?;
    priority_classes(&c).await?;
    let (limits, one) = whole_gpus(1);
    for i in 0..2 {
        c.create_pod(with_priority(gang_pod(&format!("lg-{i}"), "lg", 2, limits.clone(), one.clone()), "low")).await?;
    }
    c.wait_all_bound("default", "", 2, Duration::from_secs(30)).await?;
    c.create_pod(with_priority(pod("high", limits, one), "high")).await?;
    c.wait_bound("default", "high", Duration::from_secs(60)).await?;
    until("both gang members to be evicted", Duration::from_secs(20), || async {
        let a = c.pods("default").get_opt("lg-0").await?.is_none();
        let b = c.pods("default").get_opt("lg-1").await?.is_none();
        Ok((a && b).then_some(()))
    })
    .await?;
    Ok(())
}

/// `kubectl tessera status`, `explain` and `capture` against the running cluster.
async fn kubectl_tessera_against_the_cluster(ctx: Ctx) -> Result<()> {
    let opts = Options { nodes: vec![NodeSpec::new("gpu-a", "h100x2:mig")], ..Options::default() };
    let c = Cluster::start(&ctx.bins, &ctx.dir, opts).await?;
    c.create_pod(pod("small", json!({"tessera.dev/gpu": "1"}), json!({"tessera.dev/gpu-memory": "4Gi"}))).await?;
    let (_, a) = c.wait_bound("default", "small", Duration::from_secs(60)).await?;
    c.create_pod(pod("odd", json!({"tessera.dev/gpu": "1"}), json!({"tessera.dev/gpu-memory": "lots"}))).await?;
    c.wait_event("default", "odd", Duration::from_secs(30), |r, _| r == "FailedScheduling").await?;

    let (ok, out, err) = c.kubectl_tessera(&["status"])?;
    ensure!(ok, "kubectl tessera status failed: {err}");
    let profile = a.devices[0].profile.clone().unwrap_or_default();
    ensure!(
        out.contains("gpu-a") && out.contains("default/small") && out.contains(&profile),
        "status should show gpu-a with default/small on a {profile}: {out}"
    );
    let (ok, out, err) = c.kubectl_tessera(&["explain", "default/odd"])?;
    ensure!(ok, "kubectl tessera explain failed: {err}");
    ensure!(
        out.contains("tessera.dev/gpu-memory") && out.contains("lots"),
        "explain should name the annotation: {out}"
    );
    let Some(kubectl) = &c.bins.kubectl else {
        if std::env::var("CI").as_deref() == Ok("true") {
            bail!("kubectl is not on PATH (scripts/setup.sh installs it); capture needs it");
        }
        println!("kubectl tessera capture not checked: kubectl is not on PATH");
        return Ok(());
    };
    let out = std::process::Command::new(&c.bins.kubectl_tessera)
        .args(["--kubectl", &kubectl.display().to_string(), "capture"])
        .env("KUBECONFIG", &c.admin_kubeconfig)
        .output()?;
    ensure!(out.status.success(), "capture failed: {}", String::from_utf8_lossy(&out.stderr));
    let doc: Value = serde_json::from_slice(&out.stdout)?;
    let names = |k: &str| -> Vec<String> {
        doc[k]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| o["metadata"]["name"].as_str().map(str::to_owned))
            .collect()
    };
    ensure!(names("nodes") == ["gpu-a"] && names("gpuNodes") == ["gpu-a"], "capture: {doc}");
    ensure!(names("pods").contains(&"small".to_owned()), "capture lacks pod small: {}", doc["pods"]);
    Ok(())
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
    // The check can fail: a schema with a Rust integer format draws the warning defect 10 saw.
    let probe = json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "probes.e2e.tessera.dev"},
        "spec": {"group": "e2e.tessera.dev", "scope": "Cluster",
                 "names": {"kind": "Probe", "plural": "probes", "singular": "probe", "listKind": "ProbeList"},
                 "versions": [{"name": "v1", "served": true, "storage": true, "schema": {"openAPIV3Schema":
                     {"type": "object", "properties": {"n": {"type": "integer", "format": "uint32"}}}}}]}});
    let w = tessera_e2e::apply::apply(&c.client, &probe).await?.warnings;
    ensure!(w.iter().any(|w| w.contains("unrecognized format")), "the probe CRD drew no warning: {w:?}");
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
    crate::examples::trusts_its_own_assignments(&c)
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

/// A MIG slice created for a bind is counted in `tessera_mig_reconfigs` as well as in
/// `tessera_mig_reconfig_requests_total` (defect 8: it stayed 0 in live mode), and the packing
/// gauges are the same after a `kill -9` and restart with the same allocations (defect 9:
/// stranded slices and fragmentation jumped).
async fn metrics_count_reconfigs_and_survive_a_restart(ctx: Ctx) -> Result<()> {
    let opts = Options { nodes: vec![NodeSpec::new("gpu-a", "h100x2:mig")], ..Options::default() };
    let c = Cluster::start(&ctx.bins, &ctx.dir, opts).await?;
    c.create_pod(pod("small", json!({"tessera.dev/gpu": "1"}), json!({"tessera.dev/gpu-memory": "4Gi"}))).await?;
    c.wait_bound("default", "small", Duration::from_secs(60)).await?;
    let m = until("the reconfiguration to be counted", Duration::from_secs(20), || async {
        let m = metrics(&c, 0).await?;
        let req = m.get("tessera_mig_reconfig_requests_total").copied().unwrap_or(0.0);
        let done = m.get("tessera_mig_reconfigs").copied().unwrap_or(0.0);
        if req >= 1.0 && done >= 1.0 { Ok(Some(m)) } else { bail!("requests {req}, reconfigs {done}") }
    })
    .await?;
    let packing = |m: &std::collections::BTreeMap<String, f64>| -> Vec<(String, f64)> {
        m.iter().filter(|(k, _)| k.starts_with("tessera_packing_")).map(|(k, v)| (k.clone(), *v)).collect()
    };
    let before = packing(&m);
    ensure!(!before.is_empty(), "no tessera_packing_* metrics: {m:?}");
    ensure!(c.kill9(&Cluster::tessera_name(0)), "tessera-scheduler was not running");
    c.start_tessera(0)?;
    c.wait_tessera_ready(0).await?;
    c.wait_tessera_sees_gpus(0).await?;
    let after = packing(&metrics(&c, 0).await?);
    ensure!(before == after, "packing metrics changed across the restart:\nbefore {before:?}\nafter  {after:?}");
    Ok(())
}

/// kube-scheduler preempts for a pod asking for `nvidia.com/gpu` (it counts that resource) and
/// calls tessera's `/preempt`; tessera must answer with the victims (defect 3: it answered none).
async fn preemption_for_nvidia_pods(ctx: Ctx) -> Result<()> {
    let opts =
        Options { nodes: vec![NodeSpec::new("gpu-a", "h100x2").resource("nvidia.com/gpu", "2")], ..Options::default() };
    let c = Cluster::start(&ctx.bins, &ctx.dir, opts).await?;
    priority_classes(&c).await?;
    for n in ["low-0", "low-1"] {
        c.create_pod(with_priority(pod(n, json!({"nvidia.com/gpu": "1"}), json!({})), "low")).await?;
        c.wait_bound("default", n, Duration::from_secs(30)).await?;
    }
    c.create_pod(with_priority(pod("high", json!({"nvidia.com/gpu": "1"}), json!({})), "high")).await?;
    let (_, a) = c.wait_bound("default", "high", Duration::from_secs(60)).await?;
    let mut left = Vec::new();
    for n in ["low-0", "low-1"] {
        if let Some(p) = c.pods("default").get_opt(n).await? {
            left.push(c.check_assignment(&p)?.1);
        }
    }
    ensure!(left.len() == 1, "exactly one low-priority pod should be preempted, {} remain", left.len());
    crate::examples::no_device_twice([&a, &left[0]])?;
    Ok(())
}

/// An annotation gang (60 s deadline) whose last member waits in PreBind: the two held binds
/// answer before kube-scheduler's 45 s `httpTimeout` (defect 2: `context deadline exceeded`
/// and a second hold for the retried bind), the retries join the same plan (the reservations do
/// not change), and once the last member gets through every member binds to its reserved GPU.
async fn held_binds_answer_within_the_http_timeout(ctx: Ctx) -> Result<()> {
    let opts = Options { nodes: vec![NodeSpec::new("gpu-a", "h100x4")], ..Options::default() };
    let c = Cluster::start(&ctx.bins, &ctx.dir, opts).await?;
    slow_volume(&c).await?;
    let (limits, one) = whole_gpus(1);
    for i in 0..3 {
        let p = gang_pod(&format!("hg-{i}"), "hg", 3, limits.clone(), one.clone());
        c.create_pod(if i == 2 { with_slow_volume(p) } else { p }).await?;
    }
    let mut reserved = Vec::new();
    for i in 0..3 {
        let name = format!("hg-{i}");
        reserved.push(
            until(&format!("{name} to be reserved"), Duration::from_secs(30), || async {
                reservation(&c, &name).await
            })
            .await?,
        );
    }
    // Past kube-scheduler's httpTimeout, inside the gang's deadline.
    tokio::time::sleep(Duration::from_secs(48)).await;
    let log = std::fs::read_to_string(c.dir.join("kube-scheduler-0.log"))?;
    for bad in ["Client.Timeout exceeded", "context deadline exceeded"] {
        if let Some(line) = log.lines().find(|l| l.contains(bad)) {
            bail!("kube-scheduler waited out its httpTimeout on tessera: {line}");
        }
    }
    for (i, before) in reserved.iter().enumerate() {
        let now = reservation(&c, &format!("hg-{i}")).await?;
        ensure!(now.as_ref() == Some(before), "hg-{i}'s reservation changed: {before:?} -> {now:?}");
        ensure!(!c.is_bound("default", &format!("hg-{i}")).await?, "hg-{i} bound before its gang");
    }
    c.start_controller_manager()?;
    let mut gang = Vec::new();
    for i in 0..3 {
        gang.push(c.wait_bound("default", &format!("hg-{i}"), Duration::from_secs(30)).await?.1);
    }
    crate::examples::no_device_twice(&gang)?;
    for (i, (r, a)) in reserved.iter().zip(&gang).enumerate() {
        let r: Value = serde_json::from_str(r)?;
        let want: Vec<u64> = r["grants"].as_array().into_iter().flatten().filter_map(|g| g["gpu"].as_u64()).collect();
        let got: Vec<u64> = a.devices.iter().map(|d| u64::from(d.index)).collect();
        ensure!(want == got, "hg-{i} was reserved GPU {want:?} but bound to {got:?}");
    }
    Ok(())
}

/// Pods refused while a node's agent has not yet published its GpuNode (`has no GPUs`) bind
/// within seconds of the agent starting, not at kube-scheduler's 5-minute flush of
/// unschedulable pods: kube-scheduler does not watch GpuNodes, so tessera nudges the pods.
async fn a_node_agent_starting_late_gets_the_waiting_pods(ctx: Ctx) -> Result<()> {
    let late = NodeSpec::new("gpu-a", "h100x2").late_agent();
    let opts = Options { nodes: vec![late.clone()], ..Options::default() };
    let c = Cluster::start(&ctx.bins, &ctx.dir, opts).await?;
    let (limits, one) = whole_gpus(1);
    c.create_pod(pod("early", limits, one)).await?;
    c.wait_event("default", "early", Duration::from_secs(30), |r, m| {
        r == "FailedScheduling" && m.contains("tessera's node agent has not reported its GPUs yet")
    })
    .await?;
    // kube-scheduler has parked it as unschedulable.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t0 = std::time::Instant::now();
    c.start_agent(&late)?;
    c.wait_gpunode("gpu-a").await?;
    c.wait_bound("default", "early", Duration::from_secs(30)).await?;
    println!("early bound {:?} after its node agent started", t0.elapsed());
    Ok(())
}

/// Free MIG slices in tessera's view (`/api/v1/cluster`) that the node's GpuNode status does not
/// have, as `node GPU profile@start`.
async fn phantom_slices(c: &Cluster) -> Result<Vec<String>> {
    let (_, body) = tessera_e2e::cluster::http_get(c.replicas[0].read_port, "/api/v1/cluster").await?;
    let view: Value = serde_json::from_str(&body)?;
    let mut out = Vec::new();
    for n in view["nodes"].as_array().into_iter().flatten() {
        let name = n["name"].as_str().unwrap_or_default();
        let status = c.gpunodes().get(name).await?.status.unwrap_or_default();
        for g in n["gpus"].as_array().into_iter().flatten() {
            let index = g["index"].as_u64().unwrap_or(u64::MAX);
            let reported = status.gpus.iter().find(|s| u64::from(s.index) == index);
            for m in g["mig"].as_array().into_iter().flatten().filter(|m| m["holder"].is_null()) {
                let (profile, start) = (m["profile"].as_str().unwrap_or_default(), m["start"].as_u64().unwrap_or(99));
                let there = reported
                    .is_some_and(|r| r.instances.iter().any(|i| i.profile == profile && u64::from(i.start) == start));
                if !there {
                    out.push(format!("{name} GPU {index} {profile}@{start}"));
                }
            }
        }
    }
    Ok(out)
}

/// A MIG-sized gang planned on whole-mode GPUs whose plan lapses: tessera's view never shows a
/// free slice the node does not have (defect 7: `3g.40gb@0 free` on GPUs whose GpuNode status
/// is full mode with no instances, until a later rebuild).
async fn a_dropped_plan_leaves_no_phantom_slices(ctx: Ctx) -> Result<()> {
    let opts = Options { nodes: vec![NodeSpec::new("gpu-a", "h100x2")], ..Options::default() };
    let c = Cluster::start(&ctx.bins, &ctx.dir, opts).await?;
    slow_volume(&c).await?;
    tessera_e2e::apply::apply(
        &c.client,
        &json!({"apiVersion": "scheduling.x-k8s.io/v1alpha1", "kind": "PodGroup",
        "metadata": {"name": "mg", "namespace": "default"}, "spec": {"minMember": 3, "scheduleTimeoutSeconds": 8}}),
    )
    .await?;
    for i in 0..3 {
        let p = in_group(
            pod(&format!("mg-{i}"), json!({"tessera.dev/gpu": "1"}), json!({"tessera.dev/gpu-memory": "30Gi"})),
            "mg",
        );
        c.create_pod(if i == 2 { with_slow_volume(p) } else { p }).await?;
    }
    until("mg-0 to be reserved", Duration::from_secs(30), || async { Ok(reservation(&c, "mg-0").await?.map(|_| ())) })
        .await?;
    c.wait_event("default", "mg-0", Duration::from_secs(30), |_, m| m.contains("reservation deadline passed")).await?;
    // Watch the view for a while after the drop (kube-scheduler keeps retrying the gang).
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(8) {
        let phantom = phantom_slices(&c).await?;
        ensure!(phantom.is_empty(), "tessera shows free slices the node does not have: {phantom:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}
