//! The cluster model: nodes, GPUs, allocations, and a [`Snapshot`] with transactions.
//!
//! A snapshot is the only mutable state in the core. Every mutation goes through a method that
//! checks it (no GPU, slice or share is ever over-committed, MIG layouts stay legal) and, while a
//! checkpoint is open, records its inverse in a journal so a gang plan can be undone exactly.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::Error;
pub use crate::keys::{NodeName, PodKey};
use crate::mig::{Instance, MigLayout, MigProduct, ProfileClass};
use crate::topology::Topology;

/// How a GPU is shared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GpuMode {
    /// Exclusive: one pod holds the whole GPU.
    Full,
    /// Time-sliced: pods hold milli-GPU shares summing to at most 1000 (a whole-GPU pod takes
    /// 1000). This is how the openb trace's GPUs behave.
    Shared,
    /// Partitioned into MIG instances, each held by at most one pod.
    Mig,
}

/// Milli-GPU in one GPU.
pub const MILLI_PER_GPU: u32 = 1000;

/// One GPU and what is allocated on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gpu {
    pub index: u32,
    pub uuid: String,
    /// Product name, e.g. `H100-80GB`, `T4`. MIG-capable products are those [`MigProduct`] knows.
    pub model: String,
    pub memory_mib: u64,
    pub numa: Option<u32>,
    pub healthy: bool,
    pub(crate) mode: GpuMode,
    /// Full/Shared: milli-GPU in use (a whole-GPU grant is 1000).
    pub(crate) used_milli: u32,
    /// Mig: the instances (allocated or not).
    pub(crate) mig: Option<MigLayout>,
    /// Mig: starts of allocated instances, as a bit mask.
    pub(crate) mig_busy: u8,
}

impl Gpu {
    pub fn new(index: u32, model: &str, memory_mib: u64, mode: GpuMode) -> Self {
        let mig = match (mode, MigProduct::from_name(model)) {
            (GpuMode::Mig, Some(p)) => Some(MigLayout::empty(p)),
            _ => None,
        };
        // A MIG request on a product without MIG falls back to exclusive.
        let mode = if mode == GpuMode::Mig && mig.is_none() { GpuMode::Full } else { mode };
        Self {
            index,
            uuid: String::new(),
            model: model.to_owned(),
            memory_mib,
            numa: None,
            healthy: true,
            mode,
            used_milli: 0,
            mig,
            mig_busy: 0,
        }
    }

    pub fn mode(&self) -> GpuMode {
        self.mode
    }

    pub fn mig_product(&self) -> Option<MigProduct> {
        // A MIG layout knows its product; parsing the name is the slow path (scoring asks often).
        match &self.mig {
            Some(l) => Some(l.product()),
            None => MigProduct::from_name(&self.model),
        }
    }

    pub fn mig_capable(&self) -> bool {
        self.mig_product().is_some()
    }

    pub fn mig_layout(&self) -> Option<&MigLayout> {
        self.mig.as_ref()
    }

    /// Milli-GPU used (Full/Shared); 0 on MIG GPUs.
    pub fn used_milli(&self) -> u32 {
        self.used_milli
    }

    /// Milli-GPU free for a share or whole grant; 0 for MIG GPUs and unhealthy GPUs.
    pub fn free_milli(&self) -> u32 {
        if !self.healthy || self.mode == GpuMode::Mig { 0 } else { MILLI_PER_GPU - self.used_milli }
    }

    /// Whether the instance at `start` is held by a pod.
    pub fn instance_busy(&self, start: u8) -> bool {
        self.mig_busy & (1 << start) != 0
    }

    /// Instances that exist and are not held by any pod.
    pub fn free_instances(&self) -> impl Iterator<Item = Instance> + '_ {
        self.mig.iter().flat_map(|l| l.instances().iter().copied()).filter(|i| !self.instance_busy(i.start))
    }

    /// Nothing allocated and (for MIG) no instances at all: the mode may change.
    pub fn is_idle(&self) -> bool {
        self.used_milli == 0 && self.mig.as_ref().is_none_or(|l| l.is_empty())
    }

    /// Nothing allocated (instances may exist).
    pub fn is_unused(&self) -> bool {
        self.used_milli == 0 && self.mig_busy == 0
    }

    /// Fraction of the GPU allocated, in milli-GPU: shares as is, MIG by compute slices held.
    pub fn allocated_milli(&self) -> u32 {
        match (&self.mig, self.mode) {
            (Some(layout), GpuMode::Mig) => {
                let geom = layout.geometry();
                let held: u32 = layout
                    .instances()
                    .iter()
                    .filter(|i| self.instance_busy(i.start))
                    .filter_map(|i| geom.profile(i.class))
                    .map(|p| u32::from(p.compute_slices))
                    .sum();
                held * MILLI_PER_GPU / u32::from(geom.compute_slices)
            }
            _ => self.used_milli,
        }
    }
}

