//! OpenAI-compatible routes: `/v1/models`, `/v1/embeddings`, `/v1/chat/completions` (+ SSE).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use super::{ApiError, AppState, Dialect, InFlight, parse_body, tenant};
use crate::admission::{Permit, utc_day};
use crate::batching::{EmbedJob, GenerateEvent, GenerateJob};
use crate::engine::llama::{Message, render_chatml};
use crate::engine::{FinishReason, Generation, Kind, Sampling};
use crate::repository::{Loaded, Slot};
use crate::{Error, Result};

/// Most texts in one embeddings request (OpenAI's own limit).
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/chat/completions", post(chat_completions))
}

fn err(e: Error) -> ApiError {
    ApiError(e, Dialect::OpenAi)
}

/// Every configured model; `ready` (an extension) says whether it takes requests now.
async fn models(State(s): State<AppState>) -> Response {
    let created = s.started_unix();
    let data: Vec<Value> = s
        .repository
        .slots()
        .iter()
        .map(|m| {
            json!({"id": m.name(), "object": "model", "created": created, "owned_by": "tessera",
                   "ready": m.loaded().is_some()})
        })
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
    Other(serde::de::IgnoredAny),
}

#[derive(Debug, Deserialize)]
struct EmbeddingsRequest {
    model: String,
    input: EmbeddingInput,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<usize>,
}

/// Tokenises, admits and runs texts through the embedding batcher. Shared with KServe `infer`.
pub(super) async fn embed_texts(
    slot: &Slot,
    loaded: &Loaded,
    tenant: &str,
    texts: Vec<String>,
) -> Result<(Vec<Vec<f32>>, usize)> {
    let started = Instant::now();
    if loaded.info.kind != Kind::Embedding {
        return Err(Error::Unsupported { model: slot.name().to_string(), op: "embeddings" });
    }
    if texts.is_empty() {
        return Err(Error::BadRequest("input is empty".into()));
    }
    if texts.len() > MAX_EMBEDDING_INPUTS {
        return Err(Error::InputTooLarge(format!("{} inputs; the limit is {MAX_EMBEDDING_INPUTS}", texts.len())));
    }
    let tokenizer = loaded.tokenizer.clone();
    let encodings = tokio::task::spawn_blocking(move || tokenizer.encode_batch(texts, true))
        .await
        .map_err(|_| Error::WorkerGone)?
        .map_err(|e| Error::Tokenize(e.to_string()))?;
    let tokens: usize = encodings.iter().map(|e| e.len()).sum();
    let mut permit = slot.admission.admit(tenant, tokens as u64, 0, utc_day())?;
    let (reply, rx) = oneshot::channel();
    loaded.queue.embed(EmbedJob { inputs: encodings, enqueued: Instant::now(), reply })?;
    let result = rx.await.map_err(|_| Error::WorkerGone).and_then(|r| r);
    finish(slot, &mut permit, &result, tokens, 0, started);
    result.map(|v| (v, tokens))
}

/// Settles the tenant's budget and records request metrics.
fn finish<T>(
    s: &Slot,
    permit: &mut Permit,
    result: &Result<T>,
    prompt_tokens: usize,
    completion_tokens: usize,
    started: Instant,
) {
    if result.is_ok() {
        permit.settle((prompt_tokens + completion_tokens) as u64);
        s.metrics.prompt_tokens.inc_by(prompt_tokens as u64);
        s.metrics.generation_tokens.inc_by(completion_tokens as u64);
    }
    s.metrics.observe_request(result.is_ok(), started.elapsed());
}

async fn embeddings(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let _in_flight = s.track();
    let req: EmbeddingsRequest = parse_body(body).map_err(err)?;
    s.model(&req.model).map_err(err)?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(err(Error::BadRequest(format!("encoding_format `{other}`; expected float or base64"))));
        }
    };
    let (slot, loaded) = s.accepting(&req.model).map_err(err)?;
    if let Some(d) = req.dimensions
        && d != loaded.info.dim
    {
        return Err(err(Error::BadRequest(format!("dimensions {d}: this model only produces {}", loaded.info.dim))));
    }
    let texts = match req.input {
        EmbeddingInput::One(t) => vec![t],
        EmbeddingInput::Many(t) => t,
        EmbeddingInput::Other(_) => {
            return Err(err(Error::BadRequest(
                "input must be a string or an array of strings (token ids are not supported)".into(),
            )));
        }
    };
    let (vectors, tokens) = embed_texts(&slot, &loaded, &tenant(&headers), texts).await.map_err(err)?;
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": slot.name(),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

