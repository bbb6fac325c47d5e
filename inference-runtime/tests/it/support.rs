use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tessera_runtime::config::{ModelSpec, Serving};
use tessera_runtime::device::DeviceInfo;
use tessera_runtime::engine::{self, Engine, MemoryPlan, OrtOptions};
use tessera_runtime::server::{AppState, serve};
use tokio::task::JoinHandle;

pub const MINILM: &str = "minilm";
/// all-MiniLM-L6-v2 as ONNX, written by the set-up from the same safetensors.
pub const MINILM_ONNX: &str = "minilm-onnx";
pub const SMOLLM2: &str = "smollm2";

fn cache() -> PathBuf {
    std::env::var_os("TESSERA_MODEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/models"))
}

/// `path` if it exists; else a panic under CI and `None` (after one printed line) elsewhere.
fn present(path: PathBuf, what: &str) -> Option<PathBuf> {
    if path.exists() {
        return Some(path);
    }
    if std::env::var_os("CI").is_some() {
        panic!("{what} {} is missing; run `bash scripts/fetch-models.sh` first", path.display());
    }
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        println!("skipping real-model tests: {} missing (run scripts/fetch-models.sh)", path.display())
    });
    None
}

/// The model folder, or `None` (after printing why) when the cache is missing outside CI.
pub fn model_dir(name: &str) -> Option<PathBuf> {
    present(cache().join(name), "model cache")
}

/// The ONNX Runtime library the set-up unpacked (`TESSERA_ORT_LIBRARY` overrides).
pub fn ort_library() -> Option<PathBuf> {
    let path = std::env::var_os("TESSERA_ORT_LIBRARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache().join("onnxruntime/libonnxruntime.so.1.31.1"));
    present(path, "ONNX Runtime library")
}

/// The spec of a cached model, named like its folder.
pub fn spec(name: &str) -> Option<ModelSpec> {
    Some(ModelSpec::new(name, model_dir(name)?))
}

pub fn load(name: &str) -> Option<Box<dyn Engine>> {
    let dir = model_dir(name)?;
    Some(engine::load(&dir, &candle_core::Device::Cpu, 0).expect("model loads"))
}

/// Loads an ORT model folder as the server would.
pub fn load_ort(name: &str) -> Option<(Box<dyn Engine>, MemoryPlan)> {
    let spec = spec(name)?;
    let opts = OrtOptions { library: Some(ort_library()?), threads: 1 };
    let serving = Serving::default().for_model(&spec);
    let plan = engine::plan(&spec, &serving).expect("plan");
    Some((engine::load_spec(&spec, &plan, &candle_core::Device::Cpu, &opts).expect("ORT model loads"), plan))
}

pub fn cpu() -> DeviceInfo {
    DeviceInfo { kind: "cpu", visible_devices: None, memory_total_bytes: 0, memory_free_bytes: 0 }
}

/// A state over `models` (not loaded), with the ORT library set when any needs it.
pub fn new_state(models: Vec<ModelSpec>, mut serving: Serving, budget: Option<u64>) -> Option<AppState> {
    if models.iter().any(|m| m.dir.join("model.onnx").is_file()) {
        serving.ort_library = Some(ort_library()?);
        serving.ort_threads = 1;
    }
    Some(AppState::new((candle_core::Device::Cpu, cpu()), serving, models, budget).expect("valid models"))
}

/// A state serving `model` (folder name doubles as model name), or `None` when skipped.
pub fn state(model: &str, serving: Serving) -> Option<AppState> {
    let state = new_state(vec![spec(model)?], serving, None)?;
    state.load_startup().expect("model loads");
    Some(state)
}

/// A running server on an ephemeral loopback port.
pub struct Server {
    pub addr: SocketAddr,
    pub state: AppState,
    pub handle: JoinHandle<std::io::Result<()>>,
}

pub async fn start(model: &str, serving: Serving) -> Option<Server> {
    Some(serve_state(state(model, serving)?).await)
}

/// Serves `state` on an ephemeral loopback port.
pub async fn serve_state(state: AppState) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = tokio::spawn(serve(listener, state.clone(), std::future::pending()));
    Server { addr, state, handle }
}

/// Cosine similarity of two vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
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
