//! The bounded request queue and the single worker thread that owns the model.
//!
//! - Embeddings: dynamic batching. The worker takes the first waiting request, then keeps
//!   collecting requests until the batch holds `max_batch` inputs or `max_wait` has passed since
//!   the first one, and runs them together, as one forward pass per group of similar length
//!   ([`length_groups`]; one pass for an engine that packs tokens). A request with more than
//!   `max_batch` inputs runs alone, in chunks.
//! - Chat: one generation at a time, first come first served (the KV cache lives in the model).
//!   Requests whose client has gone away are skipped; a generation stops as soon as its stream's
//!   reader disconnects. Continuous batching would need a per-sequence KV cache and is future work.
//!
//! The queue is a bounded channel: when it is full, new requests are refused (503) instead of
//! piling up latency. Queue depth feeds the `waiting` metrics.

use std::any::Any;
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::thread;
use std::time::{Duration, Instant};

use tokenizers::Encoding;
use tokio::sync::oneshot;

use crate::engine::{Engine, Generation, Sampling};
use crate::metrics::Metrics;
use crate::{Error, Result};

/// A group may hold at most this many padded tokens per real token. With the benchmark's
/// 32 mixed-length texts, 1.2 makes three passes instead of one and ran 9-18 % faster on CPU
/// (`examples/length_groups_ab.rs`).
pub const PADDING_SLACK: f64 = 1.2;

/// Splits inputs (by index) into groups of at most `max_batch`, sorted by length, starting a new
/// group when padding everyone to the newest (longest) input would exceed [`PADDING_SLACK`].
pub fn length_groups(inputs: &[Encoding], max_batch: usize) -> Vec<Vec<usize>> {
    length_groups_with(inputs, max_batch, PADDING_SLACK)
}

/// [`length_groups`] with another slack; `f64::INFINITY` only splits at `max_batch`.
pub fn length_groups_with(inputs: &[Encoding], max_batch: usize, slack: f64) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..inputs.len()).collect();
    order.sort_by_key(|&i| inputs[i].len());
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut real = 0usize;
    for i in order {
        let len = inputs[i].len().max(1);
        let fits = groups
            .last()
            .is_some_and(|g| g.len() < max_batch.max(1) && (len * (g.len() + 1)) as f64 <= slack * (real + len) as f64);
        match groups.last_mut() {
            Some(g) if fits => {
                real += len;
                g.push(i);
            }
            _ => {
                real = len;
                groups.push(vec![i]);
            }
        }
    }
    groups
}

#[derive(Debug)]
pub struct EmbedJob {
    pub inputs: Vec<Encoding>,
    pub enqueued: Instant,
    pub reply: oneshot::Sender<Result<Vec<Vec<f32>>>>,
}

#[derive(Debug)]
pub struct GenerateJob {
    pub prompt: Vec<u32>,
    pub sampling: Sampling,
    pub enqueued: Instant,
    pub events: tokio::sync::mpsc::UnboundedSender<GenerateEvent>,
}

#[derive(Debug)]
pub enum GenerateEvent {
    /// Text that is final; sent as it is produced.
    Text(String),
    Done(Generation),
    Failed(Error),
}

#[derive(Debug)]
enum Job {
    Embed(EmbedJob),
    Generate(GenerateJob),
}

#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_batch: usize,
    pub max_wait: Duration,
}

/// Handle to the worker: submit jobs here. Cloning shares the same queue.
#[derive(Debug, Clone)]
pub struct Queue {
    tx: SyncSender<Job>,
    metrics: Arc<Metrics>,
}

