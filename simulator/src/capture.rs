//! Live-cluster captures for what-if: what `kubectl tessera capture` writes, `kubectl get … -o json`
//! (or `-o yaml`) Lists of Nodes, Pods, `GpuNode`s and `PodGroup`s (several files merge), or the
//! scheduler's `/api/v1/cluster` dump.
//!
//! API objects become a core [`Snapshot`] through [`tessera_api::snapshot::build`], the code the
//! scheduler rebuilds its own state with after a restart; the scheduler's dump is already that
//! state and is read back as it is.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{Node as KubeNode, Pod};
use serde::Deserialize;
use serde_json::Value;
use tessera_api::gpunode::GpuNode;
use tessera_api::pod as podparse;
use tessera_api::podgroup::{PodGroup, PodGroupSpec};
use tessera_api::views::ClusterView;
use tessera_api::{Assignment, annotations};
use tessera_core::mig::MigProduct;
use tessera_core::topology::Topology;
use tessera_core::{Demand, Gpu, MigOp, Node, NodeName, Snapshot};

/// Format marker of `kubectl tessera capture` documents, and the version read here.
pub const CAPTURE_KIND: &str = "TesseraCapture";
pub const CAPTURE_VERSION: u64 = 1;

/// A captured cluster, ready for placement.
#[derive(Debug, Default)]
pub struct Cluster {
    pub snap: Snapshot,
    /// MIG instance UUIDs by (node, GPU index, start), where the capture has them.
    pub mig_uuids: HashMap<(NodeName, u32, u8), String>,
    /// `PodGroup` specs by `namespace/name`.
    pub pod_groups: BTreeMap<String, PodGroupSpec>,
    /// Demands of the running pods that parse (the policy's expected workload).
    pub running: Vec<Demand>,
    /// Pods not yet bound that ask for GPUs, in name order.
    pub pending: Vec<Pod>,
    /// Things the capture holds that could not be used as they are.
    pub warnings: Vec<String>,
    /// `objects` (API objects) or `scheduler` (the `/api/v1/cluster` dump).
    pub kind: &'static str,
}

/// Every YAML or JSON document in a file (`---`-separated YAML, or one JSON value).
pub fn documents(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
        return Ok(vec![v]);
    }
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let v = Value::deserialize(doc)
            .with_context(|| format!("{}: document {} is not valid YAML", path.display(), i + 1))?;
        if !v.is_null() {
            out.push(v);
        }
    }
    if out.is_empty() {
        bail!("{}: empty", path.display());
    }
    Ok(out)
}

/// One object as read, with where it came from (for messages).
#[derive(Debug, Clone)]
pub struct Item {
    pub kind: Kind,
    pub value: Value,
    pub origin: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Node,
    Pod,
    GpuNode,
    PodGroup,
}

impl Kind {
    fn parse(kind: &str) -> Option<Self> {
        Some(match kind {
            "Node" => Kind::Node,
            "Pod" => Kind::Pod,
            "GpuNode" => Kind::GpuNode,
            "PodGroup" => Kind::PodGroup,
            _ => return None,
        })
    }
    fn name(self) -> &'static str {
        match self {
            Kind::Node => "Node",
            Kind::Pod => "Pod",
            Kind::GpuNode => "GpuNode",
            Kind::PodGroup => "PodGroup",
        }
    }
    fn api_version(self) -> &'static str {
        match self {
            Kind::Node | Kind::Pod => "v1",
            Kind::GpuNode => "tessera.dev/v1alpha1",
            Kind::PodGroup => "scheduling.x-k8s.io/v1alpha1",
        }
    }
}

