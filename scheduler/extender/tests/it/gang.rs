//! Gangs through the verbs: nothing until minMember members are pending, then the whole gang
//! is reserved at once; binds are held until every member reaches bind; a lapsed plan fails
//! all held binds and frees everything.

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use serde_json::{Value, json};
use tessera_api::podgroup::PodGroupSpec;
use tessera_core::{Allocation, Grant, Node, PodKey, Snapshot};
use tessera_scheduler::binder::MemoryBinder;
use tessera_scheduler::http::{App, Surface};
use tessera_scheduler::state::{MemoryLookup, Scheduler, Settings};

use crate::http::{call, pod};

fn cluster(nodes: &[(&str, u32)]) -> (Arc<Scheduler>, Arc<MemoryBinder>, Arc<MemoryLookup>, App) {
    let mut snap = Snapshot::default();
    for (n, gpus) in nodes {
        snap.add_node(Node::test(n).with_gpus(*gpus, "H100-80GB")).unwrap();
    }
    let (sched, binder, lookup) = crate::contract::scheduler(snap, Settings::default(), MemoryBinder::default());
    let app = App::new(sched.clone(), Surface::ALL);
    (sched, binder, lookup, app)
}

fn member(name: &str, gpus: u32) -> Value {
    let mut p = pod("ml", name, &format!("uid-{name}"), json!({"nvidia.com/gpu": gpus.to_string()}), json!({}));
    p["metadata"]["labels"] = json!({"scheduling.x-k8s.io/pod-group": "job"});
    p
}

fn filter_body(p: Value, nodes: &[&str]) -> String {
    json!({"Pod": p, "Nodes": null, "NodeNames": nodes}).to_string()
}

fn bind_body(name: &str, node: &str) -> String {
    json!({"PodName": name, "PodNamespace": "ml", "PodUID": format!("uid-{name}"), "Node": node}).to_string()
}

