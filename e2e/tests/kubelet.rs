//! The real-kubelet suite: the real-cluster harness (`tessera_e2e::Cluster`: etcd,
//! kube-apiserver, kube-scheduler with the manifests' configuration, tessera-scheduler) with one
//! real kubelet node (`tessera_e2e::kubelet`: kubelet v1.36 + containerd + runc +
//! `tessera-mig-manager` with the fake backend as its device plugin) and pods whose containers
//! print the `NVIDIA_VISIBLE_DEVICES` kubelet gave them. docs/testing.md says what each test
//! shows.
//!
//! The last three tests run the manifests themselves (`e2e/fixtures/kubelet`, a kustomize overlay
//! of `manifests/`): the images `scripts/build-images.sh` builds are imported into containerd, the
//! agent runs as the DaemonSet, the runtime as the example Deployment, and the scheduler
//! Deployment (kube-scheduler v1.36.2 + tessera-scheduler) takes over from the suite's processes.
//!
//! The whole suite runs in a private network namespace (`tessera_e2e::kubelet::net`), in which
//! pods get addresses of 127.97.0.0/16 on a bridge that kubelet's probes and the test reach.
//!
//! The cluster and node start once, on the first test, and are shared: the tests run one at a
//! time. Run: `cargo test -p tessera-e2e --test kubelet` (root; `KUBEBUILDER_ASSETS`; Debian
//! containerd, runc, containernetworking-plugins, busybox-static). `TESSERA_E2E_ROUNDS` sets the
//! rounds of the concurrency test (default 50); `TESSERA_E2E_KEEP=1` keeps the logs. Without the
//! prerequisites every test is ignored with one line; under `CI=true` each fails instead.
#![allow(clippy::disallowed_methods)] // tests wait on real processes with deadlines

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use futures::future::try_join_all;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::{Value, json};

mod common;
use tessera_api::annotations::{ASSIGNMENT, ASSIGNMENT_SIGNATURE, RESOURCE_GPU};
use tessera_api::gpunode::Mode;
use tessera_api::signing::Keyring;
use tessera_api::{AssignedDevice, Assignment, GpuNode};
use tessera_e2e::kubelet::{BUSYBOX_IMAGE, KubeletNode, NODE_NAME, NodeConfig, Prerequisites, net, tail};
use tessera_e2e::{Bins, Cluster, Options, repo_root};

const NS: &str = "default";
/// Four whole GPUs and one in MIG mode (its instances are created through GpuNode spec).
const FAKE_GPUS: &str = "a100x4,a100x1:mig";
const LABEL: &str = "tessera.dev/e2e";

struct Suite {
    cluster: Cluster,
    /// Forwards the `kubernetes` Service's ClusterIP to kube-apiserver (no kube-proxy here).
    _vip: tokio::task::JoinHandle<()>,
    node: Mutex<KubeletNode>,
    keys: Keyring,
    _dir: tempfile::TempDir,
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap_or_else(|e| {
            eprintln!("kubelet suite: no tokio runtime: {e}");
            std::process::exit(1)
        })
    })
}

/// The shared cluster and node, started by the first test that needs them.
static SUITE: Mutex<Option<Result<Arc<Suite>, String>>> = Mutex::new(None);

fn suite(bins: &Bins, pre: &Prerequisites) -> Result<Arc<Suite>, Failed> {
    let mut slot = SUITE.lock().unwrap_or_else(|e| e.into_inner());
    if slot.is_none() {
        let t = Instant::now();
        let r = runtime().block_on(setup(bins, pre)).map(Arc::new).map_err(|e| format!("{e:#}"));
        if r.is_ok() {
            println!("kubelet suite: cluster and node {NODE_NAME} ready in {:.1} s", t.elapsed().as_secs_f64());
        }
        *slot = Some(r);
    }
    match slot.as_ref() {
        Some(Ok(s)) => Ok(s.clone()),
        Some(Err(e)) => Err(Failed::from(format!("the cluster or the kubelet node did not start: {e}"))),
        None => Err(Failed::from("no suite")),
    }
}

async fn setup(bins: &Bins, pre: &Prerequisites) -> Result<Suite> {
    let dir = tempfile::Builder::new().prefix("tessera-kubelet-suite-").tempdir()?;
    // No fake nodes: the only node is the real kubelet's.
    let cluster = Cluster::start(bins, dir.path(), Options::default()).await?;
    let cfg = NodeConfig {
        kubeconfig: cluster.admin_kubeconfig.clone(),
        agent_kubeconfig: Some(cluster.agent_kubeconfig.clone()),
        agent: bins.mig_manager.clone(),
        assignment_keys: cluster.keys_file.clone(),
        fake_gpus: FAKE_GPUS.into(),
        agent_args: Vec::new(),
    };
    let apiserver = apiserver_addr(&cluster)?;
    let vip = net::serve_service_vip(apiserver).await?;
    let node = KubeletNode::start(pre, &cfg, &cluster.client).await?;
    let keys = cluster.keyring()?;
    Ok(Suite { cluster, _vip: vip, node: Mutex::new(node), keys, _dir: dir })
}

