use std::path::Path;

use super::*;

const SMALL: &str = r#"
name: small
pools:
  - { name: h100, product: H100-80GB, nodes: 1 }
models:
  - { name: embed, replicas: 7, gpu_memory_mib: 4096 }
  - { name: llm13b, replicas: 2, gpu_memory_mib: 30000 }
  - { name: vlm34b, replicas: 2, gpu_memory_mib: 70000 }
gangs:
  - { name: tp, members: 1, gpus_per_member: 4 }
static_baseline: { layout: all-balanced, fraction: 0.5 }
"#;

#[test]
fn small_scenario_places_everything_with_tessera_and_not_with_static_layouts() {
    let sc: Scenario = serde_yaml::from_str(SMALL).unwrap_or_else(|e| panic!("{e}"));
    sc.check().unwrap_or_else(|e| panic!("{e:#}"));
    let t = run(&sc, "tessera", 1).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!((t.placed, t.rejected), (12, 0), "{t:?}");
    // 4 whole (gang) + 2 whole (VLM) + 2×3g + 7×1g = 6 GPUs + 13/7 compute → bound 8.
    assert_eq!(t.lower_bound.get("H100-80GB"), Some(&8), "{t:?}");
    assert!(t.gpus_used["H100-80GB"] <= 8, "{t:?}");
    assert!(t.mig_reconfigs > 0);
    let s = run(&sc, "static", 1).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(s.rejected > 0, "a half-partitioned node cannot hold the whole-GPU demands: {s:?}");
    assert_eq!(s.mig_reconfigs, 0);
}

#[test]
fn malformed_scenarios_are_refused_with_a_reason() {
    let bad = SMALL.replace("gpu_memory_mib: 4096", "gpu_memory_mib: 4096, gpus: 2");
    let sc: Scenario = serde_yaml::from_str(&bad).unwrap_or_else(|e| panic!("{e}"));
    let e = sc.check().expect_err("two kinds");
    assert!(e.to_string().contains("exactly one"), "{e}");
    let bad = SMALL.replace("nodes: 1", "nodes: 1, topology: ring");
    let sc: Scenario = serde_yaml::from_str(&bad).unwrap_or_else(|e| panic!("{e}"));
    assert!(sc.check().is_err());
    assert!(serde_yaml::from_str::<Scenario>("name: x\npools: []\nbogus: 1\n").is_err());
}

const ONE_GPU: &str = r#"
name: one-gpu
pools:
  - { name: h100, product: H100-80GB, nodes: 1, gpus_per_node: 1 }
models:
  - name: job
    gpus: 1
    arrival: { rate_per_hour: 6, mean_lifetime_minutes: 1, duration_hours: 20 }
"#;

#[test]
fn departures_free_capacity() {
    // One GPU, about 120 whole-GPU pods that stay a minute each: without departures only the
    // first could ever be placed.
    let sc: Scenario = serde_yaml::from_str(ONE_GPU).unwrap_or_else(|e| panic!("{e}"));
    sc.check().unwrap_or_else(|e| panic!("{e:#}"));
    let arrivals = sc.arrivals(7);
    assert!(arrivals.len() > 60, "{}", arrivals.len());
    let o = run(&sc, "tessera", 7).unwrap_or_else(|e| panic!("{e:#}"));
    let d = o.dynamics.clone().unwrap_or_else(|| panic!("no dynamics: {o:?}"));
    assert_eq!(d.arrivals as usize, arrivals.len());
    assert_eq!(o.placed + o.rejected, d.arrivals);
    assert!(o.placed as usize > arrivals.len() / 2, "{o:?}");
    assert!(d.departures + 1 >= o.placed, "every placed pod but the last leaves: {d:?}");
    assert_eq!(d.peak_gpus_used, 1);
    // Busy about a minute in ten: the time-weighted mean is far below the peak.
    assert!(d.mean_gpus_used > 0.0 && d.mean_gpus_used < 0.5, "{d:?}");
    assert_eq!(d.horizon_hours, 20.0);
}

