//! HTTP: a thin router over [`Scheduler`]. [`App::respond`] turns a request into a response
//! without sockets (tests call it directly); [`serve`] runs it on a listener with hyper.
//!
//! Bad input never panics and never gets a bare status: filter and bind answer HTTP 200 with
//! the wire `Error` field set (kube-scheduler puts it in the pod's events); prioritize and
//! preempt, whose reply types have no error field, answer 400 with `{"Error": ...}`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tessera_core::PodKey;
use tokio::net::TcpListener;

use crate::error::Error;
use crate::metrics::Timer;
use crate::request::NodesRequest;
use crate::state::Scheduler;
use crate::wire::{ExtenderBindingResult, ExtenderFilterResult};

/// Which endpoints a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Surface {
    /// `POST /filter /prioritize /bind /preempt`.
    pub verbs: bool,
    /// `GET /metrics /api/v1/*` and `/`.
    pub read_only: bool,
}

impl Surface {
    pub const ALL: Surface = Surface { verbs: true, read_only: true };
    pub const VERBS: Surface = Surface { verbs: true, read_only: false };
    pub const READ_ONLY: Surface = Surface { verbs: false, read_only: true };
}

/// The extender verbs kube-scheduler calls, one per path; any other path is not a verb.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Filter,
    Prioritize,
    Preempt,
    Bind,
}

impl Verb {
    pub const ALL: [Verb; 4] = [Verb::Filter, Verb::Prioritize, Verb::Preempt, Verb::Bind];

    /// The verb served at `path`, if any.
    pub fn from_path(path: &str) -> Option<Verb> {
        Verb::ALL.into_iter().find(|v| v.path() == path)
    }

    pub fn path(self) -> &'static str {
        match self {
            Verb::Filter => "/filter",
            Verb::Prioritize => "/prioritize",
            Verb::Preempt => "/preempt",
            Verb::Bind => "/bind",
        }
    }

    /// The verb's name in metrics, logs and decode errors.
    pub fn name(self) -> &'static str {
        &self.path()[1..]
    }
}

/// Request limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest accepted body. A 5,000-node `NodeNames` list is ~100 KiB; full Node objects are
    /// a few KiB each.
    pub max_body_bytes: usize,
    /// Time to read the body and answer filter, prioritize and preempt.
    pub timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_body_bytes: 64 * 1024 * 1024, timeout: Duration::from_secs(10) }
    }
}

/// The router's state.
#[derive(Clone, Debug)]
pub struct App {
    pub scheduler: Arc<Scheduler>,
    pub surface: Surface,
    pub limits: Limits,
    /// Checks each request's token before it is answered (the read-only listener in live mode).
    pub auth: Option<Arc<crate::authn::ReadAuth>>,
}

type Resp = Response<Full<Bytes>>;

/// Largest buffer a reply starts with (about 50,000 node names).
const MAX_REPLY_HINT: usize = 1 << 20;

fn json<T: Serialize>(status: StatusCode, value: &T) -> Resp {
    let mut r = json_written(0, |out| serde_json::to_writer(out, value));
    *r.status_mut() = status;
    r
}

/// A 200 reply whose JSON `write` appends to a buffer of `size_hint` bytes to begin with: filter
/// and prioritize replies name about as many nodes as their request, so its size saves growing
/// the buffer in steps.
fn json_written(size_hint: usize, write: impl FnOnce(&mut Vec<u8>) -> Result<(), serde_json::Error>) -> Resp {
    let mut body = Vec::with_capacity(size_hint.clamp(128, MAX_REPLY_HINT));
    if let Err(e) = write(&mut body) {
        body = format!("{{\"Error\":\"encoding reply: {e}\"}}").into_bytes();
    }
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    r
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    r
}

#[derive(Serialize)]
struct ErrorBody {
    #[serde(rename = "Error")]
    error: String,
}

