//! Command-line flags (`clap`), the model list (flags and/or a YAML/JSON file) and the validated
//! configuration the server runs with.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::admission::Policy;
use crate::{Error, Result};

/// `tessera-runtime [FLAGS]` serves; `tessera-runtime plan [FLAGS]` prints what the models need.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "tessera-runtime", version, about, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub args: Args,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Print the memory each model needs and the pod's `tessera.dev/gpu-memory`; load nothing.
    Plan {
        #[command(flatten)]
        args: Args,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Whether `/v2/repository/models/{name}/load` and `/unload` may change what is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ModelControl {
    /// The models loaded at start stay loaded; load and unload answer 403.
    #[default]
    None,
    /// Clients may load and unload the configured models (never other folders).
    Explicit,
}

/// Flags of `tessera-runtime`. Every flag can also come from the environment (`TESSERA_*`).
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// One model: folder holding `config.json` + `model.safetensors` (or `model.onnx`) +
    /// `tokenizer.json` (embeddings) or one `*.gguf` file (chat). Needs `--model-name`.
    #[arg(long, env = "TESSERA_MODEL_DIR", requires = "model_name")]
    pub model_dir: Option<PathBuf>,
    /// Name clients use in `model` fields and `/v2/models/{name}` paths (with `--model-dir`).
    #[arg(long, env = "TESSERA_MODEL_NAME", requires = "model_dir")]
    pub model_name: Option<String>,
    /// A model to serve, repeatable: `name=N,dir=D[,engine=candle|ort][,max_batch=32]
    /// [,max_wait_ms=5][,queue_capacity=256][,max_input_tokens=..][,max_output_tokens=..]
    /// [,max_concurrent=..][,daily_token_budget=..][,load=false]`.
    #[arg(long = "model", value_name = "SPEC")]
    pub models: Vec<String>,
    /// YAML or JSON file: `{memory_budget: "4Gi", models: [{name, dir, engine, ...}]}`.
    #[arg(long, env = "TESSERA_CONFIG")]
    pub config: Option<PathBuf>,
    /// Memory the models may use, as a Kubernetes quantity (`6Gi`, `512Mi`, bytes). Default:
    /// the device's free memory less 5 % (CUDA: the GPU or MIG slice; CPU: available memory,
    /// bounded by the cgroup limit).
    #[arg(long, env = "TESSERA_MEMORY_BUDGET")]
    pub memory_budget: Option<String>,
    /// Whether clients may load and unload models through the KServe repository routes.
    #[arg(long, env = "TESSERA_MODEL_CONTROL", value_enum, default_value_t = ModelControl::None)]
    pub model_control: ModelControl,
    /// ONNX Runtime shared library for models with `engine=ort`. Default: `ORT_DYLIB_PATH`, else
    /// `libonnxruntime.so` from the loader's search path.
    #[arg(long, env = "TESSERA_ORT_LIBRARY")]
    pub ort_library: Option<PathBuf>,
    /// ONNX Runtime intra-op threads, one pool shared by every ORT model (0: ORT's default).
    #[arg(long, env = "TESSERA_ORT_THREADS", default_value_t = 0)]
    pub ort_threads: usize,
    #[arg(long, env = "TESSERA_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// Embedding batcher: most inputs run in one forward pass (lowered to what memory allows).
    #[arg(long, env = "TESSERA_MAX_BATCH", default_value_t = 32)]
    pub max_batch: usize,
    /// Embedding batcher: longest a request waits for others to join its batch.
    #[arg(long, env = "TESSERA_MAX_WAIT_MS", default_value_t = 5)]
    pub max_wait_ms: u64,
    /// Requests admitted but not yet running, per model; more are refused with 503.
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

/// Which engine runs a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// candle: BERT-family safetensors (embeddings) and Llama-family GGUF (chat).
    Candle,
    /// ONNX Runtime: BERT-family `model.onnx` (embeddings).
    Ort,
}

impl EngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Candle => "candle",
            EngineKind::Ort => "ort",
        }
    }
}

fn yes() -> bool {
    true
}

