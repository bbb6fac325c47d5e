//! The verbs' tunables.

use std::sync::Arc;
use std::time::Duration;

/// Tunables of the verbs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `demo` or `live`, shown by `/api/v1/cluster`.
    pub mode: &'static str,
    /// How long a bind may wait for a node to report a new MIG instance.
    pub mig_timeout: Duration,
    /// Seed for policy tie-breaks.
    pub seed: u64,
    /// How long an assumed pod waits to be seen bound before it is forgotten.
    pub assume_ttl: Duration,
    /// Threads one filter may use to evaluate a long node list.
    pub threads: usize,
    /// Write planned gang members' reservations on the pods (live mode with
    /// [`crate::reservations::writer`] running); off, nothing is queued.
    pub persist_reservations: bool,
    /// kube-scheduler's `httpTimeout` for this extender: every verb answers within it. A bind
    /// that must wait longer (a gang whose members have not all reached bind, a node creating
    /// a MIG instance) answers an error before it, keeping its devices reserved, and
    /// kube-scheduler retries; the retried bind joins the one in progress.
    pub http_timeout: Duration,
    /// Evict lower-priority pods (whole gangs or single pods) through the Eviction API when a
    /// pod kube-scheduler cannot preempt for (tessera.dev/gpu, gangs) fits no node.
    pub preemption: bool,
    /// Keys that sign assignments (and check them at rebuild); `None`: unsigned.
    pub assignment_keys: Option<Arc<tessera_api::signing::Keys>>,
}

impl Settings {
    /// How long a verb may take before it must answer: `http_timeout` less a margin for the
    /// network and kube-scheduler (a tenth, at least 1 s, at most 5 s).
    pub fn reply_budget(&self) -> Duration {
        let margin = (self.http_timeout / 10).clamp(Duration::from_secs(1), Duration::from_secs(5));
        self.http_timeout.saturating_sub(margin).max(Duration::from_millis(100))
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            mode: "demo",
            mig_timeout: Duration::from_secs(30),
            seed: 0,
            assume_ttl: Duration::from_secs(300),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            persist_reservations: false,
            http_timeout: Duration::from_secs(45),
            preemption: true,
            assignment_keys: None,
        }
    }
}
