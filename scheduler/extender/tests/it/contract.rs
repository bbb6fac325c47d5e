//! What a real kube-scheduler needs from the extender, over loopback HTTP with the real server:
//! gang plans only on nodes kube-scheduler's own filters accept (and a refusal changes the next
//! plan), every verb answering within `httpTimeout` (a retried bind joining the one in
//! progress, a losing 409 keeping a bound pod's devices), preemption for every demand kind,
//! deletions visible to the very next filter, and the views and packing metrics a restart must
//! not change.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node as KubeNode, Pod};
use serde_json::{Value, json};
use tessera_api::gpunode::GpuNode;
use tessera_api::podgroup::PodGroupSpec;
use tessera_core::{Node, PodKey, Snapshot};
use tessera_scheduler::binder::MemoryBinder;
use tessera_scheduler::http::{App, Surface, serve};
use tessera_scheduler::state::{MemoryLookup, Scheduler, Settings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---- plumbing ------------------------------------------------------------------------------

pub(crate) struct Cluster {
    pub sched: Arc<Scheduler>,
    pub binder: Arc<MemoryBinder>,
    pub lookup: Arc<MemoryLookup>,
    pub addr: SocketAddr,
}

/// A scheduler on `snap`, served on a loopback port.
pub(crate) async fn start(snap: Snapshot, settings: Settings) -> Cluster {
    start_with(snap, settings, MemoryBinder::default()).await
}

/// A `tessera`-policy scheduler on `snap` over in-memory binder and lookup, not served.
pub(crate) fn scheduler(
    snap: Snapshot,
    settings: Settings,
    binder: MemoryBinder,
) -> (Arc<Scheduler>, Arc<MemoryBinder>, Arc<MemoryLookup>) {
    let binder = Arc::new(binder);
    let lookup = Arc::new(MemoryLookup::default());
    let sched = Arc::new(Scheduler::new(
        snap,
        tessera_core::policy::by_name("tessera").unwrap(),
        binder.clone(),
        lookup.clone(),
        settings,
    ));
    (sched, binder, lookup)
}

pub(crate) async fn start_with(snap: Snapshot, settings: Settings, binder: MemoryBinder) -> Cluster {
    let (sched, binder, lookup) = scheduler(snap, settings, binder);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, App::new(sched.clone(), Surface::ALL), std::future::pending()));
    Cluster { sched, binder, lookup, addr }
}

/// POSTs `body` to `path` and waits at most `client_timeout` for the answer, as kube-scheduler's
/// HTTP client does with its `httpTimeout`: `Err` when no answer came in time.
pub(crate) async fn post_within(
    addr: SocketAddr,
    path: &str,
    body: &Value,
    client_timeout: Duration,
) -> Result<Value, String> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let b = body.to_string();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            b.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(b.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        let text = String::from_utf8_lossy(&out).into_owned();
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        serde_json::from_str::<Value>(&body).unwrap_or(Value::String(body))
    };
    tokio::time::timeout(client_timeout, exchange)
        .await
        .map_err(|_| format!("no answer to {path} within {client_timeout:?} (kube-scheduler's httpTimeout)"))
}

pub(crate) async fn post(addr: SocketAddr, path: &str, body: &Value) -> Value {
    post_within(addr, path, body, Duration::from_secs(30)).await.unwrap()
}

pub(crate) fn filter_args(pod: &Value, nodes: &[&str]) -> Value {
    json!({"Pod": pod, "Nodes": null, "NodeNames": nodes})
}

pub(crate) fn bind_args(ns: &str, name: &str, node: &str) -> Value {
    json!({"PodName": name, "PodNamespace": ns, "PodUID": format!("uid-{name}"), "Node": node})
}

pub(crate) fn passed(v: &Value) -> Vec<String> {
    v["NodeNames"].as_array().map(|a| a.iter().map(|n| n.as_str().unwrap().to_owned()).collect()).unwrap_or_default()
}

/// A pending pod asking for `limits`, with `annotations` and (optionally) a priority.
pub(crate) fn pending(name: &str, limits: Value, annotations: Value, priority: i32) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "ml", "uid": format!("uid-{name}"), "annotations": annotations},
        "spec": {"priority": priority, "containers": [{"name": "c", "resources": {
            "limits": limits, "requests": {"cpu": "1", "memory": "1Gi"}}}]}
    })
}

fn pod_object(v: &Value) -> Pod {
    serde_json::from_value(v.clone()).unwrap()
}

/// A Node object with `allocatable` (cpu and memory added) and optional taints.
fn kube_node(name: &str, allocatable: Value, taints: Value) -> KubeNode {
    let mut alloc = json!({"cpu": "64", "memory": "512Gi"});
    alloc.as_object_mut().unwrap().extend(allocatable.as_object().unwrap().clone());
    serde_json::from_value(
        json!({"metadata": {"name": name}, "spec": {"taints": taints}, "status": {"allocatable": alloc}}),
    )
    .unwrap()
}

/// A GpuNode of `n` H100s; `mig` lists GPU indices in MIG mode with two 3g.40gb instances.
fn h100_gpunode(name: &str, n: u32, mig: &[u32]) -> GpuNode {
    let gpus: Vec<Value> = (0..n)
        .map(|i| {
            let on = mig.contains(&i);
            json!({"index": i, "uuid": format!("GPU-{name}-{i}"), "product": "H100-80GB", "memoryMib": 81920,
                   "migCapable": true, "mode": if on { "mig" } else { "full" }, "health": "Healthy",
                   "instances": if on { json!([
                       {"profile": "3g.40gb", "start": 0, "size": 4, "uuid": format!("MIG-{name}-{i}-0")},
                       {"profile": "3g.40gb", "start": 4, "size": 4, "uuid": format!("MIG-{name}-{i}-4")}]) } else { json!([]) }})
        })
        .collect();
    serde_json::from_value(json!({"apiVersion": "tessera.dev/v1alpha1", "kind": "GpuNode", "metadata": {"name": name},
        "spec": {}, "status": {"gpus": gpus}}))
    .unwrap()
}

