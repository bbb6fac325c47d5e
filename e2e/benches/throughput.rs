//! Scheduling throughput of a real kube-scheduler v1.36.2 with tessera, beside the same binary
//! without the extender, on the same fake nodes (docs/benchmarks.md, "Real-cluster throughput").
//!
//! `cargo bench -p tessera-e2e --bench throughput -- --nodes 1000 --pods 3000`
//!
//! One control plane; N fake nodes of 8 A100-80GB GPUs each, with `nvidia.com/gpu: 8`
//! allocatable and a `GpuNode` whose status lists the GPUs as a node agent publishes it (written
//! by the bench: no agent processes, nothing here needs a MIG change). Two
//! rounds on the same nodes; in each, every pod is created first, then the kube-scheduler that
//! serves them is started, and the time is from that start to the last pod bound:
//! - plain: a kube-scheduler profile without the extender, pods asking `nvidia.com/gpu`;
//! - tessera: the manifests' KubeSchedulerConfiguration with tessera-scheduler, pods with the
//!   same GPU counts, a quarter of them through `tessera.dev/gpu` + `tessera.dev/gpus`.
//!
//! Both kube-schedulers get the same client limits (`--qps`, default 500; burst twice it), so
//! the comparison measures scheduling, not kube-scheduler's default 50 QPS.
#![allow(clippy::disallowed_methods)] // a benchmark: it times the cluster

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tessera_e2e::{Bins, Cluster, NodeSpec, Options};

#[derive(Debug)]
struct Args {
    nodes: usize,
    pods: usize,
    qps: u32,
    concurrency: usize,
}

fn args() -> Result<Args> {
    let mut a = Args { nodes: 1000, pods: 3000, qps: 500, concurrency: 32 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| -> Result<usize> {
            let v = it.next().with_context(|| format!("{name} needs a value"))?;
            v.parse().with_context(|| format!("{name} {v:?} is not a number"))
        };
        match flag.as_str() {
            "--nodes" => a.nodes = value("--nodes")?,
            "--pods" => a.pods = value("--pods")?,
            "--qps" => a.qps = u32::try_from(value("--qps")?)?,
            "--concurrency" => a.concurrency = value("--concurrency")?.max(1),
            // cargo bench passes --bench; libtest flags mean nothing here.
            "--bench" => {}
            other => bail!("unknown flag {other} (flags: --nodes N --pods N --qps N --concurrency N)"),
        }
    }
    ensure!(a.pods <= a.nodes * 8, "--pods {} exceeds the {} GPUs of {} nodes", a.pods, a.nodes * 8, a.nodes);
    Ok(a)
}

/// GPUs the i-th pod asks for: mostly one, some two (the same on both sides).
fn gpus_of(i: usize) -> u32 {
    if i % 5 == 4 { 2 } else { 1 }
}

fn pod(i: usize, scheduler: &str) -> Result<Pod> {
    let gpus = gpus_of(i);
    let tessera_named = scheduler == "tessera" && i % 4 == 1;
    let (limits, annotations) = if tessera_named {
        (json!({"tessera.dev/gpu": "1", "cpu": "1", "memory": "1Gi"}), json!({"tessera.dev/gpus": gpus.to_string()}))
    } else {
        (json!({"nvidia.com/gpu": gpus.to_string(), "cpu": "1", "memory": "1Gi"}), json!({}))
    };
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("{scheduler}-{i}"), "namespace": "bench", "annotations": annotations},
        "spec": {"schedulerName": scheduler, "containers": [{"name": "c", "image": "registry.invalid/none",
                 "resources": {"limits": limits, "requests": {"cpu": "1", "memory": "1Gi"}}}]},
    }))?)
}

async fn bound(pods: &Api<Pod>, prefix: &str) -> Result<usize> {
    let list = pods.list(&ListParams::default()).await?;
    Ok(list
        .items
        .iter()
        .filter(|p| p.metadata.name.as_deref().is_some_and(|n| n.starts_with(prefix)))
        .filter(|p| p.spec.as_ref().is_some_and(|s| s.node_name.is_some()))
        .count())
}

