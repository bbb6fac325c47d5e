use std::time::Duration;

use serde_json::json;
use tessera_runtime::config::Serving;

use crate::support::{self, SMOLLM2, assert_error, get, post};

#[tokio::test]
async fn drain_fails_readiness_finishes_in_flight_then_stops() {
    let Some(srv) = support::start(SMOLLM2, Serving::default()).await else {
        return;
    };
    let a = srv.addr;
    assert_eq!(get(a, "/health/ready").await.status, 200);
    // A generation long enough to still be running when the drain starts.
    let long = tokio::spawn(async move {
        post(
            a,
            "/v1/chat/completions",
            json!({"model": SMOLLM2, "temperature": 0, "max_tokens": 48,
                   "messages": [{"role": "user", "content": "Write a long story about a GPU."}]}),
        )
        .await
    });
    // Wait until it is generating, not merely received (a request not yet admitted when the
    // drain starts is refused, which is also correct).
    let metrics = srv.state.model(SMOLLM2).unwrap().metrics.clone();
    while metrics.running.get() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r = post(a, "/admin/drain", json!({})).await;
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["in_flight"], 1);

    assert_error(&get(a, "/health/ready").await, 503, "false");
    assert_error(&get(a, "/v2/health/ready").await, 503, "false");
    assert_eq!(get(a, "/health/live").await.status, 200, "alive while draining");
    let r = post(a, "/v1/chat/completions", json!({"model": SMOLLM2, "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_error(&r, 503, "server is draining");

    let done = long.await.unwrap();
    assert_eq!(done.status, 200, "in-flight request finished: {}", done.text());
    assert_eq!(done.json()["usage"]["completion_tokens"], 48);

    // With nothing in flight the server stops by itself.
    tokio::time::timeout(Duration::from_secs(10), srv.handle)
        .await
        .expect("server stops after drain")
        .unwrap()
        .unwrap();
    assert!(tokio::net::TcpStream::connect(a).await.is_err(), "listener closed");
}
