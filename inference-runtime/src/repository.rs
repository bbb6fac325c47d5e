//! The model repository: every configured model with its own queue, batcher, admission and
//! metrics, loaded within one memory budget.
//!
//! A load first sizes the model from its folder ([`engine::plan`]) and reserves that much of
//! the budget; a model that does not fit is refused with the numbers, before any weights are
//! read, so the process never runs out of memory by loading one more model. The reservation
//! belongs to the model's worker thread and is released when that thread has dropped the
//! engine: after an unload, requests already running finish and only then is the memory free
//! for another model. Only configured models can be loaded; a request never names a folder.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::Device;
use serde::Serialize;
use tokenizers::Tokenizer;

use crate::admission::Admission;
use crate::batching::{BatchLimits, Queue};
use crate::config::{ModelServing, ModelSpec, Serving};
use crate::engine::{self, Engine, Kind, MemoryPlan, ModelInfo, OrtOptions};
use crate::metrics::{self, Metrics};
use crate::{Error, Result};

/// A model that is loaded: its worker's queue and what handlers need to admit requests.
#[derive(Debug)]
pub struct Loaded {
    pub info: ModelInfo,
    pub tokenizer: Arc<Tokenizer>,
    pub queue: Queue,
    /// Effective embedding batch: the configured one, lowered to what memory allows.
    pub max_batch: usize,
    pub plan: MemoryPlan,
}

#[derive(Debug, Clone)]
enum State {
    /// Not loaded; why, when a load failed or was refused.
    Unavailable(Option<String>),
    Loading,
    Ready(Arc<Loaded>),
}

/// One configured model.
#[derive(Debug)]
pub struct Slot {
    pub spec: ModelSpec,
    pub serving: ModelServing,
    pub admission: Admission,
    pub metrics: Arc<Metrics>,
    state: Mutex<State>,
}

/// KServe repository index states (Triton's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Status {
    #[serde(rename = "READY")]
    Ready,
    #[serde(rename = "LOADING")]
    Loading,
    /// Unloaded, but requests still running hold its memory.
    #[serde(rename = "UNLOADING")]
    Unloading,
    #[serde(rename = "UNAVAILABLE")]
    Unavailable,
}

impl Slot {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The loaded model, if it is ready.
    pub fn loaded(&self) -> Option<Arc<Loaded>> {
        match &*self.state() {
            State::Ready(l) => Some(l.clone()),
            _ => None,
        }
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }
}

#[derive(Debug, Default)]
struct Ledger {
    next_id: u64,
    /// id → (model, bytes)
    held: BTreeMap<u64, (String, u64)>,
}

/// The memory budget and who holds what of it.
#[derive(Debug)]
pub struct Budget {
    total: u64,
    ledger: Mutex<Ledger>,
    gauges: Arc<metrics::Budget>,
}

impl Budget {
    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn reserved(&self) -> u64 {
        self.ledger().held.values().map(|(_, b)| b).sum()
    }

    fn holds(&self, model: &str) -> bool {
        self.ledger().held.values().any(|(m, _)| m == model)
    }

    /// Reserves `bytes` for `model` or says, with the numbers, why it does not fit.
    fn reserve(self: &Arc<Self>, model: &str, bytes: u64, metrics: Arc<Metrics>) -> Result<Reservation> {
        let mut l = self.ledger();
        let used: u64 = l.held.values().map(|(_, b)| b).sum();
        if used.saturating_add(bytes) > self.total {
            let holders: Vec<String> = l.held.values().map(|(m, b)| format!("{m} {}", mib(*b))).collect();
            let holders = if holders.is_empty() { "nothing".to_string() } else { holders.join(", ") };
            return Err(Error::OverBudget(format!(
                "model `{model}` needs {} but only {} of the {} memory budget is free ({holders} loaded); \
                 unload a model or give the pod more memory (tessera-runtime plan)",
                mib(bytes),
                mib(self.total.saturating_sub(used)),
                mib(self.total)
            )));
        }
        let id = l.next_id;
        l.next_id += 1;
        l.held.insert(id, (model.to_string(), bytes));
        self.gauges.reserved_bytes.set((used + bytes).min(i64::MAX as u64) as i64);
        metrics.memory_bytes.set(bytes.min(i64::MAX as u64) as i64);
        Ok(Reservation { budget: self.clone(), id, metrics })
    }
}

