//! BERT-family sentence embeddings (all-MiniLM-L6-v2 and kin), matching sentence-transformers:
//! truncation at `max_seq_length`, masked mean pooling, L2 normalisation.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{Encoding, Tokenizer, TruncationParams};

use super::{Engine, Kind, ModelInfo};
use crate::{Error, Result};

/// sentence-transformers' default when `sentence_bert_config.json` does not say.
const DEFAULT_MAX_SEQ_LENGTH: usize = 256;

pub struct Embedder {
    model: BertModel,
    tokenizer: Arc<Tokenizer>,
    device: Device,
    info: ModelInfo,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder").field("info", &self.info).finish()
    }
}

#[derive(serde::Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

impl Embedder {
    pub fn load(dir: &Path, device: &Device, free_memory_bytes: u64) -> Result<Self> {
        let err = |reason: String| Error::LoadModel { dir: dir.display().to_string(), reason };
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).map_err(|e| err(format!("{name}: {e}")));
        let config: Config =
            serde_json::from_str(&read("config.json")?).map_err(|e| err(format!("config.json: {e}")))?;
        let max_seq_length = match read("sentence_bert_config.json") {
            Ok(s) => serde_json::from_str::<SentenceBertConfig>(&s)
                .map_err(|e| err(format!("sentence_bert_config.json: {e}")))?
                .max_seq_length
                .unwrap_or(DEFAULT_MAX_SEQ_LENGTH),
            Err(_) => DEFAULT_MAX_SEQ_LENGTH,
        }
        .min(config.max_position_embeddings);

        let mut tokenizer =
            Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| err(format!("tokenizer.json: {e}")))?;
        // tokenizer.json ships fixed padding to 128 and truncation at 128; sentence-transformers
        // truncates at max_seq_length and pads per batch, which `embed` does itself.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: max_seq_length, ..Default::default() }))
            .map_err(|e| err(format!("truncation: {e}")))?;

        // Read, not mmap: candle's mmap loader is `unsafe` (the file must not change while
        // mapped) and this crate forbids unsafe code. 90 MB read once at startup.
        let weights =
            std::fs::read(dir.join("model.safetensors")).map_err(|e| err(format!("model.safetensors: {e}")))?;
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, device)
            .map_err(|e| err(format!("model.safetensors: {e}")))?;
        let model = BertModel::load(vb, &config).map_err(|e| err(e.to_string()))?;

        let info = ModelInfo {
            kind: Kind::Embedding,
            architecture: "bert".into(),
            dim: config.hidden_size,
            max_input_tokens: max_seq_length,
            memory_cap: batch_cap(&config, max_seq_length, free_memory_bytes),
        };
        Ok(Embedder { model, tokenizer: Arc::new(tokenizer), device: device.clone(), info })
    }

    /// Runs one batch. Sequences are padded to the longest; padding is masked out of both
    /// attention and pooling, so a vector does not depend on its batch mates.
    fn forward(&self, inputs: &[Encoding]) -> Result<Vec<Vec<f32>>> {
        let n = inputs.len();
        let len = inputs.iter().map(|e| e.len()).max().unwrap_or(0).max(1);
        let mut ids = vec![0u32; n * len];
        let mut mask = vec![0u32; n * len];
        for (row, enc) in inputs.iter().enumerate() {
            for (col, (&id, &m)) in enc.get_ids().iter().zip(enc.get_attention_mask()).enumerate() {
                ids[row * len + col] = id;
                mask[row * len + col] = m;
            }
        }
        let ids = Tensor::from_vec(ids, (n, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, len), &self.device)?;
        let types = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?; // (n, len, dim)
        let mask_f = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (n, len, 1)
        let summed = hidden.broadcast_mul(&mask_f)?.sum(1)?; // (n, dim)
        // sentence-transformers clamps the token count at 1e-9; a real input has at least [CLS].
        let counts = mask_f.sum(1)?.clamp(1e-9, f64::MAX)?; // (n, 1)
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        let unit = mean.broadcast_div(&norm)?;
        Ok(unit.to_vec2::<f32>()?)
    }
}

/// How many max-length sequences fit in half of the free memory: attention scores plus the
/// feed-forward and hidden activations of one layer live at a time (f32).
fn batch_cap(config: &Config, max_len: usize, free_memory_bytes: u64) -> usize {
    let per_seq =
        4 * max_len * (config.num_attention_heads * max_len + 2 * config.intermediate_size + 8 * config.hidden_size);
    if free_memory_bytes == 0 {
        return usize::MAX; // unknown: the configured limit applies
    }
    ((free_memory_bytes / 2) as usize / per_seq.max(1)).max(1)
}

impl Engine for Embedder {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn tokenizer(&self) -> Arc<Tokenizer> {
        self.tokenizer.clone()
    }

    fn embed(&mut self, inputs: &[Encoding]) -> Result<Vec<Vec<f32>>> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        self.forward(inputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_cap_follows_free_memory() {
        let cfg = Config { hidden_size: 384, intermediate_size: 1536, ..Config::default() };
        // 4 B * 256 * (12*256 + 2*1536 + 8*384) = 9 437 184 B per sequence.
        assert_eq!(batch_cap(&cfg, 256, 2 * 9_437_184 * 10), 10);
        assert_eq!(batch_cap(&cfg, 256, 1024), 1, "never below one");
        assert_eq!(batch_cap(&cfg, 256, 0), usize::MAX, "unknown memory: no cap");
    }
}
