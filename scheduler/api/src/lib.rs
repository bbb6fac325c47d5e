//! Kubernetes-facing tessera types.
//!
//! - [`gpunode`]: the cluster-scoped `GpuNode` custom resource (`gpunodes.tessera.dev`, v1alpha1):
//!   `spec` is written by the scheduler (desired GPU modes and MIG instances), `status` by the
//!   node agent (what the node really has).
//! - [`annotations`]: annotation keys tessera reads and writes.
//! - [`assignment`]: the `tessera.dev/assignment` JSON written on a pod through its Binding.
//!
//! Pod → `Demand` parsing and the `PodGroup` type are not part of this crate yet.

pub mod annotations;
pub mod assignment;
pub mod gpunode;

pub use assignment::{AssignedDevice, Assignment};
pub use gpunode::{GpuNode, GpuNodeSpec, GpuNodeStatus};
