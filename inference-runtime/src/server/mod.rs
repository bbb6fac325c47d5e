//! HTTP surface: [`router`] builds the routes over an [`AppState`] (testable without sockets);
//! [`serve`] runs them on a listener with graceful drain.
//!
//! | route | what |
//! |---|---|
//! | `GET /health/startup` | 200 once the models loaded at start are loaded |
//! | `GET /health/ready`, `/v2/health/ready` | 200 when started and not draining |
//! | `GET /health/live`, `/v2/health/live` | 200 while the process serves HTTP |
//! | `GET /v2`, `/v2/models/{name}[/versions/{v}][/ready]`, `POST .../infer` | KServe Open Inference Protocol v2 |
//! | `POST /v2/repository/index`, `.../models/{name}/load`, `.../unload` | KServe model repository |
//! | `GET /v1/models`, `POST /v1/embeddings`, `POST /v1/chat/completions` | OpenAI-compatible |
//! | `POST /admin/drain` | stop taking work, finish in-flight, then exit |
//! | `GET /metrics` | Prometheus (OpenMetrics text) |

// The HTTP surface stamps responses (created times, ids) and measures request latency on the
// clock.
#![allow(clippy::disallowed_methods)]

mod kserve;
mod openai;

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use candle_core::Device;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::admission::{DEFAULT_TENANT, TENANT_HEADER};
use crate::config::{ModelSpec, Serving};
use crate::device::{self, DeviceInfo};
use crate::metrics::Exporter;
use crate::repository::{Loaded, Repository, Slot};
use crate::{Error, Result};

#[derive(Debug, Default)]
struct Lifecycle {
    /// Every model loaded at start is loaded.
    started: AtomicBool,
    draining: AtomicBool,
    drain_requested: Notify,
    in_flight: AtomicUsize,
    idle: Notify,
}

/// Shared by every handler. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    pub device: Arc<DeviceInfo>,
    pub serving: Arc<Serving>,
    pub repository: Arc<Repository>,
    exporter: Arc<Exporter>,
    started_unix: u64,
    life: Arc<Lifecycle>,
}

impl AppState {
    /// A state serving `models` on `device` within `budget` bytes (`None`: derived from the
    /// device, [`device::memory_budget`]). Nothing is loaded yet: probes answer, inference
    /// routes return 503 until [`AppState::load_startup`] has run.
    pub fn new(
        device: (Device, DeviceInfo),
        serving: Serving,
        models: Vec<ModelSpec>,
        budget: Option<u64>,
    ) -> Result<Self> {
        let (dev, info) = device;
        let budget = device::memory_budget(&info, budget);
        let repository = Arc::new(Repository::new(models, &serving, budget, dev)?);
        let exporter = Arc::new(Exporter::new(
            repository.slots().iter().map(|s| (s.name().to_string(), s.metrics.clone())).collect(),
            repository.budget_gauges(),
        ));
        Ok(AppState {
            device: Arc::new(info),
            serving: Arc::new(serving),
            repository,
            exporter,
            started_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            life: Arc::default(),
        })
    }

    /// Loads every model configured to load at start (blocking), after checking that they fit
    /// the budget together; then startup and readiness pass.
    pub fn load_startup(&self) -> Result<()> {
        self.repository.check_startup()?;
        for slot in self.repository.slots().iter().filter(|s| s.spec.load) {
            let started = Instant::now();
            self.repository.load(slot.name())?;
            if let Some(l) = slot.loaded() {
                tracing::info!(
                    model = slot.name(),
                    engine = l.plan.engine.as_str(),
                    kind = ?l.info.kind,
                    memory_mib = l.plan.total_bytes() >> 20,
                    load_ms = started.elapsed().as_millis() as u64,
                    "Model ready"
                );
            }
        }
        self.life.started.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// A configured model, known or 404.
    pub fn model(&self, name: &str) -> Result<&Arc<Slot>> {
        self.repository.get(name)
    }

    /// When this process started, in Unix seconds (the `created` of `/v1/models`).
    pub fn started_unix(&self) -> u64 {
        self.started_unix
    }

    pub fn is_started(&self) -> bool {
        self.life.started.load(Ordering::SeqCst)
    }

    pub fn is_draining(&self) -> bool {
        self.life.draining.load(Ordering::SeqCst)
    }

    pub fn is_ready(&self) -> bool {
        self.is_started() && !self.is_draining()
    }

    pub fn in_flight(&self) -> usize {
        self.life.in_flight.load(Ordering::SeqCst)
    }

    /// Starts a drain: readiness fails, new work gets 503, in-flight work finishes.
    pub fn start_drain(&self) {
        if !self.life.draining.swap(true, Ordering::SeqCst) {
            tracing::info!(in_flight = self.in_flight(), "Draining");
        }
        self.life.drain_requested.notify_waiters();
        self.life.drain_requested.notify_one();
    }

    /// The named model, if it can take new work now.
    fn accepting(&self, name: &str) -> Result<(Arc<Slot>, Arc<Loaded>)> {
        let slot = self.model(name)?;
        if self.is_draining() {
            return Err(Error::Draining);
        }
        let loaded = slot.loaded().ok_or_else(|| Error::NotReady(name.to_string()))?;
        Ok((slot.clone(), loaded))
    }

    /// Counts a request as in flight until the guard drops (drain waits for zero).
    fn track(&self) -> InFlight {
        self.life.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight { life: self.life.clone() }
    }

    async fn wait_idle(&self) {
        loop {
            let notified = self.life.idle.notified();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    async fn drain_requested(&self) {
        loop {
            let notified = self.life.drain_requested.notified();
            if self.is_draining() {
                return;
            }
            notified.await;
        }
    }
}

#[derive(Debug)]
struct InFlight {
    life: Arc<Lifecycle>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.life.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.life.idle.notify_waiters();
        }
    }
}

/// Which error body a route speaks.
#[derive(Debug, Clone, Copy)]
enum Dialect {
    /// `{"error": {"message", "type", "code"}}`
    OpenAi,
    /// `{"error": "message"}`
    KServe,
}

#[derive(Debug)]
struct ApiError(Error, Dialect);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(&self.0, self.1)
    }
}