/// One node: capacity, labels, GPUs and their interconnect.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: NodeName,
    pub cpu_milli: u64,
    pub memory_mib: u64,
    pub labels: BTreeMap<String, String>,
    /// The pool the node belongs to, as whoever built the node knows it (the cluster's
    /// `tessera.dev/pool` label, a scenario's pool); `None`: see [`Node::pool()`].
    pub pool: Option<String>,
    /// False when cordoned, not ready, or tainted against tessera's pods.
    pub schedulable: bool,
    pub gpus: Vec<Gpu>,
    pub topology: Arc<Topology>,
    /// Taints; those with effect `NoSchedule`/`NoExecute` repel pods that do not tolerate them.
    pub taints: Vec<crate::rules::Taint>,
    /// Allocatable extended resources by NVIDIA name (`nvidia.com/gpu`, `nvidia.com/mig-*`), as
    /// kube-scheduler counts them; `None` when unknown (demo, simulator): not checked.
    pub extended: Option<BTreeMap<String, u64>>,
    /// Whether tessera's node agent serves `tessera.dev/gpu` here (it reported the GPUs); false
    /// for a node known only from GPU Feature Discovery labels, whose GPUs have no UUIDs.
    pub device_plugin: bool,
    pub(crate) extended_used: BTreeMap<String, u64>,
    pub(crate) used_cpu_milli: u64,
    pub(crate) used_memory_mib: u64,
    /// Pods holding allocations here, sorted.
    pub(crate) pods: Vec<PodKey>,
    /// Identifies this node's state within its snapshot's [`Versions`]: a fresh value from
    /// that source after every change, so equal versions mean equal state (across the
    /// snapshot's clones too). Lets callers memoise per-node decisions. 0 outside a snapshot.
    pub(crate) version: u64,
}

impl PartialEq for Node {
    /// Equal state; the version is an identity for caching and is not compared.
    fn eq(&self, o: &Self) -> bool {
        self.name == o.name
            && self.cpu_milli == o.cpu_milli
            && self.memory_mib == o.memory_mib
            && self.labels == o.labels
            && self.pool == o.pool
            && self.schedulable == o.schedulable
            && self.gpus == o.gpus
            && self.topology == o.topology
            && self.taints == o.taints
            && self.extended == o.extended
            && self.device_plugin == o.device_plugin
            && self.extended_used == o.extended_used
            && self.used_cpu_milli == o.used_cpu_milli
            && self.used_memory_mib == o.used_memory_mib
            && self.pods == o.pods
    }
}
impl Eq for Node {}

impl Node {
    pub fn new(name: &str, cpu_milli: u64, memory_mib: u64, gpus: Vec<Gpu>) -> Self {
        let n = gpus.len() as u32;
        Self {
            name: NodeName(name.to_owned()),
            cpu_milli,
            memory_mib,
            labels: BTreeMap::new(),
            pool: None,
            schedulable: true,
            gpus,
            topology: Arc::new(Topology::unconnected(n)),
            taints: Vec::new(),
            extended: None,
            device_plugin: true,
            extended_used: BTreeMap::new(),
            used_cpu_milli: 0,
            used_memory_mib: 0,
            pods: Vec::new(),
            version: 0,
        }
    }

    /// The node's state identity (see the field's documentation).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Pods holding allocations on this node, in key order.
    pub fn pods(&self) -> &[PodKey] {
        &self.pods
    }

    pub fn free_cpu_milli(&self) -> u64 {
        self.cpu_milli - self.used_cpu_milli
    }

    pub fn free_memory_mib(&self) -> u64 {
        self.memory_mib - self.used_memory_mib
    }

    pub fn used_cpu_milli(&self) -> u64 {
        self.used_cpu_milli
    }

    pub fn used_memory_mib(&self) -> u64 {
        self.used_memory_mib
    }

    /// Of an extended resource: (allocatable, requested by the pods here), when known.
    pub fn extended_of(&self, name: &str) -> Option<(u64, u64)> {
        let cap = self.extended.as_ref()?;
        Some((cap.get(name).copied().unwrap_or(0), self.extended_used.get(name).copied().unwrap_or(0)))
    }

    pub fn gpu(&self, index: u32) -> Option<&Gpu> {
        self.gpus.iter().find(|g| g.index == index)
    }

    fn gpu_pos(&self, index: u32) -> Result<usize, Error> {
        self.gpus
            .iter()
            .position(|g| g.index == index)
            .ok_or_else(|| Error::UnknownGpu { node: self.name.clone(), gpu: index })
    }

    /// Node pool: the `pool` field, else the first GPU's model, else `cpu`.
    pub fn pool(&self) -> &str {
        self.pool.as_deref().or_else(|| self.gpus.first().map(|g| g.model.as_str())).unwrap_or("cpu")
    }
}

