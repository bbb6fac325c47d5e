//! `tessera-runtime`: serve one model over HTTP. See `docs/runtime.md`.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tessera_runtime::config::Args;
use tessera_runtime::server::{AppState, serve};
use tessera_runtime::{device, engine, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init(args.log_json);
    let (dev, info) = device::open();
    tracing::info!(
        model = %args.model_name,
        dir = %args.model_dir.display(),
        device = info.kind,
        memory_free_bytes = info.memory_free_bytes,
        "Starting"
    );
    let state = AppState::new(&args.model_name, info.clone(), args.serving());
    // Listen before loading so the startup probe can say "not yet" instead of refusing.
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(listen = %listener.local_addr()?, "Listening");
    let server = tokio::spawn(serve(listener, state.clone(), shutdown_signal()));

    let dir = args.model_dir.clone();
    let free = info.memory_free_bytes;
    let started = std::time::Instant::now();
    let engine = tokio::task::spawn_blocking(move || engine::load(&dir, &dev, free)).await??;
    let model_info = Arc::new(engine.info().clone());
    state.set_loaded(engine)?;
    tracing::info!(
        kind = ?model_info.kind,
        architecture = %model_info.architecture,
        load_ms = started.elapsed().as_millis() as u64,
        "Model ready"
    );
    server.await??;
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
