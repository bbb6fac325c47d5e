//! `kubectl tessera explain POD`: why a pod is pending (or where it went), from
//! `/api/v1/explain/{namespace}/{pod}`.

use serde_json::Value;

use crate::table;

/// The explanation as text.
pub fn render(e: &Value) -> String {
    let pod = e.get("pod").and_then(Value::as_str).unwrap_or("?");
    let mut out = format!("Pod {pod}\n");
    if let Some(err) = e.get("error").and_then(Value::as_str) {
        out.push_str(&format!("Its GPU request cannot be read, so no node is offered: {err}\n"));
    }
    if let Some(d) = e.get("demand").filter(|d| !d.is_null()) {
        out.push_str(&format!("Demand: {d}\n"));
    }
    if let Some(a) = e.get("allocation").filter(|a| !a.is_null()) {
        let node = a.get("node").and_then(Value::as_str).unwrap_or("?");
        let grants: Vec<String> =
            a.get("grants").and_then(Value::as_array).map(|g| g.iter().map(grant).collect()).unwrap_or_default();
        let state = match a.get("reserved_until_ms").and_then(Value::as_u64) {
            Some(_) => "Reserved (gang plan, waiting for every member)",
            None => "Holds",
        };
        out.push_str(&format!("{state} on node {node}: {}\n", grants.join(", ")));
    }
    if e.get("stale").and_then(Value::as_bool) == Some(true) {
        out.push_str(
            "The cluster has changed since this pod was last filtered; the reasons below may be out of date.\n",
        );
    }
    let nodes = e.get("nodes").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
    if nodes.is_empty() {
        return out;
    }
    let count = |r: &str| nodes.iter().filter(|n| n.get("result").and_then(Value::as_str) == Some(r)).count();
    let (fits, now, never) = (count("fits"), count("unschedulable"), count("unresolvable"));
    out.push_str(&format!(
        "Last filter: {fits} of {} node(s) fit; {now} cannot host it now (capacity may free up), {never} never can.\n\n",
        nodes.len()
    ));
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                n.get("node").and_then(Value::as_str).unwrap_or("?").to_owned(),
                n.get("result").and_then(Value::as_str).unwrap_or("?").to_owned(),
                n.get("score").and_then(Value::as_f64).map(|s| format!("{s:.2}")).unwrap_or_else(|| "-".into()),
                n.get("reason").and_then(Value::as_str).unwrap_or("").to_owned(),
            ]
        })
        .collect();
    out.push_str(&table::render(&["NODE", "RESULT", "SCORE", "REASON"], &rows));
    out
}

fn grant(g: &Value) -> String {
    let gpu = g.get("gpu").and_then(Value::as_u64).unwrap_or(0);
    match g.get("kind").and_then(Value::as_str) {
        Some("whole") => format!("GPU {gpu}"),
        Some("share") => format!("{}m of GPU {gpu}", g.get("milli").and_then(Value::as_u64).unwrap_or(0)),
        Some("mig") => format!(
            "MIG {} at slice {} of GPU {gpu}",
            g.get("class").map(|c| c.as_str().map(str::to_owned).unwrap_or_else(|| c.to_string())).unwrap_or_default(),
            g.get("start").and_then(Value::as_u64).unwrap_or(0)
        ),
        _ => g.to_string(),
    }
}
