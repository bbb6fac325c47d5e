//! One cluster per test: its own etcd and kube-apiserver on free loopback ports, the manifests'
//! CRDs and RBAC, fake nodes, tessera-scheduler replicas each beside its own kube-scheduler, one
//! node agent per node, and kube-controller-manager when the test needs workload controllers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use k8s_openapi::api::core::v1::{Event, Node, Pod, Secret, ServiceAccount};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Config};
use serde_json::{Value, json};
use tessera_api::signing::Keyring;
use tessera_api::{Assignment, GpuNode, annotations as ann};

use crate::apply::{self, Applied};
use crate::bins::Bins;
use crate::pki::Pki;
use crate::proc::{Proc, free_port};
use crate::repo_root;
use crate::wait::until;

/// The namespace the manifests install tessera into.
pub const SYSTEM_NS: &str = "tessera-system";
const KEYS_SECRET: &str = "tessera-assignment-keys";

/// A fake GPU node: a Node with a `Ready` condition and no taints, and a tessera-mig-manager
/// with the fake backend.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub name: String,
    /// `--fake-gpus`, e.g. `h100x4:mig`.
    pub fake_gpus: String,
    /// Extra allocatable (and capacity) entries, e.g. `nvidia.com/gpu: 4`, as NVIDIA's device
    /// plugin would advertise them.
    pub resources: Vec<(String, String)>,
    pub labels: Vec<(String, String)>,
    /// The agent is not started with the cluster: the test starts it ([`Cluster::start_agent`]).
    pub late_agent: bool,
}

impl NodeSpec {
    pub fn new(name: &str, fake_gpus: &str) -> Self {
        Self {
            name: name.into(),
            fake_gpus: fake_gpus.into(),
            resources: Vec::new(),
            labels: Vec::new(),
            late_agent: false,
        }
    }
    pub fn late_agent(mut self) -> Self {
        self.late_agent = true;
        self
    }
    pub fn resource(mut self, name: &str, quantity: &str) -> Self {
        self.resources.push((name.into(), quantity.into()));
        self
    }
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.push((key.into(), value.into()));
        self
    }
}

/// What a test's cluster runs.
#[derive(Debug, Clone)]
pub struct Options {
    pub nodes: Vec<NodeSpec>,
    /// kube-controller-manager (Deployments, Jobs, StatefulSets, garbage collection).
    pub controller_manager: bool,
    /// tessera-scheduler replicas, each with its own kube-scheduler; they elect a leader through
    /// the manifests' Lease.
    pub replicas: usize,
    /// Extra namespaces (with their `default` ServiceAccount).
    pub namespaces: Vec<String>,
    /// Extra tessera-scheduler flags.
    pub tessera_args: Vec<String>,
    /// kube-scheduler's API client limits (`clientConnection.qps`, burst twice it); `None`
    /// keeps its defaults (50 QPS), as the manifests do.
    pub scheduler_qps: Option<u32>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            nodes: Vec::new(),
            controller_manager: false,
            replicas: 1,
            namespaces: Vec::new(),
            tessera_args: Vec::new(),
            scheduler_qps: None,
        }
    }
}

/// Ports of one tessera-scheduler replica.
#[derive(Debug, Clone)]
pub struct Replica {
    pub hostname: String,
    pub verbs_port: u16,
    pub read_port: u16,
}

/// A running cluster; everything it started is stopped when it is dropped.
pub struct Cluster {
    pub dir: PathBuf,
    pub bins: Bins,
    pub client: Client,
    pub admin_kubeconfig: PathBuf,
    pub scheduler_kubeconfig: PathBuf,
    pub agent_kubeconfig: PathBuf,
    pub keys_file: PathBuf,
    pub replicas: Vec<Replica>,
    /// Warnings the API server gave while the CRDs were applied.
    pub crd_warnings: Vec<String>,
    opts: Options,
    reaper: Option<tokio::task::JoinHandle<()>>,
    procs: Mutex<BTreeMap<String, Proc>>,
    /// Start order, for stopping in reverse.
    order: Mutex<Vec<String>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("dir", &self.dir).field("replicas", &self.replicas).finish_non_exhaustive()
    }
}

fn kubeconfig(server: &str, ca_pem: &str, user: Value) -> String {
    let doc = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {"server": server, "certificate-authority-data": B64.encode(ca_pem)}}],
        "users": [{"name": "e2e", "user": user}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "e2e"}}],
        "current-context": "e2e",
    });
    serde_yaml::to_string(&doc).unwrap_or_default()
}

