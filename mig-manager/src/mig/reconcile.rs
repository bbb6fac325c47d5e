//! The executor: observe, plan, apply op by op, observe again.
//!
//! Idempotent and restart-safe: nothing is remembered between passes, every pass starts from
//! what NVML reports, so a pass cut short (crash, failed op, vanished GPU) is finished by the
//! next one. Right before each destroy or mode switch the in-use set is read again, so a device
//! handed to a container after planning is never destroyed.

use std::collections::BTreeSet;
use std::sync::Arc;

use tessera_api::gpunode::GpuSpec;
use tessera_core::MigOp;
use tracing::{debug, info, warn};

use super::plan::{Blocked, in_use_on, plan};
use crate::gpu::{GpuBackend, GpuError, Observed, ObservedGpu, observe, op_gpu};

/// What one pass did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub applied: Vec<MigOp>,
    /// Ops that failed, with the error.
    pub failed: Vec<(MigOp, GpuError)>,
    /// Ops not run: an earlier op on the same GPU failed, or a device became in use.
    pub skipped: Vec<MigOp>,
    /// GPUs that still cannot reach their spec (from a plan on the state after the pass).
    pub blocked: Vec<Blocked>,
    /// The state after the pass.
    pub observed: Observed,
    /// The node matches its spec.
    pub converged: bool,
    /// GPUs reset this pass to apply a pending MIG mode change.
    pub resets: Vec<u32>,
}

/// Applies `GpuNode.spec` to a backend.
#[derive(Clone, Debug)]
pub struct Reconciler {
    backend: Arc<dyn GpuBackend>,
}

fn uuids_on(gpu: &ObservedGpu) -> impl Iterator<Item = &str> {
    std::iter::once(gpu.info.uuid.as_str()).chain(gpu.mig.iter().map(|m| m.uuid.as_str()))
}

impl Reconciler {
    pub fn new(backend: Arc<dyn GpuBackend>) -> Self {
        Self { backend }
    }

    fn live_in_use(&self, in_use: &dyn Fn() -> BTreeSet<String>) -> Result<BTreeSet<String>, GpuError> {
        let mut set = in_use();
        set.extend(self.backend.busy()?);
        Ok(set)
    }

    /// One pass. `in_use` returns the UUIDs containers hold (assignments of live pods and the
    /// device plugin's recent allocations); NVML's running processes are added here. Blocking.
    pub fn reconcile(&self, desired: &[GpuSpec], in_use: &dyn Fn() -> BTreeSet<String>) -> Result<Outcome, GpuError> {
        let mut before = observe(self.backend.as_ref())?;
        let live = self.live_in_use(in_use)?;
        let mut out = Outcome::default();
        // A mode change waiting for a reset: reset the GPU once nothing on it is in use.
        for g in &before.gpus {
            let pending = g.info.pending_mode.is_some_and(|p| p != g.info.mode);
            if !pending || !desired.iter().any(|d| d.index == g.info.index) || !in_use_on(g, &live).is_empty() {
                continue;
            }
            match self.backend.reset(g.info.index) {
                Ok(()) => {
                    info!(gpu = g.info.index, "GPU reset: the pending MIG mode change took effect");
                    out.resets.push(g.info.index);
                }
                Err(GpuError::Unsupported { .. }) => {}
                Err(error) => warn!(%error, gpu = g.info.index, "GPU reset failed; will retry"),
            }
        }
        if !out.resets.is_empty() {
            before = observe(self.backend.as_ref())?;
        }
        let planned = plan(desired, &before, &live);
        let mut stopped: BTreeSet<u32> = BTreeSet::new();
        for op in planned.ops {
            let gpu = op_gpu(&op);
            if stopped.contains(&gpu) {
                out.skipped.push(op);
                continue;
            }
            if let Some(conflict) = self.conflict(&op, &before, in_use)? {
                info!(gpu, device = %conflict, "Device became in use; not destroying it");
                out.skipped.push(op);
                stopped.insert(gpu);
                continue;
            }
            match self.backend.apply(&op) {
                Ok(()) => {
                    debug!(?op, "Applied MIG op");
                    out.applied.push(op);
                }
                Err(error) => {
                    warn!(%error, ?op, "MIG op failed; will retry");
                    out.failed.push((op, error));
                    stopped.insert(gpu);
                }
            }
        }
        let after = observe(self.backend.as_ref())?;
        let live = self.live_in_use(in_use)?;
        let check = plan(desired, &after, &live);
        out.converged = check.is_converged();
        out.blocked = check.blocked;
        out.observed = after;
        if !out.applied.is_empty() {
            info!(ops = out.applied.len(), converged = out.converged, "MIG layout applied");
        }
        Ok(out)
    }

    /// A device the op would remove that is in use now, re-read just before the op.
    fn conflict(
        &self,
        op: &MigOp,
        before: &Observed,
        in_use: &dyn Fn() -> BTreeSet<String>,
    ) -> Result<Option<String>, GpuError> {
        let Some(gpu) = before.gpu(op_gpu(op)) else { return Ok(None) };
        let touched: Vec<&str> = match *op {
            MigOp::Create { .. } => return Ok(None),
            MigOp::Destroy { start, .. } => gpu.mig_uuid_at(start).into_iter().collect(),
            MigOp::SetMode { .. } => uuids_on(gpu).collect(),
        };
        let live = self.live_in_use(in_use)?;
        Ok(touched.into_iter().find(|u| live.contains(*u)).map(str::to_owned))
    }
}

#[cfg(test)]
mod tests;
