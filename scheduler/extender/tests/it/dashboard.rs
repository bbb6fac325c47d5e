//! The web dashboard: the embedded page and its JSON without sockets, then the real page in
//! headless Chromium against `tessera-scheduler --demo` (and a 300-node cluster for the
//! summary-first view).

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::TcpListener as StdListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tessera_scheduler::binder::MemoryBinder;
use tessera_scheduler::http::{App, Surface, serve};
use tessera_scheduler::state::{MemoryLookup, Scheduler, Settings};

use crate::browser::{Browser, find_chromium, http_get, in_ci};
use crate::fixtures::demo;
use crate::http::{call, pod};

// ---- the page and its JSON, without sockets -----------------------------------------------

#[tokio::test]
async fn root_serves_the_page_and_its_files_with_a_strict_content_policy() {
    let (_, _, app) = demo();
    for (path, kind) in
        [("/", "text/html"), ("/dashboard/app.css", "text/css"), ("/dashboard/app.js", "text/javascript")]
    {
        let r = app.route(&Method::GET, path, Bytes::new()).await;
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        let h = r.headers();
        assert!(h[header::CONTENT_TYPE].to_str().unwrap().starts_with(kind), "{path}: {:?}", h[header::CONTENT_TYPE]);
        let csp = h[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"), "{csp}");
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert!(body.len() > 500, "{path} is {} bytes", body.len());
    }
    let (_, page) = call(&app, Method::GET, "/", "").await;
    let page = page.as_str().unwrap();
    assert!(page.contains("<script src=\"/dashboard/app.js\"") && page.contains("href=\"/dashboard/app.css\""));
    // The verbs-only listener serves no page.
    let (sched, _, _) = demo();
    let verbs = App::new(sched, Surface::VERBS);
    assert_eq!(call(&verbs, Method::GET, "/", "").await.0, StatusCode::NOT_FOUND);
    assert_eq!(call(&verbs, Method::GET, "/api/v1/pending", "").await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn cluster_view_gives_each_gpu_its_mig_geometry() {
    let (_, _, app) = demo();
    let (_, c) = call(&app, Method::GET, "/api/v1/cluster", "").await;
    let gpu = |node: usize, i: usize| c["nodes"][node]["gpus"][i].clone();
    // H100 and A100: 8 memory and 7 compute slices, MIG mode or not; L4 cannot do MIG.
    assert_eq!((gpu(0, 0)["memorySlices"].as_u64(), gpu(0, 0)["computeSlices"].as_u64()), (Some(8), Some(7)));
    assert_eq!(gpu(0, 4)["memorySlices"], 8);
    assert_eq!(gpu(2, 0)["model"], "L4");
    assert!(gpu(2, 0)["memorySlices"].is_null() && gpu(2, 0)["computeSlices"].is_null());
}

#[tokio::test]
async fn demo_pending_pods_show_what_keeps_each_waiting() {
    let (_, _, app) = demo();
    let (status, v) = call(&app, Method::GET, "/api/v1/pending", "").await;
    assert_eq!(status, StatusCode::OK);
    let list = v.as_array().unwrap();
    let by = |pod: &str| list.iter().find(|p| p["pod"] == pod).unwrap_or_else(|| panic!("{pod} not pending: {v}"));
    let names: Vec<&str> = list.iter().map(|p| p["pod"].as_str().unwrap()).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(names, sorted, "sorted by pod");
    assert_eq!(list.len(), 7, "{v}");

    let vlm = by("vision/qwen2-vl-72b-tp8-0");
    assert_eq!(
        (vlm["state"].as_str(), vlm["fits"].as_u64(), vlm["nodes"].as_u64()),
        (Some("pending"), Some(0), Some(5))
    );
    assert_eq!(vlm["demand"], "8 whole GPUs");
    // The best H100 node has 5 GPUs it could hand out whole (its idle GPUs; MIG GPUs whose
    // instances were all free would count too); the others can never host it (wrong model).
    // The summary gives the reason that can change, without the node's name.
    assert_eq!(vlm["reason"], "needs 8 whole GPUs, 5 free");

    // The gang's third member is the bottleneck: two fit on the A100 nodes, the third cannot.
    for i in 0..3 {
        let m = by(&format!("training/vlm-finetune-{i}"));
        assert_eq!(m["gang"], "training/vlm-finetune");
        assert_eq!(m["state"], "pending");
        let reason = m["reason"].as_str().unwrap();
        assert!(
            reason.contains("gang training/vlm-finetune: member") && reason.contains("after 2 of 3 members"),
            "{reason}"
        );
    }

    // The OCR gang is planned and holds its reservation until both members bind.
    for p in ["ocr/ocr-detect-0", "ocr/ocr-recognize-0"] {
        let m = by(p);
        assert_eq!((m["state"].as_str(), m["fits"].as_u64()), (Some("reserved"), Some(1)), "{m}");
        assert_eq!(m["gang"], "ocr/ocr-pipeline");
    }
    let (_, c) = call(&app, Method::GET, "/api/v1/cluster", "").await;
    let reserved: Vec<&str> = c["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["state"] == "reserved")
        .map(|a| a["pod"].as_str().unwrap())
        .collect();
    assert_eq!(reserved, ["ocr/ocr-detect-0", "ocr/ocr-recognize-0"]);

    let bad = by("models/bge-reranker-1");
    assert!(bad["demand"].as_str().unwrap().contains("tessera.dev/gpu-memory=\"lots\""), "{bad}");

    let (status, e) = call(&app, Method::GET, "/api/v1/explain/training/vlm-finetune-2", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(e["demand"]["gang"]["min_member"], 3);
    assert!(e["nodes"].as_array().unwrap().iter().all(|n| n["reason"].as_str().unwrap().contains("does not fit")));
}

#[tokio::test]
async fn a_pending_pod_leaves_the_list_once_the_cluster_shows_it_bound() {
    let lookup = Arc::new(MemoryLookup::default());
    let sched = Arc::new(Scheduler::new(
        tessera_scheduler::demo::cluster(),
        tessera_core::policy::by_name("tessera").unwrap(),
        Arc::new(MemoryBinder::default()),
        lookup.clone(),
        Settings::default(),
    ));
    let app = App::new(sched, Surface::ALL);
    let p = pod("ml", "big", "u1", json!({"nvidia.com/gpu": "16"}), json!({}));
    let args = json!({"Pod": p, "Nodes": null, "NodeNames": ["gpu-node-a", "gpu-node-e"]}).to_string();
    let (_, f) = call(&app, Method::POST, "/filter", args).await;
    assert!(f["NodeNames"].as_array().unwrap().is_empty(), "{f}");
    // Filtered but unknown to the cluster (deleted meanwhile): not listed.
    assert_eq!(call(&app, Method::GET, "/api/v1/pending", "").await.1, json!([]));

    let mut known: k8s_openapi::api::core::v1::Pod = serde_json::from_value(p).unwrap();
    lookup.pods.write().unwrap().insert(("ml".into(), "big".into()), known.clone());
    let (_, v) = call(&app, Method::GET, "/api/v1/pending", "").await;
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    assert_eq!(
        (v[0]["pod"].as_str(), v[0]["fits"].as_u64(), v[0]["nodes"].as_u64()),
        (Some("ml/big"), Some(0), Some(2))
    );
    assert_eq!(v[0]["demand"], "16 whole GPUs");

    // Bound by someone else: gone from the list.
    known.spec.as_mut().unwrap().node_name = Some("gpu-node-e".into());
    lookup.pods.write().unwrap().insert(("ml".into(), "big".into()), known);
    assert_eq!(call(&app, Method::GET, "/api/v1/pending", "").await.1, json!([]));
}

// ---- the page in a real browser -----------------------------------------------------------

/// `tessera-scheduler --demo` on a free loopback port, stopped on drop.
struct DemoServer {
    child: Child,
    addr: String,
}

impl DemoServer {
    fn start() -> DemoServer {
        let port = StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(env!("CARGO_BIN_EXE_tessera-scheduler"))
            .args(["--demo", "--listen", &addr])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let server = DemoServer { child, addr };
        let until = Instant::now() + Duration::from_secs(30);
        while !matches!(http_get(&server.addr, "/readyz"), Ok((200, _))) {
            assert!(Instant::now() < until, "tessera-scheduler --demo did not become ready on {}", server.addr);
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn json(&self, path: &str) -> Value {
        let (status, body) = http_get(&self.addr, path).unwrap();
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }
}

impl Drop for DemoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An in-process server over `tessera_core::testing::synth_cluster(seed, nodes)`.
fn synthetic_server(nodes: usize) -> (String, tokio::sync::oneshot::Sender<()>, std::thread::JoinHandle<()>) {
    let sched = Arc::new(Scheduler::new(
        tessera_core::testing::synth_cluster(7, nodes),
        tessera_core::policy::by_name("tessera").unwrap(),
        Arc::new(MemoryBinder::default()),
        Arc::new(MemoryLookup::default()),
        Settings::default(),
    ));
    let listener = StdListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            serve(listener, App::new(sched, Surface::ALL), async {
                let _ = rx.await;
            })
            .await;
        });
    });
    (addr, tx, thread)
}

/// Every MIG instance as (gpu, start, memory slices, profile, holder): from the API, and as the
/// page draws it, reading the position back from the rendered geometry (the instance's left
/// edge and width over its GPU's track, in memory slices).
type Drawn = BTreeSet<(String, u64, u64, String, String)>;

fn instances_in_api(c: &Value) -> Drawn {
    let mut out = Drawn::new();
    for n in c["nodes"].as_array().unwrap() {
        for g in n["gpus"].as_array().unwrap() {
            for m in g["mig"].as_array().unwrap() {
                out.insert((
                    format!("{}/{}", n["name"].as_str().unwrap(), g["index"]),
                    m["start"].as_u64().unwrap(),
                    m["memorySlices"].as_u64().unwrap(),
                    m["profile"].as_str().unwrap().to_owned(),
                    m["holder"].as_str().unwrap_or_default().to_owned(),
                ));
            }
        }
    }
    out
}

const DRAWN_INSTANCES: &str = r#"Array.from(document.querySelectorAll('.inst')).map(el => {
    const track = el.closest('.track');
    const slots = Number(track.dataset.slots);
    const unit = track.clientWidth / slots;
    return [el.closest('.gpu').dataset.gpu, Math.round(el.offsetLeft / unit), Math.round(el.offsetWidth / unit),
            el.dataset.profile, el.dataset.holder];
})"#;

fn instances_on_page(b: &mut Browser) -> Drawn {
    b.eval(DRAWN_INSTANCES)
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r[0].as_str().unwrap().to_owned(),
                r[1].as_u64().unwrap(),
                r[2].as_u64().unwrap(),
                r[3].as_str().unwrap().to_owned(),
                r[4].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn count(b: &mut Browser, selector: &str) -> u64 {
    let sel = serde_json::to_string(selector).unwrap();
    b.eval(&format!("document.querySelectorAll({sel}).length")).as_u64().unwrap()
}

const WAIT: Duration = Duration::from_secs(30);

/// The explain panel's text once it shows `pod`, else "".
fn explained(pod: &str) -> String {
    format!(
        "(() => {{ const e = document.getElementById('explain'); \
         return e.dataset.pod === '{pod}' && e.dataset.ready === '1' ? e.innerText : ''; }})()"
    )
}

#[test]
fn dashboard_draws_the_demo_cluster_and_explains_a_pending_gang_in_chromium() {
    let Some(chromium) = find_chromium() else {
        assert!(!in_ci(), "CI is set but no chromium was found (PATH or $CHROMIUM): scripts/setup.sh installs it");
        // Written past the test harness's capture, so it shows in `cargo test` output.
        let _ = writeln!(std::io::stderr().lock(), "skipping the dashboard browser test: no chromium on PATH");
        return;
    };
    let server = DemoServer::start();
    let mut b = Browser::launch(&chromium);
    b.navigate(&format!("http://{}/", server.addr));
    b.wait_for("document.body && document.body.dataset.generation && document.querySelectorAll('.gpu').length", WAIT);

    // Everything the API reports is drawn: GPUs, MIG instances at their real positions,
    // every holder, the reservations, the pending pods.
    let c = server.json("/api/v1/cluster");
    let gpus: usize = c["nodes"].as_array().unwrap().iter().map(|n| n["gpus"].as_array().unwrap().len()).sum();
    let api = instances_in_api(&c);
    assert_eq!(count(&mut b, ".node"), 5);
    assert_eq!(count(&mut b, ".gpu") as usize, gpus);
    assert_eq!(count(&mut b, ".inst") as usize, api.len());
    let mig_gpus = c["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|n| n["gpus"].as_array().unwrap())
        .filter(|g| g["mode"] == "mig")
        .count();
    assert!(mig_gpus >= 4, "the demo partitions GPUs: {mig_gpus}");
    assert_eq!(count(&mut b, ".gpu[data-mode=mig]") as usize, mig_gpus);
    let drawn = instances_on_page(&mut b);
    assert_eq!(drawn, api, "MIG instances drawn vs /api/v1/cluster");
    let reserved_api: Vec<&str> = c["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["state"] == "reserved")
        .map(|a| a["pod"].as_str().unwrap())
        .collect();
    assert_eq!(count(&mut b, ".inst.reserved") as usize, reserved_api.len());
    let mut holders_api: BTreeSet<String> = api.iter().filter(|i| !i.4.is_empty()).map(|i| i.4.clone()).collect();
    for n in c["nodes"].as_array().unwrap() {
        for g in n["gpus"].as_array().unwrap() {
            holders_api.extend(g["holders"].as_array().unwrap().iter().map(|h| h.as_str().unwrap().to_owned()));
        }
    }
    let holders_page: BTreeSet<String> = serde_json::from_value(b.eval(
        "Array.from(new Set(Array.from(document.querySelectorAll('.slice.held, .slice.reserved')).map(e => e.dataset.holder)))",
    ))
    .unwrap();
    assert_eq!(holders_page, holders_api);
    let pending = server.json("/api/v1/pending");
    assert_eq!(count(&mut b, ".pending-pod") as usize, pending.as_array().unwrap().len());
    let pools = b.eval("Array.from(document.querySelectorAll('.pool')).map(p => p.dataset.pool)");
    assert_eq!(pools, json!(["all pools", "a100", "h100", "l4"]));

    // Click a member of the planned gang: it holds reserved slices, outlined on the map.
    let pod = "ocr/ocr-recognize-0";
    b.click(&format!(".pending-pod[data-pod=\"{pod}\"]"));
    let text = b.wait_for(&explained(pod), WAIT);
    let text = text.as_str().unwrap();
    assert!(text.contains("Holds a gang reservation: gpu-node-b GPU 1: MIG 2g.20gb at memory slice 4"), "{text}");
    assert!(text.contains("1 of 5 offered nodes fit"), "{text}");
    let picked = b.eval("Array.from(document.querySelectorAll('.slice.picked')).map(e => e.closest('.gpu').dataset.gpu + '@' + e.dataset.start)");
    assert_eq!(picked, json!(["gpu-node-b/1@4"]));

    // Click the gang member that does not fit and read why.
    let pod = "training/vlm-finetune-2";
    b.click(&format!(".pending-pod[data-pod=\"{pod}\"]"));
    let text = b.wait_for(&explained(pod), WAIT);
    let text = text.as_str().unwrap();
    let e = server.json(&format!("/api/v1/explain/{pod}"));
    assert!(text.contains("Gang bottleneck"), "{text}");
    assert!(text.contains("0 of 5 offered nodes fit"), "{text}");
    for n in e["nodes"].as_array().unwrap() {
        let node = n["node"].as_str().unwrap();
        let reason = n["reason"].as_str().unwrap();
        let reason = reason.strip_prefix(&format!("node {node}: ")).unwrap_or(reason);
        assert!(text.contains(reason), "explanation lacks {node}'s reason {reason:?}:\n{text}");
    }
    assert!(text.contains("4 whole GPUs") && text.contains("A100-80GB"), "{text}");

    // Filters: one pool, then one namespace.
    b.eval("(() => { const s = document.getElementById('f-pool'); s.value = 'a100'; s.dispatchEvent(new Event('change')); })()");
    assert_eq!(count(&mut b, ".gpu"), 16);
    assert_eq!(count(&mut b, ".pool"), 1);
    b.eval(
        "(() => { const s = document.getElementById('f-pool'); s.value = ''; s.dispatchEvent(new Event('change')); \
            const n = document.getElementById('f-ns'); n.value = 'ocr'; n.dispatchEvent(new Event('change')); })()",
    );
    assert_eq!(count(&mut b, ".node"), 1, "only gpu-node-b holds ocr pods");
    assert_eq!(count(&mut b, ".pending-pod"), 2);
    b.eval(
        "(() => { const n = document.getElementById('f-ns'); n.value = ''; n.dispatchEvent(new Event('change')); })()",
    );
    assert_eq!(count(&mut b, ".gpu") as usize, gpus);

    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    b.screenshot(&shot, true);
    let _ = writeln!(std::io::stderr().lock(), "dashboard screenshot: {}", shot.display());
    assert!(b.page_errors.is_empty(), "page errors: {:?}", b.page_errors);

    // Summary first on a large cluster: 100 nodes in full, the rest as tiles that open.
    let (addr, stop, thread) = synthetic_server(300);
    b.navigate(&format!("http://{addr}/"));
    b.wait_for("document.body && document.body.dataset.generation && document.querySelectorAll('.tile').length", WAIT);
    assert_eq!(count(&mut b, ".node"), 100);
    assert_eq!(count(&mut b, ".tile"), 300);
    assert_eq!(count(&mut b, ".tile.collapsed"), 200);
    let picked = b.eval("document.querySelector('.tile.collapsed').dataset.node");
    b.click(".tile.collapsed");
    assert_eq!(count(&mut b, ".node"), 101);
    assert_eq!(count(&mut b, ".tile.collapsed"), 199);
    assert_eq!(b.eval("document.querySelector('.node').dataset.node"), picked, "the opened node comes first");
    let big = {
        let (status, body) = http_get(&addr, "/api/v1/cluster").unwrap();
        assert_eq!(status, 200);
        serde_json::from_str::<Value>(&body).unwrap()
    };
    let pools: BTreeSet<&str> = big["nodes"].as_array().unwrap().iter().map(|n| n["pool"].as_str().unwrap()).collect();
    assert_eq!(count(&mut b, ".tile-group") as usize, pools.len(), "one group of tiles per pool");
    let opened: Vec<String> =
        serde_json::from_value(b.eval("Array.from(document.querySelectorAll('.node')).map(n => n.dataset.node)"))
            .unwrap();
    let drawn = instances_on_page(&mut b);
    let want: Drawn = instances_in_api(&big)
        .into_iter()
        .filter(|i| opened.iter().any(|n| i.0.starts_with(&format!("{n}/"))))
        .collect();
    assert!(!want.is_empty());
    assert_eq!(drawn, want, "MIG instances of the drawn nodes");
    let shot_big = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-300-nodes.png");
    b.eval("window.scrollTo(0, 0)");
    b.screenshot(&shot_big, false);
    assert!(b.page_errors.is_empty(), "page errors: {:?}", b.page_errors);
    drop(b);
    let _ = stop.send(());
    thread.join().unwrap();
}
