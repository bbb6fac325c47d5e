//! Generated openb trace variants: one member of a workload family, made from the default pod
//! list with a seed, the way the FGD artifact's variants are made from it.
//!
//! The published variants (`openb_pod_list_{cpuXXX,gpushareXX,multigpuXX,gpuspecXX}.csv`) keep
//! the default trace's pods and change one proportion:
//!
//! | family | level means | what changes |
//! |---|---|---|
//! | `cpu` | CPU-only pods per mille of all pods (`cpu250` = 25%) | GPU pods all kept; CPU-only pods a random subset, or all of them plus copies drawn with replacement |
//! | `gpushare` | % of the GPU request from time-sliced shares | CPU-only pods kept, GPU pod count kept; shares drawn with replacement, other GPU pods a random subset (or all plus copies) |
//! | `multigpu` | % of the GPU request from pods of ≥ 2 GPUs | every pod kept; copies of multi-GPU pods drawn with replacement and appended until the added request is the smallest whole hundred GPUs that reaches the level |
//! | `gpuspec` | % of the GPU request from pods with a GPU-model constraint | every pod kept; constraints taken from a pod list that carries them (`--spec-source`, a published gpuspec file) |
//!
//! These rules were read off the published files: `cpu100` holds every GPU pod of the default
//! and 789 of its 1,088 CPU-only pods, none twice; `gpushare40` keeps the 1,088 CPU-only pods and
//! the 7,064 GPU pods' count, with shares repeated as a draw with replacement (Poisson-like
//! multiplicities) and whole-GPU pods a subset; `multigpu20` and `multigpu30` are the default
//! followed by 1,000 and 2,000 GPUs of multi-GPU copies; `gpuspec20` is the default with real
//! constraints on 20.4% of the GPU request, mostly on whole-GPU pods (so constraints cannot be
//! drawn at random, independent of the pod). Levels above the spec source's own are filled by
//! drawing, for more pods, the constraint of a random constrained pod of the same kind (share,
//! one whole GPU, several GPUs): a model, not a published rule.

use anyhow::{Result, bail};
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::trace::PodRow;

/// A workload family of the FGD artifact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Cpu,
    Gpushare,
    Multigpu,
    Gpuspec,
}

impl Family {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "cpu" => Family::Cpu,
            "gpushare" => Family::Gpushare,
            "multigpu" => Family::Multigpu,
            "gpuspec" => Family::Gpuspec,
            other => bail!("unknown family {other:?}; use cpu, gpushare, multigpu or gpuspec"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::Cpu => "cpu",
            Family::Gpushare => "gpushare",
            Family::Multigpu => "multigpu",
            Family::Gpuspec => "gpuspec",
        }
    }

    /// The artifact's file-name label for a level (`cpu050`, `gpushare40`).
    pub fn label(self, level: u32) -> String {
        match self {
            Family::Cpu => format!("cpu{level:03}"),
            f => format!("{}{level}", f.name()),
        }
    }

    /// Largest level that makes sense (cpu: per mille, others: percent).
    fn max_level(self) -> u32 {
        match self {
            Family::Cpu => 999,
            _ => 100,
        }
    }
}

fn is_share(p: &PodRow) -> bool {
    p.num_gpu == 1 && p.gpu_milli < 1000
}

fn is_multi(p: &PodRow) -> bool {
    p.num_gpu >= 2
}

/// The kind a GPU constraint is drawn by when filling levels above the spec source's.
fn kind(p: &PodRow) -> u8 {
    match p.num_gpu {
        0 => 0,
        1 if p.gpu_milli < 1000 => 1,
        1 => 2,
        _ => 3,
    }
}

fn request(pods: &[PodRow]) -> u64 {
    pods.iter().map(PodRow::gpu_request_milli).sum()
}

