//! Kubernetes objects → core [`Snapshot`]: Nodes, their `GpuNode`s and the pods bound to them.
//!
//! Allocations are rebuilt from scratch: pods bound by tessera carry the exact devices in their
//! signed `tessera.dev/assignment` annotation; pods of the NVIDIA device plugin
//! (`nvidia.com/gpu`, `nvidia.com/mig-*`) are counted on the devices their node's agent reports
//! from kubelet's PodResources (`GpuNode.status.held`), or on the lowest free matching devices
//! when it reports none. So a restarted scheduler never hands out a device a running pod
//! holds. The scheduler rebuilds its state with this after every change; the simulator reads
//! cluster captures with it.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node as KubeNode, Pod};
use tessera_core::mig::MigProduct;
use tessera_core::rules::Taint;
use tessera_core::topology::{Edge, Link, Topology};
use tessera_core::{Allocation, Gpu, GpuMode, Grant, MigOp, Node, NodeName, PodKey, Snapshot};

use crate::Assignment;
use crate::annotations;
use crate::gpunode::{GpuNode, Health, LinkKind, Mode};
use crate::pod::{self as podparse, NVIDIA_GPU, NVIDIA_MIG_PREFIX, parse_quantity};
use crate::signing::{Keyring, Refusal};

/// Node label that puts a node's non-MIG GPUs in time-sliced (shared) mode.
pub const SHARING_LABEL: &str = "tessera.dev/gpu-sharing";
/// The node's pool (the dashboard and the packing views group nodes by it); unlabelled nodes
/// fall in their first GPU's model's pool.
pub const POOL_LABEL: &str = "tessera.dev/pool";
/// GPU Feature Discovery's product label, used for nodes without a `GpuNode`.
pub const GFD_PRODUCT: &str = "nvidia.com/gpu.product";
/// GPU Feature Discovery's memory label (MiB).
pub const GFD_MEMORY: &str = "nvidia.com/gpu.memory";

/// Pod UID → pod, for the pods the state counts. Persistent, as the snapshot's allocations are:
/// a copy for the verbs shares it.
pub type Uids = imbl::HashMap<String, PodKey>;

/// (node, GPU index, MIG start) → the MIG device UUID the node agent reported.
pub type MigUuids = imbl::HashMap<(NodeName, u32, u8), String>;

/// A snapshot built from API objects, and what could not be used.
#[derive(Debug, Default)]
pub struct Built {
    pub snap: Snapshot,
    pub uids: Uids,
    pub mig_uuids: MigUuids,
    pub warnings: Vec<String>,
    /// Assignments not trusted ([`build_checked`] only).
    pub refused: Vec<Refused>,
}

/// A pod whose assignment the rebuild does not trust.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub pod: PodKey,
    pub uid: String,
    pub node: String,
    pub refusal: Refusal,
    /// True when its devices are still counted as held: the pod runs (kubelet admitted it, e.g.
    /// before signatures were checked), so it really holds them; it never displaces a trusted
    /// pod. False: the pod holds nothing in the snapshot.
    pub counted: bool,
}

fn quantity_of(
    map: Option<&std::collections::BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>,
    key: &str,
) -> f64 {
    map.and_then(|m| m.get(key)).and_then(|q| parse_quantity(&q.0)).unwrap_or(0.0)
}

fn link(kind: LinkKind, lanes: Option<u32>) -> Link {
    match kind {
        LinkKind::Nvlink => Link::NvLink { lanes: u8::try_from(lanes.unwrap_or(1)).unwrap_or(u8::MAX) },
        LinkKind::PcieSwitch => Link::PcieSwitch,
        LinkKind::SameNuma => Link::SameNuma,
        LinkKind::CrossSocket => Link::CrossSocket,
    }
}

