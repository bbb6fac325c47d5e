//! Llama-family chat models from one GGUF file (quantized weights + tokenizer in its metadata),
//! e.g. SmolLM2-135M-Instruct. One sequence at a time: the KV cache lives in the model.

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling as Strategy};
use candle_transformers::models::quantized_llama::ModelWeights;
use serde::Deserialize;
use tokenizers::Tokenizer;

use super::{Engine, FinishReason, Generation, Kind, ModelInfo, Sampling};
use crate::{Error, Result};

pub struct Chat {
    model: ModelWeights,
    tokenizer: Arc<Tokenizer>,
    device: Device,
    eos: Vec<u32>,
    info: ModelInfo,
}

impl std::fmt::Debug for Chat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chat").field("info", &self.info).finish()
    }
}

/// One chat turn, as the OpenAI API sends it (text content only).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// What the GGUF metadata says about the model's size.
#[derive(Debug, Clone, Copy)]
struct Dims {
    context: usize,
    kv_bytes_per_token: usize,
}

fn dims(content: &gguf_file::Content) -> Dims {
    let md_u32 = |key: &str| content.metadata.get(key).and_then(|v| v.to_u32().ok()).map(|v| v as usize);
    let context = md_u32("llama.context_length").unwrap_or(2048);
    let layers = md_u32("llama.block_count").unwrap_or(0);
    let heads = md_u32("llama.attention.head_count").unwrap_or(1).max(1);
    let kv_heads = md_u32("llama.attention.head_count_kv").unwrap_or(heads);
    let width = md_u32("llama.embedding_length").unwrap_or(0);
    // KV cache: keys and values, f32, per layer and kv head.
    Dims { context, kv_bytes_per_token: 2 * layers * kv_heads * (width / heads) * 4 }
}

/// (weights, KV cache for the whole context) in bytes, from the GGUF header alone.
pub fn plan(path: &Path) -> Result<(u64, u64)> {
    let err = |reason: String| Error::LoadModel { dir: path.display().to_string(), reason };
    let mut file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let len = file.metadata().map_err(|e| err(e.to_string()))?.len();
    let content = gguf_file::Content::read(&mut file).map_err(|e| err(e.to_string()))?;
    let d = dims(&content);
    Ok((len.saturating_sub(content.tensor_data_offset), (d.kv_bytes_per_token * d.context) as u64))
}

impl Chat {
    /// Loads on `device`; `working_bytes` caps the context to the KV cache it holds (0: the
    /// model's own context).
    pub fn load(path: &Path, device: &Device, working_bytes: u64) -> Result<Self> {
        let err = |reason: String| Error::LoadModel { dir: path.display().to_string(), reason };
        let mut file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| err(e.to_string()))?;
        let md_u32 = |key: &str| content.metadata.get(key).and_then(|v| v.to_u32().ok()).map(|v| v as usize);
        let arch =
            content.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
        if arch != "llama" {
            return Err(err(format!("architecture `{arch}`; expected llama")));
        }
        if let Some(t) = content.metadata.get("tokenizer.chat_template")
            && !t.to_string().is_ok_and(|t| t.contains("<|im_start|>"))
        {
            return Err(err("chat template is not ChatML".into()));
        }
        let Dims { context, kv_bytes_per_token } = dims(&content);
        let mut eos: Vec<u32> = md_u32("tokenizer.ggml.eos_token_id").map(|v| v as u32).into_iter().collect();

        let tokenizer = Tokenizer::from_gguf(&content).map_err(|e| err(e.to_string()))?;
        // ChatML ends an assistant turn with <|im_end|>, whatever the GGUF calls its eos.
        if let Some(id) = tokenizer.token_to_id("<|im_end|>")
            && !eos.contains(&id)
        {
            eos.push(id);
        }
        let model = ModelWeights::from_gguf(content, &mut file, device).map_err(|e| err(e.to_string()))?;

        let memory_cap = if working_bytes == 0 || kv_bytes_per_token == 0 {
            context
        } else {
            (working_bytes as usize / kv_bytes_per_token).clamp(1, context)
        };
        let info = ModelInfo {
            kind: Kind::Chat,
            architecture: arch,
            dim: tokenizer.get_vocab_size(true),
            max_input_tokens: context,
            memory_cap,
        };
        Ok(Chat { model, tokenizer: Arc::new(tokenizer), device: device.clone(), eos, info })
    }
}

/// Renders messages with ChatML and opens the assistant turn. SmolLM2's template adds its
/// default system prompt when the conversation has none; so does this.
pub fn render_chatml(messages: &[Message]) -> String {
    let mut out = String::new();
    if messages.first().is_none_or(|m| m.role != "system") {
        out.push_str(
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n",
        );
    }
    for m in messages {
        out.push_str("<|im_start|>");
        out.push_str(&m.role);
        out.push('\n');
        out.push_str(&m.content);
        out.push_str("<|im_end|>\n");
    }
    out.push_str("<|im_start|>assistant\n");
    out
}

fn strategy(s: &Sampling) -> Strategy {
    match (s.temperature, s.top_p) {
        (None, _) => Strategy::ArgMax,
        (Some(t), _) if t <= 0.0 => Strategy::ArgMax,
        (Some(temperature), Some(p)) if p > 0.0 && p < 1.0 => Strategy::TopP { p, temperature },
        (Some(temperature), _) => Strategy::All { temperature },
    }
}

