//! `tessera-mig-manager`: the tessera node agent (one DaemonSet pod per GPU node).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use tessera_api::signing::Keys;
use tessera_mig_manager::agent::{Agent, Parts};
use tessera_mig_manager::device_plugin::server::{PluginConfig, run as run_plugin};
use tessera_mig_manager::device_plugin::{Allocations, DEFAULT_DIR, DEFAULT_SHARE_SLOTS, Plugin, SOCKET_NAME, Trust};
use tessera_mig_manager::events::{KubeEvents, MemoryEvents, RefusalSink};
use tessera_mig_manager::gpu::fake::FakeGpus;
use tessera_mig_manager::gpu::null::NullBackend;
use tessera_mig_manager::gpu::nvml::NvmlBackend;
use tessera_mig_manager::gpu::{GpuBackend, Observed};
use tessera_mig_manager::podresources::{DEFAULT_SOCKET as DEFAULT_POD_RESOURCES, KubeletResources, KubeletSocket};
use tessera_mig_manager::pods::{KubePods, PodSource, StaticPods};
use tessera_mig_manager::status::{KubeNodeApi, LocalNodeApi, NodeApi, watch_spec};
use tessera_mig_manager::{http, metrics};
use tokio::sync::{Notify, watch};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BackendKind {
    /// NVML, or the null backend when NVML cannot start.
    Auto,
    /// NVML, or the null backend when NVML cannot start.
    Nvml,
    /// Fake GPUs (see --fake-gpus).
    Fake,
    /// No GPUs: report "no NVML" and serve nothing.
    Null,
}

