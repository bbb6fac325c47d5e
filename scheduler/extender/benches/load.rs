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
}

fn opts() -> Opts {
    let mut o = Opts { nodes: 5000, offered: 500, pairs: 3000, clients: 2, workers: 2 };
    let args: Vec<String> = std::env::args().collect();
    for w in args.windows(2) {
        let v = w[1].parse().ok();
        match (w[0].as_str(), v) {
            ("--nodes", Some(v)) => o.nodes = v,
            ("--offered", Some(v)) => o.offered = v,
            ("--pairs", Some(v)) => o.pairs = v,
            ("--clients", Some(v)) => o.clients = v,
            ("--workers", Some(v)) => o.workers = v,
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
        let snap = tessera_core::testing::synth_cluster(7, o.nodes);
        let names: Vec<String> = snap.nodes().iter().map(|n| n.name.0.clone()).collect();
        println!("state: {} nodes x 8 GPUs built in {:.1}s", names.len(), t.elapsed().as_secs_f64());
        let sched = Arc::new(Scheduler::new(
            snap,
            tessera_core::policy::by_name("tessera").expect("policy"),
            Arc::new(MemoryBinder::default()),
            Arc::new(MemoryLookup::default()),
            Settings::default(),
        ));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        tokio::spawn(serve(listener, App::new(sched, Surface::ALL), std::future::pending()));

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
