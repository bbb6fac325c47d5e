//! `kubectl tessera`: a kubectl plugin for tessera.
//!
//! - [`status`]: nodes → GPUs → MIG slices and who holds each, from the scheduler's `/api/v1/cluster`;
//! - [`explain`]: why a pod is pending, from `/api/v1/explain/{namespace}/{pod}`;
//! - [`capture`]: nodes, pods, GpuNodes and PodGroups in one JSON document;
//! - [`source`]: how the scheduler is reached (kubectl's service proxy, or plain HTTP).

pub mod capture;
pub mod explain;
pub mod source;
pub mod status;
mod table;
