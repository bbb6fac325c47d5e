//! Live cluster state: kube-rs reflectors of Nodes, Pods, `GpuNode`s and `PodGroup`s, and the
//! pure conversion of what they hold into a core [`Snapshot`].
//!
//! Allocations are rebuilt from scratch on every change: pods bound by tessera carry the exact
//! devices in their `tessera.dev/assignment` annotation; pods of the NVIDIA device plugin
//! (`nvidia.com/gpu`, `nvidia.com/mig-*`) are counted on the lowest free matching devices,
//! since only the node knows which ones it picked. So a restarted scheduler never hands out a
//! device a running pod holds.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node as KubeNode, Pod};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tessera_api::Assignment;
use tessera_api::annotations;
use tessera_api::gpunode::{GpuNode, Health, LinkKind, Mode};
use tessera_api::pod::{self as podparse, NVIDIA_GPU, NVIDIA_MIG_PREFIX, parse_quantity};
use tessera_api::podgroup::{PodGroup, PodGroupSpec};
use tessera_core::mig::MigProduct;
use tessera_core::topology::{Edge, Link, Topology};
use tessera_core::{Allocation, Gpu, GpuMode, Grant, MigOp, Node, NodeName, PodKey, Snapshot};

use crate::state::{Lookup, Scheduler};

/// Node label that puts a node's non-MIG GPUs in time-sliced (shared) mode.
pub const SHARING_LABEL: &str = "tessera.dev/gpu-sharing";
/// GPU Feature Discovery's product label, used for nodes without a `GpuNode`.
pub const GFD_PRODUCT: &str = "nvidia.com/gpu.product";
/// GPU Feature Discovery's memory label (MiB).
pub const GFD_MEMORY: &str = "nvidia.com/gpu.memory";

/// A snapshot built from API objects, and what could not be used.
#[derive(Debug, Default)]
pub struct Built {
    pub snap: Snapshot,
    pub uids: HashMap<String, PodKey>,
    pub mig_uuids: HashMap<(NodeName, u32, u8), String>,
    pub warnings: Vec<String>,
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
fn node_of(node: &KubeNode, gn: Option<&GpuNode>, warnings: &mut Vec<String>) -> Option<(Node, Vec<MigOp>)> {
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
    n.labels = labels;
    n.schedulable = !node.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false);
    n.topology = Arc::new(topology);
    Some((n, ops))
}

/// Builds the snapshot: nodes (with the MIG layouts their agents report), then every bound,
/// non-terminal pod's allocation.
pub fn build(nodes: &[Arc<KubeNode>], gpunodes: &[Arc<GpuNode>], pods: &[Arc<Pod>]) -> Built {
    let mut b = Built::default();
    let by_name: HashMap<&str, &GpuNode> =
        gpunodes.iter().filter_map(|g| g.metadata.name.as_deref().map(|n| (n, g.as_ref()))).collect();
    for kn in nodes {
        let Some(name) = kn.metadata.name.as_deref() else { continue };
        let gn = by_name.get(name).copied();
        let Some((node, ops)) = node_of(kn, gn, &mut b.warnings) else { continue };
        let nn = node.name.clone();
        if let Err(e) = b.snap.add_node(node) {
            b.warnings.push(e.to_string());
            continue;
        }
        for op in ops {
            if let Err(e) = b.snap.apply(&nn, op) {
                b.warnings.push(format!("GpuNode {nn}: {e}"));
            }
        }
        if let Some(status) = gn.and_then(|g| g.status.as_ref()) {
            for g in &status.gpus {
                for i in &g.instances {
                    if !i.uuid.is_empty() {
                        b.mig_uuids.insert((nn.clone(), g.index, i.start), i.uuid.clone());
                    }
                }
            }
        }
    }
    // Exact assignments first, so NVIDIA-plugin pods (whose devices we guess) never take the
    // devices an annotated pod really holds.
    let mut bound: Vec<(bool, &Pod)> = pods
        .iter()
        .filter(|p| {
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some()
                && !matches!(phase, Some("Succeeded" | "Failed"))
        })
        .map(|p| (assignment_of(p).is_none(), p.as_ref()))
        .collect();
    bound.sort_by_key(|(guessed, _)| *guessed);
    for (_, pod) in bound {
        let Ok(key) = podparse::pod_key(pod) else { continue };
        if let Some(uid) = &pod.metadata.uid {
            b.uids.insert(uid.clone(), key.clone());
        }
        let node = NodeName(pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default());
        if b.snap.node(&node).is_none() {
            continue;
        }
        let (cpu_milli, memory_mib) = podparse::requests(pod).unwrap_or((0, 0));
        let grants = match grants_of(&b.snap, &node, pod) {
            Ok(g) => g,
            Err(why) => {
                b.warnings.push(format!("pod {key} on {node}: {why}"));
                Vec::new()
            }
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
        };
        if let Err(e) = b.snap.allocate(alloc.clone()) {
            // Devices first: a node whose cpu/memory looks over-committed (static pods, stale
            // allocatable) must still not lose track of which GPUs are taken.
            b.warnings.push(format!("pod {key}: {e}"));
            let gpu_only = Allocation { cpu_milli: 0, memory_mib: 0, ..alloc };
            if let Err(e) = b.snap.allocate(gpu_only) {
                b.warnings.push(format!("pod {key}: {e}"));
            }
        }
    }
    b
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

/// [`Lookup`] over the reflector stores.
#[derive(Debug, Clone)]
pub struct StoreLookup {
    pub pods: Store<Pod>,
    pub groups: Store<PodGroup>,
}

impl Lookup for StoreLookup {
    fn pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        self.pods.get(&ObjectRef::new(name).within(namespace)).map(|p| (*p).clone())
    }
    fn pod_group(&self, namespace: &str, name: &str) -> Option<PodGroupSpec> {
        self.groups.get(&ObjectRef::new(name).within(namespace)).map(|g| g.spec.clone())
    }
}

