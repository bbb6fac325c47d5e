//! Several models in one process: routing by name, per-model queues and metrics, the memory
//! budget, the KServe model repository (index, load, unload), `tessera-runtime plan`.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tessera_runtime::config::{ModelControl, ModelServing, ModelSpec, Serving};
use tessera_runtime::engine;

use crate::embeddings::{assert_close, reference};
use crate::support::{self, MINILM, MINILM_ONNX, SMOLLM2, assert_error, cosine, get, post};

fn plan_bytes(spec: &ModelSpec) -> u64 {
    let serving: ModelServing = Serving::default().for_model(spec);
    engine::plan(spec, &serving).unwrap().total_bytes()
}

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{line_start} missing in\n{text}"))
}

fn index_state(index: &Value, name: &str) -> String {
    let row = index.as_array().unwrap().iter().find(|r| r["name"] == name).unwrap();
    row["state"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn three_models_in_one_process_route_by_name() {
    let (Some(a), Some(b), Some(c)) = (support::spec(MINILM), support::spec(MINILM_ONNX), support::spec(SMOLLM2))
    else {
        return;
    };
    let serving = Serving { max_wait: Duration::from_millis(20), ..Serving::default() };
    let Some(state) = support::new_state(vec![a, b, c], serving, None) else {
        return;
    };
    state.load_startup().unwrap();
    let srv = support::serve_state(state).await;
    let addr = srv.addr;

    let models = get(addr, "/v1/models").await.json();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [MINILM, MINILM_ONNX, SMOLLM2]);
    assert!(models["data"].as_array().unwrap().iter().all(|m| m["ready"] == true));
    let index = post(addr, "/v2/repository/index", json!({})).await.json();
    for (name, engine) in [(MINILM, "candle"), (MINILM_ONNX, "ort"), (SMOLLM2, "candle")] {
        assert_eq!(index_state(&index, name), "READY");
        let row = index.as_array().unwrap().iter().find(|r| r["name"] == name).unwrap();
        assert_eq!(row["engine"], engine);
        assert!(row["memory_bytes"].as_u64().unwrap() > 64 << 20);
        assert_eq!(get(addr, &format!("/v2/models/{name}/ready")).await.status, 200);
    }
    assert_eq!(get(addr, "/v2/models/minilm/versions/1").await.json()["platform"], "candle_bert");
    assert_eq!(get(addr, "/v2/models/minilm-onnx").await.json()["platform"], "ort_bert");
    assert_eq!(get(addr, "/v2/models/smollm2").await.json()["platform"], "candle_llama");

    // Concurrent requests to both embedders and the chat model, each answered by its own model.
    let (sentences, want) = reference();
    let mut tasks = Vec::new();
    for i in 0..12 {
        let model = if i % 2 == 0 { MINILM } else { MINILM_ONNX };
        let text = sentences[i % 3].clone();
        tasks.push(tokio::spawn(async move {
            (i, post(addr, "/v1/embeddings", json!({"model": model, "input": text})).await)
        }));
    }
    let chat = tokio::spawn(async move {
        post(
            addr,
            "/v1/chat/completions",
            json!({"model": SMOLLM2, "temperature": 0, "max_tokens": 24,
                   "messages": [{"role": "user", "content": "What is the capital of France?"}]}),
        )
        .await
    });
    for t in tasks {
        let (i, r) = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_eq!(v["model"], if i % 2 == 0 { MINILM } else { MINILM_ONNX });
        let got: Vec<f32> = serde_json::from_value(v["data"][0]["embedding"].clone()).unwrap();
        if i % 2 == 0 {
            assert_close(&got, &want[i % 3], "candle in a multi-model process");
        } else {
            assert!(cosine(&got, &want[i % 3]) >= 0.999, "ort in a multi-model process");
        }
    }
    let r = chat.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["choices"][0]["message"]["content"].as_str().unwrap().contains("Paris"));
    // A model of the wrong kind or an unknown one is refused by name.
    let r = post(addr, "/v1/embeddings", json!({"model": SMOLLM2, "input": "x"})).await;
    assert_error(&r, 400, "does not support embeddings");
    let r = post(addr, "/v2/models/nope/infer", json!({"inputs": []})).await;
    assert_error(&r, 404, "model `nope` is not served here");

    // Metrics are per model.
    let m = get(addr, "/metrics").await.text();
    assert_eq!(metric(&m, "nv_inference_count{model=\"minilm\","), 6.0);
    assert_eq!(metric(&m, "nv_inference_count{model=\"minilm-onnx\","), 6.0);
    assert_eq!(metric(&m, "nv_inference_count{model=\"smollm2\","), 1.0);
    assert_eq!(metric(&m, "tessera_runtime:model_loaded{model_name=\"smollm2\"}"), 1.0);
    let reserved = metric(&m, "tessera_runtime:memory_reserved_bytes");
    let per_model: f64 = [MINILM, MINILM_ONNX, SMOLLM2]
        .iter()
        .map(|n| metric(&m, &format!("tessera_runtime:model_memory_bytes{{model_name=\"{n}\"}}")))
        .sum();
    assert_eq!(reserved, per_model);
}

