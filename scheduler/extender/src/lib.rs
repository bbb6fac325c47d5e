//! tessera-scheduler: the kube-scheduler extender.
//!
//! - [`wire`]: `k8s.io/kube-scheduler/extender/v1` types (PascalCase, Go's nulls).
//! - [`state`]: the [`state::Scheduler`]: core snapshot and the state behind its lock.
//! - `filter`, `prioritize`, `bind`, `preempt`: the four extender verbs, one module each.
//! - `planning`: gang planning at filter and the once-a-second tick.
//! - `live`: rebuilds from the API and pod events laid over the assume cache.
//! - `views`: packing, `/metrics`, the cluster map, explain, pending.
//! - `gangs`, `assume`, `bounded`: gang state, the assume cache, the per-pod filter records.
//! - [`lookup`]: pods and PodGroups by name; [`settings`]: the verbs' tunables.
//! - [`http`]: the router over the scheduler and the hyper server.
//! - [`binder`]: the seam for effects (Binding, `GpuNode.spec`), for Kubernetes and in memory.
//! - [`cluster`]: reflectors of Nodes, Pods, GpuNodes, PodGroups → core snapshot.
//! - [`leader`]: which replica binds (follows its kube-scheduler's Lease).
//! - [`reservations`]: gang reservations written on member pods, restored after a restart (the
//!   format, the pure restore, the outbox and its writer); `restore`: the scheduler's side.
//! - [`podgroups`]: PodGroup status (`phase`, `scheduled`, ...) as scheduler-plugins writes it,
//!   and the queue of status writes.
//! - [`preemption`]: priority preemption tessera performs itself (Eviction API), whole gangs only,
//!   and its queue of preemptors.
//! - [`metrics`]: `tessera_*` metrics.
//! - [`dashboard`]: the web GPU map at `GET /`.
//! - [`demo`]: the in-memory demo cluster and model mix.
//! - [`tls`]: TLS with client-certificate authentication for the verbs.
//! - [`authn`]: TokenReview + SubjectAccessReview for the read-only surface.
//! - [`config`]: command line.

mod assume;
pub mod authn;
mod bind;
pub mod binder;
mod bounded;
pub mod cluster;
pub mod config;
pub mod dashboard;
pub mod demo;
pub mod error;
mod filter;
mod gangs;
pub mod http;
pub mod keys;
pub mod leader;
mod live;
pub mod lookup;
pub mod metrics;
mod planning;
pub mod podgroups;
mod preempt;
pub mod preemption;
mod prioritize;
pub mod request;
pub mod reservations;
mod restore;
pub mod settings;
pub mod state;
pub mod tls;
mod views;
pub mod wire;

pub use error::{Error, Result};