/// Splits a document into objects: a `TesseraCapture`, a `List` (or `NodeList`, `PodList`, …),
/// a JSON array, or one object. `what` names where it came from.
pub fn items(doc: Value, what: &str, out: &mut Vec<Item>) -> Result<()> {
    match doc {
        Value::Array(list) => {
            for (i, v) in list.into_iter().enumerate() {
                items(v, &format!("{what}[{i}]"), out)?;
            }
            Ok(())
        }
        Value::Object(mut obj) => {
            let kind = obj.get("kind").and_then(Value::as_str).map(str::to_owned);
            match kind.as_deref() {
                Some(CAPTURE_KIND) => {
                    let version = obj.get("version").and_then(Value::as_u64);
                    if version != Some(CAPTURE_VERSION) {
                        bail!(
                            "{what}: {CAPTURE_KIND} version {}; this tessera-sim reads version {CAPTURE_VERSION}",
                            version.map_or("(none)".to_owned(), |v| v.to_string())
                        );
                    }
                    if !obj.contains_key("nodes") {
                        bail!("{what}: {CAPTURE_KIND} without nodes");
                    }
                    for (key, kind) in [
                        ("nodes", Kind::Node),
                        ("pods", Kind::Pod),
                        ("gpuNodes", Kind::GpuNode),
                        ("podGroups", Kind::PodGroup),
                    ] {
                        match obj.remove(key) {
                            None | Some(Value::Null) => {}
                            Some(Value::Array(list)) => {
                                for (i, v) in list.into_iter().enumerate() {
                                    out.push(Item { kind, value: v, origin: format!("{what}: {key}[{i}]") });
                                }
                            }
                            Some(_) => bail!("{what}: {key} is not a list"),
                        }
                    }
                    Ok(())
                }
                Some(k) if k.ends_with("List") => {
                    // `kubectl get a,b -o json` gives `List` with items of mixed kinds; the API's own
                    // lists (`PodList`) may leave the items' kind out.
                    let default = Kind::parse(&k[..k.len() - 4]);
                    let Some(Value::Array(list)) = obj.remove("items") else {
                        bail!("{what}: {k} without items");
                    };
                    for (i, mut v) in list.into_iter().enumerate() {
                        let origin = format!("{what}: items[{i}]");
                        let kind = match v.get("kind").and_then(Value::as_str) {
                            Some(k) => kind_of(k, &origin)?,
                            None => default.ok_or_else(|| anyhow!("{origin}: object without kind"))?,
                        };
                        if let Some(o) = v.as_object_mut() {
                            o.entry("kind").or_insert_with(|| kind.name().into());
                        }
                        out.push(Item { kind, value: v, origin });
                    }
                    Ok(())
                }
                Some(k) => {
                    let kind = kind_of(k, what)?;
                    out.push(Item { kind, value: Value::Object(obj), origin: what.to_owned() });
                    Ok(())
                }
                None => bail!("{what}: object without kind"),
            }
        }
        other => bail!("{what}: expected an object or a list, found {}", json_type(&other)),
    }
}

fn kind_of(kind: &str, origin: &str) -> Result<Kind> {
    Kind::parse(kind).ok_or_else(|| {
        anyhow!("{origin}: kind {kind} is not used by what-if; expected Node, Pod, GpuNode or PodGroup objects")
    })
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Deserialises one object of a known kind; `apiVersion`/`kind` are filled in when left out,
/// and an API group other than the one tessera reads is refused.
pub fn typed<T: serde::de::DeserializeOwned>(item: &Item) -> Result<T> {
    let mut v = item.value.clone();
    let Some(obj) = v.as_object_mut() else {
        bail!("{}: {} is not an object", item.origin, item.kind.name());
    };
    let want = item.kind.api_version();
    match obj.get("apiVersion").and_then(Value::as_str) {
        None => {
            obj.insert("apiVersion".into(), want.into());
        }
        Some(have) if have == want => {}
        Some(have) if item.kind == Kind::PodGroup && have.starts_with("scheduling.x-k8s.io/") => {
            obj.insert("apiVersion".into(), want.into());
        }
        Some(have) => bail!("{}: {} of apiVersion {have}; tessera reads {want}", item.origin, item.kind.name()),
    }
    obj.insert("kind".into(), item.kind.name().into());
    if item.kind == Kind::GpuNode {
        obj.entry("spec").or_insert_with(|| serde_json::json!({}));
    }
    serde_json::from_value(v).with_context(|| format!("{}: not a valid {}", item.origin, item.kind.name()))
}

fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, item: &Item) -> Result<String> {
    let name =
        meta.name.clone().ok_or_else(|| anyhow!("{}: {} without metadata.name", item.origin, item.kind.name()))?;
    Ok(match (item.kind, &meta.namespace) {
        (Kind::Pod | Kind::PodGroup, ns) => format!("{}/{name}", ns.as_deref().unwrap_or("default")),
        _ => name,
    })
}

