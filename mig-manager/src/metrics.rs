//! Node metrics (`tessera_node_*`), prometheus-client, one registry for the binary.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::gpu::{Observed, Sample};
use crate::mig::reconcile::Outcome;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuLabels {
    pub gpu: String,
    pub uuid: String,
    pub product: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MigLabels {
    pub gpu: String,
    pub profile: String,
    pub start: String,
    pub uuid: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

type FGauge = Gauge<f64, AtomicU64>;

/// Every metric the agent exports.
#[derive(Debug)]
pub struct Metrics {
    pub gpu_utilization_ratio: Family<GpuLabels, FGauge>,
    pub gpu_memory_used_bytes: Family<GpuLabels, Gauge>,
    pub gpu_memory_total_bytes: Family<GpuLabels, Gauge>,
    pub gpu_temperature_celsius: Family<GpuLabels, Gauge>,
    pub gpu_power_watts: Family<GpuLabels, FGauge>,
    pub gpu_healthy: Family<GpuLabels, Gauge>,
    pub mig_instance_memory_used_bytes: Family<MigLabels, Gauge>,
    pub mig_instance_info: Family<MigLabels, Gauge>,
    pub reconcile_ops_total: Family<OpLabels, Counter>,
    pub reconcile_failures_total: Family<KindLabels, Counter>,
    pub reconcile_blocked_gpus: Gauge,
    pub reconcile_converged: Gauge,
    pub reconcile_duration_seconds: Histogram,
    pub allocations_total: Family<ResultLabels, Counter>,
    pub assignment_refusals_total: Family<ReasonLabels, Counter>,
    pub allocate_duration_seconds: Histogram,
    pub nvml_up: Gauge,
    pub device_plugin_registered: Gauge,
}

impl Metrics {
    /// Creates the metrics and registers them under `tessera_node_`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            gpu_utilization_ratio: Family::default(),
            gpu_memory_used_bytes: Family::default(),
            gpu_memory_total_bytes: Family::default(),
            gpu_temperature_celsius: Family::default(),
            gpu_power_watts: Family::default(),
            gpu_healthy: Family::default(),
            mig_instance_memory_used_bytes: Family::default(),
            mig_instance_info: Family::default(),
            reconcile_ops_total: Family::default(),
            reconcile_failures_total: Family::default(),
            reconcile_blocked_gpus: Gauge::default(),
            reconcile_converged: Gauge::default(),
            reconcile_duration_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            allocations_total: Family::default(),
            assignment_refusals_total: Family::default(),
            allocate_duration_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            nvml_up: Gauge::default(),
            device_plugin_registered: Gauge::default(),
        };
        let r = registry;
        r.register(
            "gpu_utilization_ratio",
            "GPU busy time over the last sample period, 0..1",
            m.gpu_utilization_ratio.clone(),
        );
        r.register("gpu_memory_used_bytes", "Device memory in use", m.gpu_memory_used_bytes.clone());
        r.register("gpu_memory_total_bytes", "Device memory", m.gpu_memory_total_bytes.clone());
        r.register("gpu_temperature_celsius", "GPU core temperature", m.gpu_temperature_celsius.clone());
        r.register("gpu_power_watts", "Power draw", m.gpu_power_watts.clone());
        r.register("gpu_healthy", "1 when the GPU is healthy", m.gpu_healthy.clone());
        r.register(
            "mig_instance_memory_used_bytes",
            "Device memory in use per MIG instance",
            m.mig_instance_memory_used_bytes.clone(),
        );
        r.register("mig_instance_info", "1 per existing MIG instance", m.mig_instance_info.clone());
        r.register("reconcile_ops", "MIG operations applied", m.reconcile_ops_total.clone());
        r.register(
            "reconcile_failures",
            "Failed MIG operations and passes, by error kind",
            m.reconcile_failures_total.clone(),
        );
        r.register("reconcile_blocked_gpus", "GPUs that cannot reach their spec now", m.reconcile_blocked_gpus.clone());
        r.register("reconcile_converged", "1 when the node matches GpuNode.spec", m.reconcile_converged.clone());
        r.register(
            "reconcile_duration_seconds",
            "Duration of one reconcile pass",
            m.reconcile_duration_seconds.clone(),
        );
        r.register("allocations", "Device plugin Allocate calls, by result", m.allocations_total.clone());
        r.register(
            "assignment_refusals",
            "Assignments the device plugin refused to serve, by reason (Unsigned, Forged, Replayed, ForeignNode, \
             UnknownKey, DeviceHeld, ...)",
            m.assignment_refusals_total.clone(),
        );
        r.register(
            "allocate_duration_seconds",
            "Time to answer kubelet's Allocate, finding the admitted pod included",
            m.allocate_duration_seconds.clone(),
        );
        r.register("nvml_up", "1 when NVML answers", m.nvml_up.clone());
        r.register(
            "device_plugin_registered",
            "1 while kubelet has accepted the plugin",
            m.device_plugin_registered.clone(),
        );
        m
    }

    pub fn allocation(&self, result: &str) {
        self.allocations_total.get_or_create(&ResultLabels { result: result.to_owned() }).inc();
    }

    pub fn refused(&self, reason: &str) {
        self.assignment_refusals_total.get_or_create(&ReasonLabels { reason: reason.to_owned() }).inc();
    }

    /// Records the outcome of a reconcile pass.
    pub fn reconciled(&self, out: &Outcome, seconds: f64) {
        for op in &out.applied {
            let name = match op {
                tessera_core::MigOp::SetMode { .. } => "set_mode",
                tessera_core::MigOp::Create { .. } => "create",
                tessera_core::MigOp::Destroy { .. } => "destroy",
            };
            self.reconcile_ops_total.get_or_create(&OpLabels { op: name.into() }).inc();
        }
        for (_, e) in &out.failed {
            self.reconcile_failures_total.get_or_create(&KindLabels { kind: e.kind().into() }).inc();
        }
        self.reconcile_blocked_gpus.set(out.blocked.len() as i64);
        self.reconcile_converged.set(i64::from(out.converged));
        self.reconcile_duration_seconds.observe(seconds);
    }

    /// Records a failed pass (discovery or API error).
    pub fn pass_failed(&self, kind: &str) {
        self.reconcile_failures_total.get_or_create(&KindLabels { kind: kind.into() }).inc();
    }

    /// Replaces per-GPU and per-instance readings.
    pub fn observed(&self, observed: &Observed, samples: &[(u32, Sample)]) {
        self.gpu_utilization_ratio.clear();
        self.gpu_memory_used_bytes.clear();
        self.gpu_memory_total_bytes.clear();
        self.gpu_temperature_celsius.clear();
        self.gpu_power_watts.clear();
        self.gpu_healthy.clear();
        self.mig_instance_memory_used_bytes.clear();
        self.mig_instance_info.clear();
        const MIB: i64 = 1024 * 1024;
        for g in &observed.gpus {
            let l =
                GpuLabels { gpu: g.info.index.to_string(), uuid: g.info.uuid.clone(), product: g.info.product_name() };
            self.gpu_healthy.get_or_create(&l).set(i64::from(g.info.healthy));
            let sample = samples.iter().find(|(i, _)| *i == g.info.index).map(|(_, s)| s);
            if let Some(s) = sample {
                if let Some(u) = s.utilization_pct {
                    self.gpu_utilization_ratio.get_or_create(&l).set(f64::from(u) / 100.0);
                }
                if let Some(m) = s.memory_used_mib {
                    self.gpu_memory_used_bytes.get_or_create(&l).set(m as i64 * MIB);
                }
                if let Some(m) = s.memory_total_mib {
                    self.gpu_memory_total_bytes.get_or_create(&l).set(m as i64 * MIB);
                }
                if let Some(t) = s.temperature_c {
                    self.gpu_temperature_celsius.get_or_create(&l).set(i64::from(t));
                }
                if let Some(p) = s.power_mw {
                    self.gpu_power_watts.get_or_create(&l).set(f64::from(p) / 1000.0);
                }
            }
            let geom = g.info.product.map(|p| p.geometry());
            for m in &g.mig {
                let profile = geom.and_then(|ge| ge.profile(m.instance.class)).map_or("unknown", |p| p.name);
                let ml = MigLabels {
                    gpu: g.info.index.to_string(),
                    profile: profile.into(),
                    start: m.instance.start.to_string(),
                    uuid: m.uuid.clone(),
                };
                self.mig_instance_info.get_or_create(&ml).set(1);
                if let Some(used) =
                    sample.and_then(|s| s.mig_memory_used_mib.iter().find(|(u, _)| *u == m.uuid)).map(|(_, u)| *u)
                {
                    self.mig_instance_memory_used_bytes.get_or_create(&ml).set(used as i64 * MIB);
                }
            }
        }
    }
}