/// One model of the repository, as configured. Unset knobs take the process-wide flags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: String,
    pub dir: PathBuf,
    /// Default: `ort` when the folder has `model.onnx` and no `model.safetensors`, else `candle`.
    #[serde(default)]
    pub engine: Option<EngineKind>,
    #[serde(default)]
    pub max_batch: Option<usize>,
    #[serde(default)]
    pub max_wait_ms: Option<u64>,
    #[serde(default)]
    pub queue_capacity: Option<usize>,
    #[serde(default)]
    pub max_input_tokens: Option<u64>,
    #[serde(default)]
    pub max_output_tokens: Option<u64>,
    #[serde(default)]
    pub max_concurrent: Option<u32>,
    #[serde(default)]
    pub daily_token_budget: Option<u64>,
    /// Load at start (default). `false`: listed in the repository, loaded on request.
    #[serde(default = "yes")]
    pub load: bool,
}

impl ModelSpec {
    pub fn new(name: &str, dir: impl Into<PathBuf>) -> Self {
        ModelSpec {
            name: name.to_string(),
            dir: dir.into(),
            engine: None,
            max_batch: None,
            max_wait_ms: None,
            queue_capacity: None,
            max_input_tokens: None,
            max_output_tokens: None,
            max_concurrent: None,
            daily_token_budget: None,
            load: true,
        }
    }

    pub fn with_engine(mut self, engine: EngineKind) -> Self {
        self.engine = Some(engine);
        self
    }

    /// Parses the `--model` flag: comma-separated `key=value` pairs, keys as in the config file
    /// (`-` and `_` both accepted).
    pub fn parse_flag(s: &str) -> Result<Self> {
        let bad = |why: String| Error::BadRequest(format!("--model `{s}`: {why}"));
        let mut map = serde_json::Map::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| bad(format!("`{part}` is not key=value")))?;
            let k = k.trim().replace('-', "_");
            let v = v.trim();
            let value = match k.as_str() {
                "name" | "dir" | "engine" => serde_json::Value::String(v.to_string()),
                "load" => match v {
                    "true" => true.into(),
                    "false" => false.into(),
                    _ => return Err(bad(format!("load `{v}`: expected true or false"))),
                },
                "max_batch" | "max_wait_ms" | "queue_capacity" | "max_input_tokens" | "max_output_tokens"
                | "max_concurrent" | "daily_token_budget" => match v.parse::<u64>() {
                    Ok(n) => n.into(),
                    Err(_) => return Err(bad(format!("{k} `{v}`: expected a whole number"))),
                },
                _ => return Err(bad(format!("unknown key `{k}`"))),
            };
            if map.insert(k.clone(), value).is_some() {
                return Err(bad(format!("`{k}` given twice")));
            }
        }
        serde_json::from_value(serde_json::Value::Object(map)).map_err(|e| bad(e.to_string()))
    }
}

/// The `--config` file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub memory_budget: Option<String>,
    #[serde(default)]
    pub models: Vec<ModelSpec>,
}

impl ConfigFile {
    pub fn read(path: &Path) -> Result<Self> {
        let bad = |why: String| Error::BadRequest(format!("--config {}: {why}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        // YAML 1.2 is a superset of JSON: one parser reads both.
        serde_yaml::from_str(&text).map_err(|e| bad(e.to_string()))
    }
}

/// Parses a Kubernetes-style byte quantity: `512Mi`, `6Gi`, `1.5G`, `1000000`.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim() {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let v = num * mult;
    (v.is_finite() && v >= 0.0 && v < u64::MAX as f64).then_some(v.round() as u64)
}

/// Model names end up in URL paths and metric labels: keep them plain.
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::BadRequest(format!("model name `{name}`: use 1-64 letters, digits, `-`, `_` or `.` (not first)")))
    }
}