fn live() -> Settings {
    Settings { mode: "live", ..Settings::default() }
}

// ---- 1. gang plans only on nodes kube-scheduler accepts ---------------------------------

/// `manifests/examples/gang-annotations.yaml` with one node advertising
/// `nvidia.com/mig-3g.40gb: 4`: kube-scheduler offers every member only that node, and the plan
/// must put all four there (not on MIG-capable nodes that do not advertise the resource).
#[tokio::test]
async fn a_gang_of_nvidia_mig_members_is_planned_only_where_the_resource_is_advertised() {
    let nodes = [
        kube_node("gpu-node-a", json!({"nvidia.com/mig-3g.40gb": "4"}), json!([])),
        kube_node("gpu-node-b", json!({"nvidia.com/gpu": "4"}), json!([])),
        kube_node("gpu-node-c", json!({"nvidia.com/gpu": "4"}), json!([])),
    ];
    let gns = [
        h100_gpunode("gpu-node-a", 4, &[0, 1]),
        h100_gpunode("gpu-node-b", 4, &[]),
        h100_gpunode("gpu-node-c", 4, &[]),
    ];
    let built = tessera_api::snapshot::build(&nodes, &gns, &[] as &[Pod]);
    let c = start(built.snap, live()).await;
    let member = |i: usize| {
        pending(
            &format!("shard-{i}"),
            json!({"nvidia.com/mig-3g.40gb": "1"}),
            json!({"tessera.dev/gang-name": "shard", "tessera.dev/gang-size": "4"}),
            0,
        )
    };
    // kube-scheduler's NodeResourcesFit leaves only gpu-node-a.
    for i in 0..4 {
        post(c.addr, "/filter", &filter_args(&member(i), &["gpu-node-a"])).await;
    }
    for i in 0..4 {
        let v = post(c.addr, "/filter", &filter_args(&member(i), &["gpu-node-a"])).await;
        assert_eq!(passed(&v), ["gpu-node-a"], "shard-{i}: {v}");
    }
    let on_a = c.sched.with_snapshot(|s| s.allocations().values().filter(|a| a.node.0 == "gpu-node-a").count());
    assert_eq!(on_a, 4);
}

#[tokio::test]
async fn taints_and_required_node_affinity_keep_gang_members_where_kube_scheduler_puts_them() {
    let nodes = [
        kube_node(
            "tainted",
            json!({"nvidia.com/gpu": "4"}),
            json!([{"key": "dedicated", "value": "infer", "effect": "NoSchedule"}]),
        ),
        kube_node("other-pool", json!({"nvidia.com/gpu": "4"}), json!([])),
        kube_node("ok", json!({"nvidia.com/gpu": "4"}), json!([])),
    ];
    let mut nodes = nodes.to_vec();
    nodes[2].metadata.labels = Some([("pool".to_owned(), "train".to_owned())].into());
    nodes[0].metadata.labels = Some([("pool".to_owned(), "train".to_owned())].into());
    let gns = [h100_gpunode("tainted", 4, &[]), h100_gpunode("other-pool", 4, &[]), h100_gpunode("ok", 4, &[])];
    let built = tessera_api::snapshot::build(&nodes, &gns, &[] as &[Pod]);
    let c = start(built.snap, live()).await;
    let member = |i: usize| {
        let mut p = pending(
            &format!("w{i}"),
            json!({"nvidia.com/gpu": "2"}),
            json!({"tessera.dev/gang-name": "job", "tessera.dev/gang-size": "2"}),
            0,
        );
        p["spec"]["affinity"] = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["train"]}]}]}}});
        p
    };
    post(c.addr, "/filter", &filter_args(&member(0), &["ok"])).await;
    let v = post(c.addr, "/filter", &filter_args(&member(1), &["ok"])).await;
    assert_eq!(passed(&v), ["ok"], "{v}");
    let v = post(c.addr, "/filter", &filter_args(&member(0), &["ok"])).await;
    assert_eq!(passed(&v), ["ok"], "{v}");
    // Asked about every node, tessera gives kube-scheduler's reasons too.
    let lone = pending("lone", json!({"nvidia.com/gpu": "1"}), json!({}), 0);
    let v = post(c.addr, "/filter", &filter_args(&lone, &["tainted", "other-pool", "ok"])).await;
    let why = v["FailedAndUnresolvableNodes"]["tainted"].as_str().unwrap_or_default();
    assert!(why.contains("taint dedicated=infer:NoSchedule"), "{v}");
}

