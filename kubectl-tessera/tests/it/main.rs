//! `kubectl-tessera` end to end: the built binary against a loopback HTTP server that serves
//! recorded scheduler answers, and against a stand-in `kubectl` script.

mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use serde_json::Value;
use support::{Reply, Server, fixture, run};

#[test]
fn status_lists_every_gpu_and_slice_with_its_holder() {
    let server = Server::start(vec![("/api/v1/cluster", Reply::ok(fixture("cluster.json")))]);
    let out = run(&["status", "--server", &server.url()]).success();
    assert!(out.contains("mode live  policy tessera  generation 42  leader yes"), "{out}");
    let line = |needle: &[&str]| {
        out.lines()
            .find(|l| needle.iter().all(|n| l.contains(n)))
            .unwrap_or_else(|| panic!("no line with {needle:?} in\n{out}"))
            .to_owned()
    };
    line(&["gpu-a", "0", "H100-80GB", "full", "whole", "default/vlm-34b-0"]);
    line(&["gpu-a", "1", "mig", "2g.20gb@0", "default/ocr-1"]);
    line(&["gpu-a", "1", "mig", "1g.10gb@2", "default/minilm-2"]);
    line(&["gpu-a", "1", "mig", "1g.10gb@3", "free"]);
    line(&["gpu-a", "1", "(free slices)", "room for up to 3g.40gb"]);
    line(&["gpu-a", "2", "H100-80GB (unhealthy)", "whole", "free"]);
    line(&["gpu-b", "L4", "shared", "shared 300/1000m", "default/asr-0"]);
    line(&["cpu-1", "no GPUs"]);
    // Packing per pool and for the cluster.
    line(&["H100-80GB", "47.6%", "250"]);
    line(&["(cluster)", "3", "4", "43.2%", "1", "310", "5"]);
    assert_eq!(server.paths(), vec!["/api/v1/cluster"]);
}

#[test]
fn status_of_one_node_leaves_the_others_and_the_pool_summary_out() {
    let server = Server::start(vec![("/api/v1/cluster", Reply::ok(fixture("cluster.json")))]);
    let out = run(&["status", "--node", "gpu-b", "--server", &server.url()]).success();
    assert!(out.contains("gpu-b") && !out.contains("gpu-a") && !out.contains("ALLOCATED"), "{out}");
    let server = Server::start(vec![("/api/v1/cluster", Reply::ok(fixture("cluster.json")))]);
    let out = run(&["status", "--node", "nope", "--server", &server.url()]).success();
    assert!(out.contains("node nope is not in the scheduler's view"), "{out}");
}

#[test]
fn status_json_is_the_scheduler_answer_unchanged() {
    let server = Server::start(vec![("/api/v1/cluster", Reply::ok(fixture("cluster.json")))]);
    let out = run(&["status", "-o", "json", "--server", &server.url()]).success();
    let got: Value = serde_json::from_str(&out).unwrap();
    let want: Value = serde_json::from_str(&fixture("cluster.json")).unwrap();
    assert_eq!(got, want);
}

#[test]
fn explain_gives_every_node_verdict_and_a_summary() {
    let server = Server::start(vec![("/api/v1/explain/ml/llm-70b", Reply::ok(fixture("explain-pending.json")))]);
    let out = run(&["explain", "llm-70b", "-n", "ml", "--server", &server.url()]).success();
    assert!(out.starts_with("Pod ml/llm-70b\n"), "{out}");
    let demand = out.lines().find_map(|l| l.strip_prefix("Demand: ")).expect("a Demand line");
    let want: Value = serde_json::from_str(&fixture("explain-pending.json")).unwrap();
    assert_eq!(serde_json::from_str::<Value>(demand).unwrap(), want["demand"]);
    assert!(out.contains("1 of 3 node(s) fit; 1 cannot host it now (capacity may free up), 1 never can."), "{out}");
    assert!(out.contains("The cluster has changed since this pod was last filtered"), "{out}");
    let row = out.lines().find(|l| l.starts_with("gpu-b")).unwrap();
    assert!(row.contains("unresolvable") && row.contains("L4 has 1 GPU; the pod needs 4"), "{row}");
    let row = out.lines().find(|l| l.starts_with("gpu-c")).unwrap();
    assert!(row.contains("fits") && row.contains("7.50"), "{row}");
}

