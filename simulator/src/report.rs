//! The `--html` report: one self-contained file (inline CSS and SVG, no scripts, fonts or
//! links) with plotters charts, the numbers as tables and the command line that produced it.

use std::fmt::Write as _;

use anyhow::Result;
use plotters::prelude::*;

use crate::occupancy::Occupancy;

/// Series colours, in policy order; chosen to stay apart for the usual colour-vision deficiencies.
const COLOURS: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(100, 100, 100),
    RGBColor(240, 228, 66),
];

pub fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()]
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// This process's command line, quoted so that it can be pasted into a shell.
pub fn command_line() -> String {
    std::env::args()
        .map(|a| {
            let plain = !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
            if plain { a } else { format!("'{}'", a.replace('\'', r"'\''")) }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// An HTML page being assembled.
#[derive(Debug)]
pub struct Page {
    title: String,
    body: String,
}

impl Page {
    pub fn new(title: &str, command: &str) -> Self {
        let mut body = String::new();
        let _ = write!(body, "<h1>{}</h1>\n<p>Command:</p>\n<pre>{}</pre>\n", escape(title), escape(command));
        Self { title: title.to_owned(), body }
    }

    pub fn heading(&mut self, text: &str) {
        let _ = writeln!(self.body, "<h2>{}</h2>", escape(text));
    }

    pub fn paragraph(&mut self, text: &str) {
        let _ = writeln!(self.body, "<p>{}</p>", escape(text));
    }

    /// An SVG made by this module's chart functions (plotters escapes the text it writes).
    pub fn svg(&mut self, svg: &str) {
        let _ = writeln!(self.body, "<figure>{svg}</figure>");
    }

    pub fn table(&mut self, header: &[&str], rows: &[Vec<String>]) {
        self.body.push_str("<table>\n<tr>");
        for h in header {
            let _ = write!(self.body, "<th>{}</th>", escape(h));
        }
        self.body.push_str("</tr>\n");
        for row in rows {
            self.body.push_str("<tr>");
            for cell in row {
                let _ = write!(self.body, "<td>{}</td>", escape(cell));
            }
            self.body.push_str("</tr>\n");
        }
        self.body.push_str("</table>\n");
    }

    pub fn render(&self) -> String {
        format!(
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n<style>\n{}</style>\n</head>\n<body>\n{}</body>\n</html>\n",
            escape(&self.title),
            STYLE,
            self.body
        )
    }
}

const STYLE: &str = "body { font-family: sans-serif; margin: 2em; color: #222; }
pre { background: #f4f4f4; padding: 0.6em; white-space: pre-wrap; word-break: break-all; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
td:last-child { white-space: normal; }
figure { margin: 1em 0; }
";

/// One line of a line chart, with an optional `(x, low, high)` band drawn behind it.
#[derive(Debug, Clone, Default)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub band: Vec<(f64, f64, f64)>,
    /// Overrides the palette colour (e.g. black for a reference line).
    pub colour: Option<RGBColor>,
}

/// Axis ranges and titles of a chart.
#[derive(Debug, Clone)]
pub struct Axes<'a> {
    pub title: &'a str,
    pub x: (&'a str, f64, f64),
    pub y: (&'a str, f64, f64),
}

const WIDTH: u32 = 900;
/// Room at the right for the legend, so that it never hides data.
const LEGEND_W: u32 = 190;

/// A legend in the right margin: a swatch (line or box) and the name per entry.
fn side_legend<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    entries: &[(String, RGBColor, bool)],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let x = (WIDTH - LEGEND_W + 14) as i32;
    for (i, (name, c, line)) in entries.iter().enumerate() {
        let y = 48 + 20 * i as i32;
        if *line {
            root.draw(&PathElement::new(vec![(x, y), (x + 22, y)], c.stroke_width(3))).map_err(draw_err)?;
        } else {
            root.draw(&Rectangle::new([(x + 5, y - 6), (x + 17, y + 6)], c.filled())).map_err(draw_err)?;
        }
        root.draw(&Text::new(name.clone(), (x + 30, y - 7), ("sans-serif", 13))).map_err(draw_err)?;
    }
    Ok(())
}

fn draw_err<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> anyhow::Error {
    anyhow::anyhow!("drawing a chart: {e}")
}

pub fn line_chart(axes: &Axes<'_>, series: &[Series]) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, 460)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(axes.title, ("sans-serif", 18))
            .margin(12)
            .margin_right(LEGEND_W)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(axes.x.1..axes.x.2, axes.y.1..axes.y.2)
            .map_err(draw_err)?;
        chart.configure_mesh().x_desc(axes.x.0).y_desc(axes.y.0).draw().map_err(draw_err)?;
        let mut legend = Vec::new();
        for (i, s) in series.iter().enumerate() {
            let c = s.colour.unwrap_or_else(|| colour(i));
            legend.push((s.name.clone(), c, true));
            if !s.band.is_empty() {
                let outline: Vec<(f64, f64)> = s
                    .band
                    .iter()
                    .map(|&(x, _, hi)| (x, hi))
                    .chain(s.band.iter().rev().map(|&(x, lo, _)| (x, lo)))
                    .collect();
                chart.draw_series(std::iter::once(Polygon::new(outline, c.mix(0.18)))).map_err(draw_err)?;
            }
            chart.draw_series(LineSeries::new(s.points.iter().copied(), c.stroke_width(2))).map_err(draw_err)?;
        }
        side_legend(&root, &legend)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

/// Grouped bars: one group per category, one bar per `(name, values)` series.
pub fn bar_chart(title: &str, y_desc: &str, categories: &[String], series: &[(String, Vec<f64>)]) -> Result<String> {
    let n = categories.len().max(1);
    let top = series.iter().flat_map(|(_, v)| v.iter().copied()).fold(0.0_f64, f64::max);
    let top = if top > 0.0 { top * 1.15 } else { 1.0 };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, 400)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .margin_right(if series.len() > 1 { LEGEND_W } else { 12 })
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..n as f64, 0.0..top)
            .map_err(draw_err)?;
        chart.configure_mesh().disable_x_mesh().x_labels(0).y_desc(y_desc).draw().map_err(draw_err)?;
        // Category names centred under their groups, in pixels.
        let style = TextStyle::from(("sans-serif", 13).into_font()).pos(plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Center,
            plotters::style::text_anchor::VPos::Top,
        ));
        for (i, name) in categories.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
            root.draw(&Text::new(name.clone(), (x, y + 8), style.clone())).map_err(draw_err)?;
        }
        let k = series.len().max(1) as f64;
        let width = 0.8 / k;
        for (si, (_, values)) in series.iter().enumerate() {
            let c = colour(si);
            let bars = values.iter().enumerate().map(|(i, &v)| {
                let x0 = i as f64 + 0.1 + si as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width * 0.92, v)], c.filled())
            });
            chart.draw_series(bars).map_err(draw_err)?;
        }
        if series.len() > 1 {
            let legend: Vec<_> =
                series.iter().enumerate().map(|(i, (name, _))| (name.clone(), colour(i), false)).collect();
            side_legend(&root, &legend)?;
        }
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

