//! Load benchmark: filter+prioritize pairs per second over loopback HTTP, against a synthetic
//! 5,000-node × 8-GPU cluster (`tessera_core::testing::synth_cluster`: H100 with random MIG
//! layouts, A100 NVLink quads, time-sliced L4).
//!
//! Each pair is what kube-scheduler does per pod: POST /filter, then POST /prioritize with the
//! same body. Clients keep their connections alive, as kube-scheduler's HTTP client does.
//!
//! Run: `cargo bench -p tessera-scheduler --bench load -- [--nodes 5000] [--offered 500]
//! [--pairs 3000] [--clients 2] [--workers 2]`. `--offered` is how many node names each request
//! carries (kube-scheduler's `percentageOfNodesToScore` sample; 5000 = every node).
//!
//! `--events-per-sec N [--pods 50000]`: the state instead comes from generated Nodes, GpuNodes
//! and `--pods` bound pods (8 A100-80GB GPUs per node; pods spread evenly, the first 4 on each
//! node holding one GPU through a signed assignment, the rest cpu only), fed through the live
//! scheduler's own watch path (`cluster::Watch::fed`: the reflectors' caches and handlers, and
//! `Watch::sync`, the node-by-node rebuild and the state swap). While the load runs, N pod
//! events per second go through it: a bound pod deleted, then recreated (new UID, signed again)
//! on its node. `--events-per-sec 0` is the same state with no events, the baseline.
#![allow(clippy::disallowed_methods)] // a benchmark: it times the verbs

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_scheduler::binder::MemoryBinder;
use tessera_scheduler::http::{App, Surface, serve};
use tessera_scheduler::state::{MemoryLookup, Scheduler, Settings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Opts {
    nodes: usize,
    offered: usize,
    pairs: usize,
    clients: usize,
    workers: usize,
    events_per_sec: Option<usize>,
    pods: usize,
}

fn opts() -> Opts {
    let mut o =
        Opts { nodes: 5000, offered: 500, pairs: 3000, clients: 2, workers: 2, events_per_sec: None, pods: 50_000 };
    let args: Vec<String> = std::env::args().collect();
    for w in args.windows(2) {
        let v = w[1].parse().ok();
        match (w[0].as_str(), v) {
            ("--nodes", Some(v)) => o.nodes = v,
            ("--offered", Some(v)) => o.offered = v,
            ("--pairs", Some(v)) => o.pairs = v,
            ("--clients", Some(v)) => o.clients = v,
            ("--workers", Some(v)) => o.workers = v,
            ("--events-per-sec", Some(v)) => o.events_per_sec = Some(v),
            ("--pods", Some(v)) => o.pods = v,
            _ => {}
        }
    }
    o.offered = o.offered.clamp(1, o.nodes);
    o
}

/// One keep-alive HTTP/1.1 POST; returns the status code.
async fn post(s: &mut TcpStream, path: &str, body: &[u8], buf: &mut Vec<u8>) -> u16 {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("write");
    s.write_all(body).await.expect("write");
    buf.clear();
    let mut chunk = [0u8; 16384];
    let (head_end, len) = loop {
        let n = s.read(&mut chunk).await.expect("read");
        assert!(n > 0, "server closed the connection");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0)))
                .unwrap_or(0);
            break (i + 4, len);
        }
    };
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk).await.expect("read");
        assert!(n > 0, "server closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
    buf[9..12].iter().fold(0u16, |acc, b| acc * 10 + u16::from(b - b'0'))
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let o = opts();
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(o.workers).enable_all().build().expect("runtime");
    rt.block_on(async move {
        let t = Instant::now();
        let (sched, names, churn) = match o.events_per_sec {
            Some(rate) => {
                let (sched, churn) = events::watched(o.nodes, o.pods, rate).await;
                let names = sched.with_snapshot(|s| s.nodes().iter().map(|n| n.name.0.clone()).collect());
                (sched, names, Some(churn))
            }
            None => {
                let snap = tessera_core::testing::synth_cluster(7, o.nodes);
                let names: Vec<String> = snap.nodes().iter().map(|n| n.name.0.clone()).collect();
                let sched = Arc::new(Scheduler::new(
                    snap,
                    tessera_core::policy::by_name("tessera").expect("policy"),
                    Arc::new(MemoryBinder::default()),
                    Arc::new(MemoryLookup::default()),
                    Settings::default(),
                ));
                (sched, names, None)
            }
        };
        println!("state: {} nodes x 8 GPUs built in {:.1}s", names.len(), t.elapsed().as_secs_f64());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        tokio::spawn(serve(listener, App::new(sched.clone(), Surface::ALL), std::future::pending()));

        // kube-scheduler's sample of feasible nodes: spread over the cluster.
        let stride = (names.len() / o.offered).max(1);
        let offered: Vec<&String> = names.iter().step_by(stride).take(o.offered).collect();
        let shapes = [
            (json!({"nvidia.com/mig-1g.10gb": "1"}), json!({})),
            (json!({"tessera.dev/gpu": "1"}), json!({"tessera.dev/gpu-memory": "18Gi"})),
            (json!({"nvidia.com/gpu": "1"}), json!({})),
            (json!({"nvidia.com/gpu": "4"}), json!({})),
            (json!({"tessera.dev/gpu": "1"}), json!({"tessera.dev/gpu-share": "300"})),
            (json!({"nvidia.com/mig-3g.40gb": "1"}), json!({})),
        ];
        let per_client = o.pairs / o.clients;
        let bodies: Vec<Vec<Vec<u8>>> = (0..o.clients)
            .map(|c| {
                (0..per_client)
                    .map(|i| {
                        let (limits, ann) = &shapes[i % shapes.len()];
                        let pod = json!({
                            "metadata": {"name": format!("bench-{c}-{i}"), "namespace": "bench", "uid": format!("u-{c}-{i}"), "annotations": ann},
                            "spec": {"containers": [{"name": "m", "resources": {"limits": limits, "requests": {"cpu": "2", "memory": "8Gi"}}}]}
                        });
                        serde_json::to_vec(&json!({"Pod": pod, "Nodes": null, "NodeNames": offered})).expect("encode")
                    })
                    .collect()
            })
            .collect();
        println!("request body: {} bytes, {} node names", bodies[0][0].len(), offered.len());

        // The core alone, for comparison: one evaluate per request, same demands and nodes.
        {
            let snap = tessera_core::testing::synth_cluster(7, o.nodes);
            let policy = tessera_core::policy::by_name("tessera").expect("policy");
            let demands: Vec<tessera_core::Demand> = bodies[0]
                .iter()
                .take(300)
                .map(|b| {
                    let args: tessera_scheduler::wire::ExtenderArgs = serde_json::from_slice(b).expect("decode");
                    tessera_api::pod::demand(&args.pod.expect("pod"), None).expect("demand")
                })
                .collect();
            // The workload the server derives from the same recent demands.
            let workload = tessera_core::Workload::from_demands_top(demands.iter(), 0.95);
            let ctx = tessera_core::Context { workload: &workload, seed: 0 };
            let only: Vec<tessera_core::NodeName> = offered.iter().map(|n| tessera_core::NodeName((*n).clone())).collect();
            let mut times = Vec::new();
            for (i, d) in demands.iter().enumerate() {
                let t = Instant::now();
                let v = tessera_core::policy::evaluate(&snap, d, policy.as_ref(), &ctx, Some(&only)).expect("evaluate");
                times.push(t.elapsed());
                if i < 6 {
                    let ok = v.iter().filter(|v| v.outcome.is_ok()).count();
                    println!("  core evaluate {:<40} {:>7.2} ms, {ok} of {} nodes fit", d.gpu.to_string(), t.elapsed().as_secs_f64() * 1000.0, v.len());
                }
            }
            println!("core evaluate alone (one thread, same workload): p50 {:.2} ms p99 {:.2} ms", pct(&mut times, 0.5).as_secs_f64() * 1000.0, pct(&mut times, 0.99).as_secs_f64() * 1000.0);
        }

        // Where a pair's time goes, in process (no HTTP): decode, the verb, reply encoding. Run
        // after a warm-up of every shape, so these are the memo's steady state.
        {
            let sched = Scheduler::new(
                tessera_core::testing::synth_cluster(7, o.nodes),
                tessera_core::policy::by_name("tessera").expect("policy"),
                Arc::new(MemoryBinder::default()),
                Arc::new(MemoryLookup::default()),
                Settings::default(),
            );
            for b in bodies[0].iter().take(12) {
                let args: tessera_scheduler::wire::ExtenderArgs = serde_json::from_slice(b).expect("decode");
                let _ = sched.filter_reply(args);
            }
            let reps = 60.min(bodies[0].len());
            let (mut dec, mut fil, mut fenc, mut pri, mut penc) = (vec![], vec![], vec![], vec![], vec![]);
            let mut out = Vec::new();
            for b in bodies[0].iter().skip(12).take(reps) {
                let t = Instant::now();
                let args: tessera_scheduler::wire::ExtenderArgs = serde_json::from_slice(b).expect("decode");
                let args2 = args.clone();
                dec.push(t.elapsed());
                let t = Instant::now();
                let reply = sched.filter_reply(args);
                fil.push(t.elapsed());
                let t = Instant::now();
                out.clear();
                serde_json::to_writer(&mut out, &reply).expect("encode");
                fenc.push(t.elapsed());
                let t = Instant::now();
                let list = sched.prioritize(args2).expect("prioritize");
                pri.push(t.elapsed());
                let t = Instant::now();
                out.clear();
                serde_json::to_writer(&mut out, &list).expect("encode");
                penc.push(t.elapsed());
            }
            let us = |v: &mut Vec<Duration>| pct(v, 0.5).as_secs_f64() * 1e6;
            println!(
                "in process, p50 of {reps}: decode {:.0} us, filter {:.0} us, filter reply encode {:.0} us, prioritize {:.0} us, prioritize reply encode {:.0} us",
                us(&mut dec),
                us(&mut fil),
                us(&mut fenc),
                us(&mut pri),
                us(&mut penc)
            );
        }

        // Warm-up.
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let mut buf = Vec::new();
        for b in bodies[0].iter().take(20) {
            post(&mut s, "/filter", b, &mut buf).await;
        }

        let churning = churn.map(|c| c.start(&sched));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for client in bodies {
            tasks.push(tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.expect("connect");
                s.set_nodelay(true).expect("nodelay");
                let mut buf = Vec::with_capacity(1 << 16);
                let mut lat = Vec::with_capacity(client.len());
                let mut filt = Vec::with_capacity(client.len());
                let mut prio = Vec::with_capacity(client.len());
                for b in &client {
                    let t0 = Instant::now();
                    assert_eq!(post(&mut s, "/filter", b, &mut buf).await, 200);
                    let t1 = Instant::now();
                    assert_eq!(post(&mut s, "/prioritize", b, &mut buf).await, 200);
                    let t2 = Instant::now();
                    filt.push(t1 - t0);
                    prio.push(t2 - t1);
                    lat.push(t2 - t0);
                }
                (lat, filt, prio)
            }));
        }
        let (mut lat, mut filt, mut prio) = (Vec::new(), Vec::new(), Vec::new());
        for t in tasks {
            let (l, f, p) = t.await.expect("client");
            lat.extend(l);
            filt.extend(f);
            prio.extend(p);
        }
        let secs = start.elapsed().as_secs_f64();
        if let Some(c) = churning {
            c.stop(&sched, secs).await;
        }
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "nodes={} offered={} clients={} workers={}: {} pairs in {:.2}s = {:.0} pairs/s; pair p50 {:.2} ms p99 {:.2} ms; filter p50 {:.2} ms p99 {:.2} ms; prioritize p50 {:.2} ms p99 {:.2} ms",
            o.nodes,
            o.offered,
            o.clients,
            o.workers,
            lat.len(),
            secs,
            lat.len() as f64 / secs,
            ms(pct(&mut lat, 0.5)),
            ms(pct(&mut lat, 0.99)),
            ms(pct(&mut filt, 0.5)),
            ms(pct(&mut filt, 0.99)),
            ms(pct(&mut prio, 0.5)),
            ms(pct(&mut prio, 0.99)),
        );
    });
}

