//! Every file in manifests/examples/, applied as written, one test each. A new example file is a
//! failing test until it has an expectation here.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use anyhow::{Result, bail, ensure};
use tessera_api::Assignment;
use tessera_e2e::{Cluster, NodeSpec, Options, repo_root};

use crate::{Ctx, TestFn};

const WAIT: Duration = Duration::from_secs(90);

pub fn register(tests: &mut Vec<(String, TestFn)>) {
    let dir = repo_root().join("manifests/examples");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    for file in files {
        let name = format!("example_{}", file.trim_end_matches(".yaml").replace('-', "_"));
        tests.push((name, Box::new(move |ctx| Box::pin(example(ctx, file.clone())))));
    }
}

/// Every whole GPU and MIG slice handed out at most once.
pub fn no_device_twice<'a>(assignments: impl IntoIterator<Item = &'a Assignment>) -> Result<()> {
    let mut seen = BTreeSet::new();
    for a in assignments {
        for d in &a.devices {
            let key = match (&d.mig, &d.profile, d.start) {
                (Some(uuid), _, _) => format!("{}/{uuid}", a.node),
                (None, Some(p), Some(s)) => format!("{}/gpu{}/{p}@{s}", a.node, d.index),
                _ => format!("{}/gpu{}", a.node, d.index),
            };
            ensure!(seen.insert(key.clone()), "device {key} was assigned twice: {}", a.to_annotation());
        }
    }
    Ok(())
}

/// No pod event carries an API error dump (a 409 from a GpuNode update, a Rust debug print).
pub async fn no_api_error_events(c: &Cluster, ns: &str) -> Result<()> {
    for (obj, reason, msg) in c.all_events(ns).await? {
        let dump = msg.contains("ApiError") || msg.contains("Status {") || msg.contains("409");
        ensure!(!dump, "event on {obj} ({reason}) carries an API error dump: {msg}");
    }
    Ok(())
}

