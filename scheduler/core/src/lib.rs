//! Deterministic GPU placement. No I/O, no clocks.
//!
//! Map of the key types:
//! - [`mig`]: NVIDIA MIG geometry per product ([`mig::Geometry`], [`mig::Profile`]) and the
//!   per-GPU [`mig::MigLayout`] that accepts an instance only where NVIDIA would.
//! - [`topology`]: the interconnect graph of a node's GPUs ([`topology::Topology`]): NVLink
//!   islands and the best-connected set of `k` free GPUs.
//! - [`keys`]: [`keys::NodeName`] and [`keys::PodKey`], the identities everything else names.
//! - [`cluster`]: [`cluster::Node`], [`cluster::Gpu`], [`cluster::Allocation`] and the
//!   [`cluster::Snapshot`] with checkpoint / rollback / commit.
//! - [`demand`]: what a pod asks for ([`demand::Demand`], [`demand::GpuDemand`]).
//! - [`placement`]: feasibility — every [`placement::Candidate`] for a demand on a node, or a
//!   [`placement::Rejection`] that says why not (now, or never).
//! - [`policy`]: the [`policy::Policy`] trait, `tessera` and the baselines, and the entry points
//!   [`policy::place`] and [`policy::evaluate`].
//! - [`rules`]: kube-scheduler's node filters that tessera applies too (taints, required
//!   node affinity, NVIDIA extended resources).
//! - [`metrics`]: packing metrics and FGD's fragmentation measure, extended to MIG.
//! - [`testing`] (feature `testing`): builders and [`testing::synth_cluster`].

pub mod cluster;
pub mod demand;
pub mod error;
pub mod gang;
pub mod keys;
pub mod metrics;
pub mod mig;
pub mod placement;
pub mod policy;
pub mod rules;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod topology;

pub use cluster::{Allocation, Checkpoint, Gpu, GpuMode, Grant, MigOp, Node, NodeName, PodKey, Snapshot};
pub use demand::{Demand, GangRef, GpuDemand};
pub use error::{Error, Result};
pub use placement::{Candidate, Placement, Rejection, RejectionKind};
pub use policy::{Context, Policy, Workload, place};
