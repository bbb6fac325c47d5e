//! Interleaved A/B of one padded forward pass vs `length_groups` on 32 mixed-length texts,
//! in one process so both arms see the same machine load.
//!
//! ```text
//! RAYON_NUM_THREADS=1 cargo run --release -p tessera-runtime --example length_groups_ab -- .cache/models/minilm
//! ```
#![allow(clippy::disallowed_methods)] // a benchmark program: it times what it compares

use std::time::Instant;

use tessera_runtime::batching::length_groups;
use tessera_runtime::{SAMPLE_TEXTS, engine};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let dir = std::env::args().nth(1).unwrap_or(".cache/models/minilm".into());
    let mut e = engine::load(std::path::Path::new(&dir), &candle_core::Device::Cpu, 0)?;
    let texts: Vec<String> = (0..32).map(|i| SAMPLE_TEXTS[i % 8].to_string()).collect();
    let enc = e.tokenizer().encode_batch(texts, true).map_err(anyhow::Error::msg)?;
    let groups = length_groups(&enc, 32);
    println!("groups: {:?}", groups.iter().map(Vec::len).collect::<Vec<_>>());
    e.embed(&enc)?; // warm-up
    let (mut one, mut grouped) = (Vec::new(), Vec::new());
    for _ in 0..9 {
        let t = Instant::now();
        e.embed(&enc)?;
        one.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        for g in &groups {
            let batch: Vec<_> = g.iter().map(|&i| enc[i].clone()).collect();
            e.embed(&batch)?;
        }
        grouped.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!("one pass: median {:.1} ms; grouped: median {:.1} ms", median(one), median(grouped));
    Ok(())
}
