//! A certified upper bound on the GPU allocation any policy can reach on an openb replay.
//!
//! The pods that arrive (the tuned order of one seed) are the same for every policy, and what a
//! policy holds at the end is some subset of them packed onto the nodes. Whatever the order and
//! the policy, that packing is a feasible point of this linear program over node types `t` (the
//! nodes with one GPU model, GPU count, cpu and memory; `N_t` of them) and pod shapes `s` (the
//! pods with one cpu, memory, GPU request and model list; `n_s` of them):
//!
//! ```text
//! maximise   Σ r_s x_ts            r_s: a pod's GPU request; x_ts: pods of shape s on type t
//! subject to Σ_t x_ts ≤ n_s        no more pods than arrived
//!            for each type t and each resource row k:  Σ_s a_tsk x_ts ≤ N_t c_tk
//!            x_ts ≥ 0, and x_ts = 0 where a pod of s fits no single node of t
//! ```
//!
//! The resource rows are the node's cpu, memory and GPU capacity, and valid inequalities that a
//! packing onto one node (or one GPU) satisfies, summed over the type's nodes: per GPU, the dual
//! feasible functions of Fekete and Schepers (`u¹`: a share above half a GPU counts one, exactly
//! half counts one half, less counts nothing; `u²` to `u⁵` alike with thirds to sixths), a
//! whole GPU counting one; per node, a pod with more than half the node's cpu (or memory) counts
//! one. Dropping order, integrality and the rule that a pod must be placed when it fits only
//! enlarges the feasible set, so the optimum bounds every policy.
//!
//! The bound does not trust the solver: from its dual values `u ≥ 0` for the resource rows,
//! `y_s = max(0, max_t (r_s − Σ_k a_tsk u_tk))` makes `(y, u)` feasible for the dual by
//! construction, and by weak duality `Σ_s n_s y_s + Σ_tk N_t c_tk u_tk` bounds the primal
//! optimum. That number, not the solver's objective, is reported (capped by the arrived request
//! and the capacity, each a bound too).

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use clarabel::algebra::CscMatrix;
use clarabel::solver::{DefaultSettingsBuilder, DefaultSolver, IPSolver, NonnegativeConeT, SolverStatus};
use serde::Serialize;
use tessera_core::cluster::Node;

use crate::trace::PodRow;

/// One seed's bound.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Bound {
    /// Certified bound on allocated GPU over capacity (fraction).
    pub allocation_ratio: f64,
    /// The LP optimum the solver reported (fraction), for comparison; the bound is at least this
    /// up to the solver's tolerance.
    pub lp_ratio: f64,
    /// What the solver said (`Solved`, `AlmostSolved`, ...); the bound holds whatever it says.
    pub solver_status: String,
    pub node_types: usize,
    pub pod_shapes: usize,
}

/// The bound of every seed of a replay, and their mean: the `upper_bound` of `--json`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Summary {
    pub mean_allocation_ratio: f64,
    pub runs: Vec<SeedBound>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SeedBound {
    pub seed: u64,
    #[serde(flatten)]
    pub bound: Bound,
}

/// Bounds for the tuned order of each seed, as `openb::replay` builds it.
pub fn for_seeds(nodes: &[Node], pods: &[PodRow], tune: f64, seeds: &[u64]) -> Result<Summary> {
    let capacity: u64 = nodes.iter().map(|n| n.gpus.len() as u64 * 1000).sum();
    let mut runs = crate::seeds::each("bound", seeds, &|seed| {
        let order = crate::openb::tuned_order(pods, capacity, tune, seed);
        Ok(SeedBound { seed, bound: upper_bound(nodes, &order)? })
    })?;
    runs.sort_by_key(|r| r.seed);
    let mean = runs.iter().map(|r| r.bound.allocation_ratio).sum::<f64>() / runs.len().max(1) as f64;
    Ok(Summary { mean_allocation_ratio: mean, runs })
}

/// A node type: what decides which pods fit and how many.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct NodeType {
    model: String,
    gpus: u32,
    cpu_milli: u64,
    memory_mib: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Shape {
    cpu_milli: u64,
    memory_mib: u64,
    num_gpu: u32,
    gpu_milli: u32,
    models: Vec<String>,
}

