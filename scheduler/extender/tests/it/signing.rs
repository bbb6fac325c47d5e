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

mod first_install {
    //! `keys::load`: the key comes from the mounted file; on first install (empty file) it is
    //! generated into the Secret, once, whichever replica writes first.

    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use http::{Method, StatusCode};
    use serde_json::{Value, json};
    use tessera_api::signing::Keyring;
    use tessera_scheduler::keys;

    use crate::kube_api::{mock, respond};

    const OTHER: &str = "k1 b3RoZXItcmVwbGljYS13cm90ZS10aGlzLWtleSEh\n";

    fn secret(rv: &str, keys_file: Option<&str>) -> Value {
        let mut s = json!({"apiVersion": "v1", "kind": "Secret",
                           "metadata": {"name": "tessera-assignment-keys", "namespace": "tessera-system", "resourceVersion": rv}});
        if let Some(text) = keys_file {
            s["data"] = json!({ keys::SECRET_KEY: STANDARD.encode(text) });
        }
        s
    }

    fn decoded(body: &Value) -> String {
        String::from_utf8(STANDARD.decode(body["data"][keys::SECRET_KEY].as_str().unwrap()).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn a_usable_mounted_file_needs_no_api_call() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, super::KEYS).unwrap();
        let (client, mut handle) = mock();
        let k = keys::load(&path, Some(("tessera-system", "tessera-assignment-keys")), Some(&client)).await.unwrap();
        assert_eq!(k.current().unwrap().ids(), ["k2", "k1"]);
        drop(client);
        assert!(handle.next_request().await.is_none(), "no request may be sent");
    }

    #[tokio::test]
    async fn an_empty_secret_gets_a_generated_key_that_signs_until_the_file_shows_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "").unwrap();
        let (client, mut handle) = mock();
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!(
                (req.method(), req.uri().path()),
                (&Method::GET, "/api/v1/namespaces/tessera-system/secrets/tessera-assignment-keys")
            );
            send.send_response(respond(StatusCode::OK, secret("7", None)));
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!(req.method(), Method::PUT);
            let body: Value = serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
            assert_eq!(body["metadata"]["resourceVersion"], "7", "the write must be conditional");
            let written = decoded(&body);
            send.send_response(respond(StatusCode::OK, body));
            written
        });
        let k = keys::load(&path, Some(("tessera-system", "tessera-assignment-keys")), Some(&client)).await.unwrap();
        let written = server.await.unwrap();
        let generated = Keyring::parse(&written).unwrap();
        assert_eq!(generated.ids(), ["k1"]);
        let ring = k.current().unwrap();
        assert_eq!(ring.sign("uid", "n1", "a"), generated.sign("uid", "n1", "a"));
        // Once kubelet updates the mounted file, the file is what counts.
        std::fs::write(&path, super::KEYS).unwrap();
        assert_eq!(k.current().unwrap().ids(), ["k2", "k1"]);
    }

    #[tokio::test]
    async fn a_replica_that_loses_the_write_uses_the_winners_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-until-kubelet-syncs");
        let (client, mut handle) = mock();
        let server = tokio::spawn(async move {
            let (_, send) = handle.next_request().await.unwrap();
            send.send_response(respond(StatusCode::OK, secret("7", None)));
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!(req.method(), Method::PUT);
            send.send_response(respond(
                StatusCode::CONFLICT,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409,
                       "message": "the object has been modified; please apply your changes to the latest version and try again"}),
            ));
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!(req.method(), Method::GET);
            send.send_response(respond(StatusCode::OK, secret("8", Some(OTHER))));
        });
        let k = keys::load(&path, Some(("tessera-system", "tessera-assignment-keys")), Some(&client)).await.unwrap();
        server.await.unwrap();
        let winner = Keyring::parse(OTHER).unwrap();
        assert_eq!(k.current().unwrap().sign("uid", "n1", "a"), winner.sign("uid", "n1", "a"));
    }

    #[tokio::test]
    async fn a_missing_secret_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "").unwrap();
        let (client, mut handle) = mock();
        tokio::spawn(async move {
            let (_, send) = handle.next_request().await.unwrap();
            send.send_response(respond(
                StatusCode::NOT_FOUND,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
                       "message": "secrets \"tessera-assignment-keys\" not found"}),
            ));
        });
        let e =
            keys::load(&path, Some(("tessera-system", "tessera-assignment-keys")), Some(&client)).await.unwrap_err();
        let text = format!("{e:#}");
        assert!(text.contains("Secret tessera-system/tessera-assignment-keys"), "{text}");
        assert!(!text.contains("Status {"), "no debug dump: {text}");
        // Without a Secret to write into, an empty file is the key file's own error.
        let e = keys::load(&path, None, None).await.unwrap_err();
        assert!(format!("{e:#}").contains("--assignment-keys"), "{e:#}");
    }
}
