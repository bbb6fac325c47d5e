//! The pure planner: desired `GpuNode.spec` × observed GPUs × in-use devices → ordered [`MigOp`]s.
//!
//! Rules:
//! - an instance whose UUID is in use is never destroyed; the GPU is reported [`Blocked`];
//! - a mode switch (full ↔ mig) happens only on a GPU with nothing in use;
//! - per GPU the order is: destroys, mode switch, creates by ascending start. Every intermediate
//!   layout is a subset of either the observed or the desired layout, so NVIDIA accepts each step;
//! - GPUs the spec does not list are left alone. Planning twice on the result plans nothing.

use std::collections::BTreeSet;
use std::fmt;

use tessera_api::gpunode::{GpuSpec, Mode};
use tessera_core::mig::{Instance, MigLayout};
use tessera_core::{GpuMode, MigOp};

use crate::gpu::{Observed, ObservedGpu};

/// The ops to run, and the GPUs that cannot reach their spec now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub ops: Vec<MigOp>,
    pub blocked: Vec<Blocked>,
}

impl Plan {
    /// Nothing to do and nothing blocked: the node matches its spec.
    pub fn is_converged(&self) -> bool {
        self.ops.is_empty() && self.blocked.is_empty()
    }
}

/// A GPU that cannot reach its spec now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked {
    pub gpu: u32,
    pub reason: BlockReason,
}

/// Why a GPU cannot reach its spec. Each maps to a `Reconciled=False` condition reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockReason {
    /// Devices a running container holds would have to go.
    InUse { uuids: Vec<String> },
    /// The spec names a profile this product lacks or a layout NVIDIA would refuse.
    InvalidSpec(String),
    /// The spec asks for MIG on a GPU without MIG.
    NotMigCapable,
    /// The spec names a GPU index that is not present.
    GpuMissing,
    /// A mode change waits for a GPU reset or reboot.
    ModePending,
}

impl BlockReason {
    /// The condition reason (CamelCase).
    pub fn reason(&self) -> &'static str {
        match self {
            BlockReason::InUse { .. } => "InstanceInUse",
            BlockReason::InvalidSpec(_) => "InvalidSpec",
            BlockReason::NotMigCapable => "NotMigCapable",
            BlockReason::GpuMissing => "GpuMissing",
            BlockReason::ModePending => "ModeChangePending",
        }
    }
}

impl fmt::Display for Blocked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reason {
            BlockReason::InUse { uuids } => {
                write!(f, "GPU {}: kept because in use: {}", self.gpu, uuids.join(","))
            }
            BlockReason::InvalidSpec(why) => write!(f, "GPU {}: invalid spec: {why}", self.gpu),
            BlockReason::NotMigCapable => write!(f, "GPU {}: spec asks for MIG but the GPU has no MIG", self.gpu),
            BlockReason::GpuMissing => write!(f, "GPU {}: not present on the node", self.gpu),
            BlockReason::ModePending => write!(
                f,
                "GPU {}: MIG mode change waits for a GPU reset (done by the agent once nothing uses the GPU where \
                 the backend can reset; otherwise `nvidia-smi -r -i {}` or a reboot)",
                self.gpu, self.gpu
            ),
        }
    }
}

/// Resolves a GPU's desired instances to a layout NVIDIA would accept.
pub fn desired_layout(spec: &GpuSpec, gpu: &ObservedGpu) -> Result<MigLayout, BlockReason> {
    let product = gpu.info.product.ok_or(BlockReason::NotMigCapable)?;
    let geom = product.geometry();
    let mut instances = Vec::with_capacity(spec.instances.len());
    for i in &spec.instances {
        let p = geom
            .profile_by_name(&i.profile)
            .ok_or_else(|| BlockReason::InvalidSpec(format!("{product} has no MIG profile {}", i.profile)))?;
        instances.push(Instance { class: p.class, start: i.start });
    }
    MigLayout::from_instances(product, &instances).map_err(|e| BlockReason::InvalidSpec(e.to_string()))
}