/// kube-apiserver's address, from the admin kubeconfig's `server`.
fn apiserver_addr(cluster: &Cluster) -> Result<std::net::SocketAddr> {
    let cfg: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&cluster.admin_kubeconfig)?)?;
    let server = cfg["clusters"][0]["cluster"]["server"].as_str().context("kubeconfig without server")?;
    let addr = server.strip_prefix("https://").context("server is not https")?;
    addr.parse().with_context(|| format!("server address {addr}"))
}

type Scenario = for<'a> fn(&'a Suite) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String>> + 'a>>;

fn main() {
    // First, while single-threaded: the suite's private network namespace (re-executes).
    if !std::env::args().any(|a| a == "--list")
        && let Err(e) = net::enter()
    {
        eprintln!("kubelet suite: {e:#}");
        std::process::exit(1);
    }
    let mut args = Arguments::from_args();
    // One node for every test.
    args.test_threads = Some(1);
    let tests: [(&str, Scenario); 7] = [
        ("tessera_scheduled_pods_see_their_assignment", |s| Box::pin(tessera_scheduled_pods_see_their_assignment(s))),
        ("tessera_scheduled_rounds_never_swap_devices", |s| Box::pin(tessera_scheduled_rounds_never_swap_devices(s))),
        ("concurrent_binds_never_swap_devices", |s| Box::pin(concurrent_binds_never_swap_devices(s))),
        ("forged_assignments_do_not_start", |s| Box::pin(forged_assignments_do_not_start(s))),
        // These two replace the node's agent process by the DaemonSet's pod: they run last.
        ("manifests_agent_daemonset_registers_device_plugin", |s| {
            Box::pin(manifests_agent_daemonset_registers_device_plugin(s))
        }),
        ("manifests_runtime_deployment_passes_probes_and_serves", |s| {
            Box::pin(manifests_runtime_deployment_passes_probes_and_serves(s))
        }),
        // This one stops the suite's own scheduler processes: it runs last of all.
        ("manifests_scheduler_deployment_leads_and_schedules", |s| {
            Box::pin(manifests_scheduler_deployment_leads_and_schedules(s))
        }),
    ];
    let located = if args.list {
        Err(String::new())
    } else {
        Prerequisites::find().and_then(|pre| Bins::locate().map(|bins| (bins, pre)))
    };
    let trials: Vec<Trial> = match located {
        Ok((bins, pre)) => tests
            .into_iter()
            .map(|(name, f)| {
                let (bins, pre) = (bins.clone(), pre.clone());
                Trial::test(name, move || {
                    let s = suite(&bins, &pre)?;
                    let t = Instant::now();
                    // The manifest tests build the images first (the runtime's with ONNX Runtime).
                    let limit = if name.starts_with("manifests_") { 900 } else { 240 };
                    let r = runtime().block_on(async { tokio::time::timeout(Duration::from_secs(limit), f(&s)).await });
                    match r {
                        Ok(Ok(note)) => {
                            println!("{name}: {note} ({:.1} s)", t.elapsed().as_secs_f64());
                            Ok(())
                        }
                        Ok(Err(e)) => Err(Failed::from(format!("{e:#}\n{}", logs(&s)))),
                        Err(_) => Err(Failed::from(format!("ran longer than {limit} s\n{}", logs(&s)))),
                    }
                })
            })
            .collect(),
        Err(_) if args.list => tests.into_iter().map(|(name, _)| Trial::test(name, || Ok(()))).collect(),
        Err(why) => common::unavailable("kubelet suite", tests.into_iter().map(|(name, _)| name), &why),
    };
    let conclusion = libtest_mimic::run(&args, trials);
    // Stop the node (and check it left the host as it was), then the cluster.
    let mut clean = true;
    if let Some(Ok(s)) = SUITE.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let problems = s.node.lock().map(|mut n| n.stop()).unwrap_or_default();
        for p in &problems {
            eprintln!("kubelet suite: clean-up: {p}");
        }
        clean = problems.is_empty();
        runtime().block_on(async move { drop(s) });
    }
    if !clean {
        std::process::exit(101);
    }
    conclusion.exit();
}

fn logs(s: &Suite) -> String {
    let node = s.node.lock().unwrap_or_else(|e| e.into_inner());
    let mut out = String::new();
    for n in ["agent", "kubelet"] {
        out.push_str(&format!("--- {n}.log (tail)\n{}", tail(&node.log(n), 25)));
    }
    out
}

/// The UUIDs a container must see for `a`, as the agent hands them out.
fn visible(a: &Assignment) -> String {
    a.devices.iter().map(|d| d.mig.clone().unwrap_or_else(|| d.gpu.clone())).collect::<Vec<_>>().join(",")
}

fn gpu_pod(name: &str, extra: Value) -> Value {
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {LABEL: "kubelet"}},
        "spec": {
            "schedulerName": "tessera",
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 0,
            // No token volume: nothing publishes kube-root-ca.crt without kube-controller-manager.
            "automountServiceAccountToken": false,
            "containers": [{
                "name": "c",
                "image": BUSYBOX_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["/bin/busybox", "sh", "-c", "echo NVIDIA_VISIBLE_DEVICES=$NVIDIA_VISIBLE_DEVICES"],
                "resources": {"limits": {RESOURCE_GPU: "1"}}
            }]
        }
    });
    merge(&mut pod, extra);
    pod
}

fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

fn pods(s: &Suite) -> Api<Pod> {
    Api::namespaced(s.cluster.client.clone(), NS)
}

/// Creates a pod and binds it to the node with a signed assignment of `device`, as tessera's
/// binder does (a Binding's annotations land on the pod).
async fn create_and_bind(s: &Suite, name: &str, device: &AssignedDevice) -> Result<String> {
    // A scheduler name nobody serves: only this Binding binds it.
    let pod: Pod = serde_json::from_value(gpu_pod(name, json!({"spec": {"schedulerName": "e2e-direct-bind"}})))?;
    let pod = pods(s).create(&PostParams::default(), &pod).await.with_context(|| format!("creating {name}"))?;
    let uid = pod.metadata.uid.context("pod without UID")?;
    let ann = Assignment { node: NODE_NAME.into(), devices: vec![device.clone()] }.to_annotation();
    let binding = json!({
        "apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": name, "annotations": {ASSIGNMENT: ann, ASSIGNMENT_SIGNATURE: s.keys.sign(&uid, NODE_NAME, &ann)}},
        "target": {"apiVersion": "v1", "kind": "Node", "name": NODE_NAME}
    });
    let req = http::Request::post(format!("/api/v1/namespaces/{NS}/pods/{name}/binding"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&binding)?)?;
    s.cluster.client.request_text(req).await.with_context(|| format!("binding {name}"))?;
    Ok(uid)
}

