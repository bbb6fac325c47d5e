//! tessera-scheduler: the kube-scheduler extender.
//!
//! - [`wire`]: `k8s.io/kube-scheduler/extender/v1` types (PascalCase, Go's nulls).
//! - [`state`]: the [`state::Scheduler`]: core snapshot, assume cache, filter / prioritize /
//!   bind / preempt, cluster and explain views.
//! - [`http`]: the router over the scheduler and the hyper server.
//! - [`binder`]: the seam for effects (Binding, `GpuNode.spec`), for Kubernetes and in memory.
//! - [`cluster`]: reflectors of Nodes, Pods, GpuNodes, PodGroups → core snapshot.
//! - [`leader`]: which replica binds (follows its kube-scheduler's Lease).
//! - [`reservations`]: gang reservations written on member pods, restored after a restart.
//! - [`podgroups`]: PodGroup status (`phase`, `scheduled`, ...) as scheduler-plugins writes it.
//! - [`preemption`]: priority preemption tessera performs itself (Eviction API), whole gangs only.
//! - [`metrics`]: `tessera_*` metrics.
//! - [`dashboard`]: the web GPU map at `GET /`.
//! - [`demo`]: the in-memory demo cluster and model mix.
//! - [`tls`]: TLS with client-certificate authentication for the verbs.
//! - [`authn`]: TokenReview + SubjectAccessReview for the read-only surface.
//! - [`config`]: command line.

pub mod authn;
pub mod binder;
pub mod cluster;
pub mod config;
pub mod dashboard;
pub mod demo;
pub mod error;
pub mod http;
pub mod keys;
pub mod leader;
pub mod metrics;
pub mod podgroups;
pub mod preemption;
pub mod reservations;
pub mod state;
pub mod tls;
pub mod wire;

pub use error::{Error, Result};