/// A registry with the `tessera_node` prefix and the agent's metrics in it.
pub fn registry() -> (Registry, Metrics) {
    let mut registry = Registry::with_prefix("tessera_node");
    let metrics = Metrics::new(&mut registry);
    (registry, metrics)
}

/// The text exposition of a registry.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

#[cfg(test)]
mod tests {
    use tessera_core::mig::MigProduct;

    use super::*;
    use crate::gpu::fake::FakeGpus;
    use crate::gpu::{GpuBackend, observe};

    #[test]
    fn metrics_carry_the_node_prefix_and_per_instance_series() {
        let (registry, m) = registry();
        let fake = FakeGpus::new(MigProduct::H100_80GB, 1, true).with_mig(0, &["3g.40gb"]).unwrap();
        let uuid = fake.mig_devices(0).unwrap()[0].uuid.clone();
        fake.set_busy(&uuid, true);
        let obs = observe(&fake).unwrap();
        m.observed(&obs, &[(0, fake.sample(0).unwrap())]);
        m.allocation("ok");
        let text = encode(&registry);
        assert!(text.contains("tessera_node_gpu_utilization_ratio{gpu=\"0\""), "{text}");
        assert!(text.contains("tessera_node_mig_instance_memory_used_bytes{gpu=\"0\",profile=\"3g.40gb\",start=\"0\""));
        assert!(text.contains("tessera_node_allocations_total{result=\"ok\"} 1"));
        assert!(text.contains("tessera_node_gpu_power_watts"));
    }
}
