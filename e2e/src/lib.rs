//! tessera's real-cluster harness: etcd, kube-apiserver, kube-controller-manager and
//! kube-scheduler from `$KUBEBUILDER_ASSETS` (the envtest layout), tessera-scheduler and one
//! fake-backend tessera-mig-manager per node from this workspace's build, each as its own process
//! on loopback. Every test starts its own cluster; see docs/testing.md. [`kubelet`] is a real
//! kubelet node (kubelet + containerd + runc + the agent as its device plugin) for such a cluster.
#![allow(clippy::disallowed_methods)] // a test harness: it waits on real processes and clusters in real time

pub mod apply;
pub mod bins;
pub mod cluster;
pub mod kubelet;
pub mod pki;
pub mod proc;
pub mod wait;

pub use bins::Bins;
pub use cluster::{Cluster, NodeSpec, Options};
pub use wait::until;

/// The repository root (manifests are read from it at test time, never copied).
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(|p| p.to_path_buf()).unwrap_or_default()
}
