//! The pods a scenario asks for: gangs and replicas at time 0 (replicas shuffled with the seed),
//! and the pods of each model's arrival process, drawn from a stream of the seed named by the
//! model.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tessera_core::demand::{Demand, GpuDemand};

use super::schema::{Arrival, Model, Scenario};

/// One pod of an arrival process: when it comes, how long it stays, what it asks for.
#[derive(Debug, Clone)]
pub struct Arrived {
    pub at_ms: u64,
    pub lifetime_ms: u64,
    pub demand: Demand,
}

impl Arrival {
    fn end_ms(&self) -> u64 {
        hours_to_ms(self.start_hour + self.duration_hours)
    }
}

fn hours_to_ms(h: f64) -> u64 {
    (h * 3_600_000.0).round() as u64
}

/// FNV-1a: a stable hash (std's hashers may change between releases).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// A draw from the exponential distribution with this mean.
fn exponential(rng: &mut ChaCha8Rng, mean: f64) -> f64 {
    // random() is in [0, 1), so 1 - u is in (0, 1] and the logarithm finite.
    -(1.0 - rng.random::<f64>()).ln() * mean
}

impl Scenario {
    /// Every demand in arrival order: gangs first (they need whole islands), then model replicas
    /// shuffled with the seed.
    pub fn demands(&self, seed: u64) -> (Vec<Vec<Demand>>, Vec<Demand>) {
        let gangs = self
            .gangs
            .iter()
            .map(|g| {
                (0..g.members)
                    .map(|i| {
                        Demand::new(
                            format!("jobs/{}-{i}", g.name).as_str(),
                            GpuDemand::Whole { count: g.gpus_per_member },
                        )
                        .with_cpu(g.cpu_milli, g.memory_mib)
                        .in_gang(&g.name, g.members, 60_000)
                    })
                    .collect()
            })
            .collect();
        let mut pods = Vec::new();
        for m in &self.models {
            for r in 0..m.replicas.unwrap_or(0) {
                pods.push(m.demand(&format!("{r}")));
            }
        }
        pods.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        (gangs, pods)
    }

    /// The pods of the arrival processes, by arrival time (ties: model order). Each model draws
    /// from the seed's stream named by the model, so adding, removing or reordering models
    /// leaves the others' arrivals as they were.
    pub fn arrivals(&self, seed: u64) -> Vec<Arrived> {
        let mut out = Vec::new();
        for m in &self.models {
            let Some(a) = &m.arrival else { continue };
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(fnv1a(&m.name));
            let (mut t, end) = (a.start_hour, a.start_hour + a.duration_hours);
            for n in 0.. {
                t += exponential(&mut rng, 1.0 / a.rate_per_hour);
                if t >= end {
                    break;
                }
                let life_min = exponential(&mut rng, a.mean_lifetime_minutes);
                out.push(Arrived {
                    at_ms: hours_to_ms(t),
                    // At least a millisecond: a pod leaves after it came.
                    lifetime_ms: ((life_min * 60_000.0).round() as u64).max(1),
                    demand: m.demand(&format!("a{n}")),
                });
            }
        }
        out.sort_by_key(|a| a.at_ms);
        out
    }

    /// Where the simulated time ends: the last arrival process's end (0 without any).
    pub fn horizon_ms(&self) -> u64 {
        self.models.iter().filter_map(|m| m.arrival.as_ref()).map(Arrival::end_ms).max().unwrap_or(0)
    }
}

impl Model {
    /// A pod of this model named `serving/{model}-{suffix}`.
    fn demand(&self, suffix: &str) -> Demand {
        let gpu = match (self.gpus, self.gpu_memory_mib, &self.mig_profile) {
            (Some(n), _, _) => GpuDemand::Whole { count: n },
            (_, Some(mem), _) => GpuDemand::Model { memory_mib: mem, compute_slices: self.gpu_compute },
            (_, _, Some(p)) => GpuDemand::Mig { profile: p.clone() },
            _ => GpuDemand::None,
        };
        let mut d = Demand::new(format!("serving/{}-{suffix}", self.name).as_str(), gpu)
            .with_cpu(self.cpu_milli, self.memory_mib);
        d.gpu_models = self.gpu_models.clone();
        d
    }
}
