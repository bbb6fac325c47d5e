//! tessera's node agent: discovers GPUs through NVML, applies the MIG layout the scheduler asks
//! for without breaking running workloads, serves the kubelet device plugin, exports node metrics.
//!
//! - [`gpu`]: the [`gpu::GpuBackend`] seam (nvml, fake, null).
//! - [`mig`]: the pure planner and the executor.
//! - [`pods`]: who holds which device (assignment annotations).
//! - [`device_plugin`]: kubelet device plugin for `tessera.dev/gpu`.
//! - [`metrics`]: the `tessera_node_*` series.

pub mod agent;
pub mod device_plugin;
pub mod error;
pub mod events;
pub mod gpu;
pub mod http;
pub mod metrics;
pub mod mig;
pub mod podresources;
pub mod pods;
pub mod status;

pub use error::{Error, Result};
