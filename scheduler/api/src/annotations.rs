//! Annotation and resource names.

/// The scheduler's device choice for a pod, as [`crate::Assignment`] JSON.
pub const ASSIGNMENT: &str = "tessera.dev/assignment";
/// The scheduler's HMAC over the assignment, the pod UID and the node
/// (see [`crate::signing`]).
pub const ASSIGNMENT_SIGNATURE: &str = "tessera.dev/assignment-signature";
/// A planned gang member's reserved devices until it binds, as
/// `tessera_scheduler::reservations::Reservation` JSON: lets a restarted or newly leading
/// scheduler take the plan over.
pub const RESERVATION: &str = "tessera.dev/reservation";
/// Device memory the model needs, e.g. `18Gi`.
pub const GPU_MEMORY: &str = "tessera.dev/gpu-memory";
/// Compute slices (sevenths of a GPU) the model needs.
pub const GPU_COMPUTE: &str = "tessera.dev/gpu-compute";
/// Whole GPUs for tensor parallelism.
pub const GPUS: &str = "tessera.dev/gpus";
/// A time-sliced share in milli-GPU.
pub const GPU_SHARE: &str = "tessera.dev/gpu-share";
/// Allowed GPU products, `|`-separated.
pub const GPU_MODELS: &str = "tessera.dev/gpu-models";
/// Gang name (annotation-only gangs).
pub const GANG_NAME: &str = "tessera.dev/gang-name";
/// Gang size (annotation-only gangs).
pub const GANG_SIZE: &str = "tessera.dev/gang-size";

/// The extended resource the tessera device plugin serves.
pub const RESOURCE_GPU: &str = "tessera.dev/gpu";
/// Written by the scheduler on pods it refused for lack of free devices when devices free up
/// (an RFC 3339 time): the pod update makes kube-scheduler retry them at once instead of at its
/// next periodic flush of unschedulable pods.
pub const REQUEUE: &str = "tessera.dev/requeue";
