//! The smallest control plane a kubelet node needs: etcd and kube-apiserver on 127.0.0.1, one
//! admin token, the GpuNode CRD and the `default` ServiceAccount. No kube-scheduler: pods are
//! bound through the binding API, as a scheduler does.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::PostParams;
use kube::{Api, Client, CustomResourceExt};
use serde_json::json;
use tessera_api::GpuNode;

use super::{k8s_assets, tail};

/// etcd + kube-apiserver, stopped (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub struct ControlPlane {
    dir: tempfile::TempDir,
    procs: Vec<(&'static str, Child)>,
    /// Admin kubeconfig (token of a `system:masters` user).
    pub kubeconfig: PathBuf,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver from `KUBEBUILDER_ASSETS` and returns a client once the
    /// API answers and the GpuNode CRD is served.
    pub async fn start() -> anyhow::Result<(Self, Client)> {
        let assets = k8s_assets().context("KUBEBUILDER_ASSETS is unset (run scripts/setup-k8s.sh)")?;
        let etcd = [assets.join("etcd"), PathBuf::from("/usr/bin/etcd")]
            .into_iter()
            .find(|p| p.is_file())
            .context("etcd is missing (Debian: etcd-server)")?;
        let dir = tempfile::Builder::new().prefix("tessera-cp").tempdir().context("control-plane folder")?;
        let d = dir.path().to_path_buf();
        let mut cp = Self { kubeconfig: d.join("kubeconfig"), dir, procs: Vec::new() };

        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let token = format!("t{:x}{nanos:x}", std::process::id());
        std::fs::write(d.join("tokens.csv"), format!("{token},admin,admin,system:masters\n"))?;
        let key = d.join("sa.key");
        let out = Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048")
            .stderr(Stdio::null())
            .status()
            .context("openssl (Debian: openssl) makes the service-account key")?;
        if !out.success() {
            bail!("openssl genrsa failed");
        }

        let (client_port, peer_port, api_port) = (free_port()?, free_port()?, free_port()?);
        cp.spawn(
            "etcd",
            Command::new(&etcd).args([
                format!("--data-dir={}", d.join("etcd").display()),
                format!("--listen-client-urls=http://127.0.0.1:{client_port}"),
                format!("--advertise-client-urls=http://127.0.0.1:{client_port}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-cluster=default=http://127.0.0.1:{peer_port}"),
                "--unsafe-no-fsync=true".into(),
            ]),
        )?;
        cp.spawn(
            "kube-apiserver",
            Command::new(assets.join("kube-apiserver")).args([
                format!("--etcd-servers=http://127.0.0.1:{client_port}"),
                format!("--secure-port={api_port}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--cert-dir={}", d.join("certs").display()),
                format!("--token-auth-file={}", d.join("tokens.csv").display()),
                "--authorization-mode=RBAC".into(),
                format!("--service-account-key-file={}", key.display()),
                format!("--service-account-signing-key-file={}", key.display()),
                "--service-account-issuer=https://tessera.e2e".into(),
                "--service-cluster-ip-range=127.96.0.0/16".into(),
                "--endpoint-reconciler-type=none".into(),
                "--kubelet-preferred-address-types=InternalIP,Hostname".into(),
                "--disable-admission-plugins=ServiceAccount".into(),
            ]),
        )?;
        std::fs::write(
            &cp.kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: https://127.0.0.1:{api_port}\n    insecure-skip-tls-verify: true\nusers:\n- name: admin\n  user:\n    token: {token}\ncontexts:\n- name: e2e\n  context: {{cluster: e2e, user: admin}}\ncurrent-context: e2e\n"
            ),
        )?;
        let kc = kube::config::Kubeconfig::read_from(&cp.kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        let client = Client::try_from(config)?;
        let until = Instant::now() + Duration::from_secs(60);
        while client.apiserver_version().await.is_err() {
            cp.check_alive()?;
            if Instant::now() > until {
                bail!("kube-apiserver did not answer in 60 s\n{}", tail(&cp.log("kube-apiserver"), 20));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        crds.create(&PostParams::default(), &GpuNode::crd()).await.context("creating the GpuNode CRD")?;
        let sa: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
        sa.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "default"}}))?)
            .await
            .context("creating the default ServiceAccount")?;
        let until = Instant::now() + Duration::from_secs(30);
        while Api::<GpuNode>::all(client.clone()).list(&Default::default()).await.is_err() {
            if Instant::now() > until {
                bail!("the GpuNode CRD is not served after 30 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok((cp, client))
    }

    fn spawn(&mut self, name: &'static str, cmd: &mut Command) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.log(name))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.procs.push((name, child));
        Ok(())
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        for (name, c) in &mut self.procs {
            if !matches!(c.try_wait(), Ok(None)) {
                bail!("{name} exited\n{}", tail(&self.dir.path().join(format!("{name}.log")), 20));
            }
        }
        Ok(())
    }

    /// Log file of `etcd` or `kube-apiserver`.
    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// The control plane's folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // The API server first: it holds etcd's watches.
        while let Some((_, mut c)) = self.procs.pop() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let until = Instant::now() + Duration::from_secs(5);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
