//! The bundled inference runtime tessera places on a GPU, a MIG slice or a CPU.
//!
//! One process serves one model from `--model-dir`:
//! - [`engine`]: candle models behind one trait (BERT-family embeddings, Llama-family GGUF chat).
//! - [`batching`]: the bounded queue, dynamic batching for embeddings, the single generation worker.
//! - [`admission`]: per-tenant limits checked before any work is queued.
//! - [`server`]: KServe v2 and OpenAI routes, probes, drain, `/metrics`.
//! - [`metrics`]: vLLM-style and Triton-style series, labelled by model.
//! - [`device`]: which device the process got (`CUDA_VISIBLE_DEVICES`) and how much memory it has.

pub mod admission;
pub mod batching;
pub mod config;
pub mod device;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod server;
pub mod telemetry;

pub use error::{Error, Result};
