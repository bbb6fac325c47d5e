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

/// What sizes a BERT-family embedder: its config and the truncation length.
#[derive(Debug, Clone)]
pub struct Shape {
    pub config: Config,
    pub max_seq_length: usize,
}

impl Shape {
    /// Reads `config.json` and `sentence_bert_config.json` (optional) from `dir`.
    pub fn read(dir: &Path) -> Result<Self> {
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
        Ok(Shape { config, max_seq_length })
    }

    /// Working memory of one max-length sequence: attention scores plus the feed-forward and
    /// hidden activations of one layer live at a time (f32).
    pub fn bytes_per_sequence(&self) -> u64 {
        let (c, l) = (&self.config, self.max_seq_length);
        (4 * l * (c.num_attention_heads * l + 2 * c.intermediate_size + 8 * c.hidden_size)) as u64
    }

    /// How many max-length sequences `working_bytes` holds (never below one; 0 means unknown,
    /// no cap).
    pub fn batch_cap(&self, working_bytes: u64) -> usize {
        if working_bytes == 0 {
            return usize::MAX;
        }
        (working_bytes / self.bytes_per_sequence().max(1)).max(1) as usize
    }

    /// `tokenizer.json` set up as sentence-transformers runs it: truncation at
    /// `max_seq_length`, no fixed padding (batches pad to their longest input themselves).
    pub fn tokenizer(&self, dir: &Path) -> Result<Tokenizer> {
        let err = |reason: String| Error::LoadModel { dir: dir.display().to_string(), reason };
        let mut tokenizer =
            Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| err(format!("tokenizer.json: {e}")))?;
        // tokenizer.json ships fixed padding to 128 and truncation at 128.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: self.max_seq_length, ..Default::default() }))
            .map_err(|e| err(format!("truncation: {e}")))?;
        Ok(tokenizer)
    }

    pub fn info(&self, working_bytes: u64) -> ModelInfo {
        ModelInfo {
            kind: Kind::Embedding,
            architecture: "bert".into(),
            dim: self.config.hidden_size,
            max_input_tokens: self.max_seq_length,
            memory_cap: self.batch_cap(working_bytes),
        }
    }
}

/// Bytes the tensors of a safetensors file take as f32, from its header alone.
pub fn f32_weight_bytes(path: &Path) -> Result<u64> {
    use std::io::Read;
    let err = |reason: String| Error::LoadModel { dir: path.display().to_string(), reason };
    let mut f = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| err(format!("safetensors header: {e}")))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(err(format!("safetensors header of {len} bytes")));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(|e| err(format!("safetensors header: {e}")))?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| err(format!("safetensors header: {e}")))?;
    let mut elements = 0u64;
    for (name, t) in header.iter().filter(|(k, _)| *k != "__metadata__") {
        let shape = t["shape"].as_array().ok_or_else(|| err(format!("tensor `{name}` has no shape")))?;
        elements += shape.iter().map(|d| d.as_u64().unwrap_or(0)).product::<u64>();
    }
    Ok(elements * 4)
}

/// Masked mean pooling and L2 normalisation of `hidden` (`[n, len, dim]`, row-major) with
/// `mask` (`[n, len]`), in f64 accumulators: the same recipe as the candle path.
pub fn mean_pool_normalize(hidden: &[f32], mask: &[u32], n: usize, len: usize, dim: usize) -> Vec<Vec<f32>> {
    (0..n)
        .map(|row| {
            let mut sum = vec![0f64; dim];
            let mut count = 0f64;
            for t in 0..len {
                if mask[row * len + t] == 0 {
                    continue;
                }
                count += 1.0;
                let h = &hidden[(row * len + t) * dim..(row * len + t + 1) * dim];
                for (s, &x) in sum.iter_mut().zip(h) {
                    *s += x as f64;
                }
            }
            let count = count.max(1e-9);
            let mean: Vec<f64> = sum.into_iter().map(|s| s / count).collect();
            let norm = mean.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            mean.into_iter().map(|x| (x / norm) as f32).collect()
        })
        .collect()
}

impl Embedder {
    /// Loads on `device`; `working_bytes` caps the batch (0: no cap).
    pub fn load(dir: &Path, device: &Device, working_bytes: u64) -> Result<Self> {
        let err = |reason: String| Error::LoadModel { dir: dir.display().to_string(), reason };
        let shape = Shape::read(dir)?;
        let tokenizer = shape.tokenizer(dir)?;
        // Read, not mmap: candle's mmap loader is `unsafe` (the file must not change while
        // mapped) and this crate forbids unsafe code. 90 MB read once at startup.
        let weights =
            std::fs::read(dir.join("model.safetensors")).map_err(|e| err(format!("model.safetensors: {e}")))?;
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, device)
            .map_err(|e| err(format!("model.safetensors: {e}")))?;
        let model = BertModel::load(vb, &shape.config).map_err(|e| err(e.to_string()))?;
        let info = shape.info(working_bytes);
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
    fn batch_cap_follows_working_memory() {
        let shape = Shape {
            config: Config { hidden_size: 384, intermediate_size: 1536, ..Config::default() },
            max_seq_length: 256,
        };
        // 4 B * 256 * (12*256 + 2*1536 + 8*384) = 9 437 184 B per sequence.
        assert_eq!(shape.bytes_per_sequence(), 9_437_184);
        assert_eq!(shape.batch_cap(9_437_184 * 10), 10);
        assert_eq!(shape.batch_cap(1024), 1, "never below one");
        assert_eq!(shape.batch_cap(0), usize::MAX, "unknown memory: no cap");
    }

    #[test]
    fn pooling_ignores_padding_and_normalises() {
        // Two rows of three tokens, dim 2; row 1 has one padded token holding garbage.
        let hidden = [1.0, 0.0, 3.0, 0.0, 2.0, 0.0, 0.0, 2.0, 0.0, 4.0, 99.0, 99.0];
        let mask = [1, 1, 1, 1, 1, 0];
        let v = mean_pool_normalize(&hidden, &mask, 2, 3, 2);
        assert_eq!(v[0], vec![1.0, 0.0]);
        assert_eq!(v[1], vec![0.0, 1.0]);
    }
}
