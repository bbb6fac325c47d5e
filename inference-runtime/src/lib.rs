//! The bundled inference runtime tessera places on a GPU, a MIG slice or a CPU.
//!
//! One process serves several models (`--model`, `--config`) within one memory budget:
//! - [`engine`]: models behind one trait: candle (BERT-family embeddings, Llama-family GGUF chat)
//!   and ONNX Runtime (BERT-family embeddings); [`engine::plan`] sizes a model before loading.
//! - [`repository`]: every configured model with its own queue, admission and metrics; loads
//!   within the budget, refuses what does not fit, unloads.
//! - [`batching`]: the bounded queue, dynamic batching for embeddings, the single generation worker.
//! - [`admission`]: per-tenant limits checked before any work is queued.
//! - [`server`]: KServe v2 (with the model repository) and OpenAI routes, probes, drain, `/metrics`.
//! - [`metrics`]: vLLM-style and Triton-style series, labelled by model.
//! - [`device`]: which device the process got (`CUDA_VISIBLE_DEVICES`), its memory, the budget.

pub mod admission;
pub mod batching;
pub mod config;
pub mod device;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod repository;
pub mod server;
pub mod telemetry;

pub use error::{Error, Result};

/// Sentences of 9–20 tokens, varied in length, that the load generator and the batching
/// examples send.
pub const SAMPLE_TEXTS: [&str; 8] = [
    "The quick brown fox jumps over the lazy dog.",
    "Tessera places inference servers on MIG slices and whole GPUs.",
    "A small embedding model can share an accelerator with many others.",
    "Kubernetes schedules pods; the extender decides which GPU slice they get.",
    "Dynamic batching trades a few milliseconds of waiting for much higher throughput.",
    "What is the capital of France?",
    "Sentence embeddings map text to vectors whose cosine similarity reflects meaning.",
    "Graceful drain fails readiness first, then finishes the requests already accepted.",
];
