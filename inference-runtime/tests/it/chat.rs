use serde_json::{Value, json};
use tessera_runtime::config::Serving;
use tessera_runtime::engine::llama::{Message, render_chatml};
use tessera_runtime::engine::{FinishReason, Sampling};

use crate::support::{self, SMOLLM2, assert_error, get, post};

fn france() -> Value {
    json!([{"role": "user", "content": "What is the capital of France?"}])
}

fn greedy(max_tokens: usize) -> Sampling {
    Sampling { max_tokens, temperature: None, top_p: None, seed: 0, stop: vec![] }
}

#[test]
fn smollm2_answers_greedily_and_samples_reproducibly() {
    let Some(mut engine) = support::load(SMOLLM2) else {
        return;
    };
    let tok = engine.tokenizer();
    let prompt = render_chatml(&[Message { role: "user".into(), content: "What is the capital of France?".into() }]);
    let ids = tok.encode(prompt, false).unwrap().get_ids().to_vec();
    let im_start = tok.token_to_id("<|im_start|>").expect("ChatML token in vocab");
    assert_eq!(ids[0], im_start, "special tokens are parsed, not spelled out");

    let mut pieces = Vec::new();
    let g = engine
        .generate(&ids, &greedy(24), &mut |p| {
            pieces.push(p.to_string());
            true
        })
        .unwrap();
    assert!(g.text.contains("Paris"), "{:?}", g.text);
    assert_eq!(g.finish_reason, FinishReason::Stop, "ends with <|im_end|>");
    assert_eq!(pieces.concat(), g.text, "streamed pieces add up to the text");

    let sampled = |seed| Sampling { max_tokens: 12, temperature: Some(1.0), top_p: Some(0.95), seed, stop: vec![] };
    let mut run = |s: Sampling| engine.generate(&ids, &s, &mut |_| true).unwrap().text;
    let a = run(sampled(7));
    assert_eq!(a, run(sampled(7)), "same seed, same text");
    let others: Vec<String> = (1..=3).map(|s| run(sampled(s))).collect();
    assert!(others.iter().any(|o| *o != a), "four seeds all gave {a:?}: sampling ignores the seed");

    // A stop string cuts the answer before it.
    let mut s = greedy(24);
    s.stop = vec!["Paris".into()];
    let g = engine.generate(&ids, &s, &mut |_| true).unwrap();
    assert!(!g.text.contains("Paris"), "{:?}", g.text);
    assert_eq!(g.finish_reason, FinishReason::Stop);

    // A consumer that hangs up stops the generation at once.
    let g = engine.generate(&ids, &greedy(24), &mut |_| false).unwrap();
    assert_eq!(g.finish_reason, FinishReason::Cancelled);
    assert!(g.completion_tokens < 5, "{}", g.completion_tokens);
}

#[tokio::test]
async fn chat_completions_over_http() {
    let Some(srv) = support::start(SMOLLM2, Serving::default()).await else {
        return;
    };
    let a = srv.addr;
    let r = post(
        a,
        "/v1/chat/completions",
        json!({"model": SMOLLM2, "messages": france(), "temperature": 0, "max_tokens": 24}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let answer = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(answer.contains("Paris"), "{answer}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let u = &v["usage"];
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );

    // Length limit.
    let r = post(
        a,
        "/v1/chat/completions",
        json!({"model": SMOLLM2, "messages": france(), "temperature": 0, "max_completion_tokens": 2}),
    )
    .await;
    let v = r.json();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 2);

    // Streaming: same greedy answer, split into SSE chunks, then [DONE].
    let r = post(
        a,
        "/v1/chat/completions",
        json!({"model": SMOLLM2, "messages": france(), "temperature": 0, "max_tokens": 24,
               "stream": true, "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.content_type.starts_with("text/event-stream"), "{}", r.content_type);
    let text = r.text();
    let events: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(streamed, answer);
    assert!(chunks.len() > 4, "tokens arrive as separate chunks");
    let finish = chunks.iter().find_map(|c| c["choices"][0]["finish_reason"].as_str()).unwrap();
    assert_eq!(finish, "stop");
    assert!(chunks.last().unwrap()["usage"]["completion_tokens"].as_u64().unwrap() > 0);

    let m = get(a, "/metrics").await.text();
    assert!(m.contains("tessera_runtime:time_to_first_token_seconds_count{model_name=\"smollm2\"} 3"), "{m}");
    assert!(m.contains("tessera_runtime:generation_tokens_total{model_name=\"smollm2\"}"));
}

#[tokio::test]
async fn chat_refusals_say_why() {
    let mut serving = Serving::default();
    serving.policy.max_output_tokens = 64;
    serving.policy.max_input_tokens = 200;
    serving.policy.daily_token_budget = 100;
    let Some(srv) = support::start(SMOLLM2, serving).await else {
        return;
    };
    let a = srv.addr;
    let r = post(a, "/v1/chat/completions", json!({"model": "gpt-4", "messages": france()})).await;
    assert_error(&r, 404, "model `gpt-4` is not served here");
    let r = post(a, "/v1/chat/completions", json!({"model": SMOLLM2, "messages": france(), "max_tokens": 65})).await;
    assert_error(&r, 400, "max_tokens 65; the limit is 64");
    let long = "tell me about GPUs ".repeat(100);
    let r = post(a, "/v1/chat/completions", json!({"model": SMOLLM2, "messages": [{"role": "user", "content": long}]}))
        .await;
    assert_error(&r, 413, "prompt tokens; the limit is 200");
    let r = post(
        a,
        "/v1/chat/completions",
        json!({"model": SMOLLM2, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]}),
    )
    .await;
    assert_error(&r, 400, "content part `image_url` is not supported");
    let r = post(a, "/v1/chat/completions", json!({"model": SMOLLM2, "messages": france(), "temperature": 7})).await;
    assert_error(&r, 400, "temperature 7");
    let r = post(a, "/v1/embeddings", json!({"model": SMOLLM2, "input": "x"})).await;
    assert_error(&r, 400, "does not support embeddings");

    // Budget 100: a request reserves prompt + max_tokens, then settles to what it used.
    let req = json!({"model": SMOLLM2, "messages": france(), "temperature": 0, "max_tokens": 8});
    let r = post(a, "/v1/chat/completions", req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let used = r.json()["usage"]["total_tokens"].as_u64().unwrap();
    assert!(used < 50, "{used}");
    let req = json!({"model": SMOLLM2, "messages": france(), "temperature": 0, "max_tokens": 64});
    let r = post(a, "/v1/chat/completions", req).await;
    assert_error(&r, 429, "daily token budget exhausted");

    // KServe v2 against the chat model.
    let r = post(
        a,
        "/v2/models/smollm2/infer",
        json!({"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["Hi"]}],
               "parameters": {"max_tokens": 64, "temperature": 0}}),
    )
    .await;
    assert_error(&r, 429, "budget");
}

#[tokio::test]
async fn kserve_v2_infer_generates_text() {
    let Some(srv) = support::start(SMOLLM2, Serving::default()).await else {
        return;
    };
    let md = get(srv.addr, "/v2/models/smollm2").await.json();
    assert_eq!(md["platform"], "candle_llama");
    assert_eq!(md["inputs"][0]["name"], "text_input");
    let r = post(
        srv.addr,
        "/v2/models/smollm2/versions/1/infer",
        json!({"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES",
                           "data": ["What is the capital of France?"]}],
               "parameters": {"max_tokens": 24, "temperature": 0}}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["outputs"][0]["name"], "text_output");
    assert!(v["outputs"][0]["data"][0].as_str().unwrap().contains("Paris"), "{v}");
}
