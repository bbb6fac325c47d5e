//! kube paths against a tower-test mock API server: the Binding with the assignment
//! annotation, the GpuNode spec patch and the bounded wait for status, and the restart rebuild
//! from running pods (reflectors listing through the mock).

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use tessera_api::gpunode::{GpuSpec, MigInstanceSpec, Mode};
use tessera_core::{Grant, PodKey};
use tessera_scheduler::binder::{BindRequest, Binder, KubeBinder, WantedInstance};
use tessera_scheduler::cluster::Watch;
use tessera_scheduler::http::{App, Surface};
use tessera_scheduler::state::{Scheduler, Settings};

use crate::http::{call, pod};

pub(crate) type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
pub(crate) type Send = tower_test::mock::SendResponse<Response<Body>>;

pub(crate) fn respond(code: StatusCode, v: Value) -> Response<Body> {
    Response::builder().status(code).body(Body::from(serde_json::to_vec(&v).unwrap())).unwrap()
}

async fn next(handle: &mut Handle) -> (Request<Body>, Send) {
    tokio::time::timeout(Duration::from_secs(1), handle.next_request())
        .await
        .expect("timeout_after_1s")
        .expect("request")
}

async fn body(req: Request<Body>) -> Value {
    serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap()
}

pub(crate) fn mock() -> (kube::Client, Handle) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(svc, "default"), handle)
}

pub(crate) fn gpunode(spec: Value, status: Value) -> Value {
    json!({"apiVersion": "tessera.dev/v1alpha1", "kind": "GpuNode",
           "metadata": {"name": "n1", "resourceVersion": "41", "generation": 3}, "spec": spec, "status": status})
}

pub(crate) fn h100_status(instances: Value) -> Value {
    json!({"gpus": [
        {"index": 0, "uuid": "GPU-0", "product": "H100-80GB", "memoryMib": 81920, "migCapable": true, "mode": "full", "health": "Healthy"},
        {"index": 1, "uuid": "GPU-1", "product": "H100-80GB", "memoryMib": 81920, "migCapable": true, "mode": "full", "health": "Healthy"},
        {"index": 2, "uuid": "GPU-2", "product": "H100-80GB", "memoryMib": 81920, "migCapable": true, "mode": "full", "health": "Healthy"},
        {"index": 3, "uuid": "GPU-3", "product": "H100-80GB", "memoryMib": 81920, "migCapable": true, "mode": "mig", "health": "Healthy",
         "instances": instances}
    ]})
}

#[tokio::test]
async fn bind_posts_the_binding_with_the_assignment_annotation() {
    let (client, mut handle) = mock();
    let binder = KubeBinder::new(client);
    let req = BindRequest {
        namespace: "ml".into(),
        name: "p".into(),
        uid: "u-1".into(),
        node: "n1".into(),
        annotations: [("tessera.dev/assignment".to_owned(), "{\"node\":\"n1\",\"devices\":[]}".to_owned())].into(),
    };
    let verifier = tokio::spawn(async move {
        let (r, send) = next(&mut handle).await;
        assert_eq!(r.method(), Method::POST);
        assert_eq!(r.uri().path(), "/api/v1/namespaces/ml/pods/p/binding");
        let b = body(r).await;
        assert_eq!(b["kind"], "Binding");
        assert_eq!(b["metadata"]["uid"], "u-1");
        assert_eq!(b["metadata"]["annotations"]["tessera.dev/assignment"], "{\"node\":\"n1\",\"devices\":[]}");
        assert_eq!(b["target"], json!({"apiVersion": "v1", "kind": "Node", "name": "n1"}));
        send.send_response(respond(
            StatusCode::CREATED,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
        ));
    });
    binder.bind(&req).await.unwrap();
    verifier.await.unwrap();
}

#[tokio::test]
async fn bind_conflict_is_an_error_that_names_the_pod() {
    let (client, mut handle) = mock();
    let binder = KubeBinder::new(client);
    let req = BindRequest {
        namespace: "ml".into(),
        name: "p".into(),
        uid: String::new(),
        node: "n1".into(),
        annotations: Default::default(),
    };
    let verifier = tokio::spawn(async move {
        let (_, send) = next(&mut handle).await;
        send.send_response(respond(
            StatusCode::CONFLICT,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "pod p is already assigned to node n2"}),
        ));
    });
    let e = binder.bind(&req).await.unwrap_err();
    assert_eq!(e.kind(), "bind");
    assert!(e.chain().contains("ml/p") && e.chain().contains("already assigned"), "{}", e.chain());
    verifier.await.unwrap();
}

