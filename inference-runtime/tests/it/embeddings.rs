use serde_json::{Value, json};
use tessera_runtime::config::Serving;

use crate::support::{self, MINILM, assert_error, get, post};

/// Vectors recorded once with sentence-transformers; `fixtures/record_minilm_reference.py`
/// holds the exact command.
pub fn reference() -> (Vec<String>, Vec<Vec<f32>>) {
    let v: Value = serde_json::from_str(include_str!("../fixtures/minilm_reference.json")).unwrap();
    let sentences = serde_json::from_value(v["sentences"].clone()).unwrap();
    let embeddings = serde_json::from_value(v["embeddings"].clone()).unwrap();
    (sentences, embeddings)
}

pub fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: dimension");
    let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst <= 1e-5, "{what}: max abs diff {worst} > 1e-5");
}

#[test]
fn minilm_matches_sentence_transformers_to_1e_5() {
    let Some(mut engine) = support::load(MINILM) else {
        return;
    };
    let (sentences, want) = reference();
    let tok = engine.tokenizer();
    let enc = tok.encode_batch(sentences.clone(), true).unwrap();
    assert_eq!(enc[3].len(), 256, "long input is truncated at max_seq_length");
    let got = engine.embed(&enc).unwrap();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_close(g, w, &format!("sentence {i} in a batch"));
    }
    // Alone, without batch mates or padding, the vector is the same.
    let one = engine.embed(&enc[1..2]).unwrap();
    assert_close(&one[0], &want[1], "sentence 1 alone");
}

#[tokio::test]
async fn openai_embeddings_over_http_match_reference() {
    let Some(srv) = support::start(MINILM, Serving::default()).await else {
        return;
    };
    let (sentences, want) = reference();
    let r = post(srv.addr, "/v1/embeddings", json!({"model": MINILM, "input": sentences})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], MINILM);
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 4);
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["index"], i);
        let got: Vec<f32> = serde_json::from_value(d["embedding"].clone()).unwrap();
        assert_close(&got, &want[i], &format!("http sentence {i}"));
    }
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 256);

    // A single string, base64-encoded little-endian f32.
    let r =
        post(srv.addr, "/v1/embeddings", json!({"model": MINILM, "input": sentences[0], "encoding_format": "base64"}))
            .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let b64 = r.json()["data"][0]["embedding"].as_str().unwrap().to_string();
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
    let got: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    assert_close(&got, &want[0], "base64");
}

