use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tessera_scheduler::authn::ReadAuth;
use tessera_scheduler::binder::KubeBinder;
use tessera_scheduler::cluster::Watch;
use tessera_scheduler::config::{Args, Config};
use tessera_scheduler::http::{App, Limits, Surface, serve, serve_tls};
use tessera_scheduler::state::{Scheduler, Settings};
use tessera_scheduler::{demo, leader};
use tokio::net::TcpListener;

fn init_tracing(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if cfg.log_json { builder.json().init() } else { builder.init() }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = Args::parse().validate().map_err(anyhow::Error::msg)?;
    init_tracing(&cfg);
    // Read the certificates before anything else starts, so a bad file stops the process at once.
    let tls = match &cfg.tls {
        Some(files) => Some(tessera_scheduler::tls::server_config(files).context("--tls-cert/--tls-key/--client-ca")?),
        None => None,
    };
    let policy = tessera_core::policy::by_name(&cfg.policy).context("unknown policy")?;
    let mut read_auth = None;
    let scheduler: Arc<Scheduler> = if cfg.demo {
        let (s, _) = demo::scheduler(policy, cfg.seed);
        s
    } else {
        let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
        if let Some(args) = &cfg.read_auth {
            read_auth = Some(Arc::new(ReadAuth::new(client.clone(), args).map_err(anyhow::Error::msg)?));
        }
        let watch = Watch::start(&client);
        let assignment_keys = match &cfg.assignment_keys {
            Some(path) => {
                // An unusable key file stops the process now rather than failing every bind.
                let secret = cfg.assignment_keys_secret.as_ref().map(|(ns, n)| (ns.as_str(), n.as_str()));
                let keys = tessera_scheduler::keys::load(path, secret, Some(&client)).await?;
                let ring = keys.current().context("the assignment key file (--assignment-keys)")?;
                tracing::info!(keys = ?ring.ids(), file = %path.display(), "Signing assignments");
                Some(Arc::new(keys))
            }
            None => {
                tracing::warn!("No --assignment-keys: assignments are unsigned and node agents will refuse them");
                None
            }
        };
        let settings = Settings {
            mode: "live",
            mig_timeout: cfg.mig_timeout,
            seed: cfg.seed,
            persist_reservations: true,
            http_timeout: cfg.http_timeout,
            preemption: cfg.preemption,
            assignment_keys,
            ..Default::default()
        };
        let s = Arc::new(Scheduler::new(
            tessera_core::Snapshot::default(),
            policy,
            Arc::new(KubeBinder::new(client.clone())),
            Arc::new(watch.lookup()),
            settings,
        ));
        s.set_synced(false);
        tokio::spawn(watch.sync(s.clone(), Duration::from_millis(100)));
        match &cfg.lease {
            Some((ns, name, host)) => {
                s.set_leader(false);
                tokio::spawn(leader::follow(
                    client,
                    ns.clone(),
                    name.clone(),
                    host.clone(),
                    s.clone(),
                    Duration::from_secs(2),
                ));
            }
            None => s.set_leader(true),
        }
        s
    };
    // Gang reservations lapse on their deadline even when no request comes in.
    let ticker = scheduler.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            every.tick().await;
            ticker.tick();
        }
    });
    // Gang reservation annotations are written by one task, off the request path.
    tokio::spawn(tessera_scheduler::reservations::writer(scheduler.clone()));
    // Evictions for pods kube-scheduler cannot preempt for, off the request path too.
    if !cfg.demo {
        tokio::spawn(tessera_scheduler::preemption::preemptor(scheduler.clone()));
    }
    let limits = Limits { max_body_bytes: cfg.max_body_bytes, timeout: cfg.request_timeout };
    let verbs_surface = if cfg.read_listen.is_none() { Surface::ALL } else { Surface::VERBS };
    let listener = TcpListener::bind(cfg.listen).await.with_context(|| format!("listening on {}", cfg.listen))?;
    tracing::info!(listen = %cfg.listen, tls = tls.is_some(), demo = cfg.demo, policy = %cfg.policy, "tessera-scheduler serving");
    let (tx, rx) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let mut tasks = Vec::new();
    let app = App { scheduler: scheduler.clone(), surface: verbs_surface, limits, auth: None };
    tasks.push(match tls {
        Some(tls) => tokio::spawn(serve_tls(listener, app, tls, wait(rx.clone()))),
        None => tokio::spawn(serve(listener, app, wait(rx.clone()))),
    });
    if let Some(addr) = cfg.read_listen {
        let l = TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))?;
        tracing::info!(listen = %addr, auth = read_auth.is_some(), "Read-only surface serving");
        let app = App { scheduler, surface: Surface::READ_ONLY, limits, auth: read_auth };
        tasks.push(tokio::spawn(serve(l, app, wait(rx.clone()))));
    }
    shutdown_signal().await;
    tracing::info!("Shutting down");
    let _ = tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}
