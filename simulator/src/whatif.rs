//! What-if on a captured cluster: can these extra pods (and gangs) fit, where, and how many nodes
//! of a given type must be added so that they all do.
//!
//! Pods are read with the scheduler's own parser ([`tessera_api::pod::demand`]) and placed in file
//! order with the core entry points the extender uses: [`tessera_core::place`] for a pod,
//! [`tessera_core::gang::plan_gang`] for a gang (all members at once, at its first member's place
//! in the order). Each decision sees the ones before it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};
use tessera_api::AssignedDevice;
use tessera_api::pod as podparse;
use tessera_api::podgroup::PodGroupSpec;
use tessera_core::gang::plan_gang;
use tessera_core::policy::{Context, Policy, Workload, place};
use tessera_core::testing::model_memory_mib;
use tessera_core::{Demand, Gpu, GpuMode, Grant, MigOp, Node, NodeName, Placement, Rejection, Snapshot};

use crate::capture::{self, Cluster, Item, Kind};
use crate::scenario;

/// What to place: one pod, or a whole gang.
#[derive(Debug, Clone)]
pub enum Unit {
    Pod(Demand),
    Gang { name: String, members: Vec<Demand> },
}

/// Reads the extra pods: Pod manifests (multi-document YAML, a List, or JSON) and the
/// `PodGroup`s their gangs name. `pending` first adds the capture's own pending GPU pods.
/// Pods of the files outside gangs are placed `replicas` times (`NAME-1` … `NAME-N`).
pub fn load_pods(paths: &[impl AsRef<Path>], cluster: &Cluster, replicas: u32, pending: bool) -> Result<Vec<Unit>> {
    if replicas == 0 {
        bail!("--replicas must be at least 1");
    }
    // (pod, where it comes from, whether it is copied `replicas` times)
    let mut pods: Vec<(Pod, String, bool)> = Vec::new();
    if pending {
        pods.extend(cluster.pending.iter().map(|p| (p.clone(), "capture (pending pod)".to_owned(), false)));
    }
    let mut groups: BTreeMap<String, PodGroupSpec> = BTreeMap::new();
    let mut generated: HashMap<String, u32> = HashMap::new();
    for path in paths {
        let path = path.as_ref();
        let mut items: Vec<Item> = Vec::new();
        for (i, doc) in capture::documents(path)?.into_iter().enumerate() {
            let what =
                if i == 0 { path.display().to_string() } else { format!("{} (document {})", path.display(), i + 1) };
            capture::items(doc, &what, &mut items)?;
        }
        for item in &items {
            match item.kind {
                Kind::Pod => {
                    let mut pod: Pod = capture::typed(item)?;
                    if pod.metadata.name.is_none()
                        && let Some(prefix) = pod.metadata.generate_name.clone()
                    {
                        let n = generated.entry(prefix.clone()).or_default();
                        *n += 1;
                        pod.metadata.name = Some(format!("{prefix}{n}"));
                    }
                    pods.push((pod, item.origin.clone(), true));
                }
                Kind::PodGroup => {
                    let g: tessera_api::PodGroup = capture::typed(item)?;
                    let ns = g.metadata.namespace.as_deref().unwrap_or("default");
                    let Some(name) = g.metadata.name.as_deref() else {
                        bail!("{}: PodGroup without metadata.name", item.origin);
                    };
                    groups.insert(format!("{ns}/{name}"), g.spec);
                }
                Kind::Node | Kind::GpuNode => {
                    bail!("{}: a {:?} among the pods to place; cluster objects go in --capture", item.origin, item.kind)
                }
            }
        }
    }
    if pods.is_empty() {
        bail!("no pods to place");
    }
    let mut units: Vec<Unit> = Vec::new();
    let mut gang_at: HashMap<String, usize> = HashMap::new();
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for (pod, origin, copied) in pods {
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        let group = podparse::pod_group_name(&pod).map(|g| format!("{ns}/{g}"));
        let spec = group.as_ref().and_then(|g| groups.get(g).or_else(|| cluster.pod_groups.get(g)));
        let key = podparse::pod_key(&pod).with_context(|| format!("{origin}: pod"))?;
        let d = podparse::demand(&pod, spec).with_context(|| format!("{origin}: pod {key}"))?;
        let copies: Vec<Demand> = if copied && d.gang.is_none() && replicas > 1 {
            (1..=replicas)
                .map(|r| {
                    let mut c = d.clone();
                    c.pod = tessera_core::PodKey(format!("{}-{r}", d.pod));
                    c
                })
                .collect()
        } else {
            vec![d]
        };
        for d in copies {
            if let Some(first) = seen.insert(d.pod.0.clone(), origin.clone()) {
                bail!("pod {} appears twice: {first} and {origin}", d.pod);
            }
            if let Some(a) = cluster.snap.allocation(&d.pod) {
                bail!(
                    "{origin}: pod {} is already in the capture, on node {}; give the new pod another name",
                    d.pod,
                    a.node
                );
            }
            match d.gang.clone() {
                None => units.push(Unit::Pod(d)),
                Some(g) => match gang_at.get(&g.name) {
                    Some(&i) => {
                        if let Unit::Gang { members, .. } = &mut units[i] {
                            if let Some(first) = members[0].gang.as_ref().filter(|f| **f != g) {
                                bail!(
                                    "{origin}: pod {} declares gang {} with {} members and a {} ms timeout; \
                                     pod {} declares {} members and {} ms",
                                    d.pod,
                                    g.name,
                                    g.min_member,
                                    g.timeout_ms,
                                    members[0].pod,
                                    first.min_member,
                                    first.timeout_ms
                                );
                            }
                            members.push(d);
                        }
                    }
                    None => {
                        gang_at.insert(g.name.clone(), units.len());
                        units.push(Unit::Gang { name: g.name.clone(), members: vec![d] });
                    }
                },
            }
        }
    }
    for u in &units {
        if let Unit::Gang { name, members } = u {
            let min = members[0].gang.as_ref().map_or(1, |g| g.min_member) as usize;
            if members.len() < min {
                bail!("gang {name} needs {min} members but {} are given", members.len());
            }
        }
    }
    Ok(units)
}