/// tessera node agent: NVML discovery, safe MIG reconfiguration, kubelet device plugin, metrics.
#[derive(Debug, Parser)]
#[command(name = "tessera-mig-manager", version)]
struct Cli {
    /// This node's name (the GpuNode is named after it).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    #[arg(long, value_enum, default_value = "auto", env = "TESSERA_BACKEND")]
    backend: BackendKind,
    /// Fake GPUs for `--backend fake`: groups of `<product>x<count>[:mig]`, e.g. `h100x8:mig`.
    #[arg(long, default_value = "h100x8:mig")]
    fake_gpus: String,
    /// With `--backend fake`: MIG mode changes wait for a GPU reset, which the agent does once
    /// nothing uses the GPU.
    #[arg(long)]
    fake_reset_required: bool,
    /// Path of libnvidia-ml.so.1 when not on the loader path.
    #[arg(long, env = "TESSERA_NVML_LIB")]
    nvml_lib: Option<PathBuf>,
    /// Run without a Kubernetes API: no GpuNode, no pods; status is served on /status.
    #[arg(long)]
    standalone: bool,
    /// With --standalone: a JSON GpuNodeSpec to apply, re-read every pass.
    #[arg(long, requires = "standalone")]
    spec_file: Option<PathBuf>,
    /// kubelet's device-plugin directory.
    #[arg(long, default_value = DEFAULT_DIR)]
    device_plugin_dir: PathBuf,
    /// Do not serve the device plugin.
    #[arg(long)]
    no_device_plugin: bool,
    /// kubelet's PodResources socket: tells the device plugin which pod kubelet is admitting and
    /// which devices every container holds.
    #[arg(long, default_value = DEFAULT_POD_RESOURCES, env = "TESSERA_POD_RESOURCES_SOCKET")]
    pod_resources_socket: PathBuf,
    /// Do not use kubelet's PodResources API (then only one tessera pod at a time can be admitted
    /// on the node; more are refused, never swapped).
    #[arg(long)]
    no_pod_resources: bool,
    /// Key file of the assignment signatures (the mounted `tessera-assignment-keys` Secret), one
    /// `<id> <base64 secret>` per line; re-read when it changes.
    #[arg(long, env = "TESSERA_ASSIGNMENT_KEYS")]
    assignment_keys: Option<PathBuf>,
    /// Serve assignments without checking their signature (anyone who can create a pod on the
    /// node can then take any of its GPUs). For local trials only.
    #[arg(long, conflicts_with = "assignment_keys")]
    insecure_accept_unsigned: bool,
    /// Admission slots advertised per whole-mode GPU: how many `tessera.dev/gpu-share` pods
    /// kubelet admits on one GPU.
    #[arg(long, default_value_t = DEFAULT_SHARE_SLOTS)]
    share_slots: u32,
    /// Address of /metrics and /healthz.
    #[arg(long, default_value = "0.0.0.0:9400")]
    metrics_addr: SocketAddr,
    /// Seconds between reconcile passes.
    #[arg(long, default_value_t = 10)]
    resync_secs: u64,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

fn init_telemetry(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn backend(cli: &Cli) -> anyhow::Result<Arc<dyn GpuBackend>> {
    Ok(match cli.backend {
        BackendKind::Fake => {
            let fake = FakeGpus::parse(&cli.fake_gpus)?;
            Arc::new(if cli.fake_reset_required { fake.with_reset_required() } else { fake })
        }
        BackendKind::Null => Arc::new(NullBackend::new("the null backend was selected")),
        BackendKind::Auto | BackendKind::Nvml => {
            match NvmlBackend::init(cli.nvml_lib.as_deref().map(|p| p.as_os_str())) {
                Ok(b) => Arc::new(b),
                Err(e) => {
                    error!(error = %e, "NVML cannot start; reporting no NVML and serving no devices");
                    Arc::new(NullBackend::new(e.to_string()))
                }
            }
        }
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_telemetry(cli.log_json);
    let backend = backend(&cli)?;
    info!(node = %cli.node_name, backend = backend.name(), standalone = cli.standalone, "Starting tessera-mig-manager");

    let trust = match (&cli.assignment_keys, cli.insecure_accept_unsigned || cli.standalone) {
        (Some(path), _) => {
            let keys = Keys::file(path);
            // On first install the scheduler generates the key into the Secret and kubelet
            // updates the mounted file a minute or so later: wait for it before serving devices.
            let mut waited = 0u32;
            let ring = loop {
                match keys.current() {
                    Ok(ring) => break ring,
                    Err(error) => {
                        if waited.is_multiple_of(30) {
                            warn!(%error, "Waiting for a usable assignment key file before serving devices");
                        }
                        waited = waited.saturating_add(1);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            };
            info!(keys = ?ring.ids(), file = %path.display(), "Assignment signatures are checked");
            Trust::Signed(Arc::new(keys))
        }
        (None, true) => {
            warn!("Assignment signatures are NOT checked: any pod on this node can take any GPU");
            Trust::Unchecked
        }
        (None, false) => anyhow::bail!(
            "--assignment-keys is required (the mounted tessera-assignment-keys Secret); \
             --insecure-accept-unsigned turns the check off for local trials"
        ),
    };
    let kubelet_resources: Option<Arc<dyn KubeletResources>> = (!cli.no_pod_resources && !cli.standalone)
        .then(|| Arc::new(KubeletSocket::new(&cli.pod_resources_socket)) as Arc<dyn KubeletResources>);
    if kubelet_resources.is_none() {
        warn!("kubelet's PodResources API is not used: one tessera pod at a time can be admitted on this node");
    }

    let (registry, metrics) = metrics::registry();
    let metrics = Arc::new(metrics);
    let allocations = Arc::new(Allocations::default());
    let local = cli.standalone.then(|| Arc::new(LocalNodeApi::new(cli.spec_file.clone())));
    let mut kube_client = None;
    let (node_api, pods): (Arc<dyn NodeApi>, Arc<dyn PodSource>) = match &local {
        Some(l) => (l.clone(), Arc::new(StaticPods::default())),
        None => {
            let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
            kube_client = Some(client.clone());
            (
                Arc::new(KubeNodeApi::new(client.clone(), &cli.node_name)),
                Arc::new(KubePods::new(client, &cli.node_name)),
            )
        }
    };

    let (inventory, inventory_rx) = watch::channel(Observed::default());
    let serve_devices = !cli.no_device_plugin && backend.name() != "null";
    let mut registered_rx = None;
    let plugin_task = if serve_devices {
        std::fs::create_dir_all(&cli.device_plugin_dir)
            .with_context(|| format!("creating {}", cli.device_plugin_dir.display()))?;
        let (reg_tx, reg_rx) = watch::channel(false);
        registered_rx = Some(reg_rx);
        let refusals: Arc<dyn RefusalSink> = match &kube_client {
            Some(c) => Arc::new(KubeEvents::new(c.clone(), &cli.node_name)),
            None => Arc::new(MemoryEvents::default()),
        };
        let mut plugin =
            Plugin::new(&cli.node_name, inventory_rx, pods.clone(), allocations.clone(), Some(metrics.clone()))
                .with_trust(trust.clone())
                .with_refusals(refusals)
                .with_share_slots(cli.share_slots);
        if let Some(k) = &kubelet_resources {
            plugin = plugin.with_kubelet(k.clone());
        }
        let cfg = PluginConfig {
            dir: cli.device_plugin_dir.clone(),
            socket_name: SOCKET_NAME.to_owned(),
            resource: tessera_api::annotations::RESOURCE_GPU.to_owned(),
            poll: Duration::from_secs(1),
        };
        Some(tokio::spawn(run_plugin(cfg, plugin, reg_tx)))
    } else {
        if backend.name() == "null" {
            warn!("No GPUs can be reached; the device plugin is not served");
        }
        None
    };

    let http_state = http::State { registry: Arc::new(registry), local };
    let http_task = tokio::spawn(http::serve(cli.metrics_addr, http_state));
    info!(addr = %cli.metrics_addr, "Serving /metrics and /healthz");

    let agent = Agent::new(Parts {
        node: cli.node_name.clone(),
        backend,
        node_api,
        pods,
        allocations,
        inventory,
        registered: registered_rx,
        metrics,
        kubelet: kubelet_resources,
    });
    let trigger = Arc::new(Notify::new());
    if let Some(client) = kube_client {
        tokio::spawn(watch_spec(client, cli.node_name.clone(), trigger.clone()));
    }
    let agent_task = tokio::spawn(agent.run(Duration::from_secs(cli.resync_secs.max(1)), trigger));

    let plugin_done = async {
        match plugin_task {
            Some(t) => t.await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = plugin_done => anyhow::bail!("device plugin stopped: {r:?}"),
        r = http_task => anyhow::bail!("HTTP server stopped: {r:?}"),
        r = agent_task => anyhow::bail!("agent loop stopped: {r:?}"),
        _ = shutdown_signal() => info!("Shutting down"),
    }
    Ok(())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}
