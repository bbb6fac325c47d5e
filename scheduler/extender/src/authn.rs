//! Who may read the read-only surface (`--read-listen`: the dashboard, `/api/v1/*`, `/metrics`).
//!
//! It shows every pod's placement, so in live mode each request is checked the way
//! kube-rbac-proxy checks one: the bearer token is sent to the API server in a `TokenReview`, and
//! the user it names in a `SubjectAccessReview`:
//!
//! - `/metrics`: the non-resource URL `/metrics`, verb `get` (the grant Prometheus already has);
//! - the dashboard and `/api/v1/*`: `get` on `services/proxy` of the scheduler's Service
//!   (`--read-auth-service`), the permission the API server's service proxy asks for the same
//!   pages, so whoever may open them through `kubectl get --raw .../proxy/...` may open them
//!   directly;
//! - `/healthz` and `/readyz`: open (kubelet's probes carry no token).
//!
//! Peers on loopback are answered without a check (unless `--read-auth-check-loopback`): in a
//! pod's network namespace they are the pod's own containers and `kubectl port-forward`, which the
//! API server has authorised already (`pods/portforward`). Answers are cached for [`CACHE_TTL`]
//! per token and target, so a Prometheus scrape or a dashboard refresh costs no API call.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};

/// How long a TokenReview + SubjectAccessReview answer is reused.
pub const CACHE_TTL: Duration = Duration::from_secs(10);
/// Most cached answers; the cache is emptied when it is full.
const CACHE_MAX: usize = 4096;

/// Whether the read-only surface checks who asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReadAuthMode {
    /// TokenReview + SubjectAccessReview against the API server (live mode's default).
    Kubernetes,
    /// Answer everyone who can reach the port (demo mode's default and only choice).
    None,
}

/// Flags of the read-only surface's authentication.
#[derive(Clone, Debug, clap::Args)]
pub struct AuthArgs {
    /// Who may read --read-listen: `kubernetes` (each request's bearer token through a TokenReview,
    /// its permission through a SubjectAccessReview) or `none`. Default: kubernetes in live mode,
    /// none in demo mode.
    #[arg(long, value_enum, env = "TESSERA_READ_AUTH")]
    pub read_auth: Option<ReadAuthMode>,
    /// The Service (NAMESPACE/NAME) whose `services/proxy` get permission opens the dashboard and
    /// /api/v1/*.
    #[arg(long, default_value = "tessera-system/tessera-scheduler", env = "TESSERA_READ_AUTH_SERVICE")]
    pub read_auth_service: String,
    /// Check requests from loopback peers too (by default the pod's own containers and
    /// `kubectl port-forward` are answered without a token).
    #[arg(long)]
    pub read_auth_check_loopback: bool,
}

impl AuthArgs {
    /// The mode in effect: `none` in demo mode (there is no API server to ask).
    pub fn mode(&self, demo: bool) -> Result<ReadAuthMode, String> {
        match (self.read_auth, demo) {
            (Some(ReadAuthMode::Kubernetes), true) => {
                Err("--read-auth=kubernetes needs the Kubernetes API; demo mode has none".into())
            }
            (Some(m), _) => Ok(m),
            (None, true) => Ok(ReadAuthMode::None),
            (None, false) => Ok(ReadAuthMode::Kubernetes),
        }
    }

    /// `(namespace, name)` of --read-auth-service.
    pub fn service(&self) -> Result<(String, String), String> {
        match self.read_auth_service.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok((ns.to_owned(), name.to_owned()))
            }
            _ => Err(format!("--read-auth-service must be NAMESPACE/NAME, not {:?}", self.read_auth_service)),
        }
    }
}

/// What a request reads, for the SubjectAccessReview.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// `/healthz`, `/readyz`: no check.
    Open,
    /// `/metrics`: non-resource URL `/metrics`, verb get.
    Metrics,
    /// The dashboard and `/api/v1/*`: get `services/proxy` of the scheduler's Service.
    Surface,
}

impl Target {
    pub fn of(path: &str) -> Target {
        match path {
            "/healthz" | "/readyz" => Target::Open,
            "/metrics" => Target::Metrics,
            _ => Target::Surface,
        }
    }
}

/// The outcome of one check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allowed {
        user: String,
    },
    /// 401: no token, or the API server does not accept it.
    Unauthenticated(String),
    /// 403: a known user without the permission.
    Forbidden {
        user: String,
        reason: String,
    },
    /// 503: the API server could not be asked; not cached.
    Unavailable(String),
}

/// The read-only surface's gate (see the module documentation).
pub struct ReadAuth {
    client: kube::Client,
    namespace: String,
    service: String,
    trust_loopback: bool,
    cache: Mutex<HashMap<(String, Target), (Instant, Decision)>>,
}

impl fmt::Debug for ReadAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadAuth")
            .field("service", &format_args!("{}/{}", self.namespace, self.service))
            .field("trust_loopback", &self.trust_loopback)
            .finish()
    }
}

impl ReadAuth {
    pub fn new(client: kube::Client, args: &AuthArgs) -> Result<Self, String> {
        let (namespace, service) = args.service()?;
        Ok(Self { client, namespace, service, trust_loopback: !args.read_auth_check_loopback, cache: Mutex::default() })
    }

