//! Errors: broken invariants and invalid input. "Does not fit" is a [`crate::Rejection`], not an error.

use crate::keys::{NodeName, PodKey};
use crate::mig::MigError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("unknown node {0}")]
    UnknownNode(NodeName),
    #[error("node {0} already exists")]
    DuplicateNode(NodeName),
    #[error("node {node} has no GPU {gpu}")]
    UnknownGpu { node: NodeName, gpu: u32 },
    #[error("no allocation for pod {0}")]
    UnknownPod(PodKey),
    #[error("pod {0} already holds an allocation")]
    AlreadyAllocated(PodKey),
    #[error("node {node} still holds pod {pod}")]
    NodeInUse { node: NodeName, pod: PodKey },
    #[error("node {node}: {what} would be over-committed")]
    OverCommit { node: NodeName, what: String },
    #[error("node {node} GPU {gpu}: {why}")]
    GpuBusy { node: NodeName, gpu: u32, why: &'static str },
    #[error("node {node} GPU {gpu} ({model}) does not support MIG")]
    NotMigCapable { node: NodeName, gpu: u32, model: String },
    #[error("node {node} GPU {gpu} is not in MIG mode")]
    NotInMigMode { node: NodeName, gpu: u32 },
    #[error("node {node} GPU {gpu}: {reason}")]
    Mig { node: NodeName, gpu: u32, reason: MigError },
    #[error("invalid demand: {0}")]
    InvalidDemand(String),
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// Short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::UnknownNode(_) => "unknown_node",
            Error::DuplicateNode(_) => "duplicate_node",
            Error::UnknownGpu { .. } => "unknown_gpu",
            Error::UnknownPod(_) => "unknown_pod",
            Error::AlreadyAllocated(_) => "already_allocated",
            Error::NodeInUse { .. } => "node_in_use",
            Error::OverCommit { .. } => "over_commit",
            Error::GpuBusy { .. } => "gpu_busy",
            Error::NotMigCapable { .. } => "not_mig_capable",
            Error::NotInMigMode { .. } => "not_in_mig_mode",
            Error::Mig { .. } => "mig",
            Error::InvalidDemand(_) => "invalid_demand",
            Error::Invalid(_) => "invalid",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