/// What a pod holds on one GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Grant {
    /// The whole GPU (Full or Shared mode).
    Whole { gpu: u32 },
    /// A milli-GPU share of a Shared-mode GPU.
    Share { gpu: u32, milli: u32 },
    /// The MIG instance of `class` at `start`.
    Mig { gpu: u32, class: ProfileClass, start: u8 },
}

impl Grant {
    pub fn gpu(&self) -> u32 {
        match *self {
            Grant::Whole { gpu } | Grant::Share { gpu, .. } | Grant::Mig { gpu, .. } => gpu,
        }
    }
}

/// Everything one pod holds on one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub pod: PodKey,
    pub node: NodeName,
    pub cpu_milli: u64,
    pub memory_mib: u64,
    pub grants: Vec<Grant>,
    pub priority: i32,
    /// The gang this pod belongs to, if any.
    pub gang: Option<String>,
    /// Set while the allocation is a gang reservation not yet bound: it lapses at this time
    /// (milliseconds, on the caller's clock).
    pub reserved_until_ms: Option<u64>,
    /// Extended resources by NVIDIA name the pod requests (see [`Node::extended`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extended: Vec<(String, u64)>,
}

/// A MIG reconfiguration step on one GPU, as data for the node agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum MigOp {
    /// Switch an idle GPU between full/shared and MIG mode.
    SetMode {
        gpu: u32,
        mode: GpuMode,
    },
    Create {
        gpu: u32,
        class: ProfileClass,
        start: u8,
    },
    Destroy {
        gpu: u32,
        class: ProfileClass,
        start: u8,
    },
}

/// An opened checkpoint; pass it back to [`Snapshot::rollback`] or [`Snapshot::commit`].
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a checkpoint must be rolled back or committed"]
pub struct Checkpoint {
    mark: usize,
    depth: usize,
}

#[derive(Clone, Debug)]
enum Undo {
    Allocated(PodKey),
    Released(Box<Allocation>),
    Applied { node: usize, inverse: MigOp, reconfigs_before: u64 },
    NodeAdded(NodeName),
    NodeRemoved(Box<Node>),
}

/// A snapshot's allocations by pod: a persistent map, so a copy of a snapshot shares them and a
/// change copies only the path to the entry it touches.
pub type Allocations = imbl::OrdMap<PodKey, Allocation>;

/// The cluster state the core decides on.
///
/// Copies are cheap: nodes are shared behind `Arc`s (a change copies that node only) and the
/// allocations are a persistent map, so the extender can hand its verbs a copy of a state it
/// keeps updating node by node without copying 5,000 nodes and 50,000 allocations each time.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    nodes: Vec<Arc<Node>>,
    index: Arc<BTreeMap<NodeName, usize>>,
    allocations: Allocations,
    reconfigs: u64,
    journal: Vec<Undo>,
    open: usize,
    /// Where this snapshot's node versions come from; shared with its clones.
    versions: Versions,
    /// Largest node cpu and GPU count, kept for policies that normalise by them.
    max_cpu_milli: u64,
    max_gpus: usize,
}

impl PartialEq for Snapshot {
    /// Equal state; the journal is bookkeeping and not compared.
    fn eq(&self, other: &Self) -> bool {
        self.nodes == other.nodes && self.allocations == other.allocations && self.reconfigs == other.reconfigs
    }
}
impl Eq for Snapshot {}

impl Snapshot {
    /// A snapshot of `nodes` with a fresh [`Versions`] source of its own.
    pub fn new(nodes: impl IntoIterator<Item = Node>) -> Result<Self, Error> {
        Self::new_in(Versions::new(), nodes)
    }

    /// A snapshot of `nodes` whose versions come from `versions`: a builder that rebuilds a
    /// cluster from scratch passes the source of the snapshots it built before, so a cache
    /// keyed by version (the policy memo) can compare the rebuild's nodes with theirs.
    pub fn new_in(versions: Versions, nodes: impl IntoIterator<Item = Node>) -> Result<Self, Error> {
        let mut s = Self { versions, ..Self::default() };
        match s.add_nodes(nodes).into_iter().next() {
            Some(e) => Err(e),
            None => Ok(s),
        }
    }

