//! `kubectl tessera explain POD`: why a pod is pending (or where it went), from
//! `/api/v1/explain/{namespace}/{pod}`.

use tessera_api::views::{Explanation, NodeResult};
use tessera_core::Grant;

use crate::table;

/// The explanation as text.
pub fn render(e: &Explanation) -> String {
    let mut out = format!("Pod {}\n", e.pod);
    if let Some(err) = &e.error {
        out.push_str(&format!("Its GPU request cannot be read, so no node is offered: {err}\n"));
    }
    if let Some(d) = &e.demand {
        // The demand as the scheduler wrote it.
        out.push_str(&format!("Demand: {}\n", serde_json::to_string(d).unwrap_or_default()));
    }
    if let Some(a) = &e.allocation {
        let grants: Vec<String> = a.grants.iter().map(grant).collect();
        let state = match a.reserved_until_ms {
            Some(_) => "Reserved (gang plan, waiting for every member)",
            None => "Holds",
        };
        out.push_str(&format!("{state} on node {}: {}\n", a.node, grants.join(", ")));
    }
    if e.stale {
        out.push_str(
            "The cluster has changed since this pod was last filtered; the reasons below may be out of date.\n",
        );
    }
    if e.nodes.is_empty() {
        return out;
    }
    let count = |r: NodeResult| e.nodes.iter().filter(|n| n.result == r).count();
    let (fits, now, never) =
        (count(NodeResult::Fits), count(NodeResult::Unschedulable), count(NodeResult::Unresolvable));
    out.push_str(&format!(
        "Last filter: {fits} of {} node(s) fit; {now} cannot host it now (capacity may free up), {never} never can.\n\n",
        e.nodes.len()
    ));
    let rows: Vec<Vec<String>> = e
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.node.clone(),
                match n.result {
                    NodeResult::Fits => "fits",
                    NodeResult::Unschedulable => "unschedulable",
                    NodeResult::Unresolvable => "unresolvable",
                }
                .to_owned(),
                n.score.map(|s| format!("{s:.2}")).unwrap_or_else(|| "-".into()),
                n.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    out.push_str(&table::render(&["NODE", "RESULT", "SCORE", "REASON"], &rows));
    out
}

fn grant(g: &Grant) -> String {
    match *g {
        Grant::Whole { gpu } => format!("GPU {gpu}"),
        Grant::Share { gpu, milli } => format!("{milli}m of GPU {gpu}"),
        Grant::Mig { gpu, class, start } => {
            // The class by its wire name (`g1`), as the scheduler writes it.
            let class =
                serde_json::to_value(class).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
            format!("MIG {class} at slice {start} of GPU {gpu}")
        }
    }
}
