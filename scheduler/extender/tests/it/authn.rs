//! The read-only surface behind TokenReview + SubjectAccessReview, over loopback TCP, against a
//! fake API server on loopback that answers both reviews and records what it was asked.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tessera_scheduler::authn::{AuthArgs, ReadAuth};
use tessera_scheduler::http::{App, Surface, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ALICE: &str = "alice-token";
const PROMETHEUS: &str = "prometheus-token";

/// The fake API server's answers: alice may get services/proxy of tessera-system/tessera-scheduler,
/// Prometheus's ServiceAccount may get /metrics; every other token is not valid.
fn review(path: &str, body: &Value) -> Value {
    match path {
        "/apis/authentication.k8s.io/v1/tokenreviews" => {
            let token = body["spec"]["token"].as_str().unwrap_or_default();
            let user = match token {
                ALICE => {
                    Some(json!({"username": "alice", "uid": "u-alice", "groups": ["viewers", "system:authenticated"],
                                     "extra": {"scopes": ["read"]}}))
                }
                PROMETHEUS => Some(json!({"username": "system:serviceaccount:monitoring:prometheus",
                                          "groups": ["system:serviceaccounts"]})),
                _ => None,
            };
            let status = match user {
                Some(u) => json!({"authenticated": true, "user": u}),
                None => json!({"authenticated": false, "error": "token has expired"}),
            };
            json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": body["spec"], "status": status})
        }
        _ => {
            let spec = &body["spec"];
            let user = spec["user"].as_str().unwrap_or_default();
            let ra = &spec["resourceAttributes"];
            let proxy = ra["verb"] == "get"
                && ra["resource"] == "services"
                && ra["subresource"] == "proxy"
                && ra["namespace"] == "tessera-system"
                && ra["name"] == "tessera-scheduler";
            let metrics = spec["nonResourceAttributes"] == json!({"path": "/metrics", "verb": "get"});
            let allowed = (user == "alice" && proxy) || (user.ends_with(":prometheus") && metrics);
            let mut status = json!({"allowed": allowed});
            if !allowed {
                status["reason"] = json!("no RBAC policy matched");
            }
            json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec, "status": status})
        }
    }
}

type Seen = Arc<Mutex<Vec<(String, Value)>>>;

async fn fake_api_server() -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let log = log.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let log = log.clone();
                    async move {
                        let path = req.uri().path().to_owned();
                        let bytes = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                        let answer = review(&path, &body);
                        log.lock().unwrap().push((path, body));
                        let mut r = Response::new(Full::new(Bytes::from(answer.to_string())));
                        *r.status_mut() = StatusCode::CREATED;
                        r.headers_mut().insert("content-type", "application/json".parse().unwrap());
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    (addr, seen)
}

fn client_for(api: SocketAddr) -> kube::Client {
    let config = kube::Config::new(format!("http://{api}").parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

/// The read-only surface with the gate; `check_loopback` so that this loopback test is checked.
async fn surface(api: SocketAddr, check_loopback: bool) -> SocketAddr {
    let (sched, _) = tessera_scheduler::demo::scheduler(tessera_core::policy::by_name("tessera").unwrap(), 0);
    let args = AuthArgs {
        read_auth: None,
        read_auth_service: "tessera-system/tessera-scheduler".into(),
        read_auth_check_loopback: check_loopback,
    };
    let mut app = App::new(sched, Surface::READ_ONLY);
    app.auth = Some(Arc::new(ReadAuth::new(client_for(api), &args).unwrap()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, app, std::future::pending()));
    addr
}

/// One GET with an optional bearer token: (status, headers, body).
async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_ascii_lowercase(), body.to_owned())
}