/// A core node from a Node and (when the agent runs there) its `GpuNode`, plus the MIG
/// instances to create on it once added.
fn node_of(
    node: &KubeNode,
    gn: Option<&GpuNode>,
    assigned: &std::collections::HashSet<(String, u32)>,
    warnings: &mut Vec<String>,
) -> Option<(Node, Vec<MigOp>)> {
    let name = node.metadata.name.as_deref()?;
    let alloc = node.status.as_ref().and_then(|s| s.allocatable.as_ref());
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let shared = labels.get(SHARING_LABEL).is_some_and(|v| v == "time-sliced");
    let full = if shared { GpuMode::Shared } else { GpuMode::Full };
    let mut ops = Vec::new();
    let (gpus, topology) = match gn.and_then(|g| g.status.as_ref()) {
        Some(status) => {
            let mut gpus = Vec::new();
            for s in &status.gpus {
                let mode = if s.mode == Mode::Mig { GpuMode::Mig } else { full };
                let mut g = Gpu::new(s.index, &s.product, s.memory_mib, mode);
                g.uuid = s.uuid.clone();
                g.numa = s.numa_node;
                g.healthy = s.health == Health::Healthy;
                // A MIG mode change waits for a GPU reset, which the agent does once nothing uses
                // the GPU: plan nothing new on it meanwhile (pods already on it keep it).
                let reset_pending = s.pending_mode.is_some_and(|m| m != s.mode);
                let used = assigned.contains(&(name.to_owned(), s.index))
                    || status.held.iter().any(|h| h.uuid == s.uuid || s.instances.iter().any(|i| i.uuid == h.uuid));
                if reset_pending && !used {
                    g.healthy = false;
                    warnings.push(format!("node {name} GPU {}: waits for a reset to change MIG mode", s.index));
                }
                if s.mode == Mode::Mig {
                    let product = MigProduct::from_name(&s.product);
                    for i in &s.instances {
                        match product.and_then(|p| p.geometry().profile_by_name(&i.profile)) {
                            Some(p) => ops.push(MigOp::Create { gpu: s.index, class: p.class, start: i.start }),
                            None => {
                                warnings.push(format!("node {name} GPU {}: unknown MIG profile {}", s.index, i.profile))
                            }
                        }
                    }
                }
                gpus.push(g);
            }
            let n = gpus.iter().map(|g| g.index + 1).max().unwrap_or(0);
            let edges: Vec<Edge> =
                status.links.iter().map(|l| Edge { a: l.a, b: l.b, link: link(l.kind, l.lanes) }).collect();
            (gpus, Topology::from_edges(n, &edges))
        }
        None => {
            // No node agent: count NVIDIA's whole GPUs as GPU Feature Discovery describes them.
            let n = quantity_of(alloc, NVIDIA_GPU) as u32;
            let model = labels.get(GFD_PRODUCT).cloned().unwrap_or_else(|| "unknown".into());
            let mem = labels.get(GFD_MEMORY).and_then(|m| m.parse::<u64>().ok()).unwrap_or(0);
            let gpus = (0..n).map(|i| Gpu::new(i, &model, mem, full)).collect();
            (gpus, Topology::unconnected(n))
        }
    };
    let cpu = (quantity_of(alloc, "cpu") * 1000.0) as u64;
    let mem = (quantity_of(alloc, "memory") / (1024.0 * 1024.0)) as u64;
    let mut n = Node::new(name, cpu, mem, gpus);
    n.device_plugin = gn.is_some_and(|g| g.status.is_some());
    n.pool = labels.get(POOL_LABEL).cloned();
    n.labels = labels;
    n.schedulable = !node.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false);
    n.taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .map(|ts| {
            ts.iter()
                .map(|t| Taint {
                    key: t.key.clone(),
                    value: t.value.clone().unwrap_or_default(),
                    effect: t.effect.clone(),
                })
                .collect()
        })
        .unwrap_or_default();
    // What kube-scheduler counts NVIDIA-named pods against.
    n.extended = Some(
        alloc
            .into_iter()
            .flatten()
            .filter(|(k, _)| k.starts_with(podparse::NVIDIA_PREFIX))
            .filter_map(|(k, q)| parse_quantity(&q.0).map(|v| (k.clone(), v as u64)))
            .collect(),
    );
    n.topology = Arc::new(topology);
    Some((n, ops))
}

/// Builds the snapshot: nodes (with the MIG layouts their agents report), then every bound,
/// non-terminal pod's allocation, trusting every assignment (cluster captures, the simulator).
/// Takes the objects owned or shared (`Arc`, as reflector stores hold them).
pub fn build<N, G, P>(nodes: &[N], gpunodes: &[G], pods: &[P]) -> Built
where
    N: Borrow<KubeNode>,
    G: Borrow<GpuNode>,
    P: Borrow<Pod>,
{
    build_checked(nodes, gpunodes, pods, None)
}

/// How far a bound pod's assignment is trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Trust {
    /// Signed for this pod and node (or no keys to check with).
    Signed,
    /// Not trusted, but the pod runs: counted after every trusted pod.
    Running,
    /// A pod of another device plugin, whose devices are guessed.
    Guessed,
    /// Not trusted and not running: holds nothing.
    Refused,
}

/// What one node's objects build ([`build_node`]): the core node with the allocations counted
/// on it, and that node's share of the side tables of [`Built`].
#[derive(Clone, Debug, Default)]
pub struct NodePart {
    /// The node as a snapshot holds it and its allocations; `None` when no Node object lists
    /// it (pods bound there still leave uids, warnings and refusals).
    pub node: Option<(Node, Vec<Allocation>)>,
    /// MIG steps applied while building it (the snapshot's [`Snapshot::reconfigs`] share).
    pub reconfigs: u64,
    pub uids: Vec<(String, PodKey)>,
    pub mig_uuids: Vec<((NodeName, u32, u8), String)>,
    pub warnings: Vec<String>,
    pub refused: Vec<Refused>,
}

