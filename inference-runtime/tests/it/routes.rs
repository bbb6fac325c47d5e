//! Router tests without sockets (`tower::ServiceExt::oneshot`).

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tessera_runtime::config::{ModelSpec, Serving};
use tessera_runtime::server::{AppState, router};
use tower::ServiceExt;

use crate::support::{self, MINILM};

async fn send(state: &AppState, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .unwrap();
    let resp = router(state.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, v)
}

#[tokio::test]
async fn probes_tell_the_truth_before_the_model_loads() {
    let models = vec![ModelSpec::new("m", "/nonexistent/m")];
    let state = AppState::new((candle_core::Device::Cpu, support::cpu()), Serving::default(), models, None).unwrap();
    assert_eq!(send(&state, "GET", "/health/live", None).await.0, StatusCode::OK);
    let (s, v) = send(&state, "GET", "/health/startup", None).await;
    assert_eq!((s, v), (StatusCode::SERVICE_UNAVAILABLE, json!({"started": false})));
    assert_eq!(send(&state, "GET", "/health/ready", None).await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(send(&state, "GET", "/v2/models/m/ready", None).await.0, StatusCode::SERVICE_UNAVAILABLE);
    let (s, v) = send(&state, "POST", "/v1/embeddings", Some(json!({"model": "m", "input": "x"}))).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["error"]["message"], "model `m` is not ready");
    let (s, v) = send(&state, "GET", "/no/such/route", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(v["error"]["type"], "no_route");
    let (s, v) = send(&state, "GET", "/v1/models", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["data"][0]["id"], "m");
    assert_eq!(v["data"][0]["ready"], false);
    assert_eq!(v["object"], "list");
    // Loading a folder that is not there fails with the reason, which the index then shows.
    let e = state.load_startup().unwrap_err().to_string();
    assert!(e.contains("/nonexistent/m"), "{e}");
    let (s, v) = send(&state, "POST", "/v2/repository/index", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v[0]["state"], "UNAVAILABLE");
    assert!(v[0]["reason"].as_str().unwrap().contains("/nonexistent/m"), "{v}");
    assert_eq!(send(&state, "GET", "/health/startup", None).await.0, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn loaded_model_flips_startup_and_readiness() {
    let Some(state) = support::state(MINILM, Serving::default()) else {
        return;
    };
    assert_eq!(send(&state, "GET", "/health/startup", None).await.0, StatusCode::OK);
    assert_eq!(send(&state, "GET", "/health/ready", None).await.0, StatusCode::OK);
    let (s, v) = send(&state, "POST", "/v1/embeddings", Some(json!({"model": MINILM, "input": "hello"}))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 384);
    state.start_drain();
    assert_eq!(
        send(&state, "GET", "/health/startup", None).await.0,
        StatusCode::OK,
        "startup stays true while draining"
    );
    assert_eq!(send(&state, "GET", "/health/ready", None).await.0, StatusCode::SERVICE_UNAVAILABLE);
    let (s, v) = send(
        &state,
        "POST",
        "/v2/models/minilm/infer",
        Some(json!({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]})),
    )
    .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["error"], "server is draining");
}