/// Formats bytes as MiB, rounded up.
pub fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes.div_ceil(1 << 20))
}

/// A model's share of the budget; released on drop (by the worker thread, after the engine).
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<Budget>,
    id: u64,
    metrics: Arc<Metrics>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut l = self.budget.ledger();
        l.held.remove(&self.id);
        let used: u64 = l.held.values().map(|(_, b)| b).sum();
        self.budget.gauges.reserved_bytes.set(used.min(i64::MAX as u64) as i64);
        self.metrics.memory_bytes.set(0);
    }
}

/// One row of `POST /v2/repository/index`.
#[derive(Debug, Clone, Serialize)]
pub struct IndexEntry {
    pub name: String,
    pub version: &'static str,
    pub state: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub engine: Option<&'static str>,
    /// The reservation while loaded (the plan's total).
    pub memory_bytes: Option<u64>,
}

/// Every configured model, in configuration order, and the budget they share.
#[derive(Debug)]
pub struct Repository {
    slots: Vec<Arc<Slot>>,
    budget: Arc<Budget>,
    device: Device,
    ort: OrtOptions,
}

impl Repository {
    pub fn new(specs: Vec<ModelSpec>, serving: &Serving, budget_bytes: u64, device: Device) -> Result<Self> {
        crate::config::check_models(&specs)?;
        let slots = specs
            .into_iter()
            .map(|spec| {
                let serving = serving.for_model(&spec);
                Arc::new(Slot {
                    admission: Admission::new(serving.policy.clone()),
                    serving,
                    spec,
                    metrics: Arc::new(Metrics::default()),
                    state: Mutex::new(State::Unavailable(None)),
                })
            })
            .collect();
        let gauges = Arc::new(metrics::Budget::default());
        gauges.budget_bytes.set(budget_bytes.min(i64::MAX as u64) as i64);
        Ok(Repository {
            slots,
            budget: Arc::new(Budget { total: budget_bytes, ledger: Mutex::default(), gauges }),
            device,
            ort: OrtOptions { library: serving.ort_library.clone(), threads: serving.ort_threads },
        })
    }

    pub fn slots(&self) -> &[Arc<Slot>] {
        &self.slots
    }

    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    pub fn budget_gauges(&self) -> &metrics::Budget {
        &self.budget.gauges
    }

    pub fn get(&self, name: &str) -> Result<&Arc<Slot>> {
        self.slots.iter().find(|s| s.name() == name).ok_or_else(|| Error::UnknownModel(name.to_string()))
    }

    /// Sizes every model loaded at start and refuses the set if it exceeds the budget, naming
    /// each model's share, before anything is loaded.
    pub fn check_startup(&self) -> Result<()> {
        let mut total = 0u64;
        let mut parts = Vec::new();
        for slot in self.slots.iter().filter(|s| s.spec.load) {
            let plan = engine::plan(&slot.spec, &slot.serving).inspect_err(|e| {
                *slot.state() = State::Unavailable(Some(e.to_string()));
            })?;
            total = total.saturating_add(plan.total_bytes());
            parts.push(format!("{} {}", slot.name(), mib(plan.total_bytes())));
        }
        if total > self.budget.total {
            return Err(Error::OverBudget(format!(
                "the models loaded at start need {} ({}) but the memory budget is {}",
                mib(total),
                parts.join(", "),
                mib(self.budget.total)
            )));
        }
        Ok(())
    }