/// Plans every GPU the spec lists, in index order.
pub fn plan(desired: &[GpuSpec], observed: &Observed, in_use: &BTreeSet<String>) -> Plan {
    let mut specs: Vec<&GpuSpec> = desired.iter().collect();
    specs.sort_by_key(|s| s.index);
    let mut out = Plan::default();
    for spec in specs {
        let Some(gpu) = observed.gpu(spec.index) else {
            out.blocked.push(Blocked { gpu: spec.index, reason: BlockReason::GpuMissing });
            continue;
        };
        if let Err(reason) = plan_gpu(spec, gpu, in_use, &mut out.ops) {
            out.blocked.push(Blocked { gpu: spec.index, reason });
        }
    }
    out
}

/// The UUIDs of a GPU and its MIG devices that are in use.
pub fn in_use_on(gpu: &ObservedGpu, in_use: &BTreeSet<String>) -> Vec<String> {
    std::iter::once(gpu.info.uuid.as_str())
        .chain(gpu.mig.iter().map(|m| m.uuid.as_str()))
        .filter(|u| in_use.contains(*u))
        .map(str::to_owned)
        .collect()
}

fn plan_gpu(
    spec: &GpuSpec,
    gpu: &ObservedGpu,
    in_use: &BTreeSet<String>,
    ops: &mut Vec<MigOp>,
) -> Result<(), BlockReason> {
    let index = gpu.info.index;
    if gpu.info.pending_mode.is_some_and(|p| p != gpu.info.mode) {
        return Err(BlockReason::ModePending);
    }
    let is_mig = gpu.info.mode == GpuMode::Mig;
    match spec.mode {
        Mode::Full if !is_mig => Ok(()),
        Mode::Full => {
            let busy = in_use_on(gpu, in_use);
            if !busy.is_empty() {
                return Err(BlockReason::InUse { uuids: busy });
            }
            for m in &gpu.mig {
                ops.push(MigOp::Destroy { gpu: index, class: m.instance.class, start: m.instance.start });
            }
            ops.push(MigOp::SetMode { gpu: index, mode: GpuMode::Full });
            Ok(())
        }
        Mode::Mig => {
            let want = desired_layout(spec, gpu)?;
            if !is_mig {
                let busy = in_use_on(gpu, in_use);
                if !busy.is_empty() {
                    return Err(BlockReason::InUse { uuids: busy });
                }
                ops.push(MigOp::SetMode { gpu: index, mode: GpuMode::Mig });
                for i in want.instances() {
                    ops.push(MigOp::Create { gpu: index, class: i.class, start: i.start });
                }
                return Ok(());
            }
            plan_mig_diff(gpu, &want, in_use, ops)
        }
    }
}

fn plan_mig_diff(
    gpu: &ObservedGpu,
    want: &MigLayout,
    in_use: &BTreeSet<String>,
    ops: &mut Vec<MigOp>,
) -> Result<(), BlockReason> {
    let index = gpu.info.index;
    let wanted = |i: &Instance| want.instances().contains(i);
    let mut kept_busy = Vec::new();
    // What stays after the destroys: wanted instances and in-use extras.
    let mut staying = Vec::new();
    for m in &gpu.mig {
        if wanted(&m.instance) {
            staying.push(m.instance);
        } else if in_use.contains(&m.uuid) {
            kept_busy.push(m.uuid.clone());
            staying.push(m.instance);
        } else {
            ops.push(MigOp::Destroy { gpu: index, class: m.instance.class, start: m.instance.start });
        }
    }
    let product = want.product();
    // `staying` is a subset of the observed layout, which NVIDIA built, so it is valid; if the
    // observed layout is somehow not, destroy nothing more and report.
    let mut layout = MigLayout::from_instances(product, &staying)
        .map_err(|e| BlockReason::InvalidSpec(format!("observed layout is not valid: {e}")))?;
    let mut missing: Vec<Instance> =
        want.instances().iter().copied().filter(|i| !gpu.mig.iter().any(|m| m.instance == *i)).collect();
    missing.sort_by_key(|i| (i.start, i.class));
    for i in missing {
        // With nothing kept busy every check passes (subset of the desired layout).
        if layout.create(i.class, i.start).is_ok() {
            ops.push(MigOp::Create { gpu: index, class: i.class, start: i.start });
        }
    }
    if kept_busy.is_empty() { Ok(()) } else { Err(BlockReason::InUse { uuids: kept_busy }) }
}

#[cfg(test)]
mod tests;