/// `n` pods from `pool`: a random subset in their original order when there are enough, else
/// all of them followed by copies drawn with replacement.
fn subset_or_more(pool: &[PodRow], n: usize, rng: &mut ChaCha8Rng) -> Vec<PodRow> {
    if n <= pool.len() {
        let mut idx: Vec<usize> = (0..pool.len()).collect();
        idx.shuffle(rng);
        idx.truncate(n);
        idx.sort_unstable();
        return idx.into_iter().map(|i| pool[i].clone()).collect();
    }
    let mut out = pool.to_vec();
    if pool.is_empty() {
        return out;
    }
    while out.len() < n {
        out.push(pool[rng.random_range(0..pool.len())].clone());
    }
    out
}

/// Generates one family member from the default pod list. `spec_source` (gpuspec only) is a pod
/// list whose rows are the default's, in order, with `gpu_spec` set on the constrained ones.
/// Pods are renamed `openb-pod-NNNN` in output order (the replay sorts by name, then shuffles).
pub fn generate(
    default: &[PodRow],
    family: Family,
    level: u32,
    seed: u64,
    spec_source: Option<&[PodRow]>,
) -> Result<Vec<PodRow>> {
    if default.is_empty() {
        bail!("the default pod list is empty");
    }
    if level > family.max_level() {
        bail!("level {level} is above {} for the {} family", family.max_level(), family.name());
    }
    if default.iter().any(|p| !p.gpu_spec.is_empty()) && family != Family::Gpuspec {
        bail!("the default pod list already carries GPU-model constraints; give the unconstrained default");
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // One stream per family, so that cpu050 and gpushare40 of one seed do not share draws.
    rng.set_stream(u64::from(family as u8) + 1);
    let mut out = match family {
        Family::Cpu => cpu(default, level, &mut rng),
        Family::Gpushare => gpushare(default, level, &mut rng),
        Family::Multigpu => multigpu(default, level, &mut rng),
        Family::Gpuspec => {
            let Some(src) = spec_source else {
                bail!(
                    "the gpuspec family needs --spec-source: a pod list with GPU-model constraints (e.g. openb_pod_list_gpuspec20.csv)"
                )
            };
            gpuspec(default, src, level, &mut rng)?
        }
    };
    let width = out.len().saturating_sub(1).to_string().len().max(4);
    for (i, p) in out.iter_mut().enumerate() {
        p.name = format!("openb-pod-{i:0width$}");
    }
    Ok(out)
}

fn cpu(default: &[PodRow], per_mille: u32, rng: &mut ChaCha8Rng) -> Vec<PodRow> {
    let (cpu, gpu): (Vec<PodRow>, Vec<PodRow>) = default.iter().cloned().partition(|p| p.num_gpu == 0);
    let f = f64::from(per_mille) / 1000.0;
    let n = (f / (1.0 - f) * gpu.len() as f64).round() as usize;
    let mut out = subset_or_more(&cpu, n, rng);
    out.extend(gpu);
    out
}

fn gpushare(default: &[PodRow], pct: u32, rng: &mut ChaCha8Rng) -> Vec<PodRow> {
    let cpu: Vec<PodRow> = default.iter().filter(|p| p.num_gpu == 0).cloned().collect();
    let share: Vec<PodRow> = default.iter().filter(|p| is_share(p)).cloned().collect();
    let whole: Vec<PodRow> = default.iter().filter(|p| p.num_gpu > 0 && !is_share(p)).cloned().collect();
    let n = share.len() + whole.len();
    let mean = |v: &[PodRow]| if v.is_empty() { 0.0 } else { request(v) as f64 / v.len() as f64 };
    let (ms, mw) = (mean(&share), mean(&whole));
    let r = f64::from(pct) / 100.0;
    // Counts whose expected request shares are the level.
    let n_share = if share.is_empty() {
        0
    } else if whole.is_empty() || r >= 1.0 {
        n
    } else {
        ((r * n as f64 * mw) / ((1.0 - r) * ms + r * mw)).round() as usize
    }
    .min(n);
    let mut out = cpu;
    for _ in 0..n_share {
        out.push(share[rng.random_range(0..share.len())].clone());
    }
    out.extend(subset_or_more(&whole, n - n_share, rng));
    out
}

fn multigpu(default: &[PodRow], pct: u32, rng: &mut ChaCha8Rng) -> Vec<PodRow> {
    let mut out = default.to_vec();
    let multi: Vec<PodRow> = default.iter().filter(|p| is_multi(p)).cloned().collect();
    if multi.is_empty() {
        return out;
    }
    let (total, m) = (request(default) as f64, request(&multi) as f64);
    let r = f64::from(pct) / 100.0;
    if m >= r * total {
        // Below the default's share: drop multi-GPU pods at random until the share is at most the level.
        let mut idx: Vec<usize> = (0..out.len()).filter(|&i| is_multi(&out[i])).collect();
        idx.shuffle(rng);
        let (mut t, mut mm) = (total, m);
        let mut drop = Vec::new();
        for i in idx {
            if mm <= r * t {
                break;
            }
            let q = out[i].gpu_request_milli() as f64;
            (t, mm) = (t - q, mm - q);
            drop.push(i);
        }
        drop.sort_unstable();
        for i in drop.into_iter().rev() {
            out.remove(i);
        }
        return out;
    }
    if r >= 1.0 {
        return multi;
    }
    let need = (r * total - m) / (1.0 - r);
    let target = ((need / 100_000.0).ceil() * 100_000.0) as u64;
    let mut added = 0u64;
    let smallest = multi.iter().map(PodRow::gpu_request_milli).min().unwrap_or(0);
    // Draws that would overshoot are skipped, so the added request is exact when it can be.
    while added < target && target - added >= smallest {
        let p = multi[rng.random_range(0..multi.len())].clone();
        let q = p.gpu_request_milli();
        if added + q <= target {
            added += q;
            out.push(p);
        }
    }
    out
}

fn gpuspec(default: &[PodRow], src: &[PodRow], pct: u32, rng: &mut ChaCha8Rng) -> Result<Vec<PodRow>> {
    if src.len() != default.len() {
        bail!(
            "the spec source has {} pods, the default {}: it must be the default's rows with gpu_spec set",
            src.len(),
            default.len()
        );
    }
    for (i, (d, s)) in default.iter().zip(src).enumerate() {
        if (d.cpu_milli, d.memory_mib, d.num_gpu, d.gpu_milli) != (s.cpu_milli, s.memory_mib, s.num_gpu, s.gpu_milli) {
            bail!("spec source row {}: pod {} differs from the default's {} in its resources", i + 2, s.name, d.name);
        }
    }
    let mut out: Vec<PodRow> = default
        .iter()
        .cloned()
        .map(|mut p| {
            p.gpu_spec.clear();
            p
        })
        .collect();
    let total = request(default) as f64;
    let goal = f64::from(pct) / 100.0 * total;
    let constrained: Vec<usize> =
        (0..src.len()).filter(|&i| !src[i].gpu_spec.is_empty() && src[i].num_gpu > 0).collect();
    let mut order = constrained.clone();
    order.shuffle(rng);
    let mut have = 0.0;
    for &i in &order {
        if have >= goal {
            break;
        }
        out[i].gpu_spec = src[i].gpu_spec.clone();
        have += out[i].gpu_request_milli() as f64;
    }
    if have < goal {
        let by_kind = |k: u8| -> Vec<&str> {
            constrained.iter().filter(|&&i| kind(&src[i]) == k).map(|&i| src[i].gpu_spec.as_str()).collect()
        };
        let pools = [by_kind(0), by_kind(1), by_kind(2), by_kind(3)];
        let any: Vec<&str> = constrained.iter().map(|&i| src[i].gpu_spec.as_str()).collect();
        if any.is_empty() {
            bail!("the spec source has no constrained GPU pod to draw constraints from");
        }
        let mut free: Vec<usize> =
            (0..out.len()).filter(|&i| out[i].num_gpu > 0 && out[i].gpu_spec.is_empty()).collect();
        free.shuffle(rng);
        for i in free {
            if have >= goal {
                break;
            }
            let pool = &pools[usize::from(kind(&out[i]))];
            let pick = if pool.is_empty() { any.choose(rng) } else { pool.choose(rng) };
            if let Some(s) = pick {
                out[i].gpu_spec = (*s).to_owned();
                have += out[i].gpu_request_milli() as f64;
            }
        }
    }
    Ok(out)
}

/// Writes a pod list in the 6-column form the loader reads.
pub fn write_csv(path: &std::path::Path, pods: &[PodRow]) -> Result<()> {
    use anyhow::Context as _;
    let mut w = csv::Writer::from_path(path).with_context(|| format!("creating {}", path.display()))?;
    w.write_record(["name", "cpu_milli", "memory_mib", "num_gpu", "gpu_milli", "gpu_spec"])?;
    for p in pods {
        w.write_record([
            p.name.as_str(),
            &p.cpu_milli.to_string(),
            &p.memory_mib.to_string(),
            &p.num_gpu.to_string(),
            &p.gpu_milli.to_string(),
            p.gpu_spec.as_str(),
        ])?;
    }
    w.flush().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The proportions a family's level is about, for checking a trace (fractions 0..1): CPU-only
/// share of pods, and shares of the GPU request from time-sliced, multi-GPU and constrained pods.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mix {
    pub pods: usize,
    pub cpu_pods: f64,
    pub share_request: f64,
    pub multi_request: f64,
    pub spec_request: f64,
}

pub fn mix(pods: &[PodRow]) -> Mix {
    let total = request(pods).max(1) as f64;
    let req =
        |f: &dyn Fn(&PodRow) -> bool| pods.iter().filter(|p| f(p)).map(PodRow::gpu_request_milli).sum::<u64>() as f64;
    Mix {
        pods: pods.len(),
        cpu_pods: pods.iter().filter(|p| p.num_gpu == 0).count() as f64 / pods.len().max(1) as f64,
        share_request: req(&is_share) / total,
        multi_request: req(&is_multi) / total,
        spec_request: req(&|p: &PodRow| !p.gpu_spec.is_empty()) / total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small default-like trace: CPU-only pods, shares, single and multi whole GPUs.
    fn default_like() -> Vec<PodRow> {
        let mut out = Vec::new();
        for i in 0..2000u32 {
            let (num_gpu, gpu_milli) = match i % 20 {
                0..=2 => (0, 0),
                3..=9 => (1, [810, 470, 320, 650, 230][i as usize % 5]),
                10..=18 => (1, 1000),
                _ => (if i % 40 == 19 { 8 } else { 2 }, 1000),
            };
            out.push(PodRow {
                name: format!("p{i:04}"),
                cpu_milli: 1000 + u64::from(i % 7) * 1000,
                memory_mib: 4096,
                num_gpu,
                gpu_milli,
                gpu_spec: String::new(),
            });
        }
        out
    }

    #[test]
    fn each_family_reaches_its_level_and_keeps_what_it_should() {
        let d = default_like();
        let base = mix(&d);
        let cpu = generate(&d, Family::Cpu, 250, 1, None).unwrap_or_else(|e| panic!("{e:#}"));
        let m = mix(&cpu);
        assert!((m.cpu_pods - 0.25).abs() < 0.002, "{m:?}");
        assert_eq!(cpu.iter().filter(|p| p.num_gpu > 0).count(), d.iter().filter(|p| p.num_gpu > 0).count());
        let few = generate(&d, Family::Cpu, 50, 1, None).unwrap_or_else(|e| panic!("{e:#}"));
        assert!((mix(&few).cpu_pods - 0.05).abs() < 0.002);

        let share = generate(&d, Family::Gpushare, 60, 1, None).unwrap_or_else(|e| panic!("{e:#}"));
        let m = mix(&share);
        assert!((m.share_request - 0.60).abs() < 0.02, "{m:?}");
        assert_eq!(m.pods, d.len(), "the pod count stays");
        let all = mix(&generate(&d, Family::Gpushare, 100, 1, None).unwrap_or_else(|e| panic!("{e:#}")));
        assert!((all.share_request - 1.0).abs() < 1e-9, "{all:?}");

        let multi = generate(&d, Family::Multigpu, 40, 1, None).unwrap_or_else(|e| panic!("{e:#}"));
        let m = mix(&multi);
        // Whole hundreds of GPUs overshoot more on this small trace than on the real one.
        assert!(m.multi_request >= 0.40 && m.multi_request < 0.45, "{m:?}");
        let added = request(&multi) - request(&d);
        assert_eq!(added % 100_000, 0, "whole hundreds of GPUs are added: {added}");
        assert!(multi.len() > d.len() && base.multi_request < 0.40);

        // Constraints come from the source, and only from it while the level allows.
        let mut src = d.clone();
        for (i, p) in src.iter_mut().enumerate() {
            if p.num_gpu > 0 && i % 3 == 0 {
                p.gpu_spec = if p.num_gpu == 1 && p.gpu_milli < 1000 { "P100".into() } else { "G2".into() };
            }
        }
        let spec = generate(&d, Family::Gpuspec, 20, 1, Some(&src)).unwrap_or_else(|e| panic!("{e:#}"));
        let m = mix(&spec);
        assert!(m.spec_request >= 0.20 && m.spec_request < 0.21, "{m:?}");
        assert!(spec.iter().zip(&src).all(|(g, s)| g.gpu_spec.is_empty() || g.gpu_spec == s.gpu_spec));
        // Above the source's own level, more pods draw a constraint of their kind.
        let high = generate(&d, Family::Gpuspec, 60, 1, Some(&src)).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(mix(&high).spec_request >= 0.60);
        assert!(high.iter().filter(|p| p.num_gpu == 1 && p.gpu_milli < 1000).all(|p| p.gpu_spec != "G2"));
    }

    #[test]
    fn generation_is_seeded_and_names_are_fresh() {
        let d = default_like();
        for f in [Family::Cpu, Family::Gpushare, Family::Multigpu] {
            let level = if f == Family::Cpu { 200 } else { 30 };
            let a = generate(&d, f, level, 7, None).unwrap_or_else(|e| panic!("{e:#}"));
            assert_eq!(a, generate(&d, f, level, 7, None).unwrap_or_else(|e| panic!("{e:#}")), "{f:?}");
            assert_ne!(a, generate(&d, f, level, 8, None).unwrap_or_else(|e| panic!("{e:#}")), "{f:?}");
            let names: std::collections::BTreeSet<&str> = a.iter().map(|p| p.name.as_str()).collect();
            assert_eq!(names.len(), a.len(), "{f:?}: names are unique");
        }
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason() {
        let d = default_like();
        assert!(Family::parse("gpuhog").is_err());
        let e = generate(&d, Family::Gpuspec, 20, 1, None).expect_err("no source").to_string();
        assert!(e.contains("--spec-source"), "{e}");
        let e = generate(&d, Family::Gpushare, 140, 1, None).expect_err("level").to_string();
        assert!(e.contains("above 100"), "{e}");
        let e = generate(&d, Family::Gpuspec, 20, 1, Some(&d[..10])).expect_err("short source").to_string();
        assert!(e.contains("must be the default's rows"), "{e}");
        assert_eq!(Family::Cpu.label(50), "cpu050");
        assert_eq!(Family::Multigpu.label(30), "multigpu30");
    }

    #[test]
    fn a_written_trace_loads_back() {
        let d = default_like();
        let g = generate(&d, Family::Cpu, 100, 3, None).unwrap_or_else(|e| panic!("{e:#}"));
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = dir.path().join("gen.csv");
        write_csv(&p, &g).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(crate::trace::load_pods(&p).unwrap_or_else(|e| panic!("{e:#}")), g);
    }
}
