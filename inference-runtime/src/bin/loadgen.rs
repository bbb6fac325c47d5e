//! `tessera-loadgen`: a bounded load generator for `/v1/embeddings` (any server speaking it).
//!
//! Sends `--requests` requests, `--batch` texts each, from `--concurrency` connections, after
//! `--warmup` unmeasured ones; prints one JSON line: req/s, embeddings/s, latency percentiles,
//! errors. Example (docs/benchmarks.md):
//!
//! ```text
//! tessera-loadgen --url http://127.0.0.1:8000 --model minilm --requests 2000 --concurrency 32
//! ```
#![allow(clippy::disallowed_methods)] // a binary: it times the requests it sends

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tessera_runtime::SAMPLE_TEXTS;

#[derive(Debug, Parser)]
#[command(name = "tessera-loadgen", about)]
struct Args {
    /// Base URL; must be loopback unless --allow-remote.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    #[arg(long, default_value = "minilm")]
    model: String,
    /// Measured requests (bounded: at most 100000).
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Texts per request.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// Label copied into the output line.
    #[arg(long, default_value = "")]
    label: String,
    #[arg(long)]
    allow_remote: bool,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn one(client: &HttpClient, url: &str, body: Bytes) -> anyhow::Result<()> {
    let req = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(body))?;
    let resp = client.request(req).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("status {status}: {}", String::from_utf8_lossy(&bytes));
    }
    Ok(())
}

/// Request `i`: `batch` sample texts from position `i * batch`, cyclically.
fn body(model: &str, i: usize, batch: usize) -> Bytes {
    let texts: Vec<&str> = (0..batch).map(|k| SAMPLE_TEXTS[(i * batch + k) % SAMPLE_TEXTS.len()]).collect();
    Bytes::from(json!({"model": model, "input": texts}).to_string())
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx].as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let uri: hyper::Uri = args.url.parse().context("parsing --url")?;
    let host = uri.host().unwrap_or("");
    if !args.allow_remote && !matches!(host, "127.0.0.1" | "localhost" | "::1" | "[::1]") {
        bail!("--url {host} is not loopback; pass --allow-remote to load another host");
    }
    if args.requests > 100_000 || args.concurrency == 0 || args.batch == 0 {
        bail!("--requests must be <= 100000, --concurrency and --batch >= 1");
    }
    let url = format!("{}/v1/embeddings", args.url.trim_end_matches('/'));
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();

    for i in 0..args.warmup {
        one(&client, &url, body(&args.model, i, args.batch)).await?;
    }

    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (client, url, next, model) = (client.clone(), url.clone(), next.clone(), args.model.clone());
        let (n, batch) = (args.requests, args.batch);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0usize;
            let mut first_error = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let t = Instant::now();
                match one(&client, &url, body(&model, i, batch)).await {
                    Ok(()) => lat.push(t.elapsed()),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e.to_string());
                    }
                }
            }
            (lat, errors, first_error)
        }));
    }
    let mut lat = Vec::with_capacity(args.requests);
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        let (l, e, f) = t.await?;
        lat.extend(l);
        errors += e;
        first_error = first_error.or(f);
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort();
    let ok = lat.len() as f64;
    println!(
        "{}",
        json!({
            "label": args.label,
            "requests": args.requests,
            "concurrency": args.concurrency,
            "batch": args.batch,
            "errors": errors,
            "first_error": first_error,
            "elapsed_s": (elapsed * 1e3).round() / 1e3,
            "req_per_s": (ok / elapsed * 10.0).round() / 10.0,
            "embeddings_per_s": (ok * args.batch as f64 / elapsed * 10.0).round() / 10.0,
            "p50_ms": (percentile(&lat, 0.50) * 100.0).round() / 100.0,
            "p95_ms": (percentile(&lat, 0.95) * 100.0).round() / 100.0,
            "p99_ms": (percentile(&lat, 0.99) * 100.0).round() / 100.0,
        })
    );
    Ok(())
}
