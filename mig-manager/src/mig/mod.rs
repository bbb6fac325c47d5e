//! MIG reconciliation: [`plan`] (pure: desired × observed → ordered ops) and [`reconcile`]
//! (runs a plan against a [`crate::gpu::GpuBackend`]).

pub mod plan;
pub mod reconcile;