/// Where one pod goes, or why it cannot.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub pod: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gang: Option<String>,
    /// What the pod asks for, in words.
    pub demand: String,
    pub fits: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The devices, as the scheduler's `tessera.dev/assignment` annotation would name them (a MIG
    /// instance still to be created has no `mig` UUID).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<AssignedDevice>,
    /// MIG changes the node must make first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mig_changes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The scheduler would report the pod as never fitting this cluster as it is built
    /// (`FailedAndUnresolvableNodes`), not just as full now.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unresolvable: bool,
}

impl Outcome {
    fn placed(
        d: &Demand,
        p: &Placement,
        snap: &Snapshot,
        mig_uuids: &HashMap<(NodeName, u32, u8), String>,
        created: &HashSet<(NodeName, u32, u8)>,
    ) -> Self {
        let node = snap.node(&p.node);
        let gpu = |i: u32| node.and_then(|n| n.gpu(i));
        let profile = |i: u32, class| gpu(i).and_then(Gpu::mig_product).and_then(|m| m.geometry().profile(class));
        let devices = p
            .grants
            .iter()
            .map(|g| {
                let mut dev = AssignedDevice {
                    gpu: gpu(g.gpu()).map(|x| x.uuid.clone()).unwrap_or_default(),
                    index: g.gpu(),
                    profile: None,
                    start: None,
                    mig: None,
                    share: None,
                };
                match *g {
                    Grant::Whole { .. } => {}
                    Grant::Share { milli, .. } => dev.share = Some(milli),
                    Grant::Mig { gpu, class, start } => {
                        dev.profile = profile(gpu, class).map(|x| x.name.to_owned());
                        dev.start = Some(start);
                        let at = (p.node.clone(), gpu, start);
                        if !created.contains(&at) {
                            dev.mig = mig_uuids.get(&at).cloned();
                        }
                    }
                }
                dev
            })
            .collect();
        let mig_changes = p
            .ops
            .iter()
            .map(|o| match *o {
                MigOp::SetMode { gpu, mode } => {
                    format!("GPU{gpu} to {} mode", if mode == GpuMode::Mig { "MIG" } else { "full" })
                }
                MigOp::Create { gpu, class, start } => {
                    format!("create {}@{start} on GPU{gpu}", profile(gpu, class).map_or("?", |x| x.name))
                }
                MigOp::Destroy { gpu, class, start } => {
                    format!("destroy {}@{start} on GPU{gpu}", profile(gpu, class).map_or("?", |x| x.name))
                }
            })
            .collect();
        Self {
            pod: d.pod.0.clone(),
            gang: d.gang.as_ref().map(|g| g.name.clone()),
            demand: d.gpu.to_string(),
            fits: true,
            node: Some(p.node.0.clone()),
            devices,
            mig_changes,
            reason: None,
            unresolvable: false,
        }
    }