#[test]
fn explain_accepts_namespace_slash_name_and_shows_the_devices_held() {
    let server = Server::start(vec![("/api/v1/explain/default/minilm-2", Reply::ok(fixture("explain-bound.json")))]);
    let out = run(&["explain", "default/minilm-2", "-n", "ignored", "--server", &server.url()]).success();
    assert!(out.contains("Holds on node gpu-a: MIG g1 at slice 2 of GPU 1"), "{out}");
    assert_eq!(server.paths(), vec!["/api/v1/explain/default/minilm-2"]);
}

#[test]
fn explain_of_a_pod_the_scheduler_never_saw_fails_with_its_message() {
    // The body as tessera-scheduler writes it: the message under `Error`.
    let body = r#"{"Error":"pod default/ghost has not been filtered by this replica and holds no devices"}"#;
    let server = Server::start(vec![("/api/v1/explain/default/ghost", Reply { status: 404, body: body.into() })]);
    let err = run(&["explain", "ghost", "--server", &server.url()]).failure();
    assert!(
        err.contains("HTTP 404: pod default/ghost has not been filtered by this replica and holds no devices"),
        "{err}"
    );
    assert!(!err.contains(r#"{"Error""#), "the message, not the JSON body: {err}");
}

#[test]
fn an_unreachable_scheduler_is_named_in_the_error() {
    let port = support::closed_port();
    let err = run(&["status", "--server", &format!("http://127.0.0.1:{port}")]).failure();
    assert!(err.contains(&format!("connecting to 127.0.0.1:{port}")), "{err}");
}

/// A stand-in kubectl: logs its arguments, answers from files named after them.
fn fake_kubectl(dir: &Path, script_body: &str) -> PathBuf {
    let path = dir.join("kubectl");
    std::fs::write(&path, format!("#!/bin/sh\necho \"$@\" >> '{}'\n{script_body}", dir.join("args.log").display()))
        .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn without_server_status_goes_through_the_api_servers_service_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = dir.path().join("cluster.json");
    std::fs::write(&cluster, fixture("cluster.json")).unwrap();
    let kubectl = fake_kubectl(dir.path(), &format!("cat '{}'\n", cluster.display()));
    let out = run(&["status", "--context", "prod", "--via", "proxy", "--kubectl", kubectl.to_str().unwrap()]).success();
    assert!(out.contains("2g.20gb@0"), "{out}");
    let args = std::fs::read_to_string(dir.path().join("args.log")).unwrap();
    assert_eq!(
        args.trim(),
        "--context prod get --raw /api/v1/namespaces/tessera-system/services/http:tessera-scheduler:8889/proxy/api/v1/cluster"
    );
}

#[test]
fn without_server_status_port_forwards_to_the_service_and_stops_the_forward() {
    let server = Server::start(vec![("/api/v1/cluster", Reply::ok(fixture("cluster.json")))]);
    let port = server.url().rsplit(':').next().unwrap().trim_end_matches('/').to_owned();
    let dir = tempfile::tempdir().unwrap();
    let pid = dir.path().join("forward.pid");
    // Says where it forwards (the recorded-answers server), then waits to be stopped.
    let script = format!(
        "echo $$ > '{}'\necho 'Forwarding from 127.0.0.1:{port} -> 8889'\necho 'Forwarding from [::1]:{port} -> 8889'\nexec sleep 60\n",
        pid.display()
    );
    let kubectl = fake_kubectl(dir.path(), &script);
    let out = run(&["status", "--context", "prod", "--kubectl", kubectl.to_str().unwrap()]).success();
    assert!(out.contains("2g.20gb@0"), "{out}");
    let args = std::fs::read_to_string(dir.path().join("args.log")).unwrap();
    assert_eq!(
        args.trim(),
        "--context prod port-forward -n tessera-system svc/tessera-scheduler :8889 --address 127.0.0.1"
    );
    let pid = std::fs::read_to_string(&pid).unwrap();
    let alive = std::path::Path::new("/proc").join(pid.trim()).join("status");
    let state = std::fs::read_to_string(&alive).unwrap_or_default();
    assert!(
        !state.lines().any(|l| l.starts_with("State:") && !l.contains("zombie")),
        "the forward still runs: {state}"
    );
}

#[test]
fn a_failing_port_forward_is_reported_with_kubectls_message() {
    let dir = tempfile::tempdir().unwrap();
    let kubectl = fake_kubectl(
        dir.path(),
        "echo 'Error from server (NotFound): services \"tessera-scheduler\" not found' >&2; exit 1\n",
    );
    let err = run(&["status", "--kubectl", kubectl.to_str().unwrap()]).failure();
    assert!(
        err.contains("kubectl port-forward -n tessera-system svc/tessera-scheduler :8889 --address 127.0.0.1 failed"),
        "{err}"
    );
    assert!(err.contains("services \"tessera-scheduler\" not found"), "{err}");
}

#[test]
fn capture_collects_every_kind_scrubs_secrets_and_notes_missing_crds() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"case "$*" in
  "config current-context") echo kind-dev ;;
  "get nodes -o json") echo '{"kind":"List","items":[{"metadata":{"name":"gpu-a","managedFields":[{"manager":"kubelet"}]}}]}' ;;
  "get pods -o json --all-namespaces") echo '{"kind":"List","items":[{"metadata":{"name":"p","namespace":"default"},"spec":{"schedulerName":"tessera","containers":[{"name":"c","env":[{"name":"API_KEY","value":"hunter2"}]}]}}]}' ;;
  "get gpunodes.tessera.dev -o json") echo '{"kind":"List","items":[{"metadata":{"name":"gpu-a"},"status":{"gpus":[]}}]}' ;;
  *) echo 'error: the server doesn'"'"'t have a resource type "podgroups"' >&2; exit 1 ;;