impl Queue {
    /// Starts the worker thread that owns `engine`. The thread ends when every `Queue` is dropped;
    /// it drops the engine and then `keep` (a budget reservation), in that order.
    pub fn start(
        model: &str,
        engine: Box<dyn Engine>,
        capacity: usize,
        limits: BatchLimits,
        metrics: Arc<Metrics>,
        keep: Box<dyn Any + Send>,
    ) -> std::io::Result<Queue> {
        let (tx, rx) = mpsc::sync_channel(capacity);
        let m = metrics.clone();
        // Thread names are at most 15 bytes on Linux.
        let name: String = format!("w-{model}").chars().take(15).collect();
        thread::Builder::new()
            .name(name)
            .spawn(move || Worker { engine, rx, limits, metrics: m, carry: None, _keep: keep }.run())?;
        Ok(Queue { tx, metrics })
    }

    fn submit(&self, job: Job) -> Result<()> {
        self.metrics.waiting.inc();
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.metrics.waiting.dec();
                Err(match e {
                    TrySendError::Full(_) => Error::QueueFull,
                    TrySendError::Disconnected(_) => Error::WorkerGone,
                })
            }
        }
    }

    pub fn embed(&self, job: EmbedJob) -> Result<()> {
        self.submit(Job::Embed(job))
    }

    pub fn generate(&self, job: GenerateJob) -> Result<()> {
        self.submit(Job::Generate(job))
    }
}

struct Worker {
    engine: Box<dyn Engine>,
    rx: mpsc::Receiver<Job>,
    limits: BatchLimits,
    metrics: Arc<Metrics>,
    /// A job taken from the queue that did not fit in the previous batch.
    carry: Option<Job>,
    /// Dropped after `engine` (fields drop in order): the memory is free only once the engine is.
    _keep: Box<dyn Any + Send>,
}

impl Worker {
    fn take(&mut self, job: &Job) {
        self.metrics.waiting.dec();
        let enqueued = match job {
            Job::Embed(j) => j.enqueued,
            Job::Generate(j) => j.enqueued,
        };
        self.metrics.observe_queue(enqueued.elapsed());
    }

    fn run(mut self) {
        loop {
            let job = match self.carry.take() {
                Some(j) => j,
                None => match self.rx.recv() {
                    Ok(j) => {
                        self.take(&j);
                        j
                    }
                    Err(_) => return, // every Queue dropped: shut down
                },
            };
            match job {
                Job::Generate(j) => self.generate(j),
                Job::Embed(j) => {
                    let batch = self.collect(j);
                    self.embed(batch);
                }
            }
        }
    }

    /// Gathers embedding jobs for one forward pass, starting with `first`.
    #[allow(clippy::disallowed_methods)] // a batch waits for more jobs up to a wall-clock deadline
    fn collect(&mut self, first: EmbedJob) -> Vec<EmbedJob> {
        let deadline = Instant::now() + self.limits.max_wait;
        let mut size = first.inputs.len();
        let mut batch = vec![first];
        while size < self.limits.max_batch {
            let left = deadline.saturating_duration_since(Instant::now());
            let job = match self.rx.recv_timeout(left) {
                Ok(j) => j,
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            };
            self.take(&job);
            match job {
                Job::Embed(j) if size + j.inputs.len() <= self.limits.max_batch => {
                    size += j.inputs.len();
                    batch.push(j);
                }
                other => {
                    self.carry = Some(other);
                    break;
                }
            }
        }
        batch
    }

    fn embed(&mut self, batch: Vec<EmbedJob>) {
        // Drop requests whose caller already gave up.
        let batch: Vec<EmbedJob> = batch.into_iter().filter(|j| !j.reply.is_closed()).collect();
        if batch.is_empty() {
            return;
        }
        let n_jobs = batch.len() as i64;
        self.metrics.running.inc_by(n_jobs);
        let mut inputs = Vec::with_capacity(batch.iter().map(|j| j.inputs.len()).sum());
        let mut jobs = Vec::with_capacity(batch.len());
        for j in batch {
            jobs.push((j.inputs.len(), j.reply));
            inputs.extend(j.inputs);
        }
        self.metrics.exec_count.inc_by(1);
        let result = self.forward_grouped(&inputs);
        self.metrics.inference_count.inc_by(inputs.len() as u64);
        self.metrics.running.dec_by(n_jobs);
        match result {
            Ok(vectors) => {
                let mut rest = vectors.into_iter();
                for (n, reply) in jobs {
                    let _ = reply.send(Ok(rest.by_ref().take(n).collect()));
                }
            }
            Err(error) => {
                tracing::error!(%error, inputs = inputs.len(), "Embedding batch failed");
                for (_, reply) in jobs {
                    let _ = reply.send(Err(Error::WorkerGone));
                }
            }
        }
    }

