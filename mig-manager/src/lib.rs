//! tessera's node agent: discovers GPUs through NVML, applies the MIG layout the scheduler asks
//! for without breaking running workloads, serves the kubelet device plugin, exports node metrics.
//!
//! - [`gpu`]: the [`gpu::GpuBackend`] seam (nvml, fake, null).
//! - [`mig`]: the pure planner and the executor.

pub mod error;
pub mod gpu;
pub mod mig;

pub use error::{Error, Result};
