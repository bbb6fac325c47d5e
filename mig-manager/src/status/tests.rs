use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use tessera_core::mig::MigProduct;

use super::*;
use crate::gpu::fake::FakeGpus;
use crate::gpu::{GpuBackend, observe};
use crate::mig::plan::{BlockReason, Blocked};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn json_response(code: StatusCode, v: serde_json::Value) -> Response<Body> {
    Response::builder().status(code).body(Body::from(serde_json::to_vec(&v).unwrap())).unwrap()
}

async fn next(handle: &mut Handle) -> (Request<Body>, tower_test::mock::SendResponse<Response<Body>>) {
    tokio::time::timeout(Duration::from_secs(1), handle.next_request())
        .await
        .expect("timeout_after_1s")
        .expect("request")
}

fn gpunode(generation: i64, spec: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "tessera.dev/v1alpha1", "kind": "GpuNode",
        "metadata": {"name": "n1", "generation": generation, "resourceVersion": "7"},
        "spec": spec,
    })
}

#[tokio::test]
async fn missing_gpunode_is_created_and_status_is_patched_to_the_status_subresource() {
    let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let api = KubeNodeApi::new(kube::Client::new(mock, "default"), "n1");
    let fake = FakeGpus::new(MigProduct::H100_80GB, 2, true).with_mig(0, &["3g.40gb"]).unwrap();
    let obs = observe(&fake).unwrap();
    let status = GpuNodeStatus {
        gpus: gpu_statuses(&obs),
        links: links(&fake.links().unwrap()),
        observed_generation: Some(1),
        held: vec![],
        conditions: vec![],
    };
    let verifier = tokio::spawn(async move {
        let (req, send) = next(&mut handle).await;
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri().path(), "/apis/tessera.dev/v1alpha1/gpunodes/n1");
        send.send_response(json_response(
            StatusCode::NOT_FOUND,
            serde_json::json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404,"message":"gpunodes \"n1\" not found"}),
        ));
        let (req, send) = next(&mut handle).await;
        assert_eq!(req.method(), Method::POST);
        assert_eq!(req.uri().path(), "/apis/tessera.dev/v1alpha1/gpunodes");
        let body: serde_json::Value = serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
        assert_eq!(body["metadata"]["name"], "n1");
        assert_eq!(body["spec"]["gpus"], serde_json::json!([]));
        send.send_response(json_response(StatusCode::CREATED, gpunode(1, serde_json::json!({"gpus": []}))));

        let (req, send) = next(&mut handle).await;
        assert_eq!(req.method(), Method::PATCH);
        assert_eq!(req.uri().path(), "/apis/tessera.dev/v1alpha1/gpunodes/n1/status");
        assert_eq!(req.headers()["content-type"], "application/merge-patch+json");
        let body: serde_json::Value = serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
        let gpus = &body["status"]["gpus"];
        assert_eq!(gpus.as_array().unwrap().len(), 2);
        assert_eq!(gpus[0]["product"], "H100-80GB");
        assert_eq!(gpus[0]["mode"], "mig");
        assert_eq!(gpus[0]["instances"][0]["profile"], "3g.40gb");
        assert_eq!(gpus[0]["instances"][0]["size"], 4);
        assert!(gpus[0]["instances"][0]["uuid"].as_str().unwrap().starts_with("MIG-"));
        assert_eq!(body["status"]["links"][0]["kind"], "nvlink");
        assert_eq!(body["status"]["observedGeneration"], 1);
        send.send_response(json_response(StatusCode::OK, gpunode(1, serde_json::json!({"gpus": []}))));
    });
    let desired = api.desired().await.unwrap();
    assert_eq!(desired, Desired { gpus: vec![], generation: Some(1) });
    api.publish(status).await.unwrap();
    verifier.await.unwrap();
}

#[tokio::test]
async fn existing_spec_is_read_with_its_generation() {
    let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let api = KubeNodeApi::new(kube::Client::new(mock, "default"), "n1");
    let verifier = tokio::spawn(async move {
        let (_, send) = next(&mut handle).await;
        send.send_response(json_response(
            StatusCode::OK,
            gpunode(4, serde_json::json!({"gpus": [{"index": 0, "mode": "mig", "instances": [{"profile": "7g.80gb", "start": 0}]}]})),
        ));
    });
    let d = api.desired().await.unwrap();
    assert_eq!(d.generation, Some(4));
    assert_eq!(d.gpus[0].instances[0].profile, "7g.80gb");
    verifier.await.unwrap();
}

#[tokio::test]
async fn api_errors_surface_as_publish_errors() {
    let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let api = KubeNodeApi::new(kube::Client::new(mock, "default"), "n1");
    let verifier = tokio::spawn(async move {
        let (_, send) = next(&mut handle).await;
        send.send_response(json_response(
            StatusCode::FORBIDDEN,
            serde_json::json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Forbidden","code":403,"message":"forbidden"}),
        ));
    });
    let err = api.publish(GpuNodeStatus::default()).await.unwrap_err();
    assert_eq!(err.kind(), "publish_status");
    verifier.await.unwrap();
}

#[test]
fn conditions_say_why_and_keep_transition_times() {
    let outcome = Outcome {
        blocked: vec![Blocked { gpu: 2, reason: BlockReason::InUse { uuids: vec!["MIG-a".into()] } }],
        ..Default::default()
    };
    let report = PassReport { discovery: Ok(()), outcome: Some(&outcome), has_spec: true, registered: Some(true) };
    let first = conditions(&report, &[], "2026-01-01T00:00:00Z");
    let r = first.iter().find(|c| c.type_ == condition::RECONCILED).unwrap();
    assert_eq!((r.status.as_str(), r.reason.as_str()), ("False", "InstanceInUse"));
    assert!(r.message.contains("GPU 2") && r.message.contains("MIG-a"));
    let again = conditions(&report, &first, "2026-01-01T00:05:00Z");
    assert_eq!(again, first, "unchanged conditions keep their transition time");

    let no_nvml = GpuError::NoNvml("libnvidia-ml.so.1 not found".into());
    let report = PassReport { discovery: Err(&no_nvml), outcome: None, has_spec: true, registered: None };
    let c = conditions(&report, &first, "2026-01-01T00:06:00Z");
    assert_eq!(c[0].reason, "NoNvml");
    assert_eq!(c[0].last_transition_time.as_deref(), Some("2026-01-01T00:06:00Z"));
    assert_eq!(c[1].reason, "NotRun");
    assert_eq!(c.len(), 2);
}