/// This machine's hostname (kube-scheduler prefixes its Lease identity with it).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_owned()).unwrap_or_default()
}

impl Cluster {
    /// Starts everything in `opts`, logging into `dir` (one `*.log` per process).
    pub async fn start(bins: &Bins, dir: &Path, opts: Options) -> Result<Self> {
        let pki = Pki::write(dir)?;
        let (etcd_client, etcd_peer, api_port) = (free_port()?, free_port()?, free_port()?);
        let mut procs = BTreeMap::new();
        let mut order = Vec::new();
        let mut add = |p: Proc| {
            order.push(p.name.clone());
            procs.insert(p.name.clone(), p);
        };
        add(Proc::spawn(
            "etcd",
            &bins.etcd,
            &[
                format!("--data-dir={}", dir.join("etcd-data").display()),
                format!("--listen-client-urls=http://127.0.0.1:{etcd_client}"),
                format!("--advertise-client-urls=http://127.0.0.1:{etcd_client}"),
                format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"),
                format!("--initial-cluster=default=http://127.0.0.1:{etcd_peer}"),
                "--unsafe-no-fsync=true".into(),
            ],
            &[],
            &dir.join("etcd.log"),
        )?);
        add(Proc::spawn(
            "kube-apiserver",
            &bins.kube_apiserver,
            &[
                format!("--etcd-servers=http://127.0.0.1:{etcd_client}"),
                format!("--secure-port={api_port}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--cert-dir={}", dir.join("apiserver-certs").display()),
                format!("--tls-cert-file={}", pki.serving_cert.display()),
                format!("--tls-private-key-file={}", pki.serving_key.display()),
                format!("--client-ca-file={}", pki.ca_cert.display()),
                "--authorization-mode=Node,RBAC".into(),
                format!("--service-account-key-file={}", pki.sa_pub.display()),
                format!("--service-account-signing-key-file={}", pki.sa_key.display()),
                "--service-account-issuer=https://kubernetes.default.svc".into(),
                "--service-cluster-ip-range=127.96.0.0/16".into(),
                "--endpoint-reconciler-type=none".into(),
                "--kubelet-preferred-address-types=InternalIP,Hostname".into(),
            ],
            &[],
            &dir.join("kube-apiserver.log"),
        )?);
        let server = format!("https://127.0.0.1:{api_port}");
        let admin_kubeconfig = dir.join("admin.kubeconfig");
        std::fs::write(
            &admin_kubeconfig,
            kubeconfig(
                &server,
                &pki.ca_pem,
                json!({"client-certificate-data": B64.encode(&pki.admin_cert_pem), "client-key-data": B64.encode(&pki.admin_key_pem)}),
            ),
        )?;
        let client = client_for(&admin_kubeconfig).await?;
        let mut cluster = Self {
            dir: dir.to_owned(),
            bins: bins.clone(),
            client: client.clone(),
            admin_kubeconfig,
            scheduler_kubeconfig: dir.join("tessera-scheduler.kubeconfig"),
            agent_kubeconfig: dir.join("tessera-mig-manager.kubeconfig"),
            keys_file: dir.join("assignment-keys"),
            replicas: Vec::new(),
            crd_warnings: Vec::new(),
            opts: opts.clone(),
            reaper: None,
            procs: Mutex::new(procs),
            order: Mutex::new(order),
        };
        until("kube-apiserver /readyz", Duration::from_secs(90), || {
            let c = client.clone();
            async move {
                let req = http::Request::get("/readyz").body(Vec::new())?;
                Ok(c.request_text(req).await.ok().filter(|t| t.trim() == "ok"))
            }
        })
        .await?;

        // The manifests, read now (never a copy): namespace, CRDs, RBAC, the empty key Secret.
        let base = repo_root().join("manifests/base");
        for f in ["namespace.yaml", "rbac-scheduler.yaml", "rbac-mig-manager.yaml", "assignment-keys.yaml"] {
            cluster.apply_file(&base.join(f)).await?;
        }
        let crds = repo_root().join("manifests/crds");
        for f in ["gpunodes.tessera.dev.yaml", "podgroups.scheduling.x-k8s.io.yaml"] {
            for a in cluster.apply_file(&crds.join(f)).await? {
                cluster.crd_warnings.extend(a.warnings);
            }
        }
        let mut namespaces = vec!["default".to_owned(), SYSTEM_NS.to_owned()];
        namespaces.extend(opts.namespaces.iter().cloned());
        for ns in &namespaces {
            cluster.ensure_namespace(ns).await?;
        }
        // ServiceAccount tokens: tessera runs as the manifests' ServiceAccounts, with their RBAC.
        let token = cluster.sa_token("tessera-scheduler").await?;
        std::fs::write(&cluster.scheduler_kubeconfig, kubeconfig(&server, &pki.ca_pem, json!({"token": token})))?;
        let token = cluster.sa_token("tessera-mig-manager").await?;
        std::fs::write(&cluster.agent_kubeconfig, kubeconfig(&server, &pki.ca_pem, json!({"token": token})))?;
        until("the GpuNode and PodGroup CRDs to be served", Duration::from_secs(30), || {
            let c = client.clone();
            async move {
                let a = Api::<GpuNode>::all(c.clone()).list(&ListParams::default().limit(1)).await.is_ok();
                let b = Api::<tessera_api::PodGroup>::all(c).list(&ListParams::default().limit(1)).await.is_ok();
                Ok((a && b).then_some(()))
            }
        })
        .await?;

        for n in &opts.nodes {
            cluster.create_node(n).await?;
        }
        if opts.controller_manager {
            cluster.start_controller_manager()?;
        }
        // An empty key file: the scheduler generates the key into the Secret on first start, as
        // on a first install; copy_keys then plays kubelet's part of updating the mounted file.
        std::fs::write(&cluster.keys_file, "")?;
        for i in 0..opts.replicas.max(1) {
            let replica = Replica {
                hostname: if i == 0 { hostname() } else { format!("tessera-e2e-{i}") },
                verbs_port: free_port()?,
                read_port: free_port()?,
            };
            cluster.replicas.push(replica);
        }
        for i in 0..cluster.replicas.len() {
            cluster.start_tessera(i)?;
        }
        cluster.copy_keys().await?;
        for i in 0..cluster.replicas.len() {
            cluster.start_kube_scheduler(i)?;
        }
        for n in opts.nodes.iter().filter(|n| !n.late_agent) {
            cluster.start_agent(n)?;
        }
        for n in opts.nodes.iter().filter(|n| !n.late_agent) {
            cluster.wait_gpunode(&n.name).await?;
        }
        for i in 0..cluster.replicas.len() {
            cluster.wait_tessera_ready(i).await?;
            cluster.wait_tessera_sees_gpus(i).await?;
        }
        cluster.reaper = Some(tokio::spawn(reap(client.clone())));
        Ok(cluster)
    }