/// A member whose filter comes without its planned node (kube-scheduler refused that node for
/// it, for a reason tessera cannot see) gets a new plan at once, without that node; the plan
/// is not held until its deadline.
#[tokio::test]
async fn a_member_kube_scheduler_refused_gets_a_new_plan_without_that_node() {
    let mut snap = Snapshot::default();
    for n in ["n1", "n2", "n3"] {
        snap.add_node(Node::test(n).with_gpus(4, "H100-80GB")).unwrap();
    }
    let c = start(snap, Settings::default()).await;
    c.lookup.add_group("ml", "job", PodGroupSpec { min_member: 2, ..Default::default() });
    let member = |name: &str| {
        let mut p = pending(name, json!({"nvidia.com/gpu": "4"}), json!({}), 0);
        p["metadata"]["labels"] = json!({"scheduling.x-k8s.io/pod-group": "job"});
        p
    };
    let all = ["n1", "n2", "n3"];
    post(c.addr, "/filter", &filter_args(&member("w0"), &all)).await;
    let v1 = post(c.addr, "/filter", &filter_args(&member("w1"), &all)).await;
    let planned = passed(&v1);
    assert_eq!(planned.len(), 1, "{v1}");
    // kube-scheduler refuses w1's planned node: its next filter offers the other two.
    let others: Vec<&str> = all.iter().copied().filter(|n| *n != planned[0]).collect();
    let v = post(c.addr, "/filter", &filter_args(&member("w1"), &others)).await;
    let now = passed(&v);
    assert_eq!(now.len(), 1, "a new plan, at once: {v}");
    assert_ne!(now[0], planned[0]);
    let held = c.sched.with_snapshot(|s| s.allocation(&PodKey::from("ml/w1")).map(|a| a.node.0.clone()));
    assert_eq!(held.as_deref(), Some(now[0].as_str()));
}

/// A plan whose deadline passes before a member reached bind is not made again the same way:
/// the member's node is left out of the next plan.
#[tokio::test]
async fn a_lapsed_plan_changes_the_next_one() {
    let mut snap = Snapshot::default();
    for n in ["n1", "n2", "n3"] {
        snap.add_node(Node::test(n).with_gpus(4, "H100-80GB")).unwrap();
    }
    let c = start(snap, Settings::default()).await;
    c.lookup.add_group(
        "ml",
        "job",
        PodGroupSpec { min_member: 2, schedule_timeout_seconds: Some(1), ..Default::default() },
    );
    let member = |name: &str| {
        let mut p = pending(name, json!({"nvidia.com/gpu": "4"}), json!({}), 0);
        p["metadata"]["labels"] = json!({"scheduling.x-k8s.io/pod-group": "job"});
        p
    };
    let all = ["n1", "n2", "n3"];
    post(c.addr, "/filter", &filter_args(&member("w0"), &all)).await;
    let first1 = passed(&post(c.addr, "/filter", &filter_args(&member("w1"), &all)).await);
    let first0 = passed(&post(c.addr, "/filter", &filter_args(&member("w0"), &all)).await);
    // w0 reaches bind; w1 never does.
    let a = c.addr;
    let b0 = bind_args("ml", "w0", &first0[0]);
    let held = tokio::spawn(async move { post(a, "/bind", &b0).await });
    tokio::time::sleep(Duration::from_millis(1300)).await;
    c.sched.tick();
    let r = held.await.unwrap();
    assert!(r["Error"].as_str().unwrap().contains("deadline"), "{r}");
    assert!(c.sched.with_snapshot(|s| s.allocations().is_empty()));
    post(c.addr, "/filter", &filter_args(&member("w0"), &all)).await;
    let next1 = passed(&post(c.addr, "/filter", &filter_args(&member("w1"), &all)).await);
    assert_eq!(next1.len(), 1);
    assert_ne!(next1, first1, "w1 never reached bind on {first1:?}; the new plan must avoid it");
}

// ---- 2. every verb answers within httpTimeout --------------------------------------------

#[tokio::test]
async fn a_held_gang_bind_answers_within_the_http_timeout_and_its_retry_joins_it() {
    let mut snap = Snapshot::default();
    for n in ["n1", "n2"] {
        snap.add_node(Node::test(n).with_gpus(4, "H100-80GB")).unwrap();
    }
    // kube-scheduler's httpTimeout: 2 s.
    let http_timeout = Duration::from_secs(2);
    let c = start(snap, Settings { http_timeout, ..Settings::default() }).await;
    c.lookup.add_group("ml", "job", PodGroupSpec { min_member: 2, ..Default::default() });
    let member = |name: &str| {
        let mut p = pending(name, json!({"nvidia.com/gpu": "4"}), json!({}), 0);
        p["metadata"]["labels"] = json!({"scheduling.x-k8s.io/pod-group": "job"});
        p
    };
    let all = ["n1", "n2"];
    post(c.addr, "/filter", &filter_args(&member("w0"), &all)).await;
    let n1 = passed(&post(c.addr, "/filter", &filter_args(&member("w1"), &all)).await);
    let n0 = passed(&post(c.addr, "/filter", &filter_args(&member("w0"), &all)).await);
    // w1 has not reached bind: w0's bind cannot finish, yet it must answer in time.
    let r = post_within(c.addr, "/bind", &bind_args("ml", "w0", &n0[0]), http_timeout).await.unwrap();
    let e = r["Error"].as_str().unwrap();
    assert!(e.contains("gang ml/job") && e.contains("retry"), "{r}");
    assert!(c.binder.bound().is_empty());
    // kube-scheduler retries the bind: it joins the one in progress (no second hold).
    let r = post_within(c.addr, "/bind", &bind_args("ml", "w0", &n0[0]), http_timeout).await.unwrap();
    assert!(r["Error"].as_str().unwrap().contains("retry"), "{r}");
    let reserved =
        c.sched.with_snapshot(|s| s.allocations().values().filter(|a| a.reserved_until_ms.is_some()).count());
    assert_eq!(reserved, 2, "the devices stay reserved");
    // The last member arrives: both bind, each once.
    let r = post_within(c.addr, "/bind", &bind_args("ml", "w1", &n1[0]), http_timeout).await.unwrap();
    assert_eq!(r["Error"], "", "{r}");
    let bound: Vec<String> = c.binder.bound().iter().map(|b| b.name.clone()).collect();
    assert_eq!(bound.iter().filter(|n| *n == "w0").count(), 1, "{bound:?}");
    assert_eq!(bound.iter().filter(|n| *n == "w1").count(), 1, "{bound:?}");
    // A retry of w0's bind after it finished is answered from its outcome, with no new Binding.
    let r = post_within(c.addr, "/bind", &bind_args("ml", "w0", &n0[0]), http_timeout).await.unwrap();
    assert_eq!(r["Error"], "", "{r}");
    assert_eq!(c.binder.bound().len(), 2);
}

