//! The nodes the search may add: copies of a captured node, or a node type described like a
//! scenario pool.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use tessera_core::testing::model_memory_mib;
use tessera_core::{Gpu, Node, NodeName, Snapshot};

use crate::scenario;

/// A kind of node to add, given on the command line.
#[derive(Debug, Clone)]
pub enum Template {
    /// Copies of a node of the capture: same GPUs, interconnect, cpu, memory and labels, all idle.
    Like(String),
    /// A node type described by product and size.
    Type(NodeType),
}

/// A node type, with the keys of a scenario pool.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeType {
    /// Prefix of the added nodes' names; default: the product in lower case.
    #[serde(default)]
    pub name: Option<String>,
    pub product: String,
    #[serde(default = "scenario::default_gpus")]
    pub gpus_per_node: u32,
    /// Memory of each GPU; default: the product's (MIG products and common models are known).
    #[serde(default)]
    pub gpu_memory_mib: Option<u64>,
    #[serde(default = "scenario::default_cpu")]
    pub cpu_milli: u64,
    #[serde(default = "scenario::default_mem")]
    pub memory_mib: u64,
    /// `nvswitch`, `pcie`, or `islands:4,4`.
    #[serde(default = "scenario::default_topology")]
    pub topology: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl NodeType {
    fn memory_per_gpu(&self) -> u64 {
        self.gpu_memory_mib.unwrap_or_else(|| model_memory_mib(&self.product))
    }

    /// `PRODUCT` or `PRODUCT:GPUS` (e.g. `H100-80GB:8`), or a YAML file with the keys above.
    pub fn parse(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        let t: NodeType = if path.is_file() {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {spec}"))?;
            serde_yaml::from_str(&text).with_context(|| format!("{spec}: not a node type"))?
        } else {
            let (product, gpus) = match spec.split_once(':') {
                Some((p, n)) => (
                    p,
                    n.parse::<u32>()
                        .with_context(|| format!("--add-node-type {spec:?}: GPU count {n:?} is not a number"))?,
                ),
                None => (spec, scenario::default_gpus()),
            };
            if product.is_empty() || spec.contains('/') || spec.ends_with(".yaml") || spec.ends_with(".yml") {
                bail!("--add-node-type {spec:?}: no such file, and not PRODUCT[:GPUS]");
            }
            NodeType {
                name: None,
                product: product.to_owned(),
                gpus_per_node: gpus,
                gpu_memory_mib: None,
                cpu_milli: scenario::default_cpu(),
                memory_mib: scenario::default_mem(),
                topology: scenario::default_topology(),
                labels: BTreeMap::new(),
            }
        };
        if t.gpus_per_node == 0 {
            bail!("--add-node-type {spec:?}: a node type needs at least one GPU");
        }
        scenario::parse_topology(&t.topology, t.gpus_per_node).with_context(|| format!("--add-node-type {spec:?}"))?;
        Ok(t)
    }
}

impl Template {
    /// In words, for the report.
    pub fn describe(&self) -> String {
        match self {
            Template::Like(n) => format!("like {n}"),
            Template::Type(t) => format!("{} x{}", t.product, t.gpus_per_node),
        }
    }

    /// Checks the template against the cluster; returns warnings.
    pub fn check(&self, snap: &Snapshot) -> Result<Vec<String>> {
        match self {
            Template::Like(n) => {
                if snap.node(&NodeName(n.clone())).is_none() {
                    bail!("--add-nodes-like {n}: the capture has no node {n}");
                }
                Ok(Vec::new())
            }
            Template::Type(t) => {
                let known = t.gpu_memory_mib.is_some()
                    || tessera_core::mig::MigProduct::from_name(&t.product).is_some()
                    || snap.nodes().iter().flat_map(|n| &n.gpus).any(|g| g.model == t.product);
                Ok(if known {
                    Vec::new()
                } else {
                    vec![format!(
                        "node type {}: not a MIG product nor a GPU model of the capture; each GPU is taken to \
                         have {} MiB (set gpu_memory_mib in a node type file to change it)",
                        t.product,
                        t.memory_per_gpu()
                    )]
                })
            }
        }
    }

    /// The `i`-th added node (from 1), idle.
    pub fn node(&self, snap: &Snapshot, i: u32) -> Result<Node> {
        match self {
            Template::Like(like) => {
                let Some(t) = snap.node(&NodeName(like.clone())) else {
                    bail!("the capture has no node {like}");
                };
                let name = format!("{like}-new-{i}");
                let gpus = t
                    .gpus
                    .iter()
                    .map(|g| {
                        // A MIG-mode GPU comes up with no instances: tessera creates the ones
                        // pods need.
                        let mut n = Gpu::new(g.index, &g.model, g.memory_mib, g.mode());
                        n.uuid = format!("GPU-{name}-{}", g.index);
                        n.numa = g.numa;
                        n
                    })
                    .collect();
                let mut n = Node::new(&name, t.cpu_milli, t.memory_mib, gpus);
                n.labels = t.labels.clone();
                if n.labels.contains_key("kubernetes.io/hostname") {
                    n.labels.insert("kubernetes.io/hostname".into(), name);
                }
                n.topology = t.topology.clone();
                Ok(n)
            }
            Template::Type(t) => {
                let prefix = t.name.clone().unwrap_or_else(|| t.product.to_lowercase());
                let name = format!("{prefix}-new-{i}");
                let mem = t.memory_per_gpu();
                let mut n = scenario::idle_node(
                    &name,
                    &t.product,
                    mem,
                    t.gpus_per_node,
                    t.cpu_milli,
                    t.memory_mib,
                    &t.topology,
                )?;
                n.labels = t.labels.clone();
                Ok(n)
            }
        }
    }
}

/// `base` with `count` template nodes added.
pub fn with_nodes(base: &Snapshot, template: &Template, count: u32) -> Result<Snapshot> {
    let mut snap = base.clone();
    for i in 1..=count {
        let n = template.node(base, i)?;
        if snap.node(&n.name).is_some() {
            bail!("an added node would be named {}, which the capture already uses", n.name);
        }
        snap.add_node(n)?;
    }
    Ok(snap)
}