#[test]
fn arrivals_are_seeded() {
    let sc: Scenario = serde_yaml::from_str(ONE_GPU).unwrap_or_else(|e| panic!("{e}"));
    let times = |seed| sc.arrivals(seed).iter().map(|a| (a.at_ms, a.lifetime_ms)).collect::<Vec<_>>();
    assert_eq!(times(3), times(3));
    assert_ne!(times(3), times(4));
    let a = run(&sc, "tessera", 3).unwrap_or_else(|e| panic!("{e:#}"));
    let b = run(&sc, "tessera", 3).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(serde_json::to_string(&a).ok(), serde_json::to_string(&b).ok());
    assert_eq!(a.occupancy, b.occupancy);
    // Another model, listed first, leaves this one's arrivals as they were.
    let more = ONE_GPU.replace(
        "models:\n",
        "models:\n  - { name: ocr, gpu_memory_mib: 6000, arrival: { rate_per_hour: 3, mean_lifetime_minutes: 5, duration_hours: 2 } }\n",
    );
    let more: Scenario = serde_yaml::from_str(&more).unwrap_or_else(|e| panic!("{e}"));
    let jobs = |a: Vec<Arrived>| {
        a.into_iter().filter(|x| x.demand.pod.0.contains("/job-")).map(|x| (x.at_ms, x.lifetime_ms)).collect::<Vec<_>>()
    };
    assert!(more.arrivals(3).len() > times(3).len());
    assert_eq!(jobs(more.arrivals(3)), times(3));
    // Arrivals are within the window and ordered.
    let all = sc.arrivals(3);
    assert!(all.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
    assert!(all.iter().all(|x| x.at_ms < 20 * 3_600_000 && x.lifetime_ms > 0));
}

#[test]
fn a_model_needs_exactly_one_of_replicas_and_arrival() {
    let both = ONE_GPU.replace("gpus: 1\n", "gpus: 1\n    replicas: 2\n");
    let sc: Scenario = serde_yaml::from_str(&both).unwrap_or_else(|e| panic!("{e}"));
    let e = sc.check().expect_err("both accepted");
    assert!(e.to_string().contains("exactly one of replicas, arrival (both"), "{e}");
    let neither = SMALL.replace("replicas: 7, ", "");
    let sc: Scenario = serde_yaml::from_str(&neither).unwrap_or_else(|e| panic!("{e}"));
    let e = sc.check().expect_err("neither accepted");
    assert!(e.to_string().contains("model embed: set exactly one of replicas, arrival (neither"), "{e}");
    let bad = ONE_GPU.replace("rate_per_hour: 6", "rate_per_hour: 0");
    let sc: Scenario = serde_yaml::from_str(&bad).unwrap_or_else(|e| panic!("{e}"));
    let e = sc.check().expect_err("zero rate accepted");
    assert!(format!("{e:#}").contains("model job: arrival: rate_per_hour"), "{e:#}");
    let twice = SMALL.replace("name: llm13b", "name: embed");
    let sc: Scenario = serde_yaml::from_str(&twice).unwrap_or_else(|e| panic!("{e}"));
    assert!(sc.check().expect_err("duplicate name").to_string().contains("embed: the name is used twice"));
    let typo = ONE_GPU.replace("duration_hours", "duration_hour");
    assert!(serde_yaml::from_str::<Scenario>(&typo).is_err());
}

#[test]
fn scenario_report_has_charts_for_every_policy() {
    let text = SMALL.replace(
        "gangs:",
        "  - { name: ocr, gpu_memory_mib: 9000, arrival: { rate_per_hour: 20, mean_lifetime_minutes: 30, duration_hours: 4 } }\ngangs:",
    );
    let sc: Scenario = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    sc.check().unwrap_or_else(|e| panic!("{e:#}"));
    let outcomes: Vec<Outcome> =
        ["tessera", "first-fit", "static"].iter().map(|p| run(&sc, p, 1).unwrap_or_else(|e| panic!("{e:#}"))).collect();
    assert!(outcomes.iter().all(|o| o.dynamics.as_ref().is_some_and(|d| d.arrivals > 20)));
    let html = crate::report::scenario_html(&sc, &outcomes, "tessera-sim scenario x.yaml --html r.html")
        .unwrap_or_else(|e| panic!("{e:#}"));
    // Used vs bound, reconfigurations, over time, and one slice map per policy.
    assert_eq!(html.matches("<svg").count(), 3 + outcomes.len());
    for name in ["tessera", "first-fit", "static"] {
        assert!(html.contains(&format!("<td>{name}</td>")), "{name}");
    }
    assert!(html.contains("lower bound (tessera)"));
    assert_eq!(crate::report::check::external_refs(&html), Vec::<String>::new());
    crate::report::check::balanced(&html).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn churn_scenarios_have_large_arrivals_and_tessera_keeps_room_for_them() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    for name in ["churn-mixed-fleet", "churn-vlm-day", "churn-tp4-night"] {
        let sc = Scenario::load(&dir.join(format!("{name}.yaml"))).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let products: Vec<MigProduct> = sc.pools.iter().filter_map(|p| MigProduct::from_name(&p.product)).collect();
        let arrivals = sc.arrivals(1);
        let large = arrivals.iter().filter(|a| needs_whole_gpus(&a.demand.gpu, &products)).count();
        assert!(large >= 10 && large * 5 < arrivals.len(), "{name}: {large} of {}", arrivals.len());
        assert!(sc.pools.iter().any(|p| p.product == "A100-40GB") && sc.pools.iter().any(|p| p.product == "H100-80GB"));
    }
    // The scenario tuned on, one seed: fewer large-model rejections than fgd, no more small.
    let sc = Scenario::load(&dir.join("churn-mixed-fleet.yaml")).unwrap_or_else(|e| panic!("{e:#}"));
    let t = run(&sc, "tessera", 1).unwrap_or_else(|e| panic!("{e:#}"));
    let f = run(&sc, "fgd", 1).unwrap_or_else(|e| panic!("{e:#}"));
    for o in [&t, &f] {
        assert_eq!(o.rejected_large + o.rejected_small, o.rejected, "{o:?}");
    }
    assert!(t.rejected_large < f.rejected_large, "tessera {} vs fgd {}", t.rejected_large, f.rejected_large);
    assert!(t.rejected_small <= f.rejected_small, "tessera {} vs fgd {}", t.rejected_small, f.rejected_small);
}

/// Scenarios never tuned on (`churn-a100-heavy`, `churn-h100-burst`): they load, have large
/// arrivals, and on one seed tessera rejects no more large or small models than fgd.
#[test]
fn held_out_churn_scenarios_have_large_arrivals_and_tessera_is_no_worse_than_fgd() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    for name in ["churn-a100-heavy", "churn-h100-burst"] {
        let sc = Scenario::load(&dir.join(format!("{name}.yaml"))).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let products: Vec<MigProduct> = sc.pools.iter().filter_map(|p| MigProduct::from_name(&p.product)).collect();
        let arrivals = sc.arrivals(2);
        let large = arrivals.iter().filter(|a| needs_whole_gpus(&a.demand.gpu, &products)).count();
        assert!(large >= 10 && large * 5 < arrivals.len(), "{name}: {large} of {}", arrivals.len());
        let t = run(&sc, "tessera", 2).unwrap_or_else(|e| panic!("{e:#}"));
        let f = run(&sc, "fgd", 2).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(
            t.rejected_large <= f.rejected_large,
            "{name}: tessera {} vs fgd {}",
            t.rejected_large,
            f.rejected_large
        );
        assert!(
            t.rejected_small <= f.rejected_small,
            "{name}: tessera {} vs fgd {}",
            t.rejected_small,
            f.rejected_small
        );
    }
}

#[test]
fn large_means_whole_gpus_on_every_product() {
    let h100 = [MigProduct::H100_80GB];
    let both = [MigProduct::H100_80GB, MigProduct::A100_40GB];
    let model = |m| GpuDemand::Model { memory_mib: m, compute_slices: None };
    assert!(needs_whole_gpus(&GpuDemand::Whole { count: 4 }, &both));
    assert!(needs_whole_gpus(&model(76_000), &both));
    // 30 GB fits a 3g.40gb slice of an H100, not any slice of an A100-40GB.
    assert!(!needs_whole_gpus(&model(30_000), &both));
    assert!(needs_whole_gpus(&model(30_000), &[MigProduct::A100_40GB]));
    assert!(!needs_whole_gpus(&model(3_000), &h100));
    assert!(!needs_whole_gpus(&GpuDemand::Mig { profile: "1g.10gb".into() }, &h100));
}

#[test]
fn bundled_scenarios_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{e}")) {
        let p = e.unwrap_or_else(|e| panic!("{e}")).path();
        if p.extension().is_some_and(|x| x == "yaml") {
            Scenario::load(&p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
            n += 1;
        }
    }
    assert!(n >= 1);
}