/// Fekete–Schepers dual feasible function `u^(k)` of a share `m`/1000 of one GPU, scaled so
/// that a GPU's shares sum to at most 1.
fn fs(k: u64, m: u32) -> f64 {
    let m = u64::from(m);
    if ((k + 1) * m).is_multiple_of(1000) { m as f64 / 1000.0 } else { ((k + 1) * m / 1000) as f64 / k as f64 }
}

/// "Big" items of one bin: more than half counts 1, exactly half 1/2.
fn big(x: u64, cap: u64) -> f64 {
    match (2 * x).cmp(&cap) {
        std::cmp::Ordering::Greater => 1.0,
        std::cmp::Ordering::Equal => 0.5,
        std::cmp::Ordering::Less => 0.0,
    }
}

/// Rows per node type.
const ROWS: usize = 10;

/// Coefficients of one pod of shape `s` on type `t` in the type's rows, and the rows'
/// capacities per node. Units: cores, GiB, GPUs.
fn rows(t: &NodeType, s: &Shape) -> [f64; ROWS] {
    let whole = s.num_gpu > 1 || s.gpu_milli >= 1000;
    let g = |f: &dyn Fn(u32) -> f64| if whole { f64::from(s.num_gpu) } else { f(s.gpu_milli) };
    [
        s.cpu_milli as f64 / 1000.0,
        s.memory_mib as f64 / 1024.0,
        if whole { f64::from(s.num_gpu) } else { f64::from(s.gpu_milli) / 1000.0 },
        g(&|m| fs(1, m)),
        g(&|m| fs(2, m)),
        g(&|m| fs(3, m)),
        g(&|m| fs(4, m)),
        g(&|m| fs(5, m)),
        big(s.cpu_milli, t.cpu_milli),
        big(s.memory_mib, t.memory_mib),
    ]
}

fn capacity(t: &NodeType) -> [f64; ROWS] {
    let g = f64::from(t.gpus);
    [t.cpu_milli as f64 / 1000.0, t.memory_mib as f64 / 1024.0, g, g, g, g, g, g, 1.0, 1.0]
}

fn fits(t: &NodeType, s: &Shape) -> bool {
    s.num_gpu >= 1
        && s.num_gpu <= t.gpus
        && s.cpu_milli <= t.cpu_milli
        && s.memory_mib <= t.memory_mib
        && (s.models.is_empty() || s.models.iter().any(|m| m.eq_ignore_ascii_case(&t.model)))
}