#[tokio::test]
async fn reconfigure_patches_spec_conditionally_and_waits_for_status() {
    let (client, mut handle) = mock();
    let binder = KubeBinder::new(client).with_poll(Duration::from_millis(5));
    let verifier = tokio::spawn(async move {
        let (r, send) = next(&mut handle).await;
        assert_eq!((r.method(), r.uri().path()), (&Method::GET, "/apis/tessera.dev/v1alpha1/gpunodes/n1"));
        let existing =
            json!({"gpus": [{"index": 3, "mode": "mig", "instances": [{"profile": "3g.40gb", "start": 4}]}]});
        send.send_response(respond(StatusCode::OK, gpunode(existing, h100_status(json!([])))));
        let (r, send) = next(&mut handle).await;
        assert_eq!((r.method(), r.uri().path()), (&Method::PATCH, "/apis/tessera.dev/v1alpha1/gpunodes/n1"));
        assert_eq!(r.headers()["content-type"], "application/merge-patch+json");
        let b = body(r).await;
        assert_eq!(b["metadata"]["resourceVersion"], "41");
        // GPU 3's entry is kept, GPU 0's is added.
        assert_eq!(
            b["spec"]["gpus"],
            json!([{"index": 0, "mode": "mig", "instances": [{"profile": "1g.10gb", "start": 0}]},
                   {"index": 3, "mode": "mig", "instances": [{"profile": "3g.40gb", "start": 4}]}])
        );
        send.send_response(respond(StatusCode::OK, gpunode(b["spec"].clone(), h100_status(json!([])))));
        // First poll: not there yet; second: reported.
        let (r, send) = next(&mut handle).await;
        assert_eq!(r.uri().path(), "/apis/tessera.dev/v1alpha1/gpunodes/n1");
        send.send_response(respond(StatusCode::OK, gpunode(json!({}), h100_status(json!([])))));
        let (_, send) = next(&mut handle).await;
        let mut st = h100_status(json!([]));
        st["gpus"][0]["mode"] = json!("mig");
        st["gpus"][0]["instances"] = json!([{"profile": "1g.10gb", "start": 0, "size": 1, "uuid": "MIG-new"}]);
        send.send_response(respond(StatusCode::OK, gpunode(json!({}), st)));
    });
    let gpus = [GpuSpec {
        index: 0,
        mode: Mode::Mig,
        instances: vec![MigInstanceSpec { profile: "1g.10gb".into(), start: 0 }],
    }];
    let wanted = [WantedInstance { gpu: 0, profile: "1g.10gb".into(), start: 0 }];
    let uuids = binder.reconfigure("n1", &gpus, &wanted, Duration::from_secs(5)).await.unwrap();
    assert_eq!(uuids.get(&(0, 0)).map(String::as_str), Some("MIG-new"));
    verifier.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn reconfigure_gives_up_after_its_deadline() {
    let (client, mut handle) = mock();
    let binder = KubeBinder::new(client).with_poll(Duration::from_millis(500));
    tokio::spawn(async move {
        while let Some((_, send)) = handle.next_request().await {
            send.send_response(respond(StatusCode::OK, gpunode(json!({"gpus": []}), h100_status(json!([])))));
        }
    });
    let gpus = [GpuSpec {
        index: 0,
        mode: Mode::Mig,
        instances: vec![MigInstanceSpec { profile: "1g.10gb".into(), start: 0 }],
    }];
    let wanted = [WantedInstance { gpu: 0, profile: "1g.10gb".into(), start: 0 }];
    let e = binder.reconfigure("n1", &gpus, &wanted, Duration::from_secs(2)).await.unwrap_err();
    assert_eq!(e.kind(), "mig_timeout");
    assert!(e.to_string().contains("GPU 0 1g.10gb at 0"), "{e}");
}

pub(crate) fn list(api_version: &str, kind: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": "100"}, "items": items})
}

fn running(name: &str, uid: &str, limits: Value, annotations: Value) -> Value {
    let mut p = pod("ml", name, uid, limits, annotations);
    p["spec"]["nodeName"] = json!("n1");
    p["status"] = json!({"phase": "Running"});
    p
}

/// Serves the reflectors' initial lists from `objects` and parks their watches.
pub(crate) fn serve_lists(
    mut handle: Handle,
    objects: Vec<(&'static str, Value)>,
) -> tokio::task::JoinHandle<Vec<Send>> {
    tokio::spawn(async move {
        let mut parked = Vec::new();
        while let Ok(Some((r, send))) = tokio::time::timeout(Duration::from_secs(2), handle.next_request()).await {
            let query = r.uri().query().unwrap_or("");
            if query.contains("watch=true") {
                parked.push(send);
                continue;
            }
            let path = r.uri().path().to_owned();
            match objects.iter().find(|(p, _)| *p == path) {
                Some((_, v)) => send.send_response(respond(StatusCode::OK, v.clone())),
                None => send.send_response(respond(StatusCode::NOT_FOUND, json!({"kind": "Status", "code": 404}))),
            }
        }
        parked
    })
}

/// A live-mode scheduler fed by reflectors on `client`, once its first sync is done.
pub(crate) async fn synced_scheduler<B: Binder + 'static>(
    client: &kube::Client,
    binder: Arc<B>,
    settings: Settings,
) -> Arc<Scheduler> {
    let watch = Watch::start(client);
    let sched = Arc::new(Scheduler::new(
        tessera_core::Snapshot::default(),
        tessera_core::policy::by_name("tessera").unwrap(),
        binder,
        Arc::new(watch.lookup()),
        settings,
    ));
    sched.set_synced(false);
    tokio::spawn(watch.sync(sched.clone(), Duration::from_millis(10)));
    tokio::time::timeout(Duration::from_secs(5), async {
        while !sched.is_ready() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("synced");
    sched
}

/// The reflectors' lists for one node `n1` (an H100 whose GpuNode status reports `mig`), the
/// given pods, and no PodGroups.
pub(crate) fn one_node_lists(node: Value, pods: Vec<Value>, mig: Value) -> Vec<(&'static str, Value)> {
    vec![
        ("/api/v1/nodes", list("v1", "NodeList", vec![node])),
        ("/api/v1/pods", list("v1", "PodList", pods)),
        (
            "/apis/tessera.dev/v1alpha1/gpunodes",
            list("tessera.dev/v1alpha1", "GpuNodeList", vec![gpunode(json!({}), h100_status(mig))]),
        ),
        ("/apis/scheduling.x-k8s.io/v1alpha1/podgroups", list("scheduling.x-k8s.io/v1alpha1", "PodGroupList", vec![])),
    ]
}

#[tokio::test]
async fn restart_rebuilds_allocations_from_running_pods_and_never_double_allocates() {
    let (client, handle) = mock();
    // NVIDIA's plugin advertises the whole GPUs and the two 3g.40gb instances of GPU 3.
    let node = json!({"metadata": {"name": "n1"}, "status": {"allocatable": {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": "3", "nvidia.com/mig-3g.40gb": "2"}}});
    let mig = json!([{"profile": "3g.40gb", "start": 0, "size": 4, "uuid": "MIG-a"}, {"profile": "3g.40gb", "start": 4, "size": 4, "uuid": "MIG-b"}]);
    let assignment = |d: Value| json!({"tessera.dev/assignment": json!({"node": "n1", "devices": d}).to_string()});
    let pods = vec![
        running(
            "whole",
            "uid-whole",
            json!({"tessera.dev/gpu": "1"}),
            assignment(json!([{"gpu": "GPU-0", "index": 0}])),
        ),
        running(
            "slice",
            "uid-slice",
            json!({"tessera.dev/gpu": "1"}),
            assignment(json!([{"gpu": "GPU-3", "index": 3, "profile": "3g.40gb", "start": 4, "mig": "MIG-b"}])),
        ),
        // Scheduled elsewhere with NVIDIA's plugin: counted on the lowest free GPUs.
        running("legacy", "uid-legacy", json!({"nvidia.com/gpu": "2"}), json!({})),
    ];
    let lists = serve_lists(handle, one_node_lists(node, pods, mig));
    let binder = Arc::new(tessera_scheduler::binder::MemoryBinder::default());
    let sched = synced_scheduler(&client, binder.clone(), Settings { mode: "live", ..Settings::default() }).await;
    let allocs = sched.with_snapshot(|s| s.allocations().clone());
    assert_eq!(allocs.len(), 3);
    assert_eq!(allocs[&PodKey::from("ml/whole")].grants, [Grant::Whole { gpu: 0 }]);
    assert_eq!(allocs[&PodKey::from("ml/legacy")].grants, [Grant::Whole { gpu: 1 }, Grant::Whole { gpu: 2 }]);
    assert!(matches!(allocs[&PodKey::from("ml/slice")].grants[..], [Grant::Mig { gpu: 3, start: 4, .. }]));
    sched.with_snapshot(|s| s.audit()).unwrap();

    // A new whole-GPU pod finds nothing free; a 3g pod gets the free instance at 0, not 4.
    let app = App::new(sched.clone(), Surface::ALL);
    let whole = pod("ml", "new-whole", "u-nw", json!({"nvidia.com/gpu": "1"}), json!({}));
    let (_, v) = call(&app, Method::POST, "/filter", json!({"Pod": whole, "NodeNames": ["n1"]}).to_string()).await;
    assert!(v["NodeNames"].as_array().unwrap().is_empty(), "{v}");
    let slice = pod("ml", "new-slice", "u-ns", json!({"nvidia.com/mig-3g.40gb": "1"}), json!({}));
    let (_, v) = call(&app, Method::POST, "/filter", json!({"Pod": slice, "NodeNames": ["n1"]}).to_string()).await;
    assert_eq!(v["NodeNames"], json!(["n1"]));
    let (_, r) = call(
        &app,
        Method::POST,
        "/bind",
        json!({"PodName": "new-slice", "PodNamespace": "ml", "PodUID": "u-ns", "Node": "n1"}).to_string(),
    )
    .await;
    assert_eq!(r["Error"], "");
    let a = tessera_api::Assignment::from_annotation(&binder.bound()[0].annotations["tessera.dev/assignment"]).unwrap();
    assert_eq!((a.devices[0].index, a.devices[0].start, a.devices[0].mig.as_deref()), (3, Some(0), Some("MIG-a")));
    drop(lists);
}

fn conflict_status() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409,
           "message": "Operation cannot be fulfilled on gpunodes.tessera.dev \"n1\": the object has been modified; please apply your changes to the latest version and try again",
           "details": {"name": "n1", "group": "tessera.dev", "kind": "gpunodes"}})
}

#[tokio::test]
async fn a_spec_patch_that_meets_a_concurrent_writer_reads_the_object_again_and_reapplies() {
    let (client, mut handle) = mock();
    let binder = KubeBinder::new(client);
    let verifier = tokio::spawn(async move {
        let (r, send) = next(&mut handle).await;
        assert_eq!(r.method(), Method::GET);
        send.send_response(respond(StatusCode::OK, gpunode(json!({}), h100_status(json!([])))));
        let (r, send) = next(&mut handle).await;
        assert_eq!(r.method(), Method::PATCH);
        assert_eq!(body(r).await["metadata"]["resourceVersion"], "41");
        send.send_response(respond(StatusCode::CONFLICT, conflict_status()));
        // Another bind wrote GPU 1 meanwhile: it is read again and kept.
        let (r, send) = next(&mut handle).await;
        assert_eq!(r.method(), Method::GET);
        let mut now = gpunode(
            json!({"gpus": [{"index": 1, "mode": "mig", "instances": [{"profile": "1g.10gb", "start": 0}]}]}),
            h100_status(json!([])),
        );
        now["metadata"]["resourceVersion"] = json!("42");
        send.send_response(respond(StatusCode::OK, now));
        let (r, send) = next(&mut handle).await;
        assert_eq!(r.method(), Method::PATCH);
        let b = body(r).await;
        assert_eq!(b["metadata"]["resourceVersion"], "42");
        assert_eq!(
            b["spec"]["gpus"],
            json!([{"index": 0, "mode": "mig", "instances": [{"profile": "1g.10gb", "start": 0}]},
                   {"index": 1, "mode": "mig", "instances": [{"profile": "1g.10gb", "start": 0}]}])
        );
        send.send_response(respond(StatusCode::OK, gpunode(b["spec"].clone(), h100_status(json!([])))));
    });
    let gpus = [GpuSpec {
        index: 0,
        mode: Mode::Mig,
        instances: vec![MigInstanceSpec { profile: "1g.10gb".into(), start: 0 }],
    }];
    binder.write_spec("n1", &gpus).await.unwrap();
    verifier.await.unwrap();
}

#[tokio::test]
async fn a_spec_patch_that_keeps_conflicting_fails_with_a_sentence_not_a_debug_dump() {
    let (client, mut handle) = mock();
    let binder = KubeBinder::new(client);
    tokio::spawn(async move {
        while let Some((r, send)) = handle.next_request().await {
            if r.method() == Method::GET {
                send.send_response(respond(StatusCode::OK, gpunode(json!({}), h100_status(json!([])))));
            } else {
                send.send_response(respond(StatusCode::CONFLICT, conflict_status()));
            }
        }
    });
    let gpus = [GpuSpec { index: 0, mode: Mode::Mig, instances: vec![] }];
    let e = binder.write_spec("n1", &gpus).await.unwrap_err();
    let text = e.chain();
    assert_eq!(
        text,
        "updating GpuNode n1: Operation cannot be fulfilled on gpunodes.tessera.dev \"n1\": the object has been \
         modified; please apply your changes to the latest version and try again (HTTP 409 Conflict)"
    );
    for dump in ["Status {", "Some(", "ApiError", "code:"] {
        assert!(!text.contains(dump), "{text}");
    }
}

#[tokio::test]
async fn annotating_a_pod_that_is_gone_counts_as_done() {
    let (client, mut handle) = mock();
    let binder = KubeBinder::new(client);
    tokio::spawn(async move {
        let (r, send) = next(&mut handle).await;
        assert_eq!((r.method(), r.uri().path()), (&Method::PATCH, "/api/v1/namespaces/ml/pods/shard-1"));
        send.send_response(respond(
            StatusCode::NOT_FOUND,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
                   "message": "pods \"shard-1\" not found"}),
        ));
    });
    binder.annotate(&PodKey::from("ml/shard-1"), "tessera.dev/reservation", None).await.unwrap();
}

#[tokio::test]
async fn a_pod_the_watch_reports_deleted_frees_its_gpus_for_the_next_filter() {
    let (client, mut handle) = mock();
    let node = json!({"metadata": {"name": "n1"}, "status": {"allocatable": {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": "4"}}});
    let hog = running("hog", "uid-hog", json!({"nvidia.com/gpu": "4"}), json!({}));
    let mut status = h100_status(json!([]));
    status["gpus"][3]["mode"] = json!("full");
    let lists = [
        ("/api/v1/nodes", list("v1", "NodeList", vec![node])),
        ("/api/v1/pods", list("v1", "PodList", vec![hog.clone()])),
        (
            "/apis/tessera.dev/v1alpha1/gpunodes",
            list("tessera.dev/v1alpha1", "GpuNodeList", vec![gpunode(json!({}), status)]),
        ),
        ("/apis/scheduling.x-k8s.io/v1alpha1/podgroups", list("scheduling.x-k8s.io/v1alpha1", "PodGroupList", vec![])),
    ];
    let (pods_watch, watch_rx) = tokio::sync::oneshot::channel::<Send>();
    tokio::spawn(async move {
        let mut pods_watch = Some(pods_watch);
        let mut parked = Vec::new();
        while let Some((r, send)) = handle.next_request().await {
            let query = r.uri().query().unwrap_or("").to_owned();
            let path = r.uri().path().to_owned();
            if query.contains("watch=true") {
                match pods_watch.take() {
                    Some(tx) if path == "/api/v1/pods" => {
                        let _ = tx.send(send);
                    }
                    other => {
                        pods_watch = other;
                        parked.push(send);
                    }
                }
                continue;
            }
            match lists.iter().find(|(p, _)| *p == path) {
                Some((_, v)) => send.send_response(respond(StatusCode::OK, v.clone())),
                None => send.send_response(respond(StatusCode::NOT_FOUND, json!({"kind": "Status", "code": 404}))),
            }
        }
    });
    let binder = Arc::new(tessera_scheduler::binder::MemoryBinder::default());
    let sched = synced_scheduler(&client, binder, Settings { mode: "live", ..Settings::default() }).await;
    let app = App::new(sched.clone(), Surface::ALL);
    let want = pod("ml", "next", "u-next", json!({"nvidia.com/gpu": "4"}), json!({}));
    let args = json!({"Pod": want, "NodeNames": ["n1"]}).to_string();
    let (_, v) = call(&app, Method::POST, "/filter", args.clone()).await;
    assert!(v["NodeNames"].as_array().unwrap().is_empty(), "the hog holds every GPU: {v}");
    // The API server's watch reports the hog deleted (a force delete).
    let watch = tokio::time::timeout(Duration::from_secs(5), watch_rx).await.expect("pods watch").unwrap();
    let mut gone = hog.clone();
    gone["metadata"]["resourceVersion"] = json!("101");
    let event = format!("{}\n", json!({"type": "DELETED", "object": gone}));
    watch.send_response(Response::builder().status(StatusCode::OK).body(Body::from(event.into_bytes())).unwrap());
    let last = std::sync::Mutex::new(Value::Null);
    let freed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let (_, v) = call(&app, Method::POST, "/filter", args.clone()).await;
            if v["NodeNames"] == json!(["n1"]) {
                return;
            }
            *last.lock().unwrap() = v;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(freed.is_ok(), "the deletion never reached the scheduler's state: {}", last.lock().unwrap());
}
