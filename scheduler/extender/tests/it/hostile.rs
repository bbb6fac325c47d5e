//! Hostile bodies for every verb: arbitrary bytes, arbitrary JSON, and the real wire shapes
//! with fields replaced by anything. Every answer is a JSON reply (200 with `Error` set, or a
//! 4xx with a message), nothing panics, and the scheduler keeps serving a good pod the same
//! way afterwards (no state lost or leaked).
//!
//! A long run: `PROPTEST_CASES=1000000 cargo test --release -p tessera-scheduler --test it hostile`.

use http::{Method, StatusCode};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};
use tessera_core::{Node, Snapshot};
use tessera_scheduler::binder::MemoryBinder;
use tessera_scheduler::http::{App, Surface};
use tessera_scheduler::state::Settings;

use crate::http::{call, call_raw, pod};

const VERBS: [&str; 4] = ["/filter", "/prioritize", "/bind", "/preempt"];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<String>().prop_map(Value::String),
        prop_oneof![Just("n1"), Just("ml"), Just("p"), Just("1"), Just("8Gi"), Just("-1"), Just("1e400")]
            .prop_map(|s| Value::String(s.into())),
    ]
}

/// JSON whose keys are mostly the wire's own, so decoding goes deep before it fails.
fn wire_json() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(5, 48, 6, |inner| {
        let key = prop_oneof![
            Just("Pod"),
            Just("NodeNames"),
            Just("Nodes"),
            Just("PodName"),
            Just("PodNamespace"),
            Just("PodUID"),
            Just("Node"),
            Just("NodeNameToVictims"),
            Just("NodeNameToMetaVictims"),
            Just("Pods"),
            Just("NumPDBViolations"),
            Just("metadata"),
            Just("spec"),
            Just("name"),
            Just("namespace"),
            Just("uid"),
            Just("annotations"),
            Just("containers"),
            Just("resources"),
            Just("limits"),
            Just("tessera.dev/gpu"),
            Just("tessera.dev/gpus"),
            Just("tessera.dev/gpu-memory"),
            Just("nvidia.com/gpu"),
            Just("items"),
        ]
        .prop_map(str::to_owned);
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(key, inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..256),
        wire_json().prop_map(|v| v.to_string().into_bytes()),
        // A well-formed filter body whose pod is replaced piece by piece.
        (wire_json(), wire_json()).prop_map(|(ann, limits)| {
            let mut p = pod("ml", "p", "u1", json!({"tessera.dev/gpu": "1"}), json!({}));
            p["metadata"]["annotations"] = ann;
            p["spec"]["containers"][0]["resources"]["limits"] = limits;
            json!({"Pod": p, "NodeNames": ["n1", "n2"]}).to_string().into_bytes()
        }),
    ]
}

fn app() -> App {
    let mut snap = Snapshot::default();
    snap.add_node(Node::test("n1").with_gpus(2, "H100-80GB")).unwrap();
    snap.add_node(Node::test("n2").with_gpus(1, "A100-80GB")).unwrap();
    let (sched, _, _) = crate::contract::scheduler(snap, Settings::default(), MemoryBinder::default());
    App::new(sched, Surface::ALL)
}

async fn good_filter(app: &App) -> Value {
    let p = pod("ml", "good", "u-good", json!({"tessera.dev/gpu": "1"}), json!({"tessera.dev/gpus": "2"}));
    call(app, Method::POST, "/filter", json!({"Pod": p, "NodeNames": ["n1", "n2"]}).to_string()).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_verb_answers_any_body_with_json_and_keeps_its_state() {
    let app = app();
    let before = good_filter(&app).await;
    assert_eq!(before["NodeNames"], json!(["n1"]), "{before}");

    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let handle = tokio::runtime::Handle::current();
    let app2 = app.clone();
    let result = tokio::task::spawn_blocking(move || {
        runner.run(&(0..VERBS.len(), body()), |(verb, bytes)| {
            let (status, reply) = handle.block_on(call_raw(&app2, Method::POST, VERBS[verb], bytes));
            let v: Value = serde_json::from_slice(&reply)
                .map_err(|e| TestCaseError::fail(format!("{}: a reply that is not JSON ({e})", VERBS[verb])))?;
            prop_assert!(
                status == StatusCode::OK || status.is_client_error(),
                "{} answered {status}: {v}",
                VERBS[verb]
            );
            let error = v.get("Error").or_else(|| v.get("error")).and_then(Value::as_str).unwrap_or_default();
            if status.is_client_error() {
                prop_assert!(!error.is_empty(), "a {status} without a message: {v}");
            }
            prop_assert!(!error.contains("Some(") && !error.contains("Status {"), "debug dump: {error}");
            Ok(())
        })
    })
    .await
    .unwrap();
    if let Err(e) = result {
        panic!("{e}");
    }

    // Nothing a hostile body did changed what a good pod gets.
    assert_eq!(good_filter(&app).await, before);
}