/// Serving knobs shared by every model (defaults for the per-model ones) and the process-wide
/// ones. Tests build it directly.
#[derive(Debug, Clone)]
pub struct Serving {
    pub max_batch: usize,
    pub max_wait: Duration,
    pub queue_capacity: usize,
    pub drain_timeout: Duration,
    pub max_body_bytes: usize,
    pub policy: Policy,
    pub model_control: ModelControl,
    pub ort_library: Option<PathBuf>,
    pub ort_threads: usize,
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
            model_control: ModelControl::None,
            ort_library: None,
            ort_threads: 0,
        }
    }
}

/// One model's effective knobs: its spec over the process-wide defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelServing {
    pub max_batch: usize,
    pub max_wait: Duration,
    pub queue_capacity: usize,
    pub policy: Policy,
}

impl Serving {
    pub fn for_model(&self, spec: &ModelSpec) -> ModelServing {
        let p = &self.policy;
        ModelServing {
            max_batch: spec.max_batch.unwrap_or(self.max_batch).max(1),
            max_wait: spec.max_wait_ms.map_or(self.max_wait, Duration::from_millis),
            queue_capacity: spec.queue_capacity.unwrap_or(self.queue_capacity).max(1),
            policy: Policy {
                max_input_tokens: spec.max_input_tokens.unwrap_or(p.max_input_tokens),
                max_output_tokens: spec.max_output_tokens.unwrap_or(p.max_output_tokens),
                max_concurrent: spec.max_concurrent.unwrap_or(p.max_concurrent),
                daily_token_budget: spec.daily_token_budget.unwrap_or(p.daily_token_budget),
            },
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
            model_control: self.model_control,
            ort_library: self.ort_library.clone(),
            ort_threads: self.ort_threads,
        }
    }

    /// The model list (config file first, then `--model` flags, then `--model-dir`) and the
    /// explicit memory budget (flag over file), validated: at least one model, unique names.
    pub fn models(&self) -> Result<(Vec<ModelSpec>, Option<u64>)> {
        let file = match &self.config {
            Some(p) => ConfigFile::read(p)?,
            None => ConfigFile::default(),
        };
        let mut models = file.models;
        for f in &self.models {
            models.push(ModelSpec::parse_flag(f)?);
        }
        if let (Some(dir), Some(name)) = (&self.model_dir, &self.model_name) {
            models.push(ModelSpec::new(name, dir));
        }
        check_models(&models)?;
        let budget = match self.memory_budget.as_ref().or(file.memory_budget.as_ref()) {
            Some(q) => Some(parse_bytes(q).ok_or_else(|| {
                Error::BadRequest(format!("memory budget `{q}`: expected a quantity such as 4Gi or 512Mi"))
            })?),
            None => None,
        };
        Ok((models, budget))
    }
}

