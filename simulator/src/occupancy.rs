//! A compact picture of a final cluster state: what each GPU holds, for the report's slice map.
//! Kept instead of the whole `Snapshot` so that a replay's result stays small.

use tessera_core::cluster::{GpuMode, Snapshot};

/// One GPU's use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuCell {
    /// Index into [`Occupancy::nodes`].
    pub node: u32,
    pub gpu: u32,
    /// Share of the GPU in use, milli-GPU (MIG: compute slices held).
    pub used_milli: u32,
    /// MIG mode: the instances as `(first memory slice, memory slices, held by a pod)`.
    pub mig: Option<MigCell>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigCell {
    pub memory_slices: u8,
    pub instances: Vec<(u8, u8, bool)>,
}

/// Every GPU of a snapshot, node by node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Occupancy {
    pub nodes: Vec<String>,
    pub gpus: Vec<GpuCell>,
}

impl Occupancy {
    pub fn of(snap: &Snapshot) -> Self {
        let mut out = Occupancy::default();
        for (ni, node) in snap.nodes().iter().enumerate() {
            out.nodes.push(node.name.0.clone());
            for g in &node.gpus {
                let mig = match (g.mode(), g.mig_layout()) {
                    (GpuMode::Mig, Some(layout)) => {
                        let geom = layout.geometry();
                        let instances = layout
                            .instances()
                            .iter()
                            .filter_map(|i| {
                                geom.profile(i.class).map(|p| (i.start, p.memory_slices, g.instance_busy(i.start)))
                            })
                            .collect();
                        Some(MigCell { memory_slices: geom.memory_slices, instances })
                    }
                    _ => None,
                };
                out.gpus.push(GpuCell { node: ni as u32, gpu: g.index, used_milli: g.allocated_milli(), mig });
            }
        }
        out
    }
}