esac
"#;
    let kubectl = fake_kubectl(dir.path(), script);
    let file = dir.path().join("capture.json");
    run(&["capture", "-f", file.to_str().unwrap(), "--kubectl", kubectl.to_str().unwrap()]).success();
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(doc["kind"], "TesseraCapture");
    assert_eq!(doc["version"], 1);
    assert_eq!(doc["context"], "kind-dev");
    assert_eq!(doc["nodes"][0]["metadata"]["name"], "gpu-a");
    assert!(doc["nodes"][0]["metadata"].get("managedFields").is_none());
    assert_eq!(doc["pods"][0]["spec"]["containers"][0]["env"][0]["value"], "(removed)");
    assert_eq!(doc["gpuNodes"].as_array().unwrap().len(), 1);
    assert_eq!(doc["podGroups"], Value::Array(vec![]));
    assert!(doc["notes"][0].as_str().unwrap().contains("podgroups.scheduling.x-k8s.io: not served"), "{doc}");
    assert!(!doc.to_string().contains("hunter2"));
}

#[test]
fn capture_fails_when_kubectl_cannot_list_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let kubectl =
        fake_kubectl(dir.path(), "echo 'error: You must be logged in to the server (Unauthorized)' >&2; exit 1\n");
    let err = run(&["capture", "--kubectl", kubectl.to_str().unwrap()]).failure();
    assert!(err.contains("kubectl get nodes -o json failed") && err.contains("Unauthorized"), "{err}");
}

// Answers recorded from `tessera-scheduler --demo` after one filter of the extender's
// `filter-args.json` (pod ml/train-worker-0, a gang of one).

#[test]
fn status_of_a_recorded_demo_cluster_shows_every_gpu_and_every_held_slice() {
    status_shows_every_gpu_and_every_held_slice(fixture("cluster-demo.json"));
}

