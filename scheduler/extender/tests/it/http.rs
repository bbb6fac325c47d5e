//! Handler tests without sockets: every verb with good input and with each class of bad input.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tessera_core::{Allocation, Grant, Node, PodKey, Snapshot};
use tessera_scheduler::binder::MemoryBinder;
use tessera_scheduler::http::{App, Limits, Surface};
use tessera_scheduler::state::{MemoryLookup, Scheduler, Settings};

use crate::fixtures::{demo, fixture, fixture_json};

pub async fn call(app: &App, method: Method, path: &str, body: impl Into<Bytes>) -> (StatusCode, Value) {
    let (status, bytes) = call_raw(app, method, path, body).await;
    let v =
        serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, v)
}

pub async fn call_raw(app: &App, method: Method, path: &str, body: impl Into<Bytes>) -> (StatusCode, Bytes) {
    let req = Request::builder().method(method).uri(path).body(Full::new(body.into())).unwrap();
    let resp = app.respond(req).await;
    let status = resp.status();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

pub fn pod(ns: &str, name: &str, uid: &str, limits: Value, annotations: Value) -> Value {
    json!({
        "metadata": {"name": name, "namespace": ns, "uid": uid, "annotations": annotations},
        "spec": {"containers": [{"name": "c", "resources": {"limits": limits, "requests": {"cpu": "1", "memory": "1Gi"}}}]}
    })
}

fn args(pod: Value, nodes: &[&str]) -> String {
    json!({"Pod": pod, "Nodes": null, "NodeNames": nodes}).to_string()
}

fn names(v: &Value) -> Vec<String> {
    v["NodeNames"].as_array().map(|a| a.iter().map(|n| n.as_str().unwrap().to_owned()).collect()).unwrap_or_default()
}

#[tokio::test]
async fn filter_fixture_keeps_the_mig_nodes_and_explains_the_l4_node() {
    let (_, _, app) = demo();
    let (status, v) = call(&app, Method::POST, "/filter", fixture("filter-args.json")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["Error"], "");
    // The pod is the only member of its PodGroup: the gang is planned and the pod is offered
    // the one node it was reserved on.
    let kept = names(&v);
    assert_eq!(kept.len(), 1, "{v}");
    assert!(kept[0] == "gpu-node-a" || kept[0] == "gpu-node-b");
    let other = if kept[0] == "gpu-node-a" { "gpu-node-b" } else { "gpu-node-a" };
    assert!(v["FailedNodes"][other].as_str().unwrap().contains("gang ml/train-job-7 placed pod"), "{v}");
    assert!(v["Nodes"].is_null());
    let why = v["FailedAndUnresolvableNodes"]["gpu-node-c"].as_str().unwrap();
    assert!(why.contains("1g.10gb"), "{why}");
    // Same keys as the fixture reply.
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&v), keys(&fixture_json("filter-result.json")));
}

