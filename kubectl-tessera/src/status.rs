//! `kubectl tessera status`: nodes → GPUs → slices, and what holds each, from `/api/v1/cluster`.

use tessera_api::views::{ClusterView, GpuView};
use tessera_core::GpuMode;
use tessera_core::metrics::Packing;

use crate::table;

fn holders(gpu: &GpuView) -> String {
    if gpu.holders.is_empty() { "free".to_owned() } else { gpu.holders.join(",") }
}

/// The status report for a cluster view; `node` keeps only that node.
pub fn render(view: &ClusterView, node: Option<&str>) -> String {
    let mut out = String::new();
    let leader = match view.leader {
        Some(true) => "yes",
        Some(false) => "no (this replica does not bind; its view may lag)",
        None => "unknown",
    };
    out.push_str(&format!(
        "mode {}  policy {}  generation {}  leader {}\n\n",
        view.mode, view.policy, view.generation, leader
    ));
    let mut rows = Vec::new();
    let nodes: Vec<_> = view.nodes.iter().filter(|v| node.is_none_or(|want| v.name == want)).collect();
    for nd in &nodes {
        if nd.gpus.is_empty() {
            rows.push(vec![
                nd.name.clone(),
                nd.pool.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "no GPUs".into(),
                "".into(),
            ]);
        }
        for g in &nd.gpus {
            let mode = match g.mode {
                GpuMode::Full => "full",
                GpuMode::Shared => "shared",
                GpuMode::Mig => "mig",
            };
            let mut row = |slice: String, holder: String| {
                let health = if g.healthy { "" } else { " (unhealthy)" };
                rows.push(vec![
                    nd.name.clone(),
                    nd.pool.clone(),
                    g.index.to_string(),
                    format!("{}{health}", g.model),
                    mode.to_owned(),
                    slice,
                    holder,
                ]);
            };
            match g.mode {
                GpuMode::Mig => {
                    for m in &g.mig {
                        let holder = m.holder.clone().unwrap_or_else(|| "free".to_owned());
                        row(format!("{}@{}", m.profile, m.start), holder);
                    }
                    match &g.largest_placeable {
                        Some(p) => row("(free slices)".into(), format!("room for up to {p}")),
                        None if g.mig.is_empty() => row("(no instances)".into(), "".into()),
                        None => {}
                    }
                }
                GpuMode::Shared => row(format!("shared {}/1000m", g.allocated_milli), holders(g)),
                GpuMode::Full => row("whole".into(), holders(g)),
            }
        }
    }
    if let Some(want) = node
        && nodes.is_empty()
    {
        out.push_str(&format!("node {want} is not in the scheduler's view\n"));
        return out;
    }
    out.push_str(&table::render(&["NODE", "POOL", "GPU", "MODEL", "MODE", "SLICE", "HOLDER"], &rows));
    if node.is_none() {
        out.push('\n');
        out.push_str(&packing(view));
    }
    out
}

fn packing(view: &ClusterView) -> String {
    let mut rows = Vec::new();
    let mut push = |name: &str, p: &Packing| {
        rows.push(vec![
            name.to_owned(),
            p.nodes.to_string(),
            p.gpus.to_string(),
            format!("{:.1}%", p.allocation_ratio * 100.0),
            p.stranded_slices.to_string(),
            format!("{:.0}", p.fragmentation_milli),
            p.reconfigs.to_string(),
        ]);
    };
    for (name, p) in &view.packing.pools {
        push(name, p);
    }
    push("(cluster)", &view.packing.cluster);
    table::render(
        &["POOL", "NODES", "GPUS", "ALLOCATED", "STRANDED SLICES", "FRAGMENTATION (mGPU)", "MIG RECONFIGS"],
        &rows,
    )
}