    fn rejected(d: &Demand, r: &Rejection) -> Self {
        Self {
            pod: d.pod.0.clone(),
            gang: d.gang.as_ref().map(|g| g.name.clone()),
            demand: d.gpu.to_string(),
            fits: false,
            node: None,
            devices: Vec::new(),
            mig_changes: Vec::new(),
            reason: Some(r.reason().to_owned()),
            unresolvable: r.is_unresolvable(),
        }
    }
}

fn note_created(p: &Placement, created: &mut HashSet<(NodeName, u32, u8)>) {
    for op in &p.ops {
        if let MigOp::Create { gpu, start, .. } = *op {
            created.insert((p.node.clone(), gpu, start));
        }
    }
}

/// Places every unit in order on a copy of `base`; returns one outcome per pod (gang members in
/// the order given).
pub fn place_all(
    base: &Snapshot,
    mig_uuids: &HashMap<(NodeName, u32, u8), String>,
    units: &[Unit],
    policy: &dyn Policy,
    ctx: &Context<'_>,
) -> Result<Vec<Outcome>> {
    let mut snap = base.clone();
    let mut out = Vec::new();
    // MIG instances made during this run: their UUIDs are not the capture's.
    let mut created = HashSet::new();
    for u in units {
        match u {
            Unit::Pod(d) => match place(&snap, d, policy, ctx) {
                Ok(p) => {
                    note_created(&p, &mut created);
                    out.push(Outcome::placed(d, &p, &snap, mig_uuids, &created));
                    p.apply(&mut snap, d, None).with_context(|| format!("recording pod {}", d.pod))?;
                }
                Err(r) => out.push(Outcome::rejected(d, &r)),
            },
            Unit::Gang { members, .. } => match plan_gang(&mut snap, members, policy, ctx, 0) {
                Ok(plan) => {
                    for (_, p) in &plan.members {
                        note_created(p, &mut created);
                    }
                    let mut by_pod: BTreeMap<_, _> = plan.members.into_iter().collect();
                    for d in members {
                        let Some(p) = by_pod.remove(&d.pod) else {
                            bail!("gang plan left out pod {}", d.pod);
                        };
                        out.push(Outcome::placed(d, &p, &snap, mig_uuids, &created));
                    }
                }
                Err(r) => out.extend(members.iter().map(|d| Outcome::rejected(d, &r))),
            },
        }
    }
    Ok(out)
}

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
                let gpus = (0..t.gpus_per_node)
                    .map(|g| {
                        let mut gpu = Gpu::new(g, &t.product, mem, GpuMode::Full);
                        gpu.uuid = format!("GPU-{name}-{g}");
                        gpu
                    })
                    .collect();
                let mut n = Node::new(&name, t.cpu_milli, t.memory_mib, gpus);
                n.labels = t.labels.clone();
                n.topology = Arc::new(scenario::parse_topology(&t.topology, t.gpus_per_node)?);
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

/// The node-addition search's answer.
#[derive(Debug, Clone, Serialize)]
pub struct Added {
    /// The template, in words.
    pub template: String,
    pub max: u32,
    /// Smallest number of added nodes with which every pod fits; `None`: not even `max`.
    pub nodes: Option<u32>,
    /// Pods placed with 0, 1, … added nodes, as far as the search went.
    pub placed_by_count: Vec<usize>,
}

