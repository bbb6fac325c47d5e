//! The read API's golden answers: what the demo scheduler serves on `/api/v1/cluster`,
//! `/api/v1/pending` and `/api/v1/explain/...` is kept in `scheduler/api/fixtures/views/`, where
//! tessera-api, the simulator and `kubectl tessera` read it back with the same types.
//! Regenerate with `TESSERA_BLESS=1 cargo test -p tessera-scheduler --test it views`.

use http::{Method, StatusCode};
use tessera_api::views::{ClusterView, Explanation, PendingView};

use crate::fixtures::demo;
use crate::http::call_raw;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../api/fixtures/views");

/// The pod whose explanation is kept: a planned gang member holding its reservation.
const EXPLAINED: &str = "ocr/ocr-detect-0";

fn check(name: &str, served: &[u8]) {
    let value: serde_json::Value = serde_json::from_slice(served).unwrap();
    let want = serde_json::to_string_pretty(&value).unwrap() + "\n";
    let path = format!("{DIR}/{name}");
    if std::env::var_os("TESSERA_BLESS").is_some() {
        std::fs::create_dir_all(DIR).unwrap();
        std::fs::write(&path, &want).unwrap();
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "scheduler/api/fixtures/views/{name} is missing or differs from what the scheduler serves; \
         run TESSERA_BLESS=1 cargo test -p tessera-scheduler --test it views\nserved:\n{want}"
    );
}

// Paused time: the demo's clock stands still, so times in the answers are the same every run.
#[tokio::test(start_paused = true)]
async fn the_read_api_answers_equal_the_golden_files_and_decode_with_the_shared_schema() {
    let (_, _, app) = demo();
    for (name, path) in [
        ("cluster.json", "/api/v1/cluster".to_owned()),
        ("pending.json", "/api/v1/pending".to_owned()),
        ("explain.json", format!("/api/v1/explain/{EXPLAINED}")),
    ] {
        let (status, body) = call_raw(&app, Method::GET, &path, "").await;
        assert_eq!(status, StatusCode::OK, "{path}");
        check(name, &body);
        // What the extender serves is exactly what its schema writes back.
        let again = match name {
            "cluster.json" => serde_json::to_value(serde_json::from_slice::<ClusterView>(&body).unwrap()),
            "pending.json" => serde_json::to_value(serde_json::from_slice::<Vec<PendingView>>(&body).unwrap()),
            _ => serde_json::to_value(serde_json::from_slice::<Explanation>(&body).unwrap()),
        }
        .unwrap();
        assert_eq!(again, serde_json::from_slice::<serde_json::Value>(&body).unwrap(), "{path}");
    }
}