/// Fill for a GPU with `used_milli` of 1000 in use: light grey when idle, then pale to dark blue.
fn share_colour(used_milli: u32) -> RGBColor {
    if used_milli == 0 {
        return RGBColor(232, 232, 232);
    }
    let t = f64::from(used_milli.min(1000)) / 1000.0;
    let mix = |a: u8, b: u8| (f64::from(a) + (f64::from(b) - f64::from(a)) * t).round() as u8;
    RGBColor(mix(198, 8), mix(219, 48), mix(239, 107))
}

/// One cell per GPU coloured by the share in use; MIG GPUs are split into their memory slices,
/// held instances dark, free instances pale, unpartitioned slices grey. Small clusters get one
/// row per node with its name; large ones a wrapped grid in node order.
pub fn occupancy_map(title: &str, occ: &Occupancy) -> Result<String> {
    let per_node = {
        let mut counts = vec![0usize; occ.nodes.len()];
        for g in &occ.gpus {
            counts[g.node as usize] += 1;
        }
        counts.into_iter().max().unwrap_or(0).max(1)
    };
    let by_node = occ.nodes.len() <= 64;
    // (columns, cell pitch, gap between cells, room for node names), in pixels.
    let (cols, cell, gap, label_w) = if by_node { (per_node, 44, 4, 110) } else { (100, 8, 1, 0) };
    let rows = if by_node { occ.nodes.len() } else { occ.gpus.len().div_ceil(cols) };
    let (w, top) = (label_w + cols * cell + 20, 34);
    let h = top + rows.max(1) * cell + 10;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (w as u32, h as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        root.draw(&Text::new(title.to_owned(), (10, 8), ("sans-serif", 16))).map_err(draw_err)?;
        if by_node {
            for (i, name) in occ.nodes.iter().enumerate() {
                let y = (top + i * cell + cell / 2 - 6) as i32;
                root.draw(&Text::new(name.clone(), (6, y), ("sans-serif", 12))).map_err(draw_err)?;
            }
        }
        if !by_node {
            // Runs of one shade along a row are drawn as one rectangle: the same picture, and a
            // file several times smaller for clusters of thousands of GPUs.
            for (row, chunk) in occ.gpus.chunks(cols).enumerate() {
                let y0 = (top + row * cell) as i32;
                let mut col = 0;
                while col < chunk.len() {
                    let shade = share_colour(chunk[col].used_milli);
                    let mut end = col + 1;
                    while end < chunk.len() && share_colour(chunk[end].used_milli) == shade {
                        end += 1;
                    }
                    let (x0, x1) = ((10 + col * cell) as i32, (10 + end * cell) as i32 - 1);
                    root.draw(&Rectangle::new([(x0, y0), (x1, y0 + (cell - gap) as i32)], shade.filled()))
                        .map_err(draw_err)?;
                    col = end;
                }
            }
        }
        let mut slot_in_node = vec![0usize; occ.nodes.len()];
        for g in occ.gpus.iter().filter(|_| by_node) {
            let col = slot_in_node[g.node as usize];
            slot_in_node[g.node as usize] += 1;
            let x0 = (label_w + 10 + col * cell) as i32;
            let y0 = (top + g.node as usize * cell) as i32;
            let (x1, y1) = (x0 + (cell - gap) as i32, y0 + (cell - gap) as i32);
            match &g.mig {
                Some(m) => {
                    root.draw(&Rectangle::new([(x0, y0), (x1, y1)], RGBColor(232, 232, 232).filled()))
                        .map_err(draw_err)?;
                    let slice_w = f64::from((cell - gap) as u32) / f64::from(m.memory_slices.max(1));
                    for &(start, size, busy) in &m.instances {
                        let a = x0 + (f64::from(start) * slice_w).round() as i32;
                        // One pixel apart, so that adjacent instances stay distinguishable.
                        let b = x0 + (f64::from(start + size) * slice_w).round() as i32 - 1;
                        let fill = if busy { RGBColor(8, 48, 107) } else { RGBColor(198, 219, 239) };
                        root.draw(&Rectangle::new([(a, y0 + 2), (b.max(a), y1 - 2)], fill.filled()))
                            .map_err(draw_err)?;
                    }
                }
                None => {
                    root.draw(&Rectangle::new([(x0, y0), (x1, y1)], share_colour(g.used_milli).filled()))
                        .map_err(draw_err)?;
                }
            }
        }
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

/// `(x, mean, min, max)` over runs' curves, for the x values every run has.
pub fn mean_band(curves: &[&[(u32, f64)]]) -> Vec<(f64, f64, f64, f64)> {
    let mut by_x: std::collections::BTreeMap<u32, Vec<f64>> = std::collections::BTreeMap::new();
    for c in curves {
        for &(x, y) in *c {
            by_x.entry(x).or_default().push(y);
        }
    }
    by_x.into_iter()
        .filter(|(_, v)| v.len() == curves.len())
        .map(|(x, v)| {
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            (f64::from(x), mean, lo, hi)
        })
        .collect()
}

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

#[cfg(test)]
pub mod check {
    //! A light well-formedness check for the generated HTML: every element opened is closed in
    //! order (HTML void elements excepted), and nothing is fetched from elsewhere.

    pub fn balanced(html: &str) -> Result<(), String> {
        const VOID: [&str; 4] = ["meta", "br", "hr", "img"];
        let mut stack: Vec<String> = Vec::new();
        let mut rest = html;
        while let Some(i) = rest.find('<') {
            rest = &rest[i + 1..];
            let end = rest.find('>').ok_or("unterminated tag")?;
            let tag = &rest[..end];
            rest = &rest[end + 1..];
            if tag.starts_with('!') || tag.starts_with('?') {
                continue;
            }
            if tag.contains('<') {
                return Err(format!("'<' inside tag {tag:?}"));
            }
            let name: String = tag.trim_start_matches('/').chars().take_while(|c| c.is_ascii_alphanumeric()).collect();
            if name.is_empty() {
                return Err(format!("bad tag {tag:?}"));
            }
            if tag.starts_with('/') {
                match stack.pop() {
                    Some(open) if open == name => {}
                    other => return Err(format!("</{name}> closes {other:?}")),
                }
            } else if !tag.ends_with('/') && !VOID.contains(&name.as_str()) {
                stack.push(name);
            }
        }
        if stack.is_empty() { Ok(()) } else { Err(format!("unclosed {stack:?}")) }
    }

    /// `http://` or `https://` anywhere but the SVG namespace.
    pub fn external_refs(html: &str) -> Vec<String> {
        let cleaned = html.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
        ["http://", "https://"]
            .iter()
            .flat_map(|p| cleaned.match_indices(p).map(|(i, _)| cleaned[i..(i + 60).min(cleaned.len())].to_owned()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::PodRow;
    use tessera_core::cluster::{Gpu, GpuMode, Node};

    fn small_openb() -> Vec<crate::openb::PolicyReport> {
        let nodes: Vec<Node> = (0..4)
            .map(|i| {
                let gpus = (0..2).map(|g| Gpu::new(g, "V100M16", 16384, GpuMode::Shared)).collect();
                Node::new(&format!("n{i}"), 64_000, 262_144, gpus)
            })
            .collect();
        let pods: Vec<PodRow> = (0..12)
            .map(|i| PodRow {
                name: format!("p{i:02}"),
                cpu_milli: 4000,
                memory_mib: 8192,
                num_gpu: 1,
                gpu_milli: [300, 500, 1000][i % 3],
                gpu_spec: String::new(),
            })
            .collect();
        ["tessera", "fgd", "bestfit"]
            .iter()
            .map(|name| {
                let policy = tessera_core::policy::by_name(name).unwrap_or_else(|| panic!("{name}"));
                let runs: Vec<_> = [1, 2]
                    .iter()
                    .map(|&s| {
                        crate::openb::replay(&nodes, &pods, policy.as_ref(), 1.3, s, &|_, _| {})
                            .unwrap_or_else(|e| panic!("{e:#}"))
                    })
                    .collect();
                let mean = runs.iter().map(|r| r.allocation_ratio).sum::<f64>() / runs.len() as f64;
                crate::openb::PolicyReport {
                    policy: (*name).to_owned(),
                    trace: "tiny<&>".into(),
                    tune: 1.3,
                    runs,
                    mean_allocation_ratio: mean,
                    elapsed_seconds: 0.0,
                    upper_bound: Some(
                        crate::bound::for_seeds(&nodes, &pods, 1.3, &[1, 2]).unwrap_or_else(|e| panic!("{e:#}")),
                    ),
                }
            })
            .collect()
    }

    #[test]
    fn openb_report_is_self_contained_and_well_formed() {
        let reports = small_openb();
        assert!(reports.iter().all(|r| r.runs[0].occupancy.gpus.len() == 8));
        let html = openb_html(&reports, "tessera-sim openb --pods 'a b<c>.csv'").unwrap_or_else(|e| panic!("{e:#}"));
        // Curves (full and zoomed), fragmentation bars and one slice map per policy.
        assert_eq!(html.matches("<svg").count(), 3 + reports.len(), "{html}");
        for name in ["tessera", "fgd", "bestfit"] {
            assert!(html.contains(&format!("<td>{name}</td>")), "table row for {name}");
            // plotters writes text on its own line inside <text>: the curve's legend entry.
            assert!(html.contains(&format!("\n{name}\n</text>")), "legend for {name}");
        }
        // Text is escaped, the command line is shown.
        assert!(html.contains("tiny&lt;&amp;&gt;"));
        assert!(html.contains("<td>upper bound (LP, certified)</td>"), "the bound beside the policies");
        assert!(!html.contains("tiny<&>"));
        assert!(html.contains("--pods &#39;a b&lt;c&gt;.csv&#39;"));
        assert_eq!(check::external_refs(&html), Vec::<String>::new());
        assert!(!html.contains("<script"));
        check::balanced(&html).unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn the_checker_catches_what_it_should() {
        assert!(check::balanced("<html><body><p>x</p></body></html>").is_ok());
        assert!(check::balanced("<html><body><p>x</body></html>").is_err());
        assert!(check::balanced("<svg><rect/></svg><meta charset=\"x\">").is_ok());
        assert!(check::balanced("<svg><g></svg>").is_err());
        assert_eq!(check::external_refs("<svg xmlns=\"http://www.w3.org/2000/svg\"></svg>").len(), 0);
        assert_eq!(check::external_refs("<img src=\"https://x.example/a.png\">").len(), 1);
        assert_eq!(escape("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
    }

    #[test]
    fn mean_band_keeps_x_values_every_run_has() {
        let a = [(0, 1.0), (1, 3.0)];
        let b = [(0, 3.0)];
        assert_eq!(mean_band(&[&a, &b]), vec![(0.0, 2.0, 1.0, 3.0)]);
    }
}