/// The nodes whose state a pod's objects touch: the node it is bound to (`spec.nodeName`) and
/// the node its `tessera.dev/assignment` names (a GPU an assignment names is not marked idle
/// for a MIG reset, whether or not the pod is bound there). A watch event on a pod changes at
/// most these nodes' [`build_node`] results, for the old and the new object.
pub fn node_names_of(pod: &Pod) -> Vec<String> {
    let mut names = Vec::with_capacity(2);
    if let Some(n) = pod.spec.as_ref().and_then(|s| s.node_name.as_ref()) {
        names.push(n.clone());
    }
    if let Some(a) = assignment_of(pod)
        && !names.contains(&a.node)
    {
        names.push(a.node);
    }
    names
}

fn terminal(p: &Pod) -> bool {
    matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
}

/// [`build`], checking each assignment's signature with `keys` (when given): an assignment
/// that is unsigned, forged, signed for another pod or node, or names a device a trusted pod
/// holds is listed in [`Built::refused`] and never displaces a trusted one.
///
/// Built node by node with [`build_node`] (what [`crate::incremental::Incremental`] rebuilds
/// after one event), so a full and an incremental rebuild cannot disagree.
pub fn build_checked<N, G, P>(nodes: &[N], gpunodes: &[G], pods: &[P], keys: Option<&Keyring>) -> Built
where
    N: Borrow<KubeNode>,
    G: Borrow<GpuNode>,
    P: Borrow<Pod>,
{
    let (parts, warnings) = build_parts(nodes, gpunodes, pods, keys);
    let mut b = Built { warnings, ..Built::default() };
    let mut built_nodes = Vec::with_capacity(parts.len());
    let mut allocations = tessera_core::cluster::Allocations::new();
    let mut reconfigs = 0;
    for (_, part) in parts {
        if let Some((node, allocs)) = part.node {
            built_nodes.push(node);
            allocations.extend(allocs.into_iter().map(|a| (a.pod.clone(), a)));
        }
        reconfigs += part.reconfigs;
        b.uids.extend(part.uids);
        b.mig_uuids.extend(part.mig_uuids);
        b.warnings.extend(part.warnings);
        b.refused.extend(part.refused);
    }
    b.snap = Snapshot::from_parts(built_nodes, allocations, reconfigs);
    b
}

/// Every node's [`NodePart`], by name, and the warnings about objects no node owns.
pub(crate) fn build_parts<N, G, P>(
    nodes: &[N],
    gpunodes: &[G],
    pods: &[P],
    keys: Option<&Keyring>,
) -> (std::collections::BTreeMap<String, NodePart>, Vec<String>)
where
    N: Borrow<KubeNode>,
    G: Borrow<GpuNode>,
    P: Borrow<Pod>,
{
    let mut warnings = Vec::new();
    let by_name: HashMap<&str, &GpuNode> = gpunodes
        .iter()
        .map(Borrow::borrow)
        .filter_map(|g: &GpuNode| g.metadata.name.as_deref().map(|n| (n, g)))
        .collect();
    let mut kube: HashMap<&str, &KubeNode> = HashMap::with_capacity(nodes.len());
    for kn in nodes.iter().map(Borrow::borrow) {
        let Some(name) = kn.metadata.name.as_deref() else { continue };
        match kube.entry(name) {
            // The first one counts.
            std::collections::hash_map::Entry::Occupied(_) => {
                warnings.push(tessera_core::Error::DuplicateNode(NodeName(name.to_owned())).to_string());
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(kn);
            }
        }
    }
    let mut pods_of: HashMap<String, Vec<&Pod>> = HashMap::with_capacity(kube.len());
    for p in pods.iter().map(Borrow::borrow) {
        for n in node_names_of(p) {
            pods_of.entry(n).or_default().push(p);
        }
    }
    let mut names: Vec<&str> = kube.keys().copied().collect();
    names.extend(pods_of.keys().map(String::as_str).filter(|n| !kube.contains_key(n)));
    let parts = names
        .into_iter()
        .map(|name| {
            let pods = pods_of.get(name).map(Vec::as_slice).unwrap_or_default();
            let part = build_node(name, kube.get(name).copied(), by_name.get(name).copied(), pods, keys);
            (name.to_owned(), part)
        })
        .collect();
    (parts, warnings)
}

