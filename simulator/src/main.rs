//! `tessera-sim`: replays GPU traces and scenarios through tessera's placement core.

use tessera_sim::{capture, compare, family, openb, report, scenario, seeds, trace, whatif};

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "tessera-sim", version, about = "What-if GPU packing with tessera's placement core")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Replay an Alibaba openb trace like the FGD paper (one pod at a time, never deleted).
    Openb(OpenbArgs),
    /// Place a MIG inference-fleet scenario (YAML) under every policy and a static baseline.
    Scenario(ScenarioArgs),
    /// Can these pods / this gang fit on a captured live cluster, where, and how many nodes of a
    /// type must be added. Exit status 0: everything fits; 3: something does not; 1: bad input.
    Whatif(WhatifArgs),
    /// Generate a member of an openb workload family (cpuXXX, gpushareXX, multigpuXX, gpuspecXX)
    /// from the default pod list with a seed, as the FGD artifact's variants are made.
    GenTrace(GenTraceArgs),
}

#[derive(clap::Args, Debug)]
struct GenTraceArgs {
    /// The default pod list (`openb_pod_list_default.csv`).
    #[arg(long)]
    pods: PathBuf,
    /// `cpu` (level: CPU-only pods per mille of pods), `gpushare`, `multigpu` or `gpuspec`
    /// (level: % of the GPU request from shares, multi-GPU pods, constrained pods).
    #[arg(long)]
    family: String,
    #[arg(long)]
    level: u32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// gpuspec only: a pod list with the default's rows and real GPU-model constraints
    /// (`openb_pod_list_gpuspec20.csv`).
    #[arg(long)]
    spec_source: Option<PathBuf>,
    /// Where to write the pod list (CSV, the loader's 6-column form).
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args, Debug)]
struct WhatifArgs {
    /// Cluster capture: `kubectl tessera capture` output, `kubectl get nodes,pods,gpunodes,podgroups
    /// -A -o json` (or yaml), or the scheduler's `/api/v1/cluster` dump. Repeat to merge files.
    #[arg(long, required = true)]
    capture: Vec<PathBuf>,
    /// Pods to place (multi-document YAML, a List, or JSON), with their PodGroups. Repeatable.
    #[arg(long)]
    pods: Vec<PathBuf>,
    /// Also place the capture's pending pods that ask for GPUs (before the --pods ones).
    #[arg(long)]
    pending: bool,
    /// Place every pod that is not a gang member this many times (NAME-1 … NAME-N).
    #[arg(long, default_value_t = 1)]
    replicas: u32,
    /// Placement policy (as the scheduler's --policy).
    #[arg(long, default_value = "tessera")]
    policy: String,
    /// Seed for tie-breaks (as the scheduler's --seed).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Find the fewest added copies of this node (same GPUs, interconnect, cpu, memory, labels;
    /// idle) with which everything fits.
    #[arg(long, value_name = "NODE", conflicts_with = "add_node_type")]
    add_nodes_like: Option<String>,
    /// Like --add-nodes-like, for a node type: PRODUCT[:GPUS] (e.g. H100-80GB:8; NVSwitch, 192
    /// cores, 2 TiB) or a YAML file with a scenario pool's keys (product, gpus_per_node,
    /// cpu_milli, memory_mib, topology) plus optional name, labels and gpu_memory_mib.
    #[arg(long, value_name = "TYPE")]
    add_node_type: Option<String>,
    /// Most nodes to add in the search.
    #[arg(long, default_value_t = 16, value_name = "N")]
    max_add: u32,
    /// Write the answer as JSON here (`-` for stdout instead of the table).
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct ScenarioArgs {
    /// Scenario file (see `simulator/scenarios/`).
    file: PathBuf,
    /// Policy name, `static`, a comma-separated list, or `all` (every policy plus the static
    /// baseline).
    #[arg(long, default_value = "all")]
    policy: String,
    /// Seed for the arrival order.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write the outcomes as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write a self-contained HTML report (charts, tables, slice maps) here.
    #[arg(long)]
    html: Option<PathBuf>,
    /// The expected workload decisions see: `recent` (a decaying window of arrivals, as the
    /// extender learns it) or `day` (every pod of the scenario, known in advance; the default,
    /// what docs/benchmarks.md's churn table is measured with).
    #[arg(long, default_value = "day")]
    workload: scenario::WorkloadSource,
}

#[derive(clap::Args, Debug)]
struct OpenbArgs {
    /// Node list CSV (`openb_node_list_gpu_node.csv`).
    #[arg(long)]
    nodes: PathBuf,
    /// Pod list CSV (`openb_pod_list_*.csv`).
    #[arg(long)]
    pods: PathBuf,
    /// Policy name, a comma-separated list, or `all` for every policy side by side.
    #[arg(long, default_value = "tessera")]
    policy: String,
    /// Seeds: `42`, `42-51` or `1,5,9`.
    #[arg(long, default_value = "42-51")]
    seeds: String,
    /// Total GPU request as a multiple of cluster capacity.
    #[arg(long, default_value_t = 1.3)]
    tune: f64,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The FGD authors' `analysis_allo_discrete.csv`, to print their numbers beside ours.
    #[arg(long)]
    compare: Option<PathBuf>,
    /// Write a self-contained HTML report (curves, fragmentation, slice maps) here.
    #[arg(long)]
    html: Option<PathBuf>,
    /// Skip the certified upper bound (an LP per seed).
    #[arg(long)]
    no_bound: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Openb(args) => run_openb(args),
        Command::Scenario(args) => run_scenario(args),
        Command::GenTrace(args) => run_gen(args),
        Command::Whatif(args) => {
            if !run_whatif(args)? {
                std::process::exit(3);
            }
            Ok(())
        }
    }
}

