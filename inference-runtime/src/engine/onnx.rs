//! BERT-family sentence embeddings on ONNX Runtime (`ort`, `load-dynamic`): the same tokenizer,
//! truncation, masked mean pooling and L2 normalisation as [`super::bert`], with the encoder run
//! by ORT's CPU provider (MLAS kernels).
//!
//! The ONNX Runtime library is loaded at run time from `--ort-library` (or `ORT_DYLIB_PATH`),
//! once per process; every ORT model shares one environment and one intra-op thread pool, so
//! several models on one slice do not each start a pool per core. The graph must take
//! `input_ids` and `attention_mask` (and `token_type_ids` if it declares it) as int64
//! `[batch, seq]` and give the last hidden state as float32 `[batch, seq, hidden]` (output
//! `last_hidden_state`, else its first output) — what `tools/bert_to_onnx.py` and common
//! exporters write. A graph whose metadata has `tessera.graph` = `packed` (the exporter's
//! default: dense ops on the real tokens only) runs each batch as one pass.

use std::path::Path;
use std::sync::{Arc, Mutex};

use ort::environment::{Environment, GlobalThreadPoolOptions};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::Tensor;
use tokenizers::{Encoding, Tokenizer};

use super::bert::{Shape, mean_pool_normalize};
use super::{Engine, ModelInfo, OrtOptions};
use crate::{Error, Result};

/// The process's ONNX Runtime environment: created by the first ORT model, shared afterwards.
static ENVIRONMENT: Mutex<Option<Environment>> = Mutex::new(None);

fn environment(opts: &OrtOptions) -> std::result::Result<Environment, String> {
    let mut env = ENVIRONMENT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(e) = env.as_ref() {
        return Ok(e.clone());
    }
    let path = opts
        .library
        .clone()
        .or_else(|| std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()).map(Into::into))
        .unwrap_or_else(|| "libonnxruntime.so".into());
    let builder = ort::init_from(&path).map_err(|e| format!("ONNX Runtime library: {e}"))?;
    let pool = GlobalThreadPoolOptions::default()
        .with_intra_threads(opts.threads)
        .and_then(|p| p.with_inter_threads(1))
        // Idle pool threads would spin on cores the other models' workers need.
        .and_then(|p| p.with_spin_control(false))
        .map_err(|e| format!("ONNX Runtime thread pool: {e}"))?;
    let created =
        builder.with_name("tessera-runtime").with_global_thread_pool(pool).build().map_err(|e| e.to_string())?;
    *env = Some(created.clone());
    Ok(created)
}

pub struct OrtEmbedder {
    session: Session,
    tokenizer: Arc<Tokenizer>,
    info: ModelInfo,
    token_type_ids: bool,
    output: String,
    /// The graph says (metadata `tessera.graph` = `packed`) that it runs dense ops on the real
    /// tokens only, as `tools/bert_to_onnx.py` writes it by default.
    packed: bool,
}

impl std::fmt::Debug for OrtEmbedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtEmbedder").field("info", &self.info).finish()
    }
}

impl OrtEmbedder {
    /// Loads `dir/model.onnx`; `working_bytes` caps the batch (0: no cap).
    pub fn load(dir: &Path, opts: &OrtOptions, working_bytes: u64) -> Result<Self> {
        let err = |reason: String| Error::LoadModel { dir: dir.display().to_string(), reason };
        let shape = Shape::read(dir)?;
        let tokenizer = shape.tokenizer(dir)?;
        let env = environment(opts).map_err(err)?;
        let session = Session::builder(&env)
            .and_then(|b| b.with_optimization_level(GraphOptimizationLevel::All).map_err(Into::into))
            .and_then(|mut b| b.commit_from_file(dir.join("model.onnx")))
            .map_err(|e| err(format!("model.onnx: {e}")))?;
        let inputs: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
        for needed in ["input_ids", "attention_mask"] {
            if !inputs.contains(&needed) {
                return Err(err(format!("model.onnx has inputs {inputs:?}; `{needed}` is required")));
            }
        }
        if let Some(other) = inputs.iter().find(|n| !matches!(**n, "input_ids" | "attention_mask" | "token_type_ids")) {
            return Err(err(format!("model.onnx wants input `{other}`, which a BERT embedder does not feed")));
        }
        let token_type_ids = inputs.contains(&"token_type_ids");
        let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        let output = match outputs.iter().find(|n| **n == "last_hidden_state").or(outputs.first()) {
            Some(o) => o.to_string(),
            None => return Err(err("model.onnx has no outputs".into())),
        };
        let packed = session.metadata().is_ok_and(|m| m.custom("tessera.graph").as_deref() == Some("packed"));
        let mut info = shape.info(working_bytes);
        info.architecture = "bert".into();
        Ok(OrtEmbedder { session, tokenizer: Arc::new(tokenizer), info, token_type_ids, output, packed })
    }

    fn forward(&mut self, inputs: &[Encoding]) -> Result<Vec<Vec<f32>>> {
        let n = inputs.len();
        let len = inputs.iter().map(|e| e.len()).max().unwrap_or(0).max(1);
        let mut ids = vec![0i64; n * len];
        let mut mask = vec![0i64; n * len];
        let mut mask_u = vec![0u32; n * len];
        for (row, enc) in inputs.iter().enumerate() {
            for (col, (&id, &m)) in enc.get_ids().iter().zip(enc.get_attention_mask()).enumerate() {
                ids[row * len + col] = id as i64;
                mask[row * len + col] = m as i64;
                mask_u[row * len + col] = m;
            }
        }
        let dims = [n as i64, len as i64];
        let mut feed = vec![
            ("input_ids", Tensor::from_array((dims, ids))?.into_dyn()),
            ("attention_mask", Tensor::from_array((dims, mask))?.into_dyn()),
        ];
        if self.token_type_ids {
            feed.push(("token_type_ids", Tensor::from_array((dims, vec![0i64; n * len]))?.into_dyn()));
        }
        let outputs = self.session.run(feed)?;
        let (out_shape, hidden) = outputs[self.output.as_str()].try_extract_tensor::<f32>()?;
        let dim = self.info.dim;
        if out_shape.len() != 3 || out_shape[0] != n as i64 || out_shape[1] != len as i64 || out_shape[2] != dim as i64
        {
            return Err(Error::Inference(
                format!("output `{}` has shape {out_shape:?}; expected [{n}, {len}, {dim}]", self.output).into(),
            ));
        }
        Ok(mean_pool_normalize(hidden, &mask_u, n, len, dim))
    }
}

impl Engine for OrtEmbedder {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn tokenizer(&self) -> Arc<Tokenizer> {
        self.tokenizer.clone()
    }

    fn packs_tokens(&self) -> bool {
        self.packed
    }

    fn embed(&mut self, inputs: &[Encoding]) -> Result<Vec<Vec<f32>>> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        self.forward(inputs)
    }
}