/// One node's share of [`build_checked`]: the core node from its Node and `GpuNode` (with the
/// MIG layout its agent reports), and the allocations of the bound, non-terminal pods on it.
/// `pods` are the pods [`node_names_of`] names this node for (others are ignored); bound pods
/// are counted by trust (signed, then running untrusted, then other plugins' guessed ones),
/// then by pod key, so the result does not depend on the order of `pods`.
pub fn build_node(
    name: &str,
    kn: Option<&KubeNode>,
    gn: Option<&GpuNode>,
    pods: &[&Pod],
    keys: Option<&Keyring>,
) -> NodePart {
    let mut b = Built::default();
    let mut part = NodePart::default();
    // GPUs that live pods' assignments name here, by (node, index).
    let assigned: std::collections::HashSet<(String, u32)> = pods
        .iter()
        .filter(|p| !terminal(p))
        .filter_map(|p| assignment_of(p))
        .filter(|a| a.node == name)
        .flat_map(|a| a.devices.iter().map(|d| (a.node.clone(), d.index)).collect::<Vec<_>>())
        .collect();
    let nn = NodeName(name.to_owned());
    let mut layout = None;
    if let Some(kn) = kn.filter(|k| k.metadata.name.as_deref() == Some(name))
        && let Some((node, ops)) = node_of(kn, gn, &assigned, &mut b.warnings)
    {
        b.warnings.extend(b.snap.add_nodes([node]).iter().map(ToString::to_string));
        layout = Some(ops);
    }
    if let Some(ops) = layout
        && b.snap.node(&nn).is_some()
    {
        for op in ops {
            if let Err(e) = b.snap.apply(&nn, op) {
                b.warnings.push(format!("GpuNode {nn}: {e}"));
            }
        }
        if let Some(status) = gn.and_then(|g| g.status.as_ref()) {
            for g in &status.gpus {
                for i in &g.instances {
                    if !i.uuid.is_empty() {
                        part.mig_uuids.push(((nn.clone(), g.index, i.start), i.uuid.clone()));
                    }
                }
            }
        }
    }
    // What kubelet told the agent other plugins' pods hold (GpuNode.status.held).
    let mut reported: HashMap<String, Vec<Grant>> = HashMap::new();
    if let Some(status) = gn.and_then(|g| g.status.as_ref()) {
        for h in status.held.iter().filter(|h| h.resource != annotations::RESOURCE_GPU) {
            if let Some(g) = grant_of_uuid(&b.snap, name, status, &h.uuid) {
                let grants = reported.entry(h.pod.clone()).or_default();
                if !grants.contains(&g) {
                    grants.push(g);
                }
            }
        }
    }
    // Exact assignments first, so NVIDIA-plugin pods (whose devices we guess unless their node
    // reports them) never take the devices an annotated pod really holds; untrusted running
    // pods after every trusted one. In pod-key order within each, whatever order the caches
    // list them in.
    let mut bound: Vec<(Trust, Option<PodKey>, &Pod)> = pods
        .iter()
        .copied()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name) && !terminal(p))
        .map(|p| (trust_of(p, keys, &mut b.refused), podparse::pod_key(p).ok(), p))
        .collect();
    bound.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    for (trust, key, pod) in bound {
        let Some(key) = key else { continue };
        if let Some(uid) = &pod.metadata.uid {
            part.uids.push((uid.clone(), key.clone()));
        }
        let node = nn.clone();
        if b.snap.node(&node).is_none() {
            b.warnings.push(format!("pod {key}: bound to node {node}, which is not listed"));
            continue;
        }
        let (cpu_milli, memory_mib) = podparse::requests(pod).unwrap_or((0, 0));
        let known = reported.get(&key.0);
        let grants = match (trust, known) {
            (Trust::Refused, _) => Vec::new(),
            (Trust::Guessed, Some(g)) => g.clone(),
            _ => match grants_of(&b.snap, &node, pod) {
                Ok(g) => g,
                Err(why) => {
                    b.warnings.push(format!("pod {key} on {node}: {why}"));
                    Vec::new()
                }
            },
        };
        let alloc = Allocation {
            pod: key.clone(),
            node: node.clone(),
            cpu_milli,
            memory_mib,
            grants,
            priority: pod.spec.as_ref().and_then(|s| s.priority).unwrap_or(0),
            gang: podparse::gang_name(pod),
            reserved_until_ms: None,
            extended: podparse::extended(pod),
        };
        let allocated = match b.snap.allocate(alloc.clone()) {
            Err(_) if trust == Trust::Signed && pending_slices(&mut b.snap, &alloc) => {
                b.warnings
                    .push(format!("pod {key} on {node}: its MIG slice is not reported yet; counted as being created"));
                Ok(())
            }
            r => r,
        };
        if let Err(e) = allocated {
            // Devices first: a node whose cpu/memory looks over-committed (static pods, stale
            // allocatable) must still not lose track of which GPUs are taken.
            b.warnings.push(format!("pod {key}: {e}"));
            let gpu_only = Allocation { cpu_milli: 0, memory_mib: 0, ..alloc.clone() };
            if let Err(e) = b.snap.allocate(gpu_only) {
                b.warnings.push(format!("pod {key}: {e}"));
                if keys.is_some() && matches!(trust, Trust::Signed | Trust::Running) {
                    let refusal = refusal_for(&b.snap, &alloc, &e);
                    let uid = pod.metadata.uid.clone().unwrap_or_default();
                    b.refused.retain(|r| r.pod != key);
                    b.refused.push(Refused { pod: key.clone(), uid, node: node.0.clone(), refusal, counted: false });
                    // It still uses cpu and memory; only its devices are not counted.
                    let _ = b.snap.allocate(Allocation { grants: Vec::new(), ..alloc });
                }
            }
        }
    }
    let (mut nodes, allocations, reconfigs) = b.snap.into_parts();
    part.node = nodes.pop().map(|n| (n, allocations.into_iter().map(|(_, a)| a).collect()));
    part.reconfigs = reconfigs;
    part.warnings = b.warnings;
    part.refused = b.refused;
    part
}