#[tokio::test]
async fn a_losing_409_never_releases_the_devices_of_a_bound_pod() {
    let mut snap = Snapshot::default();
    snap.add_node(Node::test("n1").with_gpus(2, "H100-80GB")).unwrap();
    let binder = MemoryBinder::default();
    binder.conflict_binds.store(1, std::sync::atomic::Ordering::SeqCst);
    let c = start_with(snap, Settings::default(), binder).await;
    let p = pending("p", json!({"nvidia.com/gpu": "1"}), json!({}), 0);
    // The API server has the pod bound to n1 already (an earlier bind won).
    let mut bound = p.clone();
    bound["spec"]["nodeName"] = json!("n1");
    c.lookup.pods.write().unwrap().insert(("ml".into(), "p".into()), pod_object(&bound));
    post(c.addr, "/filter", &filter_args(&p, &["n1"])).await;
    let r = post(c.addr, "/bind", &bind_args("ml", "p", "n1")).await;
    assert_eq!(r["Error"], "", "{r}");
    let held = c.sched.with_snapshot(|s| s.allocation(&PodKey::from("ml/p")).map(|a| a.grants.len()));
    assert_eq!(held, Some(1), "the bound pod keeps its GPU");
    // Nobody else gets it.
    let q = pending("q", json!({"nvidia.com/gpu": "2"}), json!({}), 0);
    assert!(passed(&post(c.addr, "/filter", &filter_args(&q, &["n1"])).await).is_empty());
}

// ---- 3. preemption -------------------------------------------------------------------------

/// kube-scheduler calls `/preempt` for an `nvidia.com/gpu: 4` pod with two victims on a node
/// whose `nvidia.com/gpu` allocatable (4) is less than the GPUs its GpuNode lists (8): the
/// victims are needed, and tessera must say so.
#[tokio::test]
async fn preempt_for_an_nvidia_gpu_pod_keeps_the_victims_kube_scheduler_needs() {
    let nodes = [kube_node("n1", json!({"nvidia.com/gpu": "4"}), json!([]))];
    let gns = [h100_gpunode("n1", 8, &[])];
    let victim = |name: &str| {
        let mut p = pending(name, json!({"nvidia.com/gpu": "2"}), json!({}), 0);
        p["spec"]["nodeName"] = json!("n1");
        p["status"] = json!({"phase": "Running"});
        pod_object(&p)
    };
    let built = tessera_api::snapshot::build(&nodes, &gns, &[victim("low-a"), victim("low-b")]);
    let c = start(built.snap, live()).await;
    c.sched.replace_base(
        tessera_api::snapshot::build(&nodes, &gns, &[victim("low-a"), victim("low-b")]).snap,
        built.uids,
        built.mig_uuids,
    );
    let preemptor = pending("big", json!({"nvidia.com/gpu": "4"}), json!({}), 100);
    let v = post(c.addr, "/filter", &filter_args(&preemptor, &["n1"])).await;
    assert!(v["FailedNodes"]["n1"].as_str().unwrap().contains("Insufficient nvidia.com/gpu"), "{v}");
    let args = json!({"Pod": preemptor, "NodeNameToVictims": null,
        "NodeNameToMetaVictims": {"n1": {"Pods": [{"UID": "uid-low-a"}, {"UID": "uid-low-b"}], "NumPDBViolations": 0}}});
    let r = post(c.addr, "/preempt", &args).await;
    let mut uids: Vec<&str> = r["NodeNameToMetaVictims"]["n1"]["Pods"]
        .as_array()
        .unwrap_or_else(|| panic!("no victims: {r}"))
        .iter()
        .map(|p| p["UID"].as_str().unwrap())
        .collect();
    uids.sort();
    assert_eq!(uids, ["uid-low-a", "uid-low-b"]);
}

fn full_node_with(snap: &mut Snapshot, node: &str, gpus: u32, pods: &[(&str, u32, i32, Option<&str>)]) {
    snap.add_node(Node::test(node).with_gpus(gpus, "H100-80GB")).unwrap();
    let mut next = 0;
    for (name, n, prio, gang) in pods {
        let grants = (next..next + n).map(|gpu| tessera_core::Grant::Whole { gpu }).collect();
        next += n;
        snap.allocate(tessera_core::Allocation {
            pod: PodKey::new("ml", name),
            node: tessera_core::NodeName(node.into()),
            cpu_milli: 0,
            memory_mib: 0,
            grants,
            priority: *prio,
            gang: gang.map(|g| format!("ml/{g}")),
            reserved_until_ms: None,
            extended: Vec::new(),
        })
        .unwrap();
    }
}