    pub async fn apply_file(&self, path: &Path) -> Result<Vec<Applied>> {
        apply::apply_file(&self.client, path).await
    }

    /// A namespace and its `default` ServiceAccount (no controller creates it without
    /// kube-controller-manager).
    pub async fn ensure_namespace(&self, ns: &str) -> Result<()> {
        let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
        apply::apply(&self.client, &obj).await?;
        let sa: Api<ServiceAccount> = Api::namespaced(self.client.clone(), ns);
        let obj = apply::typed(json!({"metadata": {"name": "default"}}))?;
        match sa.create(&PostParams::default(), &obj).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e).context("creating the default ServiceAccount"),
        }
    }

    async fn sa_token(&self, name: &str) -> Result<String> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), SYSTEM_NS);
        let body = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                          "spec": {"expirationSeconds": 86400}});
        let tr: Value = api
            .create_subresource("token", name, &PostParams::default(), &body)
            .await
            .with_context(|| format!("a token for ServiceAccount {SYSTEM_NS}/{name}"))?;
        tr["status"]["token"].as_str().map(str::to_owned).ok_or_else(|| anyhow!("TokenRequest without a token"))
    }

    /// Creates the Node object of `n` (Ready, untainted, its resources allocatable) without
    /// starting an agent for it: tessera then sees it through GPU Feature Discovery labels.
    pub async fn create_node(&self, n: &NodeSpec) -> Result<()> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let mut labels: serde_json::Map<String, Value> =
            n.labels.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
        labels.insert("kubernetes.io/hostname".into(), n.name.clone().into());
        labels.insert("tessera.dev/gpu-node".into(), "true".into());
        nodes
            .create(&PostParams::default(), &apply::typed(json!({"metadata": {"name": n.name, "labels": labels}}))?)
            .await
            .with_context(|| format!("creating node {}", n.name))?;
        let mut res = serde_json::Map::new();
        for (k, v) in [("cpu", "64"), ("memory", "512Gi"), ("pods", "110"), ("tessera.dev/gpu", "64")] {
            res.insert(k.into(), v.into());
        }
        for (k, v) in &n.resources {
            res.insert(k.clone(), v.clone().into());
        }
        let status = json!({"status": {
            "capacity": res, "allocatable": res,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "fake node of the e2e suite"}],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": n.name}],
        }});
        nodes.patch_status(&n.name, &PatchParams::default(), &Patch::Merge(&status)).await?;
        // Admission gives a new node the not-ready taint; with no kubelet to lift it, we do.
        nodes.patch(&n.name, &PatchParams::default(), &Patch::Merge(&json!({"spec": {"taints": null}}))).await?;
        Ok(())
    }

    fn spawn(&self, p: Proc) {
        let mut procs = self.procs.lock().unwrap_or_else(|e| e.into_inner());
        let mut order = self.order.lock().unwrap_or_else(|e| e.into_inner());
        order.retain(|n| n != &p.name);
        order.push(p.name.clone());
        procs.insert(p.name.clone(), p);
    }

    /// Starts kube-controller-manager now (for a test that wants its controllers only later).
    pub fn start_controller_manager(&self) -> Result<()> {
        let args = vec![
            format!("--kubeconfig={}", self.admin_kubeconfig.display()),
            "--leader-elect=false".into(),
            "--controllers=*,-node-lifecycle-controller".into(),
            "--secure-port=0".into(),
            format!("--root-ca-file={}", self.dir.join("ca.crt").display()),
            format!("--service-account-private-key-file={}", self.dir.join("sa.key").display()),
            "--use-service-account-credentials=false".into(),
            "--concurrent-gc-syncs=5".into(),
        ];
        let p = Proc::spawn(
            "kube-controller-manager",
            &self.bins.kube_controller_manager,
            &args,
            &[],
            &self.dir.join("kube-controller-manager.log"),
        )?;
        self.spawn(p);
        Ok(())
    }

    /// Name of replica `i`'s tessera-scheduler process.
    pub fn tessera_name(i: usize) -> String {
        format!("tessera-scheduler-{i}")
    }

    /// Starts (or restarts) tessera-scheduler replica `i` with the Deployment's flags.
    pub fn start_tessera(&self, i: usize) -> Result<()> {
        let r = &self.replicas[i];
        let mut args = vec![
            format!("--listen=127.0.0.1:{}", r.verbs_port),
            format!("--read-listen=127.0.0.1:{}", r.read_port),
            format!("--lease-namespace={SYSTEM_NS}"),
            "--lease-name=tessera-scheduler".into(),
            format!("--hostname={}", r.hostname),
            "--mig-timeout-secs=30".into(),
            "--http-timeout-secs=45".into(),
            format!("--assignment-keys={}", self.keys_file.display()),
            format!("--assignment-keys-secret={SYSTEM_NS}/{KEYS_SECRET}"),
        ];
        args.extend(self.opts.tessera_args.iter().cloned());
        let name = Self::tessera_name(i);
        self.spawn_tessera_bin(&name, &self.bins.tessera_scheduler, &args, &self.scheduler_kubeconfig)
    }

    /// Starts one of this workspace's binaries as `name`, with `kubeconfig`, logging to `name.log`.
    fn spawn_tessera_bin(&self, name: &str, bin: &Path, args: &[String], kubeconfig: &Path) -> Result<()> {
        let env =
            [("KUBECONFIG", kubeconfig.display().to_string()), ("RUST_LOG", rust_log()), ("NO_COLOR", "1".into())];
        let p = Proc::spawn(name, bin, args, &env, &self.dir.join(format!("{name}.log")))?;
        self.spawn(p);
        Ok(())
    }

    /// kube-scheduler replica `i`, with the KubeSchedulerConfiguration of
    /// manifests/base/scheduler-config.yaml: only the extender's urlPrefix and the kubeconfig
    /// change. Replicas after the first get their own hostname (`unshare --uts`), which
    /// prefixes their Lease identity as a pod's name would.
    /// Starts (or starts again) replica `i`'s kube-scheduler with the manifests' configuration.
    pub fn start_kube_scheduler(&self, i: usize) -> Result<()> {
        let r = &self.replicas[i];
        let path = repo_root().join("manifests/base/scheduler-config.yaml");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let mut cfg: serde_yaml::Value = serde_yaml::from_str(&text)?;
        let ext = cfg
            .get_mut("extenders")
            .and_then(|e| e.get_mut(0))
            .ok_or_else(|| anyhow!("{} has no extenders[0]", path.display()))?;
        ext["urlPrefix"] = format!("http://127.0.0.1:{}", r.verbs_port).into();
        let map = cfg.as_mapping_mut().ok_or_else(|| anyhow!("{} is not a mapping", path.display()))?;
        map.insert("clientConnection".into(), self.client_connection());
        let rendered = self.dir.join(format!("kube-scheduler-{i}.yaml"));
        std::fs::write(&rendered, serde_yaml::to_string(&cfg)?)?;
        let args = vec![format!("--config={}", rendered.display()), "--secure-port=0".into(), "--v=2".into()];
        let name = format!("kube-scheduler-{i}");
        let log = self.dir.join(format!("{name}.log"));
        let p = if i == 0 {
            Proc::spawn(&name, &self.bins.kube_scheduler, &args, &[], &log)?
        } else {
            let script = format!("hostname {} && exec \"$0\" \"$@\"", r.hostname);
            let mut full = vec!["--uts".to_owned(), "sh".into(), "-c".into(), script];
            full.push(self.bins.kube_scheduler.display().to_string());
            full.extend(args);
            Proc::spawn(&name, Path::new("unshare"), &full, &[], &log)?
        };
        self.spawn(p);
        Ok(())
    }

    fn client_connection(&self) -> serde_yaml::Value {
        let mut cc = serde_yaml::Mapping::new();
        cc.insert("kubeconfig".into(), self.scheduler_kubeconfig.display().to_string().into());
        if let Some(qps) = self.opts.scheduler_qps {
            cc.insert("qps".into(), qps.into());
            cc.insert("burst".into(), (2 * qps).into());
        }
        serde_yaml::Value::Mapping(cc)
    }

    /// A second kube-scheduler, without the extender, whose one profile `scheduler_name` keeps
    /// kube-scheduler's default plugins (the baseline of the throughput benchmark). Same binary,
    /// same client limits and `percentageOfNodesToScore` as tessera's.
    pub fn start_plain_kube_scheduler(&self, scheduler_name: &str) -> Result<()> {
        let cfg = serde_yaml::to_string(&json!({
            "apiVersion": "kubescheduler.config.k8s.io/v1",
            "kind": "KubeSchedulerConfiguration",
            "leaderElection": {"leaderElect": false},
            "percentageOfNodesToScore": 100,
            "profiles": [{"schedulerName": scheduler_name}],
        }))?;
        let mut doc: serde_yaml::Value = serde_yaml::from_str(&cfg)?;
        if let Some(map) = doc.as_mapping_mut() {
            map.insert("clientConnection".into(), self.client_connection());
        }
        let name = format!("kube-scheduler-{scheduler_name}");
        let rendered = self.dir.join(format!("{name}.yaml"));
        std::fs::write(&rendered, serde_yaml::to_string(&doc)?)?;
        let args = vec![format!("--config={}", rendered.display()), "--secure-port=0".into(), "--v=1".into()];
        let p = Proc::spawn(&name, &self.bins.kube_scheduler, &args, &[], &self.dir.join(format!("{name}.log")))?;
        self.spawn(p);
        Ok(())
    }

    /// Name of node `node`'s agent process.
    pub fn agent_name(node: &str) -> String {
        format!("tessera-mig-manager-{node}")
    }

    /// Starts the node agent of `n` (for a node made with [`NodeSpec::late_agent`]).
    pub fn start_agent(&self, n: &NodeSpec) -> Result<()> {
        let name = Self::agent_name(&n.name);
        let args = vec![
            format!("--node-name={}", n.name),
            "--backend=fake".into(),
            format!("--fake-gpus={}", n.fake_gpus),
            // No kubelet here: nothing would dial the device plugin or answer PodResources.
            "--no-device-plugin".into(),
            "--no-pod-resources".into(),
            format!("--assignment-keys={}", self.keys_file.display()),
            format!("--metrics-addr=127.0.0.1:{}", free_port()?),
            "--resync-secs=2".into(),
        ];
        self.spawn_tessera_bin(&name, &self.bins.mig_manager, &args, &self.agent_kubeconfig)
    }

    /// Waits for the scheduler to generate the signing key into the Secret, then writes it to
    /// the key file every component reads (kubelet's update of the mounted Secret).
    async fn copy_keys(&self) -> Result<()> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), SYSTEM_NS);
        let text = until("tessera-scheduler to generate the assignment key", Duration::from_secs(60), || {
            let api = api.clone();
            async move {
                let s = api.get(KEYS_SECRET).await?;
                Ok(s.data.and_then(|d| d.get("keys").map(|b| String::from_utf8_lossy(&b.0).into_owned())))
            }
        })
        .await?;
        Keyring::parse(&text).map_err(|e| anyhow!("the generated key file does not parse: {e}"))?;
        let tmp = self.keys_file.with_extension("tmp");
        std::fs::write(&tmp, &text)?;
        std::fs::rename(&tmp, &self.keys_file)?;
        Ok(())
    }

    /// The keys as the agents read them.
    pub fn keyring(&self) -> Result<Keyring> {
        Keyring::load(&self.keys_file).map_err(|e| anyhow!("{e}"))
    }

    pub async fn wait_gpunode(&self, node: &str) -> Result<()> {
        let api: Api<GpuNode> = Api::all(self.client.clone());
        until(&format!("GpuNode {node} status from its agent"), Duration::from_secs(60), || {
            let api = api.clone();
            async move { Ok(api.get_opt(node).await?.and_then(|g| g.status).filter(|s| !s.gpus.is_empty()).map(|_| ())) }
        })
        .await
    }

    /// Waits for replica `i`'s /readyz (it has synced the cluster).
    pub async fn wait_tessera_ready(&self, i: usize) -> Result<()> {
        let port = self.replicas[i].read_port;
        until(&format!("tessera-scheduler-{i} /readyz"), Duration::from_secs(60), || async move {
            Ok(http_get(port, "/readyz").await.ok().filter(|(code, _)| *code == 200).map(|_| ()))
        })
        .await
    }

    /// Waits until replica `i`'s state (`/api/v1/cluster`) has every node with the GPUs its agent
    /// reported: /readyz only says the first lists are in, which may predate the agents' GpuNodes.
    pub async fn wait_tessera_sees_gpus(&self, i: usize) -> Result<()> {
        let port = self.replicas[i].read_port;
        let want: Vec<String> = self.opts.nodes.iter().filter(|n| !n.late_agent).map(|n| n.name.clone()).collect();
        let want = &want;
        let t0 = std::time::Instant::now();
        until(&format!("tessera-scheduler-{i} to see every node's GPUs"), Duration::from_secs(60), || async move {
            let (code, body) = http_get(port, "/api/v1/cluster").await?;
            ensure!(code == 200, "/api/v1/cluster answered {code}");
            let v: Value = serde_json::from_str(&body)?;
            let seen: Vec<String> = v["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                // GPUs with UUIDs come from the agent's GpuNode; without, only from a node's
                // GPU Feature Discovery labels, which the agent's report then replaces.
                .filter(|n| {
                    n["gpus"].as_array().is_some_and(|g| {
                        !g.is_empty() && g.iter().all(|g| g["uuid"].as_str().is_some_and(|u| !u.is_empty()))
                    })
                })
                .filter_map(|n| n["name"].as_str().map(str::to_owned))
                .collect();
            if want.iter().all(|w| seen.contains(w)) { Ok(Some(())) } else { bail!("nodes with GPUs: {seen:?}") }
        })
        .await?;
        if t0.elapsed() > Duration::from_secs(1) {
            println!("tessera-scheduler-{i} saw every node's GPUs {:?} after /readyz", t0.elapsed());
        }
        Ok(())
    }

    /// Lines of every tessera-scheduler log that contain `needle`.
    pub fn tessera_log_lines(&self, needle: &str) -> Vec<String> {
        (0..self.replicas.len())
            .flat_map(|i| {
                let text = std::fs::read_to_string(self.dir.join(format!("{}.log", Self::tessera_name(i))));
                text.unwrap_or_default().lines().filter(|l| l.contains(needle)).map(str::to_owned).collect::<Vec<_>>()
            })
            .collect()
    }

    /// `kill -9` of a process by name; false when it was not running.
    /// The process id of a running process of the cluster, by name (`tessera-scheduler-0`, ...).
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.procs.lock().unwrap_or_else(|e| e.into_inner()).get(name).map(Proc::pid)
    }

    pub fn kill9(&self, name: &str) -> bool {
        let p = self.procs.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
        match p {
            Some(p) => {
                p.kill9();
                true
            }
            None => false,
        }
    }

    /// The replica whose kube-scheduler holds the Lease (identity `<hostname>_<uuid>`).
    pub async fn leader(&self) -> Result<Option<usize>> {
        let api: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(self.client.clone(), SYSTEM_NS);
        let Some(lease) = api.get_opt("tessera-scheduler").await? else { return Ok(None) };
        let holder = lease.spec.and_then(|s| s.holder_identity).unwrap_or_default();
        Ok(self.replicas.iter().position(|r| holder.starts_with(&format!("{}_", r.hostname))))
    }

    /// Stops replica `i` (its kube-scheduler and tessera-scheduler) with `kill -9`.
    pub fn kill_replica(&self, i: usize) {
        self.kill9(&format!("kube-scheduler-{i}"));
        self.kill9(&Self::tessera_name(i));
    }

    /// Deletes a pod at once (`--grace-period=0 --force`: no kubelet confirms a graceful delete).
    pub async fn force_delete(&self, ns: &str, name: &str) -> Result<()> {
        self.pods(ns).delete(name, &kube::api::DeleteParams::default().grace_period(0)).await?;
        Ok(())
    }

    /// Whether `ns/name` is bound.
    pub async fn is_bound(&self, ns: &str, name: &str) -> Result<bool> {
        Ok(self.pods(ns).get_opt(name).await?.and_then(|p| p.spec).and_then(|s| s.node_name).is_some())
    }

    /// Waits until some Event about `ns/name` satisfies `pred` (on reason, message); returns it.
    pub async fn wait_event(
        &self,
        ns: &str,
        name: &str,
        timeout: Duration,
        pred: impl Fn(&str, &str) -> bool,
    ) -> Result<(String, String)> {
        let pred = &pred;
        until(&format!("an event about {ns}/{name}"), timeout, || async move {
            let evs = self.events(ns, name).await?;
            match evs.iter().find(|(r, m)| pred(r, m)) {
                Some(e) => Ok(Some(e.clone())),
                None => bail!("events so far: {evs:?}"),
            }
        })
        .await
    }

    pub fn pods(&self, ns: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), ns)
    }

    pub fn gpunodes(&self) -> Api<GpuNode> {
        Api::all(self.client.clone())
    }

    /// Creates a pod from JSON (namespace from its metadata, else `default`).
    pub async fn create_pod(&self, pod: Value) -> Result<Pod> {
        let ns = pod["metadata"]["namespace"].as_str().unwrap_or("default").to_owned();
        let p: Pod = apply::typed(pod)?;
        self.pods(&ns).create(&PostParams::default(), &p).await.context("creating a pod")
    }

    /// Waits until `ns/name` is bound; checks the node is the one tessera's signed assignment
    /// names and returns both.
    pub async fn wait_bound(&self, ns: &str, name: &str, timeout: Duration) -> Result<(String, Assignment)> {
        let pods = self.pods(ns);
        let waited = until(&format!("pod {ns}/{name} to be bound"), timeout, || {
            let pods = pods.clone();
            async move {
                let p = pods.get(name).await?;
                Ok(p.spec.as_ref().and_then(|s| s.node_name.clone()).map(|_| p))
            }
        })
        .await;
        let pod = match waited {
            Ok(p) => p,
            Err(e) => bail!("{e}; its events: {:?}", self.events(ns, name).await.unwrap_or_default()),
        };
        self.check_assignment(&pod)
    }

    /// The node a bound pod is on and tessera's assignment, after checking that they agree and
    /// that the signature verifies with the agents' keys.
    pub fn check_assignment(&self, pod: &Pod) -> Result<(String, Assignment)> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone()).ok_or_else(|| anyhow!("{name} is not bound"))?;
        let annotations = pod.metadata.annotations.clone().unwrap_or_default();
        let text = annotations.get(ann::ASSIGNMENT).ok_or_else(|| anyhow!("{name} has no {}", ann::ASSIGNMENT))?;
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let a = self
            .keyring()?
            .verify(&uid, &node, text, annotations.get(ann::ASSIGNMENT_SIGNATURE).map(String::as_str))
            .map_err(|e| anyhow!("{name}'s assignment does not verify: {e:?}"))?;
        if a.node != node {
            bail!("pod {name} is on {node} but tessera assigned {}", a.node);
        }
        Ok((node, a))
    }

    /// Waits until `count` pods matching `selector` in `ns` are all bound, then checks each
    /// assignment (see [`Cluster::check_assignment`]).
    pub async fn wait_all_bound(
        &self,
        ns: &str,
        selector: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<(Pod, String, Assignment)>> {
        let pods = self.pods(ns);
        let lp = ListParams::default().labels(selector);
        let waited = until(&format!("{count} pods {selector} in {ns} to be bound"), timeout, || {
            let (pods, lp) = (pods.clone(), lp.clone());
            async move {
                let list = pods.list(&lp).await?.items;
                let bound = list.iter().filter(|p| p.spec.as_ref().is_some_and(|s| s.node_name.is_some())).count();
                if list.len() == count && bound == count {
                    Ok(Some(list))
                } else {
                    bail!("{} pods, {bound} bound", list.len())
                }
            }
        })
        .await;
        let list = match waited {
            Ok(l) => l,
            Err(e) => bail!("{e}; events: {:?}", self.all_events(ns).await.unwrap_or_default()),
        };
        let mut out = Vec::new();
        for p in list {
            let (node, a) = self.check_assignment(&p)?;
            out.push((p, node, a));
        }
        Ok(out)
    }

    /// Every Event in `ns` as (object name, reason, message), oldest first.
    pub async fn all_events(&self, ns: &str) -> Result<Vec<(String, String, String)>> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), ns);
        let mut items = api.list(&ListParams::default()).await?.items;
        items.sort_by_key(|e| e.metadata.creation_timestamp.clone());
        Ok(items
            .into_iter()
            .map(|e| {
                (
                    e.involved_object.name.unwrap_or_default(),
                    e.reason.unwrap_or_default(),
                    e.message.unwrap_or_default(),
                )
            })
            .collect())
    }

    /// Events about `ns/name` as (reason, message), oldest first.
    pub async fn events(&self, ns: &str, name: &str) -> Result<Vec<(String, String)>> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), ns);
        let list = api.list(&ListParams::default().fields(&format!("involvedObject.name={name}"))).await?;
        let mut items = list.items;
        items.sort_by_key(|e| e.metadata.creation_timestamp.clone());
        Ok(items.into_iter().map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default())).collect())
    }

    /// `kubectl-tessera ARGS` against replica 0's read-only API; (exit success, stdout, stderr).
    pub fn kubectl_tessera(&self, args: &[&str]) -> Result<(bool, String, String)> {
        let out = std::process::Command::new(&self.bins.kubectl_tessera)
            .arg("--server")
            .arg(format!("http://127.0.0.1:{}", self.replicas[0].read_port))
            .args(args)
            .env("KUBECONFIG", &self.admin_kubeconfig)
            .output()
            .context("running kubectl-tessera")?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }
}

