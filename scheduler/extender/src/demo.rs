//! `--demo`: an in-memory cluster and a synthetic multimodal model mix, placed with the same
//! core entry points the live path uses; binds are recorded in memory. No Kubernetes needed.
//!
//! Node names match the extender fixtures (`gpu-node-a`..`c`), so the fixture bodies can be
//! POSTed as they are.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use serde_json::json;
use tessera_api::podgroup::{POD_GROUP_LABEL, PodGroupSpec};
use tessera_core::mig::MigProduct;
use tessera_core::policy::Workload;
use tessera_core::topology::Topology;
use tessera_core::{Context, Demand, Gpu, GpuDemand, GpuMode, MigOp, Node, Policy, Snapshot, place};

use crate::binder::MemoryBinder;
use crate::state::{MemoryLookup, Scheduler, Settings};
use crate::wire::ExtenderArgs;

const GIB: u64 = 1024;

/// One demo node: model, GPU count, which GPUs start in MIG mode with which instances.
struct Spec {
    name: &'static str,
    model: &'static str,
    gpus: u32,
    mode: GpuMode,
    topology: fn(u32) -> Topology,
    pool: &'static str,
    mig: &'static [(u32, &'static [&'static str])],
}

const NODES: &[Spec] = &[
    Spec {
        name: "gpu-node-a",
        model: "H100-80GB",
        gpus: 8,
        mode: GpuMode::Full,
        topology: Topology::nvswitch,
        pool: "h100",
        mig: &[(0, &["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"]), (1, &["1g.10gb"; 7])],
    },
    Spec {
        name: "gpu-node-b",
        model: "H100-80GB",
        gpus: 8,
        mode: GpuMode::Full,
        topology: Topology::nvswitch,
        pool: "h100",
        mig: &[(0, &["4g.40gb", "3g.40gb"]), (1, &["2g.20gb", "2g.20gb", "2g.20gb"])],
    },
    Spec {
        name: "gpu-node-c",
        model: "L4",
        gpus: 4,
        mode: GpuMode::Shared,
        topology: |n| Topology::pcie(n, 2, 2),
        pool: "l4",
        mig: &[],
    },
    Spec {
        name: "gpu-node-d",
        model: "A100-80GB",
        gpus: 8,
        mode: GpuMode::Full,
        topology: |_| Topology::islands(&[4, 4], 12),
        pool: "a100",
        mig: &[(4, &["3g.40gb", "3g.40gb"])],
    },
    Spec {
        name: "gpu-node-e",
        model: "A100-80GB",
        gpus: 8,
        mode: GpuMode::Full,
        topology: |_| Topology::islands(&[4, 4], 12),
        pool: "a100",
        mig: &[],
    },
];

fn memory_of(model: &str) -> u64 {
    MigProduct::from_name(model).map_or(24 * GIB, |p| p.geometry().memory_mib)
}

/// The demo cluster, MIG layouts included, nothing allocated.
pub fn cluster() -> Snapshot {
    let mut snap = Snapshot::default();
    for s in NODES {
        let gpus = (0..s.gpus)
            .map(|i| {
                let mig = s.mig.iter().any(|(g, _)| *g == i);
                let mut g = Gpu::new(i, s.model, memory_of(s.model), if mig { GpuMode::Mig } else { s.mode });
                g.uuid = format!("GPU-{}-{i}", s.name);
                g.numa = Some(i * 2 / s.gpus);
                g
            })
            .collect();
        let mut n = Node::new(s.name, 192_000, 2048 * GIB, gpus);
        n.topology = Arc::new((s.topology)(s.gpus));
        n.labels.insert("tessera.dev/pool".into(), s.pool.into());
        n.pool = Some(s.pool.into());
        let name = n.name.clone();
        if snap.add_node(n).is_err() {
            continue;
        }
        let geom = MigProduct::from_name(s.model).map(|p| p.geometry());
        for (gpu, profiles) in s.mig {
            for profile in *profiles {
                let Some(p) = geom.and_then(|g| g.profile_by_name(profile)) else { continue };
                // The lowest legal start, as the node agent would pick.
                let start = snap
                    .node(&name)
                    .and_then(|n| n.gpu(*gpu))
                    .and_then(|g| g.mig_layout())
                    .and_then(|l| l.placements(p.class).first().copied());
                if let Some(start) = start {
                    let _ = snap.apply(&name, MigOp::Create { gpu: *gpu, class: p.class, start });
                }
            }
        }
    }
    snap
}

/// The synthetic model mix: a few VLMs on whole GPUs, many small models on slices and shares.
pub fn model_mix() -> Vec<Demand> {
    let model = |name: &str, gib: u64, compute: Option<u8>| {
        Demand::new(
            format!("models/{name}").as_str(),
            GpuDemand::Model { memory_mib: gib * GIB, compute_slices: compute },
        )
        .with_cpu(4000, 16 * GIB)
    };
    vec![
        // The two larger VLMs are pinned to the A100 pool, so the story the demo tells (an A100
        // gang that cannot fit whole) does not depend on how a policy spreads them.
        Demand::new("models/qwen2-vl-72b-0", GpuDemand::Whole { count: 4 })
            .with_cpu(32_000, 256 * GIB)
            .with_models(&["A100-80GB"]),
        Demand::new("models/llava-next-34b-0", GpuDemand::Whole { count: 2 })
            .with_cpu(16_000, 128 * GIB)
            .with_models(&["A100-80GB"]),
        Demand::new("models/internvl2-26b-0", GpuDemand::Whole { count: 1 }).with_cpu(8000, 64 * GIB),
        model("minilm-embed-0", 2, None),
        model("minilm-embed-1", 2, None),
        model("bge-m3-embed-0", 6, None),
        model("trocr-ocr-0", 8, None),
        model("paddle-ocr-0", 5, None),
        model("whisper-large-asr-0", 12, Some(2)),
        model("whisper-large-asr-1", 12, Some(2)),
        model("llama-guard-0", 18, None),
        model("prompt-guard-0", 3, None),
        Demand::new("models/bge-reranker-0", GpuDemand::Mig { profile: "2g.20gb".into() }).with_cpu(2000, 8 * GIB),
        Demand::new("models/clip-vit-0", GpuDemand::Share { milli: 250 }).with_cpu(2000, 8 * GIB),
        Demand::new("models/clip-vit-1", GpuDemand::Share { milli: 250 }).with_cpu(2000, 8 * GIB),
        Demand::new("models/smollm2-chat-0", GpuDemand::Share { milli: 500 }).with_cpu(2000, 8 * GIB),
    ]
}

/// A scheduler over the demo cluster with the model mix placed by `policy`.
pub fn scheduler(policy: Box<dyn Policy>, seed: u64) -> (Arc<Scheduler>, Arc<MemoryBinder>) {
    let mut snap = cluster();
    let mix = model_mix();
    let workload = Workload::from_demands_top(mix.iter(), 0.95);
    let mut placed = Vec::new();
    for d in &mix {
        let ctx = Context { workload: &workload, seed };
        match place(&snap, d, policy.as_ref(), &ctx) {
            Ok(p) => {
                if p.apply(&mut snap, d, None).is_ok() {
                    placed.push(d.pod.clone());
                }
            }
            Err(r) => tracing::warn!(pod = %d.pod, reason = %r, "Demo model not placed"),
        }
    }
    let lookup = Arc::new(MemoryLookup::default());
    // The fixtures' gang: a PodGroup of one, so `filter-args.json` schedules as it is.
    lookup.add_group("ml", "train-job-7", PodGroupSpec { min_member: 1, ..Default::default() });
    let binder = Arc::new(MemoryBinder::default());
    let settings = Settings { mode: "demo", seed, preemption: false, ..Default::default() };
    let sched = Arc::new(Scheduler::new(snap, policy, binder.clone(), lookup.clone(), settings));
    sched.set_workload(workload);
    for (i, pod) in placed.into_iter().enumerate() {
        sched.remember_uid(&format!("demo-uid-{i:04}"), pod);
    }
    waiting(&sched, &lookup);
    (sched, binder)
}

/// One pending demo pod: namespace, name, pod-group label, limits, annotations.
type PendingSpec = (
    &'static str,
    &'static str,
    Option<&'static str>,
    &'static [(&'static str, &'static str)],
    &'static [(&'static str, &'static str)],
);

/// Pods that wait, so `explain` and the dashboard have real answers to show: a VLM too large
/// for any node, a gang whose third member does not fit, a gang holding its reservation until
/// both members bind, and a pod with a malformed annotation.
const PENDING: &[PendingSpec] = &[
    (
        "vision",
        "qwen2-vl-72b-tp8-0",
        None,
        &[("tessera.dev/gpu", "1")],
        &[("tessera.dev/gpus", "8"), ("tessera.dev/gpu-models", "H100-80GB")],
    ),
    (
        "training",
        "vlm-finetune-0",
        None,
        &[("nvidia.com/gpu", "4")],
        &[
            ("tessera.dev/gang-name", "vlm-finetune"),
            ("tessera.dev/gang-size", "3"),
            ("tessera.dev/gpu-models", "A100-80GB"),
        ],
    ),
    (
        "training",
        "vlm-finetune-1",
        None,
        &[("nvidia.com/gpu", "4")],
        &[
            ("tessera.dev/gang-name", "vlm-finetune"),
            ("tessera.dev/gang-size", "3"),
            ("tessera.dev/gpu-models", "A100-80GB"),
        ],
    ),
    (
        "training",
        "vlm-finetune-2",
        None,
        &[("nvidia.com/gpu", "4")],
        &[
            ("tessera.dev/gang-name", "vlm-finetune"),
            ("tessera.dev/gang-size", "3"),
            ("tessera.dev/gpu-models", "A100-80GB"),
        ],
    ),
    ("ocr", "ocr-detect-0", Some("ocr-pipeline"), &[("nvidia.com/mig-1g.10gb", "1")], &[]),
    (
        "ocr",
        "ocr-recognize-0",
        Some("ocr-pipeline"),
        &[("tessera.dev/gpu", "1")],
        &[("tessera.dev/gpu-memory", "16Gi")],
    ),
    ("models", "bge-reranker-1", None, &[("tessera.dev/gpu", "1")], &[("tessera.dev/gpu-memory", "lots")]),
];

fn pending_pod(i: usize, (ns, name, group, limits, annotations): &PendingSpec) -> Option<Pod> {
    let map =
        |kv: &[(&str, &str)]| kv.iter().map(|(k, v)| ((*k).to_owned(), json!(v))).collect::<serde_json::Map<_, _>>();
    let labels = group.map_or_else(serde_json::Map::new, |g| map(&[(POD_GROUP_LABEL, g)]));
    serde_json::from_value(json!({
        "metadata": {
            "name": name, "namespace": ns, "uid": format!("demo-pending-{i:04}"),
            "labels": labels, "annotations": map(annotations),
        },
        "spec": {
            "schedulerName": "tessera",
            "containers": [{"name": "model", "resources": {
                "limits": map(limits), "requests": {"cpu": "2", "memory": "8Gi"},
            }}],
        },
        "status": {"phase": "Pending"},
    }))
    .ok()
}

/// Files the pending pods with the lookup and filters each on every node, as kube-scheduler
/// would; then once more, so the first gang members see their gang's outcome.
fn waiting(sched: &Scheduler, lookup: &MemoryLookup) {
    let day = 24 * 60 * 60;
    lookup.add_group(
        "ocr",
        "ocr-pipeline",
        PodGroupSpec { min_member: 2, schedule_timeout_seconds: Some(day), ..Default::default() },
    );
    let nodes: Vec<String> = NODES.iter().map(|s| s.name.to_owned()).collect();
    let pods: Vec<Pod> = PENDING.iter().enumerate().filter_map(|(i, s)| pending_pod(i, s)).collect();
    if let Ok(mut known) = lookup.pods.write() {
        for (p, (ns, name, ..)) in pods.iter().zip(PENDING) {
            known.insert(((*ns).to_owned(), (*name).to_owned()), p.clone());
        }
    }
    for _ in 0..2 {
        for p in &pods {
            let args = ExtenderArgs { pod: Some(Box::new(p.clone())), nodes: None, node_names: Some(nodes.clone()) };
            let _ = sched.filter(args);
        }
    }
}
