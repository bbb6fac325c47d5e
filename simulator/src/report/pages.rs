//! The two reports: an openb replay's policies side by side, and a scenario's.

use anyhow::Result;
use plotters::style::colors::BLACK;

use super::Page;
use super::charts::{Axes, Series, bar_chart, line_chart, mean_band, occupancy_map};

/// The openb report: allocation curves, fragmentation, a table and each policy's slice map for
/// its first seed.
pub fn openb_html(reports: &[crate::openb::PolicyReport], command: &str) -> Result<String> {
    let trace = reports.first().map_or("", |r| r.trace.as_str());
    let mut page = Page::new(&format!("tessera-sim openb: {trace}"), command);
    let seeds: Vec<String> =
        reports.first().map(|r| r.runs.iter().map(|x| x.seed.to_string()).collect()).unwrap_or_default();
    page.paragraph(&format!(
        "Trace {trace}, tune {}, seeds {}. Curves are the mean over seeds; the band spans the lowest and highest seed.",
        reports.first().map_or(0.0, |r| r.tune),
        seeds.join(", ")
    ));
    page.heading("Allocation");
    let series: Vec<Series> = reports
        .iter()
        .map(|r| {
            let curves: Vec<&[(u32, f64)]> = r.runs.iter().map(|x| x.curve.as_slice()).collect();
            let band = mean_band(&curves);
            Series {
                name: r.policy.clone(),
                points: band.iter().map(|&(x, m, _, _)| (x, m)).collect(),
                band: if r.runs.len() > 1 { band.iter().map(|&(x, _, lo, hi)| (x, lo, hi)).collect() } else { vec![] },
                colour: None,
            }
        })
        .collect();
    page.svg(&line_chart(
        &Axes {
            title: "GPU allocation against arrived GPU request",
            x: ("arrived GPU request, % of capacity", 0.0, 130.0),
            y: ("allocated GPU, % of capacity", 0.0, 100.0),
        },
        &series,
    )?);
    // The policies differ only past ~80% arrived; the same curves, closer.
    page.svg(&line_chart(
        &Axes {
            title: "The same, from 80% arrived",
            x: ("arrived GPU request, % of capacity", 80.0, 130.0),
            y: ("allocated GPU, % of capacity", 75.0, 100.0),
        },
        &series
            .iter()
            .map(|s| Series {
                points: s.points.iter().copied().filter(|p| p.0 >= 80.0).collect(),
                band: s.band.iter().copied().filter(|p| p.0 >= 80.0).collect(),
                ..s.clone()
            })
            .collect::<Vec<_>>(),
    )?);
    let mean = |r: &crate::openb::PolicyReport, f: &dyn Fn(&crate::openb::Run) -> f64| {
        r.runs.iter().map(f).sum::<f64>() / r.runs.len().max(1) as f64
    };
    let names: Vec<String> = reports.iter().map(|r| r.policy.clone()).collect();
    page.heading("Fragmentation at the end");
    page.svg(&bar_chart(
        "FGD fragmentation at the end (mean over seeds)",
        "% of cluster GPU",
        &names,
        &[("fragmentation %".to_owned(), reports.iter().map(|r| mean(r, &|x| x.fragmentation_pct)).collect())],
    )?);
    page.heading("Numbers");
    let mut rows: Vec<Vec<String>> = reports
        .iter()
        .map(|r| {
            vec![
                r.policy.clone(),
                format!("{:.2}", 100.0 * r.mean_allocation_ratio),
                format!("{:.1}", mean(r, &|x| x.unallocated_gpus)),
                format!("{:.1}", mean(r, &|x| x.failed_pods as f64)),
                format!("{:.2}", mean(r, &|x| x.fragmentation_pct)),
                format!("{:.2}", mean(r, &|x| x.elapsed_seconds)),
            ]
        })
        .collect();
    if let Some(b) = reports.first().and_then(|r| r.upper_bound.as_ref()) {
        let cap: f64 = reports.first().and_then(|r| r.runs.first()).map_or(0.0, |x| x.occupancy.gpus.len() as f64);
        rows.push(vec![
            "upper bound (LP, certified)".to_owned(),
            format!("{:.2}", 100.0 * b.mean_allocation_ratio),
            format!("{:.1}", cap * (1.0 - b.mean_allocation_ratio)),
            "-".to_owned(),
            "-".to_owned(),
            "-".to_owned(),
        ]);
    }
    page.table(&["policy", "alloc %", "unalloc GPU", "failed pods", "frag %", "s/run"], &rows);
    if reports.first().is_some_and(|r| r.upper_bound.is_some()) {
        page.paragraph(
            "The upper bound holds for every policy on the same arrivals: an LP relaxation over node types and pod shapes, certified by a dual solution (docs/algorithms.md).",
        );
    }
    page.heading("Final GPU occupancy");
    page.paragraph("One cell per GPU in node order, shaded by the share in use (grey: idle, dark: full).");
    for r in reports {
        if let Some(run) = r.runs.first() {
            page.svg(&occupancy_map(&format!("{} (seed {})", r.policy, run.seed), &run.occupancy)?);
        }
    }
    Ok(page.render())
}

/// Step points of a piecewise-constant timeline, for drawing it as a line.
fn steps(points: impl Iterator<Item = (f64, f64)>) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = Vec::new();
    for (x, y) in points {
        if let Some(&(_, prev)) = out.last() {
            out.push((x, prev));
        }
        out.push((x, y));
    }
    out
}

