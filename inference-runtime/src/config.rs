//! Command-line flags (`clap`) and the validated configuration the server runs with.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::admission::Policy;

/// Flags of `tessera-runtime`. Every flag can also come from the environment (`TESSERA_*`).
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "tessera-runtime", version, about)]
pub struct Args {
    /// Folder holding the model: `config.json` + `model.safetensors` + `tokenizer.json`
    /// (embeddings) or one `*.gguf` file (chat).
    #[arg(long, env = "TESSERA_MODEL_DIR")]
    pub model_dir: PathBuf,
    /// Name clients use in `model` fields and `/v2/models/{name}` paths.
    #[arg(long, env = "TESSERA_MODEL_NAME")]
    pub model_name: String,
    #[arg(long, env = "TESSERA_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// Embedding batcher: most inputs run in one forward pass (lowered to what memory allows).
    #[arg(long, env = "TESSERA_MAX_BATCH", default_value_t = 32)]
    pub max_batch: usize,
    /// Embedding batcher: longest a request waits for others to join its batch.
    #[arg(long, env = "TESSERA_MAX_WAIT_MS", default_value_t = 5)]
    pub max_wait_ms: u64,
    /// Requests admitted but not yet running; more are refused with 503.
    #[arg(long, env = "TESSERA_QUEUE_CAPACITY", default_value_t = 256)]
    pub queue_capacity: usize,
    /// Longest a drain waits for in-flight requests before the process exits anyway.
    #[arg(long, env = "TESSERA_DRAIN_TIMEOUT_S", default_value_t = 30)]
    pub drain_timeout_s: u64,
    /// Per-tenant limit: tokens in one request's input.
    #[arg(long, env = "TESSERA_MAX_INPUT_TOKENS", default_value_t = 8192)]
    pub max_input_tokens: u64,
    /// Per-tenant limit: tokens one chat request may generate.
    #[arg(long, env = "TESSERA_MAX_OUTPUT_TOKENS", default_value_t = 512)]
    pub max_output_tokens: u64,
    /// Per-tenant limit: requests in flight at once.
    #[arg(long, env = "TESSERA_MAX_CONCURRENT", default_value_t = 64)]
    pub max_concurrent: u32,
    /// Per-tenant limit: input + output tokens per UTC day.
    #[arg(long, env = "TESSERA_DAILY_TOKEN_BUDGET", default_value_t = 10_000_000)]
    pub daily_token_budget: u64,
    /// Largest request body accepted, in bytes (413 beyond).
    #[arg(long, env = "TESSERA_MAX_BODY_BYTES", default_value_t = 2 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Log as JSON lines.
    #[arg(long, env = "TESSERA_LOG_JSON")]
    pub log_json: bool,
}

/// Serving knobs, separate from the model location so tests can build them directly.
#[derive(Debug, Clone)]
pub struct Serving {
    pub max_batch: usize,
    pub max_wait: Duration,
    pub queue_capacity: usize,
    pub drain_timeout: Duration,
    pub max_body_bytes: usize,
    pub policy: Policy,
}

impl Default for Serving {
    fn default() -> Self {
        Serving {
            max_batch: 32,
            max_wait: Duration::from_millis(5),
            queue_capacity: 256,
            drain_timeout: Duration::from_secs(30),
            max_body_bytes: 2 * 1024 * 1024,
            policy: Policy::default(),
        }
    }
}

impl Args {
    pub fn serving(&self) -> Serving {
        Serving {
            max_batch: self.max_batch.max(1),
            max_wait: Duration::from_millis(self.max_wait_ms),
            queue_capacity: self.queue_capacity.max(1),
            drain_timeout: Duration::from_secs(self.drain_timeout_s),
            max_body_bytes: self.max_body_bytes,
            policy: Policy {
                max_input_tokens: self.max_input_tokens,
                max_output_tokens: self.max_output_tokens,
                max_concurrent: self.max_concurrent,
                daily_token_budget: self.daily_token_budget,
            },
        }
    }
}
