//! Pod → [`Demand`] (DESIGN §3): what a pod asks for, from its resources, annotations, labels
//! and (for scheduler-plugins gangs) its `PodGroup`.
//!
//! Malformed or contradictory input is an error that names the annotation or resource and the
//! value, so kube-scheduler's `FailedScheduling` event tells the user what to fix.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use tessera_core::rules::{NodeRules, Requirement, Toleration};
use tessera_core::{Demand, GangRef, GpuDemand, PodKey};

use crate::annotations;
use crate::podgroup::{DEFAULT_SCHEDULE_TIMEOUT_SECONDS, POD_GROUP_LABEL, PodGroupSpec};

/// Whole GPUs, NVIDIA's resource name.
pub const NVIDIA_GPU: &str = "nvidia.com/gpu";
/// Prefix of NVIDIA's MIG resources (`nvidia.com/mig-3g.40gb`).
pub const NVIDIA_MIG_PREFIX: &str = "nvidia.com/mig-";
/// Extended resources under this prefix are NVIDIA's device plugin's, counted by kube-scheduler.
pub const NVIDIA_PREFIX: &str = "nvidia.com/";

/// Why a pod's demand cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PodError {
    #[error("pod has no {0}")]
    MissingMetadata(&'static str),
    #[error("annotation {key}={value:?}: {why}")]
    Annotation { key: &'static str, value: String, why: String },
    #[error("resource {name}={value:?}: {why}")]
    Resource { name: String, value: String, why: String },
    #[error("{a} and {b} contradict each other; set only one")]
    Contradictory { a: String, b: String },
    #[error("label {POD_GROUP_LABEL}={name:?}: PodGroup {namespace}/{name} not found")]
    PodGroupNotFound { namespace: String, name: String },
    #[error("{0}")]
    Invalid(String),
}

impl PodError {
    /// Short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            PodError::MissingMetadata(_) => "missing_metadata",
            PodError::Annotation { .. } => "annotation",
            PodError::Resource { .. } => "resource",
            PodError::Contradictory { .. } => "contradictory",
            PodError::PodGroupNotFound { .. } => "podgroup_not_found",
            PodError::Invalid(_) => "invalid",
        }
    }

    /// Whether the pod itself must change (as opposed to the cluster catching up, e.g. a
    /// PodGroup not yet seen).
    pub fn is_permanent(&self) -> bool {
        !matches!(self, PodError::PodGroupNotFound { .. })
    }
}

/// The pod's key, `namespace/name`.
pub fn pod_key(pod: &Pod) -> Result<PodKey, PodError> {
    let name = pod.metadata.name.as_deref().ok_or(PodError::MissingMetadata("metadata.name"))?;
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    Ok(PodKey::new(ns, name))
}

/// The name of the pod's scheduler-plugins `PodGroup` (label), if any.
pub fn pod_group_name(pod: &Pod) -> Option<&str> {
    pod.metadata.labels.as_ref()?.get(POD_GROUP_LABEL).map(String::as_str)
}

/// Whether the pod asks for any GPU resource tessera manages.
pub fn wants_gpu(pod: &Pod) -> bool {
    resource_totals(pod).is_ok_and(|r| {
        r.keys().any(|k| k == NVIDIA_GPU || k == annotations::RESOURCE_GPU || k.starts_with(NVIDIA_MIG_PREFIX))
    })
}

/// CPU (milli-cores) and memory (MiB) the pod requests, counted as kubelet does.
pub fn requests(pod: &Pod) -> Result<(u64, u64), PodError> {
    let res = resource_totals(pod)?;
    let cpu = res.get("cpu").map_or(Ok(0), cpu_milli)?;
    let mem = res.get("memory").map_or(Ok(0), memory_mib)?;
    Ok((cpu, mem))
}

/// The resources the pod's containers ask for, per name, counted as kubelet does.
pub fn resources(pod: &Pod) -> Result<BTreeMap<String, Quantity>, PodError> {
    resource_totals(pod)
}