/// The scheduler's golden answers, written by its own test from the demo cluster.
fn golden(name: &str) -> String {
    let path = format!("{}/../scheduler/api/fixtures/views/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn status_of_the_schedulers_golden_answer_shows_every_gpu_and_every_held_slice() {
    status_shows_every_gpu_and_every_held_slice(golden("cluster.json"));
}

#[test]
fn explain_of_the_schedulers_golden_answer_shows_the_reservation_and_every_verdict() {
    let recorded = golden("explain.json");
    let e: Value = serde_json::from_str(&recorded).unwrap();
    // The gang member the scheduler's golden test explains.
    assert_eq!(e["pod"], "ocr/ocr-detect-0");
    let server = Server::start(vec![("/api/v1/explain/ocr/ocr-detect-0", Reply::ok(recorded))]);
    let out = run(&["explain", "ocr/ocr-detect-0", "--server", &server.url()]).success();
    let node = e["allocation"]["node"].as_str().unwrap();
    assert!(out.contains(&format!("Reserved (gang plan, waiting for every member) on node {node}: ")), "{out}");
    let nodes = e["nodes"].as_array().unwrap();
    let count = |r: &str| nodes.iter().filter(|n| n["result"] == r).count();
    assert!(
        out.contains(&format!(
            "{} of {} node(s) fit; {} cannot host it now (capacity may free up), {} never can.",
            count("fits"),
            nodes.len(),
            count("unschedulable"),
            count("unresolvable")
        )),
        "{out}"
    );
    for n in nodes {
        let name = n["node"].as_str().unwrap();
        assert!(out.lines().any(|l| l.starts_with(name) && l.contains(n["result"].as_str().unwrap())), "{out}");
    }
}

fn status_shows_every_gpu_and_every_held_slice(recorded: String) {
    let view: Value = serde_json::from_str(&recorded).unwrap();
    let server = Server::start(vec![("/api/v1/cluster", Reply::ok(recorded))]);
    let out = run(&["status", "--server", &server.url()]).success();
    let mut held = 0;
    for node in view["nodes"].as_array().unwrap() {
        let name = node["name"].as_str().unwrap();
        for gpu in node["gpus"].as_array().unwrap() {
            let index = gpu["index"].to_string();
            let rows: Vec<&str> = out
                .lines()
                .filter(|l| {
                    l.split_whitespace().next() == Some(name) && l.split_whitespace().nth(2) == Some(index.as_str())
                })
                .collect();
            assert!(!rows.is_empty(), "{name} GPU {index} missing from\n{out}");
            for m in gpu["mig"].as_array().unwrap() {
                let slice = format!("{}@{}", m["profile"].as_str().unwrap(), m["start"]);
                let holder = m["holder"].as_str().unwrap_or("free");
                held += usize::from(m["holder"].is_string());
                assert!(
                    rows.iter().any(|r| r.contains(&slice) && r.ends_with(holder)),
                    "{name} GPU {index} {slice} held by {holder} missing from\n{out}"
                );
            }
            for h in gpu["holders"].as_array().unwrap() {
                assert!(rows.iter().any(|r| r.contains(h.as_str().unwrap())), "{h} missing from\n{out}");
            }
        }
    }
    assert!(held > 5, "the recorded cluster should hold several MIG slices, found {held}");
    for pool in view["packing"]["pools"].as_object().unwrap().keys() {
        assert!(
            out.lines().any(|l| l.starts_with(pool.as_str()) && l.contains('%')),
            "pool {pool} missing from\n{out}"
        );
    }
}

#[test]
fn explain_of_a_recorded_gang_member_shows_its_reservation_and_the_node_reasons() {
    let server = Server::start(vec![("/api/v1/explain/ml/train-worker-0", Reply::ok(fixture("explain-demo.json")))]);
    let out = run(&["explain", "ml/train-worker-0", "--server", &server.url()]).success();
    assert!(
        out.contains("Reserved (gang plan, waiting for every member) on node gpu-node-a: MIG g1 at slice 6 of GPU 0"),
        "{out}"
    );
    assert!(out.contains("1 of 3 node(s) fit; 1 cannot host it now (capacity may free up), 1 never can."), "{out}");
    assert!(out.contains("no GPU offers MIG profile 1g.10gb"), "{out}");
}