/// `--events-per-sec`: the state through the live watch path, and pod events while the load runs.
mod events {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use k8s_openapi::api::core::v1::Pod;
    use kube::runtime::watcher::Event;
    use tessera_api::signing::{Keyring, Keys};
    use tessera_scheduler::binder::MemoryBinder;
    use tessera_scheduler::cluster::{Feed, Watch};
    use tessera_scheduler::state::{Scheduler, Settings};

    const KEY: &str = "k1 dGVzc2VyYS1yZWJ1aWxkLWJlbmNoLWtleS0zMmJ5dGVzLg";

    /// Pod `p` of `nodes` nodes, incarnation `gen` (a recreated pod has a new UID).
    fn pod(ring: &Keyring, nodes: usize, p: usize, generation: u64) -> Pod {
        tessera_api::synthetic::bound_pod(ring, nodes, p, &format!("uid-{p}-{generation}"), 4)
    }

    /// The pod events to send once the load starts.
    pub struct Churn {
        feed: Feed,
        ring: Keyring,
        nodes: usize,
        pods: usize,
        rate: usize,
    }

    pub struct Churning {
        stop: Arc<AtomicBool>,
        sent: Arc<AtomicU64>,
        task: tokio::task::JoinHandle<()>,
        rebuilds: (f64, f64),
    }

