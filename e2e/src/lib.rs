//! tessera under real Kubernetes processes.
//!
//! - [`kubelet`]: a real kubelet node (kubelet + containerd + runc + `tessera-mig-manager` as its
//!   device plugin) on loopback only, inside a private mount namespace that leaves the host as it
//!   was.

pub mod kubelet;
