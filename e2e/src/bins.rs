//! Where the binaries come from: Kubernetes from `$KUBEBUILDER_ASSETS`, tessera's from this
//! workspace's target folder (built first when the suite runs under cargo).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Every program the suite starts.
#[derive(Debug, Clone)]
pub struct Bins {
    pub etcd: PathBuf,
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
    pub kube_scheduler: PathBuf,
    pub tessera_scheduler: PathBuf,
    pub mig_manager: PathBuf,
    pub kubectl_tessera: PathBuf,
    /// `kubectl`, for `kubectl tessera capture` (it shells out to it); `None` when not on PATH.
    pub kubectl: Option<PathBuf>,
}

/// The workspace binaries the suite runs.
const WORKSPACE_BINS: [(&str, &str); 3] = [
    ("tessera-scheduler", "tessera-scheduler"),
    ("tessera-mig-manager", "tessera-mig-manager"),
    ("kubectl-tessera", "kubectl-tessera"),
];

impl Bins {
    /// Finds every binary, or says which is missing and how to get it.
    pub fn locate() -> Result<Self, String> {
        let assets = std::env::var_os("KUBEBUILDER_ASSETS").map(PathBuf::from).ok_or_else(|| {
            "KUBEBUILDER_ASSETS is not set (a folder holding etcd, kube-apiserver, kube-controller-manager and \
             kube-scheduler; scripts/setup.sh unpacks them and scripts/test.sh exports it)"
                .to_owned()
        })?;
        let k8s = |name: &str| -> Result<PathBuf, String> {
            let p = assets.join(name);
            if p.is_file() { Ok(p) } else { Err(format!("KUBEBUILDER_ASSETS={} has no {name}", assets.display())) }
        };
        let (etcd, kube_apiserver, kube_controller_manager, kube_scheduler) =
            (k8s("etcd")?, k8s("kube-apiserver")?, k8s("kube-controller-manager")?, k8s("kube-scheduler")?);
        let dir = workspace_bin_dir()?;
        build_workspace_bins(&dir)?;
        let ws = |name: &str| -> Result<PathBuf, String> {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(format!(
                    "{} is missing: build it with `cargo build -p {name}` (cargo test --workspace builds it)",
                    p.display()
                ))
            }
        };
        Ok(Self {
            etcd,
            kube_apiserver,
            kube_controller_manager,
            kube_scheduler,
            tessera_scheduler: ws("tessera-scheduler")?,
            mig_manager: ws("tessera-mig-manager")?,
            kubectl_tessera: ws("kubectl-tessera")?,
            kubectl: which("kubectl"),
        })
    }
}

/// `target/<profile>`: the test executable lives in its `deps/`.
fn workspace_bin_dir() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("locating the test executable: {e}"))?;
    exe.parent()
        .filter(|d| d.file_name().is_some_and(|n| n == "deps"))
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or_else(|| format!("{} is not in a cargo target folder's deps/", exe.display()))
}

/// What each workspace binary is built from (not the tests: a newer test file must not make a
/// binary look stale when cargo would not rebuild it).
const SOURCES: [(&str, &[&str]); 3] = [
    (
        "tessera-scheduler",
        &[
            "scheduler/core/src",
            "scheduler/core/Cargo.toml",
            "scheduler/api/src",
            "scheduler/extender/src",
            "scheduler/extender/Cargo.toml",
        ],
    ),
    (
        "tessera-mig-manager",
        &["scheduler/core/src", "scheduler/api/src", "mig-manager/src", "mig-manager/proto", "mig-manager/Cargo.toml"],
    ),
    ("kubectl-tessera", &["kubectl-tessera/src", "kubectl-tessera/Cargo.toml"]),
];

/// The newest modification time of `dir` or a file under it.
fn newest(dir: &Path) -> Option<std::time::SystemTime> {
    if dir.is_file() {
        return std::fs::metadata(dir).and_then(|m| m.modified()).ok();
    }
    let mut newest = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
                newest = newest.max(Some(t));
            }
        }
    }
    newest
}

/// Whether a binary is missing or older than a source file it is built from.
fn stale(dir: &Path) -> bool {
    SOURCES.iter().any(|(bin, sources)| bin_stale(dir, bin, sources))
}

/// Whether `dir/bin` is missing or older than one of `sources` (paths under the repository).
fn bin_stale(dir: &Path, bin: &str, sources: &[&str]) -> bool {
    let root = crate::repo_root();
    let built = std::fs::metadata(dir.join(bin)).and_then(|m| m.modified()).ok();
    let newest_source = sources.iter().filter_map(|s| newest(&root.join(s))).max();
    match (built, newest_source) {
        (Some(b), Some(s)) => b < s,
        (Some(_), None) => false,
        (None, _) => true,
    }
}

/// Under cargo (`$CARGO` is set), builds the binaries when they are missing or older than their
/// sources, so that `cargo test -p tessera-e2e` never runs stale ones; `cargo test --workspace`
/// has just built them. `TESSERA_E2E_NO_BUILD=1` skips it.
fn build_workspace_bins(dir: &Path) -> Result<(), String> {
    let Some(cargo) = std::env::var_os("CARGO") else { return Ok(()) };
    if std::env::var_os("TESSERA_E2E_NO_BUILD").is_some() || !stale(dir) {
        return Ok(());
    }
    let (Some(profile), Some(target)) = (dir.file_name().and_then(|n| n.to_str()), dir.parent()) else {
        return Ok(());
    };
    let mut cmd = Command::new(cargo);
    cmd.arg("build").arg("--target-dir").arg(target);
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    for (package, bin) in WORKSPACE_BINS {
        cmd.args(["-p", package, "--bin", bin]);
    }
    if std::env::var_os("CARGO_NET_OFFLINE").is_some() {
        cmd.arg("--offline");
    }
    let status = cmd.status().map_err(|e| format!("running cargo build for the tessera binaries: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("cargo build of the tessera binaries failed ({status})")) }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(name)).find(|p| p.is_file()))
}

/// `target/<profile>/<bin>` of this workspace, for binaries only some tests need, such as
/// `tessera-runtime` for the real-kubelet suite's images. Under cargo (`$CARGO` set) it is built
/// first (`cargo build -p PACKAGE`) when it is missing or older than one of `sources`, unless
/// `TESSERA_E2E_NO_BUILD=1`. A fresh binary is used as it is: the one `cargo test --workspace`
/// has just built (features unified over the workspace) would otherwise be rebuilt with
/// `-p PACKAGE`'s narrower features, every dependency they touch included.
pub fn workspace_bin(package: &str, bin: &str, sources: &[&str]) -> Result<PathBuf, String> {
    let dir = workspace_bin_dir()?;
    if let Some(cargo) = std::env::var_os("CARGO")
        && std::env::var_os("TESSERA_E2E_NO_BUILD").is_none()
        && bin_stale(&dir, bin, sources)
        && let (Some(profile), Some(target)) = (dir.file_name().and_then(|n| n.to_str()), dir.parent())
    {
        let mut cmd = Command::new(cargo);
        cmd.arg("build").arg("--target-dir").arg(target).args(["-p", package, "--bin", bin]);
        match profile {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        if std::env::var_os("CARGO_NET_OFFLINE").is_some() {
            cmd.arg("--offline");
        }
        let status = cmd.status().map_err(|e| format!("running cargo build -p {package}: {e}"))?;
        if !status.success() {
            return Err(format!("cargo build -p {package} --bin {bin} failed ({status})"));
        }
    }
    let p = dir.join(bin);
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!("{} is missing: build it with `cargo build -p {package}`", p.display()))
    }
}