/// What the chat paths (OpenAI and KServe) hand to [`start_generation`].
#[derive(Debug)]
pub(super) struct GenerateRequest {
    pub messages: Vec<Message>,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
}

fn messages(raw: Vec<ChatMessage>) -> Result<Vec<Message>> {
    if raw.is_empty() {
        return Err(Error::BadRequest("messages is empty".into()));
    }
    raw.into_iter()
        .map(|m| {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "developer") {
                return Err(Error::BadRequest(format!("unknown role `{}`", m.role)));
            }
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            (kind, _) => {
                                return Err(Error::BadRequest(format!(
                                    "content part `{kind}` is not supported by a text model"
                                )));
                            }
                        }
                    }
                    text
                }
            };
            let role = if m.role == "developer" { "system".into() } else { m.role };
            Ok(Message { role, content })
        })
        .collect()
}

/// A generation that has been admitted and queued.
pub(super) struct Started {
    pub events: mpsc::UnboundedReceiver<GenerateEvent>,
    pub prompt_tokens: usize,
    pub permit: Permit,
    pub started: Instant,
}

fn random_seed() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

pub(super) async fn start_generation(
    slot: &Slot,
    loaded: &Loaded,
    tenant: &str,
    req: GenerateRequest,
) -> Result<Started> {
    let started = Instant::now();
    if loaded.info.kind != Kind::Chat {
        return Err(Error::Unsupported { model: slot.name().to_string(), op: "chat completions" });
    }
    let prompt = render_chatml(&req.messages);
    let tokenizer = loaded.tokenizer.clone();
    // The template carries its own special tokens.
    let prompt_ids = tokio::task::spawn_blocking(move || tokenizer.encode(prompt, false))
        .await
        .map_err(|_| Error::WorkerGone)?
        .map_err(|e| Error::Tokenize(e.to_string()))?
        .get_ids()
        .to_vec();
    let context = loaded.info.max_input_tokens.min(loaded.info.memory_cap);
    let policy = slot.admission.policy();
    if prompt_ids.len() as u64 > policy.max_input_tokens {
        return Err(Error::InputTooLarge(format!(
            "{} prompt tokens; the limit is {}",
            prompt_ids.len(),
            policy.max_input_tokens
        )));
    }
    if prompt_ids.len() >= context {
        return Err(Error::InputTooLarge(format!("{} prompt tokens; the context holds {context}", prompt_ids.len())));
    }
    let room = (context - prompt_ids.len()) as u64;
    let max_tokens = match req.max_tokens {
        Some(0) => return Err(Error::BadRequest("max_tokens must be at least 1".into())),
        Some(m) if m > room => {
            return Err(Error::BadRequest(format!(
                "prompt {} + max_tokens {m} exceeds the context of {context} tokens",
                prompt_ids.len()
            )));
        }
        Some(m) => m,
        None => policy.max_output_tokens.min(room),
    };
    if let Some(t) = req.temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(Error::BadRequest(format!("temperature {t} outside [0, 2]")));
    }
    if let Some(p) = req.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(Error::BadRequest(format!("top_p {p} outside (0, 1]")));
    }
    let permit = slot.admission.admit(tenant, prompt_ids.len() as u64, max_tokens, utc_day())?;
    let (tx, events) = mpsc::unbounded_channel();
    let prompt_tokens = prompt_ids.len();
    loaded.queue.generate(GenerateJob {
        prompt: prompt_ids,
        sampling: Sampling {
            max_tokens: max_tokens as usize,
            // OpenAI's default temperature is 1.
            temperature: Some(req.temperature.unwrap_or(1.0)),
            top_p: req.top_p,
            seed: req.seed.unwrap_or_else(random_seed),
            stop: req.stop.into_iter().filter(|s| !s.is_empty()).collect(),
        },
        enqueued: Instant::now(),
        events: tx,
    })?;
    Ok(Started { events, prompt_tokens, permit, started })
}

/// Waits for a whole generation, recording TTFT when the first text arrives.
pub(super) async fn collect_generation(s: &Slot, mut g: Started) -> Result<(Generation, usize)> {
    let mut first = true;
    let result = loop {
        match g.events.recv().await {
            Some(GenerateEvent::Text(_)) => {
                if first {
                    first = false;
                    s.metrics.time_to_first_token.observe(g.started.elapsed().as_secs_f64());
                }
            }
            Some(GenerateEvent::Done(done)) => break Ok(done),
            Some(GenerateEvent::Failed(e)) => break Err(e),
            None => break Err(Error::WorkerGone),
        }
    };
    let completion = result.as_ref().map_or(0, |g| g.completion_tokens);
    finish(s, &mut g.permit, &result, g.prompt_tokens, completion, g.started);
    result.map(|done| (done, g.prompt_tokens))
}

