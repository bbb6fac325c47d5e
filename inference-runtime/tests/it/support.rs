use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tessera_runtime::config::Serving;
use tessera_runtime::device::DeviceInfo;
use tessera_runtime::engine::{self, Engine};
use tessera_runtime::server::{AppState, serve};
use tokio::task::JoinHandle;

pub const MINILM: &str = "minilm";
pub const SMOLLM2: &str = "smollm2";

/// The model folder, or `None` (after printing why) when the cache is missing outside CI.
pub fn model_dir(name: &str) -> Option<PathBuf> {
    let cache = std::env::var_os("TESSERA_MODEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/models"));
    let dir = cache.join(name);
    if dir.is_dir() {
        return Some(dir);
    }
    if std::env::var_os("CI").is_some() {
        panic!("model cache {} is missing; run `bash scripts/fetch-models.sh` first", dir.display());
    }
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| println!("skipping real-model tests: {} missing (run scripts/fetch-models.sh)", dir.display()));
    None
}

pub fn load(name: &str) -> Option<Box<dyn Engine>> {
    let dir = model_dir(name)?;
    Some(engine::load(&dir, &candle_core::Device::Cpu, 0).expect("model loads"))
}

pub fn cpu() -> DeviceInfo {
    DeviceInfo { kind: "cpu", visible_devices: None, memory_total_bytes: 0, memory_free_bytes: 0 }
}

/// A state serving `model` (folder name doubles as model name), or `None` when skipped.
pub fn state(model: &str, serving: Serving) -> Option<AppState> {
    let engine = load(model)?;
    let state = AppState::new(model, cpu(), serving);
    state.set_loaded(engine).expect("worker starts");
    Some(state)
}

/// A running server on an ephemeral loopback port.
pub struct Server {
    pub addr: SocketAddr,
    pub state: AppState,
    pub handle: JoinHandle<std::io::Result<()>>,
}

pub async fn start(model: &str, serving: Serving) -> Option<Server> {
    let state = state(model, serving)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = tokio::spawn(serve(listener, state.clone(), std::future::pending()));
    Some(Server { addr, state, handle })
}

pub struct Reply {
    pub status: StatusCode,
    pub content_type: String,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> Reply {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = Request::builder().method(method).uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = match body {
        Some(v) => {
            req = req.header("content-type", "application/json");
            Full::new(Bytes::from(v.to_string()))
        }
        None => Full::new(Bytes::new()),
    };
    let resp = client.request(req.body(body).unwrap()).await.unwrap();
    let status = resp.status();
    let content_type = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply { status, content_type, body }
}

pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    call(addr, Method::GET, path, &[], None).await
}

pub async fn post(addr: SocketAddr, path: &str, body: Value) -> Reply {
    call(addr, Method::POST, path, &[], Some(body)).await
}

/// Asserts an error status and that the body explains it.
pub fn assert_error(r: &Reply, status: u16, needle: &str) {
    assert_eq!(r.status.as_u16(), status, "{}", r.text());
    assert!(r.text().contains(needle), "`{needle}` not in {}", r.text());
}