/// Finds the smallest number of template nodes (0..=`max`) with which every unit fits, and the
/// outcomes at that count (or at `max` when none is enough).
///
/// Linear, from 0: the answer is the first count at which the scheduler's own sequence of
/// decisions places everything. Greedy placement makes "fits with k more nodes" monotone only
/// in practice (an extra node can change an early choice and, rarely, strand a later pod), so a
/// binary search would assume what the linear one checks; each trial is one pass over the pods.
pub fn search(
    cluster: &Cluster,
    units: &[Unit],
    template: &Template,
    max: u32,
    policy: &dyn Policy,
    ctx: &Context<'_>,
) -> Result<(Added, Vec<Outcome>)> {
    let mut placed_by_count = Vec::new();
    let mut last = Vec::new();
    for k in 0..=max {
        let snap = with_nodes(&cluster.snap, template, k)?;
        let outcomes = place_all(&snap, &cluster.mig_uuids, units, policy, ctx)?;
        let placed = outcomes.iter().filter(|o| o.fits).count();
        placed_by_count.push(placed);
        if placed == outcomes.len() {
            return Ok((Added { template: template.describe(), max, nodes: Some(k), placed_by_count }, outcomes));
        }
        last = outcomes;
    }
    Ok((Added { template: template.describe(), max, nodes: None, placed_by_count }, last))
}

/// The capture in numbers.
#[derive(Debug, Clone, Serialize)]
pub struct CaptureSummary {
    /// `objects` (Nodes, Pods, GpuNodes) or `scheduler` (the `/api/v1/cluster` dump).
    pub source: &'static str,
    pub nodes: usize,
    pub gpus: usize,
    /// Pods holding resources (bound, or reserved by the scheduler).
    pub pods: usize,
    pub warnings: Vec<String>,
}

impl CaptureSummary {
    pub fn of(cluster: &Cluster) -> Self {
        Self {
            source: cluster.kind,
            nodes: cluster.snap.nodes().len(),
            gpus: cluster.snap.nodes().iter().map(|n| n.gpus.len()).sum(),
            pods: cluster.snap.allocations().len(),
            warnings: cluster.warnings.clone(),
        }
    }
}

/// Everything `tessera-sim whatif` answers (also its `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub policy: String,
    pub seed: u64,
    pub capture: CaptureSummary,
    /// Pods asked about, and how many fit.
    pub pods: usize,
    pub placed: usize,
    /// Every pod fits (with the added nodes, when a search ran).
    pub fits: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub added: Option<Added>,
    pub outcomes: Vec<Outcome>,
}

/// The what-if: places `units` on the captured cluster, and with `add = Some((template, max))`
/// searches for the fewest added nodes.
pub fn run(
    cluster: &Cluster,
    units: &[Unit],
    policy: &dyn Policy,
    seed: u64,
    add: Option<(&Template, u32)>,
) -> Result<Report> {
    let extra: Vec<&Demand> = units
        .iter()
        .flat_map(|u| match u {
            Unit::Pod(d) => std::slice::from_ref(d),
            Unit::Gang { members, .. } => members.as_slice(),
        })
        .collect();
    // The expected workload, as the extender keeps it: popular shapes among the demands it has
    // seen (here: the running pods and the ones asked about).
    let workload = Workload::from_demands_top(cluster.running.iter().chain(extra.iter().copied()), 0.95);
    let ctx = Context { workload: &workload, seed };
    let mut summary = CaptureSummary::of(cluster);
    let (added, outcomes) = match add {
        Some((t, max)) => {
            summary.warnings.extend(t.check(&cluster.snap)?);
            let (a, o) = search(cluster, units, t, max, policy, &ctx)?;
            (Some(a), o)
        }
        None => (None, place_all(&cluster.snap, &cluster.mig_uuids, units, policy, &ctx)?),
    };
    let placed = outcomes.iter().filter(|o| o.fits).count();
    Ok(Report {
        policy: policy.name().to_owned(),
        seed,
        capture: summary,
        pods: outcomes.len(),
        placed,
        fits: placed == outcomes.len(),
        added,
        outcomes,
    })
}