fn completion_id() -> String {
    format!("chatcmpl-{:x}", random_seed())
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

async fn chat_completions(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let in_flight = s.track();
    let req: ChatRequest = parse_body(body).map_err(err)?;
    s.model(&req.model).map_err(err)?;
    if req.n.is_some_and(|n| n != 1) {
        return Err(err(Error::BadRequest("only n = 1 is supported".into())));
    }
    let stream = req.stream;
    let include_usage = req.stream_options.unwrap_or_default().include_usage;
    let gen_req = GenerateRequest {
        messages: messages(req.messages).map_err(err)?,
        max_tokens: req.max_completion_tokens.or(req.max_tokens),
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
        stop: match req.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        },
    };
    let (slot, loaded) = s.accepting(&req.model).map_err(err)?;
    let started = start_generation(&slot, &loaded, &tenant(&headers), gen_req).await.map_err(err)?;
    let id = completion_id();
    let created = unix_now();
    if stream {
        return Ok(stream_chat(slot, started, id, created, include_usage, in_flight).into_response());
    }
    let (done, prompt_tokens) = collect_generation(&slot, started).await.map_err(err)?;
    Ok(Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": slot.name(),
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": done.text},
            "finish_reason": finish_reason(done.finish_reason),
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": done.completion_tokens,
            "total_tokens": prompt_tokens + done.completion_tokens,
        },
    }))
    .into_response())
}

/// Streams chunks as Server-Sent Events, ending with `data: [DONE]`. A task relays worker
/// events to the response; when the client goes away the relay's send fails, it drops the
/// event channel, and the worker stops generating.
fn stream_chat(
    s: Arc<Slot>,
    g: Started,
    id: String,
    created: u64,
    include_usage: bool,
    in_flight: InFlight,
) -> Sse<ReceiverStream<Result<Event, Infallible>>> {
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(32);
    let model = s.name().to_string();
    let chunk = move |delta: Value, finish: Option<&str>| {
        json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })
    };
    tokio::spawn(async move {
        let _in_flight = in_flight;
        let Started { mut events, prompt_tokens, mut permit, started } = g;
        let send = |v: String| {
            let tx = tx.clone();
            async move { tx.send(Ok(Event::default().data(v))).await.is_ok() }
        };
        if !send(chunk(json!({"role": "assistant", "content": ""}), None).to_string()).await {
            return;
        }
        let mut saw_text = false;
        while let Some(ev) = events.recv().await {
            match ev {
                GenerateEvent::Text(t) => {
                    if !saw_text {
                        saw_text = true;
                        s.metrics.time_to_first_token.observe(started.elapsed().as_secs_f64());
                    }
                    if !send(chunk(json!({"content": t}), None).to_string()).await {
                        // Client gone: dropping `events` stops the worker.
                        let gone: Result<()> = Err(Error::WorkerGone);
                        finish(&s, &mut permit, &gone, prompt_tokens, 0, started);
                        return;
                    }
                }
                GenerateEvent::Done(done) => {
                    let ok: Result<()> = Ok(());
                    finish(&s, &mut permit, &ok, prompt_tokens, done.completion_tokens, started);
                    let last = chunk(json!({}), Some(finish_reason(done.finish_reason)));
                    send(last.to_string()).await;
                    if include_usage {
                        let mut u = chunk(json!({}), None);
                        u["choices"] = json!([]);
                        u["usage"] = json!({
                            "prompt_tokens": prompt_tokens,
                            "completion_tokens": done.completion_tokens,
                            "total_tokens": prompt_tokens + done.completion_tokens,
                        });
                        send(u.to_string()).await;
                    }
                    send("[DONE]".into()).await;
                    return;
                }
                GenerateEvent::Failed(e) => {
                    let failed: Result<()> = Err(Error::WorkerGone);
                    finish(&s, &mut permit, &failed, prompt_tokens, 0, started);
                    let body = json!({"error": {"message": e.public_message(), "type": e.kind()}});
                    send(body.to_string()).await;
                    send("[DONE]".into()).await;
                    return;
                }
            }
        }
    });
    Sse::new(ReceiverStream::new(rx))
}
