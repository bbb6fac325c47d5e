//! The NVML seam: a [`GpuBackend`] returns owned plain data, never NVML handles.
//!
//! Three implementations: [`nvml::NvmlBackend`] (the real GPUs), [`fake::FakeGpus`] (exact MIG
//! behaviour from `tessera-core`'s geometry, with scriptable faults) and [`null::NullBackend`]
//! (NVML could not start: every call says why).

use std::collections::BTreeSet;
use std::fmt;

use tessera_api::gpunode::LinkKind;
use tessera_core::mig::{Instance, MigError, MigLayout, MigProduct};
use tessera_core::{GpuMode, MigOp};

pub mod fake;
pub mod null;
pub mod nvml;

/// One physical GPU as discovered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    pub index: u32,
    /// `GPU-…`.
    pub uuid: String,
    /// Product name as the driver reports it, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// The MIG product tessera knows this GPU as, when it is MIG-capable.
    pub product: Option<MigProduct>,
    pub memory_mib: u64,
    /// Current mode: [`GpuMode::Full`] or [`GpuMode::Mig`].
    pub mode: GpuMode,
    /// A mode change that waits for a GPU reset.
    pub pending_mode: Option<GpuMode>,
    pub numa_node: Option<u32>,
    pub pci_bus_id: String,
    pub healthy: bool,
}

impl GpuInfo {
    /// The product name tessera uses (`H100-80GB`), or the driver's name for other GPUs.
    pub fn product_name(&self) -> String {
        self.product.map_or_else(|| self.name.clone(), |p| p.name().to_owned())
    }
}

/// One MIG device (a GPU instance with its full-size compute instance).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigDevice {
    pub instance: Instance,
    /// `MIG-…`.
    pub uuid: String,
}

/// A link between two GPU indices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub a: u32,
    pub b: u32,
    pub kind: LinkKind,
    pub lanes: Option<u32>,
}

/// Live readings of one GPU; a reading the GPU does not support is `None`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    pub utilization_pct: Option<u32>,
    pub memory_used_mib: Option<u64>,
    pub memory_total_mib: Option<u64>,
    pub temperature_c: Option<u32>,
    pub power_mw: Option<u32>,
    /// Memory used per MIG instance UUID.
    pub mig_memory_used_mib: Vec<(String, u64)>,
}

/// Why a backend call failed.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("NVML is not available: {0}")]
    NoNvml(String),
    #[error("NVML call {call} failed: {message}")]
    Nvml { call: &'static str, message: String },
    #[error("GPU {0} is not present")]
    NoSuchGpu(u32),
    #[error("GPU {gpu}: MIG refused: {reason}")]
    Refused { gpu: u32, reason: MigError },
    #[error("GPU {gpu}: {what} is in use")]
    InUse { gpu: u32, what: String },
    #[error("GPU {gpu}: {what} is not supported")]
    Unsupported { gpu: u32, what: String },
    #[error("injected fault: {0}")]
    Injected(String),
}

impl GpuError {
    /// Short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            GpuError::NoNvml(_) => "no_nvml",
            GpuError::Nvml { .. } => "nvml",
            GpuError::NoSuchGpu(_) => "no_such_gpu",
            GpuError::Refused { .. } => "refused",
            GpuError::InUse { .. } => "in_use",
            GpuError::Unsupported { .. } => "unsupported",
            GpuError::Injected(_) => "injected",
        }
    }
}

/// Access to the node's GPUs. Implementations are blocking; call them off the async runtime.
pub trait GpuBackend: Send + Sync + fmt::Debug {
    /// `nvml`, `fake` or `null`.
    fn name(&self) -> &'static str;
    /// Every GPU present, by index.
    fn devices(&self) -> Result<Vec<GpuInfo>, GpuError>;
    /// The MIG devices on a GPU in MIG mode (empty otherwise), sorted by start.
    fn mig_devices(&self, gpu: u32) -> Result<Vec<MigDevice>, GpuError>;
    /// Interconnect between GPUs.
    fn links(&self) -> Result<Vec<Link>, GpuError>;
    /// Live readings of a GPU.
    fn sample(&self, gpu: u32) -> Result<Sample, GpuError>;
    /// UUIDs (GPU or MIG) on which a compute process runs now.
    fn busy(&self) -> Result<BTreeSet<String>, GpuError>;
    /// Applies one MIG operation. Creating an instance also creates its full-size compute
    /// instance; destroying one destroys its compute instances first.
    fn apply(&self, op: &MigOp) -> Result<(), GpuError>;
    /// Resets a GPU so that a pending MIG mode change takes effect. Only called when nothing
    /// on the GPU is in use. Backends that cannot reset say `Unsupported`; the change is then
    /// reported as waiting for a reset.
    fn reset(&self, gpu: u32) -> Result<(), GpuError> {
        Err(GpuError::Unsupported { gpu, what: "GPU reset".into() })
    }
}

/// One GPU with its MIG devices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedGpu {
    pub info: GpuInfo,
    pub mig: Vec<MigDevice>,
}

impl ObservedGpu {
    /// The MIG layout, when the GPU is in MIG mode and its product is known.
    pub fn layout(&self) -> Option<Result<MigLayout, MigError>> {
        let product = self.info.product?;
        (self.info.mode == GpuMode::Mig).then(|| {
            let instances: Vec<Instance> = self.mig.iter().map(|m| m.instance).collect();
            MigLayout::from_instances(product, &instances)
        })
    }

    /// UUID of the MIG device at `start`, if any.
    pub fn mig_uuid_at(&self, start: u8) -> Option<&str> {
        self.mig.iter().find(|m| m.instance.start == start).map(|m| m.uuid.as_str())
    }
}

/// Everything discovered in one pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub gpus: Vec<ObservedGpu>,
}

impl Observed {
    pub fn gpu(&self, index: u32) -> Option<&ObservedGpu> {
        self.gpus.iter().find(|g| g.info.index == index)
    }

    /// Finds a GPU by UUID.
    pub fn gpu_by_uuid(&self, uuid: &str) -> Option<&ObservedGpu> {
        self.gpus.iter().find(|g| g.info.uuid == uuid)
    }
}

/// Lists every GPU and its MIG devices.
pub fn observe(backend: &dyn GpuBackend) -> Result<Observed, GpuError> {
    let mut gpus = Vec::new();
    for info in backend.devices()? {
        let mig = if info.mode == GpuMode::Mig { backend.mig_devices(info.index)? } else { Vec::new() };
        gpus.push(ObservedGpu { info, mig });
    }
    gpus.sort_by_key(|g| g.info.index);
    Ok(Observed { gpus })
}

/// The GPU index an op acts on.
pub fn op_gpu(op: &MigOp) -> u32 {
    match *op {
        MigOp::SetMode { gpu, .. } | MigOp::Create { gpu, .. } | MigOp::Destroy { gpu, .. } => gpu,
    }
}
