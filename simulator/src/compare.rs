//! The FGD authors' published results (`analysis_allo_discrete.csv`), to compare against.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context as _, Result, bail};

/// Final (x = 130) allocation % per (trace, paper policy, seed).
#[derive(Debug, Default)]
pub struct Expected {
    finals: BTreeMap<(String, String, u64), f64>,
}

/// The paper's name for one of our baselines.
pub fn paper_policy(ours: &str) -> Option<&'static str> {
    Some(match ours {
        "random" => "01-Random",
        "dotprod" => "02-DotProd",
        "gpu-clustering" => "03-GpuClustering",
        "gpu-packing" => "04-GpuPacking",
        "bestfit" => "05-BestFit",
        "fgd" | "tessera" => "06-FGD",
        _ => return None,
    })
}

pub fn load_expected(path: &Path) -> Result<Expected> {
    let mut rdr = csv::Reader::from_path(path).with_context(|| format!("opening {}", path.display()))?;
    let headers = rdr.headers()?.clone();
    let col = |name: &str| headers.iter().position(|h| h == name);
    let (Some(w), Some(p), Some(s), Some(last)) = (col("workload"), col("sc_policy"), col("seed"), col("130")) else {
        bail!("{}: expected columns workload, sc_policy, seed and 130", path.display());
    };
    let mut e = Expected::default();
    for (i, rec) in rdr.records().enumerate() {
        let rec = rec.with_context(|| format!("{}: row {}", path.display(), i + 2))?;
        let get = |c: usize| rec.get(c).unwrap_or("");
        let Ok(seed) = get(s).parse::<u64>() else { continue };
        let Ok(v) = get(last).parse::<f64>() else { continue };
        e.finals.insert((get(w).to_owned(), get(p).to_owned(), seed), v);
    }
    Ok(e)
}

impl Expected {
    /// Mean final allocation % over the given seeds (those present).
    pub fn mean_final(&self, trace: &str, policy: &str, seeds: &[u64]) -> Option<f64> {
        let vals: Vec<f64> =
            seeds.iter().filter_map(|s| self.finals.get(&(trace.to_owned(), policy.to_owned(), *s)).copied()).collect();
        (!vals.is_empty()).then(|| vals.iter().sum::<f64>() / vals.len() as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_published_table_shape() {
        let dir = std::env::temp_dir().join(format!("tessera-sim-cmp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let p = dir.join("allo.csv");
        let mut text = String::from("workload,sc_policy,tune,seed,total_gpus");
        for x in 0..=130 {
            text.push_str(&format!(",{x}"));
        }
        text.push('\n');
        for (seed, v) in [(42, 95.0), (43, 96.0)] {
            text.push_str(&format!("openb_pod_list_default,06-FGD,1.3,{seed},6212"));
            for x in 0..=130 {
                text.push_str(&format!(",{}", if x == 130 { v } else { x as f64 }));
            }
            text.push('\n');
        }
        std::fs::write(&p, text).unwrap_or_else(|e| panic!("{e}"));
        let e = load_expected(&p).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(e.mean_final("openb_pod_list_default", "06-FGD", &[42, 43]), Some(95.5));
        assert_eq!(e.mean_final("openb_pod_list_default", "05-BestFit", &[42]), None);
        std::fs::remove_dir_all(&dir).ok();
    }
}