/// The extended resources by NVIDIA name (`nvidia.com/...`) the pod requests, with counts, as
/// kube-scheduler counts them against a node's allocatable. Unreadable quantities count 0
/// (the pod's demand reports them).
pub fn extended(pod: &Pod) -> Vec<(String, u64)> {
    resource_totals(pod)
        .map(|r| {
            r.iter()
                .filter(|(k, _)| k.starts_with(NVIDIA_PREFIX))
                .filter_map(|(k, q)| parse_quantity(&q.0).map(|v| (k.clone(), v.ceil() as u64)))
                .filter(|(_, n)| *n > 0)
                .collect()
        })
        .unwrap_or_default()
}

/// kube-scheduler's node filters the pod carries: tolerations, required node affinity and the
/// NVIDIA extended resources it requests.
pub fn node_rules(pod: &Pod) -> NodeRules {
    let spec = pod.spec.as_ref();
    let tolerations = spec
        .and_then(|s| s.tolerations.as_ref())
        .map(|ts| {
            ts.iter()
                .map(|t| Toleration {
                    key: t.key.clone().unwrap_or_default(),
                    operator: t.operator.clone().unwrap_or_default(),
                    value: t.value.clone().unwrap_or_default(),
                    effect: t.effect.clone().unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default();
    let terms = spec
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| n.required_during_scheduling_ignored_during_execution.as_ref())
        .map(|r| r.node_selector_terms.as_slice())
        .unwrap_or_default();
    let requirement = |field: bool| {
        move |e: &k8s_openapi::api::core::v1::NodeSelectorRequirement| Requirement {
            key: e.key.clone(),
            operator: e.operator.clone(),
            values: e.values.clone().unwrap_or_default(),
            field,
        }
    };
    let affinity = terms
        .iter()
        .map(|t| {
            t.match_expressions
                .iter()
                .flatten()
                .map(requirement(false))
                .chain(t.match_fields.iter().flatten().map(requirement(true)))
                .collect()
        })
        .collect();
    NodeRules { tolerations, affinity, extended: extended(pod) }
}

/// The gang a pod belongs to by label or annotation, as `namespace/name`, without validation.
pub fn gang_name(pod: &Pod) -> Option<String> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = pod_group_name(pod)
        .or_else(|| pod.metadata.annotations.as_ref()?.get(annotations::GANG_NAME).map(String::as_str))?;
    Some(format!("{ns}/{name}"))
}

/// Reads what the pod asks for. `group` is the spec of the pod's `PodGroup` when it has the
/// [`POD_GROUP_LABEL`] label (look it up with [`pod_group_name`]).
pub fn demand(pod: &Pod, group: Option<&PodGroupSpec>) -> Result<Demand, PodError> {
    let key = pod_key(pod)?;
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let empty = BTreeMap::new();
    let ann = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let res = resource_totals(pod)?;

    let cpu_milli = res.get("cpu").map_or(Ok(0), cpu_milli)?;
    let memory_mib = res.get("memory").map_or(Ok(0), memory_mib)?;
    let gpu = gpu_demand(&res, ann)?;

    let mut d = Demand::new(key, gpu).with_cpu(cpu_milli, memory_mib);
    if let Some(v) = ann.get(annotations::GPU_MODELS) {
        let models: Vec<String> = v.split('|').map(str::trim).filter(|m| !m.is_empty()).map(str::to_owned).collect();
        if models.is_empty() {
            return Err(annotation(annotations::GPU_MODELS, v, "expected GPU products separated by |"));
        }
        d.gpu_models = models;
    }
    if let Some(sel) = pod.spec.as_ref().and_then(|s| s.node_selector.as_ref()) {
        d.node_selector = sel.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    }
    d.priority = pod.spec.as_ref().and_then(|s| s.priority).unwrap_or(0);
    d.gang = gang(pod, ns, ann, group)?;
    d.rules = node_rules(pod);
    d.device_plugin = res.get(annotations::RESOURCE_GPU).and_then(|q| parse_quantity(&q.0)).is_some_and(|v| v > 0.0);
    d.validate().map_err(|e| PodError::Invalid(e.to_string()))?;
    Ok(d)
}

fn annotation(key: &'static str, value: &str, why: impl Into<String>) -> PodError {
    PodError::Annotation { key, value: value.to_owned(), why: why.into() }
}

fn resource(name: &str, q: &Quantity, why: impl Into<String>) -> PodError {
    PodError::Resource { name: name.to_owned(), value: q.0.clone(), why: why.into() }
}

/// Per-resource totals the way kubelet counts them: the sum over containers, or the largest
/// init container if that is more. Requests count, as kube-scheduler counts them; a limit is
/// used only where its request is absent (the request then defaults to it; extended resources
/// need both equal).
fn resource_totals(pod: &Pod) -> Result<BTreeMap<String, Quantity>, PodError> {
    let Some(spec) = pod.spec.as_ref() else {
        return Ok(BTreeMap::new());
    };
    let mut sum: BTreeMap<String, f64> = BTreeMap::new();
    let mut text: BTreeMap<String, Quantity> = BTreeMap::new();
    for c in &spec.containers {
        for (name, q) in container_resources(c) {
            let v = parse_quantity(&q.0).ok_or_else(|| resource(&name, &q, "not a Kubernetes quantity"))?;
            *sum.entry(name.clone()).or_default() += v;
            text.insert(name, q);
        }
    }
    for c in spec.init_containers.iter().flatten() {
        for (name, q) in container_resources(c) {
            let v = parse_quantity(&q.0).ok_or_else(|| resource(&name, &q, "not a Kubernetes quantity"))?;
            let e = sum.entry(name.clone()).or_default();
            if v > *e {
                *e = v;
                text.insert(name, q);
            }
        }
    }
    // Re-render sums as plain numbers so later parsing sees one value per resource.
    Ok(sum
        .into_iter()
        .map(|(k, v)| {
            let q = match text.get(&k) {
                Some(q) if parse_quantity(&q.0) == Some(v) => q.clone(),
                _ => Quantity(format_number(v)),
            };
            (k, q)
        })
        .collect())
}

fn format_number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 { format!("{}", v as i64) } else { format!("{v}") }
}

fn container_resources(c: &Container) -> BTreeMap<String, Quantity> {
    let mut out = BTreeMap::new();
    if let Some(r) = c.resources.as_ref() {
        // kube-scheduler counts requests; a limit stands in only where no request is set (the
        // API server defaults the request to the limit then).
        for (k, v) in r.limits.iter().flatten() {
            out.insert(k.clone(), v.clone());
        }
        for (k, v) in r.requests.iter().flatten() {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

/// Parses a Kubernetes quantity (`18Gi`, `500m`, `1.5e3`, `4`) into base units.
pub fn parse_quantity(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-')).unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    if num.is_empty() || num.starts_with('-') {
        return None;
    }
    let n: f64 = num.parse().ok()?;
    let mult = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0f64.powi(4),
        "Pi" => 1024.0f64.powi(5),
        "Ei" => 1024.0f64.powi(6),
        e if e.starts_with(['e', 'E']) => 10f64.powi(e[1..].parse::<i32>().ok()?),
        _ => return None,
    };
    let v = n * mult;
    v.is_finite().then_some(v)
}

fn cpu_milli(q: &Quantity) -> Result<u64, PodError> {
    let v = parse_quantity(&q.0).ok_or_else(|| resource("cpu", q, "not a Kubernetes quantity"))?;
    Ok((v * 1000.0).ceil() as u64)
}

fn memory_mib(q: &Quantity) -> Result<u64, PodError> {
    let v = parse_quantity(&q.0).ok_or_else(|| resource("memory", q, "not a Kubernetes quantity"))?;
    Ok((v / (1024.0 * 1024.0)).ceil() as u64)
}

fn whole_count(name: &str, q: &Quantity) -> Result<u32, PodError> {
    let v = parse_quantity(&q.0).ok_or_else(|| resource(name, q, "not a Kubernetes quantity"))?;
    if v.fract() != 0.0 || v > f64::from(u32::MAX) {
        return Err(resource(name, q, "must be a whole number"));
    }
    Ok(v as u32)
}

fn int_annotation<T: std::str::FromStr>(
    ann: &BTreeMap<String, String>,
    key: &'static str,
) -> Result<Option<T>, PodError> {
    match ann.get(key) {
        None => Ok(None),
        Some(v) => v.trim().parse().map(Some).map_err(|_| annotation(key, v, "expected a whole number")),
    }
}

fn gpu_demand(res: &BTreeMap<String, Quantity>, ann: &BTreeMap<String, String>) -> Result<GpuDemand, PodError> {
    let mut kinds: Vec<(String, GpuDemand)> = Vec::new();
    for (name, q) in res {
        if name == NVIDIA_GPU {
            let n = whole_count(name, q)?;
            if n > 0 {
                kinds.push((format!("{name}={}", q.0), GpuDemand::Whole { count: n }));
            }
        } else if let Some(profile) = name.strip_prefix(NVIDIA_MIG_PREFIX) {
            match whole_count(name, q)? {
                0 => {}
                1 => kinds.push((format!("{name}={}", q.0), GpuDemand::Mig { profile: profile.to_owned() })),
                _ => return Err(resource(name, q, "tessera places one MIG instance per pod; ask for 1")),
            }
        } else if name == annotations::RESOURCE_GPU {
            match whole_count(name, q)? {
                0 => {}
                1 => kinds.push((format!("{name}={}", q.0), tessera_gpu(ann)?)),
                _ => {
                    return Err(resource(
                        name,
                        q,
                        format!("ask for 1 and size it with {} or {}", annotations::GPUS, annotations::GPU_MEMORY),
                    ));
                }
            }
        }
    }
    if kinds.len() > 1 {
        return Err(PodError::Contradictory { a: kinds[0].0.clone(), b: kinds[1].0.clone() });
    }
    let sizing = [annotations::GPU_MEMORY, annotations::GPU_COMPUTE, annotations::GPUS, annotations::GPU_SHARE];
    match kinds.pop() {
        Some((what, d)) => {
            if !what.starts_with(annotations::RESOURCE_GPU)
                && let Some(key) = sizing.iter().find(|k| ann.contains_key(**k))
            {
                return Err(PodError::Contradictory { a: what, b: format!("annotation {key}={:?}", ann[*key]) });
            }
            Ok(d)
        }
        None => match sizing.iter().find(|k| ann.contains_key(**k)) {
            Some(key) => Err(annotation(
                key,
                &ann[*key],
                format!("needs resources.limits {}: 1 on a container", annotations::RESOURCE_GPU),
            )),
            None => Ok(GpuDemand::None),
        },
    }
}

/// The demand of a `tessera.dev/gpu: 1` pod, from its sizing annotations.
fn tessera_gpu(ann: &BTreeMap<String, String>) -> Result<GpuDemand, PodError> {
    let gpus: Option<u32> = int_annotation(ann, annotations::GPUS)?;
    let share: Option<u32> = int_annotation(ann, annotations::GPU_SHARE)?;
    let compute: Option<u8> = int_annotation(ann, annotations::GPU_COMPUTE)?;
    let memory = match ann.get(annotations::GPU_MEMORY) {
        None => None,
        Some(v) => {
            let bytes = parse_quantity(v)
                .ok_or_else(|| annotation(annotations::GPU_MEMORY, v, "expected a quantity such as 18Gi"))?;
            let mib = (bytes / (1024.0 * 1024.0)).ceil() as u64;
            if mib == 0 {
                return Err(annotation(annotations::GPU_MEMORY, v, "must be positive"));
            }
            Some(mib)
        }
    };
    let set = |k: &'static str| ann.get(k).map(|v| format!("annotation {k}={v:?}"));
    let pairs = [
        (annotations::GPUS, annotations::GPU_SHARE),
        (annotations::GPUS, annotations::GPU_MEMORY),
        (annotations::GPUS, annotations::GPU_COMPUTE),
        (annotations::GPU_SHARE, annotations::GPU_MEMORY),
        (annotations::GPU_SHARE, annotations::GPU_COMPUTE),
    ];
    for (a, b) in pairs {
        if let (Some(a), Some(b)) = (set(a), set(b)) {
            return Err(PodError::Contradictory { a, b });
        }
    }
    if let Some(n) = gpus {
        if n == 0 || n > tessera_core::demand::MAX_WHOLE_GPUS {
            return Err(annotation(
                annotations::GPUS,
                &ann[annotations::GPUS],
                format!("must be 1..={}", tessera_core::demand::MAX_WHOLE_GPUS),
            ));
        }
        return Ok(GpuDemand::Whole { count: n });
    }
    if let Some(milli) = share {
        if milli == 0 || milli >= 1000 {
            return Err(annotation(annotations::GPU_SHARE, &ann[annotations::GPU_SHARE], "must be 1..=999 milli-GPU"));
        }
        return Ok(GpuDemand::Share { milli });
    }
    if let Some(c) = compute
        && (c == 0 || c > 7)
    {
        return Err(annotation(annotations::GPU_COMPUTE, &ann[annotations::GPU_COMPUTE], "must be 1..=7 sevenths"));
    }
    match (memory, compute) {
        (Some(memory_mib), compute_slices) => Ok(GpuDemand::Model { memory_mib, compute_slices }),
        (None, Some(_)) => Err(annotation(
            annotations::GPU_COMPUTE,
            &ann[annotations::GPU_COMPUTE],
            format!("needs {} as well", annotations::GPU_MEMORY),
        )),
        (None, None) => Ok(GpuDemand::Whole { count: 1 }),
    }
}

fn gang(
    pod: &Pod,
    ns: &str,
    ann: &BTreeMap<String, String>,
    group: Option<&PodGroupSpec>,
) -> Result<Option<GangRef>, PodError> {
    let by_label = pod_group_name(pod);
    let by_ann = ann.get(annotations::GANG_NAME).map(String::as_str);
    let size: Option<u32> = int_annotation(ann, annotations::GANG_SIZE)?;
    if let (Some(l), Some(a)) = (by_label, by_ann)
        && l != a
    {
        return Err(PodError::Contradictory {
            a: format!("label {POD_GROUP_LABEL}={l:?}"),
            b: format!("annotation {}={a:?}", annotations::GANG_NAME),
        });
    }
    if let Some(name) = by_label {
        let spec =
            group.ok_or_else(|| PodError::PodGroupNotFound { namespace: ns.to_owned(), name: name.to_owned() })?;
        if spec.min_member < 1 {
            return Err(PodError::Invalid(format!("PodGroup {ns}/{name} has minMember {}", spec.min_member)));
        }
        return Ok(Some(GangRef {
            name: format!("{ns}/{name}"),
            min_member: spec.min_member.unsigned_abs(),
            timeout_ms: spec.timeout_ms(),
        }));
    }
    match (by_ann, size) {
        (None, None) => Ok(None),
        (Some(name), Some(n)) if n >= 1 && !name.is_empty() => Ok(Some(GangRef {
            name: format!("{ns}/{name}"),
            min_member: n,
            timeout_ms: u64::from(DEFAULT_SCHEDULE_TIMEOUT_SECONDS.unsigned_abs()) * 1000,
        })),
        (Some(name), Some(_)) if name.is_empty() => Err(annotation(annotations::GANG_NAME, name, "must not be empty")),
        (Some(_), Some(n)) => Err(annotation(annotations::GANG_SIZE, &n.to_string(), "must be at least 1")),
        (Some(name), None) => Err(annotation(
            annotations::GANG_NAME,
            name,
            format!("needs {} (the number of members)", annotations::GANG_SIZE),
        )),
        (None, Some(_)) => Err(annotation(
            annotations::GANG_SIZE,
            &ann[annotations::GANG_SIZE],
            format!("needs {} as well", annotations::GANG_NAME),
        )),
    }
}

#[cfg(test)]
mod tests;