    /// The `tessera_rebuild_duration_seconds` count and sum so far.
    fn rebuilds(s: &Scheduler) -> (f64, f64) {
        let text = s.metrics.encode();
        let v = |suffix: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("tessera_rebuild_duration_seconds_{suffix} ")))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0.0)
        };
        (v("count"), v("sum"))
    }

    /// A live-mode scheduler whose state the watch path built from generated objects.
    pub async fn watched(nodes: usize, pods: usize, rate: usize) -> (Arc<Scheduler>, Churn) {
        let ring = Keyring::parse(KEY).expect("key");
        let (kube_nodes, gpunodes) = tessera_api::synthetic::a100_nodes(nodes);
        let kube_pods: Vec<Pod> = (0..pods).map(|p| pod(&ring, nodes, p, 0)).collect();
        let sched = Arc::new(Scheduler::new(
            tessera_core::Snapshot::default(),
            tessera_core::policy::by_name("tessera").expect("policy"),
            Arc::new(MemoryBinder::default()),
            Arc::new(tessera_scheduler::state::MemoryLookup::default()),
            Settings {
                mode: "live",
                assignment_keys: Some(Arc::new(Keys::fixed(Keyring::parse(KEY).expect("key")))),
                ..Settings::default()
            },
        ));
        let (watch, mut feed) = Watch::fed();
        tokio::spawn(watch.sync(sched.clone(), Duration::from_millis(100)));
        feed.list(kube_nodes, gpunodes, kube_pods, Vec::new());
        while sched.with_snapshot(|s| s.allocations().len()) < pods {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (sched, Churn { feed, ring, nodes, pods, rate })
    }

    impl Churn {
        /// Sends `rate` pod events per second until stopped: pod i deleted, then recreated.
        pub fn start(self, sched: &Scheduler) -> Churning {
            let stop = Arc::new(AtomicBool::new(false));
            let sent = Arc::new(AtomicU64::new(0));
            let Churn { mut feed, ring, nodes, pods, rate } = self;
            let (stop2, sent2) = (stop.clone(), sent.clone());
            let task = tokio::spawn(async move {
                if rate == 0 {
                    return;
                }
                let start = Instant::now();
                let mut live: Vec<u64> = vec![0; pods];
                let mut down: Option<usize> = None;
                let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
                let mut n = 0u64;
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                while !stop2.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
                    while n < due {
                        match down.take() {
                            Some(p) => {
                                live[p] += 1;
                                feed.pod(Event::Apply(pod(&ring, nodes, p, live[p])));
                            }
                            None => {
                                x ^= x << 13;
                                x ^= x >> 7;
                                x ^= x << 17;
                                let p = (x % pods as u64) as usize;
                                feed.pod(Event::Delete(pod(&ring, nodes, p, live[p])));
                                down = Some(p);
                            }
                        }
                        n += 1;
                        sent2.store(n, Ordering::Relaxed);
                    }
                }
            });
            Churning { stop, sent, task, rebuilds: rebuilds(sched) }
        }
    }

    impl Churning {
        pub async fn stop(self, sched: &Scheduler, secs: f64) {
            self.stop.store(true, Ordering::Relaxed);
            let _ = self.task.await;
            let (c0, s0) = self.rebuilds;
            let (c1, s1) = rebuilds(sched);
            let sent = self.sent.load(Ordering::Relaxed);
            let pods = sched.with_snapshot(|s| s.allocations().len());
            println!(
                "pod events: {sent} in {secs:.2}s = {:.0}/s; {} state updates, {:.2} ms mean, {:.0} ms in all; {pods} pods in the state",
                sent as f64 / secs,
                c1 - c0,
                if c1 > c0 { (s1 - s0) * 1e3 / (c1 - c0) } else { 0.0 },
                (s1 - s0) * 1e3
            );
        }
    }
}
