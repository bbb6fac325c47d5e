//! The real server over loopback TCP: verbs and read-only endpoints, body limits and the
//! request timeout, and a clean shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tessera_scheduler::http::{App, Limits, Surface, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::fixtures::fixture;

async fn start(limits: Limits) -> (SocketAddr, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (sched, _) = tessera_scheduler::demo::scheduler(tessera_core::policy::by_name("tessera").unwrap(), 0);
    let mut app = App::new(sched, Surface::ALL);
    app.limits = limits;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, app, async {
        let _ = rx.await;
    }));
    (addr, tx, task)
}

/// One HTTP/1.1 exchange with `Connection: close`; `body_len` overrides Content-Length.
async fn exchange(addr: SocketAddr, method: &str, path: &str, body: &[u8], body_len: Option<usize>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body_len.unwrap_or(body.len())
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn filter_and_prioritize_over_loopback() {
    let (addr, stop, task) = start(Limits::default()).await;
    let (status, body) = exchange(addr, "POST", "/filter", fixture("filter-args.json").as_bytes(), None).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["Error"], "");
    assert_eq!(v["NodeNames"].as_array().unwrap().len(), 1);
    let (status, body) = exchange(addr, "POST", "/prioritize", fixture("filter-args.json").as_bytes(), None).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 3);
    let (status, body) = exchange(addr, "GET", "/metrics", b"", None).await;
    assert_eq!(status, 200);
    assert!(body.contains("tessera_request_duration_seconds_count{verb=\"filter\"} 1"), "{body}");
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
}

#[tokio::test]
async fn declared_oversized_body_is_refused_without_reading_it() {
    let (addr, _stop, _task) = start(Limits { max_body_bytes: 1024, ..Limits::default() }).await;
    let (status, body) = exchange(addr, "POST", "/filter", b"", Some(10 * 1024 * 1024)).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["Error"].as_str().unwrap().contains("larger than 1024 bytes"));
}

#[tokio::test]
async fn a_body_that_never_arrives_times_out_with_a_reason() {
    let (addr, _stop, _task) = start(Limits { timeout: Duration::from_millis(200), ..Limits::default() }).await;
    let (status, body) = exchange(addr, "POST", "/prioritize", b"{", Some(100)).await;
    assert_eq!(status, 503);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["Error"].as_str().unwrap().contains("did not finish within"), "{v}");
}
