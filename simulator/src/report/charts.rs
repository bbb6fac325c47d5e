//! The charts, as inline SVG drawn with plotters: lines with bands, bars, and the slice map of a
//! cluster's GPUs.

use anyhow::Result;
use plotters::prelude::*;

use super::colour;
use crate::occupancy::Occupancy;

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
