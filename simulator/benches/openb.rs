//! Time of one openb replay (default trace, one seed) for `tessera`, `fgd` and `bestfit`.
//!
//! The trace is not part of the repository: set `TESSERA_TRACE_DIR` to the folder holding
//! `openb_node_list_gpu_node.csv` and `openb_pod_list_default.csv`. Without it the bench says
//! so and does nothing, so that building every target needs no data.

use std::path::PathBuf;

use criterion::Criterion;
use tessera_sim::{openb, trace};

fn main() {
    let Some(dir) = std::env::var_os("TESSERA_TRACE_DIR").map(PathBuf::from) else {
        println!("openb bench skipped: TESSERA_TRACE_DIR is not set");
        return;
    };
    let (nodes, pods) = (dir.join("openb_node_list_gpu_node.csv"), dir.join("openb_pod_list_default.csv"));
    if !nodes.is_file() || !pods.is_file() {
        println!("openb bench skipped: {} lacks the openb node or default pod list", dir.display());
        return;
    }
    let (nodes, pods) = match (trace::load_nodes(&nodes), trace::load_pods(&pods)) {
        (Ok(n), Ok(p)) => (n, p),
        (Err(e), _) | (_, Err(e)) => panic!("loading the trace: {e:#}"),
    };
    // A replay takes seconds; ten samples are enough to see a change of a few percent.
    let mut c = Criterion::default().sample_size(10).configure_from_args();
    let mut group = c.benchmark_group("openb-default-seed42");
    for name in ["tessera", "fgd", "bestfit"] {
        let policy = tessera_core::policy::by_name(name).unwrap_or_else(|| panic!("policy {name}"));
        group.bench_function(name, |b| {
            b.iter(|| {
                openb::replay(&nodes, &pods, policy.as_ref(), 1.3, 42, &|_, _| {})
                    .unwrap_or_else(|e| panic!("replay: {e:#}"))
            })
        });
    }
    group.finish();
    c.final_summary();
}