/// Turns a growing token list into text pieces that are safe to send: a piece is held back
/// while it ends in a partial UTF-8 sequence or could still become a stop string.
#[derive(Debug)]
struct Detokenizer<'a> {
    tokenizer: &'a Tokenizer,
    stop: &'a [String],
    tokens: Vec<u32>,
    sent: usize,
}

impl<'a> Detokenizer<'a> {
    fn text(&self) -> Result<String> {
        self.tokenizer.decode(&self.tokens, true).map_err(|e| Error::Tokenize(e.to_string()))
    }

    /// Adds a token; returns the new text to send and whether a stop string was reached.
    fn push(&mut self, token: u32) -> Result<(String, bool)> {
        self.tokens.push(token);
        let text = self.text()?;
        if let Some(at) = self.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            let piece = text.get(self.sent..at).unwrap_or("").to_string();
            self.sent = at.max(self.sent);
            return Ok((piece, true));
        }
        if text.ends_with('\u{FFFD}') {
            return Ok((String::new(), false));
        }
        // Hold back a tail that is a prefix of some stop string.
        let mut end = text.len();
        for s in self.stop {
            for k in (1..s.len()).rev() {
                if s.is_char_boundary(k) && text.ends_with(&s[..k]) {
                    end = end.min(text.len() - k);
                    break;
                }
            }
        }
        let piece = text.get(self.sent..end).unwrap_or("").to_string();
        self.sent = end.max(self.sent);
        Ok((piece, false))
    }

    /// Whatever was held back, once generation ends without a stop string.
    fn flush(&mut self) -> Result<String> {
        let text = self.text()?;
        let piece = text.get(self.sent..).unwrap_or("").to_string();
        self.sent = text.len();
        Ok(piece)
    }
}

impl Engine for Chat {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn tokenizer(&self) -> Arc<Tokenizer> {
        self.tokenizer.clone()
    }

    fn generate(
        &mut self,
        prompt: &[u32],
        sampling: &Sampling,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation> {
        if prompt.is_empty() {
            return Err(Error::BadRequest("empty prompt".into()));
        }
        let limit = self.info.memory_cap.min(self.info.max_input_tokens);
        if prompt.len() + sampling.max_tokens > limit {
            return Err(Error::InputTooLarge(format!(
                "prompt {} + max_tokens {} exceeds the context of {limit} tokens",
                prompt.len(),
                sampling.max_tokens
            )));
        }
        self.model.clear_kv_cache();
        let tokenizer = self.tokenizer.clone();
        let mut detok = Detokenizer { tokenizer: &tokenizer, stop: &sampling.stop, tokens: Vec::new(), sent: 0 };
        let mut sampler = LogitsProcessor::from_sampling(sampling.seed, strategy(sampling));
        let mut text = String::new();
        let mut finish = FinishReason::Length;
        let mut hit_stop_string = false;
        let mut input = Tensor::new(prompt, &self.device)?.unsqueeze(0)?;
        let mut pos = 0;
        let mut generated = 0;
        while generated < sampling.max_tokens {
            let logits = self.model.forward(&input, pos)?.squeeze(0)?;
            pos += input.dim(1)?;
            let token = sampler.sample(&logits)?;
            generated += 1;
            if self.eos.contains(&token) {
                finish = FinishReason::Stop;
                break;
            }
            let (piece, stopped) = detok.push(token)?;
            if !piece.is_empty() {
                text.push_str(&piece);
                if !on_text(&piece) {
                    finish = FinishReason::Cancelled;
                    break;
                }
            }
            if stopped {
                finish = FinishReason::Stop;
                hit_stop_string = true;
                break;
            }
            input = Tensor::new(&[token], &self.device)?.unsqueeze(0)?;
        }
        // Text after a stop string is dropped; anything else held back is sent now.
        if finish != FinishReason::Cancelled && !hit_stop_string {
            let rest = detok.flush()?;
            if !rest.is_empty() {
                text.push_str(&rest);
                on_text(&rest);
            }
        }
        Ok(Generation { text, completion_tokens: generated, finish_reason: finish })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_adds_default_system_prompt_only_when_missing() {
        let user = Message { role: "user".into(), content: "hi".into() };
        let r = render_chatml(std::slice::from_ref(&user));
        assert!(r.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"));
        assert!(r.ends_with("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"));
        let sys = Message { role: "system".into(), content: "Be terse.".into() };
        let r = render_chatml(&[sys, user]);
        assert!(r.starts_with("<|im_start|>system\nBe terse.<|im_end|>\n"));
        assert_eq!(r.matches("system").count(), 1);
    }

    #[test]
    fn zero_temperature_is_greedy() {
        let s = |t, p| Sampling { max_tokens: 1, temperature: t, top_p: p, seed: 0, stop: vec![] };
        assert!(matches!(strategy(&s(None, None)), Strategy::ArgMax));
        assert!(matches!(strategy(&s(Some(0.0), Some(0.5))), Strategy::ArgMax));
        assert!(matches!(strategy(&s(Some(0.7), Some(0.9))), Strategy::TopP { .. }));
        assert!(matches!(strategy(&s(Some(0.7), None)), Strategy::All { .. }));
    }
}
