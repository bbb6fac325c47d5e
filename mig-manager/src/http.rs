//! The agent's small HTTP surface: `/metrics`, `/healthz`, and in `--standalone` runs
//! `/status` (the GpuNode status it would publish).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::debug;

use crate::metrics::encode;
use crate::status::LocalNodeApi;

/// What the routes read.
#[derive(Debug, Clone)]
pub struct State {
    pub registry: Arc<Registry>,
    pub local: Option<Arc<LocalNodeApi>>,
}

/// Answers one request by path.
pub fn route(state: &State, path: &str) -> Response<Full<Bytes>> {
    let (code, ctype, body) = match path {
        "/metrics" => {
            (StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", encode(&state.registry))
        }
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/status" => match state.local.as_ref().and_then(|l| l.last()) {
            Some(s) => (StatusCode::OK, "application/json", serde_json::to_string_pretty(&s).unwrap_or_default()),
            None => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "no status (only in --standalone runs, after the first pass)\n".into(),
            ),
        },
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".to_owned()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = code;
    if let Ok(v) = http::HeaderValue::from_str(ctype) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}

/// Serves until the listener fails.
pub async fn serve(addr: SocketAddr, state: State) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let resp = route(&state, req.uri().path());
                async move { Ok::<_, Infallible>(resp) }
            });
            if let Err(error) =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await
            {
                debug!(%error, "HTTP connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    #[tokio::test]
    async fn metrics_route_serves_the_node_registry() {
        let (registry, m) = crate::metrics::registry();
        m.nvml_up.set(1);
        let state = State { registry: Arc::new(registry), local: None };
        let resp = route(&state, "/metrics");
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("tessera_node_nvml_up 1"));
        assert_eq!(route(&state, "/status").status(), StatusCode::NOT_FOUND);
        assert_eq!(route(&state, "/healthz").status(), StatusCode::OK);
    }
}
