//! The extender's errors. A pod that does not fit is not an error: it is a per-node rejection in
//! `FailedNodes` / `FailedAndUnresolvableNodes`.

use std::time::Duration;

use tessera_api::kube_error;
use tessera_core::PodKey;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("decoding {verb} arguments")]
    Decode {
        verb: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("request body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("request did not finish within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    BadRequest(String),
    #[error("pod {0} is unknown to tessera (not filtered by this replica and not in its cache)")]
    UnknownPod(PodKey),
    #[error("pod {pod}: {reason}")]
    Unplaceable { pod: PodKey, reason: String },
    #[error("gang {gang}: {why}")]
    Gang { gang: String, why: String },
    #[error("this replica is not the leader; only the leader binds")]
    NotLeader,
    // Kubernetes API errors are rendered by `tessera_api::kube_error` (message, HTTP code and
    // reason) and are not error sources: kube's own Display appends a Rust debug dump.
    #[error("binding pod {pod} to {node}: {}", kube_error(api))]
    Bind { pod: PodKey, node: String, api: Box<kube::Error> },
    #[error("updating GpuNode {node}: {}", kube_error(api))]
    PatchGpuNode { node: String, api: Box<kube::Error> },
    #[error("annotating pod {pod}: {}", kube_error(api))]
    Annotate { pod: PodKey, api: Box<kube::Error> },
    #[error("writing the status of PodGroup {group}: {}", kube_error(api))]
    PodGroupStatus { group: String, api: Box<kube::Error> },
    #[error("evicting pod {pod}: {}", kube_error(api))]
    Evict { pod: PodKey, api: Box<kube::Error> },
    #[error("pod {pod} is being bound to {node} by an earlier request; {why}")]
    Binding { pod: PodKey, node: String, why: String },
    #[error("GpuNode {node} did not report {what} within {timeout:?}")]
    MigTimeout { node: String, what: String, timeout: Duration },
    #[error(transparent)]
    Core(#[from] tessera_core::Error),
    /// An error of a bind that ran in its own task, as that task reported it.
    #[error("{message}")]
    Relayed { kind: &'static str, message: String },
}

impl Error {
    /// Short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Decode { .. } => "decode",
            Error::BodyTooLarge { .. } => "body_too_large",
            Error::Timeout(_) => "timeout",
            Error::BadRequest(_) => "bad_request",
            Error::UnknownPod(_) => "unknown_pod",
            Error::Unplaceable { .. } => "unplaceable",
            Error::Gang { .. } => "gang",
            Error::NotLeader => "not_leader",
            Error::Bind { .. } => "bind",
            Error::PatchGpuNode { .. } => "patch_gpunode",
            Error::Annotate { .. } => "annotate",
            Error::Evict { .. } => "evict",
            Error::PodGroupStatus { .. } => "podgroup_status",
            Error::Binding { .. } => "binding",
            Error::MigTimeout { .. } => "mig_timeout",
            Error::Core(_) => "core",
            Error::Relayed { kind, .. } => kind,
        }
    }

    /// The message with every source, for the wire `Error` field.
    pub fn chain(&self) -> String {
        let mut msg = self.to_string();
        let mut src = std::error::Error::source(self);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        msg
    }
}

impl Error {
    /// The Kubernetes API error behind this one, if any.
    pub fn api(&self) -> Option<&kube::Error> {
        match self {
            Error::Bind { api, .. }
            | Error::PatchGpuNode { api, .. }
            | Error::Annotate { api, .. }
            | Error::Evict { api, .. }
            | Error::PodGroupStatus { api, .. } => Some(api),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
