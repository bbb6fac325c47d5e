//! Prometheus metrics under two naming schemes, so existing autoscaling queries work unchanged:
//! vLLM-style (`tessera_runtime:*`, label `model_name`) and Triton-style (`nv_inference_*`,
//! labels `model`, `version`). Where both schemes name the same quantity they share one value.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
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

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
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
}

fn latency_buckets() -> Histogram {
    // 1 ms .. ~33 s
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Metrics {
    pub fn new(model: &str) -> Self {
        let mut m = Metrics {
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
            registry: Registry::default(),
        };
        {
            let v = m.registry.sub_registry_with_label(("model_name".into(), model.to_string().into()));
            v.register(
                "tessera_runtime:num_requests_waiting",
                "Requests admitted and waiting for a worker",
                m.waiting.clone(),
            );
            v.register("tessera_runtime:num_requests_running", "Requests being computed", m.running.clone());
            v.register(
                "tessera_runtime:time_to_first_token_seconds",
                "Arrival to first generated text (chat)",
                m.time_to_first_token.clone(),
            );
            v.register(
                "tessera_runtime:e2e_request_latency_seconds",
                "Arrival to last byte of the answer",
                m.e2e_latency.clone(),
            );
            v.register(
                "tessera_runtime:request_queue_time_seconds",
                "Time spent waiting for a worker",
                m.queue_time.clone(),
            );
            v.register("tessera_runtime:prompt_tokens", "Input tokens processed", m.prompt_tokens.clone());
            v.register("tessera_runtime:generation_tokens", "Tokens generated", m.generation_tokens.clone());
            v.register("tessera_runtime:request_success", "Requests answered successfully", m.request_success.clone());
        }
        {
            let t = m.registry.sub_registry_with_labels(
                [("model".into(), model.to_string().into()), ("version".into(), "1".into())].into_iter(),
            );
            t.register("nv_inference_pending_request_count", "Requests waiting for a worker", m.waiting.clone());
            t.register(
                "nv_inference_queue_duration_us",
                "Cumulative microseconds requests waited in the queue",
                m.queue_duration_us.clone(),
            );
            t.register(
                "nv_inference_request_duration_us",
                "Cumulative microseconds from arrival to answer",
                m.request_duration_us.clone(),
            );
            t.register("nv_inference_request_success", "Successful requests", m.triton_success.clone());
            t.register("nv_inference_request_failure", "Failed requests", m.triton_failure.clone());
            t.register("nv_inference_count", "Inferences performed (one per input)", m.inference_count.clone());
            t.register(
                "nv_inference_exec_count",
                "Batches executed (count / exec_count = average batch size)",
                m.exec_count.clone(),
            );
        }
        m
    }

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
        let m = Metrics::new("minilm");
        m.waiting.set(3);
        m.observe_request(true, Duration::from_millis(20));
        m.observe_queue(Duration::from_micros(250));
        let text = m.encode();
        for line in [
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