    /// Loads a configured model (blocking: reads weights). Loading a ready model is a no-op.
    pub fn load(&self, name: &str) -> Result<()> {
        let slot = self.get(name)?;
        {
            let mut st = slot.state();
            match &*st {
                State::Ready(_) => return Ok(()),
                State::Loading => return Err(Error::Conflict(format!("model `{name}` is already loading"))),
                State::Unavailable(_) => *st = State::Loading,
            }
        }
        // A panic inside an engine's loader must not leave the model `LOADING` for ever.
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.load_inner(slot))).unwrap_or_else(|_| {
                Err(Error::LoadModel { dir: slot.spec.dir.display().to_string(), reason: "the loader panicked".into() })
            });
        let mut st = slot.state();
        match result {
            Ok(loaded) => {
                slot.metrics.loaded.set(1);
                *st = State::Ready(Arc::new(loaded));
                Ok(())
            }
            Err(e) => {
                *st = State::Unavailable(Some(e.to_string()));
                Err(e)
            }
        }
    }

    fn load_inner(&self, slot: &Slot) -> Result<Loaded> {
        let plan = engine::plan(&slot.spec, &slot.serving)?;
        let reservation = self.budget.reserve(slot.name(), plan.total_bytes(), slot.metrics.clone())?;
        let engine = engine::load_spec(&slot.spec, &plan, &self.device, &self.ort)?;
        start(slot, engine, plan, reservation)
    }

    /// Unloads a model: new requests get 503 at once, running ones finish, then the worker
    /// drops the engine and releases the memory. Unloading an unloaded model is a no-op.
    pub fn unload(&self, name: &str) -> Result<()> {
        let slot = self.get(name)?;
        let mut st = slot.state();
        match &*st {
            State::Loading => Err(Error::Conflict(format!("model `{name}` is loading; unload it once it is ready"))),
            State::Ready(_) => {
                *st = State::Unavailable(Some("unloaded".into()));
                slot.metrics.loaded.set(0);
                Ok(())
            }
            State::Unavailable(_) => Ok(()),
        }
    }

    /// What `POST /v2/repository/index` lists.
    pub fn index(&self) -> Vec<IndexEntry> {
        self.slots
            .iter()
            .map(|slot| {
                let st = slot.state().clone();
                let (state, reason, plan) = match st {
                    State::Ready(l) => (Status::Ready, None, Some(l.plan.clone())),
                    State::Loading => (Status::Loading, None, None),
                    State::Unavailable(r) if self.budget.holds(slot.name()) => (Status::Unloading, r, None),
                    State::Unavailable(r) => (Status::Unavailable, r, None),
                };
                IndexEntry {
                    name: slot.name().to_string(),
                    version: "1",
                    state,
                    reason,
                    engine: plan.as_ref().map(|p| p.engine.as_str()),
                    memory_bytes: plan.map(|p| p.total_bytes()),
                }
            })
            .collect()
    }
}

/// Hands the engine and its reservation to a new worker thread.
fn start(slot: &Slot, engine: Box<dyn Engine>, plan: MemoryPlan, reservation: Reservation) -> Result<Loaded> {
    let info = engine.info().clone();
    let tokenizer = engine.tokenizer();
    let max_batch = match info.kind {
        Kind::Embedding => slot.serving.max_batch.min(info.memory_cap).max(1),
        Kind::Chat => 1,
    };
    let limits = BatchLimits { max_batch, max_wait: slot.serving.max_wait };
    let queue = Queue::start(
        slot.name(),
        engine,
        slot.serving.queue_capacity,
        limits,
        slot.metrics.clone(),
        Box::new(reservation),
    )
    .map_err(|e| Error::LoadModel {
        dir: slot.spec.dir.display().to_string(),
        reason: format!("starting worker: {e}"),
    })?;
    Ok(Loaded { info, tokenizer, queue, max_batch, plan })
}
