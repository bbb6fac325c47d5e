//! Scheduler metrics (`tessera_*`), prometheus-client, one registry for the binary.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tessera_core::metrics::Packing;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerbLabels {
    pub verb: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub verb: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

type FGauge = Gauge<f64, AtomicU64>;

/// Every metric the scheduler exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub request_duration_seconds: Family<VerbLabels, Histogram>,
    pub decisions_total: Family<DecisionLabels, Counter>,
    pub pending_gangs: Gauge,
    pub reservations: Gauge,
    pub mig_reconfig_requests_total: Counter,
    pub leader: Gauge,
    pub packing_allocation_ratio: Family<PoolLabels, FGauge>,
    pub packing_fragmentation_milli: Family<PoolLabels, FGauge>,
    pub packing_stranded_slices: Family<PoolLabels, Gauge>,
    pub packing_gpus: Family<PoolLabels, Gauge>,
    pub mig_reconfigs: Gauge,
    pub assignment_refusals_total: Family<ReasonLabels, Counter>,
    /// Rebuilding the state from the watch caches (live mode), one observation per rebuild.
    pub rebuild_duration_seconds: Histogram,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~1.6 s: filter on a big cluster is sub-millisecond; bind may wait for MIG.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tessera");
        let m = Self {
            request_duration_seconds: Family::new_with_constructor(latency_histogram),
            decisions_total: Family::default(),
            pending_gangs: Gauge::default(),
            reservations: Gauge::default(),
            mig_reconfig_requests_total: Counter::default(),
            leader: Gauge::default(),
            packing_allocation_ratio: Family::default(),
            packing_fragmentation_milli: Family::default(),
            packing_stranded_slices: Family::default(),
            packing_gpus: Family::default(),
            mig_reconfigs: Gauge::default(),
            assignment_refusals_total: Family::default(),
            // 1 ms .. ~16 s: a rebuild reads every Node, GpuNode and Pod.
            rebuild_duration_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            registry: Registry::default(),
        };
        registry.register(
            "request_duration_seconds",
            "Extender request latency by verb",
            m.request_duration_seconds.clone(),
        );
        registry.register("decisions", "Scheduling decisions by verb and result", m.decisions_total.clone());
        registry.register("pending_gangs", "Gangs waiting for members or a plan", m.pending_gangs.clone());
        registry.register(
            "reservations",
            "Allocations assumed or reserved and not yet seen bound",
            m.reservations.clone(),
        );
        registry.register(
            "mig_reconfig_requests",
            "GpuNode spec updates asking a node for new MIG instances",
            m.mig_reconfig_requests_total.clone(),
        );
        registry.register("leader", "1 when this replica binds", m.leader.clone());
        registry.register(
            "packing_allocation_ratio",
            "Allocated over total GPU capacity per pool",
            m.packing_allocation_ratio.clone(),
        );
        registry.register(
            "packing_fragmentation_milli",
            "FGD fragmentation of free GPU capacity per pool, milli-GPU",
            m.packing_fragmentation_milli.clone(),
        );
        registry.register(
            "packing_stranded_slices",
            "Free MIG compute slices no demand class can use, per pool",
            m.packing_stranded_slices.clone(),
        );
        registry.register("packing_gpus", "GPUs per pool", m.packing_gpus.clone());
        registry.register(
            "assignment_refusals",
            "Bound pods whose assignment the rebuild does not trust, by reason (counted once per pod)",
            m.assignment_refusals_total.clone(),
        );
        registry.register(
            "rebuild_duration_seconds",
            "Time to rebuild the cluster state from the watch caches after changes (live mode)",
            m.rebuild_duration_seconds.clone(),
        );
        registry.register(
            "mig_reconfigs",
            "MIG instances created or destroyed in the scheduler's state since start",
            m.mig_reconfigs.clone(),
        );
        Self { registry, ..m }
    }

    pub fn decision(&self, verb: &str, result: &str) {
        self.decisions_total.get_or_create(&DecisionLabels { verb: verb.into(), result: result.into() }).inc();
    }

    pub fn observe(&self, verb: &str, seconds: f64) {
        self.request_duration_seconds.get_or_create(&VerbLabels { verb: verb.into() }).observe(seconds);
    }

    /// Sets the packing gauges to exactly `pools`: a pool that no longer exists (its nodes
    /// left, or gained GPUs of another product) loses its series instead of keeping its last
    /// values.
    pub fn set_pools(&self, pools: &std::collections::BTreeMap<String, Packing>) {
        self.packing_allocation_ratio.clear();
        self.packing_fragmentation_milli.clear();
        self.packing_stranded_slices.clear();
        self.packing_gpus.clear();
        for (pool, p) in pools {
            self.set_packing(pool, p);
        }
    }

    /// Sets the packing gauges of one pool.
    fn set_packing(&self, pool: &str, p: &Packing) {
        let l = PoolLabels { pool: pool.into() };
        self.packing_allocation_ratio.get_or_create(&l).set(p.allocation_ratio);
        self.packing_fragmentation_milli.get_or_create(&l).set(p.fragmentation_milli);
        self.packing_stranded_slices.get_or_create(&l).set(i64::from(p.stranded_slices));
        self.packing_gpus.get_or_create(&l).set(i64::from(p.gpus));
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Observes a request's duration when dropped.
#[derive(Debug)]
pub struct Timer<'a> {
    metrics: &'a Metrics,
    verb: &'static str,
    start: tokio::time::Instant,
}

impl<'a> Timer<'a> {
    pub fn start(metrics: &'a Metrics, verb: &'static str) -> Self {
        Self { metrics, verb, start: tokio::time::Instant::now() }
    }
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.metrics.observe(self.verb, self.start.elapsed().as_secs_f64());
    }
}