/// kubelet's part of a deletion: a bound pod marked for deletion (an eviction, a graceful delete)
/// is removed once no kubelet would still run it. Every 500 ms.
async fn reap(client: Client) {
    let pods: Api<Pod> = Api::all(client);
    loop {
        if let Ok(list) = pods.list(&ListParams::default()).await {
            for p in list.items.iter().filter(|p| p.metadata.deletion_timestamp.is_some()) {
                let (Some(ns), Some(name)) = (p.metadata.namespace.as_deref(), p.metadata.name.as_deref()) else {
                    continue;
                };
                let api: Api<Pod> = Api::namespaced(pods.clone().into_client(), ns);
                let _ = api.delete(name, &kube::api::DeleteParams::default().grace_period(0)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(r) = self.reaper.take() {
            r.abort();
        }
        let mut procs = std::mem::take(&mut *self.procs.lock().unwrap_or_else(|e| e.into_inner()));
        let order = std::mem::take(&mut *self.order.lock().unwrap_or_else(|e| e.into_inner()));
        // Clients first, the API server and etcd last.
        for name in order.iter().rev() {
            if let Some(p) = procs.remove(name) {
                drop(p);
            }
        }
        drop(procs);
    }
}

/// tessera's log filter: `TESSERA_E2E_RUST_LOG`, else `info`.
fn rust_log() -> String {
    std::env::var("TESSERA_E2E_RUST_LOG").unwrap_or_else(|_| "info".into())
}

/// A client for a kubeconfig file.
pub async fn client_for(path: &Path) -> Result<Client> {
    let kc = kube::config::Kubeconfig::read_from(path)?;
    let config = Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    Ok(Client::try_from(config)?)
}

/// A plain HTTP/1.0 GET on loopback: (status, body).
pub async fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(("127.0.0.1", port)))
        .await
        .context("connect timed out")??;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await.context("read timed out")??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code =
        text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| anyhow!("not HTTP: {text}"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((code, body))
}
