use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use tessera_core::mig::ProfileClass;
use tessera_core::{Grant, PodKey, policy};

use super::*;
use crate::capture;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/whatif").join(name)
}

fn capture_json() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("capture.json")).unwrap()).unwrap()
}

/// Writes `text` to a temporary file named `name`.
fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn cluster() -> Cluster {
    capture::load(&[fixture("capture.json")]).unwrap()
}

fn whatif(cluster: &Cluster, pods: &[&str], add: Option<(&Template, u32)>) -> Report {
    let paths: Vec<PathBuf> = pods.iter().map(|p| fixture(p)).collect();
    let units = load_pods(&paths, cluster, 1, false).unwrap();
    let policy = policy::by_name("tessera").unwrap();
    run(cluster, &units, policy.as_ref(), 0, add).unwrap()
}

fn outcome<'a>(r: &'a Report, pod: &str) -> &'a Outcome {
    r.outcomes.iter().find(|o| o.pod == pod).unwrap_or_else(|| panic!("no outcome for {pod}: {r:#?}"))
}

#[test]
fn a_kubectl_tessera_capture_rebuilds_nodes_mig_layouts_and_running_pods() {
    let c = cluster();
    assert_eq!(c.kind, "objects");
    let names: Vec<&str> = c.snap.nodes().iter().map(|n| n.name.0.as_str()).collect();
    assert_eq!(names, ["cpu-1", "gpu-a", "gpu-b"]);
    let a = c.snap.node(&NodeName("gpu-a".into())).unwrap();
    let starts: Vec<u8> = a.gpus[0].mig_layout().unwrap().instances().iter().map(|i| i.start).collect();
    assert_eq!(starts, [0, 4, 5]);
    assert!(c.snap.node(&NodeName("gpu-b".into())).unwrap().topology.has_nvlink());
    let grants = |pod: &str| c.snap.allocation(&PodKey(pod.into())).map(|a| a.grants.clone());
    assert_eq!(grants("ml/embed-0"), Some(vec![Grant::Mig { gpu: 0, class: ProfileClass::G3, start: 0 }]));
    assert_eq!(grants("ml/llm-0"), Some(vec![Grant::Whole { gpu: 1 }]));
    // No assignment annotation (NVIDIA's device plugin): counted on the lowest free GPU.
    assert_eq!(grants("ml/legacy-0"), Some(vec![Grant::Whole { gpu: 0 }]));
    assert_eq!(grants("web/frontend-0"), Some(vec![]));
    assert_eq!(grants("ml/finished-0"), None, "a Succeeded pod holds nothing");
    assert_eq!(c.pending.len(), 1);
    assert_eq!(c.mig_uuids.get(&(NodeName("gpu-a".into()), 0, 5)).map(String::as_str), Some("MIG-a0-5"));
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn the_sparsest_capture_kubectl_tessera_writes_loads() {
    // What `kubectl tessera capture` writes when kubectl lists objects without kind or
    // apiVersion, a GpuNode has no spec yet, and the PodGroup CRD is not installed.
    let doc = json!({
        "kind": "TesseraCapture", "version": 1, "context": null,
        "nodes": [{"metadata": {"name": "gpu-a"}}],
        "pods": [{"metadata": {"name": "p", "namespace": "default"},
                  "spec": {"schedulerName": "tessera", "containers": [{"name": "c", "env": [{"name": "API_KEY", "value": "(removed)"}]}]}}],
        "gpuNodes": [{"metadata": {"name": "gpu-a"}, "status": {"gpus": []}}],
        "podGroups": [],
        "notes": ["podgroups.scheduling.x-k8s.io: not served by this cluster (CRD not installed); captured as empty"]
    });
    let dir = tempfile::tempdir().unwrap();
    let c = capture::load(&[file(&dir, "capture.json", &doc.to_string())]).unwrap();
    assert_eq!((c.snap.nodes().len(), c.snap.allocations().len(), c.pending.len()), (1, 0, 0));
    assert!(c.snap.nodes()[0].gpus.is_empty());
}

#[test]
fn a_small_model_takes_the_free_mig_instance_and_the_gang_lands_on_the_free_a100s() {
    let r = whatif(&cluster(), &["extra.yaml"], None);
    assert!(r.fits, "{r:#?}");
    let asr = outcome(&r, "ml/asr-1");
    assert_eq!(asr.node.as_deref(), Some("gpu-a"));
    assert_eq!(
        asr.devices,
        [AssignedDevice {
            gpu: "GPU-a0".into(),
            index: 0,
            profile: Some("1g.10gb".into()),
            start: Some(5),
            mig: Some("MIG-a0-5".into()),
            share: None,
        }]
    );
    assert!(asr.mig_changes.is_empty(), "an existing free instance needs no reconfiguration: {asr:?}");
    let mut gpus = Vec::new();
    for pod in ["ml/train-0", "ml/train-1"] {
        let o = outcome(&r, pod);
        assert_eq!((o.node.as_deref(), o.gang.as_deref()), (Some("gpu-b"), Some("ml/train")), "{o:?}");
        gpus.extend(o.devices.iter().map(|d| d.index));
    }
    gpus.sort();
    assert_eq!(gpus, [1, 2], "GPU 0 of gpu-b is held by ml/legacy-0");
}

#[test]
fn an_oversized_gang_is_rejected_with_the_member_and_the_bottleneck_named() {
    let r = whatif(&cluster(), &["big-gang.yaml"], None);
    assert!(!r.fits);
    assert_eq!(r.placed, 0);
    for pod in ["ml/finetune-0", "ml/finetune-1"] {
        let o = outcome(&r, pod);
        let why = o.reason.as_deref().unwrap_or_default();
        assert!(!o.fits && o.node.is_none(), "{o:?}");
        assert!(why.contains("gang ml/finetune") && why.contains("gpu-b: needs 4 whole GPUs, 3 free"), "{why}");
    }
    let text = render(&r);
    assert!(text.contains("gang ml/finetune: 2 members, none placed: member ml/finetune-0"), "{text}");
    assert!(text.contains("0 of 2 pods fit."), "{text}");
}

#[test]
fn two_more_nodes_like_gpu_b_are_the_fewest_that_fit_the_gang() {
    let c = cluster();
    let like = Template::Like("gpu-b".into());
    let r = whatif(&c, &["big-gang.yaml"], Some((&like, 8)));
    let added = r.added.as_ref().unwrap();
    assert_eq!(added.nodes, Some(2));
    assert_eq!(added.placed_by_count, [0, 0, 2]);
    assert!(r.fits);
    let mut nodes: Vec<&str> = r.outcomes.iter().filter_map(|o| o.node.as_deref()).collect();
    nodes.sort();
    assert_eq!(nodes, ["gpu-b-new-1", "gpu-b-new-2"]);
    // The copies are idle and keep the template's NVLink mesh.
    let snap = with_nodes(&c.snap, &like, 1).unwrap();
    let n = snap.node(&NodeName("gpu-b-new-1".into())).unwrap();
    assert!(n.gpus.iter().all(Gpu::is_unused) && n.topology.has_nvlink() && n.gpus.len() == 4);
    assert_eq!(n.labels.get("kubernetes.io/hostname").map(String::as_str), Some("gpu-b-new-1"));

    let r = whatif(&c, &["big-gang.yaml"], Some((&like, 1)));
    assert_eq!(r.added.as_ref().unwrap().nodes, None);
    assert_eq!(r.added.as_ref().unwrap().placed_by_count, [0, 0]);
    assert!(!r.fits);
    assert!(render(&r).contains("does not fit even with 1 added nodes like gpu-b"));
}

#[test]
fn one_eight_gpu_h100_node_fits_the_gang_and_a_node_type_file_reads_like_a_pool() {
    let t = Template::Type(NodeType::parse("H100-80GB:8").unwrap());
    let r = whatif(&cluster(), &["big-gang.yaml"], Some((&t, 4)));
    assert_eq!(r.added.as_ref().unwrap().nodes, Some(1));
    assert!(r.outcomes.iter().all(|o| o.node.as_deref() == Some("h100-80gb-new-1")), "{r:#?}");

    let dir = tempfile::tempdir().unwrap();
    let p = file(&dir, "l4.yaml", "name: l4\nproduct: L4\ngpus_per_node: 2\ntopology: pcie\nlabels: {pool: l4}\n");
    let t = NodeType::parse(p.to_str().unwrap()).unwrap();
    assert_eq!((t.product.as_str(), t.gpus_per_node, t.topology.as_str()), ("L4", 2, "pcie"));
    let bad = file(&dir, "bad.yaml", "product: L4\ngpus: 2\n");
    let e = NodeType::parse(bad.to_str().unwrap()).unwrap_err();
    assert!(format!("{e:#}").contains("unknown field `gpus`"), "{e:#}");
    assert!(NodeType::parse("H100-80GB:eight").is_err());
    assert!(NodeType::parse("H100-80GB:0").is_err());
    assert!(NodeType::parse("missing/type.yaml").is_err());
}

#[test]
fn kubectl_get_lists_in_several_files_and_formats_load_like_the_capture() {
    let cap = capture_json();
    let mut objects: Vec<Value> = Vec::new();
    for key in ["nodes", "pods"] {
        objects.extend(cap[key].as_array().unwrap().iter().cloned());
    }
    let dir = tempfile::tempdir().unwrap();
    // `kubectl get nodes,pods -A -o json`: one List of mixed kinds.
    let a = file(&dir, "a.json", &json!({"apiVersion": "v1", "kind": "List", "items": objects}).to_string());
    // `kubectl get gpunodes -o yaml`: the API's own list kind, items without kind.
    let mut gpunodes = cap["gpuNodes"].clone();
    for g in gpunodes.as_array_mut().unwrap() {
        g.as_object_mut().unwrap().remove("kind");
    }
    let b = file(
        &dir,
        "b.yaml",
        &serde_yaml::to_string(
            &json!({"apiVersion": "tessera.dev/v1alpha1", "kind": "GpuNodeList", "items": gpunodes}),
        )
        .unwrap(),
    );
    let from_lists = capture::load(&[a, b]).unwrap();
    let from_capture = cluster();
    assert_eq!(from_lists.snap.allocations(), from_capture.snap.allocations());
    assert_eq!(from_lists.mig_uuids, from_capture.mig_uuids);
    assert_eq!(from_lists.pending.len(), 1);
}

#[test]
fn the_scheduler_dump_loads_with_its_mig_layouts_and_allocations() {
    let c = capture::load(&[fixture("demo-cluster-view.json")]).unwrap();
    assert_eq!(c.kind, "scheduler");
    assert_eq!(c.snap.nodes().len(), 5);
    assert_eq!(c.snap.nodes().iter().map(|n| n.gpus.len()).sum::<usize>(), 36);
    assert_eq!(c.snap.allocations().len(), 18);
    c.snap.audit().unwrap();
    let r = whatif(&c, &["extra.yaml"], None);
    assert!(r.fits, "{r:#?}");
    // The dump's first free 1g.10gb instance: GPU 0 of gpu-node-a, slice 6.
    let asr = outcome(&r, "ml/asr-1");
    assert_eq!(asr.node.as_deref(), Some("gpu-node-a"));
    assert_eq!((asr.devices[0].index, asr.devices[0].start), (0, Some(6)));
}

#[test]
fn replicas_and_pending_pods_are_placed_in_order() {
    let c = cluster();
    let units = load_pods(&[fixture("extra.yaml")], &c, 3, true).unwrap();
    let names: Vec<String> = units
        .iter()
        .flat_map(|u| match u {
            Unit::Pod(d) => vec![d.pod.0.clone()],
            Unit::Gang { members, .. } => members.iter().map(|d| d.pod.0.clone()).collect(),
        })
        .collect();
    assert_eq!(names, ["ml/rerank-0", "ml/asr-1-1", "ml/asr-1-2", "ml/asr-1-3", "ml/train-0", "ml/train-1"]);
    let policy = policy::by_name("tessera").unwrap();
    let r = run(&c, &units, policy.as_ref(), 0, None).unwrap();
    assert!(r.fits, "{}", render(&r));
    // The pending pod takes the free instance; the next small pod needs a new one (no UUID yet).
    let first = outcome(&r, "ml/rerank-0");
    assert_eq!((first.devices[0].start, first.devices[0].mig.as_deref()), (Some(5), Some("MIG-a0-5")));
    let second = outcome(&r, "ml/asr-1-1");
    assert_eq!((second.node.as_deref(), second.devices[0].start), (Some("gpu-a"), Some(6)));
    assert_eq!(
        (second.devices[0].mig.as_deref(), second.mig_changes.as_slice()),
        (None, ["create 1g.10gb@6 on GPU0".to_owned()].as_slice())
    );
    // gpu-a's MIG GPU is then full (a 1g.10gb cannot start at slice 7): an idle GPU is partitioned.
    let third = outcome(&r, "ml/asr-1-2");
    assert!(third.mig_changes.iter().any(|c| c.ends_with("to MIG mode")), "{third:?}");
}

fn load_err(files: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<PathBuf> = files.iter().map(|(n, t)| file(&dir, n, t)).collect();
    format!("{:#}", capture::load(&paths).unwrap_err())
}

#[test]
fn bad_captures_are_refused_with_the_file_and_the_object_named() {
    let cap = capture_json();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = cap.clone();
        f(&mut v);
        v.to_string()
    };
    let cases: Vec<(String, &str)> = vec![
        ("{\"kind\": \"List\", \"items\": [".into(), "not valid JSON"),
        ("kind: List\nitems: [\n".into(), "not valid YAML"),
        (
            r#"{"kind":"List","items":[{"apiVersion":"v1","kind":"Service","metadata":{"name":"s"}}]}"#.into(),
            "kind Service is not used",
        ),
        (with(&|v| v["version"] = json!(2)), "TesseraCapture version 2"),
        (
            with(&|v| v["pods"][0]["spec"]["nodeName"] = json!("gpu-z")),
            "pod ml/embed-0 is bound to node gpu-z, which the capture does not hold",
        ),
        (
            with(&|v| v["pods"][0]["metadata"]["annotations"]["tessera.dev/assignment"] = json!("{not json")),
            "pod ml/embed-0: annotation tessera.dev/assignment is not valid",
        ),
        (
            with(&|v| {
                v["pods"][0]["metadata"]["annotations"]["tessera.dev/assignment"] =
                    json!(r#"{"node":"gpu-b","devices":[]}"#)
            }),
            "bound to node gpu-a but its tessera.dev/assignment names node gpu-b",
        ),
        (
            with(&|v| {
                let first = v["nodes"][1].clone();
                v["nodes"].as_array_mut().unwrap().push(first);
            }),
            "Node gpu-b appears twice",
        ),
        (with(&|v| v["nodes"] = json!([])), "holds no Nodes"),
        (with(&|v| v["gpuNodes"][0]["apiVersion"] = json!("tessera.dev/v2")), "GpuNode of apiVersion tessera.dev/v2"),
        (with(&|v| v["gpuNodes"][0]["status"]["gpus"][0]["mode"] = json!("half")), "not a valid GpuNode"),
        ("[1, 2]".into(), "expected an object or a list, found a number"),
    ];
    for (text, want) in cases {
        let e = load_err(&[("cap.json", &text)]);
        assert!(e.contains(want), "want {want:?} in: {e}");
        assert!(e.contains("cap.json") || want == "holds no Nodes", "the file is named: {e}");
    }
    let view = std::fs::read_to_string(fixture("demo-cluster-view.json")).unwrap();
    let e = load_err(&[("view.json", &view), ("cap.json", &cap.to_string())]);
    assert!(e.contains("cannot be combined"), "{e}");
    let e = load_err(&[("view.json", &view.replace("\"mode\": \"mig\"", "\"mode\": \"sliced\""))]);
    assert!(e.contains("mode \"sliced\""), "{e}");
}

fn pods_err(text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = file(&dir, "pods.yaml", text);
    format!("{:#}", load_pods(&[p], &cluster(), 1, false).unwrap_err())
}

const POD: &str = "apiVersion: v1
kind: Pod
metadata:
  name: p
  namespace: ml
  annotations: ANN
spec:
  containers:
    - name: main
      resources:
        limits: {tessera.dev/gpu: \"1\"}
";

#[test]
fn bad_pods_are_refused_with_the_pod_and_the_annotation_named() {
    let pod = |ann: &str| POD.replace("ANN", ann);
    let cases = [
        (pod(r#"{tessera.dev/gpus: "2", tessera.dev/gpu-memory: 8Gi}"#), "contradict each other"),
        (pod(r#"{tessera.dev/gpu-memory: lots}"#), "annotation tessera.dev/gpu-memory=\"lots\""),
        (pod(r#"{tessera.dev/gang-name: x, tessera.dev/gang-size: "3"}"#), "gang ml/x needs 3 members but 1 are given"),
        (
            pod("{}").replace("  annotations: {}", "  labels: {scheduling.x-k8s.io/pod-group: nope}"),
            "PodGroup ml/nope not found",
        ),
        (pod("{}").replace("name: p", "name: embed-0"), "already in the capture, on node gpu-a"),
        (format!("{}---\n{}", pod("{}"), pod("{}")), "pod ml/p appears twice"),
        (
            format!(
                "{}---\n{}",
                pod(r#"{tessera.dev/gang-name: g, tessera.dev/gang-size: "2"}"#),
                pod(r#"{tessera.dev/gang-name: g, tessera.dev/gang-size: "3"}"#).replace("name: p", "name: q")
            ),
            "pod ml/q declares gang ml/g with 3 members and a 60000 ms timeout; pod ml/p declares 2 members",
        ),
        ("apiVersion: v1\nkind: Node\nmetadata: {name: n}\n".into(), "cluster objects go in --capture"),
        ("kind: Pod\nmetadata: {name: [\n".into(), "not valid YAML"),
        ("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n".into(), "kind Deployment is not used"),
    ];
    for (text, want) in cases {
        let e = pods_err(&text);
        assert!(e.contains(want), "want {want:?} in: {e}");
    }
}

#[test]
fn unknown_template_nodes_and_zero_replicas_are_errors() {
    let c = cluster();
    let e = Template::Like("gpu-z".into()).check(&c.snap).unwrap_err().to_string();
    assert!(e.contains("no node gpu-z"), "{e}");
    let w = Template::Type(NodeType::parse("H100-80G").unwrap()).check(&c.snap).unwrap();
    assert!(w[0].contains("not a MIG product"), "{w:?}");
    let mut quiet = NodeType::parse("H100-80G").unwrap();
    quiet.gpu_memory_mib = Some(81920);
    assert!(Template::Type(quiet).check(&c.snap).unwrap().is_empty());
    assert!(load_pods(&[fixture("extra.yaml")], &c, 0, false).is_err());
}

/// The scheduler's golden `/api/v1/cluster` answer (written by the extender's own test) reads as
/// a dump: every node, GPU, MIG instance UUID and allocation it shows.
#[test]
fn the_scheduler_golden_answer_loads_with_everything_it_shows() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scheduler/api/fixtures/views/cluster.json");
    let view: tessera_api::views::ClusterView = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let c = capture::load(&[&path]).unwrap();
    assert_eq!(c.kind, "scheduler");
    assert_eq!(c.snap.nodes().len(), view.nodes.len());
    let gpus = |n: &tessera_api::views::NodeView| n.gpus.len();
    assert_eq!(c.snap.nodes().iter().map(|n| n.gpus.len()).sum::<usize>(), view.nodes.iter().map(gpus).sum::<usize>());
    assert_eq!(c.snap.allocations().len(), view.allocations.len());
    for a in &view.allocations {
        assert_eq!(c.snap.allocation(&a.allocation.pod), Some(&a.allocation));
    }
    let uuids = view.nodes.iter().flat_map(|n| &n.gpus).flat_map(|g| &g.mig).filter(|m| m.uuid.is_some()).count();
    assert_eq!(c.mig_uuids.len(), uuids);
    for n in &view.nodes {
        let node = c.snap.node(&NodeName(n.name.clone())).unwrap();
        for g in &n.gpus {
            let instances = node.gpu(g.index).and_then(|x| x.mig_layout()).map_or(0, |l| l.instances().len());
            assert_eq!(instances, g.mig.len(), "{} GPU {}", n.name, g.index);
        }
    }
    c.snap.audit().unwrap();
}
