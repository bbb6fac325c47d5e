//! Models behind one trait. A model folder is recognised by its files:
//! `*.gguf` → Llama-family chat ([`llama`]); `config.json` + `model.safetensors` +
//! `tokenizer.json` → BERT-family embeddings ([`bert`]).

pub mod bert;
pub mod llama;

use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use serde::Serialize;
use tokenizers::{Encoding, Tokenizer};

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Embedding,
    Chat,
}

/// Static facts about the loaded model, for metadata routes and admission.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub kind: Kind,
    /// `bert`, `llama`, ...
    pub architecture: String,
    /// Embedding width (embeddings) or vocabulary size (chat).
    pub dim: usize,
    /// Longest input the model reads: truncation length (embeddings) or context length (chat).
    pub max_input_tokens: usize,
    /// Most sequences (embeddings) or tokens of context (chat) the device memory allows.
    pub memory_cap: usize,
}

/// How to decode: greedy when `temperature` is `None` or zero.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub max_tokens: usize,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: u64,
    pub stop: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
    /// The consumer went away (client disconnected); not sent to anyone.
    Cancelled,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub text: String,
    pub completion_tokens: usize,
    pub finish_reason: FinishReason,
}

/// A loaded model. Workers own it (`&mut self`); request handlers only use [`Engine::tokenizer`].
pub trait Engine: Send {
    fn info(&self) -> &ModelInfo;

    /// The tokenizer, shared with request handlers so they can count tokens before queueing.
    fn tokenizer(&self) -> Arc<Tokenizer>;

    /// One L2-normalised vector per encoding.
    fn embed(&mut self, _inputs: &[Encoding]) -> Result<Vec<Vec<f32>>> {
        Err(Error::Unsupported { model: self.info().architecture.clone(), op: "embeddings" })
    }

    /// Generates from prompt token ids. `on_text` gets each new piece of text as it becomes
    /// final and returns `false` to stop early.
    fn generate(
        &mut self,
        _prompt: &[u32],
        _sampling: &Sampling,
        _on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation> {
        Err(Error::Unsupported { model: self.info().architecture.clone(), op: "chat completions" })
    }
}

/// Loads whichever model `dir` holds, on `device`, sizing limits from `free_memory_bytes`.
pub fn load(dir: &Path, device: &Device, free_memory_bytes: u64) -> Result<Box<dyn Engine>> {
    let load_err = |reason: String| Error::LoadModel { dir: dir.display().to_string(), reason };
    let entries = std::fs::read_dir(dir).map_err(|e| load_err(e.to_string()))?;
    let mut gguf: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    gguf.sort();
    match gguf.as_slice() {
        [one] => Ok(Box::new(llama::Chat::load(one, device, free_memory_bytes)?)),
        [] if dir.join("config.json").is_file() => Ok(Box::new(bert::Embedder::load(dir, device, free_memory_bytes)?)),
        [] => Err(load_err("no *.gguf and no config.json: not a model folder".into())),
        _ => Err(load_err(format!("{} *.gguf files; expected one", gguf.len()))),
    }
}
