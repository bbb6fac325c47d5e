//! The what-if's answer as text.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use super::{Outcome, Report};

fn devices_text(o: &Outcome) -> String {
    let mut parts: Vec<String> = o
        .devices
        .iter()
        .map(|d| match (&d.profile, d.start, d.share) {
            (Some(p), Some(s), _) => format!("GPU{} {p}@{s}", d.index),
            (_, _, Some(m)) => format!("GPU{} share {m}m", d.index),
            _ => format!("GPU{}", d.index),
        })
        .collect();
    if parts.is_empty() {
        parts.push("no GPU".into());
    }
    let mut s = parts.join(", ");
    if !o.mig_changes.is_empty() {
        let _ = write!(s, "  (MIG: {})", o.mig_changes.join(", "));
    }
    s
}

/// The report as text.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    let c = &r.capture;
    let _ = writeln!(
        s,
        "capture: {} nodes, {} GPUs, {} pods holding resources{}",
        c.nodes,
        c.gpus,
        c.pods,
        if c.source == "scheduler" { " (scheduler dump)" } else { "" }
    );
    let _ = writeln!(s, "policy {}, seed {}", r.policy, r.seed);
    if let Some(a) = &r.added {
        let tried: Vec<String> =
            a.placed_by_count.iter().enumerate().map(|(k, n)| format!("+{k}: {n}/{}", r.pods)).collect();
        let _ = writeln!(s, "pods placed by added nodes ({}): {}", a.template, tried.join(", "));
        match a.nodes {
            Some(0) => {
                let _ = writeln!(s, "everything fits without adding nodes");
            }
            Some(k) => {
                let _ = writeln!(s, "smallest addition: {k} node{} {}", if k == 1 { "" } else { "s" }, a.template);
            }
            None => {
                let _ = writeln!(s, "does not fit even with {} added nodes {} (--max-add)", a.max, a.template);
            }
        }
    }
    s.push('\n');
    let w_pod = r.outcomes.iter().map(|o| o.pod.len() + 2).max().unwrap_or(3).max(5);
    let w_node = r.outcomes.iter().filter_map(|o| o.node.as_ref()).map(String::len).max().unwrap_or(4).max(4);
    let _ = writeln!(s, "{:<w_pod$} {:<w_node$} DEVICES", "POD", "NODE");
    let mut gangs_done: BTreeSet<&str> = BTreeSet::new();
    for o in &r.outcomes {
        let indent = match &o.gang {
            Some(g) => {
                if gangs_done.insert(g) {
                    let members: Vec<&Outcome> =
                        r.outcomes.iter().filter(|x| x.gang.as_deref() == Some(g.as_str())).collect();
                    let _ = if members.iter().all(|m| m.fits) {
                        writeln!(s, "gang {g}: {} members, all placed", members.len())
                    } else {
                        // The core's reason starts with the gang's name, already printed.
                        let why = members[0].reason.as_deref().unwrap_or("no reason given");
                        let why = why.strip_prefix(&format!("gang {g}: ")).unwrap_or(why);
                        writeln!(s, "gang {g}: {} members, none placed: {why}", members.len())
                    };
                }
                "  "
            }
            None => "",
        };
        let pod = format!("{indent}{}", o.pod);
        match (&o.node, &o.reason) {
            (Some(n), _) => {
                let _ = writeln!(s, "{pod:<w_pod$} {n:<w_node$} {}", devices_text(o));
            }
            (None, _) if o.gang.is_some() => {
                let _ = writeln!(s, "{pod:<w_pod$} {:<w_node$} -", "-");
            }
            (None, reason) => {
                let _ = writeln!(
                    s,
                    "{pod:<w_pod$} {:<w_node$} does not fit: {}",
                    "-",
                    reason.as_deref().unwrap_or("no reason given")
                );
            }
        }
    }
    let _ = writeln!(s, "\n{} of {} pods fit.", r.placed, r.pods);
    s
}