#[tokio::test]
async fn embedding_errors_say_why() {
    let serving = Serving { max_body_bytes: 64 * 1024, ..Serving::default() };
    let Some(srv) = support::start(MINILM, serving).await else {
        return;
    };
    let a = srv.addr;
    let r = post(a, "/v1/embeddings", json!({"model": "nope", "input": "x"})).await;
    assert_error(&r, 404, "model `nope` is not served here");
    assert_eq!(r.json()["error"]["type"], "unknown_model");

    let big = "word ".repeat(20_000);
    let r = post(a, "/v1/embeddings", json!({"model": MINILM, "input": big})).await;
    assert_error(&r, 413, "body exceeds the size limit");

    let many: Vec<String> = (0..40).map(|_| "GPU ".repeat(300)).collect();
    let r = post(a, "/v1/embeddings", json!({"model": MINILM, "input": many})).await;
    assert_error(&r, 413, "input tokens; the limit is 8192");

    let r = post(a, "/v1/embeddings", json!({"model": MINILM, "input": []})).await;
    assert_error(&r, 400, "input is empty");
    let r = post(a, "/v1/embeddings", json!({"model": MINILM, "input": [1, 2]})).await;
    assert_error(&r, 400, "token ids are not supported");
    let r = post(a, "/v1/embeddings", json!({"model": MINILM, "input": "x", "dimensions": 128})).await;
    assert_error(&r, 400, "only produces 384");
    let r = post(a, "/v1/chat/completions", json!({"model": MINILM, "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_error(&r, 400, "does not support chat completions");
    let r =
        support::call(a, hyper::Method::POST, "/v1/embeddings", &[("content-type", "application/json")], None).await;
    assert_error(&r, 400, "invalid JSON body");
}

#[tokio::test]
async fn daily_budget_is_enforced_per_tenant_header() {
    let mut serving = Serving::default();
    serving.policy.daily_token_budget = 40;
    let Some(srv) = support::start(MINILM, serving).await else {
        return;
    };
    let body = json!({"model": MINILM, "input": "one two three four five six seven eight"});
    let hdr = [("x-tessera-tenant", "team-a")];
    let r = support::call(srv.addr, hyper::Method::POST, "/v1/embeddings", &hdr, Some(body.clone())).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let used = r.json()["usage"]["total_tokens"].as_u64().unwrap();
    assert_eq!(used, 10, "8 words + [CLS] + [SEP]");
    for _ in 0..3 {
        let r = support::call(srv.addr, hyper::Method::POST, "/v1/embeddings", &hdr, Some(body.clone())).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = support::call(srv.addr, hyper::Method::POST, "/v1/embeddings", &hdr, Some(body.clone())).await;
    assert_error(&r, 429, "daily token budget exhausted: 40 of 40 used");
    assert_eq!(r.json()["error"]["type"], "over_limit");
    // Another tenant still has its own budget.
    let r =
        support::call(srv.addr, hyper::Method::POST, "/v1/embeddings", &[("x-tessera-tenant", "team-b")], Some(body))
            .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn kserve_v2_routes_serve_the_embedding_model() {
    let Some(srv) = support::start(MINILM, Serving::default()).await else {
        return;
    };
    let a = srv.addr;
    let v = get(a, "/v2").await.json();
    assert_eq!(v["name"], "tessera-runtime");
    assert_eq!(v["device"]["kind"], "cpu");
    assert_eq!(v["models"], json!([MINILM]));
    assert_eq!(get(a, "/health/startup").await.status, 200);
    assert_eq!(get(a, "/health/ready").await.status, 200);
    assert_eq!(get(a, "/health/live").await.status, 200);
    let models = get(a, "/v1/models").await.json();
    assert_eq!(models["data"][0]["id"], MINILM);
    assert_eq!(get(a, "/v2/health/live").await.status, 200);
    assert_eq!(get(a, "/v2/health/ready").await.status, 200);
    assert_eq!(get(a, "/v2/models/minilm/ready").await.status, 200);
    assert_eq!(get(a, "/v2/models/minilm/versions/1/ready").await.status, 200);
    assert_error(&get(a, "/v2/models/other/ready").await, 404, "not served here");
    let md = get(a, "/v2/models/minilm").await.json();
    assert_eq!(md["name"], MINILM);
    assert_eq!(md["versions"], json!(["1"]));
    assert_eq!(md["platform"], "candle_bert");
    assert_eq!(md["outputs"][0]["shape"], json!([-1, 384]));
    assert_eq!(md["parameters"]["max_batch"], 32);
    assert_eq!(md["parameters"]["engine"], "candle");
    assert_error(&get(a, "/v2/models/minilm/versions/7").await, 404, "versions/7");

    let (sentences, want) = reference();
    let r = post(
        a,
        "/v2/models/minilm/infer",
        json!({"id": "req-1", "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": [sentences[0], sentences[2]]}]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["id"], "req-1");
    assert_eq!(v["model_name"], MINILM);
    let out = &v["outputs"][0];
    assert_eq!(out["name"], "embedding");
    assert_eq!(out["datatype"], "FP32");
    assert_eq!(out["shape"], json!([2, 384]));
    let data: Vec<f32> = serde_json::from_value(out["data"].clone()).unwrap();
    assert_close(&data[..384], &want[0], "v2 row 0");
    assert_close(&data[384..], &want[2], "v2 row 1");

    let r = post(
        a,
        "/v2/models/nope/infer",
        json!({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}),
    )
    .await;
    assert_error(&r, 404, "not served here");
    let r = post(
        a,
        "/v2/models/minilm/infer",
        json!({"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": ["x"]}]}),
    )
    .await;
    assert_error(&r, 400, "shape [3] but 1 elements");
    let r = post(
        a,
        "/v2/models/minilm/infer",
        json!({"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]}),
    )
    .await;
    assert_error(&r, 400, "expected BYTES");
    assert!(r.json()["error"].is_string(), "KServe errors are {{\"error\": str}}");
}

#[tokio::test]
async fn concurrent_requests_are_batched_and_counted_in_metrics() {
    let serving = Serving { max_wait: std::time::Duration::from_millis(50), ..Serving::default() };
    let Some(srv) = support::start(MINILM, serving).await else {
        return;
    };
    let (sentences, want) = reference();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let s = sentences[i % 3].clone();
        let a = srv.addr;
        tasks.push(tokio::spawn(async move { post(a, "/v1/embeddings", json!({"model": MINILM, "input": s})).await }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let got: Vec<f32> = serde_json::from_value(r.json()["data"][0]["embedding"].clone()).unwrap();
        assert_close(&got, &want[i % 3], "batched request");
    }
    let m = get(srv.addr, "/metrics").await;
    assert!(m.content_type.starts_with("application/openmetrics-text"));
    let text = m.text();
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
    };
    assert_eq!(value("nv_inference_request_success{"), 16.0);
    assert_eq!(value("nv_inference_count{"), 16.0);
    let execs = value("nv_inference_exec_count{");
    assert!(execs < 16.0, "16 concurrent requests ran in {execs} batches: no batching");
    assert_eq!(value("tessera_runtime:num_requests_waiting{"), 0.0);
    assert_eq!(value("nv_inference_pending_request_count{"), 0.0);
    assert!(value("nv_inference_queue_duration_us{") > 0.0);
    assert_eq!(value("tessera_runtime:e2e_request_latency_seconds_count{"), 16.0);
    assert!(value("tessera_runtime:prompt_tokens_total{") > 16.0);
}
