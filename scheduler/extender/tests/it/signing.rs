//! The bind signs each assignment for its pod UID and node; the node agent's check accepts it
//! and refuses it for any other pod or node.

use std::sync::Arc;

use http::Method;
use serde_json::json;
use tessera_api::signing::{Keyring, Keys, Refusal};
use tessera_core::{Node, Snapshot};
use tessera_scheduler::binder::MemoryBinder;
use tessera_scheduler::http::{App, Surface};
use tessera_scheduler::state::{MemoryLookup, Scheduler, Settings};

use crate::http::{call, pod};

const KEYS: &str = "k2 c2Vjb25kLXNlY3JldC1rZXktMzItYnl0ZXMhIQ==\nk1 Zmlyc3Qtc2VjcmV0LWtleS0xNi1ieXRlcw==\n";

fn signing_scheduler(keys: Option<&str>) -> (Arc<MemoryBinder>, App) {
    let mut snap = Snapshot::default();
    snap.add_node(Node::test("n1").with_gpus(2, "H100-80GB")).unwrap();
    let binder = Arc::new(MemoryBinder::default());
    let settings = Settings {
        assignment_keys: keys.map(|k| Arc::new(Keys::fixed(Keyring::parse(k).unwrap()))),
        ..Settings::default()
    };
    let sched = Arc::new(Scheduler::new(
        snap,
        tessera_core::policy::by_name("tessera").unwrap(),
        binder.clone(),
        Arc::new(MemoryLookup::default()),
        settings,
    ));
    (binder, App::new(sched, Surface::ALL))
}

async fn bind(app: &App, uid: &str) -> serde_json::Value {
    let p = pod("ml", "llm", uid, json!({"tessera.dev/gpu": "1"}), json!({"tessera.dev/gpus": "2"}));
    let (_, v) = call(app, Method::POST, "/filter", json!({"Pod": p, "NodeNames": ["n1"]}).to_string()).await;
    assert_eq!(v["NodeNames"], json!(["n1"]), "{v}");
    let args = json!({"PodName": "llm", "PodNamespace": "ml", "PodUID": uid, "Node": "n1"});
    call(app, Method::POST, "/bind", args.to_string()).await.1
}

#[tokio::test]
async fn bind_signs_the_assignment_with_the_first_key_for_the_pod_and_node() {
    let (binder, app) = signing_scheduler(Some(KEYS));
    assert_eq!(bind(&app, "uid-1").await["Error"], "");
    let req = &binder.bound()[0];
    let text = &req.annotations["tessera.dev/assignment"];
    let sig = &req.annotations["tessera.dev/assignment-signature"];
    assert!(sig.starts_with("v1:k2:uid-1:"), "{sig}");
    let ring = Keyring::parse(KEYS).unwrap();
    let a = ring.verify("uid-1", "n1", text, Some(sig)).unwrap();
    assert_eq!(a.devices.len(), 2);
    assert_eq!(ring.verify("uid-2", "n1", text, Some(sig)), Err(Refusal::OtherPod { signed_for: "uid-1".into() }));
    assert_eq!(ring.verify("uid-1", "n2", text, Some(sig)), Err(Refusal::OtherNode { signed_for: "n1".into() }));
}

#[tokio::test]
async fn without_keys_the_assignment_is_unsigned_and_without_a_uid_nothing_is_signed() {
    let (binder, app) = signing_scheduler(None);
    assert_eq!(bind(&app, "uid-1").await["Error"], "");
    assert!(!binder.bound()[0].annotations.contains_key("tessera.dev/assignment-signature"));
    let (binder, app) = signing_scheduler(Some(KEYS));
    let e = bind(&app, "").await;
    assert!(e["Error"].as_str().unwrap().contains("no pod UID"), "{e}");
    assert!(binder.bound().is_empty());
}