    /// Runs a batch as forward passes over groups of similar length: padding a short text to a
    /// long one's length wastes attention work quadratic in the padded length. An engine that
    /// packs tokens pays for padding only inside attention, so its batch runs as one pass
    /// (32 of the benchmark's texts: 84 ms as one pass, 88 ms in three groups;
    /// `examples/ort_graph_ab.rs`). Vectors come back in input order.
    fn forward_grouped(&mut self, inputs: &[Encoding]) -> Result<Vec<Vec<f32>>> {
        let mut out = vec![Vec::new(); inputs.len()];
        let slack = if self.engine.packs_tokens() { f64::INFINITY } else { PADDING_SLACK };
        for group in length_groups_with(inputs, self.limits.max_batch, slack) {
            let batch: Vec<Encoding> = group.iter().map(|&i| inputs[i].clone()).collect();
            for (i, v) in group.into_iter().zip(self.engine.embed(&batch)?) {
                out[i] = v;
            }
        }
        Ok(out)
    }

    fn generate(&mut self, job: GenerateJob) {
        if job.events.is_closed() {
            return;
        }
        self.metrics.running.inc();
        self.metrics.exec_count.inc_by(1);
        let events = job.events.clone();
        let mut on_text = |piece: &str| events.send(GenerateEvent::Text(piece.to_string())).is_ok();
        let outcome = self.engine.generate(&job.prompt, &job.sampling, &mut on_text);
        self.metrics.running.dec();
        self.metrics.inference_count.inc_by(1);
        let _ = job.events.send(match outcome {
            Ok(g) => GenerateEvent::Done(g),
            Err(e) => {
                if matches!(e, Error::Inference(_)) {
                    tracing::error!(error = %e, "Generation failed");
                }
                GenerateEvent::Failed(e)
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(len: usize) -> Encoding {
        let mut e = Encoding::default();
        e.pad(len, 0, 0, "[PAD]", tokenizers::PaddingDirection::Right);
        e
    }

    #[test]
    fn length_groups_limit_padding_and_batch_size() {
        let lens = [12, 15, 16, 20, 20, 9, 19, 15];
        let inputs: Vec<Encoding> = lens.iter().cycle().take(32).map(|&l| enc(l)).collect();
        let groups = length_groups(&inputs, 32);
        let mut seen: Vec<usize> = groups.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..32).collect::<Vec<_>>(), "every input exactly once");
        for g in &groups {
            let longest = g.iter().map(|&i| inputs[i].len()).max().unwrap();
            let real: usize = g.iter().map(|&i| inputs[i].len()).sum();
            assert!((longest * g.len()) as f64 <= PADDING_SLACK * real as f64);
        }
        assert_eq!(groups.iter().map(Vec::len).collect::<Vec<_>>(), [4, 16, 12]);
        let same: Vec<Encoding> = (0..10).map(|_| enc(7)).collect();
        assert_eq!(length_groups(&same, 4).iter().map(Vec::len).collect::<Vec<_>>(), [4, 4, 2]);
        // No slack limit: only the batch size splits, still in length order.
        let packed = length_groups_with(&inputs, 32, f64::INFINITY);
        assert_eq!(packed.len(), 1);
        assert!(packed[0].windows(2).all(|w| inputs[w[0]].len() <= inputs[w[1]].len()));
    }
}