/// The reflectors, started.
#[derive(Debug, Clone)]
pub struct Watch {
    pub nodes: Store<KubeNode>,
    pub pods: Store<Pod>,
    pub gpunodes: Store<GpuNode>,
    pub groups: Store<PodGroup>,
    pub changed: Arc<tokio::sync::Notify>,
}

fn spawn_reflector<K>(api: Api<K>, changed: Arc<tokio::sync::Notify>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let stream =
        reflector::reflector(writer, watcher(api, watcher::Config::default())).default_backoff().applied_objects();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(_) => changed.notify_one(),
                Err(error) => tracing::warn!(%error, kind = %K::kind(&()), "Watch failed; retrying"),
            }
        }
    });
    store
}

impl Watch {
    /// Starts the four reflectors. PodGroups are optional (the CRD may not be installed).
    pub fn start(client: &Client) -> Self {
        let changed = Arc::new(tokio::sync::Notify::new());
        Self {
            nodes: spawn_reflector(Api::all(client.clone()), changed.clone()),
            pods: spawn_reflector(Api::all(client.clone()), changed.clone()),
            gpunodes: spawn_reflector(Api::all(client.clone()), changed.clone()),
            groups: spawn_reflector(Api::all(client.clone()), changed.clone()),
            changed,
        }
    }

    pub fn lookup(&self) -> StoreLookup {
        StoreLookup { pods: self.pods.clone(), groups: self.groups.clone() }
    }

    /// Waits for the first full list of Nodes, Pods and GpuNodes, then rebuilds the
    /// scheduler's snapshot after every change (coalescing bursts for `debounce`).
    pub async fn sync(self, scheduler: Arc<Scheduler>, debounce: Duration) {
        for (kind, ready) in [
            ("Node", self.nodes.wait_until_ready().await.is_ok()),
            ("Pod", self.pods.wait_until_ready().await.is_ok()),
            ("GpuNode", self.gpunodes.wait_until_ready().await.is_ok()),
        ] {
            if !ready {
                tracing::error!(kind, "Reflector stopped before its first list");
                return;
            }
        }
        loop {
            let built = build(&self.nodes.state(), &self.gpunodes.state(), &self.pods.state());
            for w in built.warnings.iter().take(20) {
                tracing::debug!(warning = %w, "Cluster state");
            }
            tracing::debug!(
                nodes = built.snap.nodes().len(),
                pods = built.snap.allocations().len(),
                "Rebuilt cluster state"
            );
            scheduler.replace_base(built.snap, built.uids, built.mig_uuids);
            // Gang plans another replica made (before a restart or a leader change).
            scheduler.restore_reservations(&self.pods.state());
            scheduler.set_synced(true);
            self.changed.notified().await;
            tokio::time::sleep(debounce).await;
        }
    }
}