    /// A snapshot from parts other snapshots held (see [`Snapshot::into_parts`]): nodes with
    /// their usage counted, the allocations on them, and the MIG steps applied. Nodes keep
    /// their versions. The parts must agree (every allocation on a listed node and counted
    /// there, node names distinct); [`Snapshot::audit`] checks a result. The nodes get
    /// versions from a fresh source (the parts may come from snapshots of different sources);
    /// [`Snapshot::keep_versions`] gives the unchanged ones an older snapshot's back.
    pub fn from_parts(mut nodes: Vec<Node>, allocations: Allocations, reconfigs: u64) -> Self {
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        debug_assert!(nodes.windows(2).all(|w| w[0].name != w[1].name), "node listed twice");
        let versions = Versions::new();
        let nodes = nodes
            .into_iter()
            .map(|mut n| {
                n.version = versions.next();
                Arc::new(n)
            })
            .collect();
        let mut s = Self { nodes, allocations, reconfigs, versions, ..Self::default() };
        s.reindex();
        s
    }

    /// The nodes (name order), allocations and MIG step count, for [`Snapshot::from_parts`].
    pub fn into_parts(self) -> (Vec<Node>, Allocations, u64) {
        let nodes = self.nodes.into_iter().map(|n| Arc::try_unwrap(n).unwrap_or_else(|n| (*n).clone())).collect();
        (nodes, self.allocations, self.reconfigs)
    }

    /// Replaces node `name` and every allocation on it with `with` (the node as a snapshot
    /// holds it, its usage counted, and the allocations counted there; see
    /// [`Snapshot::into_parts`]), or removes them when `with` is `None`; a node not listed yet
    /// is inserted. Costs that node, not the cluster (adding or removing a node costs a shift
    /// of the node list). A node whose state equals the one it replaces keeps that one's
    /// version, so per-node caches keyed by version stay valid; a changed one gets a fresh
    /// version. Not journaled: no checkpoint may be open. Does not touch [`Snapshot::reconfigs`]
    /// (see [`Snapshot::set_reconfigs`]).
    pub fn replace_node(&mut self, name: &NodeName, with: Option<(Node, Vec<Allocation>)>) -> Result<(), Error> {
        debug_assert_eq!(self.open, 0, "replace_node inside a checkpoint");
        if let Some((n, allocs)) = &with {
            if &n.name != name {
                return Err(Error::Invalid(format!("node {} replaces node {name}", n.name)));
            }
            if let Some(a) = allocs.iter().find(|a| &a.node != name || n.pods.binary_search(&a.pod).is_err()) {
                return Err(Error::Invalid(format!("allocation of {} is not counted on node {name}", a.pod)));
            }
            if allocs.len() != n.pods.len() {
                return Err(Error::Invalid(format!("node {name} counts pods it holds no allocation for")));
            }
            if let Some(a) = allocs.iter().find(|a| self.allocations.get(&a.pod).is_some_and(|old| &old.node != name)) {
                return Err(Error::AlreadyAllocated(a.pod.clone()));
            }
        }
        let at = self.index.get(name).copied();
        if let Some(i) = at {
            for pod in std::mem::take(&mut self.node_mut(i).pods) {
                self.allocations.remove(&pod);
            }
        }
        let (old_cpu, old_gpus) = at.map_or((0, 0), |i| (self.nodes[i].cpu_milli, self.nodes[i].gpus.len()));
        match (at, with) {
            (Some(i), Some((mut n, allocs))) => {
                // The old node's pods were taken above: compare with them put back.
                let versions = self.versions.clone();
                let old = self.node_mut(i);
                old.pods = n.pods.clone();
                n.version = if *old == n { old.version } else { versions.next() };
                *old = n;
                self.allocations.extend(allocs.into_iter().map(|a| (a.pod.clone(), a)));
                let (cpu, gpus) = (self.nodes[i].cpu_milli, self.nodes[i].gpus.len());
                if (cpu < old_cpu && old_cpu == self.max_cpu_milli) || (gpus < old_gpus && old_gpus == self.max_gpus) {
                    self.max_cpu_milli = self.nodes.iter().map(|n| n.cpu_milli).max().unwrap_or(0);
                    self.max_gpus = self.nodes.iter().map(|n| n.gpus.len()).max().unwrap_or(0);
                } else {
                    self.max_cpu_milli = self.max_cpu_milli.max(cpu);
                    self.max_gpus = self.max_gpus.max(gpus);
                }
            }
            (Some(i), None) => {
                self.nodes.remove(i);
                self.reindex();
            }
            (None, Some((mut n, allocs))) => {
                n.version = self.versions.next();
                let pos = self.nodes.partition_point(|x| x.name < *name);
                self.nodes.insert(pos, Arc::new(n));
                self.allocations.extend(allocs.into_iter().map(|a| (a.pod.clone(), a)));
                self.reindex();
            }
            (None, None) => {}
        }
        Ok(())
    }

    /// Sets the count of MIG steps applied, for a snapshot assembled from parts
    /// ([`Snapshot::replace_node`]).
    pub fn set_reconfigs(&mut self, reconfigs: u64) {
        self.reconfigs = reconfigs;
    }

    /// Nodes in name order.
    pub fn nodes(&self) -> &[Arc<Node>] {
        &self.nodes
    }

