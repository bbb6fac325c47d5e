//! Events on pods whose assignment the node refuses (`kubectl describe pod` shows why the pod
//! did not get a device).

use std::fmt;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tessera_api::signing::Refusal;
use tracing::warn;

use crate::pods::{BoxFuture, PodInfo};

/// Event reason for every refusal; the note says which refusal and why.
pub const REASON: &str = "AssignmentRefused";

/// Where refusals are reported (besides the log line and the metric).
pub trait RefusalSink: Send + Sync + fmt::Debug {
    fn refused<'a>(&'a self, pod: &'a PodInfo, node: &'a str, refusal: &'a Refusal) -> BoxFuture<'a, ()>;
}

/// The Event note for a refusal.
pub fn note(node: &str, refusal: &Refusal) -> String {
    format!(
        "tessera node agent on {node} refused the device assignment ({}): {refusal}; the pod gets no device. \
         Pods asking for {} must be bound by the tessera scheduler.",
        refusal.reason(),
        tessera_api::annotations::RESOURCE_GPU
    )
}

/// Publishes Warning Events through the API server (`events.k8s.io`).
pub struct KubeEvents {
    recorder: Recorder,
}

impl fmt::Debug for KubeEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeEvents").finish_non_exhaustive()
    }
}

impl KubeEvents {
    pub fn new(client: kube::Client, node: &str) -> Self {
        let reporter = Reporter { controller: "tessera-mig-manager".into(), instance: Some(node.to_owned()) };
        Self { recorder: Recorder::new(client, reporter) }
    }
}

impl RefusalSink for KubeEvents {
    fn refused<'a>(&'a self, pod: &'a PodInfo, node: &'a str, refusal: &'a Refusal) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let reference = ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.name.clone()),
                namespace: Some(pod.namespace.clone()),
                uid: Some(pod.uid.clone()),
                ..Default::default()
            };
            let ev = Event {
                type_: EventType::Warning,
                reason: REASON.into(),
                note: Some(note(node, refusal)),
                action: "Allocate".into(),
                secondary: None,
            };
            if let Err(error) = self.recorder.publish(&ev, &reference).await {
                warn!(pod = %pod.key(), %error, "Publishing the refusal Event failed");
            }
        })
    }
}

/// Keeps refusals in memory (tests, `--standalone`).
#[derive(Debug, Default)]
pub struct MemoryEvents {
    seen: Mutex<Vec<(String, String)>>,
}

impl MemoryEvents {
    /// (pod key, refusal reason), in order.
    pub fn seen(&self) -> Vec<(String, String)> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl RefusalSink for MemoryEvents {
    fn refused<'a>(&'a self, pod: &'a PodInfo, _node: &'a str, refusal: &'a Refusal) -> BoxFuture<'a, ()> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).push((pod.key(), refusal.reason().to_owned()));
        Box::pin(async {})
    }
}
