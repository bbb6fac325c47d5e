//! The real-kubelet suite: one real kubelet node (kubelet v1.36 + containerd + runc +
//! `tessera-mig-manager` with the fake backend as its device plugin, see `tessera_e2e::kubelet`)
//! and pods whose containers print the `NVIDIA_VISIBLE_DEVICES` kubelet gave them.
//!
//! One node is started once and shared by every scenario, which run in order:
//!
//! - `signed_assignment_reaches_the_container`: a whole GPU and a MIG instance, each bound with
//!   a signed `tessera.dev/assignment`, print exactly the assigned UUID;
//! - `concurrent_binds_never_swap_devices`: rounds of pods created and bound at once on the one
//!   node, every device of the node assigned in each round (shuffled); 0 containers may print a
//!   device other than their own assignment;
//! - `forged_assignments_do_not_start`: pods with `spec.nodeName` and a hand-written unsigned, or
//!   a forged signed, assignment never run a container, and an Event names the refusal.
//!
//! Run: `cargo test -p tessera-e2e --test kubelet` (root; `KUBEBUILDER_ASSETS` or
//! `scripts/setup-k8s.sh`; Debian containerd, runc, busybox-static). Filter by a substring of a
//! scenario's name; `TESSERA_E2E_ROUNDS` sets the number of rounds (default 50),
//! `TESSERA_E2E_KEEP=1` keeps the node's folder and logs. Without the prerequisites the suite
//! prints what is missing and passes, except under `CI=true`, where it fails.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use futures::future::try_join_all;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tessera_api::annotations::{ASSIGNMENT, ASSIGNMENT_SIGNATURE, RESOURCE_GPU};
use tessera_api::signing::Keyring;
use tessera_api::{AssignedDevice, Assignment, GpuNode};
use tessera_e2e::kubelet::control_plane::ControlPlane;
use tessera_e2e::kubelet::{BUSYBOX_IMAGE, KubeletNode, NODE_NAME, NodeConfig, Prerequisites, cargo_binary};

const NS: &str = "default";
/// Four whole GPUs and one MIG GPU (split into two 3g.40gb instances by the suite).
const FAKE_GPUS: &str = "a100x4,a100x1:mig";
const MIG_GPU: u32 = 4;

struct Suite {
    client: Client,
    keys: Keyring,
    /// Every device of the node as an assignment entry: 4 whole GPUs, 2 MIG instances.
    devices: Vec<AssignedDevice>,
    node: std::sync::Mutex<KubeletNode>,
    _cp: ControlPlane,
}

type Scenario = fn(&Suite) -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<String>> + '_>>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let listing = std::env::args().any(|a| a == "--list");
    let scenarios: [(&str, Scenario); 3] = [
        ("signed_assignment_reaches_the_container", |s| Box::pin(signed_assignment_reaches_the_container(s))),
        ("concurrent_binds_never_swap_devices", |s| Box::pin(concurrent_binds_never_swap_devices(s))),
        ("forged_assignments_do_not_start", |s| Box::pin(forged_assignments_do_not_start(s))),
    ];
    let chosen: Vec<_> =
        scenarios.iter().filter(|(n, _)| args.is_empty() || args.iter().any(|a| n.contains(a.as_str()))).collect();
    if listing {
        for (n, _) in &chosen {
            println!("{n}: test");
        }
        return;
    }
    if chosen.is_empty() {
        println!("running 0 tests");
        return;
    }
    let pre = match Prerequisites::find() {
        Ok(p) => p,
        Err(why) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                eprintln!("kubelet suite: FAILED under CI=true: {why}");
                std::process::exit(1);
            }
            println!("kubelet suite: skipped: {why} (under CI=true this fails)");
            return;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kubelet suite: no tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    let t0 = Instant::now();
    let failed = rt.block_on(async {
        let suite = match setup(&pre).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("kubelet suite: set-up failed: {e:#}");
                return chosen.len();
            }
        };
        println!("kubelet suite: node {NODE_NAME} ready in {:.1} s", t0.elapsed().as_secs_f64());
        let mut failed = 0;
        for (name, f) in &chosen {
            let t = Instant::now();
            let r = tokio::time::timeout(Duration::from_secs(240), f(&suite)).await;
            let r = r.unwrap_or_else(|_| Err(anyhow::anyhow!("timed out after 240 s")));
            match r {
                Ok(note) => println!("test {name} ... ok ({:.1} s) {note}", t.elapsed().as_secs_f64()),
                Err(e) => {
                    failed += 1;
                    println!("test {name} ... FAILED ({:.1} s)\n{e:#}", t.elapsed().as_secs_f64());
                    if let Ok(node) = suite.node.lock() {
                        println!("--- agent log (tail)\n{}", tessera_e2e::kubelet::tail(&node.log("agent"), 30));
                    }
                }
            }
        }
        let problems = match suite.node.lock() {
            Ok(mut node) => node.stop(),
            Err(_) => vec!["the node's lock is poisoned".to_owned()],
        };
        for p in problems {
            failed += 1;
            println!("clean-up FAILED: {p}");
        }
        failed
    });
    println!(
        "\ntest result: {}. {} passed; {failed} failed; {:.1} s",
        if failed == 0 { "ok" } else { "FAILED" },
        chosen.len().saturating_sub(failed),
        t0.elapsed().as_secs_f64()
    );
    if failed > 0 {
        std::process::exit(1);
    }
}