/// The scenario report: GPUs used against the lower bound and reconfigurations per policy, GPUs
/// over time when models arrive and leave, a table, and each policy's final slice map.
pub fn scenario_html(
    sc: &crate::scenario::Scenario,
    outcomes: &[crate::scenario::Outcome],
    command: &str,
) -> Result<String> {
    let mut page = Page::new(&format!("tessera-sim scenario: {}", sc.name), command);
    if !sc.description.trim().is_empty() {
        page.paragraph(sc.description.trim());
    }
    let names: Vec<String> = outcomes.iter().map(|o| o.policy.clone()).collect();
    let sum = |m: &std::collections::BTreeMap<String, u32>| f64::from(m.values().sum::<u32>());
    let dynamic = outcomes.iter().any(|o| o.dynamics.is_some());
    page.heading("GPUs used");
    let series: Vec<(String, Vec<f64>)> = if dynamic {
        let get = |f: &dyn Fn(&crate::scenario::Dynamics) -> f64| {
            outcomes.iter().map(|o| o.dynamics.as_ref().map_or(0.0, f)).collect::<Vec<f64>>()
        };
        vec![
            ("peak GPUs used".to_owned(), get(&|d| f64::from(d.peak_gpus_used))),
            ("peak lower bound".to_owned(), get(&|d| f64::from(d.peak_lower_bound))),
            ("mean GPUs used".to_owned(), get(&|d| d.mean_gpus_used)),
            ("mean lower bound".to_owned(), get(&|d| d.mean_lower_bound)),
        ]
    } else {
        vec![
            ("GPUs used".to_owned(), outcomes.iter().map(|o| sum(&o.gpus_used)).collect()),
            ("lower bound".to_owned(), outcomes.iter().map(|o| sum(&o.lower_bound)).collect()),
        ]
    };
    page.svg(&bar_chart("GPUs used against the lower bound, all products", "GPUs", &names, &series)?);
    page.svg(&bar_chart(
        "MIG reconfigurations",
        "reconfigurations",
        &names,
        &[("reconfigurations".to_owned(), outcomes.iter().map(|o| o.mig_reconfigs as f64).collect())],
    )?);
    if dynamic {
        let horizon = outcomes.iter().filter_map(|o| o.dynamics.as_ref()).map(|d| d.horizon_hours).fold(0.0, f64::max);
        let top = outcomes
            .iter()
            .filter_map(|o| o.dynamics.as_ref())
            .map(|d| d.peak_gpus_used.max(d.peak_lower_bound))
            .max()
            .unwrap_or(1);
        let mut lines: Vec<Series> = outcomes
            .iter()
            .filter_map(|o| {
                o.dynamics.as_ref().map(|d| Series {
                    name: o.policy.clone(),
                    points: steps(d.timeline.iter().map(|p| (p.0, f64::from(p.1)))),
                    band: vec![],
                    colour: None,
                })
            })
            .collect();
        if let Some((o, d)) = outcomes.iter().find_map(|o| o.dynamics.as_ref().map(|d| (o, d))) {
            lines.push(Series {
                name: format!("lower bound ({})", o.policy),
                points: steps(d.timeline.iter().map(|p| (p.0, f64::from(p.2)))),
                band: vec![],
                colour: Some(BLACK),
            });
        }
        page.heading("Over time");
        page.svg(&line_chart(
            &Axes {
                title: "GPUs holding at least one pod",
                x: ("hours", 0.0, horizon.max(1e-3)),
                y: ("GPUs", 0.0, f64::from(top) * 1.1 + 1.0),
            },
            &lines,
        )?);
    }
    page.heading("Numbers");
    let per_product = |o: &crate::scenario::Outcome| {
        o.lower_bound
            .keys()
            .chain(o.gpus_used.keys())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .map(|k| format!("{k} {}/{}", o.gpus_used.get(k).unwrap_or(&0), o.lower_bound.get(k).unwrap_or(&0)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut header = vec!["policy", "placed", "rejected", "reconfigs", "GPUs used / lower bound at the end"];
    if dynamic {
        header.extend(["arrivals", "departures", "peak GPUs", "peak bound", "mean GPUs", "mean bound"]);
    }
    header.push("rejected by model");
    let rows: Vec<Vec<String>> = outcomes
        .iter()
        .map(|o| {
            let mut row = vec![
                o.policy.clone(),
                o.placed.to_string(),
                o.rejected.to_string(),
                o.mig_reconfigs.to_string(),
                per_product(o),
            ];
            if let Some(d) = &o.dynamics {
                row.extend([
                    d.arrivals.to_string(),
                    d.departures.to_string(),
                    d.peak_gpus_used.to_string(),
                    d.peak_lower_bound.to_string(),
                    format!("{:.1}", d.mean_gpus_used),
                    format!("{:.1}", d.mean_lower_bound),
                ]);
            } else if dynamic {
                row.extend(std::iter::repeat_n("-".to_owned(), 6));
            }
            let rej: Vec<String> = o.rejected_by_model.iter().map(|(k, v)| format!("{k}×{v}")).collect();
            row.push(if rej.is_empty() { "-".to_owned() } else { rej.join(" ") });
            row
        })
        .collect();
    page.table(&header, &rows);
    page.heading("Final GPU occupancy");
    page.paragraph(
        "One row per node, one cell per GPU. MIG GPUs are split into their memory slices: dark instances are held by a pod, pale ones exist but are free, grey slices are not partitioned. Other GPUs are shaded by the share in use.",
    );
    for o in outcomes {
        page.svg(&occupancy_map(&o.policy, &o.occupancy)?);
    }
    Ok(page.render())
}