fn devices_text(o: &Outcome) -> String {
    let mut parts: Vec<String> = o
        .devices
        .iter()
        .map(|d| match (&d.profile, d.start, d.share) {
            (Some(p), Some(s), _) => format!("GPU{} {p}@{s}", d.index),
            (_, _, Some(m)) => format!("GPU{} share {m}m", d.index),
            _ => format!("GPU{}", d.index),
        })
        .collect();
    if parts.is_empty() {
        parts.push("no GPU".into());
    }
    let mut s = parts.join(", ");
    if !o.mig_changes.is_empty() {
        let _ = write!(s, "  (MIG: {})", o.mig_changes.join(", "));
    }
    s
}

/// The report as text.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    let c = &r.capture;
    let _ = writeln!(
        s,
        "capture: {} nodes, {} GPUs, {} pods holding resources{}",
        c.nodes,
        c.gpus,
        c.pods,
        if c.source == "scheduler" { " (scheduler dump)" } else { "" }
    );
    let _ = writeln!(s, "policy {}, seed {}", r.policy, r.seed);
    if let Some(a) = &r.added {
        let tried: Vec<String> =
            a.placed_by_count.iter().enumerate().map(|(k, n)| format!("+{k}: {n}/{}", r.pods)).collect();
        let _ = writeln!(s, "pods placed by added nodes ({}): {}", a.template, tried.join(", "));
        match a.nodes {
            Some(0) => {
                let _ = writeln!(s, "everything fits without adding nodes");
            }
            Some(k) => {
                let _ = writeln!(s, "smallest addition: {k} node{} {}", if k == 1 { "" } else { "s" }, a.template);
            }
            None => {
                let _ = writeln!(s, "does not fit even with {} added nodes {} (--max-add)", a.max, a.template);
            }
        }
    }
    s.push('\n');
    let w_pod = r.outcomes.iter().map(|o| o.pod.len() + 2).max().unwrap_or(3).max(5);
    let w_node = r.outcomes.iter().filter_map(|o| o.node.as_ref()).map(String::len).max().unwrap_or(4).max(4);
    let _ = writeln!(s, "{:<w_pod$} {:<w_node$} DEVICES", "POD", "NODE");
    let mut gangs_done: BTreeSet<&str> = BTreeSet::new();
    for o in &r.outcomes {
        let indent = match &o.gang {
            Some(g) => {
                if gangs_done.insert(g) {
                    let members: Vec<&Outcome> =
                        r.outcomes.iter().filter(|x| x.gang.as_deref() == Some(g.as_str())).collect();
                    let _ = if members.iter().all(|m| m.fits) {
                        writeln!(s, "gang {g}: {} members, all placed", members.len())
                    } else {
                        // The core's reason starts with the gang's name, already printed.
                        let why = members[0].reason.as_deref().unwrap_or("no reason given");
                        let why = why.strip_prefix(&format!("gang {g}: ")).unwrap_or(why);
                        writeln!(s, "gang {g}: {} members, none placed: {why}", members.len())
                    };
                }
                "  "
            }
            None => "",
        };
        let pod = format!("{indent}{}", o.pod);
        match (&o.node, &o.reason) {
            (Some(n), _) => {
                let _ = writeln!(s, "{pod:<w_pod$} {n:<w_node$} {}", devices_text(o));
            }
            (None, _) if o.gang.is_some() => {
                let _ = writeln!(s, "{pod:<w_pod$} {:<w_node$} -", "-");
            }
            (None, reason) => {
                let _ = writeln!(
                    s,
                    "{pod:<w_pod$} {:<w_node$} does not fit: {}",
                    "-",
                    reason.as_deref().unwrap_or("no reason given")
                );
            }
        }
    }
    let _ = writeln!(s, "\n{} of {} pods fit.", r.placed, r.pods);
    s
}

#[cfg(test)]
mod tests;
