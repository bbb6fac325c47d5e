//! Serving the plugin socket and registering with kubelet, again whenever kubelet restarts.
//!
//! kubelet wipes the device-plugin directory when it restarts and recreates `kubelet.sock`.
//! The loop below polls both sockets: when ours disappears or kubelet's is a new file, it
//! stops the server, binds a fresh socket and registers again.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{oneshot, watch};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Endpoint, Server, Uri};
use tower::service_fn;
use tracing::{debug, info, warn};

use super::v1beta1::device_plugin_server::DevicePluginServer;
use super::v1beta1::registration_client::RegistrationClient;
use super::v1beta1::{DevicePluginOptions, RegisterRequest};
use super::{KUBELET_SOCKET, Plugin, VERSION};
use crate::error::{Error, Result};

/// Where and as what the plugin serves.
#[derive(Clone, Debug)]
pub struct PluginConfig {
    /// The device-plugin directory (kubelet's is `/var/lib/kubelet/device-plugins`).
    pub dir: PathBuf,
    /// Our socket's file name in `dir`.
    pub socket_name: String,
    /// The extended resource, `tessera.dev/gpu`.
    pub resource: String,
    /// How often to check the sockets and retry registration.
    pub poll: Duration,
}

/// Opens a gRPC channel over a unix socket.
pub async fn connect_unix(path: &Path) -> Result<tonic::transport::Channel> {
    let p = path.to_path_buf();
    // The URI is required by the API but unused: the connector dials the socket.
    Endpoint::from_static("http://[::1]:50051")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(service_fn(move |_: Uri| {
            let p = p.clone();
            async move { UnixStream::connect(p).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|source| Error::KubeletConnect { path: path.display().to_string(), source })
}

/// Calls kubelet's `Register`.
pub async fn register(cfg: &PluginConfig) -> Result<()> {
    let channel = connect_unix(&cfg.dir.join(KUBELET_SOCKET)).await?;
    RegistrationClient::new(channel)
        .register(RegisterRequest {
            version: VERSION.to_owned(),
            endpoint: cfg.socket_name.clone(),
            resource_name: cfg.resource.clone(),
            options: Some(DevicePluginOptions { pre_start_required: false, get_preferred_allocation_available: true }),
        })
        .await
        .map_err(|s| Error::Register { resource: cfg.resource.clone(), source: Box::new(s) })?;
    Ok(())
}

/// Identity of a file (device, inode), to notice a recreated socket.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Serves the plugin and keeps it registered, forever. `registered` tells whether kubelet
/// accepted the current registration.
pub async fn run(cfg: PluginConfig, plugin: Plugin, registered: watch::Sender<bool>) -> Result<()> {
    let socket = cfg.dir.join(&cfg.socket_name);
    let kubelet = cfg.dir.join(KUBELET_SOCKET);
    loop {
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)
            .map_err(|source| Error::PluginSocket { path: socket.display().to_string(), source })?;
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(
            Server::builder().add_service(DevicePluginServer::new(plugin.clone())).serve_with_incoming_shutdown(
                UnixListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            ),
        );
        info!(socket = %socket.display(), resource = %cfg.resource, "Device plugin serving");

        // Register, retrying until kubelet answers (or our socket is wiped).
        let mut attempts: u32 = 0;
        let kubelet_id = loop {
            if file_id(&socket).is_none() {
                break None;
            }
            let id = file_id(&kubelet);
            match register(&cfg).await {
                Ok(()) => {
                    info!(resource = %cfg.resource, "Registered with kubelet");
                    registered.send_replace(true);
                    break id;
                }
                Err(error) => {
                    registered.send_replace(false);
                    // Loud on the first failure and then once a minute or so; quiet in between.
                    if attempts.is_multiple_of(60) {
                        warn!(%error, attempts, "Registration with kubelet failed; will retry");
                    } else {
                        debug!(%error, attempts, "Registration with kubelet failed; will retry");
                    }
                    attempts = attempts.saturating_add(1);
                    tokio::time::sleep(cfg.poll).await;
                }
            }
        };

        // Watch for a kubelet restart.
        if kubelet_id.is_some() {
            loop {
                tokio::time::sleep(cfg.poll).await;
                if file_id(&socket).is_none() || file_id(&kubelet) != kubelet_id {
                    info!("kubelet socket changed; registering again");
                    registered.send_replace(false);
                    break;
                }
                if server.is_finished() {
                    break;
                }
            }
        }
        let _ = stop.send(());
        match server.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Error::Serve(e)),
            Err(e) => return Err(Error::Task(e.to_string())),
        }
    }
}