    /// The node at `i` for changing it; copies it first when another snapshot shares it.
    fn node_mut(&mut self, i: usize) -> &mut Node {
        Arc::make_mut(&mut self.nodes[i])
    }

    pub fn node(&self, name: &NodeName) -> Option<&Node> {
        self.index.get(name).map(|&i| &*self.nodes[i])
    }

    pub fn node_index(&self, name: &NodeName) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// Gives every node whose state equals its namesake's in `old` that node's version, and
    /// returns how many kept theirs. A snapshot rebuilt from scratch gets fresh versions
    /// everywhere; this keeps per-node caches keyed by version (the policy memo) valid for the
    /// nodes that did not change. The snapshot joins `old`'s [`Versions`] source: a node that
    /// changed gets a fresh version from it, so afterwards every version is comparable with
    /// `old`'s.
    pub fn keep_versions(&mut self, old: &Snapshot) -> usize {
        let joins = !self.versions.same(&old.versions);
        let mut kept = 0;
        for n in &mut self.nodes {
            if let Some(&i) = old.index.get(&n.name)
                && (Arc::ptr_eq(&old.nodes[i], n) || old.nodes[i] == *n)
            {
                // Share the old node: same state, same version, one copy in memory.
                *n = old.nodes[i].clone();
                kept += 1;
            } else if joins {
                Arc::make_mut(n).version = old.versions.next();
            }
        }
        self.versions = old.versions.clone();
        kept
    }

    /// Where this snapshot's node versions come from (see [`Versions`]).
    pub fn versions(&self) -> &Versions {
        &self.versions
    }

    pub fn allocations(&self) -> &Allocations {
        &self.allocations
    }

    pub fn allocation(&self, pod: &PodKey) -> Option<&Allocation> {
        self.allocations.get(pod)
    }

    /// MIG create/destroy operations applied so far.
    pub fn reconfigs(&self) -> u64 {
        self.reconfigs
    }

    /// Adds a node. Its GPUs must be unallocated; MIG layouts present are kept.
    pub fn add_node(&mut self, node: Node) -> Result<(), Error> {
        self.check_new(&node)?;
        let name = node.name.clone();
        let pos = self.nodes.partition_point(|n| n.name < name);
        let mut node = node;
        // Fields are public before a node joins a snapshot: stamp the state it joins with.
        node.version = self.versions.next();
        self.nodes.insert(pos, Arc::new(node));
        self.reindex();
        self.record(Undo::NodeAdded(name));
        Ok(())
    }

    /// [`Snapshot::add_node`] for many nodes with one sort and one index rebuild (adding them
    /// one by one costs a shift and a whole index per node: quadratic in a cluster's nodes).
    /// Returns why each refused node was refused; the others are added.
    pub fn add_nodes(&mut self, nodes: impl IntoIterator<Item = Node>) -> Vec<Error> {
        let mut errors = Vec::new();
        let mut batch = std::collections::HashSet::new();
        let before = self.nodes.len();
        for mut node in nodes {
            if let Err(e) = self.check_new(&node) {
                errors.push(e);
                continue;
            }
            if !batch.insert(node.name.clone()) {
                errors.push(Error::DuplicateNode(node.name));
                continue;
            }
            node.version = self.versions.next();
            self.record(Undo::NodeAdded(node.name.clone()));
            self.nodes.push(Arc::new(node));
        }
        if self.nodes.len() > before {
            self.nodes.sort_by(|a, b| a.name.cmp(&b.name));
            self.reindex();
        }
        errors
    }

    /// Why `node` cannot join this snapshot, if it cannot.
    fn check_new(&self, node: &Node) -> Result<(), Error> {
        if self.index.contains_key(&node.name) {
            return Err(Error::DuplicateNode(node.name.clone()));
        }
        if node.used_cpu_milli != 0 || !node.pods.is_empty() || node.gpus.iter().any(|g| !g.is_unused()) {
            return Err(Error::Invalid(format!("node {} is added with allocations", node.name)));
        }
        let mut seen = std::collections::BTreeSet::new();
        for g in &node.gpus {
            if !seen.insert(g.index) {
                return Err(Error::Invalid(format!("node {}: GPU {} listed twice", node.name, g.index)));
            }
        }
        Ok(())
    }

    /// Removes a node that holds no allocations.
    pub fn remove_node(&mut self, name: &NodeName) -> Result<Node, Error> {
        let i = self.require_node(name)?;
        if let Some(pod) = self.allocations.values().find(|a| &a.node == name) {
            return Err(Error::NodeInUse { node: name.clone(), pod: pod.pod.clone() });
        }
        let node = self.nodes.remove(i);
        self.reindex();
        let node = Arc::try_unwrap(node).unwrap_or_else(|n| (*n).clone());
        self.record(Undo::NodeRemoved(Box::new(node.clone())));
        Ok(node)
    }