/// The bound for the pods that arrive on these nodes.
pub fn upper_bound(nodes: &[Node], pods: &[PodRow]) -> Result<Bound> {
    let mut types: BTreeMap<NodeType, f64> = BTreeMap::new();
    for n in nodes.iter().filter(|n| !n.gpus.is_empty()) {
        let t = NodeType {
            model: n.gpus[0].model.clone(),
            gpus: n.gpus.len() as u32,
            cpu_milli: n.cpu_milli,
            memory_mib: n.memory_mib,
        };
        *types.entry(t).or_default() += 1.0;
    }
    let capacity_gpus: f64 = types.iter().map(|(t, n)| n * f64::from(t.gpus)).sum();
    if capacity_gpus == 0.0 {
        bail!("no GPU nodes: nothing to bound");
    }
    // CPU-only pods add nothing to the objective and only use resources: leaving them out is
    // a feasible choice of the relaxation, so they cannot raise its optimum.
    let mut shapes: BTreeMap<Shape, f64> = BTreeMap::new();
    for p in pods.iter().filter(|p| p.num_gpu > 0) {
        let s = Shape {
            cpu_milli: p.cpu_milli,
            memory_mib: p.memory_mib,
            num_gpu: p.num_gpu,
            gpu_milli: if p.num_gpu > 1 { 1000 } else { p.gpu_milli },
            models: p.gpu_spec.split('|').map(str::trim).filter(|x| !x.is_empty()).map(str::to_owned).collect(),
        };
        *shapes.entry(s).or_default() += 1.0;
    }
    let types: Vec<(NodeType, f64)> = types.into_iter().collect();
    let shapes: Vec<(Shape, f64)> = shapes.into_iter().collect();
    let reward = |s: &Shape| if s.num_gpu > 1 { f64::from(s.num_gpu) } else { f64::from(s.gpu_milli) / 1000.0 };
    let arrived: f64 = shapes.iter().map(|(s, n)| n * reward(s)).sum();

    // Variables x_ts for the pairs that fit; rows: shapes, then ROWS per type, then x ≥ 0.
    let vars: Vec<(usize, usize)> = (0..types.len())
        .flat_map(|t| (0..shapes.len()).map(move |s| (t, s)))
        .filter(|&(t, s)| fits(&types[t].0, &shapes[s].0))
        .collect();
    let (ns, nt, nv) = (shapes.len(), types.len(), vars.len());
    if nv == 0 {
        return Ok(Bound {
            allocation_ratio: 0.0,
            lp_ratio: 0.0,
            solver_status: "NoVariables".into(),
            node_types: nt,
            pod_shapes: ns,
        });
    }
    let m = ns + ROWS * nt + nv;
    let (mut ri, mut ci, mut vi) = (Vec::new(), Vec::new(), Vec::new());
    let mut q = vec![0.0; nv];
    for (j, &(t, s)) in vars.iter().enumerate() {
        q[j] = -reward(&shapes[s].0);
        ri.push(s);
        ci.push(j);
        vi.push(1.0);
        for (k, a) in rows(&types[t].0, &shapes[s].0).into_iter().enumerate() {
            if a != 0.0 {
                ri.push(ns + ROWS * t + k);
                ci.push(j);
                vi.push(a);
            }
        }
        ri.push(ns + ROWS * nt + j);
        ci.push(j);
        vi.push(-1.0);
    }
    let mut b: Vec<f64> = shapes.iter().map(|(_, n)| *n).collect();
    for (t, n) in &types {
        b.extend(capacity(t).iter().map(|c| c * n));
    }
    b.extend(std::iter::repeat_n(0.0, nv));
    let a = CscMatrix::new_from_triplets(m, nv, ri, ci, vi);
    let p = CscMatrix::<f64>::zeros((nv, nv));
    let settings = DefaultSettingsBuilder::default()
        .verbose(false)
        .max_iter(200)
        .build()
        .map_err(|e| anyhow::anyhow!("LP settings: {e}"))?;
    let cones = [NonnegativeConeT(m)];
    let mut solver =
        DefaultSolver::new(&p, &q, &a, &b, &cones, settings).map_err(|e| anyhow::anyhow!("building the LP: {e:?}"))?;
    solver.solve();
    let status = solver.solution.status;
    let lp = -solver.solution.obj_val;
    let z = &solver.solution.z;

    // Weak duality with duals repaired to be feasible.
    let u: Vec<f64> =
        (0..ROWS * nt).map(|i| z.get(ns + i).copied().filter(|v| v.is_finite()).unwrap_or(0.0).max(0.0)).collect();
    let mut y = vec![0.0f64; ns];
    for &(t, s) in &vars {
        let coef = rows(&types[t].0, &shapes[s].0);
        let used: f64 = coef.iter().zip(&u[ROWS * t..ROWS * (t + 1)]).map(|(a, u)| a * u).sum();
        y[s] = y[s].max(reward(&shapes[s].0) - used);
    }
    let mut dual: f64 = shapes.iter().zip(&y).map(|((_, n), y)| n * y).sum();
    for (t, (ty, n)) in types.iter().enumerate() {
        dual += capacity(ty).iter().zip(&u[ROWS * t..ROWS * (t + 1)]).map(|(c, u)| c * n * u).sum::<f64>();
    }
    // Rounding in the sums above is far below this margin.
    let dual = dual * (1.0 + 1e-9) + 1e-9;
    let bound = dual.min(arrived).min(capacity_gpus);
    Ok(Bound {
        allocation_ratio: bound / capacity_gpus,
        lp_ratio: if status == SolverStatus::Solved || status == SolverStatus::AlmostSolved {
            lp / capacity_gpus
        } else {
            f64::NAN
        },
        solver_status: format!("{status:?}"),
        node_types: nt,
        pod_shapes: ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_core::cluster::{Gpu, GpuMode};

    fn node(name: &str, gpus: u32, cpu: u64, model: &str) -> Node {
        let g = (0..gpus).map(|i| Gpu::new(i, model, 16384, GpuMode::Shared)).collect();
        Node::new(name, cpu, 262_144, g)
    }

    fn pod(i: usize, cpu: u64, num_gpu: u32, gpu_milli: u32) -> PodRow {
        PodRow {
            name: format!("p{i:03}"),
            cpu_milli: cpu,
            memory_mib: 1024,
            num_gpu,
            gpu_milli,
            gpu_spec: String::new(),
        }
    }

    #[test]
    fn dual_feasible_functions_are_what_the_paper_defines() {
        assert_eq!(fs(1, 600), 1.0);
        assert_eq!(fs(1, 500), 0.5);
        assert_eq!(fs(1, 499), 0.0);
        assert_eq!(fs(2, 667), 1.0);
        assert_eq!(fs(2, 400), 0.5);
        assert_eq!(fs(2, 333), 0.0);
        assert_eq!(fs(3, 250), 0.25);
        assert!((fs(3, 300) - 1.0 / 3.0).abs() < 1e-12);
        // Any split of one GPU sums to at most 1 under each.
        for a in (10..=1000).step_by(10) {
            for b in (10..=1000 - a).step_by(10) {
                for k in 1..=5 {
                    assert!(fs(k, a) + fs(k, b) + fs(k, 1000 - a - b) <= 1.0 + 1e-12, "{k} {a} {b}");
                }
            }
        }
    }

    #[test]
    fn the_bound_sees_what_cannot_share_a_gpu_or_a_node() {
        // Two 1-GPU nodes and three 600-milli shares: at most one per GPU, so 1.2 of 2 GPUs.
        let nodes = [node("a", 1, 32_000, "T4"), node("b", 1, 32_000, "T4")];
        let pods: Vec<PodRow> = (0..3).map(|i| pod(i, 1000, 1, 600)).collect();
        let b = upper_bound(&nodes, &pods).unwrap_or_else(|e| panic!("{e:#}"));
        assert!((b.allocation_ratio - 0.6).abs() < 1e-6, "{b:?}");
        // cpu: pods needing 20 of 32 cores cannot share a node, whatever their GPUs.
        let pods: Vec<PodRow> = (0..4).map(|i| pod(i, 20_000, 1, 300)).collect();
        let b = upper_bound(&nodes, &pods).unwrap_or_else(|e| panic!("{e:#}"));
        assert!((b.allocation_ratio - 0.3).abs() < 1e-6, "{b:?}");
        // A model list that no node has: nothing can be placed.
        let mut p = pod(0, 1000, 1, 1000);
        p.gpu_spec = "A100".into();
        let b = upper_bound(&nodes, &[p]).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(b.allocation_ratio < 1e-6, "{b:?}");
    }

    #[test]
    fn the_bound_is_at_least_every_policys_result() {
        let nodes: Vec<Node> = (0..6)
            .map(|i| {
                if i < 4 { node(&format!("n{i}"), 2, 16_000, "P100") } else { node(&format!("m{i}"), 8, 96_000, "G2") }
            })
            .collect();
        let pods: Vec<PodRow> = (0..60)
            .map(|i| match i % 6 {
                0 => pod(i, 12_000, 0, 0),
                1 => pod(i, 4000, 1, [810, 470, 320][i % 3]),
                2 => pod(i, 9000, 1, 1000),
                3 => pod(i, 3000, 1, 650),
                4 => pod(i, 30_000, 4, 1000),
                _ => pod(i, 6000, 1, 230),
            })
            .collect();
        let capacity: u64 = nodes.iter().map(|n| n.gpus.len() as u64 * 1000).sum();
        for seed in [1, 2, 3] {
            let order = crate::openb::tuned_order(&pods, capacity, 1.3, seed);
            let b = upper_bound(&nodes, &order).unwrap_or_else(|e| panic!("{e:#}"));
            assert!(b.allocation_ratio <= 1.0 && b.allocation_ratio > 0.5, "{b:?}");
            assert!(b.lp_ratio <= b.allocation_ratio + 1e-6, "{b:?}");
            for name in tessera_core::policy::NAMES {
                let policy = tessera_core::policy::by_name(name).unwrap_or_else(|| panic!("{name}"));
                let run = crate::openb::replay(&nodes, &pods, policy.as_ref(), 1.3, seed, &|_, _| {})
                    .unwrap_or_else(|e| panic!("{e:#}"));
                assert!(run.allocation_ratio <= b.allocation_ratio + 1e-9, "{name} seed {seed}: {run:?} > {b:?}");
            }
        }
    }
}