/// Inserts `v` under `key`, refusing a second object of the same kind and name.
fn insert<T>(map: &mut BTreeMap<String, (T, String)>, key: String, v: T, item: &Item) -> Result<()> {
    if let Some((_, first)) = map.get(&key) {
        bail!("{} {key} appears twice: {first} and {}", item.kind.name(), item.origin);
    }
    map.insert(key, (v, item.origin.clone()));
    Ok(())
}

/// Reads every capture file into one cluster.
pub fn load(paths: &[impl AsRef<Path>]) -> Result<Cluster> {
    let mut objects = Vec::new();
    let mut view = None;
    for path in paths {
        let path = path.as_ref();
        for (i, doc) in documents(path)?.into_iter().enumerate() {
            let what =
                if i == 0 { path.display().to_string() } else { format!("{} (document {})", path.display(), i + 1) };
            if is_scheduler_view(&doc) {
                if view.is_some() {
                    bail!("{what}: only one scheduler dump (/api/v1/cluster) can be read at a time");
                }
                view = Some((doc, what));
            } else {
                items(doc, &what, &mut objects)?;
            }
        }
    }
    match view {
        Some((_, what)) if !objects.is_empty() => bail!(
            "{what}: a scheduler dump (/api/v1/cluster) is the whole cluster; it cannot be combined with {}",
            objects[0].origin
        ),
        Some((doc, what)) => from_view(doc, &what),
        None => from_objects(&objects),
    }
}

/// The scheduler's `/api/v1/cluster` answer has no `kind`, but `nodes` and `allocations`.
fn is_scheduler_view(doc: &Value) -> bool {
    doc.get("kind").is_none() && doc.get("nodes").is_some_and(Value::is_array) && doc.get("allocations").is_some()
}

/// A cluster from API objects.
pub fn from_objects(objects: &[Item]) -> Result<Cluster> {
    let mut nodes: BTreeMap<String, (KubeNode, String)> = BTreeMap::new();
    let mut pods: BTreeMap<String, (Pod, String)> = BTreeMap::new();
    let mut gpunodes: BTreeMap<String, (GpuNode, String)> = BTreeMap::new();
    let mut groups: BTreeMap<String, (PodGroup, String)> = BTreeMap::new();
    for item in objects {
        match item.kind {
            Kind::Node => {
                let n: KubeNode = typed(item)?;
                insert(&mut nodes, name_of(&n.metadata, item)?, n, item)?;
            }
            Kind::Pod => {
                let p: Pod = typed(item)?;
                insert(&mut pods, name_of(&p.metadata, item)?, p, item)?;
            }
            Kind::GpuNode => {
                let g: GpuNode = typed(item)?;
                insert(&mut gpunodes, name_of(&g.metadata, item)?, g, item)?;
            }
            Kind::PodGroup => {
                let g: PodGroup = typed(item)?;
                insert(&mut groups, name_of(&g.metadata, item)?, g, item)?;
            }
        }
    }
    if nodes.is_empty() {
        bail!("the capture holds no Nodes");
    }
    let mut warnings = Vec::new();
    for (name, (_, origin)) in &gpunodes {
        if !nodes.contains_key(name) {
            warnings.push(format!("{origin}: GpuNode {name} has no Node of that name; ignored"));
        }
    }
    let mut pending = Vec::new();
    for (key, (pod, origin)) in &pods {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            continue;
        }
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) else {
            if podparse::wants_gpu(pod) {
                pending.push(pod.clone());
            }
            continue;
        };
        if !nodes.contains_key(node) {
            bail!("{origin}: pod {key} is bound to node {node}, which the capture does not hold");
        }
        if let Some(text) = pod.metadata.annotations.as_ref().and_then(|a| a.get(annotations::ASSIGNMENT)) {
            let a = Assignment::from_annotation(text)
                .with_context(|| format!("{origin}: pod {key}: annotation {} is not valid", annotations::ASSIGNMENT))?;
            if a.node != node {
                bail!(
                    "{origin}: pod {key} is bound to node {node} but its {} names node {}",
                    annotations::ASSIGNMENT,
                    a.node
                );
            }
        }
    }
    let node_list: Vec<&KubeNode> = nodes.values().map(|(n, _)| n).collect();
    let gpunode_list: Vec<&GpuNode> = gpunodes.values().map(|(g, _)| g).collect();
    let pod_list: Vec<&Pod> = pods.values().map(|(p, _)| p).collect();
    let built = tessera_api::snapshot::build(&node_list, &gpunode_list, &pod_list);
    warnings.extend(built.warnings);
    let pod_groups: BTreeMap<String, PodGroupSpec> = groups.into_iter().map(|(k, (g, _))| (k, g.spec)).collect();
    let group_of = |pod: &Pod| {
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        podparse::pod_group_name(pod).and_then(|g| pod_groups.get(&format!("{ns}/{g}")))
    };
    let running = pod_list
        .iter()
        .filter(|p| podparse::pod_key(p).is_ok_and(|k| built.snap.allocation(&k).is_some()))
        .filter_map(|p| podparse::demand(p, group_of(p)).ok())
        .collect();
    Ok(Cluster {
        snap: built.snap,
        mig_uuids: built.mig_uuids.into_iter().collect(),
        pod_groups,
        running,
        pending,
        warnings,
        kind: "objects",
    })
}

