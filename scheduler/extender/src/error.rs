//! The extender's errors. A pod that does not fit is not an error: it is a per-node rejection in
//! `FailedNodes` / `FailedAndUnresolvableNodes`.

use std::time::Duration;

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
    #[error("reading the request body")]
    ReadBody(#[source] hyper::Error),
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
    #[error("binding pod {pod} to {node}")]
    Bind {
        pod: PodKey,
        node: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("updating GpuNode {node}")]
    PatchGpuNode {
        node: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("annotating pod {pod}")]
    Annotate {
        pod: PodKey,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("GpuNode {node} did not report {what} within {timeout:?}")]
    MigTimeout { node: String, what: String, timeout: Duration },
    #[error(transparent)]
    Core(#[from] tessera_core::Error),
}

impl Error {
    /// Short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Decode { .. } => "decode",
            Error::BodyTooLarge { .. } => "body_too_large",
            Error::ReadBody(_) => "read_body",
            Error::Timeout(_) => "timeout",
            Error::BadRequest(_) => "bad_request",
            Error::UnknownPod(_) => "unknown_pod",
            Error::Unplaceable { .. } => "unplaceable",
            Error::Gang { .. } => "gang",
            Error::NotLeader => "not_leader",
            Error::Bind { .. } => "bind",
            Error::PatchGpuNode { .. } => "patch_gpunode",
            Error::Annotate { .. } => "annotate",
            Error::MigTimeout { .. } => "mig_timeout",
            Error::Core(_) => "core",
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

pub type Result<T, E = Error> = std::result::Result<T, E>;
