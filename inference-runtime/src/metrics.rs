//! Prometheus metrics under two naming schemes, so existing autoscaling queries work unchanged:
//! vLLM-style (`tessera_runtime:*`, label `model_name`) and Triton-style (`nv_inference_*`,
//! labels `model`, `version`). Where both schemes name the same quantity they share one value.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// A Triton cumulative counter. Triton exposes these without the `_total` suffix that
/// OpenMetrics counters get, and dashboards query those exact names, so it is encoded as an
/// untyped sample.
#[derive(Debug, Clone, Default)]
pub struct Cumulative(Arc<AtomicU64>);

impl Cumulative {
    pub fn inc_by(&self, v: u64) {
        self.0.fetch_add(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl TypedMetric for Cumulative {
    const TYPE: MetricType = MetricType::Unknown;
}

impl EncodeMetric for Cumulative {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.get())
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Unknown
    }
}

/// One model's series. Cheap handles: the exporter reads the same values.
#[derive(Debug)]
pub struct Metrics {
    /// Admitted, not yet picked up by a worker (also `nv_inference_pending_request_count`).
    pub waiting: Gauge,
    /// Being computed now.
    pub running: Gauge,
    pub time_to_first_token: Histogram,
    pub e2e_latency: Histogram,
    pub queue_time: Histogram,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    pub request_success: Counter,
    pub queue_duration_us: Cumulative,
    pub request_duration_us: Cumulative,
    pub triton_success: Cumulative,
    pub triton_failure: Cumulative,
    /// Inferences: one per input text (embeddings) or per completion (chat).
    pub inference_count: Cumulative,
    /// Model executions: batches (embeddings; one batch may run as several same-length
    /// passes) or generations (chat).
    pub exec_count: Cumulative,
    /// 1 while the model is loaded and serving.
    pub loaded: Gauge,
    /// Memory reserved for the model in the budget (its plan), 0 when unloaded.
    pub memory_bytes: Gauge,
}

fn latency_buckets() -> Histogram {
    // 1 ms .. ~33 s
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            waiting: Gauge::default(),
            running: Gauge::default(),
            time_to_first_token: latency_buckets(),
            e2e_latency: latency_buckets(),
            queue_time: latency_buckets(),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            request_success: Counter::default(),
            queue_duration_us: Cumulative::default(),
            request_duration_us: Cumulative::default(),
            triton_success: Cumulative::default(),
            triton_failure: Cumulative::default(),
            inference_count: Cumulative::default(),
            exec_count: Cumulative::default(),
            loaded: Gauge::default(),
            memory_bytes: Gauge::default(),
        }
    }
}

impl Metrics {
    pub fn observe_queue(&self, waited: Duration) {
        self.queue_time.observe(waited.as_secs_f64());
        self.queue_duration_us.inc_by(waited.as_micros() as u64);
    }

    /// Records a finished request (success or not) and its end-to-end latency.
    pub fn observe_request(&self, ok: bool, elapsed: Duration) {
        if ok {
            self.request_success.inc();
            self.triton_success.inc_by(1);
        } else {
            self.triton_failure.inc_by(1);
        }
        self.e2e_latency.observe(elapsed.as_secs_f64());
        self.request_duration_us.inc_by(elapsed.as_micros() as u64);
    }
}

/// Which label scheme a family uses.
#[derive(Debug, Clone, Copy)]
enum Scheme {
    /// `model_name="..."`
    Vllm,
    /// `model="...",version="1"`
    Triton,
}

type Pick = fn(&Metrics) -> &dyn EncodeMetric;