/// A trusted pod bound to MIG slices its node has not reported yet (the scheduler asked the
/// node for them in GpuNode.spec and bound the pod; NVIDIA-named pods do not wait for the
/// instance): the slices are counted as being created and the allocation is made. Changes
/// nothing and returns false when that does not make the allocation fit.
fn pending_slices(snap: &mut Snapshot, alloc: &Allocation) -> bool {
    let cp = snap.checkpoint();
    let mut created = false;
    for g in &alloc.grants {
        if let Grant::Mig { gpu, class, start } = *g {
            created |= snap.apply(&alloc.node, MigOp::Create { gpu, class, start }).is_ok();
        }
    }
    if created && snap.allocate(alloc.clone()).is_ok() {
        snap.commit(cp);
        true
    } else {
        snap.rollback(cp);
        false
    }
}

/// The grant a physical device UUID stands for on a node: a whole GPU or a MIG instance.
fn grant_of_uuid(snap: &Snapshot, node: &str, status: &crate::gpunode::GpuNodeStatus, uuid: &str) -> Option<Grant> {
    let n = snap.node(&NodeName(node.to_owned()))?;
    for g in &status.gpus {
        if g.uuid == uuid {
            return Some(Grant::Whole { gpu: g.index });
        }
        if let Some(i) = g.instances.iter().find(|i| i.uuid == uuid) {
            let class = n.gpu(g.index)?.mig_product()?.geometry().profile_by_name(&i.profile)?.class;
            return Some(Grant::Mig { gpu: g.index, class, start: i.start });
        }
    }
    None
}

/// Whether a bound pod's assignment is trusted; records the refusal when not.
fn trust_of(pod: &Pod, keys: Option<&Keyring>, refused: &mut Vec<Refused>) -> Trust {
    let ann = pod.metadata.annotations.as_ref();
    let Some(text) = ann.and_then(|a| a.get(annotations::ASSIGNMENT)) else {
        return Trust::Guessed;
    };
    let Some(keys) = keys else {
        return if Assignment::from_annotation(text).is_ok() { Trust::Signed } else { Trust::Guessed };
    };
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
    let signature = ann.and_then(|a| a.get(annotations::ASSIGNMENT_SIGNATURE)).map(String::as_str);
    match keys.verify(&uid, &node, text, signature) {
        Ok(_) => Trust::Signed,
        Err(refusal) => {
            let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
            let key = podparse::pod_key(pod).unwrap_or_else(|_| PodKey::new("", ""));
            let bad_json = matches!(refusal, Refusal::BadAssignment(_));
            refused.push(Refused { pod: key, uid, node, refusal, counted: running && !bad_json });
            if running && !bad_json { Trust::Running } else { Trust::Refused }
        }
    }
}

/// The refusal for an allocation that failed with `err`: the pod holding one of its GPUs when
/// there is one, else why the node cannot give them.
fn refusal_for(snap: &Snapshot, alloc: &Allocation, err: &tessera_core::Error) -> Refusal {
    let gpus: Vec<u32> = alloc.grants.iter().map(Grant::gpu).collect();
    let holder = snap
        .allocations()
        .values()
        .filter(|a| a.node == alloc.node && a.pod != alloc.pod)
        .find(|a| a.grants.iter().any(|g| gpus.contains(&g.gpu())));
    match (holder, gpus.first()) {
        (Some(h), Some(g)) => {
            Refusal::DeviceHeld { device: format!("GPU {g} on {}", alloc.node), holder: h.pod.to_string() }
        }
        _ => Refusal::DeviceUnavailable(err.to_string()),
    }
}

fn assignment_of(pod: &Pod) -> Option<Assignment> {
    let v = pod.metadata.annotations.as_ref()?.get(annotations::ASSIGNMENT)?;
    Assignment::from_annotation(v).ok()
}

