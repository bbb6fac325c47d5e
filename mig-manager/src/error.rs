//! Errors of the node agent's library parts.

use crate::gpu::GpuError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error("reading GpuNode {name}")]
    GetGpuNode {
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("creating GpuNode {name}")]
    CreateGpuNode {
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("publishing GpuNode {name} status")]
    PublishStatus {
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("listing pods on node {node}")]
    ListPods {
        node: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("device plugin socket {path}")]
    PluginSocket {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to kubelet at {path}")]
    KubeletConnect {
        path: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("kubelet refused registration of {resource}")]
    Register {
        resource: String,
        #[source]
        source: Box<tonic::Status>,
    },
    #[error("kubelet's PodResources API at {path}: {}", source.message())]
    PodResources {
        path: String,
        #[source]
        source: Box<tonic::Status>,
    },
    #[error("serving the device plugin")]
    Serve(#[source] tonic::transport::Error),
    #[error("reading spec file {path}: {why}")]
    SpecFile { path: String, why: String },
    #[error("background task failed: {0}")]
    Task(String),
}

impl Error {
    /// Short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Gpu(e) => e.kind(),
            Error::GetGpuNode { .. } => "get_gpunode",
            Error::CreateGpuNode { .. } => "create_gpunode",
            Error::PublishStatus { .. } => "publish_status",
            Error::ListPods { .. } => "list_pods",
            Error::PluginSocket { .. } => "plugin_socket",
            Error::KubeletConnect { .. } => "kubelet_connect",
            Error::Register { .. } => "register",
            Error::PodResources { .. } => "pod_resources",
            Error::Serve(_) => "serve",
            Error::SpecFile { .. } => "spec_file",
            Error::Task(_) => "task",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