fn run_gen(args: GenTraceArgs) -> Result<()> {
    let family = family::Family::parse(&args.family)?;
    let default = trace::load_pods(&args.pods)?;
    let source = match &args.spec_source {
        Some(p) => Some(trace::load_pods(p)?),
        None => None,
    };
    let pods = family::generate(&default, family, args.level, args.seed, source.as_deref())?;
    family::write_csv(&args.out, &pods)?;
    let m = family::mix(&pods);
    println!(
        "{} seed {}: {} pods; cpu-only {:.1}% of pods; GPU request {:.1}% shares, {:.1}% multi-GPU, {:.1}% constrained; wrote {}",
        family.label(args.level),
        args.seed,
        m.pods,
        100.0 * m.cpu_pods,
        100.0 * m.share_request,
        100.0 * m.multi_request,
        100.0 * m.spec_request,
        args.out.display()
    );
    Ok(())
}

/// Returns whether everything fits.
fn run_whatif(args: WhatifArgs) -> Result<bool> {
    let policy = tessera_core::policy::by_name(&args.policy).with_context(|| {
        format!("unknown policy {:?}; known: {}", args.policy, tessera_core::policy::NAMES.join(", "))
    })?;
    if args.pods.is_empty() && !args.pending {
        bail!("nothing to place: give --pods FILE and/or --pending");
    }
    let template = match (&args.add_nodes_like, &args.add_node_type) {
        (Some(n), _) => Some(whatif::Template::Like(n.clone())),
        (None, Some(t)) => Some(whatif::Template::Type(whatif::NodeType::parse(t)?)),
        (None, None) => None,
    };
    let cluster = capture::load(&args.capture)?;
    let units = whatif::load_pods(&args.pods, &cluster, args.replicas, args.pending)?;
    let report =
        whatif::run(&cluster, &units, policy.as_ref(), args.seed, template.as_ref().map(|t| (t, args.max_add)))?;
    for w in &report.capture.warnings {
        eprintln!("warning: {w}");
    }
    let json = serde_json::to_string_pretty(&report)? + "\n";
    match args.json.as_deref() {
        Some(p) if p.as_os_str() == "-" => print!("{json}"),
        Some(p) => {
            print!("{}", whatif::render(&report));
            std::fs::write(p, json).with_context(|| format!("writing {}", p.display()))?;
            println!("wrote {}", p.display());
        }
        None => print!("{}", whatif::render(&report)),
    }
    Ok(report.fits)
}

