//! A real kubelet node for the end-to-end suite: kubelet v1.36 + containerd + runc from the
//! machine, the repository's own loopback CNI plugin, locally built busybox and pause images, and
//! `tessera-mig-manager` (fake backend) registered as kubelet's device plugin for
//! `tessera.dev/gpu`.
//!
//! Everything runs inside a private mount namespace (`unshare --mount --propagation slave`) in
//! which tmpfs covers kubelet's and containerd's fixed directories and stand-in files cover the
//! six `/proc/sys` entries kubelet writes, so the host keeps its sysctls and mounts. The node runs
//! in the suite's private network namespace ([`net`]): kubelet is named `127.0.0.1`
//! (`--hostname-override`), and the repository's CNI plugin (`cni-bridge.sh`) gives each pod a
//! veth on the bridge `tbr0` with an address of 127.97.0.0/16, which kubelet's probes and the test
//! reach. Pod cgroups live under a cgroup root of the node's own, removed on stop.
//!
//! The node needs root, the private network namespace, and on `PATH`: containerd, ctr, runc,
//! unshare, nsenter, flock, ip, python3, busybox (static). [`Prerequisites::find`] names what is
//! missing.

pub mod net;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};

/// The node's name: kubelet takes its hostname override, and the apiserver reaches it on it.
pub const NODE_NAME: &str = "127.0.0.1";
/// Reference of the test userland image (a static busybox at `/bin/busybox`).
pub const BUSYBOX_IMAGE: &str = "tessera.test/busybox:1";
/// Reference of the sandbox ("pause") image containerd is configured with.
pub const PAUSE_IMAGE: &str = "tessera.test/pause:1";

const CNI_PLUGIN: &str = include_str!("cni-bridge.sh");
const MOUNT_NS: &str = include_str!("mount-ns.sh");
/// What kubelet writes; the host's values are compared before and after.
pub const SYSCTLS: [&str; 6] = [
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];
const CGROUP_CONTROLLERS: [&str; 9] =
    ["cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids", "systemd"];

/// Paths of everything the node runs.
#[derive(Clone, Debug)]
pub struct Prerequisites {
    pub kubelet: PathBuf,
    pub containerd: PathBuf,
    pub ctr: PathBuf,
    pub busybox: PathBuf,
    /// The reference `loopback` CNI plugin; containerd runs it for `lo` before the node's own.
    pub cni_loopback: PathBuf,
}