async fn example(ctx: Ctx, file: String) -> Result<()> {
    let path = repo_root().join("manifests/examples").join(&file);
    let h100 = |name: &str, gpus: &str| NodeSpec::new(name, gpus);
    let (nodes, cm) = match file.as_str() {
        "small-models-mig.yaml" => (vec![h100("gpu-node-a", "h100x2:mig")], true),
        "vlm-34b-whole-gpu.yaml" => (vec![h100("gpu-node-a", "a30x2:mig"), h100("gpu-node-b", "h100x2")], true),
        "llm-70b-tp4.yaml" => (vec![h100("gpu-node-a", "h100x2"), h100("gpu-node-b", "h100x8")], false),
        "gang-podgroup.yaml" => (
            vec![
                h100("gpu-node-a", "h100x4").resource("nvidia.com/gpu", "4"),
                h100("gpu-node-b", "h100x4").resource("nvidia.com/gpu", "4"),
            ],
            true,
        ),
        // Defect 1: only gpu-node-a advertises the members' NVIDIA MIG resource.
        "gang-annotations.yaml" => (
            vec![
                h100("gpu-node-a", "h100x2:mig").resource("nvidia.com/mig-3g.40gb", "4"),
                h100("gpu-node-b", "h100x2:mig"),
                h100("gpu-node-c", "h100x2:mig"),
            ],
            true,
        ),
        "plain-nvidia-mig.yaml" => (
            vec![
                h100("gpu-node-a", "h100x2:mig"),
                h100("gpu-node-b", "h100x2:mig").resource("nvidia.com/mig-1g.10gb", "7"),
            ],
            false,
        ),
        "runtime.yaml" | "runtime-hpa.yaml" | "runtime-keda.yaml" => (vec![h100("gpu-node-a", "h100x2:mig")], true),
        other => bail!("manifests/examples/{other} has no expectation in e2e/tests/cluster/examples.rs: add one"),
    };
    let c =
        Cluster::start(&ctx.bins, &ctx.dir, Options { nodes, controller_manager: cm, ..Options::default() }).await?;
    let apply = |p: &Path| {
        let (c, p) = (&c, p.to_owned());
        async move {
            for a in c.apply_file(&p).await? {
                ensure!(a.warnings.is_empty(), "{} {} applied with warnings: {:?}", a.kind, a.name, a.warnings);
            }
            Ok(())
        }
    };
    if file.starts_with("runtime") {
        apply(&Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/examples-prerequisites.yaml")).await?;
        if file != "runtime.yaml" {
            apply(&repo_root().join("manifests/examples/runtime.yaml")).await?;
        }
    }
    apply(&path).await?;

    match file.as_str() {
        "small-models-mig.yaml" => {
            let emb = c.wait_all_bound("default", "app=embeddings-minilm", 3, WAIT).await?;
            let ocr = c.wait_all_bound("default", "app=ocr", 2, WAIT).await?;
            for (p, _, a) in &emb {
                let prof = a.devices.first().and_then(|d| d.profile.clone()).unwrap_or_default();
                ensure!(
                    a.devices.len() == 1 && prof.starts_with("1g."),
                    "{:?}: 4Gi wants a 1g slice: {a:?}",
                    p.metadata.name
                );
            }
            for (p, _, a) in &ocr {
                let prof = a.devices.first().and_then(|d| d.profile.clone()).unwrap_or_default();
                // From the geometry table, not the profile's name.
                let compute = tessera_core::mig::profile_named(&prof).map_or(0, |p| p.compute_slices);
                ensure!(compute >= 2, "{:?}: gpu-compute 2 wants 2 compute slices: {a:?}", p.metadata.name);
            }
            let all: Vec<&Assignment> = emb.iter().chain(&ocr).map(|(_, _, a)| a).collect();
            no_device_twice(all.iter().copied())?;
            // Every slice exists in the node's GpuNode status (the agent created it).
            let status = c.gpunodes().get("gpu-node-a").await?.status.unwrap_or_default();
            let uuids: BTreeSet<&str> =
                status.gpus.iter().flat_map(|g| g.instances.iter().map(|i| i.uuid.as_str())).collect();
            for a in &all {
                for d in &a.devices {
                    let u = d.mig.as_deref().unwrap_or("");
                    ensure!(uuids.contains(u), "slice {u} is not in GpuNode gpu-node-a status: {uuids:?}");
                }
            }
            // Defect 5: five MIG-creating binds on one node at once, no 409 dump as an event.
            no_api_error_events(&c, "default").await?;
        }
        "vlm-34b-whole-gpu.yaml" => {
            let v = c.wait_all_bound("default", "app=vlm-34b", 1, WAIT).await?;
            let (_, node, a) = &v[0];
            ensure!(node == "gpu-node-b", "76Gi fits no A30: expected gpu-node-b, got {node}");
            ensure!(a.devices.len() == 1 && a.devices[0].profile.is_none(), "a whole GPU expected: {a:?}");
        }
        "llm-70b-tp4.yaml" => {
            let (node, a) = c.wait_bound("default", "llm-70b", WAIT).await?;
            ensure!(node == "gpu-node-b", "4 GPUs only fit gpu-node-b, got {node}");
            let idx: BTreeSet<u32> = a.devices.iter().map(|d| d.index).collect();
            ensure!(idx.len() == 4 && a.devices.iter().all(|d| d.profile.is_none()), "4 whole GPUs expected: {a:?}");
        }
        "gang-podgroup.yaml" => {
            let m = c.wait_all_bound("default", "scheduling.x-k8s.io/pod-group=finetune", 4, WAIT).await?;
            for (p, _, a) in &m {
                ensure!(a.devices.len() == 2, "{:?} asked nvidia.com/gpu: 2, got {a:?}", p.metadata.name);
            }
            no_device_twice(m.iter().map(|(_, _, a)| a))?;
            // The status is written after the rebuild that shows the binds, a moment later.
            let groups: kube::Api<tessera_api::PodGroup> = kube::Api::namespaced(c.client.clone(), "default");
            tessera_e2e::until("the PodGroup status to count 4 scheduled", Duration::from_secs(30), || {
                let groups = groups.clone();
                async move {
                    let status = serde_json::to_value(groups.get("finetune").await?)?["status"].clone();
                    ensure!(status["scheduled"].as_i64() == Some(4), "PodGroup status: {status}");
                    Ok(Some(()))
                }
            })
            .await?;
        }
        "gang-annotations.yaml" => {
            let m = c.wait_all_bound("default", "app=shard", 4, WAIT).await?;
            for (p, node, _) in &m {
                ensure!(
                    node == "gpu-node-a",
                    "{:?} is on {node}, which has no nvidia.com/mig-3g.40gb",
                    p.metadata.name
                );
            }
            no_device_twice(m.iter().map(|(_, _, a)| a))?;
        }
        "plain-nvidia-mig.yaml" => {
            let (node, _) = c.wait_bound("default", "asr-whisper", WAIT).await?;
            ensure!(node == "gpu-node-b", "only gpu-node-b advertises nvidia.com/mig-1g.10gb, got {node}");
        }
        _ => {
            let m = c.wait_all_bound("default", "app=minilm", 2, WAIT).await?;
            no_device_twice(m.iter().map(|(_, _, a)| a))?;
            for (_, _, a) in &m {
                ensure!(a.devices.iter().all(|d| d.profile.is_some()), "4Gi wants a MIG slice: {a:?}");
            }
        }
    }
    trusts_its_own_assignments(&c)
}

/// tessera never refuses an assignment it signed itself (it did for `nvidia.com/mig-*` pods
/// bound before their node reported the new MIG instance: `DeviceHeld`, and their slices went
/// uncounted until the report).
pub fn trusts_its_own_assignments(c: &Cluster) -> Result<()> {
    let distrust = c.tessera_log_lines("Assignment not trusted");
    ensure!(distrust.is_empty(), "tessera refused assignments it signed: {distrust:?}");
    Ok(())
}
