//! `kubectl tessera status`: nodes → GPUs → slices, and what holds each, from `/api/v1/cluster`.

use serde_json::Value;

use crate::table;

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

fn n(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn list<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key).and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[])
}

fn holders(gpu: &Value) -> String {
    let h: Vec<&str> = list(gpu, "holders").iter().filter_map(Value::as_str).collect();
    if h.is_empty() { "free".to_owned() } else { h.join(",") }
}

/// The status report for a cluster view; `node` keeps only that node.
pub fn render(view: &Value, node: Option<&str>) -> String {
    let mut out = String::new();
    let leader = match view.get("leader").and_then(Value::as_bool) {
        Some(true) => "yes",
        Some(false) => "no (this replica does not bind; its view may lag)",
        None => "unknown",
    };
    out.push_str(&format!(
        "mode {}  policy {}  generation {}  leader {}\n\n",
        s(view, "mode"),
        s(view, "policy"),
        n(view, "generation"),
        leader
    ));
    let mut rows = Vec::new();
    let nodes: Vec<&Value> =
        list(view, "nodes").iter().filter(|v| node.is_none_or(|want| s(v, "name") == want)).collect();
    for nd in &nodes {
        let name = s(nd, "name").to_owned();
        let pool = s(nd, "pool").to_owned();
        let gpus = list(nd, "gpus");
        if gpus.is_empty() {
            rows.push(vec![
                name.clone(),
                pool.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "no GPUs".into(),
                "".into(),
            ]);
        }
        for g in gpus {
            let mut row = |slice: String, holder: String| {
                let health = if g.get("healthy").and_then(Value::as_bool) == Some(false) { " (unhealthy)" } else { "" };
                rows.push(vec![
                    name.clone(),
                    pool.clone(),
                    n(g, "index").to_string(),
                    format!("{}{health}", s(g, "model")),
                    s(g, "mode").to_owned(),
                    slice,
                    holder,
                ]);
            };
            match s(g, "mode") {
                "mig" => {
                    let instances = list(g, "mig");
                    for m in instances {
                        let holder = m.get("holder").and_then(Value::as_str).unwrap_or("free").to_owned();
                        row(format!("{}@{}", s(m, "profile"), n(m, "start")), holder);
                    }
                    match g.get("largestPlaceable").and_then(Value::as_str) {
                        Some(p) => row("(free slices)".into(), format!("room for up to {p}")),
                        None if instances.is_empty() => row("(no instances)".into(), "".into()),
                        None => {}
                    }
                }
                "shared" => row(format!("shared {}/1000m", n(g, "allocatedMilli")), holders(g)),
                _ => row("whole".into(), holders(g)),
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

fn packing(view: &Value) -> String {
    let mut rows = Vec::new();
    let mut push = |name: &str, p: &Value| {
        rows.push(vec![
            name.to_owned(),
            n(p, "nodes").to_string(),
            n(p, "gpus").to_string(),
            format!("{:.1}%", p.get("allocation_ratio").and_then(Value::as_f64).unwrap_or(0.0) * 100.0),
            n(p, "stranded_slices").to_string(),
            format!("{:.0}", p.get("fragmentation_milli").and_then(Value::as_f64).unwrap_or(0.0)),
            n(p, "reconfigs").to_string(),
        ]);
    };
    let packing = view.get("packing").cloned().unwrap_or(Value::Null);
    if let Some(pools) = packing.get("pools").and_then(Value::as_object) {
        for (name, p) in pools {
            push(name, p);
        }
    }
    if let Some(c) = packing.get("cluster") {
        push("(cluster)", c);
    }
    table::render(
        &["POOL", "NODES", "GPUS", "ALLOCATED", "STRANDED SLICES", "FRAGMENTATION (mGPU)", "MIG RECONFIGS"],
        &rows,
    )
}
