//! The expected workload a scenario's decisions see: learnt from recent arrivals, as the
//! extender learns it from the pods it is asked to filter, not from the whole day in advance.
//!
//! Each arrival weighs `2^(−age / half-life)`; the workload is rebuilt from the window at every
//! arrival and replaced only when a class appears or goes, or a share moves by more than
//! [`DRIFT`] (a new workload empties the core's memo). A pod that was refused still counts: it
//! was asked for.

use std::collections::VecDeque;

use tessera_core::demand::Demand;
use tessera_core::policy::Workload;

/// Half-life of an arrival's weight in the window.
pub const HALF_LIFE_MS: f64 = 2.0 * 3_600_000.0;
/// Arrivals older than this many half-lives are forgotten (weight below 1/256).
const KEEP_HALF_LIVES: f64 = 8.0;
/// How far a class's share may move before the workload is replaced.
const DRIFT: f64 = 0.05;
/// The most popular shapes covering this share of the window (as FGD and the extender keep).
const COVERAGE: f64 = 0.95;

#[derive(Debug, Default)]
pub struct Recent {
    window: VecDeque<(u64, Demand)>,
    current: Workload,
}

impl Recent {
    /// Starts with `base` (the pods placed at time 0, if any) as the workload.
    pub fn new(base: Workload) -> Self {
        Self { window: VecDeque::new(), current: base }
    }

    /// Records an arrival at `t_ms` and returns the workload to decide it under.
    pub fn arrive(&mut self, t_ms: u64, d: &Demand) -> &Workload {
        self.window.push_back((t_ms, d.clone()));
        let keep = (HALF_LIFE_MS * KEEP_HALF_LIVES) as u64;
        while self.window.front().is_some_and(|(at, _)| at + keep < t_ms) {
            self.window.pop_front();
        }
        let fresh = Workload::from_weighted_top(
            self.window.iter().map(|(at, d)| (d, (-((t_ms - at) as f64) / HALF_LIFE_MS).exp2())),
            COVERAGE,
        );
        if drifted(&self.current, &fresh) {
            self.current = fresh;
        }
        &self.current
    }
}

/// Whether `fresh` differs from `current` by more than noise.
fn drifted(current: &Workload, fresh: &Workload) -> bool {
    current.classes.len() != fresh.classes.len()
        || fresh.classes.iter().any(|f| {
            current
                .classes
                .iter()
                .find(|c| c.cpu_milli == f.cpu_milli && c.gpu == f.gpu && c.gpu_models == f.gpu_models)
                .is_none_or(|c| (c.weight - f.weight).abs() > DRIFT)
        })
}

#[cfg(test)]
mod tests {
    use tessera_core::demand::GpuDemand;

    use super::*;

    fn pod(name: &str, gpu: GpuDemand) -> Demand {
        Demand::new(name, gpu)
    }

    #[test]
    fn the_window_forgets_old_demand_and_learns_a_new_shape() {
        let small = GpuDemand::Model { memory_mib: 3000, compute_slices: None };
        let tp4 = GpuDemand::Whole { count: 4 };
        let mut r = Recent::default();
        for i in 0..50 {
            r.arrive(i * 60_000, &pod(&format!("s/a{i}"), small.clone()));
        }
        assert_eq!(r.current.classes.len(), 1);
        // A day later only TP-4 groups come: within a few half-lives they are the workload.
        let t0 = 24 * 3_600_000;
        for i in 0..20 {
            r.arrive(t0 + i * 1_800_000, &pod(&format!("t/b{i}"), tp4.clone()));
        }
        assert_eq!(r.current.classes.len(), 1, "{:?}", r.current.classes);
        assert_eq!(r.current.classes[0].gpu, tp4);
    }

    #[test]
    fn a_share_that_moves_by_noise_keeps_the_workload() {
        let a = GpuDemand::Model { memory_mib: 3000, compute_slices: None };
        let b = GpuDemand::Model { memory_mib: 6000, compute_slices: None };
        let mut r = Recent::default();
        for i in 0..100u64 {
            let g = if i % 2 == 0 { a.clone() } else { b.clone() };
            r.arrive(i * 60_000, &pod(&format!("s/p{i}"), g));
        }
        let before = r.current.clone();
        r.arrive(100 * 60_000, &pod("s/p100", a.clone()));
        assert_eq!(r.current, before);
    }
}