/// kube-scheduler never preempts for `tessera.dev/gpu` (ignoredByScheduler): tessera evicts the
/// fewest lower-priority pods itself, through the Eviction API.
#[tokio::test]
async fn tessera_evicts_lower_priority_pods_for_a_tessera_gpu_pod() {
    let mut snap = Snapshot::default();
    full_node_with(&mut snap, "n1", 4, &[("low-1", 2, 0, None), ("low-2", 2, 0, None)]);
    full_node_with(&mut snap, "n2", 4, &[("high", 4, 1000, None)]);
    let c = start(snap, Settings::default()).await;
    let p = pending("vlm", json!({"tessera.dev/gpu": "1"}), json!({"tessera.dev/gpus": "2"}), 100);
    let v = post(c.addr, "/filter", &filter_args(&p, &["n1", "n2"])).await;
    assert!(passed(&v).is_empty());
    let evicted = c.sched.preempt_pass().await;
    assert_eq!(evicted.len(), 1, "one 2-GPU pod is enough: {evicted:?}");
    assert!(evicted[0].0.starts_with("ml/low-"), "{evicted:?}");
    assert_eq!(c.binder.evicted(), evicted);
    // Served once: the same filter does not evict again while the victim terminates.
    post(c.addr, "/filter", &filter_args(&p, &["n1", "n2"])).await;
    assert!(c.sched.preempt_pass().await.is_empty());
}

#[tokio::test]
async fn preemption_takes_whole_gangs_and_honours_disruption_budgets() {
    // A gang of two holds n1; a gang member alone is never a victim.
    let mut snap = Snapshot::default();
    full_node_with(&mut snap, "n1", 4, &[("g-0", 2, 0, Some("low")), ("g-1", 2, 0, Some("low"))]);
    let c = start(snap, Settings::default()).await;
    let p = pending("vlm", json!({"tessera.dev/gpu": "1"}), json!({"tessera.dev/gpus": "2"}), 100);
    post(c.addr, "/filter", &filter_args(&p, &["n1"])).await;
    let evicted = c.sched.preempt_pass().await;
    assert_eq!(evicted, [PodKey::from("ml/g-0"), PodKey::from("ml/g-1")], "the whole gang or none");

    // A PodDisruptionBudget refuses one victim: nothing is evicted at all.
    let mut snap = Snapshot::default();
    full_node_with(&mut snap, "n1", 4, &[("g-0", 2, 0, Some("low")), ("g-1", 2, 0, Some("low"))]);
    let binder = MemoryBinder::default();
    binder
        .refuse_evictions
        .lock()
        .unwrap()
        .insert(PodKey::from("ml/g-1"), "Cannot evict pod as it would violate the pod's disruption budget.".into());
    let c = start_with(snap, Settings::default(), binder).await;
    post(c.addr, "/filter", &filter_args(&p, &["n1"])).await;
    assert!(c.sched.preempt_pass().await.is_empty());
    assert!(c.binder.evicted().is_empty(), "no part of the gang is evicted");
}

#[tokio::test]
async fn a_high_priority_gang_preempts_for_all_its_members_at_once() {
    let mut snap = Snapshot::default();
    full_node_with(&mut snap, "n1", 4, &[("a", 4, 0, None)]);
    full_node_with(&mut snap, "n2", 4, &[("b", 4, 0, None)]);
    let c = start(snap, Settings::default()).await;
    let member = |name: &str| {
        pending(
            name,
            json!({"tessera.dev/gpu": "1"}),
            json!({"tessera.dev/gpus": "4", "tessera.dev/gang-name": "train", "tessera.dev/gang-size": "2"}),
            100,
        )
    };
    post(c.addr, "/filter", &filter_args(&member("m0"), &["n1", "n2"])).await;
    post(c.addr, "/filter", &filter_args(&member("m1"), &["n1", "n2"])).await;
    let evicted = c.sched.preempt_pass().await;
    assert_eq!(evicted, [PodKey::from("ml/a"), PodKey::from("ml/b")]);
}

// ---- 4 and 6. deletions ------------------------------------------------------------------

#[tokio::test]
async fn a_deletion_is_visible_to_the_very_next_filter_and_nudges_waiting_pods() {
    let mut snap = Snapshot::default();
    full_node_with(&mut snap, "n1", 4, &[("old", 4, 0, None)]);
    let c = start(snap.clone(), Settings { mode: "live", persist_reservations: true, ..Settings::default() }).await;
    c.sched.replace_base(
        snap.clone(),
        [("uid-old".to_owned(), PodKey::from("ml/old"))].into_iter().collect(),
        Default::default(),
    );
    let waiting = pending("gang-3", json!({"nvidia.com/gpu": "3"}), json!({}), 0);
    assert!(passed(&post(c.addr, "/filter", &filter_args(&waiting, &["n1"])).await).is_empty());
    let old = pod_object(&json!({"metadata": {"name": "old", "namespace": "ml", "uid": "uid-old"}}));
    c.sched.pod_deleted(&old);
    let v = post(c.addr, "/filter", &filter_args(&waiting, &["n1"])).await;
    assert_eq!(passed(&v), ["n1"], "{v}");
    // A rebuild from a store that has not seen the deletion yet does not bring it back.
    c.sched.replace_base(
        snap,
        [("uid-old".to_owned(), PodKey::from("ml/old"))].into_iter().collect(),
        Default::default(),
    );
    assert!(c.sched.with_snapshot(|s| s.allocation(&PodKey::from("ml/old")).is_none()));
    // The pod refused before the deletion is nudged: kube-scheduler retries it on the update.
    c.sched.write_reservations().await;
    let nudged: Vec<PodKey> =
        c.binder.annotated().into_iter().filter(|(_, k, _)| k == "tessera.dev/requeue").map(|(p, _, _)| p).collect();
    assert_eq!(nudged, [PodKey::from("ml/gang-3")]);
}