    /// `None` when the request may go on; otherwise the answer to send instead.
    pub async fn check<B>(&self, peer: SocketAddr, req: &Request<B>) -> Option<Response<Full<Bytes>>> {
        let target = Target::of(req.uri().path());
        if target == Target::Open || (self.trust_loopback && peer.ip().is_loopback()) {
            return None;
        }
        let token = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty());
        let decision = match token {
            None => Decision::Unauthenticated("send a bearer token (Authorization: Bearer <token>)".into()),
            Some(t) => self.decide(t, target).await,
        };
        let path = req.uri().path();
        match decision {
            Decision::Allowed { .. } => None,
            Decision::Unauthenticated(why) => {
                tracing::info!(%peer, path, reason = %why, "Read-only request unauthenticated");
                let mut r = error(StatusCode::UNAUTHORIZED, format!("unauthenticated: {why}"));
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer realm=\"tessera\""));
                Some(r)
            }
            Decision::Forbidden { user, reason } => {
                tracing::info!(%peer, path, %user, %reason, "Read-only request forbidden");
                Some(error(StatusCode::FORBIDDEN, format!("user {user:?} may not {}: {reason}", self.needs(target))))
            }
            Decision::Unavailable(why) => {
                tracing::warn!(%peer, path, error = %why, "Cannot check a read-only request");
                Some(error(StatusCode::SERVICE_UNAVAILABLE, format!("cannot check the request's token: {why}")))
            }
        }
    }

    /// The permission `target` needs, in words.
    fn needs(&self, target: Target) -> String {
        match target {
            Target::Metrics => "get the non-resource URL /metrics".into(),
            _ => format!("get services/proxy {} in namespace {}", self.service, self.namespace),
        }
    }

    /// TokenReview, then SubjectAccessReview, cached for [`CACHE_TTL`].
    pub async fn decide(&self, token: &str, target: Target) -> Decision {
        let key = (token.to_owned(), target);
        if let Some((at, d)) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key)
            && at.elapsed() < CACHE_TTL
        {
            return d.clone();
        }
        let d = self.ask(token, target).await;
        if !matches!(d, Decision::Unavailable(_)) {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
            #[allow(clippy::disallowed_methods)] // the review cache's TTL runs on the monotonic clock
            cache.insert(key, (Instant::now(), d.clone()));
        }
        d
    }

    async fn ask(&self, token: &str, target: Target) -> Decision {
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_owned()), audiences: None },
            ..Default::default()
        };
        let reviewed = match Api::<TokenReview>::all(self.client.clone()).create(&PostParams::default(), &review).await
        {
            Ok(r) => r,
            Err(e) => {
                return Decision::Unavailable(format!("TokenReview: {}", tessera_api::kube_error::kube_error(&e)));
            }
        };
        let status = reviewed.status.unwrap_or_default();
        let user = match (status.authenticated, status.user) {
            (Some(true), Some(user)) => user,
            _ => {
                let why = status.error.filter(|e| !e.is_empty()).unwrap_or_else(|| "the token is not valid".into());
                return Decision::Unauthenticated(why);
            }
        };
        let name = user.username.clone().unwrap_or_default();
        let (resource_attributes, non_resource_attributes) = match target {
            Target::Metrics => {
                (None, Some(NonResourceAttributes { path: Some("/metrics".into()), verb: Some("get".into()) }))
            }
            _ => (
                Some(ResourceAttributes {
                    verb: Some("get".into()),
                    group: Some(String::new()),
                    resource: Some("services".into()),
                    subresource: Some("proxy".into()),
                    namespace: Some(self.namespace.clone()),
                    name: Some(self.service.clone()),
                    ..Default::default()
                }),
                None,
            ),
        };
        let sar = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                uid: user.uid,
                groups: user.groups,
                extra: user.extra,
                resource_attributes,
                non_resource_attributes,
            },
            ..Default::default()
        };
        match Api::<SubjectAccessReview>::all(self.client.clone()).create(&PostParams::default(), &sar).await {
            Ok(r) => {
                let s = r.status.unwrap_or_default();
                if s.allowed {
                    Decision::Allowed { user: name }
                } else {
                    let reason = s
                        .reason
                        .filter(|r| !r.is_empty())
                        .or(s.evaluation_error.filter(|e| !e.is_empty()))
                        .unwrap_or_else(|| "no RBAC rule allows it".into());
                    Decision::Forbidden { user: name, reason }
                }
            }
            Err(e) => {
                Decision::Unavailable(format!("SubjectAccessReview: {}", tessera_api::kube_error::kube_error(&e)))
            }
        }
    }
}

fn error(status: StatusCode, message: String) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "Error": message }).to_string();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(mode: Option<ReadAuthMode>, service: &str) -> AuthArgs {
        AuthArgs { read_auth: mode, read_auth_service: service.into(), read_auth_check_loopback: false }
    }

    #[test]
    fn live_mode_checks_by_default_and_demo_mode_cannot() {
        let d = "tessera-system/tessera-scheduler";
        assert_eq!(args(None, d).mode(false), Ok(ReadAuthMode::Kubernetes));
        assert_eq!(args(None, d).mode(true), Ok(ReadAuthMode::None));
        assert_eq!(args(Some(ReadAuthMode::None), d).mode(false), Ok(ReadAuthMode::None));
        assert!(args(Some(ReadAuthMode::Kubernetes), d).mode(true).unwrap_err().contains("demo mode"));
    }

    #[test]
    fn the_service_is_namespace_slash_name() {
        assert_eq!(args(None, "ns/svc").service(), Ok(("ns".into(), "svc".into())));
        for bad in ["svc", "/svc", "ns/", "a/b/c"] {
            assert!(args(None, bad).service().unwrap_err().contains("NAMESPACE/NAME"), "{bad}");
        }
    }

    #[test]
    fn targets_by_path() {
        assert_eq!(Target::of("/healthz"), Target::Open);
        assert_eq!(Target::of("/readyz"), Target::Open);
        assert_eq!(Target::of("/metrics"), Target::Metrics);
        for p in ["/", "/index.html", "/api/v1/cluster", "/api/v1/explain/ml/p", "/nope"] {
            assert_eq!(Target::of(p), Target::Surface, "{p}");
        }
    }
}