#[tokio::test]
async fn filter_with_full_node_objects_answers_with_node_objects() {
    let (_, _, app) = demo();
    let mut body = fixture_json("filter-args.json");
    body["NodeNames"] = Value::Null;
    body["Nodes"] = json!({"items": [
        {"metadata": {"name": "gpu-node-a", "labels": {"x": "y"}}},
        {"metadata": {"name": "gpu-node-c"}}
    ]});
    let (status, v) = call(&app, Method::POST, "/filter", body.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(v["NodeNames"].is_null());
    let items = v["Nodes"]["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["metadata"]["name"], "gpu-node-a");
    assert_eq!(items[0]["metadata"]["labels"]["x"], "y");
}

#[tokio::test]
async fn filter_bad_inputs_answer_with_the_error_field() {
    let (_, _, app) = demo();
    for (body, want) in [
        ("{not json".to_owned(), "decoding filter arguments"),
        (json!({"Pod": null, "Nodes": null, "NodeNames": ["gpu-node-a"]}).to_string(), "Pod is null"),
        (
            json!({"Pod": pod("ml", "p", "u", json!({}), json!({})), "Nodes": null, "NodeNames": null}).to_string(),
            "both NodeNames and Nodes are null",
        ),
        (json!({"Pod": {"metadata": {}}, "NodeNames": ["gpu-node-a"]}).to_string(), "metadata.name"),
        (json!({"Pod": {"spec": {"containers": 5}}, "NodeNames": []}).to_string(), "decoding filter arguments"),
        (
            json!({"Pod": pod("ml", "p", "u", json!({}), json!({})), "Nodes": {"items": [{"metadata": {}}]}})
                .to_string(),
            "no metadata.name",
        ),
    ] {
        let (status, v) = call(&app, Method::POST, "/filter", body.clone()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let err = v["Error"].as_str().unwrap();
        assert!(err.contains(want), "{body}: {err}");
    }
}

#[tokio::test]
async fn malformed_annotation_rejects_every_node_naming_the_annotation() {
    let (_, _, app) = demo();
    let p = pod("ml", "bad", "u1", json!({"tessera.dev/gpu": "1"}), json!({"tessera.dev/gpu-memory": "lots"}));
    let (_, v) = call(&app, Method::POST, "/filter", args(p, &["gpu-node-a", "gpu-node-b"])).await;
    assert_eq!(v["Error"], "");
    assert!(names(&v).is_empty());
    let why = v["FailedAndUnresolvableNodes"]["gpu-node-a"].as_str().unwrap();
    assert!(why.contains("tessera.dev/gpu-memory") && why.contains("lots"), "{why}");
    // explain shows the same reason.
    let (status, e) = call(&app, Method::GET, "/api/v1/explain/ml/bad", "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(e["error"].as_str().unwrap().contains("lots"));
}

#[tokio::test]
async fn unknown_nodes_are_unresolvable_and_known_ones_get_reasons() {
    let (_, _, app) = demo();
    let p = pod("ml", "tp", "u2", json!({"nvidia.com/gpu": "8"}), json!({}));
    let (_, v) = call(&app, Method::POST, "/filter", args(p, &["gpu-node-a", "no-such-node", "gpu-node-c"])).await;
    assert!(v["FailedAndUnresolvableNodes"]["no-such-node"].as_str().unwrap().contains("unknown to tessera"));
    // gpu-node-c has 4 GPUs: never fits 8.
    assert!(v["FailedAndUnresolvableNodes"]["gpu-node-c"].as_str().is_some());
    // gpu-node-a has MIG GPUs in use: not now.
    assert!(v["FailedNodes"]["gpu-node-a"].as_str().is_some(), "{v}");
}

#[tokio::test]
async fn annotation_gang_waits_for_its_members() {
    let (_, _, app) = demo();
    let p = pod(
        "ml",
        "g0",
        "u3",
        json!({"nvidia.com/gpu": "1"}),
        json!({"tessera.dev/gang-name": "g", "tessera.dev/gang-size": "2"}),
    );
    let (_, v) = call(&app, Method::POST, "/filter", args(p, &["gpu-node-e"])).await;
    assert!(names(&v).is_empty());
    assert!(v["FailedNodes"]["gpu-node-e"].as_str().unwrap().contains("1 of 2 members pending"), "{v}");
}

#[tokio::test]
async fn prioritize_scores_every_offered_node_in_range() {
    let (_, _, app) = demo();
    let p = pod("ml", "emb", "u4", json!({"tessera.dev/gpu": "1"}), json!({"tessera.dev/gpu-memory": "4Gi"}));
    let body = args(p, &["gpu-node-a", "gpu-node-b", "gpu-node-c", "gpu-node-d"]);
    let _ = call(&app, Method::POST, "/filter", body.clone()).await;
    let (status, v) = call(&app, Method::POST, "/prioritize", body).await;
    assert_eq!(status, StatusCode::OK);
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 4);
    for h in list {
        let s = h["Score"].as_i64().unwrap();
        assert!((0..=10).contains(&s), "{h}");
        assert_eq!(h.as_object().unwrap().keys().collect::<Vec<_>>(), ["Host", "Score"]);
    }
    assert!(list.iter().any(|h| h["Score"] == 10));
}

#[tokio::test]
async fn prioritize_bad_inputs_answer_400_with_a_reason() {
    let (_, _, app) = demo();
    for body in [
        "[]".to_owned(),
        json!({"Pod": null, "NodeNames": ["a"]}).to_string(),
        json!({"Pod": pod("ml", "p", "u", json!({"nvidia.com/gpu": "x"}), json!({})), "NodeNames": ["a"]}).to_string(),
    ] {
        let (status, v) = call(&app, Method::POST, "/prioritize", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(!v["Error"].as_str().unwrap().is_empty());
    }
}

#[tokio::test]
async fn bind_reserves_exact_devices_and_writes_the_assignment() {
    let (sched, binder, app) = demo();
    let (_, v) = call(&app, Method::POST, "/filter", fixture("filter-args.json")).await;
    assert_eq!(names(&v).len(), 1);
    // kube-scheduler binds to the node the filter kept; the fixture names gpu-node-b.
    let mut bind = fixture_json("bind-args.json");
    bind["Node"] = json!(names(&v)[0]);
    let node = names(&v)[0].clone();
    let (status, r) = call(&app, Method::POST, "/bind", bind.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(r, json!({"Error": ""}));
    let bound = binder.bound();
    assert_eq!(bound.len(), 1);
    assert_eq!(bound[0].node, node);
    assert_eq!(bound[0].uid, "6f1c2b7e-3a4d-4c1e-9b8a-2f0d5e7c9a11");
    let a = tessera_api::Assignment::from_annotation(&bound[0].annotations["tessera.dev/assignment"]).unwrap();
    assert_eq!(a.node, node);
    assert_eq!(a.devices.len(), 1);
    assert_eq!(a.devices[0].profile.as_deref(), Some("1g.10gb"));
    assert!(a.devices[0].gpu.starts_with(&format!("GPU-{node}-")));
    // It counts at once, on exactly those devices.
    let key = PodKey::new("ml", "train-worker-0");
    let alloc = sched.with_snapshot(|s| s.allocation(&key).cloned()).unwrap();
    assert_eq!(alloc.node.0, node);
    assert_eq!(alloc.reserved_until_ms, None);
    assert!(
        matches!(alloc.grants[0], Grant::Mig { gpu, start, .. } if gpu == a.devices[0].index && Some(start) == a.devices[0].start)
    );
    sched.with_snapshot(|s| s.audit()).unwrap();
    let (_, e) = call(&app, Method::GET, "/api/v1/explain/ml/train-worker-0", "").await;
    assert_eq!(e["allocation"]["node"], node.as_str());
}

#[tokio::test]
async fn bind_that_needs_a_new_mig_instance_asks_the_node_and_records_its_uuid() {
    let (sched, binder, app) = demo();
    let p = pod("ml", "asr", "u5", json!({"nvidia.com/mig-3g.40gb": "1"}), json!({}));
    let (_, v) = call(&app, Method::POST, "/filter", args(p, &["gpu-node-e"])).await;
    assert_eq!(names(&v), ["gpu-node-e"], "{v}");
    let bind = json!({"PodName": "asr", "PodNamespace": "ml", "PodUID": "u5", "Node": "gpu-node-e"});
    let (_, r) = call(&app, Method::POST, "/bind", bind.to_string()).await;
    assert_eq!(r["Error"], "");
    let reconf = binder.reconfigured();
    assert_eq!(reconf.len(), 1);
    assert_eq!(reconf[0].0, "gpu-node-e");
    assert_eq!(reconf[0].1[0].mode, tessera_api::gpunode::Mode::Mig);
    let a = tessera_api::Assignment::from_annotation(&binder.bound()[0].annotations["tessera.dev/assignment"]).unwrap();
    assert!(a.devices[0].mig.as_deref().is_some_and(|m| m.starts_with("MIG-")));
    let (_, m) = call(&app, Method::GET, "/metrics", "").await;
    assert!(m.as_str().unwrap().contains("tessera_mig_reconfig_requests_total 1"));
    sched.with_snapshot(|s| s.audit()).unwrap();
}

#[tokio::test]
async fn bind_bad_inputs_and_failures_answer_with_the_error_field() {
    let (_, _, app) = demo();
    for (body, want) in [
        ("nope".to_owned(), "decoding bind arguments"),
        (json!({"PodName": "", "PodNamespace": "ml", "Node": "gpu-node-a"}).to_string(), "PodName is empty"),
        (
            json!({"PodName": "ghost", "PodNamespace": "ml", "PodUID": "x", "Node": "gpu-node-a"}).to_string(),
            "unknown to tessera",
        ),
    ] {
        let (status, v) = call(&app, Method::POST, "/bind", body.clone()).await;
        assert_eq!(status, StatusCode::OK);
        assert!(v["Error"].as_str().unwrap().contains(want), "{body}: {v}");
    }
    // A pod filtered for one node but bound to a node where it cannot fit.
    let p = pod("ml", "big", "u6", json!({"nvidia.com/gpu": "8"}), json!({}));
    let _ = call(&app, Method::POST, "/filter", args(p, &["gpu-node-e"])).await;
    let bind = json!({"PodName": "big", "PodNamespace": "ml", "PodUID": "u6", "Node": "gpu-node-c"});
    let (_, v) = call(&app, Method::POST, "/bind", bind.to_string()).await;
    assert!(v["Error"].as_str().unwrap().contains("gpu-node-c"), "{v}");
}

#[tokio::test]
async fn failed_binding_releases_the_reserved_devices() {
    let mut snap = Snapshot::default();
    snap.add_node(Node::test("n1").with_gpus(1, "H100-80GB")).unwrap();
    let binder = Arc::new(MemoryBinder::failing("apiserver said no"));
    let sched = Arc::new(Scheduler::new(
        snap,
        tessera_core::policy::by_name("tessera").unwrap(),
        binder,
        Arc::new(MemoryLookup::default()),
        Settings::default(),
    ));
    let app = App::new(sched.clone(), Surface::ALL);
    let p = pod("ml", "p", "u", json!({"nvidia.com/gpu": "1"}), json!({}));
    let _ = call(&app, Method::POST, "/filter", args(p.clone(), &["n1"])).await;
    let bind = json!({"PodName": "p", "PodNamespace": "ml", "PodUID": "u", "Node": "n1"});
    let (_, v) = call(&app, Method::POST, "/bind", bind.to_string()).await;
    assert!(v["Error"].as_str().unwrap().contains("apiserver said no"));
    assert!(sched.with_snapshot(|s| s.allocations().is_empty()));
    // The GPU is free again.
    let (_, v) = call(&app, Method::POST, "/filter", args(p, &["n1"])).await;
    assert_eq!(names(&v), ["n1"]);
}

#[tokio::test]
async fn follower_refuses_to_bind() {
    let (sched, binder, app) = demo();
    sched.set_leader(false);
    let _ = call(&app, Method::POST, "/filter", fixture("filter-args.json")).await;
    let (_, v) = call(&app, Method::POST, "/bind", fixture("bind-args.json")).await;
    assert!(v["Error"].as_str().unwrap().contains("not the leader"));
    assert!(binder.bound().is_empty());
}

fn one_gpu_cluster_with(victims: &[(&str, &str, i32, Option<&str>, &str)]) -> (Arc<Scheduler>, App) {
    let mut snap = Snapshot::default();
    snap.add_node(Node::test("n1").with_gpus(2, "H100-80GB")).unwrap();
    snap.add_node(Node::test("n2").with_gpus(2, "H100-80GB")).unwrap();
    let sched_snap = {
        for (i, (key, node, prio, gang, _)) in victims.iter().enumerate() {
            let gpu = victims[..i].iter().filter(|v| v.1 == *node).count() as u32;
            snap.allocate(Allocation {
                pod: PodKey::from(*key),
                node: (*node).into(),
                cpu_milli: 0,
                memory_mib: 0,
                grants: vec![Grant::Whole { gpu }],
                priority: *prio,
                gang: gang.map(str::to_owned),
                reserved_until_ms: None,
                extended: Vec::new(),
            })
            .unwrap();
        }
        snap
    };
    let sched = Arc::new(Scheduler::new(
        sched_snap,
        tessera_core::policy::by_name("tessera").unwrap(),
        Arc::new(MemoryBinder::default()),
        Arc::new(MemoryLookup::default()),
        Settings::default(),
    ));
    for (key, _, _, _, uid) in victims {
        sched.remember_uid(uid, PodKey::from(*key));
    }
    let app = App::new(sched.clone(), Surface::ALL);
    (sched, app)
}

#[tokio::test]
async fn preempt_keeps_only_the_victims_needed() {
    let (_, app) =
        one_gpu_cluster_with(&[("ml/low", "n1", 0, None, "uid-low"), ("ml/high", "n1", 50, None, "uid-high")]);
    let preemptor = pod("ml", "vip", "uid-vip", json!({"nvidia.com/gpu": "1"}), json!({}));
    let body = json!({
        "Pod": preemptor,
        "NodeNameToVictims": null,
        "NodeNameToMetaVictims": {"n1": {"Pods": [{"UID": "uid-low"}, {"UID": "uid-high"}], "NumPDBViolations": 0}}
    });
    let (status, v) = call(&app, Method::POST, "/preempt", body.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v, json!({"NodeNameToMetaVictims": {"n1": {"Pods": [{"UID": "uid-low"}], "NumPDBViolations": 0}}}));
}

#[tokio::test]
async fn preempt_never_splits_a_gang() {
    let (_, app) = one_gpu_cluster_with(&[
        ("ml/w0", "n1", 0, Some("ml/job"), "uid-w0"),
        ("ml/w1", "n2", 0, Some("ml/job"), "uid-w1"),
        ("ml/other", "n1", 0, None, "uid-other"),
    ]);
    let preemptor = pod("ml", "vip", "uid-vip", json!({"nvidia.com/gpu": "1"}), json!({}));
    let body = json!({
        "Pod": preemptor,
        "NodeNameToMetaVictims": {"n1": {"Pods": [{"UID": "uid-w0"}], "NumPDBViolations": 0}}
    });
    let (_, v) = call(&app, Method::POST, "/preempt", body.to_string()).await;
    assert_eq!(v, json!({"NodeNameToMetaVictims": {}}));
}

#[tokio::test]
async fn preempt_fixture_with_unknown_victims_accepts_no_node() {
    let (_, _, app) = demo();
    let (status, v) = call(&app, Method::POST, "/preempt", fixture("preempt-args.json")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v, json!({"NodeNameToMetaVictims": {}}));
}

#[tokio::test]
async fn preempt_bad_inputs_answer_400() {
    let (_, _, app) = demo();
    for body in [
        "{".to_owned(),
        json!({"Pod": null}).to_string(),
        json!({"Pod": pod("ml", "p", "u", json!({}), json!({}))}).to_string(),
    ] {
        let (status, v) = call(&app, Method::POST, "/preempt", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(!v["Error"].as_str().unwrap().is_empty());
    }
}

#[tokio::test]
async fn read_only_endpoints_describe_the_cluster() {
    let (_, _, app) = demo();
    let (status, body) = call_raw(&app, Method::GET, "/healthz", "").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok\n"[..]));
    assert_eq!(call_raw(&app, Method::GET, "/readyz", "").await.0, StatusCode::OK);
    let (status, c) = call(&app, Method::GET, "/api/v1/cluster", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(c["mode"], "demo");
    assert_eq!(c["policy"], "tessera");
    let nodes = c["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 5);
    let a = &nodes[0];
    assert_eq!(a["name"], "gpu-node-a");
    assert_eq!(a["gpus"][0]["mode"], "mig");
    assert!(
        a["gpus"][0]["mig"].as_array().unwrap().iter().all(|m| m["profile"].is_string() && m.get("holder").is_some())
    );
    assert!(!c["allocations"].as_array().unwrap().is_empty());
    assert!(c["packing"]["pools"]["h100"]["allocation_ratio"].as_f64().unwrap() > 0.0);
    let (_, m) = call(&app, Method::GET, "/metrics", "").await;
    let m = m.as_str().unwrap();
    for name in [
        "tessera_packing_allocation_ratio{pool=\"h100\"}",
        "tessera_reservations",
        "tessera_leader",
        "tessera_pending_gangs",
    ] {
        assert!(m.contains(name), "{name} missing");
    }
}

#[tokio::test]
async fn unknown_paths_methods_and_explain_forms_are_answered() {
    let (_, _, app) = demo();
    assert_eq!(call(&app, Method::GET, "/nope", "").await.0, StatusCode::NOT_FOUND);
    assert_eq!(call(&app, Method::GET, "/filter", "").await.0, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(call(&app, Method::POST, "/metrics", "").await.0, StatusCode::METHOD_NOT_ALLOWED);
    // Only the four verb paths are verbs: a path near one is no bind.
    for p in ["/bind/", "/binds", "/Bind", "/filter/x"] {
        assert_eq!(call(&app, Method::POST, p, "{}").await.0, StatusCode::METHOD_NOT_ALLOWED, "{p}");
    }
    assert_eq!(call(&app, Method::GET, "/api/v1/explain/ml", "").await.0, StatusCode::BAD_REQUEST);
    assert_eq!(call(&app, Method::GET, "/api/v1/explain/ml/nobody", "").await.0, StatusCode::NOT_FOUND);
    // A verbs-only listener does not serve the read-only surface.
    let (sched, _, _) = demo();
    let verbs = App::new(sched, Surface::VERBS);
    assert_eq!(call(&verbs, Method::GET, "/api/v1/cluster", "").await.0, StatusCode::NOT_FOUND);
    assert_eq!(call(&verbs, Method::GET, "/healthz", "").await.0, StatusCode::OK);
    // A read-only listener serves no verb.
    let (sched, _, _) = demo();
    let read = App::new(sched, Surface::READ_ONLY);
    assert_eq!(call(&read, Method::POST, "/bind", "{}").await.0, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn oversized_bodies_are_refused_in_each_verbs_shape() {
    let (sched, _, _) = demo();
    let mut app = App::new(sched, Surface::ALL);
    app.limits = Limits { max_body_bytes: 64, ..Limits::default() };
    let big = fixture("filter-args.json");
    let (status, v) = call(&app, Method::POST, "/filter", big.clone()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(v["Error"].as_str().unwrap().contains("larger than 64 bytes"));
    let (status, v) = call(&app, Method::POST, "/prioritize", big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(v["Error"].as_str().unwrap().contains("64"));
}

#[tokio::test]
async fn splitting_a_long_node_list_across_threads_gives_the_same_answer() {
    let snap = tessera_core::testing::synth_cluster(3, 600);
    let all: Vec<String> = snap.nodes().iter().map(|n| n.name.0.clone()).collect();
    let app_with = |threads: usize| {
        let sched = Arc::new(Scheduler::new(
            snap.clone(),
            tessera_core::policy::by_name("tessera").unwrap(),
            Arc::new(MemoryBinder::default()),
            Arc::new(MemoryLookup::default()),
            Settings { threads, ..Settings::default() },
        ));
        App::new(sched, Surface::ALL)
    };
    let (one, four) = (app_with(1), app_with(4));
    for (i, limits) in [json!({"nvidia.com/mig-1g.10gb": "1"}), json!({"nvidia.com/gpu": "4"})].into_iter().enumerate()
    {
        let p = pod("ml", &format!("p{i}"), "u", limits, json!({}));
        let body = json!({"Pod": p, "NodeNames": all}).to_string();
        let (_, a) = call(&one, Method::POST, "/filter", body.clone()).await;
        let (_, b) = call(&four, Method::POST, "/filter", body.clone()).await;
        assert_eq!(a, b);
        assert!(!names(&a).is_empty());
        let (_, a) = call(&one, Method::POST, "/prioritize", body.clone()).await;
        let (_, b) = call(&four, Method::POST, "/prioritize", body).await;
        assert_eq!(a, b);
    }
}

#[tokio::test]
async fn a_whole_gpu_taken_from_an_idle_mig_gpu_asks_the_node_to_leave_mig_mode() {
    let mut snap = Snapshot::default();
    let mut gpu = tessera_core::Gpu::new(0, "A100-80GB", 81920, tessera_core::GpuMode::Mig);
    gpu.uuid = "GPU-x".into();
    snap.add_node(Node::new("n1", 64_000, 512 * 1024, vec![gpu])).unwrap();
    let binder = Arc::new(MemoryBinder::default());
    let sched = Arc::new(Scheduler::new(
        snap,
        tessera_core::policy::by_name("tessera").unwrap(),
        binder.clone(),
        Arc::new(MemoryLookup::default()),
        Settings::default(),
    ));
    let app = App::new(sched.clone(), Surface::ALL);
    let p = pod("ml", "w", "u", json!({"nvidia.com/gpu": "1"}), json!({}));
    let (_, v) = call(&app, Method::POST, "/filter", args(p, &["n1"])).await;
    assert_eq!(names(&v), ["n1"]);
    let (_, r) = call(
        &app,
        Method::POST,
        "/bind",
        json!({"PodName": "w", "PodNamespace": "ml", "PodUID": "u", "Node": "n1"}).to_string(),
    )
    .await;
    assert_eq!(r["Error"], "");
    let reconf = binder.reconfigured();
    assert_eq!(reconf.len(), 1);
    assert_eq!(reconf[0].1[0].mode, tessera_api::gpunode::Mode::Full);
    sched.with_snapshot(|s| assert_eq!(s.nodes()[0].gpus[0].mode(), tessera_core::GpuMode::Full));
}

#[tokio::test]
async fn prioritize_from_the_filter_verdicts_matches_a_fresh_evaluation() {
    let snap = tessera_core::testing::synth_cluster(5, 300);
    let all: Vec<String> = snap.nodes().iter().map(|n| n.name.0.clone()).collect();
    let app = || {
        let sched = Arc::new(Scheduler::new(
            snap.clone(),
            tessera_core::policy::by_name("tessera").unwrap(),
            Arc::new(MemoryBinder::default()),
            Arc::new(MemoryLookup::default()),
            Settings { threads: 1, ..Settings::default() },
        ));
        App::new(sched, Surface::ALL)
    };
    let shapes = [
        (json!({"nvidia.com/mig-3g.40gb": "1"}), json!({})),
        (json!({"nvidia.com/gpu": "2"}), json!({})),
        // Only the time-sliced nodes fit: most offered nodes fail.
        (json!({"tessera.dev/gpu": "1"}), json!({"tessera.dev/gpu-share": "300"})),
    ];
    let mut some_fail = false;
    for (i, (limits, annotations)) in shapes.into_iter().enumerate() {
        let p = pod("ml", &format!("p{i}"), "u", limits, annotations);
        let (filtered, fresh) = (app(), app());
        let (_, f) = call(&filtered, Method::POST, "/filter", json!({"Pod": p, "NodeNames": all}).to_string()).await;
        let pass = names(&f);
        assert!(!pass.is_empty(), "{f}");
        some_fail |= pass.len() < all.len();
        // All offered nodes, the ones that passed (what kube-scheduler sends), and a reordered
        // subset that includes failing nodes (the copying path).
        let mut mixed: Vec<String> = all.iter().rev().step_by(3).cloned().collect();
        mixed.push(pass[0].clone());
        for list in [all.clone(), pass.clone(), mixed] {
            let body = json!({"Pod": p, "NodeNames": list}).to_string();
            let (_, cached) = call(&filtered, Method::POST, "/prioritize", body.clone()).await;
            let (_, direct) = call(&fresh, Method::POST, "/prioritize", body).await;
            assert_eq!(cached, direct);
            assert_eq!(cached.as_array().unwrap().len(), list.len());
        }
    }
    assert!(some_fail, "no shape left a node out: the passing-nodes path was not exercised");
}

#[tokio::test]
async fn the_streamed_filter_reply_is_the_wire_result() {
    let (sched, _, app) = demo();
    let nodes = ["gpu-node-a", "gpu-node-b", "gpu-node-c", "gpu-node-d", "gpu-node-e", "no-such-node"];
    let p = pod("ml", "emb", "u9", json!({"nvidia.com/mig-1g.10gb": "1"}), json!({}));
    let node_objects: Vec<Value> = nodes.iter().map(|n| json!({"metadata": {"name": n}})).collect();
    let bad = pod("ml", "bad", "u10", json!({"tessera.dev/gpu": "1"}), json!({"tessera.dev/gpu-share": "abc"}));
    for body in [
        json!({"Pod": p, "NodeNames": nodes}),
        json!({"Pod": p, "Nodes": {"items": node_objects}}),
        json!({"Pod": bad, "NodeNames": nodes}),
        json!({"Pod": null, "NodeNames": nodes}),
    ] {
        let (_, streamed) = call(&app, Method::POST, "/filter", body.to_string()).await;
        let args: tessera_scheduler::wire::ExtenderArgs = serde_json::from_value(body.clone()).unwrap();
        let built = serde_json::to_value(sched.filter(args)).unwrap();
        assert_eq!(streamed, built, "{body}");
    }
    // Both kinds of failure and a pass, in the reply.
    let (_, v) = call(&app, Method::POST, "/filter", json!({"Pod": p, "NodeNames": nodes}).to_string()).await;
    assert!(!names(&v).is_empty(), "{v}");
    assert!(v["FailedAndUnresolvableNodes"]["no-such-node"].as_str().unwrap().contains("unknown"), "{v}");
}