#[tokio::test]
async fn a_node_gaining_gpus_nudges_the_pods_refused_before() {
    // A node whose agent has not published its GpuNode yet has no GPUs; kube-scheduler does not
    // watch GpuNodes, so without a nudge it retries the refused pod only at its periodic flush.
    let mut bare = Snapshot::default();
    bare.add_node(Node::test("n1")).unwrap();
    let c = start(bare.clone(), Settings { mode: "live", persist_reservations: true, ..Settings::default() }).await;
    c.sched.replace_base(bare.clone(), Default::default(), Default::default());
    let waiting = pending("early", json!({"tessera.dev/gpu": "1"}), json!({"tessera.dev/gpus": "1"}), 0);
    assert!(passed(&post(c.addr, "/filter", &filter_args(&waiting, &["n1"])).await).is_empty());
    let nudged = |c: &Cluster| -> Vec<PodKey> {
        c.binder.annotated().into_iter().filter(|(_, k, _)| k == "tessera.dev/requeue").map(|(p, _, _)| p).collect()
    };
    // A rebuild that changes nothing nudges nobody.
    c.sched.replace_base(bare, Default::default(), Default::default());
    c.sched.write_reservations().await;
    assert!(nudged(&c).is_empty());
    let mut grown = Snapshot::default();
    grown.add_node(Node::test("n1").with_gpus(2, "H100-80GB")).unwrap();
    c.sched.replace_base(grown, Default::default(), Default::default());
    c.sched.write_reservations().await;
    assert_eq!(nudged(&c), [PodKey::from("ml/early")]);
}

#[tokio::test]
async fn a_node_seen_through_gfd_labels_first_nudges_when_its_agent_reports() {
    // Before its GpuNode exists a node's GPUs come from GPU Feature Discovery labels: no UUIDs,
    // often no memory. A model-sized pod refused then must retry once the agent reports.
    let mut labelled = Snapshot::default();
    let gfd = (0..2).map(|i| tessera_core::Gpu::new(i, "unknown", 0, tessera_core::GpuMode::Full)).collect();
    let mut n1 = Node::new("n1", 64_000, 512 * 1024, gfd);
    n1.device_plugin = false;
    labelled.add_node(n1).unwrap();
    let c = start(labelled.clone(), Settings { mode: "live", persist_reservations: true, ..Settings::default() }).await;
    c.sched.replace_base(labelled.clone(), Default::default(), Default::default());
    let waiting = pending("embed", json!({"tessera.dev/gpu": "1"}), json!({"tessera.dev/gpu-memory": "4Gi"}), 0);
    assert!(passed(&post(c.addr, "/filter", &filter_args(&waiting, &["n1"])).await).is_empty());
    let nudged = |c: &Cluster| -> Vec<PodKey> {
        c.binder.annotated().into_iter().filter(|(_, k, _)| k == "tessera.dev/requeue").map(|(p, _, _)| p).collect()
    };
    c.sched.replace_base(labelled, Default::default(), Default::default());
    c.sched.write_reservations().await;
    assert!(nudged(&c).is_empty(), "the same labels again change nothing");
    let mut reported = Snapshot::default();
    reported.add_node(Node::test("n1").with_gpus(2, "H100-80GB")).unwrap();
    c.sched.replace_base(reported, Default::default(), Default::default());
    c.sched.write_reservations().await;
    assert_eq!(nudged(&c), [PodKey::from("ml/embed")]);
    let v = post(c.addr, "/filter", &filter_args(&waiting, &["n1"])).await;
    assert_eq!(passed(&v), ["n1"], "{v}");
}

#[tokio::test]
async fn tessera_gpu_pods_wait_for_the_agent_while_nvidia_pods_may_use_a_gfd_only_node() {
    // No GpuNode status yet: the node's GPUs come from GPU Feature Discovery labels, and nothing
    // on it serves tessera.dev/gpu. An assignment made now would name GPUs without UUIDs.
    let nodes = [kube_node("n1", json!({"nvidia.com/gpu": "2"}), json!([]))];
    let labelled = tessera_api::snapshot::build(&nodes, &[] as &[GpuNode], &[] as &[Pod]);
    let c = start(Snapshot::default(), live()).await;
    c.sched.replace_base(labelled.snap, labelled.uids, labelled.mig_uuids);
    let tessera = pending("whole", json!({"tessera.dev/gpu": "1"}), json!({"tessera.dev/gpus": "1"}), 0);
    let v = post(c.addr, "/filter", &filter_args(&tessera, &["n1"])).await;
    assert!(passed(&v).is_empty(), "{v}");
    let why = v["FailedNodes"]["n1"].as_str().unwrap_or_default();
    assert!(why.contains("tessera's node agent has not reported its GPUs yet"), "{v}");
    assert!(v["FailedAndUnresolvableNodes"].get("n1").is_none(), "retried once the agent reports: {v}");
    let nvidia = pending("plugin", json!({"nvidia.com/gpu": "1"}), json!({}), 0);
    assert_eq!(passed(&post(c.addr, "/filter", &filter_args(&nvidia, &["n1"])).await), ["n1"]);
    // The agent reports: the same pod fits, and its assignment names the GPU's UUID.
    let reported = tessera_api::snapshot::build(&nodes, &[h100_gpunode("n1", 2, &[])], &[] as &[Pod]);
    c.sched.replace_base(reported.snap, reported.uids, reported.mig_uuids);
    assert_eq!(passed(&post(c.addr, "/filter", &filter_args(&tessera, &["n1"])).await), ["n1"]);
    let r = post(c.addr, "/bind", &bind_args("ml", "whole", "n1")).await;
    assert_eq!(r["Error"], "", "{r}");
    let assignment = &c.binder.bound()[0].annotations["tessera.dev/assignment"];
    assert!(assignment.contains("\"gpu\":\"GPU-n1-"), "{assignment}");
}