/// The one mapping from an error to a response for verbs whose reply has no error field.
pub fn error_response(e: &Error) -> Resp {
    let status = match e {
        Error::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        Error::Timeout(_) => StatusCode::SERVICE_UNAVAILABLE,
        Error::Decode { .. } | Error::BadRequest(_) | Error::UnknownPod(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    json(status, &ErrorBody { error: e.chain() })
}

fn decode<T: serde::de::DeserializeOwned>(verb: &'static str, body: &Bytes) -> Result<T, Error> {
    serde_json::from_slice(body).map_err(|source| Error::Decode { verb, source })
}

impl App {
    pub fn new(scheduler: Arc<Scheduler>, surface: Surface) -> Self {
        Self { scheduler, surface, limits: Limits::default(), auth: None }
    }

    /// Answers one request; the body is read here, bounded in size and time.
    pub async fn respond<B>(&self, req: Request<B>) -> Resp
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = req.into_parts();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let limit = self.limits.max_body_bytes;
        let read = async {
            if declared.is_some_and(|n| n > limit) {
                return Err(Error::BodyTooLarge { limit });
            }
            match Limited::new(body, limit).collect().await {
                Ok(c) => Ok(c.to_bytes()),
                Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
                    Err(Error::BodyTooLarge { limit })
                }
                Err(e) => Err(Error::BadRequest(format!("reading the request body: {e}"))),
            }
        };
        let bytes = match tokio::time::timeout(self.limits.timeout, read).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => return self.verb_error(Verb::from_path(parts.uri.path()), &e),
            Err(_) => return self.verb_error(Verb::from_path(parts.uri.path()), &Error::Timeout(self.limits.timeout)),
        };
        self.route(&parts.method, parts.uri.path(), bytes).await
    }

    /// An error in the shape the endpoint's client expects.
    /// Filter and bind answer 200 with their wire `Error` field; prioritize and preempt, whose
    /// replies have none, and every other path answer with a status ([`error_response`]).
    fn verb_error(&self, verb: Option<Verb>, e: &Error) -> Resp {
        if let Some(v) = verb {
            self.scheduler.metrics.decision(v.name(), e.kind());
        }
        match verb {
            Some(Verb::Filter) => json(StatusCode::OK, &ExtenderFilterResult::error(e.chain())),
            Some(Verb::Bind) => json(StatusCode::OK, &ExtenderBindingResult { error: e.chain() }),
            Some(Verb::Prioritize | Verb::Preempt) | None => error_response(e),
        }
    }

    /// Routes a request whose body has been read.
    pub async fn route(&self, method: &Method, path: &str, body: Bytes) -> Resp {
        let s = &self.scheduler;
        if let Some(verb) = Verb::from_path(path)
            && self.surface.verbs
        {
            if method != Method::POST {
                return json(
                    StatusCode::METHOD_NOT_ALLOWED,
                    &ErrorBody { error: format!("{path} takes POST, not {method}") },
                );
            }
            let span =
                tracing::debug_span!("verb", verb = verb.name(), bytes = body.len(), status = tracing::field::Empty);
            let resp = tracing::Instrument::instrument(self.verb(verb, body), span.clone()).await;
            span.record("status", resp.status().as_u16());
            return resp;
        }
        if method != Method::GET && method != Method::HEAD {
            return json(
                StatusCode::METHOD_NOT_ALLOWED,
                &ErrorBody { error: format!("{method} {path} is not served") },
            );
        }
        if self.surface.read_only
            && let Some(page) = crate::dashboard::asset(path)
        {
            return page.response();
        }
        match path {
            "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
            "/readyz" if s.is_ready() => text(StatusCode::OK, "ready\n".into(), "text/plain"),
            "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "cluster state not synced yet\n".into(), "text/plain"),
            "/metrics" if self.surface.read_only => {
                text(StatusCode::OK, s.metrics_text(), "application/openmetrics-text; version=1.0.0; charset=utf-8")
            }
            "/api/v1/cluster" if self.surface.read_only => json(StatusCode::OK, &s.cluster_view()),
            "/api/v1/pending" if self.surface.read_only => json(StatusCode::OK, &s.pending()),
            p if self.surface.read_only && p.starts_with("/api/v1/explain/") => {
                let rest = &p["/api/v1/explain/".len()..];
                match rest.split_once('/') {
                    Some((ns, pod)) if !ns.is_empty() && !pod.is_empty() && !pod.contains('/') => {
                        match s.explain(&PodKey::new(ns, pod)) {
                            Some(e) => json(StatusCode::OK, &e),
                            None => json(
                                StatusCode::NOT_FOUND,
                                &ErrorBody {
                                    error: format!(
                                        "pod {ns}/{pod} has not been filtered by this replica and holds no devices"
                                    ),
                                },
                            ),
                        }
                    }
                    _ => json(
                        StatusCode::BAD_REQUEST,
                        &ErrorBody { error: "expected /api/v1/explain/{namespace}/{pod}".into() },
                    ),
                }
            }
            _ => json(StatusCode::NOT_FOUND, &ErrorBody { error: format!("no such endpoint: {path}") }),
        }
    }

    async fn verb(&self, verb: Verb, body: Bytes) -> Resp {
        let s = &self.scheduler;
        let _t = Timer::start(&s.metrics, verb.name());
        match verb {
            Verb::Filter => match NodesRequest::decode("filter", &body).and_then(|req| s.filter_request(req)) {
                Ok(reply) => json_written(body.len(), |out| reply.write_json(out)),
                Err(e) => self.verb_error(Some(verb), &e),
            },
            Verb::Prioritize => {
                let scored = NodesRequest::decode("prioritize", &body).and_then(|req| {
                    s.prioritize_request(&req).map(|p| {
                        json_written(body.len(), |out| {
                            p.write_json(out);
                            Ok(())
                        })
                    })
                });
                scored.unwrap_or_else(|e| self.verb_error(Some(verb), &e))
            }
            Verb::Preempt => match decode("preempt", &body).and_then(|args| s.preempt(args)) {
                Ok(r) => json(StatusCode::OK, &r),
                Err(e) => self.verb_error(Some(verb), &e),
            },
            Verb::Bind => {
                match decode("bind", &body) {
                    // The bind's work runs to its end in its own task even if the client goes
                    // away, so a reservation is always either confirmed or released; the answer
                    // comes within kube-scheduler's httpTimeout.
                    Ok(args) => json(StatusCode::OK, &s.bind(args).await),
                    Err(e) => self.verb_error(Some(verb), &e),
                }
            }
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves; connections in flight finish.
pub async fn serve(listener: TcpListener, app: App, shutdown: impl std::future::Future<Output = ()>) {
    serve_with(listener, app, None, shutdown).await;
}

/// Like [`serve`], over TLS: every connection completes a handshake with `tls` (which checks
/// the client's certificate) before a request is read.
pub async fn serve_tls(
    listener: TcpListener,
    app: App,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    serve_with(listener, app, Some(tokio_rustls::TlsAcceptor::from(tls)), shutdown).await;
}

/// Longest a TLS handshake may take, so a silent peer cannot hold a task forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

async fn serve_with(
    listener: TcpListener,
    app: App,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let app = Arc::new(app);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(error) => {
                        tracing::warn!(%error, "Accept failed");
                        continue;
                    }
                };
                // Small request/response exchanges on kept-alive connections: a reply split over
                // two segments must not wait for the peer's delayed ACK.
                let _ = stream.set_nodelay(true);
                let app = app.clone();
                let watcher = graceful.watcher();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => connection(TokioIo::new(stream), app, watcher, peer).await,
                        Some(acceptor) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => connection(TokioIo::new(s), app, watcher, peer).await,
                            Ok(Err(error)) => tracing::info!(%error, %peer, "TLS handshake refused"),
                            Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                        },
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
}

async fn connection<I>(io: I, app: Arc<App>, watcher: hyper_util::server::graceful::Watcher, peer: std::net::SocketAddr)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let app = app.clone();
        async move {
            if let Some(denied) = match &app.auth {
                Some(auth) => auth.check(peer, &req).await,
                None => None,
            } {
                return Ok::<_, Infallible>(denied);
            }
            Ok::<_, Infallible>(app.respond(req).await)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
    if let Err(error) = watcher.watch(conn).await {
        tracing::debug!(%error, %peer, "Connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::Verb;

    #[test]
    fn each_verb_is_served_at_its_own_path_only() {
        for v in Verb::ALL {
            assert_eq!(Verb::from_path(v.path()), Some(v));
            assert_eq!(v.path(), format!("/{}", v.name()));
        }
        for p in ["/", "/bind/", "/binds", "/Filter", "", "bind", "/api/v1/cluster"] {
            assert_eq!(Verb::from_path(p), None, "{p}");
        }
    }
}
