//! Gang reservations across a restart: a replica plans a gang and writes each member's
//! reservation annotation; a new replica, built from the mocked API objects (reflectors listing
//! through a tower-test mock), reserves the same devices before any filter and binds the gang to
//! them; an expired reservation is not restored and its annotation is removed.

use std::sync::Arc;

use http::Method;
use serde_json::{Value, json};
use tessera_core::{Grant, PodKey};
use tessera_scheduler::binder::MemoryBinder;
use tessera_scheduler::http::{App, Surface};
use tessera_scheduler::reservations::Reservation;
use tessera_scheduler::state::{Scheduler, Settings};

use crate::http::{call, pod};
use crate::kube_api::{mock, one_node_lists, serve_lists, synced_scheduler};

const KEY: &str = "tessera.dev/reservation";

fn node() -> Value {
    json!({"metadata": {"name": "n1"}, "status": {"allocatable": {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": "4"}}})
}

fn member(name: &str, gang: &str, reservation: Option<&str>) -> Value {
    let mut ann = json!({"tessera.dev/gang-name": gang, "tessera.dev/gang-size": "2"});
    if let Some(r) = reservation {
        ann[KEY] = json!(r);
    }
    pod("ml", name, &format!("uid-{name}"), json!({"nvidia.com/gpu": "1"}), ann)
}

/// A live-mode scheduler whose reflectors list `pods` (and node n1) from a mock API server.
async fn live(pods: Vec<Value>) -> (Arc<Scheduler>, Arc<MemoryBinder>) {
    live_with(pods, MemoryBinder::default()).await
}

async fn live_with(pods: Vec<Value>, binder: MemoryBinder) -> (Arc<Scheduler>, Arc<MemoryBinder>) {
    let (client, handle) = mock();
    let mig = json!([{"profile": "3g.40gb", "start": 0, "size": 4, "uuid": "MIG-a"}]);
    serve_lists(handle, one_node_lists(node(), pods, mig));
    let binder = Arc::new(binder);
    let settings = Settings { mode: "live", persist_reservations: true, ..Settings::default() };
    let sched = synced_scheduler(&client, binder.clone(), settings).await;
    (sched, binder)
}

/// kube-scheduler's bind of member `name` (namespace `ml`) to `n1`; the reply body.
async fn bind(app: &App, name: &str) -> Value {
    let body = json!({"PodName": name, "PodNamespace": "ml", "PodUID": format!("uid-{name}"), "Node": "n1"});
    call(app, Method::POST, "/bind", body.to_string()).await.1
}

async fn filter(app: &App, p: Value) -> Value {
    call(app, Method::POST, "/filter", json!({"Pod": p, "NodeNames": ["n1"]}).to_string()).await.1
}

fn grants(s: &Scheduler, pod: &str) -> Option<(Vec<Grant>, Option<u64>)> {
    s.with_snapshot(|snap| snap.allocation(&PodKey::from(pod)).map(|a| (a.grants.clone(), a.reserved_until_ms)))
}

#[tokio::test]
async fn a_planned_gang_survives_a_restart_and_binds_to_the_same_devices() {
    // Before: GPU 0 is busy, so the plan takes two others.
    let mut busy = pod("ml", "busy", "uid-busy", json!({"nvidia.com/gpu": "1"}), json!({}));
    busy["spec"]["nodeName"] = json!("n1");
    busy["status"] = json!({"phase": "Running"});
    let (a, a_binder) = live(vec![busy, member("w0", "train", None), member("w1", "train", None)]).await;
    let app = App::new(a.clone(), Surface::ALL);
    let v = filter(&app, member("w0", "train", None)).await;
    assert!(v["FailedNodes"]["n1"].as_str().unwrap().contains("1 of 2 members pending"), "{v}");
    let v = filter(&app, member("w1", "train", None)).await;
    assert_eq!(v["NodeNames"], json!(["n1"]), "{v}");
    let planned = [grants(&a, "ml/w0").unwrap(), grants(&a, "ml/w1").unwrap()];
    assert!(planned.iter().all(|(g, until)| until.is_some() && !g.contains(&Grant::Whole { gpu: 0 })), "{planned:?}");
    assert_eq!(a.write_reservations().await, 2);
    let written = a_binder.annotations();
    let ann = |p: &str| written[&(PodKey::from(p), KEY.to_owned())].clone();
    let r0 = Reservation::from_annotation(&ann("ml/w0")).unwrap();
    assert_eq!((r0.gang.as_str(), r0.node.0.as_str(), r0.members), ("ml/train", "n1", 2));
    assert_eq!(r0.grants, planned[0].0);

    // The replica goes away before any member binds. A new one starts from the API objects:
    // the busy pod has finished, the members carry their reservations, and a gang whose
    // reservation lapsed still carries its own.
    let lapsed = Reservation {
        gang: "ml/old".into(),
        deadline: "2020-01-01T00:00:00Z".into(),
        grants: vec![Grant::Whole { gpu: 0 }],
        ..r0.clone()
    }
    .to_annotation();
    let (b, b_binder) = live(vec![
        member("w0", "train", Some(&ann("ml/w0"))),
        member("w1", "train", Some(&ann("ml/w1"))),
        member("o0", "old", Some(&lapsed)),
        member("o1", "old", Some(&lapsed)),
    ])
    .await;
    // Reserved again before any filter, on the same devices, still lapsing.
    for (i, p) in ["ml/w0", "ml/w1"].into_iter().enumerate() {
        let (g, until) = grants(&b, p).unwrap_or_else(|| panic!("{p} was not restored"));
        assert_eq!(g, planned[i].0, "{p}");
        assert!(until.is_some(), "{p} lost its deadline");
    }
    assert_eq!(grants(&b, "ml/o0"), None);
    assert_eq!(grants(&b, "ml/o1"), None);
    b.with_snapshot(|s| s.audit()).unwrap();

    // The gang binds to what was planned: both binds are held until both arrive.
    let app = App::new(b.clone(), Surface::ALL);
    let (r0, r1) = tokio::join!(bind(&app, "w0"), bind(&app, "w1"));
    assert_eq!((r0["Error"].as_str(), r1["Error"].as_str()), (Some(""), Some("")), "{r0} {r1}");
    let bound = b_binder.bound();
    assert_eq!(bound.len(), 2);
    for req in &bound {
        let a = tessera_api::Assignment::from_annotation(&req.annotations["tessera.dev/assignment"]).unwrap();
        let i = usize::from(req.name == "w1");
        let want: Vec<u32> = planned[i].0.iter().map(Grant::gpu).collect();
        assert_eq!(a.devices.iter().map(|d| d.index).collect::<Vec<_>>(), want, "{}", req.name);
    }
    // Bound members' reservations and the lapsed ones are removed.
    b.write_reservations().await;
    let removed: Vec<String> =
        b_binder.annotated().into_iter().filter(|(_, k, v)| k == KEY && v.is_none()).map(|(p, _, _)| p.0).collect();
    for p in ["ml/w0", "ml/w1", "ml/o0", "ml/o1"] {
        assert!(removed.iter().any(|r| r == p), "{p} not cleared: {removed:?}");
    }
    assert!(b_binder.annotations().is_empty(), "{:?}", b_binder.annotations());
}

#[tokio::test]
async fn a_follower_does_not_write_reservations() {
    let (a, binder) = live(vec![member("w0", "train", None), member("w1", "train", None)]).await;
    a.set_leader(false);
    let app = App::new(a.clone(), Surface::ALL);
    filter(&app, member("w0", "train", None)).await;
    filter(&app, member("w1", "train", None)).await;
    assert!(grants(&a, "ml/w0").is_some());
    assert_eq!(a.write_reservations().await, 0);
    assert!(binder.annotated().is_empty());
}

#[tokio::test]
async fn a_restored_plan_is_forgotten_once_its_members_run() {
    // A replica restores a plan (as a follower does), then sees its members bound by another.
    let (a, a_binder) = live(vec![member("w0", "train", None), member("w1", "train", None)]).await;
    let app = App::new(a.clone(), Surface::ALL);
    filter(&app, member("w0", "train", None)).await;
    filter(&app, member("w1", "train", None)).await;
    a.write_reservations().await;
    let written = a_binder.annotations();
    let ann = |p: &str| written[&(PodKey::from(p), KEY.to_owned())].clone();
    let (b, _) =
        live(vec![member("w0", "train", Some(&ann("ml/w0"))), member("w1", "train", Some(&ann("ml/w1")))]).await;
    assert!(grants(&b, "ml/w0").is_some_and(|(_, until)| until.is_some()));
    let mut running = b.with_snapshot(Clone::clone);
    for p in ["ml/w0", "ml/w1"] {
        let mut alloc = running.allocation(&PodKey::from(p)).cloned().unwrap();
        running.release(&alloc.pod).unwrap();
        alloc.reserved_until_ms = None;
        running.allocate(alloc).unwrap();
    }
    b.replace_base(running, Default::default(), Default::default());
    b.tick();
    // The gang's name is free again: a new member waits for its gang instead of being placed
    // as a loose pod beside a finished plan.
    let app = App::new(b.clone(), Surface::ALL);
    let v = filter(&app, member("x0", "train", None)).await;
    assert!(v["FailedNodes"]["n1"].as_str().is_some_and(|r| r.contains("1 of 2 members pending")), "{v}");
}

#[tokio::test]
async fn a_dropped_plan_takes_its_reservations_with_it() {
    let (a, binder) =
        live_with(vec![member("w0", "train", None), member("w1", "train", None)], MemoryBinder::failing("API down"))
            .await;
    let app = App::new(a.clone(), Surface::ALL);
    filter(&app, member("w0", "train", None)).await;
    filter(&app, member("w1", "train", None)).await;
    assert_eq!(a.write_reservations().await, 2);
    let written = binder.annotations();
    assert_eq!(written.len(), 2);
    // Both members reach bind; the Binding fails, so the plan is dropped and released.
    let (r0, r1) = tokio::join!(bind(&app, "w0"), bind(&app, "w1"));
    assert!(r0["Error"].as_str().unwrap().contains("API down") || r1["Error"].as_str().unwrap().contains("API down"));
    assert_eq!((grants(&a, "ml/w0"), grants(&a, "ml/w1")), (None, None));
    // Until the removals land, the pods still carry the plan: this replica does not take back
    // a plan it dropped.
    let carrying: Vec<Arc<k8s_openapi::api::core::v1::Pod>> = ["w0", "w1"]
        .into_iter()
        .map(|n| {
            let ann = written[&(PodKey::from(format!("ml/{n}").as_str()), KEY.to_owned())].clone();
            Arc::new(serde_json::from_value(member(n, "train", Some(&ann))).unwrap())
        })
        .collect();
    assert!(a.restore_reservations(&carrying).is_empty());
    assert_eq!(grants(&a, "ml/w0"), None);
    a.write_reservations().await;
    assert!(binder.annotations().is_empty(), "{:?}", binder.annotations());
}

#[tokio::test]
async fn a_forged_reservation_is_not_trusted() {
    let forged = |grants: Vec<Grant>, members: u32, deadline: &str| {
        Reservation {
            gang: "ml/train".into(),
            node: "n1".into(),
            grants,
            ops: vec![],
            deadline: deadline.into(),
            members,
        }
        .to_annotation()
    };
    let far = "2999-01-01T00:00:00Z";
    // Three GPUs for a pod that asks for one.
    let greedy = forged(vec![Grant::Whole { gpu: 0 }, Grant::Whole { gpu: 1 }, Grant::Whole { gpu: 2 }], 2, far);
    let other = forged(vec![Grant::Whole { gpu: 3 }], 2, far);
    let (b, binder) = live(vec![member("w0", "train", Some(&greedy)), member("w1", "train", Some(&other))]).await;
    assert_eq!((grants(&b, "ml/w0"), grants(&b, "ml/w1")), (None, None));
    b.write_reservations().await;
    assert!(binder.annotations().is_empty(), "{:?}", binder.annotations());

    // A "plan" of one member for a gang of two.
    let alone = forged(vec![Grant::Whole { gpu: 1 }], 1, far);
    let (b, _) = live(vec![member("w0", "train", Some(&alone)), member("w1", "train", None)]).await;
    assert_eq!(grants(&b, "ml/w0"), None);

    // An honest plan with a deadline far beyond the gang's timeout: restored, but lapsing
    // within the timeout.
    let (r0, r1) = (forged(vec![Grant::Whole { gpu: 1 }], 2, far), forged(vec![Grant::Whole { gpu: 2 }], 2, far));
    let (b, _) = live(vec![member("w0", "train", Some(&r0)), member("w1", "train", Some(&r1))]).await;
    let (g, until) = grants(&b, "ml/w0").expect("restored");
    assert_eq!(g, vec![Grant::Whole { gpu: 1 }]);
    let until = until.expect("lapsing");
    let timeout_ms =
        b.demand_of(&serde_json::from_value(member("w0", "train", None)).unwrap()).unwrap().gang.unwrap().timeout_ms;
    assert!(until <= b.now_ms() + timeout_ms, "{until} vs now {} + {timeout_ms}", b.now_ms());
}