/// The devices a bound pod holds.
fn grants_of(snap: &Snapshot, node: &NodeName, pod: &Pod) -> Result<Vec<Grant>, String> {
    let n = snap.node(node).ok_or("node unknown")?;
    if let Some(a) = assignment_of(pod) {
        return a
            .devices
            .iter()
            .map(|d| {
                let g =
                    n.gpu(d.index).ok_or_else(|| format!("assignment names GPU {} which the node lacks", d.index))?;
                match (&d.profile, d.start, d.share) {
                    (Some(profile), Some(start), _) => {
                        let p = g
                            .mig_product()
                            .and_then(|p| p.geometry().profile_by_name(profile))
                            .ok_or_else(|| format!("GPU {} has no MIG profile {profile}", d.index))?;
                        Ok(Grant::Mig { gpu: d.index, class: p.class, start })
                    }
                    (_, _, Some(milli)) => Ok(Grant::Share { gpu: d.index, milli }),
                    _ => Ok(Grant::Whole { gpu: d.index }),
                }
            })
            .collect();
    }
    let res = podparse::resources(pod).map_err(|e| e.to_string())?;
    let mut grants = Vec::new();
    for (name, q) in &res {
        let count = parse_quantity(&q.0).unwrap_or(0.0) as usize;
        if name == NVIDIA_GPU {
            let free: Vec<u32> = n
                .gpus
                .iter()
                .filter(|g| {
                    g.mode() != GpuMode::Mig
                        && g.used_milli() == 0
                        && !grants.iter().any(|x: &Grant| x.gpu() == g.index)
                })
                .map(|g| g.index)
                .take(count)
                .collect();
            if free.len() < count {
                return Err(format!("{count} nvidia.com/gpu but only {} free GPUs", free.len()));
            }
            grants.extend(free.into_iter().map(|gpu| Grant::Whole { gpu }));
        } else if let Some(profile) = name.strip_prefix(NVIDIA_MIG_PREFIX) {
            for _ in 0..count {
                let slot = n.gpus.iter().find_map(|g| {
                    let class = g.mig_product()?.geometry().profile_by_name(profile)?.class;
                    g.free_instances()
                        .find(|i| {
                            i.class == class
                                && !grants.iter().any(|x| matches!(*x, Grant::Mig { gpu, start, .. } if gpu == g.index && start == i.start))
                        })
                        .map(|i| Grant::Mig { gpu: g.index, class, start: i.start })
                });
                grants.push(slot.ok_or_else(|| format!("no free {profile} instance"))?);
            }
        } else if name == annotations::RESOURCE_GPU && parse_quantity(&q.0).unwrap_or(0.0) > 0.0 {
            return Err(format!(
                "holds {} without a {} annotation",
                annotations::RESOURCE_GPU,
                annotations::ASSIGNMENT
            ));
        }
    }
    Ok(grants)
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tessera_core::mig::ProfileClass;

    use super::*;

    fn node(name: &str, labels: serde_json::Value, gpus: &str) -> KubeNode {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "status": {"allocatable": {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": gpus}}
        }))
        .unwrap()
    }

    fn pod(name: &str, node: &str, annotations: serde_json::Value, limits: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ml", "annotations": annotations},
            "spec": {"nodeName": node, "containers": [{"name": "c", "resources": {"limits": limits}}]},
            "status": {"phase": "Running"}
        }))
        .unwrap()
    }

    fn gpunode() -> GpuNode {
        let gpu = |i: u32, mode: &str, instances: serde_json::Value| {
            json!({"index": i, "uuid": format!("GPU-{i}"), "product": "A100-80GB", "memoryMib": 81920,
                   "migCapable": true, "mode": mode, "health": "Healthy", "instances": instances})
        };
        serde_json::from_value(json!({
            "apiVersion": "tessera.dev/v1alpha1", "kind": "GpuNode", "metadata": {"name": "a"}, "spec": {},
            "status": {"gpus": [
                gpu(0, "mig", json!([{"profile": "3g.40gb", "start": 0, "size": 4, "uuid": "MIG-0-0"},
                                     {"profile": "3g.40gb", "start": 4, "size": 4, "uuid": "MIG-0-4"}])),
                gpu(1, "full", json!([])),
                gpu(2, "full", json!([])),
            ]}
        }))
        .unwrap()
    }

    #[test]
    fn annotated_pods_hold_their_devices_and_nvidia_plugin_pods_the_lowest_free_ones() {
        let assignment = r#"{"node":"a","devices":[{"gpu":"GPU-0","index":0,"profile":"3g.40gb","start":4}]}"#;
        let pods = [
            // Listed first, yet the annotated pods are counted before it.
            pod("plugin", "a", json!({}), json!({"nvidia.com/gpu": "1"})),
            pod("mig", "a", json!({annotations::ASSIGNMENT: assignment}), json!({"tessera.dev/gpu": "1"})),
            pod(
                "whole",
                "a",
                json!({annotations::ASSIGNMENT: r#"{"node":"a","devices":[{"gpu":"GPU-1","index":1}]}"#}),
                json!({"tessera.dev/gpu": "1"}),
            ),
            pod("elsewhere", "gone", json!({}), json!({"nvidia.com/gpu": "1"})),
        ];
        let b = build(&[node("a", json!({}), "3")], &[gpunode()], &pods);
        let grants = |p: &str| b.snap.allocation(&PodKey::new("ml", p)).map(|a| a.grants.clone());
        assert_eq!(grants("mig"), Some(vec![Grant::Mig { gpu: 0, class: ProfileClass::G3, start: 4 }]));
        assert_eq!(grants("whole"), Some(vec![Grant::Whole { gpu: 1 }]));
        assert_eq!(grants("plugin"), Some(vec![Grant::Whole { gpu: 2 }]));
        assert_eq!(grants("elsewhere"), None);
        assert_eq!(b.warnings, ["pod ml/elsewhere: bound to node gone, which is not listed"]);
        assert_eq!(b.mig_uuids.get(&(NodeName("a".into()), 0, 4)).map(String::as_str), Some("MIG-0-4"));
    }

    #[test]
    fn the_checked_rebuild_trusts_only_signed_assignments_and_counts_running_unsigned_pods_last() {
        let ring = Keyring::parse("k1 dGVzc2VyYS1zbmFwc2hvdC10ZXN0LWtleS0zMmJ5dGVz").unwrap();
        let on = |gpu: u32| format!(r#"{{"node":"a","devices":[{{"gpu":"GPU-{gpu}","index":{gpu}}}]}}"#);
        let with = |name: &str, uid: &str, a: &str, sig: Option<String>, phase: &str| {
            let mut ann = json!({annotations::ASSIGNMENT: a});
            if let Some(sig) = sig {
                ann[annotations::ASSIGNMENT_SIGNATURE] = json!(sig);
            }
            let mut p = pod(name, "a", ann, json!({"tessera.dev/gpu": "1"}));
            p.metadata.uid = Some(uid.into());
            p.status.as_mut().unwrap().phase = Some(phase.into());
            p
        };
        let pods = [
            // A pod created with a hand-written annotation; kubelet never started it.
            with("forged", "u-forged", &on(1), None, "Pending"),
            // The signature of a deleted pod, copied.
            with("copy", "u-copy", &on(2), Some(ring.sign("u-gone", "a", &on(2))), "Pending"),
            with("legit", "u-legit", &on(1), Some(ring.sign("u-legit", "a", &on(1))), "Pending"),
            // Bound before signatures: it runs, so it holds GPU 2, after every trusted pod.
            with("old", "u-old", &on(2), None, "Running"),
            // A valid signature naming the GPU "legit" holds.
            with("twice", "u-twice", &on(1), Some(ring.sign("u-twice", "a", &on(1))), "Pending"),
        ];
        let b = build_checked(&[node("a", json!({}), "3")], &[gpunode()], &pods, Some(&ring));
        let grants = |p: &str| b.snap.allocation(&PodKey::new("ml", p)).map(|a| a.grants.clone());
        assert_eq!(grants("legit"), Some(vec![Grant::Whole { gpu: 1 }]));
        assert_eq!(grants("old"), Some(vec![Grant::Whole { gpu: 2 }]));
        assert_eq!(grants("forged"), Some(vec![]));
        assert_eq!(grants("copy"), Some(vec![]));
        assert_eq!(grants("twice"), Some(vec![]));
        let why: Vec<(String, &str, bool)> =
            b.refused.iter().map(|r| (r.pod.to_string(), r.refusal.reason(), r.counted)).collect();
        assert_eq!(
            why,
            [
                ("ml/forged".to_owned(), "Unsigned", false),
                ("ml/copy".to_owned(), "Replayed", false),
                ("ml/old".to_owned(), "Unsigned", true),
                ("ml/twice".to_owned(), "DeviceHeld", false),
            ]
        );
        assert!(b.refused[3].refusal.to_string().contains("ml/legit"), "{}", b.refused[3].refusal);
        // Unchecked (captures, the simulator): everything is trusted as before.
        assert!(build(&[node("a", json!({}), "3")], &[gpunode()], &pods).refused.is_empty());
    }

    #[test]
    fn a_signed_assignment_the_node_cannot_serve_is_refused_with_the_reason_not_a_holder() {
        // Signed for GPU 0 as a whole GPU, but the node reports GPU 0 in MIG mode and nobody
        // holds it: the refusal says what is wrong instead of naming "another pod".
        let ring = Keyring::parse("k1 dGVzc2VyYS1zbmFwc2hvdC10ZXN0LWtleS0zMmJ5dGVz").unwrap();
        let a = r#"{"node":"a","devices":[{"gpu":"GPU-0","index":0}]}"#;
        let ann = json!({annotations::ASSIGNMENT: a, annotations::ASSIGNMENT_SIGNATURE: ring.sign("u-1", "a", a)});
        let mut p = pod("whole", "a", ann, json!({"tessera.dev/gpu": "1"}));
        p.metadata.uid = Some("u-1".into());
        let b = build_checked(&[node("a", json!({}), "3")], &[gpunode()], &[p], Some(&ring));
        assert_eq!(b.refused.len(), 1, "{:?}", b.refused);
        assert_eq!(b.refused[0].refusal.reason(), "DeviceUnavailable");
        let text = b.refused[0].refusal.to_string();
        assert!(text.starts_with("the assignment's devices are not available: "), "{text}");
        assert!(!text.contains("another pod"), "{text}");
    }

    #[test]
    fn only_nodes_whose_agent_reported_serve_the_tessera_device_plugin() {
        let b = build(
            &[node("a", json!({}), "3"), node("b", json!({GFD_PRODUCT: "L4"}), "2")],
            &[gpunode()],
            &[] as &[Pod],
        );
        let served = |n: &str| b.snap.node(&NodeName(n.into())).map(|n| n.device_plugin);
        assert_eq!((served("a"), served("b")), (Some(true), Some(false)));
    }

    #[test]
    fn a_signed_pod_on_a_slice_the_node_has_not_reported_yet_holds_it() {
        // The scheduler asked for 3g.40gb@0 on GPU 0 and bound the pod before the node agent
        // reported the instance (NVIDIA-named pods do not wait for it).
        let ring = Keyring::parse("k1 dGVzc2VyYS1zbmFwc2hvdC10ZXN0LWtleS0zMmJ5dGVz").unwrap();
        let mut gn = gpunode();
        gn.status.as_mut().unwrap().gpus[0].instances.clear();
        let slice = r#"{"node":"a","devices":[{"gpu":"GPU-0","index":0,"profile":"3g.40gb","start":0}]}"#;
        let signed = |name: &str, uid: &str| {
            let ann =
                json!({annotations::ASSIGNMENT: slice, annotations::ASSIGNMENT_SIGNATURE: ring.sign(uid, "a", slice)});
            let mut p = pod(name, "a", ann, json!({"nvidia.com/mig-3g.40gb": "1"}));
            p.metadata.uid = Some(uid.into());
            p
        };
        let b = build_checked(
            &[node("a", json!({}), "3")],
            &[gn],
            &[signed("first", "u1"), signed("second", "u2")],
            Some(&ring),
        );
        let grants = |p: &str| b.snap.allocation(&PodKey::new("ml", p)).map(|a| a.grants.clone());
        assert_eq!(grants("first"), Some(vec![Grant::Mig { gpu: 0, class: ProfileClass::G3, start: 0 }]));
        // Still one pod per slice.
        let why: Vec<(String, &str)> = b.refused.iter().map(|r| (r.pod.to_string(), r.refusal.reason())).collect();
        assert_eq!(why, [("ml/second".to_owned(), "DeviceHeld")]);
        assert!(b.warnings.iter().any(|w| w.contains("not reported yet")), "{:?}", b.warnings);
    }

    #[test]
    fn nvidia_plugin_pods_hold_what_their_node_reports_not_the_lowest_free_devices() {
        let mut gn = gpunode();
        gn.status.as_mut().unwrap().held = vec![
            crate::gpunode::HeldDevice {
                pod: "ml/plugin".into(),
                container: "c".into(),
                resource: "nvidia.com/gpu".into(),
                uuid: "GPU-2".into(),
            },
            crate::gpunode::HeldDevice {
                pod: "ml/mig-plugin".into(),
                container: "c".into(),
                resource: "nvidia.com/mig-3g.40gb".into(),
                uuid: "MIG-0-4".into(),
            },
        ];
        let pods = [
            pod("plugin", "a", json!({}), json!({"nvidia.com/gpu": "1"})),
            pod("mig-plugin", "a", json!({}), json!({"nvidia.com/mig-3g.40gb": "1"})),
            pod("guessed", "a", json!({}), json!({"nvidia.com/gpu": "1"})),
        ];
        let b = build(&[node("a", json!({}), "3")], &[gn], &pods);
        let grants = |p: &str| b.snap.allocation(&PodKey::new("ml", p)).map(|a| a.grants.clone());
        assert_eq!(grants("plugin"), Some(vec![Grant::Whole { gpu: 2 }]), "GPU 2, as kubelet reports");
        assert_eq!(grants("mig-plugin"), Some(vec![Grant::Mig { gpu: 0, class: ProfileClass::G3, start: 4 }]));
        // Not reported (an older agent): the lowest free GPU, as before.
        assert_eq!(grants("guessed"), Some(vec![Grant::Whole { gpu: 1 }]));
    }

    #[test]
    fn a_gpu_waiting_for_a_reset_takes_no_new_pods_unless_someone_already_holds_it() {
        let mut gn = gpunode();
        for i in [1, 2] {
            gn.status.as_mut().unwrap().gpus[i].pending_mode = Some(Mode::Mig);
        }
        let held = r#"{"node":"a","devices":[{"gpu":"GPU-2","index":2}]}"#;
        let pods = [pod("on-2", "a", json!({annotations::ASSIGNMENT: held}), json!({"tessera.dev/gpu": "1"}))];
        let b = build(&[node("a", json!({}), "3")], &[gn], &pods);
        let n = b.snap.node(&NodeName("a".into())).unwrap();
        assert!(!n.gpus[1].healthy, "idle and waiting for a reset: nothing new is planned on it");
        assert!(n.gpus[2].healthy, "held: the pod keeps its GPU");
        assert!(b.warnings.iter().any(|w| w.contains("GPU 1: waits for a reset")), "{:?}", b.warnings);
    }

    #[test]
    fn a_node_without_gpunode_is_described_by_gpu_feature_discovery_labels() {
        let n = node("b", json!({GFD_PRODUCT: "L4", GFD_MEMORY: "23034", SHARING_LABEL: "time-sliced"}), "2");
        let b = build(&[Arc::new(n)], &[] as &[Arc<GpuNode>], &[] as &[Arc<Pod>]);
        let node = b.snap.node(&NodeName("b".into())).unwrap();
        assert_eq!(node.gpus.len(), 2);
        assert_eq!(
            (node.gpus[1].model.as_str(), node.gpus[1].memory_mib, node.gpus[1].mode()),
            ("L4", 23034, GpuMode::Shared)
        );
        assert_eq!((node.cpu_milli, node.memory_mib), (32_000, 256 * 1024));
    }
}