async fn setup(pre: &Prerequisites) -> anyhow::Result<Suite> {
    let agent = cargo_binary("tessera-mig-manager", "tessera-mig-manager")?;
    let (cp, client) = ControlPlane::start().await?;
    let line = Keyring::generate_line("e2e-1")?;
    let keys = Keyring::parse(&line)?;
    let key_file = cp.dir().join("assignment-keys");
    std::fs::write(&key_file, format!("{line}\n"))?;
    let cfg = NodeConfig {
        kubeconfig: cp.kubeconfig.clone(),
        agent_kubeconfig: None,
        agent,
        assignment_keys: key_file,
        fake_gpus: FAKE_GPUS.into(),
        agent_args: Vec::new(),
    };
    let node = KubeletNode::start(pre, &cfg, &client).await?;

    // Two MIG instances on the MIG GPU, as the scheduler would ask through GpuNode spec.
    let gns: Api<GpuNode> = Api::all(client.clone());
    let spec = json!({"spec": {"gpus": [{"index": MIG_GPU, "mode": "mig", "instances": [
        {"profile": "3g.40gb", "start": 0}, {"profile": "3g.40gb", "start": 4}]}]}});
    gns.patch(NODE_NAME, &PatchParams::default(), &Patch::Merge(&spec)).await.context("GpuNode spec")?;
    let until = Instant::now() + Duration::from_secs(60);
    let devices = loop {
        let gn = gns.get(NODE_NAME).await?;
        let status = gn.status.unwrap_or_default();
        let mut devices = Vec::new();
        for g in &status.gpus {
            if g.index == MIG_GPU {
                for i in g.instances.iter().filter(|i| !i.uuid.is_empty()) {
                    devices.push(AssignedDevice {
                        gpu: g.uuid.clone(),
                        index: g.index,
                        profile: Some(i.profile.clone()),
                        start: Some(i.start),
                        mig: Some(i.uuid.clone()),
                        share: None,
                    });
                }
            } else {
                devices.push(AssignedDevice {
                    gpu: g.uuid.clone(),
                    index: g.index,
                    profile: None,
                    start: None,
                    mig: None,
                    share: None,
                });
            }
        }
        if devices.len() == 6 {
            break devices;
        }
        ensure!(Instant::now() < until, "the agent did not create the MIG instances: GpuNode status {status:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    Ok(Suite { client, keys, devices, node: std::sync::Mutex::new(node), _cp: cp })
}

/// The UUID a container must see for `d`.
fn visible(d: &AssignedDevice) -> String {
    d.mig.clone().unwrap_or_else(|| d.gpu.clone())
}

fn gpu_pod(name: &str, extra: serde_json::Value) -> anyhow::Result<Pod> {
    let mut pod = json!({
        "metadata": {"name": name, "labels": {"tessera.dev/e2e": "kubelet"}},
        "spec": {
            "schedulerName": "tessera",
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 0,
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
    Ok(serde_json::from_value(pod)?)
}

fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
    match (a, b) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

/// Creates a pod and binds it to the node with a signed assignment of `device`, as tessera's
/// binder does (the Binding's annotations land on the pod).
async fn create_and_bind(s: &Suite, name: &str, device: &AssignedDevice) -> anyhow::Result<String> {
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), NS);
    let pod = pods
        .create(&PostParams::default(), &gpu_pod(name, json!({}))?)
        .await
        .with_context(|| format!("creating {name}"))?;
    let uid = pod.metadata.uid.context("pod without UID")?;
    let ann = Assignment { node: NODE_NAME.into(), devices: vec![device.clone()] }.to_annotation();
    let binding = json!({
        "apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": name, "annotations": {ASSIGNMENT: ann, ASSIGNMENT_SIGNATURE: s.keys.sign(&uid, NODE_NAME, &ann)}},
        "target": {"apiVersion": "v1", "kind": "Node", "name": NODE_NAME}
    });
    let req = http_post(&format!("/api/v1/namespaces/{NS}/pods/{name}/binding"), &binding)?;
    s.client.request_text(req).await.with_context(|| format!("binding {name}"))?;
    Ok(uid)
}

fn http_post(path: &str, body: &serde_json::Value) -> anyhow::Result<http::Request<Vec<u8>>> {
    Ok(http::Request::post(path).header("content-type", "application/json").body(serde_json::to_vec(body)?)?)
}

/// Waits until the pod's container has run to completion and returns its log.
async fn finished_log(pods: &Api<Pod>, name: &str, timeout: Duration) -> anyhow::Result<String> {
    let until = Instant::now() + timeout;
    loop {
        let p = pods.get(name).await?;
        let st = p.status.unwrap_or_default();
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
    let log = pods.logs(name, &Default::default()).await.with_context(|| format!("logs of {name}"))?;
    Ok(log)
}

fn printed(log: &str) -> Option<&str> {
    log.lines().find_map(|l| l.strip_prefix("NVIDIA_VISIBLE_DEVICES=")).map(str::trim)
}

async fn delete_all(pods: &Api<Pod>) -> anyhow::Result<()> {
    let lp = ListParams::default().labels("tessera.dev/e2e=kubelet");
    pods.delete_collection(&DeleteParams { grace_period_seconds: Some(0), ..Default::default() }, &lp).await?;
    let until = Instant::now() + Duration::from_secs(60);
    while !pods.list(&lp).await?.items.is_empty() {
        ensure!(Instant::now() < until, "pods not gone after 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn signed_assignment_reaches_the_container(s: &Suite) -> anyhow::Result<String> {
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), NS);
    let whole = &s.devices[0];
    let mig = s.devices.iter().find(|d| d.mig.is_some()).context("no MIG device")?;
    let mut notes = Vec::new();
    for (name, d) in [("whole-gpu", whole), ("mig-instance", mig)] {
        let t = Instant::now();
        create_and_bind(s, name, d).await?;
        let log = finished_log(&pods, name, Duration::from_secs(60)).await?;
        let want = visible(d);
        ensure!(printed(&log) == Some(want.as_str()), "{name} printed {log:?}, its assignment is {want}");
        notes.push(format!("{name}: {want} in {:.1} s", t.elapsed().as_secs_f64()));
    }
    delete_all(&pods).await?;
    Ok(notes.join(", "))
}

/// A small deterministic shuffle (no RNG dependency): round `r`'s permutation of `n` items.
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

async fn concurrent_binds_never_swap_devices(s: &Suite) -> anyhow::Result<String> {
    let rounds: u64 = std::env::var("TESSERA_E2E_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), NS);
    let t0 = Instant::now();
    let mut wrong = Vec::new();
    let mut checked = 0usize;
    for r in 0..rounds {
        let order = permutation(s.devices.len(), r);
        // Create and bind every pod of the round at once: kubelet admits them together.
        let names: Vec<String> = (0..order.len()).map(|i| format!("r{r}-p{i}")).collect();
        try_join_all(names.iter().zip(&order).map(|(n, &d)| create_and_bind(s, n, &s.devices[d]))).await?;
        let logs = try_join_all(names.iter().map(|n| finished_log(&pods, n, Duration::from_secs(60)))).await?;
        for ((name, &d), log) in names.iter().zip(&order).zip(&logs) {
            // What the container saw against the annotation the pod carries.
            let pod = pods.get(name).await?;
            let ann = pod.metadata.annotations.unwrap_or_default();
            let a = Assignment::from_annotation(ann.get(ASSIGNMENT).map(String::as_str).unwrap_or_default())
                .with_context(|| format!("{name}: assignment annotation"))?;
            let want: Vec<String> = a.devices.iter().map(visible).collect();
            ensure!(want == [visible(&s.devices[d])], "{name} carries {want:?}, bound with {:?}", s.devices[d]);
            checked += 1;
            if printed(log) != Some(want[0].as_str()) {
                wrong.push(format!("{name}: saw {:?}, assigned {}", printed(log), want[0]));
            }
        }
        delete_all(&pods).await?;
        s.node.lock().map_err(|_| anyhow::anyhow!("node lock"))?.alive().map_err(anyhow::Error::msg)?;
    }
    let wall = t0.elapsed().as_secs_f64();
    ensure!(wrong.is_empty(), "{} of {checked} containers saw another device:\n{}", wrong.len(), wrong.join("\n"));
    Ok(format!(
        "{rounds} rounds x {} pods = {checked} containers, 0 saw another device; {wall:.1} s ({:.2} s/round)",
        s.devices.len(),
        wall / rounds.max(1) as f64
    ))
}

async fn forged_assignments_do_not_start(s: &Suite) -> anyhow::Result<String> {
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), NS);
    let victim = &s.devices[1];
    let ann = Assignment { node: NODE_NAME.into(), devices: vec![victim.clone()] }.to_annotation();
    // The node's key ID with another secret: what someone without the Secret can write.
    let forger = Keyring::parse(&Keyring::generate_line("e2e-1")?)?;
    // A genuine signed assignment, to be copied onto another pod.
    let genuine_uid = create_and_bind(s, "genuine", victim).await?;
    finished_log(&pods, "genuine", Duration::from_secs(60)).await?;
    let copied = pods.get("genuine").await?.metadata.annotations.unwrap_or_default();
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
        // Straight onto the node, annotations written by hand at creation: no scheduler involved.
        let pod = gpu_pod(
            name,
            json!({"metadata": {"annotations": annotations}, "spec": {"nodeName": NODE_NAME, "schedulerName": "default-scheduler"}}),
        )?;
        pods.create(&PostParams::default(), &pod).await?;
        let until = Instant::now() + Duration::from_secs(60);
        let (phase, message) = loop {
            let p = pods.get(name).await?;
            let st = p.status.unwrap_or_default();
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
        ensure!(pods.logs(name, &Default::default()).await.is_err(), "{name}: has a container log although refused");
        let events: Api<Event> = Api::namespaced(s.client.clone(), NS);
        let until = Instant::now() + Duration::from_secs(30);
        let event = loop {
            let list = events.list(&ListParams::default().fields(&format!("involvedObject.name={name}"))).await?;
            if let Some(e) = list.items.into_iter().find(|e| e.reason.as_deref() == Some("AssignmentRefused")) {
                break e;
            }
            ensure!(Instant::now() < until, "{name}: no AssignmentRefused event after 30 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let msg = event.message.unwrap_or_default();
        ensure!(msg.contains(&format!("refused the device assignment ({reason})")), "{name}: event says {msg:?}");
        notes.push(format!("{name}: {reason}"));
    }
    delete_all(&pods).await?;
    Ok(notes.join(", "))
}
