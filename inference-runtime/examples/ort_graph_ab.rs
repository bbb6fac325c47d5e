//! Interleaved A/B of ONNX embedding folders (e.g. the packed and the padded MiniLM graph) on the
//! benchmark's 32 texts, in one process so every arm sees the same machine load: each round runs
//! every folder once as one pass and once as the batcher runs it (`length_groups`), in an order
//! rotated per round. One intra-op thread.
//!
//! ```text
//! cargo run --release -p tessera-runtime --example ort_graph_ab -- \
//!   .cache/models/onnxruntime/libonnxruntime.so.1.31.1 .cache/models/minilm-onnx .cache/models/minilm-onnx-padded
//! ```
#![allow(clippy::disallowed_methods)] // a benchmark program: it times what it compares

use std::path::PathBuf;
use std::time::Instant;

use tessera_runtime::batching::length_groups;
use tessera_runtime::config::{ModelSpec, Serving};
use tessera_runtime::engine::{self, OrtOptions};
use tessera_runtime::{SAMPLE_TEXTS, engine::Engine};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let library = args.next().ok_or_else(|| anyhow::anyhow!("usage: ort_graph_ab LIBRARY DIR [DIR...]"))?;
    let dirs: Vec<PathBuf> = args.map(PathBuf::from).collect();
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(21);
    let opts = OrtOptions { library: Some(library.into()), threads: 1 };
    let mut engines: Vec<Box<dyn Engine>> = Vec::new();
    for dir in &dirs {
        let spec = ModelSpec::new("ab", dir.clone());
        let plan = engine::plan(&spec, &Serving::default().for_model(&spec))?;
        engines.push(engine::load_spec(&spec, &plan, &candle_core::Device::Cpu, &opts)?);
    }
    let texts: Vec<String> = (0..32).map(|i| SAMPLE_TEXTS[i % 8].to_string()).collect();
    let enc = engines[0].tokenizer().encode_batch(texts, true).map_err(anyhow::Error::msg)?;
    let groups = length_groups(&enc, 32);
    let tokens: usize = enc.iter().map(|e| e.len()).sum();
    let padded = enc.iter().map(|e| e.len()).max().unwrap_or(0) * enc.len();
    println!(
        "32 texts: {tokens} tokens, {padded} padded to the longest; groups {:?}",
        groups.iter().map(Vec::len).collect::<Vec<_>>()
    );
    for e in &mut engines {
        e.embed(&enc)?; // warm-up
    }
    let n = engines.len();
    let mut times = vec![(Vec::new(), Vec::new()); n];
    for r in 0..rounds {
        for k in 0..n {
            let i = (k + r) % n;
            let e = &mut engines[i];
            let t = Instant::now();
            e.embed(&enc)?;
            times[i].0.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            for g in &groups {
                let batch: Vec<_> = g.iter().map(|&j| enc[j].clone()).collect();
                e.embed(&batch)?;
            }
            times[i].1.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    for ((dir, (one, grouped)), e) in dirs.iter().zip(times).zip(&engines) {
        println!(
            "{} (packs tokens: {}): one pass median {:.1} ms (min {:.1}); grouped median {:.1} ms (min {:.1})",
            dir.display(),
            e.packs_tokens(),
            median(one.clone()),
            one.iter().copied().fold(f64::MAX, f64::min),
            median(grouped.clone()),
            grouped.iter().copied().fold(f64::MAX, f64::min),
        );
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average after: {}", load.trim());
    Ok(())
}