#[tokio::test]
async fn deleting_a_planned_gang_member_releases_the_gang_at_once_and_writes_nothing_to_it() {
    let mut snap = Snapshot::default();
    for n in ["n1", "n2"] {
        snap.add_node(Node::test(n).with_gpus(4, "H100-80GB")).unwrap();
    }
    let c = start(snap, Settings { mode: "live", persist_reservations: true, ..Settings::default() }).await;
    let member = |name: &str| {
        pending(
            name,
            json!({"nvidia.com/gpu": "4"}),
            json!({"tessera.dev/gang-name": "job", "tessera.dev/gang-size": "2"}),
            0,
        )
    };
    post(c.addr, "/filter", &filter_args(&member("w0"), &["n1", "n2"])).await;
    post(c.addr, "/filter", &filter_args(&member("w1"), &["n1", "n2"])).await;
    assert_eq!(c.sched.with_snapshot(|s| s.allocations().len()), 2);
    // The reservations are queued for writing; then w1 is deleted before the writer runs.
    c.sched.pod_deleted(&pod_object(&member("w1")));
    assert!(c.sched.with_snapshot(|s| s.allocations().is_empty()), "both reservations released at once");
    c.sched.write_reservations().await;
    let to_w1: Vec<_> = c.binder.annotated().into_iter().filter(|(p, _, _)| p.0 == "ml/w1").collect();
    assert!(to_w1.is_empty(), "{to_w1:?}");
    // w0 holds nothing and carries no reservation.
    assert!(c.binder.annotations().keys().all(|(p, k)| !(p.0 == "ml/w0" && k == "tessera.dev/reservation")));
}

// ---- 7, 8 and 9. views and metrics ---------------------------------------------------------

#[tokio::test]
async fn a_dropped_plan_leaves_no_phantom_mig_instances_in_the_view() {
    let nodes = [kube_node("n1", json!({}), json!([]))];
    let gns = [h100_gpunode("n1", 2, &[])];
    let built = tessera_api::snapshot::build(&nodes, &gns, &[] as &[Pod]);
    let c = start(Snapshot::default(), live()).await;
    c.sched.replace_base(built.snap, built.uids, built.mig_uuids);
    let member = |name: &str| {
        pending(
            name,
            json!({"tessera.dev/gpu": "1"}),
            json!({"tessera.dev/gpu-memory": "30Gi", "tessera.dev/gang-name": "emb", "tessera.dev/gang-size": "2"}),
            0,
        )
    };
    post(c.addr, "/filter", &filter_args(&member("e0"), &["n1"])).await;
    post(c.addr, "/filter", &filter_args(&member("e1"), &["n1"])).await;
    let mig_gpus = |c: &Cluster| c.sched.cluster_view().nodes[0].gpus.iter().filter(|g| !g.mig.is_empty()).count();
    assert!(mig_gpus(&c) > 0, "the plan assumes new MIG instances");
    c.sched.pod_deleted(&pod_object(&member("e1")));
    let view = c.sched.cluster_view();
    for g in &view.nodes[0].gpus {
        assert_eq!(
            (g.mode, g.mig.len()),
            (tessera_core::GpuMode::Full, 0),
            "GPU {} shows what its GpuNode reports",
            g.index
        );
    }
}

#[tokio::test]
async fn mig_reconfigurations_count_in_live_mode() {
    let nodes = [kube_node("n1", json!({}), json!([]))];
    let gns = [h100_gpunode("n1", 1, &[])];
    let built = tessera_api::snapshot::build(&nodes, &gns, &[] as &[Pod]);
    let c = start(Snapshot::default(), live()).await;
    c.sched.replace_base(built.snap, built.uids, built.mig_uuids);
    let p = pending("emb", json!({"tessera.dev/gpu": "1"}), json!({"tessera.dev/gpu-memory": "8Gi"}), 0);
    assert_eq!(passed(&post(c.addr, "/filter", &filter_args(&p, &["n1"])).await), ["n1"]);
    let r = post(c.addr, "/bind", &bind_args("ml", "emb", "n1")).await;
    assert_eq!(r["Error"], "", "{r}");
    // The node agent reports the new layout; the informer shows the pod bound with it.
    let spec = c.binder.reconfigured();
    assert_eq!(spec.len(), 1);
    let g = &spec[0].1[0];
    let inst = &g.instances[0];
    let mut gn = h100_gpunode("n1", 1, &[]);
    let st = gn.status.as_mut().unwrap();
    st.gpus[0].mode = tessera_api::gpunode::Mode::Mig;
    st.gpus[0].instances = vec![tessera_api::gpunode::MigInstanceStatus {
        profile: inst.profile.clone(),
        start: inst.start,
        size: 1,
        uuid: "MIG-new".into(),
    }];
    let assignment = &c.binder.bound()[0].annotations["tessera.dev/assignment"];
    let mut running = p.clone();
    running["metadata"]["annotations"]["tessera.dev/assignment"] = json!(assignment);
    running["spec"]["nodeName"] = json!("n1");
    running["status"] = json!({"phase": "Running"});
    let built = tessera_api::snapshot::build(&nodes, &[gn], &[pod_object(&running)]);
    c.sched.replace_base(built.snap, built.uids, built.mig_uuids);
    let (all, _) = c.sched.packing();
    assert!(all.reconfigs >= 1, "{all:?}");
    assert!(c.sched.metrics_text().contains(&format!("tessera_mig_reconfigs {}", all.reconfigs)));
}