fn error_response(e: &Error, dialect: Dialect) -> Response {
    let status = e.status();
    let message = e.public_message();
    let body = match dialect {
        Dialect::OpenAi => json!({
            "error": {"message": message, "type": e.kind(), "code": status.as_u16()}
        }),
        Dialect::KServe => json!({"error": message}),
    };
    let mut resp = (status, Json(body)).into_response();
    resp.extensions_mut().insert(ErrorKind(e.kind()));
    resp
}

/// Lets the logging middleware name the error without parsing the body.
#[derive(Debug, Clone, Copy)]
struct ErrorKind(&'static str);

/// Reads a JSON body, turning every failure into a reasoned error (413 beyond the body limit).
fn parse_body<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T> {
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Error::InputTooLarge("request body exceeds the size limit".into())
        } else {
            Error::BadRequest(r.body_text())
        }
    })?;
    serde_json::from_slice(&body).map_err(|e| Error::BadRequest(format!("invalid JSON body: {e}")))
}

fn tenant(headers: &HeaderMap) -> String {
    headers
        .get(TENANT_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .unwrap_or(DEFAULT_TENANT)
        .to_string()
}

pub fn router(state: AppState) -> Router {
    let limit = state.serving.max_body_bytes;
    Router::new()
        .route("/health/startup", get(startup))
        .route("/health/ready", get(ready))
        .route("/health/live", get(live))
        .route("/admin/drain", post(drain))
        .route("/metrics", get(metrics))
        .merge(kserve::routes())
        .merge(openai::routes())
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(log_request))
        .with_state(state)
}

/// One line per request: method, route, status, latency and error kind. Never bodies.
async fn log_request(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let ms = start.elapsed().as_secs_f64() * 1e3;
    match resp.extensions().get::<ErrorKind>() {
        Some(ErrorKind(kind)) if status >= 500 => {
            tracing::warn!(%method, %path, status, ms, error = kind, "Request failed")
        }
        Some(ErrorKind(kind)) => {
            tracing::info!(%method, %path, status, ms, error = kind, "Request refused")
        }
        None => tracing::debug!(%method, %path, status, ms, "Request served"),
    }
    resp
}

async fn not_found(req: Request) -> Response {
    error_response(&Error::NoRoute(req.uri().path().to_string()), Dialect::OpenAi)
}

fn probe(ok: bool, what: &str) -> Response {
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({ what: ok }))).into_response()
}

async fn startup(State(s): State<AppState>) -> Response {
    probe(s.is_started(), "started")
}

async fn ready(State(s): State<AppState>) -> Response {
    probe(s.is_ready(), "ready")
}

async fn live() -> Response {
    probe(true, "live")
}

async fn drain(State(s): State<AppState>) -> Response {
    s.start_drain();
    (StatusCode::ACCEPTED, Json(json!({"draining": true, "in_flight": s.in_flight()}))).into_response()
}

async fn metrics(State(s): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], s.exporter.encode())
        .into_response()
}

/// Serves `state` on `listener` until `shutdown` resolves or a drain is requested
/// (`POST /admin/drain`). Either way it drains: readiness fails at once, new work gets 503,
/// and the server stops once in-flight requests finish or the drain timeout passes.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(state.clone());
    let s = state.clone();
    let stop = async move {
        tokio::select! {
            () = shutdown => s.start_drain(),
            () = s.drain_requested() => {}
        }
        let deadline = s.serving.drain_timeout;
        if tokio::time::timeout(deadline, s.wait_idle()).await.is_err() {
            tracing::warn!(in_flight = s.in_flight(), "Drain timeout passed; stopping anyway");
        }
        tracing::info!("Drained; stopping");
    };
    let server = axum::serve(listener, app).with_graceful_shutdown(stop);
    // Idle keep-alive connections are closed by the graceful shutdown; a connection that
    // ignores that cannot hold the process past the drain timeout plus a grace second.
    let grace = state.serving.drain_timeout + Duration::from_secs(1);
    let mut server = std::pin::pin!(server.into_future());
    tokio::select! {
        r = &mut server => r,
        () = async { state.drain_requested().await; tokio::time::sleep(grace).await } => Ok(()),
    }
}