/// One round's times, in seconds after its scheduler was started.
#[derive(Debug, Clone, Copy)]
struct Times {
    first_bound: f64,
    all_bound: f64,
}

/// Creates the pods for `scheduler` (`concurrency` at a time) while no scheduler serves it,
/// then starts it (`start`) and waits until all are bound.
async fn round(c: &Cluster, scheduler: &str, a: &Args, start: impl FnOnce() -> Result<()>) -> Result<Times> {
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "bench");
    let t_create = Instant::now();
    let mut next = 0;
    let mut inflight = tokio::task::JoinSet::new();
    while next < a.pods || !inflight.is_empty() {
        while next < a.pods && inflight.len() < a.concurrency {
            let (api, p) = (pods.clone(), pod(next, scheduler)?);
            inflight.spawn(async move { api.create(&PostParams::default(), &p).await.map(|_| ()) });
            next += 1;
        }
        if let Some(r) = inflight.join_next().await {
            r?.context("creating a pod")?;
        }
    }
    let created = t_create.elapsed().as_secs_f64();
    let t0 = Instant::now();
    start()?;
    let prefix = format!("{scheduler}-");
    let deadline = Instant::now() + Duration::from_secs(1800);
    let (mut last, mut first_bound) = (0, None);
    loop {
        let n = bound(&pods, &prefix).await?;
        if n > 0 && first_bound.is_none() {
            first_bound = Some(t0.elapsed().as_secs_f64());
        }
        if n >= a.pods {
            break;
        }
        if Instant::now() > deadline {
            bail!("{scheduler}: {n} of {} pods bound after 30 minutes", a.pods);
        }
        if n / 1000 != last / 1000 {
            eprintln!("  {scheduler}: {n}/{} bound after {:.1} s", a.pods, t0.elapsed().as_secs_f64());
        }
        last = n;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let times = Times { first_bound: first_bound.unwrap_or_default(), all_bound: t0.elapsed().as_secs_f64() };
    eprintln!(
        "  {scheduler}: {} pods created in {created:.1} s; after the scheduler started, the first bound at {:.1} s, all at {:.1} s",
        a.pods, times.first_bound, times.all_bound
    );
    // Free the GPUs for the next round.
    pods.delete_collection(
        &DeleteParams { grace_period_seconds: Some(0), ..Default::default() },
        &ListParams::default(),
    )
    .await?;
    tessera_e2e::until("the bench pods to be gone", Duration::from_secs(300), || {
        let pods = pods.clone();
        async move { Ok(pods.list(&ListParams::default().limit(1)).await?.items.is_empty().then_some(())) }
    })
    .await?;
    Ok(times)
}

/// The node's GpuNode with eight full-mode A100-80GB GPUs in its status, as its agent would
/// publish them (tessera places `tessera.dev/gpu` pods only on nodes whose agent reported).
async fn publish_gpus(c: &Cluster, node: &str) -> Result<()> {
    let gpus: Vec<_> = (0..8)
        .map(|i| {
            json!({"index": i, "uuid": format!("GPU-{node}-{i}"), "product": "A100-80GB", "memoryMib": 81920,
                   "migCapable": true, "mode": "full", "health": "Healthy", "instances": []})
        })
        .collect();
    let api = c.gpunodes();
    let gn = json!({"apiVersion": "tessera.dev/v1alpha1", "kind": "GpuNode", "metadata": {"name": node}, "spec": {}});
    api.create(&PostParams::default(), &serde_json::from_value(gn)?)
        .await
        .with_context(|| format!("creating GpuNode {node}"))?;
    api.patch_status(node, &PatchParams::default(), &Patch::Merge(&json!({"status": {"gpus": gpus}})))
        .await
        .with_context(|| format!("publishing GpuNode {node} status"))?;
    Ok(())
}

