//! The static baseline: a fraction of every pool's MIG-capable GPUs pre-partitioned with a fixed
//! mig-parted layout, as clusters run today.

use anyhow::Result;
use anyhow::bail;
use tessera_core::cluster::{GpuMode, MigOp, Snapshot};
use tessera_core::mig::{MigLayout, MigProduct};

use super::schema::Scenario;

/// mig-parted style fixed layouts.
pub(super) fn layout_for(name: &str, product: MigProduct) -> Result<Vec<&'static str>> {
    let g = product.geometry();
    let n = |c| g.profile(c).map(|p| p.name).unwrap_or("");
    use tessera_core::mig::ProfileClass::*;
    Ok(match name {
        "all-balanced" => vec![n(G1), n(G1), n(G2), n(G3)],
        "all-1g" => vec![n(G1); 7],
        "all-3g" => vec![n(G3), n(G3)],
        "all-7g" => vec![n(G7)],
        other => bail!("unknown static layout {other:?}; use all-balanced, all-1g, all-3g or all-7g"),
    })
}

/// Pre-partitions the static baseline's share of MIG-capable GPUs.
pub(super) fn apply_static(snap: &mut Snapshot, sc: &Scenario) -> Result<()> {
    let names: Vec<_> = snap.nodes().iter().map(|n| n.name.clone()).collect();
    for name in names {
        let gpus: Vec<(u32, MigProduct)> = snap
            .node(&name)
            .map(|n| n.gpus.iter().filter_map(|g| g.mig_product().map(|p| (g.index, p))).collect())
            .unwrap_or_default();
        let take = (gpus.len() as f64 * sc.static_baseline.fraction).round() as usize;
        for &(gpu, product) in gpus.iter().take(take) {
            snap.apply(&name, MigOp::SetMode { gpu, mode: GpuMode::Mig })?;
            let mut layout = MigLayout::empty(product);
            for prof in layout_for(&sc.static_baseline.layout, product)? {
                let Some(p) = product.geometry().profile_by_name(prof) else { continue };
                let Some(&start) = layout.placements(p.class).first() else { continue };
                layout.create(p.class, start)?;
                snap.apply(&name, MigOp::Create { gpu, class: p.class, start })?;
            }
        }
    }
    Ok(())
}
