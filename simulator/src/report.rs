//! The `--html` report: one self-contained file (inline CSS and SVG, no scripts, fonts or
//! links) with plotters charts, the numbers as tables and the command line that produced it.

use std::fmt::Write as _;

use plotters::prelude::*;

mod charts;
mod pages;

pub use charts::{Axes, Series, bar_chart, line_chart, mean_band, occupancy_map};
pub use pages::{openb_html, scenario_html};

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