    /// Marks a node (un)schedulable; not journaled (a cluster fact, not a plan).
    pub fn set_schedulable(&mut self, name: &NodeName, schedulable: bool) -> Result<(), Error> {
        let i = self.require_node(name)?;
        let v = self.versions.next();
        let node = self.node_mut(i);
        node.schedulable = schedulable;
        node.version = v;
        Ok(())
    }

    fn reindex(&mut self) {
        self.index = Arc::new(self.nodes.iter().enumerate().map(|(i, n)| (n.name.clone(), i)).collect());
        self.max_cpu_milli = self.nodes.iter().map(|n| n.cpu_milli).max().unwrap_or(0);
        self.max_gpus = self.nodes.iter().map(|n| n.gpus.len()).max().unwrap_or(0);
    }

    /// The largest node's cpu capacity.
    pub fn max_node_cpu_milli(&self) -> u64 {
        self.max_cpu_milli
    }

    /// The most GPUs any node has.
    pub fn max_node_gpus(&self) -> usize {
        self.max_gpus
    }

    fn require_node(&self, name: &NodeName) -> Result<usize, Error> {
        self.index.get(name).copied().ok_or_else(|| Error::UnknownNode(name.clone()))
    }

    /// Applies a MIG step to a GPU if NVIDIA (and the pods on it) allow it.
    pub fn apply(&mut self, node: &NodeName, op: MigOp) -> Result<(), Error> {
        let ni = self.require_node(node)?;
        let before = self.reconfigs;
        let inverse = match op {
            MigOp::SetMode { gpu, .. } => {
                let n = &self.nodes[ni];
                let old = n.gpus[n.gpu_pos(gpu)?].mode;
                MigOp::SetMode { gpu, mode: old }
            }
            MigOp::Create { gpu, class, start } => MigOp::Destroy { gpu, class, start },
            MigOp::Destroy { gpu, class, start } => MigOp::Create { gpu, class, start },
        };
        self.apply_at(ni, op)?;
        self.record(Undo::Applied { node: ni, inverse, reconfigs_before: before });
        Ok(())
    }

    fn apply_at(&mut self, ni: usize, op: MigOp) -> Result<(), Error> {
        let node = Arc::make_mut(&mut self.nodes[ni]);
        node.version = self.versions.next();
        let name = node.name.clone();
        let gi = node.gpu_pos(match op {
            MigOp::SetMode { gpu, .. } | MigOp::Create { gpu, .. } | MigOp::Destroy { gpu, .. } => gpu,
        })?;
        let gpu = &mut node.gpus[gi];
        match op {
            MigOp::SetMode { mode, .. } => {
                if gpu.mode == mode {
                    return Ok(());
                }
                if !gpu.is_idle() {
                    return Err(Error::GpuBusy { node: name, gpu: gpu.index, why: "mode change needs an idle GPU" });
                }
                match mode {
                    GpuMode::Mig => {
                        let p = gpu.mig_product().ok_or_else(|| Error::NotMigCapable {
                            node: name.clone(),
                            gpu: gpu.index,
                            model: gpu.model.clone(),
                        })?;
                        gpu.mig = Some(MigLayout::empty(p));
                    }
                    GpuMode::Full | GpuMode::Shared => gpu.mig = None,
                }
                gpu.mode = mode;
            }
            MigOp::Create { class, start, .. } => {
                let layout = gpu.mig.as_mut().ok_or(Error::NotInMigMode { node: name.clone(), gpu: gpu.index })?;
                layout.create(class, start).map_err(|reason| Error::Mig { node: name, gpu: gpu.index, reason })?;
                self.reconfigs += 1;
            }
            MigOp::Destroy { class, start, .. } => {
                if gpu.instance_busy(start) {
                    return Err(Error::GpuBusy { node: name, gpu: gpu.index, why: "instance is allocated" });
                }
                let layout = gpu.mig.as_mut().ok_or(Error::NotInMigMode { node: name.clone(), gpu: gpu.index })?;
                layout.destroy(class, start).map_err(|reason| Error::Mig { node: name, gpu: gpu.index, reason })?;
                self.reconfigs += 1;
            }
        }
        Ok(())
    }

    /// Records an allocation after checking every grant against the node's free capacity.
    pub fn allocate(&mut self, alloc: Allocation) -> Result<(), Error> {
        if self.allocations.contains_key(&alloc.pod) {
            return Err(Error::AlreadyAllocated(alloc.pod));
        }
        let ni = self.require_node(&alloc.node)?;
        self.check_allocation(ni, &alloc)?;
        self.add_usage(ni, &alloc);
        let pod = alloc.pod.clone();
        self.allocations.insert(pod.clone(), alloc);
        self.record(Undo::Allocated(pod));
        Ok(())
    }

