//! `kubectl-tessera`: installed on the PATH, kubectl runs it as `kubectl tessera ...`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use kubectl_tessera::source::{Kubectl, Source};
use kubectl_tessera::{capture, explain, status};

/// tessera's kubectl plugin: GPU status, why a pod is pending, cluster capture.
#[derive(Debug, Parser)]
#[command(name = "kubectl-tessera", version)]
struct Cli {
    /// Talk to the scheduler's read-only API directly at this http:// URL (a port-forward, or
    /// `tessera-scheduler --demo`), instead of through kubectl.
    #[arg(long, global = true, env = "TESSERA_SERVER")]
    server: Option<String>,
    /// Namespace of the tessera-scheduler Service.
    #[arg(long, global = true, default_value = "tessera-system")]
    scheduler_namespace: String,
    /// Name of the tessera-scheduler Service.
    #[arg(long, global = true, default_value = "tessera-scheduler")]
    scheduler_service: String,
    /// Port (name or number) of that Service's read-only API.
    #[arg(long, global = true, default_value = "8889")]
    scheduler_port: String,
    /// How kubectl reaches the Service when --server is not given: `port-forward` (works with the
    /// scheduler's token check: the forward arrives on the pod's loopback) or `proxy` (the API
    /// server's service proxy; only where the scheduler runs with --read-auth=none).
    #[arg(long, global = true, value_enum, default_value = "port-forward")]
    via: Via,
    /// The kubectl to run.
    #[arg(long, global = true, default_value = "kubectl", env = "KUBECTL")]
    kubectl: PathBuf,
    /// kubeconfig context to use.
    #[arg(long, global = true)]
    context: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Via {
    PortForward,
    Proxy,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Nodes, GPUs and MIG slices, with the pod holding each, and packing per pool.
    Status {
        /// Only this node.
        #[arg(long)]
        node: Option<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Why a pod is pending: its GPU demand and every node's verdict at the last filter.
    Explain {
        /// The pod, as NAME or NAMESPACE/NAME.
        pod: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Dump nodes, pods, GpuNodes and PodGroups as one JSON document (env values removed).
    Capture {
        /// Write here instead of stdout.
        #[arg(short = 'f', long)]
        file: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let mut kubectl = Kubectl::new(&cli.kubectl);
    if let Some(ctx) = &cli.context {
        kubectl.global_args = vec!["--context".into(), ctx.clone()];
    }
    let source = || -> Result<Source> {
        match &cli.server {
            Some(url) => Source::direct(url),
            None => {
                let (kubectl, namespace, service, port) = (
                    kubectl.clone(),
                    cli.scheduler_namespace.clone(),
                    cli.scheduler_service.clone(),
                    cli.scheduler_port.clone(),
                );
                Ok(match cli.via {
                    Via::PortForward => Source::PortForward { kubectl, namespace, service, port },
                    Via::Proxy => Source::Proxy { kubectl, namespace, service, port },
                })
            }
        }
    };
    let text = match &cli.command {
        Cmd::Status { node, output } => {
            let view = source()?.get_json("/api/v1/cluster")?;
            match output {
                Output::Json => pretty(&view)?,
                Output::Table => status::render(&decode(view, "/api/v1/cluster")?, node.as_deref()),
            }
        }
        Cmd::Explain { pod, namespace, output } => {
            let (ns, name) = pod.split_once('/').unwrap_or((namespace, pod));
            let path = format!("/api/v1/explain/{ns}/{name}");
            let e = source()?.get_json(&path)?;
            match output {
                Output::Json => pretty(&e)?,
                Output::Table => explain::render(&decode(e, &path)?),
            }
        }
        Cmd::Capture { file } => {
            let doc = pretty(&capture::capture(&kubectl)?)?;
            if let Some(path) = file {
                std::fs::write(path, doc).with_context(|| format!("writing {}", path.display()))?;
                return Ok(());
            }
            doc
        }
    };
    std::io::stdout().lock().write_all(text.as_bytes())?;
    Ok(())
}

/// The scheduler's answer as its schema ([`tessera_api::views`]).
fn decode<T: serde::de::DeserializeOwned>(v: serde_json::Value, path: &str) -> Result<T> {
    serde_json::from_value(v).with_context(|| format!("{path}: the answer is not the scheduler's schema"))
}

fn pretty(v: &serde_json::Value) -> Result<String> {
    Ok(serde_json::to_string_pretty(v)? + "\n")
}