#[tokio::test]
async fn packing_is_the_same_after_a_restart_with_the_same_allocations() {
    let nodes = [kube_node("n1", json!({"nvidia.com/mig-3g.40gb": "4"}), json!([]))];
    let gns = [h100_gpunode("n1", 4, &[0, 1])];
    let slice = |name: &str| {
        let mut p = pending(name, json!({"nvidia.com/mig-3g.40gb": "1"}), json!({}), 0);
        p["spec"]["nodeName"] = json!("n1");
        p["status"] = json!({"phase": "Running"});
        pod_object(&p)
    };
    let pods = [slice("s0")];
    let before = start(Snapshot::default(), live()).await;
    let b = tessera_api::snapshot::build(&nodes, &gns, &pods);
    before.sched.replace_base(b.snap, b.uids, b.mig_uuids);
    // The running replica has seen MIG demand; a restarted one has seen nothing.
    for i in 0..5 {
        let p = pending(&format!("new-{i}"), json!({"nvidia.com/mig-3g.40gb": "1"}), json!({}), 0);
        post(before.addr, "/filter", &filter_args(&p, &["n1"])).await;
    }
    let after = start(Snapshot::default(), live()).await;
    let b = tessera_api::snapshot::build(&nodes, &gns, &pods);
    after.sched.replace_base(b.snap, b.uids, b.mig_uuids);
    let (p0, _) = before.sched.packing();
    let (p1, _) = after.sched.packing();
    assert_eq!(
        (p0.stranded_slices, p0.fragmentation_milli.round()),
        (p1.stranded_slices, p1.fragmentation_milli.round()),
        "{p0:?} vs {p1:?}"
    );
    assert_eq!(p1.stranded_slices, 0, "free 3g.40gb slices are usable by the 3g.40gb pods the cluster runs");
}

#[tokio::test]
async fn a_pool_that_is_gone_leaves_no_packing_series() {
    // Before its agent reports, a node has no GPUs and counts as pool "cpu".
    let mut bare = Snapshot::default();
    bare.add_node(Node::test("n1")).unwrap();
    let c = start(bare.clone(), live()).await;
    c.sched.replace_base(bare, Default::default(), Default::default());
    let _ = c.sched.packing();
    assert!(c.sched.metrics.encode().contains(r#"tessera_packing_gpus{pool="cpu"}"#));
    let mut grown = Snapshot::default();
    grown.add_node(Node::test("n1").with_gpus(2, "H100-80GB")).unwrap();
    c.sched.replace_base(grown, Default::default(), Default::default());
    let _ = c.sched.packing();
    let text = c.sched.metrics.encode();
    assert!(!text.contains(r#"pool="cpu""#), "{text}");
    assert!(text.contains(r#"tessera_packing_gpus{pool="H100-80GB"} 2"#), "{text}");
}

// ---- 10. PodGroup status ------------------------------------------------------------------

#[tokio::test]
async fn podgroup_status_reports_phase_and_scheduled_members() {
    let mut snap = Snapshot::default();
    for n in ["n1", "n2"] {
        snap.add_node(Node::test(n).with_gpus(4, "H100-80GB")).unwrap();
    }
    let c = start(snap, Settings::default()).await;
    c.lookup.add_group("ml", "job", PodGroupSpec { min_member: 2, ..Default::default() });
    let member = |name: &str| {
        let mut p = pending(name, json!({"nvidia.com/gpu": "4"}), json!({}), 0);
        p["metadata"]["labels"] = json!({"scheduling.x-k8s.io/pod-group": "job"});
        p
    };
    post(c.addr, "/filter", &filter_args(&member("w0"), &["n1", "n2"])).await;
    let group: Arc<tessera_api::PodGroup> = Arc::new(
        serde_json::from_value(json!({"apiVersion": "scheduling.x-k8s.io/v1alpha1", "kind": "PodGroup",
            "metadata": {"name": "job", "namespace": "ml"}, "spec": {"minMember": 2}}))
        .unwrap(),
    );
    let pods = |bound: bool| -> Vec<Arc<Pod>> {
        ["w0", "w1"]
            .iter()
            .map(|n| {
                let mut p = member(n);
                if bound {
                    p["spec"]["nodeName"] = json!("n1");
                }
                Arc::new(pod_object(&p))
            })
            .collect()
    };
    c.sched.queue_pod_group_status(std::slice::from_ref(&group), &pods(false));
    assert_eq!(c.sched.write_pod_group_status().await, 1);
    c.sched.queue_pod_group_status(std::slice::from_ref(&group), &pods(true));
    c.sched.write_pod_group_status().await;
    let written = c.binder.group_status();
    assert_eq!(written[0].1.phase.as_deref(), Some("Pending"));
    let last = &written.last().unwrap().1;
    assert_eq!((last.phase.as_deref(), last.scheduled), (Some("Scheduled"), 2), "{written:?}");
}

// ---- 11. the documented timeouts are the manifests' ----------------------------------------

#[test]
fn the_documented_http_timeout_is_the_one_the_manifests_set() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let read = |p: &str| std::fs::read_to_string(format!("{root}/{p}")).unwrap();
    let timeouts = |text: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("httpTimeout:"))
            .map(|v| v.split('#').next().unwrap().trim().to_owned())
            .collect()
    };
    let manifest = timeouts(&read("manifests/base/scheduler-config.yaml"));
    assert_eq!(manifest, ["45s"]);
    for doc in ["docs/operations.md", "docs/quickstart.md", "docs/user-guide.md"] {
        for t in timeouts(&read(doc)) {
            assert_eq!(t, manifest[0], "{doc} shows httpTimeout: {t}");
        }
    }
    let deployment = read("manifests/base/scheduler-deployment.yaml");
    assert!(
        !deployment.contains("--http-timeout-secs") || deployment.contains("--http-timeout-secs=45"),
        "the extender's --http-timeout-secs must equal the httpTimeout"
    );
}