    fn check_allocation(&self, ni: usize, alloc: &Allocation) -> Result<(), Error> {
        let node = &self.nodes[ni];
        let over = |what: &str| Error::OverCommit { node: node.name.clone(), what: what.to_owned() };
        if alloc.cpu_milli > node.free_cpu_milli() {
            return Err(over("cpu"));
        }
        if alloc.memory_mib > node.free_memory_mib() {
            return Err(over("memory"));
        }
        // Per-GPU totals inside this allocation, so two grants on one GPU are checked together.
        let mut milli: BTreeMap<u32, u32> = BTreeMap::new();
        let mut starts: BTreeMap<u32, u8> = BTreeMap::new();
        for g in &alloc.grants {
            let gpu = &node.gpus[node.gpu_pos(g.gpu())?];
            if !gpu.healthy {
                return Err(over(&format!("GPU {} (unhealthy)", gpu.index)));
            }
            match *g {
                Grant::Whole { .. } | Grant::Share { .. } => {
                    let want = match *g {
                        Grant::Share { milli, .. } => {
                            if gpu.mode != GpuMode::Shared {
                                return Err(over(&format!("GPU {} is not in shared mode", gpu.index)));
                            }
                            if milli == 0 || milli > MILLI_PER_GPU {
                                return Err(Error::Invalid(format!("share of {milli} milli-GPU")));
                            }
                            milli
                        }
                        _ => MILLI_PER_GPU,
                    };
                    if gpu.mode == GpuMode::Mig {
                        return Err(over(&format!("GPU {} is in MIG mode", gpu.index)));
                    }
                    let total = milli.entry(gpu.index).or_default();
                    *total += want;
                    if *total > gpu.free_milli() {
                        return Err(over(&format!("GPU {}", gpu.index)));
                    }
                }
                Grant::Mig { class, start, .. } => {
                    let exists = gpu.mig.as_ref().is_some_and(|l| l.instances().contains(&Instance { class, start }));
                    if !exists {
                        return Err(over(&format!("GPU {}: no such MIG instance at {start}", gpu.index)));
                    }
                    let mask = starts.entry(gpu.index).or_default();
                    if gpu.instance_busy(start) || *mask & (1 << start) != 0 {
                        return Err(over(&format!("GPU {}: MIG instance at {start}", gpu.index)));
                    }
                    *mask |= 1 << start;
                }
            }
        }
        Ok(())
    }

    fn add_usage(&mut self, ni: usize, alloc: &Allocation) {
        let v = self.versions.next();
        let node = self.node_mut(ni);
        node.version = v;
        node.used_cpu_milli += alloc.cpu_milli;
        node.used_memory_mib += alloc.memory_mib;
        for (name, n) in &alloc.extended {
            *node.extended_used.entry(name.clone()).or_default() += n;
        }
        if let Err(pos) = node.pods.binary_search(&alloc.pod) {
            node.pods.insert(pos, alloc.pod.clone());
        }
        for g in &alloc.grants {
            let Some(gpu) = node.gpus.iter_mut().find(|x| x.index == g.gpu()) else {
                continue;
            };
            match *g {
                Grant::Whole { .. } => gpu.used_milli += MILLI_PER_GPU,
                Grant::Share { milli, .. } => gpu.used_milli += milli,
                Grant::Mig { start, .. } => gpu.mig_busy |= 1 << start,
            }
        }
    }

    fn remove_usage(&mut self, ni: usize, alloc: &Allocation) {
        let v = self.versions.next();
        let node = self.node_mut(ni);
        node.version = v;
        node.used_cpu_milli -= alloc.cpu_milli;
        node.used_memory_mib -= alloc.memory_mib;
        for (name, n) in &alloc.extended {
            if let Some(used) = node.extended_used.get_mut(name) {
                *used = used.saturating_sub(*n);
                if *used == 0 {
                    node.extended_used.remove(name);
                }
            }
        }
        if let Ok(pos) = node.pods.binary_search(&alloc.pod) {
            node.pods.remove(pos);
        }
        for g in &alloc.grants {
            let Some(gpu) = node.gpus.iter_mut().find(|x| x.index == g.gpu()) else {
                continue;
            };
            match *g {
                Grant::Whole { .. } => gpu.used_milli -= MILLI_PER_GPU,
                Grant::Share { milli, .. } => gpu.used_milli -= milli,
                Grant::Mig { start, .. } => gpu.mig_busy &= !(1 << start),
            }
        }
    }

    /// Releases a pod's allocation and returns it.
    pub fn release(&mut self, pod: &PodKey) -> Result<Allocation, Error> {
        let alloc = self.allocations.remove(pod).ok_or_else(|| Error::UnknownPod(pod.clone()))?;
        if let Some(ni) = self.node_index(&alloc.node) {
            self.remove_usage(ni, &alloc);
        }
        self.record(Undo::Released(Box::new(alloc.clone())));
        Ok(alloc)
    }