/// Waits until the pod's container has run to completion and returns its log.
async fn finished_log(api: &Api<Pod>, name: &str, timeout: Duration) -> Result<String> {
    let until = Instant::now() + timeout;
    loop {
        let st = api.get(name).await?.status.unwrap_or_default();
        match st.phase.as_deref() {
            Some("Succeeded") => break,
            Some("Failed") => {
                bail!("pod {name} failed: {} {}", st.reason.unwrap_or_default(), st.message.unwrap_or_default())
            }
            _ => {}
        }
        ensure!(Instant::now() < until, "pod {name} not finished after {timeout:?} (phase {:?})", st.phase);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    api.logs(name, &Default::default()).await.with_context(|| format!("logs of {name}"))
}

fn printed(log: &str) -> Option<&str> {
    log.lines().find_map(|l| l.strip_prefix("NVIDIA_VISIBLE_DEVICES=")).map(str::trim)
}

/// The assignment annotation a pod carries.
fn assignment_of(pod: &Pod) -> Result<Assignment> {
    let ann = pod.metadata.annotations.as_ref().and_then(|a| a.get(ASSIGNMENT)).context("no assignment annotation")?;
    Assignment::from_annotation(ann).map_err(|e| anyhow!("assignment annotation {ann:?}: {e}"))
}

async fn delete_all(s: &Suite) -> Result<()> {
    let api = pods(s);
    let lp = ListParams::default().labels(&format!("{LABEL}=kubelet"));
    api.delete_collection(&DeleteParams { grace_period_seconds: Some(0), ..Default::default() }, &lp).await?;
    let until = Instant::now() + Duration::from_secs(60);
    while !api.list(&lp).await?.items.is_empty() {
        ensure!(Instant::now() < until, "pods not gone after 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Pods created normally (`schedulerName: tessera`): kube-scheduler with the tessera extender
/// picks the node and the devices; each container prints exactly its signed assignment.
async fn tessera_scheduled_pods_see_their_assignment(s: &Suite) -> Result<String> {
    // What an earlier failed test left would hold devices.
    delete_all(s).await?;
    let specs = [
        ("whole-gpu", json!({})),
        ("two-gpus", json!({"metadata": {"annotations": {"tessera.dev/gpus": "2"}}})),
        ("mig-slice", json!({"metadata": {"annotations": {"tessera.dev/gpu-memory": "4Gi"}}})),
    ];
    for (name, extra) in &specs {
        s.cluster.create_pod(gpu_pod(name, extra.clone())).await?;
    }
    let api = pods(s);
    let mut notes = Vec::new();
    for (name, _) in &specs {
        let (node, a) = s.cluster.wait_bound(NS, name, Duration::from_secs(90)).await?;
        ensure!(node == NODE_NAME, "{name} was bound to {node}");
        let log = finished_log(&api, name, Duration::from_secs(60)).await?;
        let want = visible(&a);
        ensure!(printed(&log) == Some(want.as_str()), "{name} printed {log:?}; its assignment is {want}");
        notes.push(format!("{name}: {want}"));
    }
    let (_, mig) = s.cluster.wait_bound(NS, "mig-slice", Duration::from_secs(1)).await?;
    ensure!(mig.devices.iter().all(|d| d.mig.is_some()), "mig-slice got no MIG instance: {mig:?}");
    let (_, two) = s.cluster.wait_bound(NS, "two-gpus", Duration::from_secs(1)).await?;
    ensure!(two.devices.len() == 2, "two-gpus got {:?}", two.devices);
    delete_all(s).await?;
    Ok(notes.join("; "))
}

/// Rounds of five pods created at once with `schedulerName: tessera` (four whole GPUs and one
/// MIG-sized): kube-scheduler binds them in parallel through the extender; every container
/// prints its own signed assignment and no device is handed to two pods of a round.
async fn tessera_scheduled_rounds_never_swap_devices(s: &Suite) -> Result<String> {
    delete_all(s).await?;
    let rounds: u64 = std::env::var("TESSERA_E2E_SCHEDULED_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let api = pods(s);
    let t0 = Instant::now();
    let mut checked = 0usize;
    for r in 0..rounds {
        let mut names = Vec::new();
        for i in 0..5 {
            let name = format!("s{r}-p{i}");
            let extra = if i == 4 {
                json!({"metadata": {"annotations": {"tessera.dev/gpu-memory": "4Gi"}}})
            } else {
                json!({})
            };
            names.push((name, extra));
        }
        try_join_all(names.iter().map(|(n, e)| s.cluster.create_pod(gpu_pod(n, e.clone())))).await?;
        let bound =
            try_join_all(names.iter().map(|(n, _)| s.cluster.wait_bound(NS, n, Duration::from_secs(90)))).await?;
        let logs = try_join_all(names.iter().map(|(n, _)| finished_log(&api, n, Duration::from_secs(60)))).await?;
        let mut seen = BTreeMap::new();
        for (((name, _), (node, a)), log) in names.iter().zip(&bound).zip(&logs) {
            ensure!(node == NODE_NAME, "{name} was bound to {node}");
            let want = visible(a);
            ensure!(printed(log) == Some(want.as_str()), "{name} printed {log:?}; its assignment is {want}");
            if let Some(other) = seen.insert(want.clone(), name.clone()) {
                bail!("{name} and {other} were both given {want}");
            }
            checked += 1;
        }
        delete_all(s).await?;
    }
    let wall = t0.elapsed().as_secs_f64();
    Ok(format!(
        "{rounds} rounds, {checked} containers, each saw its assignment; {wall:.1} s ({:.2} s/round)",
        wall / rounds.max(1) as f64
    ))
}

/// Every device the node has now, as assignment entries: whole GPUs in full mode and the MIG
/// instances of GPUs in MIG mode (what GpuNode status reports).
async fn node_devices(s: &Suite) -> Result<Vec<AssignedDevice>> {
    let gn = Api::<GpuNode>::all(s.cluster.client.clone()).get(NODE_NAME).await?;
    let mut out = Vec::new();
    for g in gn.status.unwrap_or_default().gpus {
        if g.mode == Mode::Mig {
            for i in g.instances.iter().filter(|i| !i.uuid.is_empty()) {
                out.push(AssignedDevice {
                    gpu: g.uuid.clone(),
                    index: g.index,
                    profile: Some(i.profile.clone()),
                    start: Some(i.start),
                    mig: Some(i.uuid.clone()),
                    share: None,
                });
            }
        } else {
            out.push(AssignedDevice {
                gpu: g.uuid,
                index: g.index,
                profile: None,
                start: None,
                mig: None,
                share: None,
            });
        }
    }
    Ok(out)
}

/// A small deterministic shuffle: round `r`'s permutation of `n` items.
fn permutation(n: usize, r: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut x = r.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

/// Rounds of pods created and bound at once (parallel POSTs to `pods/NAME/binding`, as a
/// scheduler does), every device of the node handed out in each round in a shuffled order; each
/// container's output is compared with the assignment annotation its pod carries.
async fn concurrent_binds_never_swap_devices(s: &Suite) -> Result<String> {
    // What an earlier failed test left would hold devices.
    delete_all(s).await?;
    let rounds: u64 = std::env::var("TESSERA_E2E_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let api = pods(s);
    let t0 = Instant::now();
    let (mut wrong, mut checked, mut mig) = (Vec::new(), 0usize, 0usize);
    for r in 0..rounds {
        let devices = node_devices(s).await?;
        ensure!(devices.len() >= 4, "round {r}: the node reports only {devices:?}");
        let order = permutation(devices.len(), r);
        let names: Vec<String> = (0..order.len()).map(|i| format!("r{r}-p{i}")).collect();
        try_join_all(names.iter().zip(&order).map(|(n, &d)| create_and_bind(s, n, &devices[d]))).await?;
        let logs = try_join_all(names.iter().map(|n| finished_log(&api, n, Duration::from_secs(60)))).await?;
        for ((name, &d), log) in names.iter().zip(&order).zip(&logs) {
            let a = assignment_of(&api.get(name).await?)?;
            ensure!(a.devices == [devices[d].clone()], "{name} carries {a:?}, bound with {:?}", devices[d]);
            checked += 1;
            mig += usize::from(devices[d].mig.is_some());
            let want = visible(&a);
            if printed(log) != Some(want.as_str()) {
                wrong.push(format!("{name}: saw {:?}, assigned {want}", printed(log)));
            }
        }
        delete_all(s).await?;
        s.node.lock().map_err(|_| anyhow!("node lock"))?.alive().map_err(anyhow::Error::msg)?;
    }
    let wall = t0.elapsed().as_secs_f64();
    ensure!(wrong.is_empty(), "{} of {checked} containers saw another device:\n{}", wrong.len(), wrong.join("\n"));
    Ok(format!(
        "{rounds} rounds, {checked} containers ({mig} on MIG instances), 0 saw another device; {wall:.1} s ({:.2} s/round)",
        wall / rounds.max(1) as f64
    ))
}

/// Pods put straight onto the node (`spec.nodeName`) with a hand-written assignment: unsigned,
/// signed with the node's key ID but another secret, or copied from a genuine pod. None runs a
/// container, and each has an `AssignmentRefused` Event naming why.
async fn forged_assignments_do_not_start(s: &Suite) -> Result<String> {
    // What an earlier failed test left would hold devices.
    delete_all(s).await?;
    let api = pods(s);
    let victim = node_devices(s).await?.into_iter().next().context("the node reports no device")?;
    let ann = Assignment { node: NODE_NAME.into(), devices: vec![victim.clone()] }.to_annotation();
    let key_id = s.keys.ids().first().map(|k| k.to_string()).unwrap_or_default();
    let forger = Keyring::parse(&Keyring::generate_line(&key_id)?)?;
    let genuine_uid = create_and_bind(s, "genuine", &victim).await?;
    finished_log(&api, "genuine", Duration::from_secs(60)).await?;
    let copied = api.get("genuine").await?.metadata.annotations.unwrap_or_default();
    let cases: Vec<(&str, BTreeMap<String, String>, &str)> = vec![
        ("forged-unsigned", BTreeMap::from([(ASSIGNMENT.to_owned(), ann.clone())]), "Unsigned"),
        (
            "forged-signature",
            BTreeMap::from([
                (ASSIGNMENT.to_owned(), ann.clone()),
                (ASSIGNMENT_SIGNATURE.to_owned(), forger.sign(&genuine_uid, NODE_NAME, &ann)),
            ]),
            "Forged",
        ),
        ("forged-replayed", copied.into_iter().filter(|(k, _)| k.starts_with("tessera.dev/")).collect(), "Replayed"),
    ];
    let mut notes = Vec::new();
    for (name, annotations, reason) in cases {
        let pod: Pod = serde_json::from_value(gpu_pod(
            name,
            json!({"metadata": {"annotations": annotations}, "spec": {"nodeName": NODE_NAME, "schedulerName": "default-scheduler"}}),
        ))?;
        api.create(&PostParams::default(), &pod).await?;
        let until = Instant::now() + Duration::from_secs(60);
        let (phase, message) = loop {
            let st = api.get(name).await?.status.unwrap_or_default();
            if let Some(cs) = st.container_statuses.as_ref().and_then(|c| c.first())
                && cs.state.as_ref().is_some_and(|s| s.running.is_some() || s.terminated.is_some())
            {
                bail!("{name}: its container ran: {cs:?}");
            }
            if st.phase.as_deref() == Some("Failed") {
                break (st.reason.unwrap_or_default(), st.message.unwrap_or_default());
            }
            ensure!(Instant::now() < until, "{name}: not refused after 60 s (phase {:?})", st.phase);
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        ensure!(phase == "UnexpectedAdmissionError", "{name}: failed with {phase}: {message}");
        ensure!(api.logs(name, &Default::default()).await.is_err(), "{name}: has a container log although refused");
        let events: Api<Event> = Api::namespaced(s.cluster.client.clone(), NS);
        let until = Instant::now() + Duration::from_secs(30);
        // The agent's Event (tessera-scheduler's rebuild, refusing to count the devices, may
        // write one of the same reason too).
        let agent_says = format!("tessera node agent on {NODE_NAME} refused the device assignment ({reason})");
        loop {
            let list = events.list(&ListParams::default().fields(&format!("involvedObject.name={name}"))).await?;
            let refusals: Vec<String> = list
                .items
                .into_iter()
                .filter(|e| e.reason.as_deref() == Some("AssignmentRefused"))
                .filter_map(|e| e.message)
                .collect();
            if refusals.iter().any(|m| m.contains(&agent_says)) {
                break;
            }
            ensure!(
                Instant::now() < until,
                "{name}: no AssignmentRefused event saying {agent_says:?} after 30 s: {refusals:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        notes.push(format!("{name}: {reason}"));
    }
    delete_all(s).await?;
    Ok(notes.join(", "))
}

/// The overlay of `manifests/` the suite applies.
const OVERLAY: &str = "e2e/fixtures/kubelet";
/// The `models` PV's hostPath (inside the node's mount namespace, see the overlay).
const MODELS_IN_NODE: &str = "/var/lib/tessera-models/all-minilm-l6-v2";
const AGENT_LABEL: &str = "app.kubernetes.io/name=tessera-mig-manager";
const SCHEDULER_LABEL: &str = "app.kubernetes.io/name=tessera-scheduler";
/// What `scripts/build-images.sh` builds for the overlay (kube-scheduler from `$KUBEBUILDER_ASSETS`).
const IMAGES: [&str; 4] = ["tessera-mig-manager", "tessera-runtime", "tessera-scheduler", "kube-scheduler"];

/// The manifests are installed once, by the first test that needs them.
static INSTALLED: tokio::sync::Mutex<Option<Result<String, String>>> = tokio::sync::Mutex::const_new(None);

async fn installed(s: &Suite) -> Result<String> {
    let mut slot = INSTALLED.lock().await;
    if slot.is_none() {
        *slot = Some(install_manifests(s).await.map_err(|e| format!("{e:#}")));
    }
    match slot.as_ref() {
        Some(Ok(note)) => Ok(note.clone()),
        Some(Err(e)) => bail!("installing the manifests failed: {e}"),
        None => bail!("not installed"),
    }
}

fn model_cache() -> std::path::PathBuf {
    std::env::var_os("TESSERA_MODEL_CACHE").map(Into::into).unwrap_or_else(|| repo_root().join(".cache/models"))
}

fn command_output(cmd: &mut std::process::Command, what: &str) -> Result<String> {
    let out = cmd.stdin(std::process::Stdio::null()).output().with_context(|| format!("{what}: cannot start"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    ensure!(out.status.success(), "{what} failed ({}):\n{text}", out.status);
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Builds the agent's and the runtime's images with `scripts/build-images.sh` from this build's
/// binaries, imports them, replaces the node's agent process by nothing, starts what the
/// manifests' workloads need from a control plane (kube-controller-manager, a default
/// kube-scheduler for the DaemonSet's pods), labels the node and applies the overlay.
async fn install_manifests(s: &Suite) -> Result<String> {
    let t = Instant::now();
    let minilm = model_cache().join("minilm");
    ensure!(
        minilm.join("model.safetensors").is_file(),
        "{} has no model.safetensors: run scripts/fetch-models.sh",
        minilm.display()
    );
    // Fresh from `cargo test --workspace` (and then the image step of CI uses the same binary).
    let runtime_bin = tessera_e2e::bins::workspace_bin(
        "tessera-runtime",
        "tessera-runtime",
        &["inference-runtime/src", "inference-runtime/Cargo.toml", "Cargo.toml", "Cargo.lock"],
    )
    .map_err(|e| anyhow!(e))?;
    let bin_dir = runtime_bin.parent().context("binary folder")?.to_path_buf();
    let images = s._dir.path().join("images");
    let built = command_output(
        std::process::Command::new("bash")
            .arg("scripts/build-images.sh")
            .args(IMAGES)
            .env("TESSERA_BIN_DIR", &bin_dir)
            .env("TESSERA_IMAGE_DIR", &images)
            .env("TESSERA_MODEL_CACHE", model_cache())
            .current_dir(repo_root()),
        "scripts/build-images.sh",
    )?;
    let built_s = t.elapsed().as_secs_f64();
    delete_all(s).await?;
    {
        let mut node = s.node.lock().map_err(|_| anyhow!("node lock"))?;
        for name in IMAGES {
            node.import_image(&images.join(format!("{name}.tar")))?;
        }
        node.stop_agent();
        node.bind_into(&minilm, MODELS_IN_NODE)?;
    }
    // The DaemonSet's agent reports the node afresh (its fake GPUs are other ones).
    let gpunodes = Api::<GpuNode>::all(s.cluster.client.clone());
    let _ = gpunodes.delete(NODE_NAME, &DeleteParams::default()).await;
    s.cluster.start_controller_manager()?;
    s.cluster.start_plain_kube_scheduler("default-scheduler")?;
    let nodes: Api<Node> = Api::all(s.cluster.client.clone());
    let label = json!({"metadata": {"labels": {"tessera.dev/gpu-node": "true"}}});
    nodes.patch(NODE_NAME, &PatchParams::default(), &Patch::Merge(&label)).await?;
    let kubectl = s.cluster.bins.kubectl.clone().context("kubectl is not on PATH (it renders the overlay)")?;
    let rendered = command_output(
        std::process::Command::new(kubectl)
            .args(["kustomize", "--load-restrictor", "LoadRestrictionsNone", OVERLAY])
            .current_dir(repo_root()),
        "kubectl kustomize",
    )?;
    let docs = tessera_e2e::apply::documents(&rendered)?;
    for d in &docs {
        tessera_e2e::apply::apply(&s.cluster.client, d).await?;
    }
    let sizes: Vec<String> = built.lines().filter(|l| l.starts_with("build-images:")).map(str::to_owned).collect();
    Ok(format!("images built in {built_s:.1} s ({}); {} objects applied", sizes.join("; "), docs.len()))
}

/// One HTTP/1.0 request to `addr` (a pod IP), status and body.
async fn http(addr: &str, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .with_context(|| format!("connecting to {addr}"))??;
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    c.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), c.read_to_end(&mut out)).await??;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("no HTTP status")?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Why no pod of `pods` is ready yet: phases, reasons and waiting states, for the timeout message.
fn pod_states(pods: &[Pod]) -> String {
    pods.iter()
        .map(|p| {
            let st = p.status.clone().unwrap_or_default();
            let waiting: Vec<String> = st
                .container_statuses
                .unwrap_or_default()
                .iter()
                .filter_map(|c| c.state.as_ref()?.waiting.as_ref().map(|w| format!("{:?} {:?}", w.reason, w.message)))
                .collect();
            format!(
                "{}: {:?} {:?} {:?} {waiting:?}",
                p.metadata.name.clone().unwrap_or_default(),
                st.phase,
                st.reason,
                st.conditions
                    .unwrap_or_default()
                    .iter()
                    .map(|c| (c.type_.clone(), c.status.clone()))
                    .collect::<Vec<_>>()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The manifests' DaemonSet runs the agent as a pod from the locally built image: the pod
/// becomes Ready, answers its liveness probe's URL on its pod IP, reports the overlay's fake
/// GPUs in GpuNode status (so it reached the API server through the Service address), and
/// registers its device plugin: the node's allocatable shows `tessera.dev/gpu` again.
async fn manifests_agent_daemonset_registers_device_plugin(s: &Suite) -> Result<String> {
    let install = installed(s).await?;
    let t = Instant::now();
    let api: Api<Pod> = Api::namespaced(s.cluster.client.clone(), "tessera-system");
    let until = Instant::now() + Duration::from_secs(180);
    let pod = loop {
        let list = api.list(&ListParams::default().labels(AGENT_LABEL)).await?.items;
        if let Some(p) = list.iter().find(|p| ready(p)) {
            break p.clone();
        }
        ensure!(Instant::now() < until, "no Ready agent pod after 180 s: {}", pod_states(&list));
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let ready_s = t.elapsed().as_secs_f64();
    let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone()).context("agent pod without IP")?;
    ensure!(ip.starts_with("127.97."), "agent pod IP {ip} is not on the pod bridge");
    let (code, body) = http(&format!("{ip}:9400"), "GET", "/healthz", "").await?;
    ensure!(code == 200, "GET http://{ip}:9400/healthz: {code} {body}");
    let gpunodes = Api::<GpuNode>::all(s.cluster.client.clone());
    let nodes: Api<Node> = Api::all(s.cluster.client.clone());
    let until = Instant::now() + Duration::from_secs(60);
    let (products, gpus) = loop {
        let products: Vec<String> = gpunodes
            .get_opt(NODE_NAME)
            .await?
            .and_then(|g| g.status)
            .map(|st| st.gpus.into_iter().map(|g| g.product).collect())
            .unwrap_or_default();
        let gpus = nodes
            .get(NODE_NAME)
            .await?
            .status
            .and_then(|st| st.allocatable)
            .and_then(|a| a.get(RESOURCE_GPU).and_then(|q| q.0.parse::<u64>().ok()))
            .unwrap_or(0);
        // The overlay's --fake-gpus=h100x4:mig,l4x2 (the node's own agent had A100s).
        if products.len() == 6 && products.iter().any(|p| p.contains("L4")) && gpus > 0 {
            break (products, gpus);
        }
        ensure!(Instant::now() < until, "after 60 s: GpuNode products {products:?}, allocatable {RESOURCE_GPU}={gpus}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    Ok(format!(
        "{install}; agent pod {ip} Ready {ready_s:.1} s after the apply, /healthz 200, GpuNode {products:?}, allocatable {RESOURCE_GPU}={gpus}"
    ))
}

/// The manifests' runtime example Deployment (scheduled by tessera with a signed assignment) gets a
/// ready replica: kubelet's startup and readiness probes passed on its pod IP, and the runtime
/// answers the test's own requests there.
async fn manifests_runtime_deployment_passes_probes_and_serves(s: &Suite) -> Result<String> {
    installed(s).await?;
    let t = Instant::now();
    let deployments: Api<Deployment> = Api::namespaced(s.cluster.client.clone(), NS);
    let api = pods(s);
    let until = Instant::now() + Duration::from_secs(300);
    let pod = loop {
        let list = api.list(&ListParams::default().labels("app=minilm")).await?.items;
        let available = deployments.get("minilm").await?.status.and_then(|st| st.ready_replicas).unwrap_or(0);
        if available >= 1
            && let Some(p) = list.iter().find(|p| ready(p))
        {
            break p.clone();
        }
        ensure!(Instant::now() < until, "minilm has no ready replica after 300 s: {}", pod_states(&list));
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let ready_s = t.elapsed().as_secs_f64();
    let name = pod.metadata.name.clone().unwrap_or_default();
    // Signed by tessera: a MIG slice or a small whole GPU (an L4) fits `gpu-memory: 4Gi`.
    let (_, a) = s.cluster.check_assignment(&pod)?;
    ensure!(a.devices.len() == 1, "{name} got {a:?}");
    let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone()).context("runtime pod without IP")?;
    ensure!(ip.starts_with("127.97."), "runtime pod IP {ip} is not on the pod bridge");
    let addr = format!("{ip}:8000");
    let (code, body) = http(&addr, "GET", "/v2/models/minilm/ready", "").await?;
    ensure!(code == 200, "GET /v2/models/minilm/ready: {code} {body}");
    let infer = json!({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["tessera runs on a real kubelet"]}]});
    let (code, body) = http(&addr, "POST", "/v2/models/minilm/infer", &infer.to_string()).await?;
    ensure!(code == 200, "POST /v2/models/minilm/infer: {code} {body}");
    let out: Value = serde_json::from_str(&body).with_context(|| format!("infer answer {body}"))?;
    let dims = out["outputs"][0]["shape"].clone();
    ensure!(dims == json!([1, 384]), "infer answered shape {dims} (MiniLM embeds in 384 dimensions): {body}");
    Ok(format!("{name} ({ip}, {}) ready {ready_s:.1} s after the apply; infer 200, output shape {dims}", visible(&a)))
}

/// The manifests' scheduler Deployment (the upstream kube-scheduler v1.36.2 and tessera-scheduler
/// in one pod, from locally built images) takes over from the suite's own scheduler processes:
/// once those are stopped its kube-scheduler takes the Lease, the pod is Ready (both containers'
/// probes), and a `schedulerName: tessera` pod is bound by it through the pod's extender: a signed
/// assignment whose devices the container prints, and a `Scheduled` Event reported by the pod's
/// kube-scheduler (`tessera-<pod name>`).
async fn manifests_scheduler_deployment_leads_and_schedules(s: &Suite) -> Result<String> {
    installed(s).await?;
    delete_all(s).await?;
    let system: Api<Pod> = Api::namespaced(s.cluster.client.clone(), "tessera-system");
    let until = Instant::now() + Duration::from_secs(180);
    // Ready while the suite's processes still lead: a waiting replica passes its probes.
    let pod = loop {
        let list = system.list(&ListParams::default().labels(SCHEDULER_LABEL)).await?.items;
        if let Some(p) = list.iter().find(|p| ready(p)) {
            break p.clone();
        }
        ensure!(Instant::now() < until, "no Ready scheduler pod after 180 s: {}", pod_states(&list));
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let name = pod.metadata.name.clone().unwrap_or_default();
    // From the pod's creation (with the overlay's apply) to its Ready condition; seconds.
    let ready_s = pod
        .status
        .as_ref()
        .and_then(|st| st.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .and_then(|c| c.last_transition_time.as_ref())
        .zip(pod.metadata.creation_timestamp.as_ref())
        .map(|(ready, created)| ready.0.as_second() - created.0.as_second())
        .context("scheduler pod without Ready time or creation time")?;
    ensure!(
        pod.status.as_ref().and_then(|st| st.pod_ip.as_deref()).is_some_and(|ip| ip.starts_with("127.97.")),
        "scheduler pod {name} is not on the pod bridge: {:?}",
        pod.status.as_ref().and_then(|st| st.pod_ip.clone())
    );
    // The suite's kube-scheduler and tessera-scheduler processes go; their Lease runs out (15 s).
    s.cluster.kill_replica(0);
    let t_lease = Instant::now();
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(s.cluster.client.clone(), "tessera-system");
    let until = Instant::now() + Duration::from_secs(60);
    let holder = loop {
        let holder = leases
            .get_opt("tessera-scheduler")
            .await?
            .and_then(|l| l.spec)
            .and_then(|sp| sp.holder_identity)
            .unwrap_or_default();
        if holder.starts_with(&format!("{name}_")) {
            break holder;
        }
        ensure!(
            Instant::now() < until,
            "Lease tessera-system/tessera-scheduler held by {holder:?} 60 s after the suite's scheduler stopped, not by {name}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let lease_s = t_lease.elapsed().as_secs_f64();
    // Still Ready as the leader (tessera-scheduler's /readyz, kube-scheduler's /healthz).
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let p = system.get(&name).await?;
        if ready(&p) {
            break;
        }
        ensure!(Instant::now() < until, "leader {name} not Ready: {}", pod_states(&[p]));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let t_pod = Instant::now();
    let probe = "via-deployment";
    s.cluster
        .create_pod(gpu_pod(probe, json!({"metadata": {"annotations": {"tessera.dev/gpu-memory": "4Gi"}}})))
        .await?;
    // wait_bound checks the assignment's signature with the cluster's keys.
    let (node, a) = s.cluster.wait_bound(NS, probe, Duration::from_secs(90)).await?;
    ensure!(node == NODE_NAME, "{probe} was bound to {node}");
    let log = finished_log(&pods(s), probe, Duration::from_secs(60)).await?;
    let want = visible(&a);
    ensure!(printed(&log) == Some(want.as_str()), "{probe} printed {log:?}; its assignment is {want}");
    let bound_s = t_pod.elapsed().as_secs_f64();
    let events: Api<Event> = Api::namespaced(s.cluster.client.clone(), NS);
    let reporter = format!("tessera-{name}");
    let until = Instant::now() + Duration::from_secs(30);
    let scheduled = loop {
        let list = events.list(&ListParams::default().fields(&format!("involvedObject.name={probe}"))).await?.items;
        if let Some(e) = list.iter().find(|e| {
            e.reason.as_deref() == Some("Scheduled") && e.reporting_instance.as_deref() == Some(reporter.as_str())
        }) {
            break e.message.clone().unwrap_or_default();
        }
        let seen: Vec<_> = list
            .iter()
            .map(|e| (e.reason.clone(), e.reporting_component.clone(), e.reporting_instance.clone()))
            .collect();
        ensure!(Instant::now() < until, "{probe}: no Scheduled Event from {reporter} after 30 s: {seen:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    delete_all(s).await?;
    Ok(format!(
        "{name} Ready {ready_s} s after its creation; Lease {holder} {lease_s:.1} s after the \
         suite's scheduler stopped; {probe} bound with {want} in {bound_s:.1} s ({reporter}: {scheduled:?})"
    ))
}
