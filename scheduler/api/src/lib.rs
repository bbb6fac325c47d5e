//! Kubernetes-facing tessera types.
//!
//! - [`gpunode`]: the cluster-scoped `GpuNode` custom resource (`gpunodes.tessera.dev`, v1alpha1):
//!   `spec` is written by the scheduler (desired GPU modes and MIG instances), `status` by the
//!   node agent (what the node really has).
//! - [`annotations`]: annotation keys tessera reads and writes.
//! - [`assignment`]: the `tessera.dev/assignment` JSON written on a pod through its Binding, and
//!   the devices a core [`tessera_core::Placement`] names in it.
//! - [`kube_error`]: Kubernetes API errors rendered as one sentence (no debug dumps).
//! - [`pod`]: Pod → [`tessera_core::Demand`], with errors that name the annotation and value.
//! - [`podgroup`]: the scheduler-plugins `PodGroup` (`scheduling.x-k8s.io/v1alpha1`) for gangs.
//! - [`signing`]: HMAC signatures over assignments, checked by the node agent and the rebuild.
//! - [`snapshot`]: Nodes + `GpuNode`s + bound pods → a core [`tessera_core::Snapshot`].
//! - [`synthetic`]: generated Nodes and `GpuNode`s for benchmarks.
//! - [`views`]: the scheduler's read-only JSON API (`/api/v1/cluster`, `pending`, `explain`).

pub mod annotations;
pub mod assignment;
pub mod gpunode;
pub mod incremental;
pub mod kube_error;
pub mod pod;
pub mod podgroup;
pub mod signing;
pub mod snapshot;
pub mod synthetic;
pub mod views;

pub use assignment::{AssignedDevice, Assignment};
pub use gpunode::{GpuNode, GpuNodeSpec, GpuNodeStatus};
pub use kube_error::kube_error;
pub use pod::PodError;
pub use podgroup::{PodGroup, PodGroupSpec};