    /// Marks a reserved allocation as bound (no longer lapsing).
    pub fn confirm(&mut self, pod: &PodKey) -> Result<(), Error> {
        let alloc = self.allocations.get(pod).ok_or_else(|| Error::UnknownPod(pod.clone()))?.clone();
        if alloc.reserved_until_ms.is_none() {
            return Ok(());
        }
        self.release(pod)?;
        self.allocate(Allocation { reserved_until_ms: None, ..alloc })
    }

    fn record(&mut self, undo: Undo) {
        if self.open > 0 {
            self.journal.push(undo);
        }
    }

    /// Opens a checkpoint; every change after it can be undone with [`Snapshot::rollback`].
    /// Checkpoints nest; close them innermost first.
    pub fn checkpoint(&mut self) -> Checkpoint {
        self.open += 1;
        Checkpoint { mark: self.journal.len(), depth: self.open }
    }

    /// Undoes every change since `cp` and closes it.
    pub fn rollback(&mut self, cp: Checkpoint) {
        debug_assert_eq!(cp.depth, self.open, "checkpoints closed out of order");
        while self.journal.len() > cp.mark {
            let Some(undo) = self.journal.pop() else {
                break;
            };
            self.undo(undo);
        }
        self.close();
    }

    /// Keeps every change since `cp` and closes it.
    pub fn commit(&mut self, cp: Checkpoint) {
        debug_assert_eq!(cp.depth, self.open, "checkpoints closed out of order");
        self.close();
    }

    fn close(&mut self) {
        self.open = self.open.saturating_sub(1);
        if self.open == 0 {
            self.journal.clear();
        }
    }

    fn undo(&mut self, undo: Undo) {
        // Inverses of changes that were checked when made; they cannot fail on the state the
        // journal leads back through, so errors here would be a core bug.
        let result = match undo {
            Undo::Allocated(pod) => match self.allocations.remove(&pod) {
                Some(alloc) => {
                    if let Some(ni) = self.node_index(&alloc.node) {
                        self.remove_usage(ni, &alloc);
                    }
                    Ok(())
                }
                None => Err(Error::UnknownPod(pod)),
            },
            Undo::Released(alloc) => match self.node_index(&alloc.node) {
                Some(ni) => {
                    self.add_usage(ni, &alloc);
                    self.allocations.insert(alloc.pod.clone(), *alloc);
                    Ok(())
                }
                None => Err(Error::UnknownNode(alloc.node)),
            },
            Undo::Applied { node, inverse, reconfigs_before } => {
                let r = self.apply_at(node, inverse);
                self.reconfigs = reconfigs_before;
                r
            }
            Undo::NodeAdded(name) => match self.node_index(&name) {
                Some(i) => {
                    self.nodes.remove(i);
                    self.reindex();
                    Ok(())
                }
                None => Err(Error::UnknownNode(name)),
            },
            Undo::NodeRemoved(node) => {
                let pos = self.nodes.partition_point(|n| n.name < node.name);
                let mut node = *node;
                node.version = self.versions.next();
                self.nodes.insert(pos, Arc::new(node));
                self.reindex();
                Ok(())
            }
        };
        debug_assert!(result.is_ok(), "undo failed: {result:?}");
    }

    /// Sum over live allocations of what they hold, recomputed from scratch; equals the
    /// per-GPU counters whenever the snapshot is consistent.
    pub fn audit(&self) -> Result<(), Error> {
        let mut expect = self.clone();
        for n in &mut expect.nodes {
            let n = Arc::make_mut(n);
            n.used_cpu_milli = 0;
            n.used_memory_mib = 0;
            n.extended_used.clear();
            n.pods.clear();
            for g in &mut n.gpus {
                g.used_milli = 0;
                g.mig_busy = 0;
            }
        }
        for a in self.allocations.values() {
            let ni = expect.require_node(&a.node)?;
            expect.check_allocation(ni, a)?;
            expect.add_usage(ni, a);
        }
        for (n, e) in self.nodes.iter().zip(&expect.nodes) {
            if n != e {
                return Err(Error::Invalid(format!("node {} counters disagree with allocations", n.name)));
            }
            for g in &n.gpus {
                if let Some(l) = &g.mig {
                    MigLayout::from_instances(l.product(), l.instances()).map_err(|reason| Error::Mig {
                        node: n.name.clone(),
                        gpu: g.index,
                        reason,
                    })?;
                    if g.mode != GpuMode::Mig {
                        return Err(Error::Invalid(format!(
                            "node {} GPU {} has a layout outside MIG mode",
                            n.name, g.index
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
mod versions;

pub use versions::Versions;