fn cni_loopback() -> Option<PathBuf> {
    ["/usr/lib/cni/loopback", "/opt/cni/bin/loopback"].iter().map(PathBuf::from).find(|p| p.is_file())
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// The folder with the Kubernetes binaries: `$KUBEBUILDER_ASSETS`, else the cache
/// `scripts/setup-k8s.sh` unpacks into.
pub fn k8s_assets() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("KUBEBUILDER_ASSETS") {
        return Some(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME")?;
    let dir = PathBuf::from(home).join(".cache/tessera/k8s-v1.36.2");
    dir.is_dir().then_some(dir)
}

impl Prerequisites {
    /// Finds every binary, or says all that are missing in one message.
    pub fn find() -> Result<Self, String> {
        let mut missing = Vec::new();
        let kubelet = k8s_assets().map(|d| d.join("kubelet")).filter(|p| p.is_file());
        if kubelet.is_none() {
            missing.push("kubelet (KUBEBUILDER_ASSETS unset or without kubelet; run scripts/setup-k8s.sh)".to_owned());
        }
        let mut tool = |name: &str, package: &str| {
            let found = on_path(name);
            if found.is_none() {
                missing.push(format!("{name} (Debian: {package})"));
            }
            found
        };
        let containerd = tool("containerd", "containerd");
        let ctr = tool("ctr", "containerd");
        let _ = tool("runc", "runc");
        let _ = tool("unshare", "util-linux");
        let _ = tool("nsenter", "util-linux");
        let _ = tool("flock", "util-linux");
        let _ = tool("ip", "iproute2");
        let _ = tool("python3", "python3");
        let busybox = tool("busybox", "busybox-static");
        let loopback = cni_loopback();
        if loopback.is_none() {
            missing.push("the CNI loopback plugin (Debian: containernetworking-plugins)".to_owned());
        }
        if let Some(b) = &busybox
            && !is_static(b)
        {
            missing.push(format!("a static busybox ({} is dynamically linked; Debian: busybox-static)", b.display()));
        }
        if !is_root() {
            missing.push("root (kubelet and containerd need it)".to_owned());
        } else if !net::private() {
            missing
                .push("the suite's private network namespace (tessera_e2e::kubelet::net::enter() in main)".to_owned());
        }
        match (kubelet, containerd, ctr, busybox, loopback) {
            (Some(kubelet), Some(containerd), Some(ctr), Some(busybox), Some(cni_loopback)) if missing.is_empty() => {
                Ok(Self { kubelet, containerd, ctr, busybox, cni_loopback })
            }
            _ => Err(format!("the real-kubelet node needs: {}", missing.join(", "))),
        }
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// An ELF without a PT_INTERP program header (no dynamic loader).
fn is_static(path: &Path) -> bool {
    let Ok(b) = std::fs::read(path) else { return false };
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[32..40].try_into().unwrap_or_default()) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        b.get(o..o + 4).map(|t| u32::from_le_bytes(t.try_into().unwrap_or_default())) != Some(3)
    })
}

/// What the node runs against.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Kubeconfig of kubelet.
    pub kubeconfig: PathBuf,
    /// Kubeconfig of the agent (e.g. a token of the manifests' `tessera-mig-manager`
    /// ServiceAccount, so their RBAC is what it gets); kubelet's when `None`.
    pub agent_kubeconfig: Option<PathBuf>,
    /// The `tessera-mig-manager` binary.
    pub agent: PathBuf,
    /// The assignment key file the agent verifies signatures with.
    pub assignment_keys: PathBuf,
    /// `--fake-gpus` of the agent, e.g. `a100x2,a100x2:mig`.
    pub fake_gpus: String,
    /// Extra arguments of the agent.
    pub agent_args: Vec<String>,
}

/// A process stopped with SIGTERM, then SIGKILL after `grace`.
#[derive(Debug)]
struct Proc {
    name: &'static str,
    child: Child,
}