/// At least one model, valid and unique names.
pub fn check_models(models: &[ModelSpec]) -> Result<()> {
    if models.is_empty() {
        return Err(Error::BadRequest("no model: give --model-dir and --model-name, --model or --config".into()));
    }
    let mut seen = std::collections::BTreeSet::new();
    for m in models {
        check_name(&m.name)?;
        if !seen.insert(m.name.as_str()) {
            return Err(Error::BadRequest(format!("model name `{}` is configured twice", m.name)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn model_flags_parse_with_overrides_and_say_what_is_wrong() {
        let m = ModelSpec::parse_flag("name=minilm,dir=/m/minilm,engine=ort,max-batch=16,load=false").unwrap();
        assert_eq!(m.name, "minilm");
        assert_eq!(m.dir, PathBuf::from("/m/minilm"));
        assert_eq!(m.engine, Some(EngineKind::Ort));
        assert_eq!(m.max_batch, Some(16));
        assert!(!m.load);
        let e = ModelSpec::parse_flag("name=a,dir=/x,engine=tf").unwrap_err().to_string();
        assert!(e.contains("unknown variant `tf`"), "{e}");
        let e = ModelSpec::parse_flag("name=a,dir=/x,max_batch=lots").unwrap_err().to_string();
        assert!(e.contains("max_batch `lots`: expected a whole number"), "{e}");
        let e = ModelSpec::parse_flag("name=a,dir=/x,colour=red").unwrap_err().to_string();
        assert!(e.contains("unknown key `colour`"), "{e}");
        let e = ModelSpec::parse_flag("name=a,dir=/x,max_concurrent=99999999999").unwrap_err().to_string();
        assert!(e.contains("max_concurrent"), "{e}");
        let e = ModelSpec::parse_flag("name=a").unwrap_err().to_string();
        assert!(e.contains("missing field `dir`"), "{e}");
        let e = ModelSpec::parse_flag("name=a,name=b,dir=/x").unwrap_err().to_string();
        assert!(e.contains("given twice"), "{e}");
    }

    #[test]
    fn config_file_flags_and_single_model_combine_with_unique_names() {
        let dir = std::env::temp_dir().join(format!("tessera-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("models.yaml");
        std::fs::write(
            &file,
            "memory_budget: 2Gi\nmodels:\n  - {name: embed, dir: /m/minilm, engine: candle}\n  - name: guard\n    dir: /m/guard\n    max_concurrent: 4\n    load: false\n",
        )
        .unwrap();
        let cli = Cli::parse_from([
            "tessera-runtime",
            "--config",
            file.to_str().unwrap(),
            "--model",
            "name=onnx,dir=/m/onnx,engine=ort",
        ]);
        let (models, budget) = cli.args.models().unwrap();
        assert_eq!(models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["embed", "guard", "onnx"]);
        assert_eq!(models[1].max_concurrent, Some(4));
        assert!(!models[1].load);
        assert_eq!(budget, Some(2 << 30));
        let serving = cli.args.serving();
        assert_eq!(serving.for_model(&models[1]).policy.max_concurrent, 4);
        assert_eq!(serving.for_model(&models[0]).policy.max_concurrent, 64);

        let cli = Cli::parse_from([
            "tessera-runtime",
            "--config",
            file.to_str().unwrap(),
            "--model",
            "name=embed,dir=/other",
            "--memory-budget",
            "1.5x",
        ]);
        let e = cli.args.models().unwrap_err().to_string();
        assert!(e.contains("`embed` is configured twice"), "{e}");
        std::fs::write(&file, "models: [{name: a, dir: /x, engin: ort}]").unwrap();
        let cli = Cli::parse_from(["tessera-runtime", "--config", file.to_str().unwrap()]);
        let e = cli.args.models().unwrap_err().to_string();
        assert!(e.contains("unknown field `engin`"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();

        let cli = Cli::parse_from(["tessera-runtime"]);
        assert!(cli.args.models().unwrap_err().to_string().contains("no model"));
        let cli = Cli::parse_from(["tessera-runtime", "--model", "name=../etc,dir=/x"]);
        assert!(cli.args.models().unwrap_err().to_string().contains("model name `../etc`"));
        let cli =
            Cli::parse_from(["tessera-runtime", "--model-dir", "/m", "--model-name", "m", "--memory-budget", "9Q"]);
        assert!(cli.args.models().unwrap_err().to_string().contains("memory budget `9Q`"));
    }

    #[test]
    fn plan_is_a_subcommand_and_serving_stays_the_default() {
        let cli = Cli::parse_from(["tessera-runtime", "plan", "--model", "name=a,dir=/x", "--json"]);
        assert!(matches!(cli.command, Some(Command::Plan { json: true, .. })));
        let cli = Cli::parse_from(["tessera-runtime", "--model-dir", "/m", "--model-name", "m"]);
        assert!(cli.command.is_none());
        assert_eq!(cli.args.models().unwrap().0, vec![ModelSpec::new("m", "/m")]);
    }

    #[test]
    fn byte_quantities() {
        assert_eq!(parse_bytes("512Mi"), Some(512 << 20));
        assert_eq!(parse_bytes("6Gi"), Some(6 << 30));
        assert_eq!(parse_bytes("1.5G"), Some(1_500_000_000));
        assert_eq!(parse_bytes("1000"), Some(1000));
        assert_eq!(parse_bytes("Gi"), None);
        assert_eq!(parse_bytes("-1Gi"), None);
        assert_eq!(parse_bytes("4GB"), None);
    }
}
