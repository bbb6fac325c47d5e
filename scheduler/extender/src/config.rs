//! Command line: raw flags, then a validated [`Config`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::tls::TlsFiles;

/// tessera's kube-scheduler extender.
#[derive(Debug, Clone, Parser)]
#[command(name = "tessera-scheduler", version, about)]
pub struct Args {
    /// Run on an in-memory demo cluster with a synthetic model mix; no Kubernetes needed.
    #[arg(long)]
    pub demo: bool,
    /// Address of the extender verbs (and, in demo mode, of everything else).
    #[arg(long, default_value = "127.0.0.1:8888", env = "TESSERA_LISTEN")]
    pub listen: String,
    /// Address of the read-only surface (/metrics, /api/v1/*). Live mode default 0.0.0.0:8889;
    /// in demo mode it shares --listen unless set.
    #[arg(long, env = "TESSERA_READ_LISTEN")]
    pub read_listen: Option<String>,
    /// Placement policy.
    #[arg(long, default_value = "tessera")]
    pub policy: String,
    /// Seed for tie-breaks.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Namespace of kube-scheduler's leader Lease.
    #[arg(long, default_value = "tessera-system", env = "TESSERA_LEASE_NAMESPACE")]
    pub lease_namespace: String,
    /// Name of kube-scheduler's leader Lease (its `leaderElection.resourceName`).
    #[arg(long, default_value = "tessera-scheduler", env = "TESSERA_LEASE_NAME")]
    pub lease_name: String,
    /// This pod's hostname, which prefixes its kube-scheduler's Lease identity.
    #[arg(long, env = "HOSTNAME", default_value = "")]
    pub hostname: String,
    /// Bind without following a Lease (a single replica).
    #[arg(long)]
    pub no_leader_election: bool,
    /// Longest wait for a node to report a new MIG instance during bind, in seconds.
    #[arg(long, default_value_t = 30)]
    pub mig_timeout_secs: u64,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Time limit to read a request and answer filter, prioritize or preempt, in seconds.
    #[arg(long, default_value_t = 10)]
    pub request_timeout_secs: u64,
    /// kube-scheduler's `httpTimeout` for this extender (scheduler-config.yaml), in seconds.
    /// Every verb answers within it: a bind that must wait longer (a gang's other members, a
    /// MIG instance being created) answers an error a little before it, keeps its devices
    /// reserved, and kube-scheduler's retry joins the bind in progress.
    #[arg(long, default_value_t = 45, env = "TESSERA_HTTP_TIMEOUT_SECS")]
    pub http_timeout_secs: u64,
    /// Never evict lower-priority pods for pods kube-scheduler cannot preempt for
    /// (tessera.dev/gpu pods, gangs).
    #[arg(long)]
    pub no_preemption: bool,
    /// Log as JSON lines.
    #[arg(long)]
    pub log_json: bool,
    /// Serve the --listen address over TLS with this certificate chain (PEM); needs --tls-key and
    /// --client-ca.
    #[arg(long, env = "TESSERA_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert (PEM).
    #[arg(long, env = "TESSERA_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that sign the client certificates --listen accepts over TLS.
    #[arg(long, env = "TESSERA_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,
    #[command(flatten)]
    pub read_auth: crate::authn::AuthArgs,
    /// Key file that signs assignments (the mounted `tessera-assignment-keys` Secret): one
    /// `<id> <base64 secret>` per line, the first signs, all verify; re-read when it changes.
    /// Without it assignments are unsigned, and node agents that check signatures refuse them.
    #[arg(long, env = "TESSERA_ASSIGNMENT_KEYS")]
    pub assignment_keys: Option<PathBuf>,
    /// `NAMESPACE/NAME` of the Secret behind --assignment-keys: when the mounted file holds no
    /// key yet (first install), a key is generated into that Secret.
    #[arg(long, env = "TESSERA_ASSIGNMENT_KEYS_SECRET", requires = "assignment_keys")]
    pub assignment_keys_secret: Option<String>,
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub demo: bool,
    pub listen: SocketAddr,
    /// `None`: the read-only surface shares `listen`.
    pub read_listen: Option<SocketAddr>,
    pub policy: String,
    pub seed: u64,
    pub lease: Option<(String, String, String)>,
    pub mig_timeout: Duration,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub http_timeout: Duration,
    pub preemption: bool,
    pub log_json: bool,
    /// TLS with client-certificate authentication on `listen`.
    pub tls: Option<TlsFiles>,
    /// The read-only surface's TokenReview/SubjectAccessReview settings; `None`: it answers everyone.
    pub read_auth: Option<crate::authn::AuthArgs>,
    /// Key file that signs assignments.
    pub assignment_keys: Option<PathBuf>,
    /// The Secret behind it, as (namespace, name).
    pub assignment_keys_secret: Option<(String, String)>,
}

