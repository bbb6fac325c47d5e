//! The scheduler's state kept up to date one node at a time: after a watch event only the
//! nodes it touches are rebuilt ([`crate::snapshot::build_node`], the full rebuild's own
//! per-node step) and patched into the snapshot and its side tables. A pod event costs its
//! node(s) ([`crate::snapshot::node_names_of`] of the old and the new object), a Node or
//! `GpuNode` event that node; nodes not rebuilt keep their versions, so per-node caches (the
//! decision memo) stay warm.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node as KubeNode, Pod};
use tessera_core::{Error, NodeName, PodKey, Snapshot};

use crate::gpunode::GpuNode;
use crate::signing::Keyring;
use crate::snapshot::{Built, MigUuids, NodePart, Refused, Uids, build_node, build_parts};

/// The objects [`Incremental::apply`] rebuilds a node from, by node name (the watch caches).
pub trait NodeObjects {
    /// The Node named `name`.
    fn node(&self, name: &str) -> Option<Arc<KubeNode>>;
    /// The `GpuNode` named `name`.
    fn gpunode(&self, name: &str) -> Option<Arc<GpuNode>>;
    /// At least every pod [`crate::snapshot::node_names_of`] names `name` for (others are
    /// ignored), in any order.
    fn pods(&self, name: &str) -> Vec<Arc<Pod>>;
}

/// A node's side tables, kept to undo them when the node is rebuilt.
#[derive(Clone, Debug, Default)]
struct Side {
    reconfigs: u64,
    uids: Vec<(String, PodKey)>,
    mig_uuids: Vec<(NodeName, u32, u8)>,
    warnings: Vec<String>,
    refused: Vec<Refused>,
}

/// A full rebuild's result ([`crate::snapshot::build_checked`]) that [`Incremental::apply`]
/// keeps equal to a full rebuild of the objects it is shown, one node at a time.
#[derive(Clone, Debug, Default)]
pub struct Incremental {
    snap: Snapshot,
    uids: Uids,
    mig_uuids: MigUuids,
    /// Per node name (listed or only named by pods).
    sides: BTreeMap<String, Side>,
    /// Warnings about objects no node owns (a Node listed twice).
    global_warnings: Vec<String>,
    reconfigs: u64,
}

impl Incremental {
    /// A full rebuild, kept per node: [`crate::snapshot::build_checked`]'s result.
    pub fn new(nodes: &[Arc<KubeNode>], gpunodes: &[Arc<GpuNode>], pods: &[Arc<Pod>], keys: Option<&Keyring>) -> Self {
        let (parts, global_warnings) = build_parts(nodes, gpunodes, pods, keys);
        let mut s = Self { global_warnings, ..Self::default() };
        let mut built_nodes = Vec::with_capacity(parts.len());
        let mut allocations = tessera_core::cluster::Allocations::new();
        for (name, part) in parts {
            if let Some((node, allocs)) = s.take_side(&name, part) {
                built_nodes.push(node);
                allocations.extend(allocs.into_iter().map(|a| (a.pod.clone(), a)));
            }
        }
        s.snap = Snapshot::from_parts(built_nodes, allocations, s.reconfigs);
        s
    }

    /// Files a node part's side tables; returns its node.
    fn take_side(&mut self, name: &str, part: NodePart) -> Option<(tessera_core::Node, Vec<tessera_core::Allocation>)> {
        let side = Side {
            reconfigs: part.reconfigs,
            uids: part.uids,
            mig_uuids: part.mig_uuids.iter().map(|(k, _)| k.clone()).collect(),
            warnings: part.warnings,
            refused: part.refused,
        };
        self.reconfigs += side.reconfigs;
        self.uids.extend(side.uids.iter().cloned());
        self.mig_uuids.extend(part.mig_uuids);
        if side.uids.is_empty() && side.warnings.is_empty() && side.refused.is_empty() && part.node.is_none() {
            self.sides.remove(name);
        } else {
            self.sides.insert(name.to_owned(), side);
        }
        part.node
    }

    /// Rebuilds the nodes named in `dirty` from `objects` and patches them in: the nodes a
    /// batch of watch events touched (a Node or `GpuNode` event: its name; a pod event:
    /// [`crate::snapshot::node_names_of`] of the old and the new pod). `keys` must be the
    /// keys the state was built with; when they change, build anew. On an error the state is
    /// inconsistent: build anew.
    pub fn apply<I, S>(&mut self, dirty: I, objects: &impl NodeObjects, keys: Option<&Keyring>) -> Result<(), Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let names: BTreeSet<String> = dirty.into_iter().map(|s| s.as_ref().to_owned()).collect();
        let mut parts = Vec::with_capacity(names.len());
        for name in &names {
            let (kn, gn) = (objects.node(name), objects.gpunode(name));
            let pods = objects.pods(name);
            let pods: Vec<&Pod> = pods.iter().map(|p| &**p).collect();
            parts.push((name, build_node(name, kn.as_deref(), gn.as_deref(), &pods, keys)));
        }
        // Every dirty node's old side tables go first: a pod that moved between two dirty
        // nodes keeps its uid.
        for name in &names {
            let Some(old) = self.sides.remove(name) else { continue };
            self.reconfigs -= old.reconfigs;
            for (uid, key) in &old.uids {
                if self.uids.get(uid) == Some(key) {
                    self.uids.remove(uid);
                }
            }
            for k in &old.mig_uuids {
                self.mig_uuids.remove(k);
            }
        }
        let mut retry = Vec::new();
        for (name, part) in parts {
            let node = self.take_side(name, part);
            let nn = NodeName(name.clone());
            match self.snap.replace_node(&nn, node.clone()) {
                // A pod that moved here from a dirty node replaced later.
                Err(Error::AlreadyAllocated(_)) => retry.push((nn, node)),
                r => r?,
            }
        }
        for (nn, node) in retry {
            self.snap.replace_node(&nn, node)?;
        }
        self.snap.set_reconfigs(self.reconfigs);
        Ok(())
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snap
    }

    /// Pod UIDs of bound pods, to their keys.
    pub fn uids(&self) -> &Uids {
        &self.uids
    }

    pub fn mig_uuids(&self) -> &MigUuids {
        &self.mig_uuids
    }

    /// Every refused assignment, by node name.
    pub fn refused(&self) -> impl Iterator<Item = &Refused> {
        self.sides.values().flat_map(|s| &s.refused)
    }

    pub fn warnings(&self) -> impl Iterator<Item = &String> {
        self.global_warnings.iter().chain(self.sides.values().flat_map(|s| &s.warnings))
    }

    /// A copy as a full rebuild returns it.
    pub fn to_built(&self) -> Built {
        Built {
            snap: self.snap.clone(),
            uids: self.uids.clone(),
            mig_uuids: self.mig_uuids.clone(),
            warnings: self.warnings().cloned().collect(),
            refused: self.refused().cloned().collect(),
        }
    }
}
