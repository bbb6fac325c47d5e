//! KServe Open Inference Protocol v2 (REST).
//!
//! Embedding model: input `text` (BYTES, shape `[n]`) → output `embedding` (FP32, `[n, dim]`).
//! Chat model: input `text_input` (BYTES, `[1]`, one user message) → output `text_output`
//! (BYTES, `[1]`); request `parameters` take `max_tokens`, `temperature`, `top_p`, `seed`.
//! Model repository extension: `POST /v2/repository/index` lists every configured model with its
//! state; `.../models/{name}/load` and `/unload` change it (with `--model-control explicit`).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::openai::{GenerateRequest, collect_generation, embed_texts, start_generation};
use super::{ApiError, AppState, Dialect, parse_body, probe, tenant};
use crate::config::ModelControl;
use crate::engine::Kind;
use crate::engine::llama::Message;
use crate::repository::{Slot, Status};
use crate::{Error, Result};

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(|| async { probe(true, "live") }))
        .route("/v2/health/ready", get(server_ready))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/versions/{version}", get(model_metadata_v))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/versions/{version}/ready", get(model_ready_v))
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer_v))
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/{name}/load", post(repository_load))
        .route("/v2/repository/models/{name}/unload", post(repository_unload))
}

fn err(e: Error) -> ApiError {
    ApiError(e, Dialect::KServe)
}

/// The only version this runtime serves.
const VERSION: &str = "1";

fn check<'s>(s: &'s AppState, name: &str, version: Option<&str>) -> Result<&'s Arc<Slot>, ApiError> {
    let slot = s.model(name).map_err(err)?;
    match version {
        Some(v) if v != VERSION => Err(err(Error::UnknownModel(format!("{name}/versions/{v}")))),
        _ => Ok(slot),
    }
}

async fn server_metadata(State(s): State<AppState>) -> Response {
    let budget = s.repository.budget();
    Json(json!({
        "name": "tessera-runtime",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["model_repository"],
        "device": &*s.device,
        "memory_budget_bytes": budget.total(),
        "memory_reserved_bytes": budget.reserved(),
        "models": s.repository.slots().iter().map(|m| m.name()).collect::<Vec<_>>(),
    }))
    .into_response()
}

async fn server_ready(State(s): State<AppState>) -> Response {
    probe(s.is_ready(), "ready")
}

async fn model_metadata(s: State<AppState>, Path(name): Path<String>) -> Response {
    metadata(s, name, None)
}

async fn model_metadata_v(s: State<AppState>, Path((name, v)): Path<(String, String)>) -> Response {
    metadata(s, name, Some(v))
}

fn metadata(State(s): State<AppState>, name: String, version: Option<String>) -> Response {
    let slot = match check(&s, &name, version.as_deref()) {
        Ok(slot) => slot,
        Err(e) => return e.into_response(),
    };
    let Some(loaded) = slot.loaded() else {
        return err(Error::NotReady(name)).into_response();
    };
    let info = &loaded.info;
    let (inputs, outputs) = match info.kind {
        Kind::Embedding => (
            json!([{"name": "text", "datatype": "BYTES", "shape": [-1]}]),
            json!([{"name": "embedding", "datatype": "FP32", "shape": [-1, info.dim]}]),
        ),
        Kind::Chat => (
            json!([{"name": "text_input", "datatype": "BYTES", "shape": [1]}]),
            json!([{"name": "text_output", "datatype": "BYTES", "shape": [1]}]),
        ),
    };
    Json(json!({
        "name": name,
        "versions": [VERSION],
        "platform": format!("{}_{}", loaded.plan.engine.as_str(), info.architecture),
        "inputs": inputs,
        "outputs": outputs,
        "parameters": {
            "kind": info.kind,
            "max_input_tokens": info.max_input_tokens,
            "max_batch": loaded.max_batch,
            "engine": loaded.plan.engine,
            "memory_bytes": loaded.plan.total_bytes(),
            "device": &*s.device,
        },
    }))
    .into_response()
}

async fn model_ready(s: State<AppState>, Path(name): Path<String>) -> Response {
    ready(s, name, None)
}

async fn model_ready_v(s: State<AppState>, Path((name, v)): Path<(String, String)>) -> Response {
    ready(s, name, Some(v))
}

fn ready(State(s): State<AppState>, name: String, version: Option<String>) -> Response {
    match check(&s, &name, version.as_deref()) {
        Ok(slot) => probe(slot.loaded().is_some() && !s.is_draining(), "ready"),
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Default, Deserialize)]
struct IndexRequest {
    /// Only models that are (`true`) or are not (`false`) ready.
    #[serde(default)]
    ready: Option<bool>,
}

/// An optional JSON body: empty means the defaults.
fn optional_body<T: serde::de::DeserializeOwned + Default>(body: Result<Bytes, BytesRejection>) -> Result<T> {
    match &body {
        Ok(b) if b.iter().all(u8::is_ascii_whitespace) => Ok(T::default()),
        _ => parse_body(body),
    }
}

async fn repository_index(State(s): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let req: IndexRequest = match optional_body(body) {
        Ok(r) => r,
        Err(e) => return err(e).into_response(),
    };
    let rows: Vec<_> = s
        .repository
        .index()
        .into_iter()
        .filter(|r| req.ready.is_none_or(|want| want == (r.state == Status::Ready)))
        .collect();
    Json(rows).into_response()
}

/// Load errors name their cause to whoever controls the models (the folder, the file that
/// failed), unlike inference errors, whose detail stays in the logs.
fn control_error(e: Error) -> Response {
    let status = e.status();
    let mut resp = (status, Json(json!({"error": e.to_string()}))).into_response();
    resp.extensions_mut().insert(super::ErrorKind(e.kind()));
    resp
}