impl Args {
    pub fn validate(self) -> Result<Config, String> {
        let addr = |flag: &str, v: &str| v.parse::<SocketAddr>().map_err(|e| format!("--{flag} {v:?}: {e}"));
        let listen = addr("listen", &self.listen)?;
        let read_listen = match (&self.read_listen, self.demo) {
            (Some(v), _) => Some(addr("read-listen", v)?),
            (None, true) => None,
            (None, false) => Some(addr("read-listen", "0.0.0.0:8889")?),
        };
        if read_listen == Some(listen) {
            return Err("--read-listen must differ from --listen (or be left out in demo mode)".into());
        }
        if tessera_core::policy::by_name(&self.policy).is_none() {
            return Err(format!(
                "--policy {:?} is unknown; one of {}",
                self.policy,
                tessera_core::policy::NAMES.join(", ")
            ));
        }
        let lease = if self.demo || self.no_leader_election {
            None
        } else if self.hostname.is_empty() {
            return Err(
                "leader election needs the pod's hostname (HOSTNAME or --hostname), or --no-leader-election".into()
            );
        } else {
            Some((self.lease_namespace, self.lease_name, self.hostname))
        };
        if self.max_body_bytes == 0 {
            return Err("--max-body-bytes must be positive".into());
        }
        if self.http_timeout_secs < 2 {
            return Err(format!(
                "--http-timeout-secs {} is too short: kube-scheduler's httpTimeout must leave at least 2 s",
                self.http_timeout_secs
            ));
        }
        let tls = TlsFiles::from_flags(self.tls_cert, self.tls_key, self.client_ca)?;
        let read_auth = match self.read_auth.mode(self.demo)? {
            crate::authn::ReadAuthMode::Kubernetes => self.read_auth.service().map(|_| Some(self.read_auth))?,
            crate::authn::ReadAuthMode::None => None,
        };
        let assignment_keys_secret = match &self.assignment_keys_secret {
            Some(v) => match v.split_once('/') {
                Some((ns, name)) if !ns.is_empty() && !name.is_empty() => Some((ns.to_owned(), name.to_owned())),
                _ => return Err(format!("--assignment-keys-secret {v:?}: expected NAMESPACE/NAME")),
            },
            None => None,
        };
        Ok(Config {
            demo: self.demo,
            listen,
            read_listen,
            policy: self.policy,
            seed: self.seed,
            lease,
            mig_timeout: Duration::from_secs(self.mig_timeout_secs),
            max_body_bytes: self.max_body_bytes,
            // Reading a body never outlasts what kube-scheduler waits for the answer.
            request_timeout: Duration::from_secs(self.request_timeout_secs.clamp(1, self.http_timeout_secs)),
            http_timeout: Duration::from_secs(self.http_timeout_secs),
            preemption: !self.no_preemption,
            log_json: self.log_json,
            tls,
            read_auth,
            assignment_keys: self.assignment_keys,
            assignment_keys_secret,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        Args::try_parse_from(std::iter::once("tessera-scheduler").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?
            .validate()
    }

    #[test]
    fn demo_defaults_share_one_loopback_listener() {
        let c = parse(&["--demo"]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8888");
        assert_eq!(c.read_listen, None);
        assert_eq!(c.policy, "tessera");
        assert!(c.lease.is_none());
    }

    #[test]
    fn unknown_policy_and_bad_address_are_rejected() {
        assert!(parse(&["--demo", "--policy", "nope"]).unwrap_err().contains("nope"));
        assert!(parse(&["--demo", "--listen", "localhost"]).unwrap_err().contains("--listen"));
    }

    #[test]
    fn live_mode_needs_a_hostname_for_the_lease() {
        assert!(parse(&["--hostname", ""]).is_err());
        let c = parse(&["--hostname", "pod-1"]).unwrap();
        assert_eq!(c.lease, Some(("tessera-system".into(), "tessera-scheduler".into(), "pod-1".into())));
        assert_eq!(c.read_listen.map(|a| a.to_string()), Some("0.0.0.0:8889".into()));
    }

    #[test]
    fn the_http_timeout_matches_the_manifests_and_bounds_the_request_timeout() {
        let c = parse(&["--demo"]).unwrap();
        assert_eq!(c.http_timeout, Duration::from_secs(45));
        let c = parse(&["--demo", "--http-timeout-secs", "5", "--request-timeout-secs", "30"]).unwrap();
        assert_eq!(c.request_timeout, Duration::from_secs(5));
        assert!(parse(&["--demo", "--http-timeout-secs", "1"]).unwrap_err().contains("--http-timeout-secs"));
    }

    #[test]
    fn tls_takes_all_three_files() {
        assert!(parse(&["--demo"]).unwrap().tls.is_none());
        let e = parse(&["--demo", "--tls-cert", "c.pem", "--tls-key", "k.pem"]).unwrap_err();
        assert!(e.contains("missing --client-ca"), "{e}");
        let c = parse(&["--demo", "--tls-cert", "c.pem", "--tls-key", "k.pem", "--client-ca", "ca.pem"]).unwrap();
        assert_eq!(c.tls.map(|t| t.cert), Some(PathBuf::from("c.pem")));
    }
}