#[tokio::test]
async fn budget_refuses_what_does_not_fit_and_unload_frees_memory() {
    let (Some(a), Some(b), Some(mut c)) = (support::spec(MINILM), support::spec(MINILM_ONNX), support::spec(SMOLLM2))
    else {
        return;
    };
    c.load = false;
    let (pa, pb, pc) = (plan_bytes(&a), plan_bytes(&b), plan_bytes(&c));
    // Room for the ONNX model and one of the other two, never all three.
    let budget = pb + pa.max(pc) + (1 << 20);
    assert!(pa + pb + pc > budget);
    let serving = Serving { model_control: ModelControl::Explicit, ..Serving::default() };
    let Some(state) = support::new_state(vec![a.clone(), b.clone(), c.clone()], serving, Some(budget)) else {
        return;
    };
    state.load_startup().unwrap();
    let srv = support::serve_state(state).await;
    let addr = srv.addr;
    let v2 = get(addr, "/v2").await.json();
    assert_eq!(v2["memory_budget_bytes"], budget);
    assert_eq!(v2["memory_reserved_bytes"], pa + pb);
    assert_eq!(index_state(&post(addr, "/v2/repository/index", json!({})).await.json(), SMOLLM2), "UNAVAILABLE");
    let ready_only = post(addr, "/v2/repository/index", json!({"ready": true})).await.json();
    assert_eq!(ready_only.as_array().unwrap().len(), 2);
    assert_error(&get(addr, "/v2/models/smollm2/ready").await, 503, "false");
    let r =
        post(addr, "/v1/chat/completions", json!({"model": SMOLLM2, "messages": [{"role": "user", "content": "hi"}]}))
            .await;
    assert_error(&r, 503, "model `smollm2` is not ready");

    // The chat model does not fit next to the two embedders: refused with the numbers, nothing loaded.
    let r = post(addr, "/v2/repository/models/smollm2/load", json!({})).await;
    assert_error(&r, 409, "model `smollm2` needs");
    assert!(r.text().contains("minilm") && r.text().contains("MiB"), "{}", r.text());
    let index = post(addr, "/v2/repository/index", json!({})).await.json();
    assert_eq!(index_state(&index, SMOLLM2), "UNAVAILABLE");
    let row = index.as_array().unwrap().iter().find(|r| r["name"] == SMOLLM2).unwrap();
    assert!(row["reason"].as_str().unwrap().contains("needs"), "{row}");
    assert_eq!(get(addr, "/v2").await.json()["memory_reserved_bytes"], pa + pb);
    let r = post(addr, "/v2/repository/models/nope/load", json!({})).await;
    assert_error(&r, 404, "not served here");

    // Unload the candle embedder: it stops taking requests, its memory is released once its worker
    // has dropped the engine, and then the chat model fits.
    let r = post(addr, "/v2/repository/models/minilm/unload", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_error(&get(addr, "/v2/models/minilm/ready").await, 503, "false");
    let r = post(addr, "/v1/embeddings", json!({"model": MINILM, "input": "x"})).await;
    assert_error(&r, 503, "model `minilm` is not ready");
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(addr, "/v2").await.json()["memory_reserved_bytes"] != pb {
        assert!(Instant::now() < deadline, "the unloaded model's memory was never released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(index_state(&post(addr, "/v2/repository/index", json!({})).await.json(), MINILM), "UNAVAILABLE");
    let r = post(addr, "/v2/repository/models/smollm2/load", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = post(
        addr,
        "/v1/chat/completions",
        json!({"model": SMOLLM2, "temperature": 0, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // The ORT model kept serving throughout.
    let r = post(addr, "/v1/embeddings", json!({"model": MINILM_ONNX, "input": "still here"})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // And now the candle embedder is the one that does not fit.
    let r = post(addr, "/v2/repository/models/minilm/load", json!({})).await;
    assert_error(&r, 409, "model `minilm` needs");
    let r = post(addr, "/v2/repository/models/smollm2/load", json!({})).await;
    assert_eq!(r.status, 200, "loading a ready model is a no-op: {}", r.text());

    // A start-up set over the budget is refused before anything loads.
    let Some(state) = support::new_state(vec![a, b], Serving::default(), Some(pa + pb - 1)) else {
        return;
    };
    let e = state.load_startup().unwrap_err().to_string();
    assert!(e.contains("the models loaded at start need") && e.contains("minilm-onnx"), "{e}");
    assert!(state.repository.slots().iter().all(|s| s.loaded().is_none()));
    assert_eq!(state.repository.budget().reserved(), 0);
}

#[tokio::test]
async fn model_control_is_off_unless_enabled() {
    let Some(srv) = support::start(MINILM, Serving::default()).await else {
        return;
    };
    let r = post(srv.addr, "/v2/repository/models/minilm/unload", json!({})).await;
    assert_error(&r, 403, "--model-control explicit");
    let r = support::call(srv.addr, hyper::Method::POST, "/v2/repository/index", &[], None).await;
    assert_eq!(r.status, 200, "an empty body is allowed: {}", r.text());
    assert_eq!(index_state(&r.json(), MINILM), "READY");
    let r = post(srv.addr, "/v2/repository/index", json!({"ready": "yes"})).await;
    assert_error(&r, 400, "invalid JSON body");
}

#[test]
fn plan_prints_the_pods_gpu_memory() {
    let (Some(a), Some(b)) = (support::model_dir(MINILM), support::model_dir(SMOLLM2)) else {
        return;
    };
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessera-runtime"))
        .args(["plan", "--json", "--model"])
        .arg(format!("name=embed,dir={}", a.display()))
        .arg("--model")
        .arg(format!("name=chat,dir={},load=false", b.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let embed = plan_bytes(&ModelSpec::new("embed", &a));
    let chat = plan_bytes(&ModelSpec::new("chat", &b));
    assert_eq!(v["startup_bytes"], embed);
    assert_eq!(v["all_bytes"], embed + chat);
    let mi = |bytes: u64| format!("{}Mi", tessera_runtime::device::pod_gpu_memory(bytes).div_ceil(1 << 20));
    assert_eq!(v["gpu_memory"], mi(embed));
    assert_eq!(v["gpu_memory_all_loaded"], mi(embed + chat));
    assert_eq!(v["models"][0]["plan"]["engine"], "candle");
    assert_eq!(v["models"][1]["plan"]["kind"], "chat");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessera-runtime"))
        .args(["plan", "--model", "name=x,dir=/nonexistent/x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/x"));
    let table = std::process::Command::new(env!("CARGO_BIN_EXE_tessera-runtime"))
        .args(["plan", "--model"])
        .arg(format!("name=embed,dir={}", a.display()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains(&format!("tessera.dev/gpu-memory: \"{}\"", mi(embed))), "{text}");
}