async fn repository_load(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    // KServe allows `parameters` in the body; none are supported, but an empty or `{}` body is.
    if let Err(e) = optional_body::<Map<String, Value>>(body) {
        return err(e).into_response();
    }
    if let Err(e) = control(&s, &name) {
        return control_error(e);
    }
    let repo = s.repository.clone();
    let started = std::time::Instant::now();
    let n = name.clone();
    match tokio::task::spawn_blocking(move || repo.load(&n)).await {
        Ok(Ok(())) => {
            tracing::info!(model = %name, load_ms = started.elapsed().as_millis() as u64, "Model loaded");
            (StatusCode::OK, Json(json!({}))).into_response()
        }
        Ok(Err(e)) => {
            tracing::warn!(model = %name, error = %e, "Model load refused or failed");
            control_error(e)
        }
        Err(_) => control_error(Error::WorkerGone),
    }
}

async fn repository_unload(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Err(e) = optional_body::<Map<String, Value>>(body) {
        return err(e).into_response();
    }
    match control(&s, &name).and_then(|()| s.repository.unload(&name)) {
        Ok(()) => {
            tracing::info!(model = %name, "Model unloaded");
            (StatusCode::OK, Json(json!({}))).into_response()
        }
        Err(e) => control_error(e),
    }
}

/// Load and unload need `--model-control explicit` and a configured model.
fn control(s: &AppState, name: &str) -> Result<()> {
    s.model(name)?;
    if s.serving.model_control != ModelControl::Explicit {
        return Err(Error::ControlDisabled);
    }
    if s.is_draining() {
        return Err(Error::Draining);
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
struct Tensor {
    name: String,
    #[serde(default)]
    shape: Vec<i64>,
    datatype: String,
    data: Value,
}

#[derive(Debug, Deserialize)]
struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<Tensor>,
}

/// BYTES data, flattened: row-major nesting is allowed by the protocol.
fn strings(t: &Tensor) -> Result<Vec<String>> {
    if t.datatype != "BYTES" {
        return Err(Error::BadRequest(format!("input `{}` has datatype {}; expected BYTES", t.name, t.datatype)));
    }
    fn walk(v: &Value, out: &mut Vec<String>) -> Result<()> {
        match v {
            Value::String(s) => out.push(s.clone()),
            Value::Array(a) => a.iter().try_for_each(|x| walk(x, out))?,
            _ => return Err(Error::BadRequest("BYTES data must be strings".into())),
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(&t.data, &mut out)?;
    let expected: i64 = t.shape.iter().product();
    if !t.shape.is_empty() && expected != out.len() as i64 {
        return Err(Error::BadRequest(format!(
            "input `{}` has shape {:?} but {} elements",
            t.name,
            t.shape,
            out.len()
        )));
    }
    Ok(out)
}

fn input<'a>(req: &'a InferRequest, name: &str) -> Result<&'a Tensor> {
    match req.inputs.as_slice() {
        [one] => Ok(one),
        many => many
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| Error::BadRequest(format!("expected one input named `{name}`"))),
    }
}

async fn infer(
    s: State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    run_infer(s, headers, name, None, body).await
}

async fn infer_v(
    s: State<AppState>,
    headers: HeaderMap,
    Path((name, v)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    run_infer(s, headers, name, Some(v), body).await
}

async fn run_infer(
    State(s): State<AppState>,
    headers: HeaderMap,
    name: String,
    version: Option<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let _in_flight = s.track();
    check(&s, &name, version.as_deref())?;
    let req: InferRequest = parse_body(body).map_err(err)?;
    let (slot, loaded) = s.accepting(&name).map_err(err)?;
    let tenant = tenant(&headers);
    let outputs = match loaded.info.kind {
        Kind::Embedding => {
            let texts = strings(input(&req, "text").map_err(err)?).map_err(err)?;
            let (vectors, _) = embed_texts(&slot, &loaded, &tenant, texts).await.map_err(err)?;
            let dim = vectors.first().map_or(0, Vec::len);
            let n = vectors.len();
            let data: Vec<f32> = vectors.into_iter().flatten().collect();
            json!([{"name": "embedding", "datatype": "FP32", "shape": [n, dim], "data": data}])
        }
        Kind::Chat => {
            let texts = strings(input(&req, "text_input").map_err(err)?).map_err(err)?;
            let [text] = <[String; 1]>::try_from(texts)
                .map_err(|t| err(Error::BadRequest(format!("text_input must hold one string, not {}", t.len()))))?;
            let p = &req.parameters;
            let request = GenerateRequest {
                messages: vec![Message { role: "user".into(), content: text }],
                max_tokens: p.get("max_tokens").and_then(Value::as_u64),
                temperature: p.get("temperature").and_then(Value::as_f64),
                top_p: p.get("top_p").and_then(Value::as_f64),
                seed: p.get("seed").and_then(Value::as_u64),
                stop: vec![],
            };
            let started = start_generation(&slot, &loaded, &tenant, request).await.map_err(err)?;
            let (g, _) = collect_generation(&slot, started).await.map_err(err)?;
            json!([{"name": "text_output", "datatype": "BYTES", "shape": [1], "data": [g.text]}])
        }
    };
    let mut body = json!({"model_name": name, "model_version": VERSION, "outputs": outputs});
    if let Some(id) = req.id {
        body["id"] = json!(id);
    }
    Ok((StatusCode::OK, Json(body)).into_response())
}