/// Every per-model family: name, help, label scheme, which series.
const FAMILIES: &[(&str, &str, Scheme, Pick)] = &[
    ("tessera_runtime:num_requests_waiting", "Requests admitted and waiting for a worker", Scheme::Vllm, |m| {
        &m.waiting
    }),
    ("tessera_runtime:num_requests_running", "Requests being computed", Scheme::Vllm, |m| &m.running),
    ("tessera_runtime:time_to_first_token_seconds", "Arrival to first generated text (chat)", Scheme::Vllm, |m| {
        &m.time_to_first_token
    }),
    ("tessera_runtime:e2e_request_latency_seconds", "Arrival to last byte of the answer", Scheme::Vllm, |m| {
        &m.e2e_latency
    }),
    ("tessera_runtime:request_queue_time_seconds", "Time spent waiting for a worker", Scheme::Vllm, |m| &m.queue_time),
    ("tessera_runtime:prompt_tokens", "Input tokens processed", Scheme::Vllm, |m| &m.prompt_tokens),
    ("tessera_runtime:generation_tokens", "Tokens generated", Scheme::Vllm, |m| &m.generation_tokens),
    ("tessera_runtime:request_success", "Requests answered successfully", Scheme::Vllm, |m| &m.request_success),
    ("tessera_runtime:model_loaded", "1 while the model is loaded and serving", Scheme::Vllm, |m| &m.loaded),
    (
        "tessera_runtime:model_memory_bytes",
        "Memory reserved for the model in the budget (its plan); 0 when unloaded",
        Scheme::Vllm,
        |m| &m.memory_bytes,
    ),
    ("nv_inference_pending_request_count", "Requests waiting for a worker", Scheme::Triton, |m| &m.waiting),
    ("nv_inference_queue_duration_us", "Cumulative microseconds requests waited in the queue", Scheme::Triton, |m| {
        &m.queue_duration_us
    }),
    ("nv_inference_request_duration_us", "Cumulative microseconds from arrival to answer", Scheme::Triton, |m| {
        &m.request_duration_us
    }),
    ("nv_inference_request_success", "Successful requests", Scheme::Triton, |m| &m.triton_success),
    ("nv_inference_request_failure", "Failed requests", Scheme::Triton, |m| &m.triton_failure),
    ("nv_inference_count", "Inferences performed (one per input)", Scheme::Triton, |m| &m.inference_count),
    ("nv_inference_exec_count", "Batches executed (count / exec_count = average batch size)", Scheme::Triton, |m| {
        &m.exec_count
    }),
];

/// Process-wide series.
#[derive(Debug, Default)]
pub struct Budget {
    pub budget_bytes: Gauge,
    pub reserved_bytes: Gauge,
}

/// Encodes every model's series, one family at a time (OpenMetrics allows each family once).
#[derive(Debug)]
struct Models(Vec<(String, Arc<Metrics>)>);

impl Collector for Models {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, scheme, pick) in FAMILIES {
            let Some((_, first)) = self.0.first() else {
                return Ok(());
            };
            let mut family = encoder.encode_descriptor(name, help, None, pick(first).metric_type())?;
            for (model, m) in &self.0 {
                let labels: Vec<(&str, &str)> = match scheme {
                    Scheme::Vllm => vec![("model_name", model)],
                    Scheme::Triton => vec![("model", model), ("version", "1")],
                };
                pick(m).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The `/metrics` registry over a fixed set of models.
#[derive(Debug)]
pub struct Exporter {
    registry: Registry,
}

impl Exporter {
    pub fn new(models: Vec<(String, Arc<Metrics>)>, budget: &Budget) -> Self {
        let mut registry = Registry::default();
        registry.register(
            "tessera_runtime:memory_budget_bytes",
            "Memory the models may use (device memory less headroom, or --memory-budget)",
            budget.budget_bytes.clone(),
        );
        registry.register(
            "tessera_runtime:memory_reserved_bytes",
            "Memory reserved by loaded models (and models still unloading)",
            budget.reserved_bytes.clone(),
        );
        registry.register_collector(Box::new(Models(models)));
        Exporter { registry }
    }

    /// OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_naming_schemes_are_exposed_with_model_labels() {
        let m = Arc::new(Metrics::default());
        let other = Arc::new(Metrics::default());
        m.waiting.set(3);
        other.waiting.set(5);
        m.observe_request(true, Duration::from_millis(20));
        m.observe_queue(Duration::from_micros(250));
        let budget = Budget::default();
        budget.budget_bytes.set(1 << 30);
        let text = Exporter::new(vec![("minilm".into(), m), ("guard".into(), other)], &budget).encode();
        assert_eq!(text.matches("# TYPE nv_inference_pending_request_count ").count(), 1, "one family\n{text}");
        for line in [
            "nv_inference_pending_request_count{model=\"guard\",version=\"1\"} 5",
            "tessera_runtime:num_requests_waiting{model_name=\"guard\"} 5",
            "tessera_runtime:memory_budget_bytes 1073741824",
            "tessera_runtime:model_loaded{model_name=\"minilm\"} 0",
            "tessera_runtime:num_requests_waiting{model_name=\"minilm\"} 3",
            "nv_inference_pending_request_count{model=\"minilm\",version=\"1\"} 3",
            "nv_inference_request_success{model=\"minilm\",version=\"1\"} 1",
            "nv_inference_queue_duration_us{model=\"minilm\",version=\"1\"} 250",
            "tessera_runtime:request_success_total{model_name=\"minilm\"} 1",
            "tessera_runtime:e2e_request_latency_seconds_count{model_name=\"minilm\"} 1",
        ] {
            assert!(text.contains(line), "missing `{line}` in\n{text}");
        }
    }
}
