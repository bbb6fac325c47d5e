//! `tessera-runtime`: serve models over HTTP, or `plan` what they need. See `docs/runtime.md`.

use anyhow::Context;
use clap::Parser;
use tessera_runtime::config::{Cli, Command};
use tessera_runtime::server::{AppState, serve};
use tessera_runtime::{device, engine, repository, telemetry};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Plan { args, json }) => plan(&args, json),
        None => run(cli.args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The reason chain, one line; never a debug dump.
            eprintln!("tessera-runtime: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: tessera_runtime::config::Args) -> anyhow::Result<()> {
    telemetry::init(args.log_json);
    let (models, budget) = args.models()?;
    let (dev, info) = device::open();
    let state = AppState::new((dev, info.clone()), args.serving(), models, budget)?;
    tracing::info!(
        models = ?state.repository.slots().iter().map(|s| s.name()).collect::<Vec<_>>(),
        device = info.kind,
        memory_free_bytes = info.memory_free_bytes,
        memory_budget_bytes = state.repository.budget().total(),
        "Starting"
    );
    // Listen before loading so the startup probe can say "not yet" instead of refusing.
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(listen = %listener.local_addr()?, "Listening");
    let server = tokio::spawn(serve(listener, state.clone(), shutdown_signal()));
    let s = state.clone();
    if let Err(error) = tokio::task::spawn_blocking(move || s.load_startup()).await? {
        tracing::error!(%error, "Startup failed");
        return Err(error.into());
    }
    server.await??;
    Ok(())
}

/// Prints each model's plan, their sum and the pod's `tessera.dev/gpu-memory`.
fn plan(args: &tessera_runtime::config::Args, json: bool) -> anyhow::Result<()> {
    let (models, _) = args.models()?;
    let serving = args.serving();
    let mut rows = Vec::new();
    for spec in &models {
        let plan = engine::plan(spec, &serving.for_model(spec))?;
        rows.push((spec, plan));
    }
    let sum: u64 = rows.iter().filter(|(s, _)| s.load).map(|(_, p)| p.total_bytes()).sum();
    let all: u64 = rows.iter().map(|(_, p)| p.total_bytes()).sum();
    let quantity = |b: u64| format!("{}Mi", b.div_ceil(1 << 20));
    if json {
        let models: Vec<_> = rows
            .iter()
            .map(
                |(s, p)| serde_json::json!({"name": s.name, "load": s.load, "plan": p, "total_bytes": p.total_bytes()}),
            )
            .collect();
        let out = serde_json::json!({
            "models": models,
            "startup_bytes": sum,
            "all_bytes": all,
            "cuda_context_bytes": device::CUDA_CONTEXT_BYTES,
            "headroom": device::HEADROOM,
            "gpu_memory": quantity(device::pod_gpu_memory(sum)),
            "gpu_memory_all_loaded": quantity(device::pod_gpu_memory(all)),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let mib = repository::mib;
    println!(
        "{:<20} {:<7} {:<10} {:>12} {:>12} {:>12} {:>12}  at start",
        "model", "engine", "kind", "weights", "working", "overhead", "total"
    );
    for (s, p) in &rows {
        let kind = serde_json::to_value(p.kind)?.as_str().unwrap_or_default().to_string();
        println!(
            "{:<20} {:<7} {:<10} {:>12} {:>12} {:>12} {:>12}  {}",
            s.name,
            p.engine.as_str(),
            kind,
            mib(p.weights_bytes),
            mib(p.working_bytes),
            mib(p.overhead_bytes),
            mib(p.total_bytes()),
            if s.load { "yes" } else { "no" }
        );
    }
    println!(
        "models loaded at start: {}; CUDA context {}; headroom {} %",
        mib(sum),
        mib(device::CUDA_CONTEXT_BYTES),
        (device::HEADROOM * 100.0).round()
    );
    println!("tessera.dev/gpu-memory: \"{}\"", quantity(device::pod_gpu_memory(sum)));
    if all != sum {
        println!("with every configured model loaded: \"{}\"", quantity(device::pod_gpu_memory(all)));
    }
    Ok(())
}

/// SIGTERM (Kubernetes) or Ctrl-C starts a drain.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
