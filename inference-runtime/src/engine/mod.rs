//! Models behind one trait, on two engines. A model folder is recognised by its files:
//! `*.gguf` → Llama-family chat on candle ([`llama`]); `config.json` + `model.safetensors` +
//! `tokenizer.json` → BERT-family embeddings on candle ([`bert`]); `config.json` + `model.onnx`
//! + `tokenizer.json` → BERT-family embeddings on ONNX Runtime ([`onnx`]).
//!
//! [`plan`] sizes a model from its folder without loading it, so a model that would not fit the
//! memory budget is refused before any weights are read.

pub mod bert;
pub mod llama;
pub mod onnx;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use serde::Serialize;
use tokenizers::{Encoding, Tokenizer};

use crate::config::{EngineKind, ModelServing, ModelSpec};
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
    /// Most sequences (embeddings) or tokens of context (chat) the reserved memory allows.
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

    /// Whether a batch's padding costs (almost) nothing outside attention, as in a packed ONNX
    /// graph: the batcher then runs a batch as one pass instead of groups of similar length.
    fn packs_tokens(&self) -> bool {
        false
    }

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

/// Host or device memory a model needs besides weights and working memory: tokenizer,
/// engine bookkeeping, buffers.
pub const MODEL_OVERHEAD_BYTES: u64 = 64 << 20;

/// What a model will hold in device memory once loaded, estimated from its folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryPlan {
    pub engine: EngineKind,
    pub kind: Kind,
    pub architecture: String,
    /// Weights as the engine holds them (f32 for candle BERT, the file's quantization for GGUF,
    /// the ONNX initializers for ORT).
    pub weights_bytes: u64,
    /// Embeddings: activations of one layer for `max_batch` sequences of `max_seq_length`
    /// tokens. Chat: the f32 KV cache for the whole context.
    pub working_bytes: u64,
    pub overhead_bytes: u64,
}

impl MemoryPlan {
    pub fn total_bytes(&self) -> u64 {
        self.weights_bytes + self.working_bytes + self.overhead_bytes
    }
}

/// The files that decide how a folder is served.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Layout {
    Gguf(PathBuf),
    Safetensors,
    Onnx,
}

fn layout(dir: &Path, engine: Option<EngineKind>) -> Result<(Layout, EngineKind)> {
    let err = |reason: String| Error::LoadModel { dir: dir.display().to_string(), reason };
    let entries = std::fs::read_dir(dir).map_err(|e| err(e.to_string()))?;
    let mut gguf: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    gguf.sort();
    let safetensors = dir.join("model.safetensors").is_file();
    let onnx = dir.join("model.onnx").is_file();
    let found = match gguf.as_slice() {
        [one] => Layout::Gguf(one.clone()),
        [] if safetensors && engine != Some(EngineKind::Ort) => Layout::Safetensors,
        [] if onnx && engine != Some(EngineKind::Candle) => Layout::Onnx,
        [] => {
            let want = match engine {
                Some(EngineKind::Ort) => "model.onnx",
                Some(EngineKind::Candle) => "model.safetensors or one *.gguf",
                None => "model.safetensors, model.onnx or one *.gguf",
            };
            return Err(err(format!("no {want}: not a model folder for this engine")));
        }
        _ => return Err(err(format!("{} *.gguf files; expected one", gguf.len()))),
    };
    let kind = match (&found, engine) {
        (Layout::Gguf(_), Some(EngineKind::Ort)) => {
            return Err(err("engine ort serves ONNX embedding models; a GGUF chat model runs on candle".into()));
        }
        (Layout::Onnx, _) => EngineKind::Ort,
        _ => EngineKind::Candle,
    };
    Ok((found, kind))
}