/// A cluster from the scheduler's own dump: its nodes, MIG layouts and allocations (bound,
/// assumed and reserved alike hold their devices).
///
/// The dump carries no interconnect, so GPUs are unconnected here: multi-GPU pods fit where
/// they would, but which GPUs of a node they get ignores NVLink.
fn from_view(doc: Value, what: &str) -> Result<Cluster> {
    let view: ClusterView =
        serde_json::from_value(doc).with_context(|| format!("{what}: not a valid scheduler dump (/api/v1/cluster)"))?;
    if view.nodes.is_empty() {
        bail!("{what}: the dump holds no nodes");
    }
    let mut snap = Snapshot::default();
    let mut mig_uuids = HashMap::new();
    for nv in &view.nodes {
        let at = |msg: String| anyhow!("{what}: node {}: {msg}", nv.name);
        let mut gpus = Vec::new();
        let mut ops = Vec::new();
        for gv in &nv.gpus {
            let mut g = Gpu::new(gv.index, &gv.model, gv.memory_mib, gv.mode);
            g.uuid = gv.uuid.clone();
            g.numa = gv.numa;
            g.healthy = gv.healthy;
            for m in &gv.mig {
                let p = MigProduct::from_name(&gv.model)
                    .and_then(|p| p.geometry().profile_by_name(&m.profile))
                    .ok_or_else(|| at(format!("GPU {} ({}): no MIG profile {}", gv.index, gv.model, m.profile)))?;
                ops.push(MigOp::Create { gpu: gv.index, class: p.class, start: m.start });
                if let Some(u) = &m.uuid {
                    mig_uuids.insert((NodeName(nv.name.clone()), gv.index, m.start), u.clone());
                }
            }
            gpus.push(g);
        }
        let n_gpus = gpus.iter().map(|g| g.index + 1).max().unwrap_or(0);
        let mut node = Node::new(&nv.name, nv.cpu_milli, nv.memory_mib, gpus);
        node.labels = nv.labels.clone();
        node.schedulable = nv.schedulable;
        node.topology = Arc::new(Topology::unconnected(n_gpus));
        let name = node.name.clone();
        snap.add_node(node).map_err(|e| at(e.to_string()))?;
        for op in ops {
            snap.apply(&name, op).map_err(|e| at(e.to_string()))?;
        }
    }
    for a in view.allocations {
        let a = a.allocation;
        let pod = a.pod.clone();
        if snap.node(&a.node).is_none() {
            bail!("{what}: pod {pod} is allocated on node {}, which the dump does not hold", a.node);
        }
        snap.allocate(a).with_context(|| format!("{what}: pod {pod}"))?;
    }
    Ok(Cluster { snap, mig_uuids, kind: "scheduler", ..Default::default() })
}