#[tokio::test]
async fn probes_are_open_and_everything_else_needs_a_token() {
    let (api, seen) = fake_api_server().await;
    let addr = surface(api, true).await;
    assert_eq!(get(addr, "/healthz", None).await.0, 200);
    assert_eq!(get(addr, "/readyz", None).await.0, 200);
    for path in ["/metrics", "/api/v1/cluster", "/api/v1/explain/ml/p", "/"] {
        let (status, head, body) = get(addr, path, None).await;
        assert_eq!(status, 401, "{path}: {body}");
        assert!(head.contains("www-authenticate: bearer realm=\"tessera\""), "{head}");
        assert!(body.contains("send a bearer token"), "{body}");
    }
    assert!(seen.lock().unwrap().is_empty(), "no token, no review");
    let (status, _, body) = get(addr, "/api/v1/cluster", Some("stolen-token")).await;
    assert_eq!(status, 401);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["Error"], "unauthenticated: token has expired");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1, "an invalid token gets no SubjectAccessReview");
    assert_eq!(seen[0].0, "/apis/authentication.k8s.io/v1/tokenreviews");
    assert_eq!(seen[0].1["spec"]["token"], "stolen-token");
}

#[tokio::test]
async fn a_user_with_services_proxy_reads_the_surface_and_the_review_names_the_service() {
    let (api, seen) = fake_api_server().await;
    let addr = surface(api, true).await;
    let (status, _, body) = get(addr, "/api/v1/cluster", Some(ALICE)).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["nodes"].as_array().is_some_and(|n| !n.is_empty()), "{body}");
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        let (path, sar) = &seen[1];
        assert_eq!(path, "/apis/authorization.k8s.io/v1/subjectaccessreviews");
        assert_eq!(sar["spec"]["user"], "alice");
        assert_eq!(sar["spec"]["uid"], "u-alice");
        assert_eq!(sar["spec"]["groups"], json!(["viewers", "system:authenticated"]));
        assert_eq!(sar["spec"]["extra"], json!({"scopes": ["read"]}));
        assert_eq!(
            sar["spec"]["resourceAttributes"],
            json!({"verb": "get", "group": "", "resource": "services", "subresource": "proxy",
                   "namespace": "tessera-system", "name": "tessera-scheduler"})
        );
    }
    // Cached: the dashboard's next refresh asks the API server nothing.
    assert_eq!(get(addr, "/api/v1/pending", Some(ALICE)).await.0, 200);
    assert_eq!(get(addr, "/", Some(ALICE)).await.0, 200);
    assert_eq!(seen.lock().unwrap().len(), 2);
    // alice has no /metrics grant.
    let (status, _, body) = get(addr, "/metrics", Some(ALICE)).await;
    assert_eq!(status, 403, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["Error"], "user \"alice\" may not get the non-resource URL /metrics: no RBAC policy matched");
}

#[tokio::test]
async fn prometheus_scrapes_metrics_but_may_not_read_placements() {
    let (api, _) = fake_api_server().await;
    let addr = surface(api, true).await;
    let (status, _, body) = get(addr, "/metrics", Some(PROMETHEUS)).await;
    assert_eq!(status, 200);
    assert!(body.contains("tessera_leader"), "{body}");
    let (status, _, body) = get(addr, "/api/v1/explain/ml/p", Some(PROMETHEUS)).await;
    assert_eq!(status, 403);
    assert!(
        body.contains(
            "may not get services/proxy tessera-scheduler in namespace tessera-system: no RBAC policy matched"
        ),
        "{body}"
    );
}

#[tokio::test]
async fn loopback_peers_are_trusted_by_default() {
    let (api, seen) = fake_api_server().await;
    let addr = surface(api, false).await;
    assert_eq!(get(addr, "/api/v1/cluster", None).await.0, 200);
    assert_eq!(get(addr, "/metrics", None).await.0, 200);
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn an_unreachable_api_server_answers_503_and_is_not_cached() {
    // A port that was just free: nothing listens there.
    let gone = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let addr = surface(gone, true).await;
    let (status, _, body) = get(addr, "/api/v1/cluster", Some(ALICE)).await;
    assert_eq!(status, 503, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["Error"].as_str().unwrap().starts_with("cannot check the request's token: TokenReview: "), "{body}");
}
