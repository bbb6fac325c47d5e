//! Opt-in end-to-end test: real `etcd`, `kube-apiserver` and `kube-scheduler` from
//! `$KUBEBUILDER_ASSETS` (the envtest layout), tessera-scheduler in live mode, fake GPU nodes
//! with `GpuNode` status, pods with `schedulerName: tessera`; checks each pod is bound where
//! tessera's assignment annotation says. Skips with one line when the variable is unset, and
//! fails under `CI=true` (the set-up provides the binaries there).
//!
//! Run: `KUBEBUILDER_ASSETS=/path/to/bin cargo test -p tessera-scheduler --test it e2e -- --nocapture`
//! (also needs `openssl` on PATH for the service-account key).

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt};
use serde_json::json;
use tessera_api::{GpuNode, PodGroup};
use tessera_scheduler::binder::KubeBinder;
use tessera_scheduler::cluster::Watch;
use tessera_scheduler::http::{App, Surface, serve};
use tessera_scheduler::state::{Scheduler, Settings};

/// A child process stopped with SIGTERM, then SIGKILL, when dropped.
struct Proc(Child, &'static str);

impl Drop for Proc {
    fn drop(&mut self) {
        println!("e2e: stopping {}", self.1);
        let pid = self.0.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        for _ in 0..50 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

fn spawn(bin: &Path, args: &[String], log: &Path, name: &'static str) -> Proc {
    let out = std::fs::File::create(log).unwrap();
    let err = out.try_clone().unwrap();
    let child = Command::new(bin)
        .args(args)
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
    Proc(child, name)
}

async fn until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("timed out waiting for {what}");
}

fn gpu_status(node: &str, mig: bool) -> serde_json::Value {
    let gpus: Vec<serde_json::Value> = (0..4)
        .map(|i| {
            json!({"index": i, "uuid": format!("GPU-{node}-{i}"), "product": "H100-80GB", "memoryMib": 81920,
                   "migCapable": true, "mode": if mig && i == 0 { "mig" } else { "full" }, "health": "Healthy",
                   "instances": if mig && i == 0 { json!([{"profile": "1g.10gb", "start": 0, "size": 1, "uuid": format!("MIG-{node}-0")}]) } else { json!([]) }})
        })
        .collect();
    json!({"gpus": gpus, "links": []})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_pods_are_bound_where_tessera_said() {
    let Some(assets) = std::env::var_os("KUBEBUILDER_ASSETS").map(PathBuf::from) else {
        // In CI the set-up provides the binaries: a missing folder is a failure, never a pass.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "KUBEBUILDER_ASSETS is not set under CI=true: run scripts/setup.sh (it unpacks the Kubernetes binaries)"
        );
        println!("skipping e2e: KUBEBUILDER_ASSETS is not set (a folder holding etcd, kube-apiserver, kube-scheduler)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (etcd_client, etcd_peer, api_port) = (free_port(), free_port(), free_port());

    let _etcd = spawn(
        &assets.join("etcd"),
        &[
            format!("--data-dir={}", d.join("etcd").display()),
            format!("--listen-client-urls=http://127.0.0.1:{etcd_client}"),
            format!("--advertise-client-urls=http://127.0.0.1:{etcd_client}"),
            format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
            "--unsafe-no-fsync=true".into(),
        ],
        &d.join("etcd.log"),
        "etcd",
    );

    let key = d.join("sa.key");
    let ok = Command::new("openssl").args(["genrsa", "-out"]).arg(&key).arg("2048").stderr(Stdio::null()).status();
    assert!(ok.is_ok_and(|s| s.success()), "openssl genrsa failed; the e2e test needs openssl");
    let token = "tessera-e2e-token";
    std::fs::write(d.join("tokens.csv"), format!("{token},admin,admin,system:masters\n")).unwrap();
    let _apiserver = spawn(
        &assets.join("kube-apiserver"),
        &[
            format!("--etcd-servers=http://127.0.0.1:{etcd_client}"),
            format!("--secure-port={api_port}"),
            "--bind-address=127.0.0.1".into(),
            format!("--cert-dir={}", d.join("certs").display()),
            format!("--token-auth-file={}", d.join("tokens.csv").display()),
            "--authorization-mode=RBAC".into(),
            format!("--service-account-key-file={}", key.display()),
            format!("--service-account-signing-key-file={}", key.display()),
            "--service-account-issuer=https://tessera.e2e".into(),
            "--service-cluster-ip-range=127.96.0.0/16".into(),
            "--disable-admission-plugins=ServiceAccount".into(),
        ],
        &d.join("apiserver.log"),
        "kube-apiserver",
    );
    let kubeconfig = d.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: https://127.0.0.1:{api_port}\n    insecure-skip-tls-verify: true\nusers:\n- name: admin\n  user:\n    token: {token}\ncontexts:\n- name: e2e\n  context: {{cluster: e2e, user: admin}}\ncurrent-context: e2e\n"
        ),
    )
    .unwrap();
    let kc = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap();
    let client = Client::try_from(config).unwrap();
    until("kube-apiserver", Duration::from_secs(60), || {
        let c = client.clone();
        async move { c.apiserver_version().await.is_ok() }
    })
    .await;

    // CRDs, namespace, its default ServiceAccount.
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    crds.create(&PostParams::default(), &GpuNode::crd()).await.unwrap();
    crds.create(&PostParams::default(), &PodGroup::crd()).await.unwrap();
    let ns: Api<Namespace> = Api::all(client.clone());
    ns.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "ml"}})).unwrap())
        .await
        .unwrap();
    let sa: Api<ServiceAccount> = Api::namespaced(client.clone(), "ml");
    sa.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "default"}})).unwrap())
        .await
        .unwrap();
    until("GpuNode CRD", Duration::from_secs(30), || {
        let c = client.clone();
        async move { Api::<GpuNode>::all(c).list(&Default::default()).await.is_ok() }
    })
    .await;

    // Two fake GPU nodes, no taints, Ready, with GpuNode status as the node agent writes it.
    let nodes: Api<Node> = Api::all(client.clone());
    let gns: Api<GpuNode> = Api::all(client.clone());
    for (name, mig) in [("gpu-a", true), ("gpu-b", false)] {
        nodes
            .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap())
            .await
            .unwrap();
        let status = json!({"status": {
            "capacity": {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": "4", "tessera.dev/gpu": "16"},
            "allocatable": {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": "4", "tessera.dev/gpu": "16"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "e2e", "message": "fake node"}]
        }});
        nodes.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
        // Admission gives a new node the `node.kubernetes.io/not-ready` taint; with no kubelet to
        // lift it, the test does, or kube-scheduler's TaintToleration refuses every pod.
        nodes.patch(name, &PatchParams::default(), &Patch::Merge(&json!({"spec": {"taints": null}}))).await.unwrap();
        let gn: GpuNode = serde_json::from_value(json!({"apiVersion": "tessera.dev/v1alpha1", "kind": "GpuNode", "metadata": {"name": name}, "spec": {"gpus": []}})).unwrap();
        gns.create(&PostParams::default(), &gn).await.unwrap();
        gns.patch_status(name, &PatchParams::default(), &Patch::Merge(&json!({"status": gpu_status(name, mig)})))
            .await
            .unwrap();
    }

    // A stand-in node agent: reports in status whatever MIG layout the scheduler writes in spec.
    let agent = gns.clone();
    tokio::spawn(async move {
        loop {
            if let Ok(list) = agent.list(&Default::default()).await {
                for gn in list.items {
                    let Some(name) = gn.metadata.name.clone() else { continue };
                    let Some(mut status) = gn.status.clone() else { continue };
                    let mut changed = false;
                    for want in &gn.spec.gpus {
                        let Some(g) = status.gpus.iter_mut().find(|g| g.index == want.index) else { continue };
                        let instances: Vec<tessera_api::gpunode::MigInstanceStatus> = want
                            .instances
                            .iter()
                            .map(|i| tessera_api::gpunode::MigInstanceStatus {
                                profile: i.profile.clone(),
                                start: i.start,
                                size: 0,
                                uuid: format!("MIG-{name}-{}-{}", want.index, i.start),
                            })
                            .collect();
                        if g.mode != want.mode || g.instances != instances {
                            g.mode = want.mode;
                            g.instances = instances;
                            changed = true;
                        }
                    }
                    if changed {
                        let _ = agent
                            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&json!({"status": status})))
                            .await;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });

    // tessera-scheduler, live, in this process.
    let watch = Watch::start(&client);
    let sched = Arc::new(Scheduler::new(
        tessera_core::Snapshot::default(),
        tessera_core::policy::by_name("tessera").unwrap(),
        Arc::new(KubeBinder::new(client.clone())),
        Arc::new(watch.lookup()),
        Settings { mode: "live", mig_timeout: Duration::from_secs(5), ..Settings::default() },
    ));
    sched.set_synced(false);
    tokio::spawn(watch.sync(sched.clone(), Duration::from_millis(50)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ext: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, App::new(sched.clone(), Surface::ALL), std::future::pending()));
    until("tessera sync", Duration::from_secs(30), || {
        let s = sched.clone();
        async move { s.is_ready() }
    })
    .await;

    // kube-scheduler with a `tessera` profile calling the extender.
    let cfg = d.join("scheduler.yaml");
    std::fs::write(
        &cfg,
        format!(
            "apiVersion: kubescheduler.config.k8s.io/v1\nkind: KubeSchedulerConfiguration\nclientConnection:\n  kubeconfig: {kc}\nleaderElection:\n  leaderElect: false\npercentageOfNodesToScore: 100\nprofiles:\n- schedulerName: tessera\nextenders:\n- urlPrefix: http://{ext}\n  filterVerb: filter\n  prioritizeVerb: prioritize\n  bindVerb: bind\n  preemptVerb: preempt\n  weight: 5\n  httpTimeout: 10s\n  nodeCacheCapable: true\n  managedResources:\n  - name: tessera.dev/gpu\n    ignoredByScheduler: true\n  - name: nvidia.com/gpu\n",
            kc = kubeconfig.display()
        ),
    )
    .unwrap();
    let _scheduler = spawn(
        &assets.join("kube-scheduler"),
        &[
            format!("--config={}", cfg.display()),
            format!("--kubeconfig={}", kubeconfig.display()),
            "--secure-port=0".into(),
        ],
        &d.join("kube-scheduler.log"),
        "kube-scheduler",
    );

    let pods: Api<Pod> = Api::namespaced(client.clone(), "ml");
    let specs = [
        ("embed-0", json!({"tessera.dev/gpu": "1"}), json!({"tessera.dev/gpu-memory": "4Gi"})),
        ("vlm-0", json!({"tessera.dev/gpu": "1"}), json!({"tessera.dev/gpus": "2"})),
        ("legacy-0", json!({"nvidia.com/gpu": "1"}), json!({})),
    ];
    for (name, limits, annotations) in &specs {
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": annotations},
            "spec": {"schedulerName": "tessera", "containers": [{"name": "c", "image": "busybox",
                     "resources": {"limits": limits, "requests": limits}}]}
        }))
        .unwrap();
        pods.create(&PostParams::default(), &p).await.unwrap();
    }
    for (name, _, _) in &specs {
        until(&format!("pod {name} bound"), Duration::from_secs(60), || {
            let pods = pods.clone();
            async move { pods.get(name).await.ok().and_then(|p| p.spec.and_then(|s| s.node_name)).is_some() }
        })
        .await;
        let p = pods.get(name).await.unwrap();
        let node = p.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap();
        let ann = p.metadata.annotations.unwrap_or_default();
        let a = tessera_api::Assignment::from_annotation(&ann["tessera.dev/assignment"]).unwrap();
        assert_eq!(a.node, node, "pod {name} is on {node} but tessera assigned {}", a.node);
        println!("e2e: {name} bound to {node} with {} device(s)", a.devices.len());
    }
}