fn run_scenario(args: ScenarioArgs) -> Result<()> {
    let sc = scenario::Scenario::load(&args.file)?;
    let policies = policy_list(&args.policy, &["static"])?;
    println!("scenario {}: {}", sc.name, sc.description.trim());
    let mut outcomes = Vec::new();
    for p in &policies {
        outcomes.push(scenario::run_with(&sc, p, args.seed, args.workload)?);
    }
    print!("{}", scenario::render(&outcomes));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&outcomes)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &args.html {
        std::fs::write(path, report::scenario_html(&sc, &outcomes, &report::command_line())?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// `all`, one name, or a comma-separated list; `extra` are names this subcommand accepts
/// besides the policies (and adds to `all`).
fn policy_list(arg: &str, extra: &[&str]) -> Result<Vec<String>> {
    let known = || tessera_core::policy::NAMES.iter().chain(extra).copied();
    if arg == "all" {
        return Ok(known().map(str::to_owned).collect());
    }
    let mut out: Vec<String> = Vec::new();
    for name in arg.split(',').map(str::trim) {
        if !known().any(|k| k == name) {
            bail!("unknown policy {name:?}; known: {}, or all", known().collect::<Vec<_>>().join(", "));
        }
        if !out.iter().any(|o| o == name) {
            out.push(name.to_owned());
        }
    }
    Ok(out)
}

fn run_openb(args: OpenbArgs) -> Result<()> {
    let seeds = seeds::parse(&args.seeds)?;
    let policies = policy_list(&args.policy, &[])?;
    if !(args.tune > 0.0 && args.tune <= 10.0) {
        bail!("--tune {} is outside (0, 10]", args.tune);
    }
    let nodes = trace::load_nodes(&args.nodes)?;
    let pods = trace::load_pods(&args.pods)?;
    let trace_name = args.pods.file_stem().and_then(|s| s.to_str()).unwrap_or("trace").to_owned();
    let gpus: usize = nodes.iter().map(|n| n.gpus.len()).sum();
    println!(
        "trace {trace_name}: {} nodes, {gpus} GPUs, {} pods; tune {}; seeds {}",
        nodes.len(),
        pods.len(),
        args.tune,
        args.seeds
    );
    let tty = std::io::stderr().is_terminal();
    let bound =
        if args.no_bound { None } else { Some(tessera_sim::bound::for_seeds(&nodes, &pods, args.tune, &seeds)?) };
    let mut reports = Vec::new();
    for name in &policies {
        // One progress bar per seed, while it runs.
        let bars = indicatif::MultiProgress::new();
        if !tty {
            bars.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let bar = |policy: &str, seed: u64| {
            let bar = bars.add(indicatif::ProgressBar::new(1));
            bar.set_style(
                indicatif::ProgressStyle::with_template("{prefix:>22} {bar:40} {pos}/{len} pods {elapsed}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_prefix(format!("{policy} seed {seed}"));
            SeedBar(bar)
        };
        reports.push(openb::run_policy(&nodes, &pods, &trace_name, name, args.tune, &seeds, bound.as_ref(), &bar)?);
    }
    let expected = match &args.compare {
        Some(p) => Some(compare::load_expected(p)?),
        None => None,
    };
    print!("{}", openb::render(&reports, expected.as_ref()));
    if let Some(b) = &bound {
        let best = reports.iter().map(|r| r.mean_allocation_ratio).fold(0.0, f64::max);
        println!(
            "{:<16} {:>10.2}   certified LP bound over the same arrivals (best policy {:.2}, gap {:.2} points)",
            "upper bound",
            100.0 * b.mean_allocation_ratio,
            100.0 * best,
            100.0 * (b.mean_allocation_ratio - best)
        );
    }
    if let Some(path) = &args.json {
        let body = if reports.len() == 1 {
            serde_json::to_string_pretty(&reports[0])?
        } else {
            serde_json::to_string_pretty(&reports)?
        };
        std::fs::write(path, body).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &args.html {
        std::fs::write(path, report::openb_html(&reports, &report::command_line())?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// An indicatif bar, cleared when its replay ends.
struct SeedBar(indicatif::ProgressBar);

impl openb::Bar for SeedBar {
    fn set(&self, done: u64, total: u64) {
        self.0.set_length(total);
        self.0.set_position(done);
    }
}

impl Drop for SeedBar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_as_all_one_or_a_list() {
        assert_eq!(policy_list("all", &[]).ok().map(|v| v.len()), Some(tessera_core::policy::NAMES.len()));
        assert_eq!(policy_list("all", &["static"]).ok().and_then(|v| v.last().cloned()), Some("static".to_owned()));
        assert_eq!(policy_list("fgd", &[]).ok(), Some(vec!["fgd".to_owned()]));
        assert_eq!(policy_list("tessera, fgd,tessera", &[]).ok(), Some(vec!["tessera".to_owned(), "fgd".to_owned()]));
        let e = policy_list("tessera,fgdd", &[]).expect_err("typo").to_string();
        assert!(e.contains("unknown policy \"fgdd\"") && e.contains("first-fit"), "{e}");
        assert!(policy_list("static", &[]).is_err());
        assert!(policy_list("", &[]).is_err());
    }
}
