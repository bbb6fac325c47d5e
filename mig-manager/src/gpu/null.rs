//! The backend used when NVML cannot start: every call fails with the reason.

use std::collections::BTreeSet;

use tessera_core::MigOp;

use super::{GpuBackend, GpuError, GpuInfo, Link, MigDevice, Sample};

/// No GPUs can be reached; the agent reports `NvmlReady=False` and serves no devices.
#[derive(Clone, Debug)]
pub struct NullBackend {
    reason: String,
}

impl NullBackend {
    pub fn new(reason: impl Into<String>) -> Self {
        Self { reason: reason.into() }
    }

    fn err(&self) -> GpuError {
        GpuError::NoNvml(self.reason.clone())
    }
}

impl GpuBackend for NullBackend {
    fn name(&self) -> &'static str {
        "null"
    }
    fn devices(&self) -> Result<Vec<GpuInfo>, GpuError> {
        Err(self.err())
    }
    fn mig_devices(&self, _gpu: u32) -> Result<Vec<MigDevice>, GpuError> {
        Err(self.err())
    }
    fn links(&self) -> Result<Vec<Link>, GpuError> {
        Err(self.err())
    }
    fn sample(&self, _gpu: u32) -> Result<Sample, GpuError> {
        Err(self.err())
    }
    fn busy(&self) -> Result<BTreeSet<String>, GpuError> {
        Err(self.err())
    }
    fn apply(&self, _op: &MigOp) -> Result<(), GpuError> {
        Err(self.err())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_backend_reports_why_nvml_is_missing_on_every_call() {
        let b = NullBackend::new("libnvidia-ml.so.1: cannot open shared object file");
        let e = b.devices().unwrap_err();
        assert_eq!(e.kind(), "no_nvml");
        assert!(e.to_string().contains("libnvidia-ml.so.1"));
        assert!(b.apply(&MigOp::SetMode { gpu: 0, mode: tessera_core::GpuMode::Mig }).is_err());
    }
}