/// Sizes `spec` from its folder (configs, file headers) without reading weights.
pub fn plan(spec: &ModelSpec, serving: &ModelServing) -> Result<MemoryPlan> {
    let dir = &spec.dir;
    let err = |reason: String| Error::LoadModel { dir: dir.display().to_string(), reason };
    let (layout, engine) = layout(dir, spec.engine)?;
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).map_err(|e| err(format!("{}: {e}", p.display())));
    match layout {
        Layout::Gguf(path) => {
            let (weights_bytes, kv) = llama::plan(&path)?;
            Ok(MemoryPlan {
                engine,
                kind: Kind::Chat,
                architecture: "llama".into(),
                weights_bytes,
                working_bytes: kv,
                overhead_bytes: MODEL_OVERHEAD_BYTES,
            })
        }
        Layout::Safetensors | Layout::Onnx => {
            let shape = bert::Shape::read(dir)?;
            let weights_bytes = if layout == Layout::Onnx {
                size(&dir.join("model.onnx"))?
            } else {
                bert::f32_weight_bytes(&dir.join("model.safetensors"))?
            };
            Ok(MemoryPlan {
                engine,
                kind: Kind::Embedding,
                architecture: "bert".into(),
                weights_bytes,
                working_bytes: shape.bytes_per_sequence() * serving.max_batch as u64,
                overhead_bytes: MODEL_OVERHEAD_BYTES,
            })
        }
    }
}

/// Where ONNX Runtime comes from and how many threads it gets.
#[derive(Debug, Clone, Default)]
pub struct OrtOptions {
    pub library: Option<PathBuf>,
    pub threads: usize,
}

/// Loads `spec` as `plan` sized it, on `device` (candle) or the ONNX Runtime CPU provider.
pub fn load_spec(spec: &ModelSpec, plan: &MemoryPlan, device: &Device, ort: &OrtOptions) -> Result<Box<dyn Engine>> {
    let (layout, _) = layout(&spec.dir, spec.engine)?;
    match layout {
        Layout::Gguf(path) => Ok(Box::new(llama::Chat::load(&path, device, plan.working_bytes)?)),
        Layout::Safetensors => Ok(Box::new(bert::Embedder::load(&spec.dir, device, plan.working_bytes)?)),
        Layout::Onnx => Ok(Box::new(onnx::OrtEmbedder::load(&spec.dir, ort, plan.working_bytes)?)),
    }
}

/// Loads whichever candle model `dir` holds, on `device`, capping batch or context to what
/// `working_bytes` holds (0: no cap).
pub fn load(dir: &Path, device: &Device, working_bytes: u64) -> Result<Box<dyn Engine>> {
    match layout(dir, Some(EngineKind::Candle))?.0 {
        Layout::Gguf(path) => Ok(Box::new(llama::Chat::load(&path, device, working_bytes)?)),
        _ => Ok(Box::new(bert::Embedder::load(dir, device, working_bytes)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_pick_their_engine_and_mismatches_say_why() {
        let root = std::env::temp_dir().join(format!("tessera-layout-{}", std::process::id()));
        let both = root.join("both");
        std::fs::create_dir_all(&both).unwrap();
        std::fs::write(both.join("model.safetensors"), b"").unwrap();
        std::fs::write(both.join("model.onnx"), b"").unwrap();
        assert_eq!(layout(&both, None).unwrap(), (Layout::Safetensors, EngineKind::Candle));
        assert_eq!(layout(&both, Some(EngineKind::Ort)).unwrap(), (Layout::Onnx, EngineKind::Ort));
        let onnx = root.join("onnx");
        std::fs::create_dir_all(&onnx).unwrap();
        std::fs::write(onnx.join("model.onnx"), b"").unwrap();
        assert_eq!(layout(&onnx, None).unwrap().1, EngineKind::Ort);
        let e = layout(&onnx, Some(EngineKind::Candle)).unwrap_err().to_string();
        assert!(e.contains("no model.safetensors or one *.gguf"), "{e}");
        let chat = root.join("chat");
        std::fs::create_dir_all(&chat).unwrap();
        std::fs::write(chat.join("m.gguf"), b"").unwrap();
        let e = layout(&chat, Some(EngineKind::Ort)).unwrap_err().to_string();
        assert!(e.contains("runs on candle"), "{e}");
        std::fs::write(chat.join("n.gguf"), b"").unwrap();
        assert!(layout(&chat, None).unwrap_err().to_string().contains("2 *.gguf files"));
        let e = layout(&root.join("missing"), None).unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
