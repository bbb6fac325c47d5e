//! The suite's private network: the whole kubelet suite (etcd, kube-apiserver, kubelet,
//! containerd, the pods and the test's own client) runs in a network namespace of its own, so
//! pods can have addresses the test and kubelet reach without touching the host's network.
//!
//! In that namespace:
//! - `lo` holds 127.0.0.1/16 (not /8: 127.96.0.0/16 and 127.97.0.0/16 are then not local) and
//!   127.96.0.1/32, the `kubernetes` Service's ClusterIP, where [`serve_service_vip`] forwards
//!   to kube-apiserver (there is no kube-proxy);
//! - the bridge `tbr0` holds 127.97.0.1/16; the node's CNI plugin (`cni-bridge.sh`) puts each
//!   pod's `eth0` on it with the next free 127.97.X.Y/16 and a default route via 127.97.0.1;
//! - `route_localnet=1` lets loopback-range packets cross the bridge.
//!
//! Nothing else exists in it: no interface leads out of it, so every packet stays between the
//! suite's processes and its pods. The host's namespace is never changed.

use std::net::SocketAddr;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// Set in the re-executed suite: it already runs in its private network namespace.
const MARK: &str = "TESSERA_E2E_PRIVATE_NETNS";
/// The `kubernetes` Service's ClusterIP (first address of `--service-cluster-ip-range`).
pub const SERVICE_VIP: &str = "127.96.0.1";
/// The pod bridge and the pods' gateway.
pub const BRIDGE: &str = "tbr0";
pub const GATEWAY: &str = "127.97.0.1";

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output().context("running ip")?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// Call first thing in `main`, while the process has one thread. Run as root, re-executes the
/// test binary under `unshare --net` (same PID, same arguments) and, in the re-executed one,
/// builds the network described above. Without root it does nothing (the suite's prerequisite
/// check names root as missing).
pub fn enter() -> anyhow::Result<()> {
    if std::env::var_os(MARK).is_some() {
        return configure();
    }
    if !is_root() {
        return Ok(());
    }
    let exe = std::env::current_exe().context("locating the test executable")?;
    let mut cmd = Command::new("unshare");
    cmd.arg("--net").arg("--").arg(exe).args(std::env::args_os().skip(1)).env(MARK, "1");
    let err = std::os::unix::process::CommandExt::exec(&mut cmd);
    Err(anyhow::Error::new(err).context("re-executing the suite under unshare --net"))
}

fn configure() -> anyhow::Result<()> {
    let own = std::fs::read_link("/proc/self/ns/net")?;
    let init = std::fs::read_link("/proc/1/ns/net").ok();
    if init.as_ref() == Some(&own) {
        bail!("{MARK} is set but the suite runs in the host's network namespace");
    }
    ip(&["link", "set", "lo", "up"])?;
    ip(&["addr", "add", "127.0.0.1/16", "dev", "lo"])?;
    ip(&["addr", "del", "127.0.0.1/8", "dev", "lo"])?;
    ip(&["addr", "add", &format!("{SERVICE_VIP}/32"), "dev", "lo"])?;
    for conf in ["all", "default", "lo"] {
        std::fs::write(format!("/proc/sys/net/ipv4/conf/{conf}/route_localnet"), "1")
            .with_context(|| format!("route_localnet of {conf}"))?;
    }
    ip(&["link", "add", BRIDGE, "type", "bridge"])?;
    ip(&["addr", "add", &format!("{GATEWAY}/16"), "dev", BRIDGE, "scope", "global"])?;
    ip(&["link", "set", BRIDGE, "up"])?;
    Ok(())
}

/// Whether this process runs in the suite's private network (see [`enter`]).
pub fn private() -> bool {
    std::env::var_os(MARK).is_some()
}

/// Forwards `127.96.0.1:443` (what kubelet tells pods in `KUBERNETES_SERVICE_HOST/PORT`) to
/// kube-apiserver at `to`, as kube-proxy's rule for the `kubernetes` Service would. Runs until
/// the runtime stops; the TLS session is the pod's own, end to end.
pub async fn serve_service_vip(to: SocketAddr) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind((SERVICE_VIP, 443)).await.context("listening on 127.96.0.1:443")?;
    Ok(tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    }))
}