/// Where tessera's time went (its own histograms: mean and count per verb, rebuilds) and its
/// memory (VmRSS, VmHWM of the tessera-scheduler process).
async fn report_tessera(c: &Cluster) {
    let name = Cluster::tessera_name(0);
    match tessera_e2e::cluster::http_get(c.replicas[0].read_port, "/metrics").await {
        Ok((200, text)) => {
            let value = |series: &str| -> f64 {
                text.lines()
                    .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
                    .unwrap_or(f64::NAN)
            };
            for verb in ["filter", "prioritize", "bind"] {
                let sum = value(&format!("tessera_request_duration_seconds_sum{{verb=\"{verb}\"}}"));
                let count = value(&format!("tessera_request_duration_seconds_count{{verb=\"{verb}\"}}"));
                eprintln!("  {name}: {verb} {count} requests, mean {:.2} ms, {sum:.1} s in all", 1e3 * sum / count);
            }
            let (sum, count) =
                (value("tessera_rebuild_duration_seconds_sum"), value("tessera_rebuild_duration_seconds_count"));
            eprintln!("  {name}: {count} rebuilds, mean {:.1} ms, {sum:.1} s in all", 1e3 * sum / count);
        }
        Ok((code, _)) => eprintln!("  {name}: /metrics answered {code}"),
        Err(e) => eprintln!("  {name}: /metrics: {e:#}"),
    }
    let status = c.pid(&name).and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok());
    let field = |k: &str| {
        status
            .as_deref()
            .and_then(|s| s.lines().find(|l| l.starts_with(k)))
            .map_or("?".into(), |l| l.trim_start_matches(k).trim().to_owned())
    };
    eprintln!("  {name}: VmRSS {}, VmHWM {}", field("VmRSS:"), field("VmHWM:"));
}

async fn bench(a: Args) -> Result<()> {
    let bins = Bins::locate().map_err(anyhow::Error::msg)?;
    let dir = tempfile::Builder::new().prefix("tessera-throughput-").tempdir()?;
    let opts = Options { namespaces: vec!["bench".into()], scheduler_qps: Some(a.qps), ..Options::default() };
    let c = std::sync::Arc::new(Cluster::start(&bins, dir.path(), opts).await?);
    let t = Instant::now();
    let mut inflight = tokio::task::JoinSet::new();
    for i in 0..a.nodes {
        let spec = NodeSpec::new(&format!("node-{i:05}"), "a100x8")
            .resource("nvidia.com/gpu", "8")
            .label("nvidia.com/gpu.product", "A100-SXM4-80GB")
            .label("nvidia.com/gpu.memory", "81920")
            .label("nvidia.com/gpu.count", "8");
        let c = c.clone();
        inflight.spawn(async move {
            c.create_node(&spec).await?;
            publish_gpus(&c, &spec.name).await
        });
        if inflight.len() >= a.concurrency
            && let Some(r) = inflight.join_next().await
        {
            r??;
        }
    }
    while let Some(r) = inflight.join_next().await {
        r??;
    }
    eprintln!("{} nodes created in {:.1} s", a.nodes, t.elapsed().as_secs_f64());
    // tessera's kube-scheduler waits until its pods exist, as the plain one does.
    ensure!(c.kill9("kube-scheduler-0"), "no kube-scheduler-0 to stop");
    // Let tessera's rebuild see every node.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let plain = round(&c, "plain", &a, || c.start_plain_kube_scheduler("plain")).await?;
    // A restarted kube-scheduler waits for the old Lease to lapse (15 s); the time from its
    // first bind to its last is what it schedules at. The plain one is measured the same way.
    let tessera = round(&c, "tessera", &a, || c.start_kube_scheduler(0)).await?;
    report_tessera(&c).await;
    let rate = |t: Times| (a.pods.saturating_sub(1)) as f64 / (t.all_bound - t.first_bound).max(1e-3);
    let (p, t) = (rate(plain), rate(tessera));
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "nodes {} pods {} qps {}: plain {p:.1} pods/s, tessera {t:.1} pods/s (first bind to last), ratio {:.2}; load average {}",
        a.nodes,
        a.pods,
        a.qps,
        t / p,
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    Ok(())
}

fn main() {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("throughput: {e:#}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a runtime");
    if let Err(e) = rt.block_on(bench(a)) {
        eprintln!("throughput: {e:#}");
        std::process::exit(1);
    }
}
