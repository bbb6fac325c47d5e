//! Builders and a seeded synthetic cluster, shared by tests, benches and the simulator.

use std::sync::Arc;

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::cluster::{Gpu, GpuMode, Node, Snapshot};
use crate::mig::{MigLayout, MigProduct};
use crate::topology::Topology;

/// Device memory of a GPU model in MiB: MIG products from their geometry, others from a table;
/// unknown models count as 16 GiB.
pub fn model_memory_mib(model: &str) -> u64 {
    if let Some(p) = MigProduct::from_name(model) {
        return p.geometry().memory_mib;
    }
    match model {
        "T4" | "P100" | "V100M16" | "G1" => 16 * 1024,
        "A10" | "L4" | "G3" => 24 * 1024,
        "V100M32" | "G2" => 32 * 1024,
        "L40S" => 48 * 1024,
        _ => 16 * 1024,
    }
}

impl Node {
    /// A node with 64 cores, 512 GiB and no GPUs.
    pub fn test(name: &str) -> Self {
        Node::new(name, 64_000, 512 * 1024, Vec::new())
    }

    /// Sets cpu (milli-cores) and memory (MiB).
    pub fn with_capacity(mut self, cpu_milli: u64, memory_mib: u64) -> Self {
        self.cpu_milli = cpu_milli;
        self.memory_mib = memory_mib;
        self
    }

    /// Replaces the GPUs with `n` of `model` in full (exclusive) mode, with NVSwitch links
    /// when the model is a MIG product with 8 GPUs, PCIe otherwise.
    pub fn with_gpus(self, n: u32, model: &str) -> Self {
        let topo = if MigProduct::from_name(model).is_some() && n == 8 {
            Topology::nvswitch(n)
        } else {
            Topology::pcie(n, 2, 2)
        };
        self.with_gpus_mode(n, model, GpuMode::Full).with_topology(topo)
    }

    /// Replaces the GPUs with `n` of `model` in shared (time-sliced) mode.
    pub fn with_shared_gpus(self, n: u32, model: &str) -> Self {
        self.with_gpus_mode(n, model, GpuMode::Shared).with_topology(Topology::pcie(n, 2, 2))
    }

    fn with_gpus_mode(mut self, n: u32, model: &str, mode: GpuMode) -> Self {
        let mem = model_memory_mib(model);
        self.gpus = (0..n)
            .map(|i| {
                let mut g = Gpu::new(i, model, mem, mode);
                g.uuid = format!("GPU-{}-{i}", self.name);
                g.numa = Some(i * 2 / n.max(1));
                g
            })
            .collect();
        self.topology = Arc::new(Topology::unconnected(n));
        self
    }

    pub fn with_topology(mut self, topology: Topology) -> Self {
        self.topology = Arc::new(topology);
        self
    }

    pub fn with_label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Puts the node in `pool`, labelled as a cluster's node in that pool is.
    pub fn with_pool(mut self, pool: &str) -> Self {
        self.pool = Some(pool.to_owned());
        self.with_label("tessera.dev/pool", pool)
    }

    /// Puts GPU `gpu` in MIG mode and creates the named profiles, each at its lowest legal start.
    /// Panics on an impossible layout: this is a test builder.
    pub fn with_mig(mut self, gpu: u32, profiles: &[&str]) -> Self {
        let g = self.gpus.iter_mut().find(|g| g.index == gpu).expect("no such GPU");
        let product = g.mig_product().expect("GPU model has no MIG");
        let mut layout = MigLayout::empty(product);
        for name in profiles {
            let p = product.geometry().profile_by_name(name).expect("unknown profile");
            let start = *layout.placements(p.class).first().expect("profile does not fit");
            layout.create(p.class, start).expect("checked above");
        }
        g.mode = GpuMode::Mig;
        g.mig = Some(layout);
        self
    }

    /// Puts GPU `gpu` in MIG mode with instances at explicit `(profile, start)` positions.
    pub fn with_mig_at(mut self, gpu: u32, instances: &[(&str, u8)]) -> Self {
        let g = self.gpus.iter_mut().find(|g| g.index == gpu).expect("no such GPU");
        let product = g.mig_product().expect("GPU model has no MIG");
        let mut layout = MigLayout::empty(product);
        for (name, start) in instances {
            let p = product.geometry().profile_by_name(name).expect("unknown profile");
            layout.create(p.class, *start).expect("illegal test layout");
        }
        g.mode = GpuMode::Mig;
        g.mig = Some(layout);
        self
    }
}

/// A deterministic synthetic cluster of `nodes` 8-GPU nodes, mixed MIG:
/// 50% H100-80GB HGX (NVSwitch; a third of their GPUs MIG-enabled with a random legal layout),
/// 30% A100-80GB as two NVLink quads, 20% L4 shared (time-sliced) PCIe cards.
pub fn synth_cluster(seed: u64, nodes: usize) -> Snapshot {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(nodes);
    let layouts: [&[&str]; 5] = [
        &["3g.40gb", "3g.40gb"],
        &["1g.10gb", "1g.10gb", "2g.20gb", "3g.40gb"],
        &["4g.40gb", "2g.20gb", "1g.10gb"],
        &["1g.10gb"; 7],
        &["2g.20gb", "2g.20gb", "2g.20gb"],
    ];
    for i in 0..nodes {
        let name = format!("node-{i:05}");
        let roll: f64 = rng.random();
        let node = if roll < 0.5 {
            let mut n = Node::test(&name).with_capacity(192_000, 2048 * 1024).with_gpus(8, "H100-80GB");
            for g in 0..8 {
                if rng.random_bool(1.0 / 3.0) {
                    let layout = layouts.choose(&mut rng).copied().unwrap_or(&[]);
                    n = n.with_mig(g, layout);
                }
            }
            n.with_pool("h100")
        } else if roll < 0.8 {
            Node::test(&name)
                .with_capacity(128_000, 1024 * 1024)
                .with_gpus(8, "A100-80GB")
                .with_topology(Topology::islands(&[4, 4], 12))
                .with_pool("a100")
        } else {
            Node::test(&name).with_capacity(64_000, 256 * 1024).with_shared_gpus(8, "L4").with_pool("l4")
        };
        out.push(node);
    }
    // Names are unique by construction.
    Snapshot::new(out).unwrap_or_default()
}