fn passed(v: &Value) -> Vec<String> {
    v["NodeNames"].as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn gang_waits_for_min_member_then_reserves_all_and_binds_all() {
    let (sched, binder, lookup, app) = cluster(&[("n1", 4), ("n2", 4)]);
    lookup.add_group("ml", "job", PodGroupSpec { min_member: 2, ..Default::default() });
    let nodes = ["n1", "n2"];
    let (_, v) = call(&app, Method::POST, "/filter", filter_body(member("w0", 4), &nodes)).await;
    assert!(passed(&v).is_empty());
    assert!(v["FailedNodes"]["n1"].as_str().unwrap().contains("1 of 2 members pending"), "{v}");
    assert!(sched.with_snapshot(|s| s.allocations().is_empty()), "a waiting gang holds nothing");
    // The second member completes the gang: both are reserved at once, one node each.
    let (_, v1) = call(&app, Method::POST, "/filter", filter_body(member("w1", 4), &nodes)).await;
    let (_, v0) = call(&app, Method::POST, "/filter", filter_body(member("w0", 4), &nodes)).await;
    let (n0, n1) = (passed(&v0), passed(&v1));
    assert_eq!((n0.len(), n1.len()), (1, 1), "{v0} {v1}");
    assert_ne!(n0, n1);
    let reserved = sched.with_snapshot(|s| s.allocations().values().filter(|a| a.reserved_until_ms.is_some()).count());
    assert_eq!(reserved, 2);
    // The first bind is held until the second arrives; then both bind.
    let a0 = app.clone();
    let b0 = bind_body("w0", &n0[0]);
    let first = tokio::spawn(async move { call(&a0, Method::POST, "/bind", b0).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(binder.bound().is_empty(), "member bound before the whole gang reached bind");
    let (_, r1) = call(&app, Method::POST, "/bind", bind_body("w1", &n1[0])).await;
    let (_, r0) = first.await.unwrap();
    assert_eq!((r0["Error"].as_str(), r1["Error"].as_str()), (Some(""), Some("")));
    assert_eq!(binder.bound().len(), 2);
    assert!(sched.with_snapshot(|s| s.allocations().values().all(|a| a.reserved_until_ms.is_none())));
}

#[tokio::test(start_paused = true)]
async fn a_lapsed_gang_fails_every_held_bind_and_frees_its_gpus() {
    let (sched, binder, lookup, app) = cluster(&[("n1", 4), ("n2", 4)]);
    lookup.add_group(
        "ml",
        "job",
        PodGroupSpec { min_member: 2, schedule_timeout_seconds: Some(2), ..Default::default() },
    );
    let nodes = ["n1", "n2"];
    let _ = call(&app, Method::POST, "/filter", filter_body(member("w0", 4), &nodes)).await;
    let (_, v1) = call(&app, Method::POST, "/filter", filter_body(member("w1", 4), &nodes)).await;
    let (_, v0) = call(&app, Method::POST, "/filter", filter_body(member("w0", 4), &nodes)).await;
    assert_eq!(passed(&v1).len(), 1);
    // Only one member ever reaches bind.
    let (_, r0) = call(&app, Method::POST, "/bind", bind_body("w0", &passed(&v0)[0])).await;
    assert!(r0["Error"].as_str().unwrap().contains("deadline"), "{r0}");
    assert!(binder.bound().is_empty());
    assert!(sched.with_snapshot(|s| s.allocations().is_empty()));
}

#[tokio::test]
async fn a_gang_that_cannot_fit_whole_reserves_nothing_and_says_which_member() {
    let (sched, _, lookup, app) = cluster(&[("n1", 4)]);
    lookup.add_group("ml", "job", PodGroupSpec { min_member: 2, ..Default::default() });
    let _ = call(&app, Method::POST, "/filter", filter_body(member("w0", 4), &["n1"])).await;
    let (_, v) = call(&app, Method::POST, "/filter", filter_body(member("w1", 4), &["n1"])).await;
    assert!(passed(&v).is_empty());
    let why = v["FailedNodes"]["n1"].as_str().unwrap();
    assert!(why.contains("gang ml/job") && why.contains("does not fit"), "{why}");
    assert!(sched.with_snapshot(|s| s.allocations().is_empty()));
}

#[tokio::test]
async fn preempt_answers_with_the_cores_victims() {
    let (sched, _, _, app) = cluster(&[("n1", 1), ("n2", 1)]);
    for (key, node, prio, uid) in [("ml/low", "n1", 0, "uid-low"), ("ml/mid", "n2", 10, "uid-mid")] {
        sched.remember_uid(uid, PodKey::from(key));
        let a = Allocation {
            pod: PodKey::from(key),
            node: node.into(),
            cpu_milli: 0,
            memory_mib: 0,
            grants: vec![Grant::Whole { gpu: 0 }],
            priority: prio,
            gang: None,
            reserved_until_ms: None,
            extended: Vec::new(),
        };
        let mut snap = sched.with_snapshot(Clone::clone);
        snap.allocate(a).unwrap();
        sched.replace_base(
            snap,
            [("uid-low".to_owned(), PodKey::from("ml/low")), ("uid-mid".to_owned(), PodKey::from("ml/mid"))]
                .into_iter()
                .collect(),
            Default::default(),
        );
    }
    let mut vip = pod("ml", "vip", "uid-vip", json!({"nvidia.com/gpu": "1"}), json!({}));
    vip["spec"]["priority"] = json!(100);
    let body = json!({
        "Pod": vip,
        "NodeNameToMetaVictims": {
            "n1": {"Pods": [{"UID": "uid-low"}], "NumPDBViolations": 0},
            "n2": {"Pods": [{"UID": "uid-mid"}], "NumPDBViolations": 0}
        }
    });
    let (_, v) = call(&app, Method::POST, "/preempt", body.to_string()).await;
    // The core evicts the cheapest unit: the lowest-priority pod, on n1 only.
    assert_eq!(v, json!({"NodeNameToMetaVictims": {"n1": {"Pods": [{"UID": "uid-low"}], "NumPDBViolations": 0}}}));
}