impl Proc {
    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn stop(&mut self, grace: Duration) {
        if !self.running() {
            return;
        }
        signal(self.child.id(), "TERM");
        let until = Instant::now() + grace;
        while Instant::now() < until {
            if !self.running() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The running node. Dropping it stops every process it started (and every container),
/// removes its cgroups and its work folder.
#[derive(Debug)]
pub struct KubeletNode {
    dir: Option<tempfile::TempDir>,
    /// `sleep` holding the private mount namespace open.
    holder: Option<Child>,
    holder_pid: u32,
    mount_ns: String,
    procs: Vec<Proc>,
    cgroup: String,
    ctr: PathBuf,
    host_sysctls: BTreeMap<&'static str, String>,
    keep: bool,
}

fn read_sysctls() -> BTreeMap<&'static str, String> {
    SYSCTLS
        .iter()
        .map(|s| (*s, std::fs::read_to_string(format!("/proc/sys/{s}")).unwrap_or_default().trim().to_owned()))
        .collect()
}

fn run(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("{what}: cannot start"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Builds the busybox and pause images with `scripts/oci-image.py` into `dir`.
pub fn build_images(busybox: &Path, dir: &Path) -> anyhow::Result<[PathBuf; 2]> {
    let script = crate::repo_root().join("scripts/oci-image.py");
    let bb = format!("{}=/bin/busybox", busybox.display());
    let mut out = Vec::new();
    for (name, reference, cmd) in [
        ("busybox", BUSYBOX_IMAGE, vec!["sh"]),
        // The sandbox only has to live until killed.
        ("pause", PAUSE_IMAGE, vec!["sleep", "2147483647"]),
    ] {
        let tar = dir.join(format!("{name}.tar"));
        let mut c = Command::new("python3");
        c.arg(&script).args(["--output"]).arg(&tar).args([
            "--ref",
            reference,
            "--elf",
            &bb,
            "--entrypoint",
            "/bin/busybox",
            "--epoch",
            "0",
        ]);
        for a in cmd {
            c.args(["--cmd", a]);
        }
        run(&mut c, &format!("building the {name} image"))?;
        out.push(tar);
    }
    Ok([out[0].clone(), out[1].clone()])
}

impl KubeletNode {
    /// Starts containerd, kubelet and the agent and waits until the node is Ready with
    /// `tessera.dev/gpu` allocatable (earlier, kubelet fails device pods with
    /// `UnexpectedAdmissionError`).
    pub async fn start(pre: &Prerequisites, cfg: &NodeConfig, client: &Client) -> anyhow::Result<Self> {
        let host_sysctls = read_sysctls();
        // Short: containerd's and the plugin's unix socket paths must stay under 108 bytes.
        let dir = tempfile::Builder::new().prefix("tk").tempdir_in("/tmp").context("node work folder")?;
        let d = dir.path().to_path_buf();
        let mut node = Self {
            dir: Some(dir),
            holder: None,
            holder_pid: 0,
            mount_ns: String::new(),
            procs: Vec::new(),
            cgroup: format!("tessera-node-{}", std::process::id()),
            ctr: pre.ctr.clone(),
            host_sysctls,
            keep: std::env::var_os("TESSERA_E2E_KEEP").is_some(),
        };
        node.start_in(pre, cfg, &d).await.map_err(|e| {
            let tail = ["containerd", "kubelet", "agent"]
                .iter()
                .map(|n| format!("--- {n}.log (tail)\n{}", tail(&d.join(format!("{n}.log")), 15)))
                .collect::<Vec<_>>()
                .join("\n");
            e.context(format!("starting the kubelet node\n{tail}"))
        })?;
        node.wait_ready(client).await?;
        Ok(node)
    }

    async fn start_in(&mut self, pre: &Prerequisites, cfg: &NodeConfig, d: &Path) -> anyhow::Result<()> {
        for sub in ["cni/bin", "cni/conf", "sysctl", "containerd"] {
            std::fs::create_dir_all(d.join(sub))?;
        }
        let [busybox_tar, pause_tar] = build_images(&pre.busybox, d)?;

        // CNI: containerd adds the loopback plugin itself (from bin_dir), then ours.
        let plugin = d.join("cni/bin/tessera-bridge");
        std::fs::write(&plugin, CNI_PLUGIN)?;
        run(Command::new("chmod").arg("755").arg(&plugin), "chmod of the CNI plugin")?;
        std::os::unix::fs::symlink("/usr/lib/cni/loopback", d.join("cni/bin/loopback")).or_else(|_| {
            match on_path("loopback") {
                Some(p) => std::os::unix::fs::symlink(p, d.join("cni/bin/loopback")),
                None => Ok(()),
            }
        })?;
        std::fs::write(
            d.join("cni/conf/10-tessera.conflist"),
            r#"{"cniVersion":"0.4.0","name":"tessera-bridge","plugins":[{"type":"tessera-bridge"}]}"#,
        )?;
        std::fs::write(d.join("resolv.conf"), "nameserver 127.0.0.1\n")?;

        let sock = d.join("containerd.sock");
        let dd = d.display();
        std::fs::write(
            d.join("containerd.toml"),
            format!(
                r#"version = 2
root = "{dd}/containerd/root"
state = "{dd}/containerd/state"
[grpc]
  address = "{dd}/containerd.sock"
[ttrpc]
  address = "{dd}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{dd}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # CAP_SYS_RESOURCE may be missing: an oom_score_adj below 0 would fail runc create.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{dd}/cni/bin"
    conf_dir = "{dd}/cni/conf"
"#
            ),
        )?;

        // The cgroup root must exist before kubelet starts (it checks).
        for c in CGROUP_CONTROLLERS {
            let base = Path::new("/sys/fs/cgroup").join(c);
            if base.is_dir() {
                std::fs::create_dir_all(base.join(&self.cgroup))
                    .with_context(|| format!("creating cgroup {c}/{}", self.cgroup))?;
            }
        }
        for f in ["cpuset.cpus", "cpuset.mems"] {
            let parent = Path::new("/sys/fs/cgroup/cpuset").join(f);
            if let Ok(v) = std::fs::read_to_string(&parent) {
                std::fs::write(Path::new("/sys/fs/cgroup/cpuset").join(&self.cgroup).join(f), v.trim())?;
            }
        }

        let (port, healthz) = (free_port()?, free_port()?);
        std::fs::write(
            d.join("kubelet.yaml"),
            format!(
                r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /{cg}
failSwapOn: false
address: 127.0.0.1
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz}
makeIPTablesUtilChains: false
resolvConf: {dd}/resolv.conf
nodeStatusUpdateFrequency: 2s
syncFrequency: 10s
containerRuntimeEndpoint: unix://{dd}/containerd.sock
authentication: {{anonymous: {{enabled: true}}, webhook: {{enabled: false}}}}
authorization: {{mode: AlwaysAllow}}
evictionHard: {{memory.available: "1Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
"#,
                cg = self.cgroup
            ),
        )?;

        // The private mount namespace, held by a sleeping process.
        let holder = Command::new("unshare")
            .args(["--mount", "--propagation", "slave", "sleep", "2147483647"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("unshare --mount")?;
        let hpid = holder.id();
        self.holder = Some(holder);
        self.holder_pid = hpid;
        let own = std::fs::read_link("/proc/self/ns/mnt")?.display().to_string();
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let ns = std::fs::read_link(format!("/proc/{hpid}/ns/mnt")).map(|p| p.display().to_string());
            if let Ok(ns) = ns
                && ns != own
            {
                self.mount_ns = ns;
                break;
            }
            if Instant::now() > until {
                bail!("unshare --mount made no mount namespace");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::write(d.join("mount-ns.sh"), MOUNT_NS)?;
        let h = hpid.to_string();
        run(
            Command::new("nsenter").args(["-t", &h, "-m", "sh"]).arg(d.join("mount-ns.sh")).arg(d),
            "preparing the node's mount namespace",
        )?;

        let inside = |bin: &Path| {
            let mut c = Command::new("nsenter");
            c.args(["-t", &h, "-m", "--"]).arg(bin);
            c
        };
        let mut c = inside(&pre.containerd);
        c.arg("--config").arg(d.join("containerd.toml"));
        self.spawn("containerd", c, d)?;
        let ctr = |args: &[&str]| {
            let mut c = Command::new(&pre.ctr);
            c.arg("--address").arg(&sock).args(args);
            c
        };
        let until = Instant::now() + Duration::from_secs(20);
        while run(&mut ctr(&["version"]), "ctr version").is_err() {
            if Instant::now() > until || self.alive().is_err() {
                bail!("containerd did not start");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for tar in [&pause_tar, &busybox_tar] {
            let t = tar.display().to_string();
            run(&mut ctr(&["-n", "k8s.io", "images", "import", &t]), "ctr images import")?;
        }

        let mut c = inside(&pre.kubelet);
        c.arg(format!("--config={}", d.join("kubelet.yaml").display()))
            .arg(format!("--kubeconfig={}", cfg.kubeconfig.display()))
            .args([&format!("--hostname-override={NODE_NAME}"), "--root-dir=/var/lib/kubelet", "--v=2"]);
        self.spawn("kubelet", c, d)?;

        let metrics = free_port()?;
        let mut c = inside(&cfg.agent);
        c.env("KUBECONFIG", cfg.agent_kubeconfig.as_ref().unwrap_or(&cfg.kubeconfig))
            .env("RUST_LOG", "info")
            .args(["--node-name", NODE_NAME, "--backend", "fake", "--fake-gpus", &cfg.fake_gpus, "--resync-secs", "2"])
            .arg("--assignment-keys")
            .arg(&cfg.assignment_keys)
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{metrics}"))
            .args(&cfg.agent_args);
        self.spawn("agent", c, d)?;
        Ok(())
    }

    fn spawn(&mut self, name: &'static str, mut cmd: Command, d: &Path) -> anyhow::Result<()> {
        let log = std::fs::File::create(d.join(format!("{name}.log")))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.procs.push(Proc { name, child });
        Ok(())
    }

    async fn wait_ready(&mut self, client: &Client) -> anyhow::Result<()> {
        let nodes: Api<Node> = Api::all(client.clone());
        let until = Instant::now() + Duration::from_secs(90);
        loop {
            let mut why = "not registered".to_owned();
            if let Ok(Some(n)) = nodes.get_opt(NODE_NAME).await {
                let st = n.status.unwrap_or_default();
                let ready = st.conditions.unwrap_or_default().iter().any(|c| c.type_ == "Ready" && c.status == "True");
                let gpus = st
                    .allocatable
                    .unwrap_or_default()
                    .get(tessera_api::annotations::RESOURCE_GPU)
                    .and_then(|q| q.0.parse::<u64>().ok())
                    .unwrap_or(0);
                if ready && gpus > 0 {
                    return self.untaint(&nodes).await;
                }
                why = format!("Ready={ready}, allocatable {}={gpus}", tessera_api::annotations::RESOURCE_GPU);
            }
            self.alive().map_err(anyhow::Error::msg)?;
            if Instant::now() > until {
                bail!("node {NODE_NAME} not ready after 90 s ({why})\n{}", tail(&self.log("kubelet"), 20));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Lifts the `node.kubernetes.io/not-ready` taint admission put on the new node (only the
    /// node-lifecycle controller would); kube-scheduler refuses every pod while it is there.
    /// Done until it stays off for 2 s.
    async fn untaint(&self, nodes: &Api<Node>) -> anyhow::Result<()> {
        const TAINT: &str = "node.kubernetes.io/not-ready";
        let until = Instant::now() + Duration::from_secs(30);
        let mut clear_since: Option<Instant> = None;
        loop {
            let n = nodes.get(NODE_NAME).await?;
            let taints = n.spec.and_then(|s| s.taints).unwrap_or_default();
            if taints.iter().any(|t| t.key == TAINT) {
                clear_since = None;
                let kept: Vec<_> = taints.iter().filter(|t| t.key != TAINT).collect();
                let patch = serde_json::json!({"spec": {"taints": kept}});
                nodes.patch(NODE_NAME, &PatchParams::default(), &Patch::Merge(&patch)).await?;
            } else if clear_since.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(2) {
                return Ok(());
            }
            if Instant::now() > until {
                bail!("the {TAINT} taint keeps coming back on node {NODE_NAME}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The log file of `containerd`, `kubelet` or `agent`.
    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.as_ref().map(|d| d.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Whether kubelet, containerd and the agent all still run.
    pub fn alive(&mut self) -> Result<(), String> {
        let exited = self.procs.iter_mut().find_map(|p| (!p.running()).then_some(p.name));
        match exited {
            Some(name) => Err(format!("{name} exited:\n{}", tail(&self.log(name), 20))),
            None => Ok(()),
        }
    }

    /// Stops the agent process the node started (before the manifests' DaemonSet runs it as a
    /// pod).
    pub fn stop_agent(&mut self) {
        if let Some(i) = self.procs.iter().position(|p| p.name == "agent") {
            let mut p = self.procs.remove(i);
            p.stop(Duration::from_secs(5));
        }
    }

    /// Imports an image archive into containerd's `k8s.io` namespace (kubelet's).
    pub fn import_image(&self, tar: &Path) -> anyhow::Result<()> {
        let t = tar.display().to_string();
        run(self.ctr().args(["-n", "k8s.io", "images", "import", &t]), "ctr images import")?;
        Ok(())
    }

    /// Bind-mounts the host folder `from` at `to` inside the node's mount namespace only (for
    /// hostPath volumes; `to` should lie under a folder the namespace covers with tmpfs, such
    /// as `/var/lib`).
    pub fn bind_into(&self, from: &Path, to: &str) -> anyhow::Result<()> {
        let h = self.holder_pid.to_string();
        run(
            Command::new("nsenter")
                .args(["-t", &h, "-m", "sh", "-c", r#"mkdir -p "$2" && mount -n --bind "$1" "$2""#, "sh"])
                .arg(from)
                .arg(to),
            "bind-mounting into the node's mount namespace",
        )?;
        Ok(())
    }

    /// The containerd client argv prefix for this node (`ctr --address SOCK`).
    pub fn ctr(&self) -> Command {
        let mut c = Command::new(&self.ctr);
        if let Some(d) = &self.dir {
            c.arg("--address").arg(d.path().join("containerd.sock"));
        }
        c
    }

    /// Processes in the node's mount namespace (containerd, shims, containers, the holder).
    fn namespace_pids(&self) -> Vec<u32> {
        if self.mount_ns.is_empty() {
            return Vec::new();
        }
        let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
                    .is_ok_and(|p| p.display().to_string() == self.mount_ns)
            })
            .collect()
    }

    /// Processes in the node's cgroup tree (the `pids` hierarchy, else `memory`).
    fn cgroup_pids(&self) -> Vec<u32> {
        let mut out = Vec::new();
        for h in ["pids", "memory"] {
            let root = Path::new("/sys/fs/cgroup").join(h).join(&self.cgroup);
            if !root.is_dir() {
                continue;
            }
            let mut stack = vec![root];
            while let Some(d) = stack.pop() {
                if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) {
                    out.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
                }
                for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(e.path());
                    }
                }
            }
            break;
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Stops everything: the agent and kubelet gracefully, then every process of the mount
    /// namespace (containerd, shims) and of the node's cgroups (containers), then removes the
    /// cgroups and the folder.
    /// Returns what could not be restored.
    pub fn stop(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        for name in ["agent", "kubelet", "containerd"] {
            if let Some(p) = self.procs.iter_mut().find(|p| p.name == name) {
                p.stop(Duration::from_secs(5));
            }
        }
        self.procs.clear();
        for _ in 0..50 {
            let pids = self.namespace_pids();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                signal(pid, "KILL");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Containers have mount namespaces of their own and outlive their shims (reparented to
        // init): every process left in the node's cgroups goes too.
        for _ in 0..50 {
            let pids = self.cgroup_pids();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                signal(pid, "KILL");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !self.cgroup_pids().is_empty() {
            problems.push("processes in the node's cgroups survived SIGKILL".to_owned());
        }
        if let Some(mut h) = self.holder.take() {
            let _ = h.kill();
            let _ = h.wait();
        }
        if !self.namespace_pids().is_empty() {
            problems.push("processes of the node's mount namespace survived SIGKILL".to_owned());
        }
        // Every hierarchy: kubelet also makes the root in the unified (v2) one of a hybrid host.
        let hierarchies = std::fs::read_dir("/sys/fs/cgroup")
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_else(|_| Vec::new());
        for h in hierarchies {
            let root = h.join(&self.cgroup);
            if root.is_dir() && remove_cgroup(&root).is_err() {
                problems.push(format!("cgroup {} is left", root.display()));
            }
        }
        let now = read_sysctls();
        if now != self.host_sysctls && !self.host_sysctls.is_empty() {
            problems.push(format!("host sysctls changed: before {:?}, after {now:?}", self.host_sysctls));
        }
        if let Some(dir) = self.dir.take() {
            if self.keep {
                println!("kubelet node: keeping {}", dir.keep().display());
            } else if let Err(e) = dir.close() {
                problems.push(format!("removing the node folder: {e}"));
            }
        }
        problems
    }
}

/// Removes a cgroup folder tree, deepest first; a cgroup whose last task just died may stay
/// busy for a moment.
fn remove_cgroup(dir: &Path) -> std::io::Result<()> {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&e.path())?;
            }
        }
    }
    let mut last = Ok(());
    for _ in 0..50 {
        last = std::fs::remove_dir(dir);
        if last.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    last
}

impl Drop for KubeletNode {
    fn drop(&mut self) {
        for p in self.stop() {
            eprintln!("kubelet node: {p}");
        }
    }
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    for l in &lines[lines.len().saturating_sub(n)..] {
        let _ = writeln!(out, "{l}");
    }
    out
}
