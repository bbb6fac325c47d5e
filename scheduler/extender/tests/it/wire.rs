//! Golden round trips of every extender fixture: decode into our wire types, encode again,
//! and compare with the file (key order aside); keys must be the exact Go names.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tessera_scheduler::wire::{
    ExtenderArgs, ExtenderBindingArgs, ExtenderBindingResult, ExtenderFilterResult, ExtenderPreemptionArgs,
    ExtenderPreemptionResult, HostPriorityList,
};

use crate::fixtures::{fixture, fixture_json};

fn round_trip<T: Serialize + DeserializeOwned>(name: &str) -> T {
    let text = fixture(name);
    let typed: T = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
    let again = serde_json::to_value(&typed).unwrap();
    let want = fixture_json(name);
    assert_eq!(again, want, "{name} does not round-trip");
    typed
}

fn top_keys(v: &serde_json::Value) -> Vec<String> {
    v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default()
}

#[test]
fn every_fixture_file_is_covered() {
    let mut files: Vec<String> = std::fs::read_dir(crate::fixtures::fixture_path(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "bind-args.json",
            "bind-result.json",
            "filter-args.json",
            "filter-result.json",
            "preempt-args.json",
            "preempt-result.json",
            "prioritize-result.json"
        ]
    );
}

#[test]
fn filter_args_round_trip_with_the_pod_intact() {
    let a: ExtenderArgs = round_trip("filter-args.json");
    assert_eq!(a.node_names.as_ref().map(Vec::len), Some(3));
    assert!(a.nodes.is_none());
    let pod = a.pod.unwrap();
    assert_eq!(pod.metadata.name.as_deref(), Some("train-worker-0"));
    let encoded = serde_json::to_value(ExtenderArgs::default()).unwrap();
    assert_eq!(top_keys(&encoded), ["NodeNames", "Nodes", "Pod"]);
}

#[test]
fn filter_result_round_trips() {
    let r: ExtenderFilterResult = round_trip("filter-result.json");
    assert_eq!(r.error, "");
    assert!(r.failed_and_unresolvable_nodes.unwrap().contains_key("gpu-node-c"));
    let v = serde_json::to_value(ExtenderFilterResult::default()).unwrap();
    assert_eq!(
        serde_json::to_string(&v).unwrap(),
        r#"{"Error":"","FailedAndUnresolvableNodes":null,"FailedNodes":null,"NodeNames":null,"Nodes":null}"#
    );
}

#[test]
fn prioritize_result_round_trips() {
    let r: HostPriorityList = round_trip("prioritize-result.json");
    assert_eq!(r.iter().map(|h| h.score).collect::<Vec<_>>(), [4, 10]);
}

#[test]
fn bind_args_and_result_round_trip() {
    let a: ExtenderBindingArgs = round_trip("bind-args.json");
    assert_eq!(a.pod_uid, "6f1c2b7e-3a4d-4c1e-9b8a-2f0d5e7c9a11");
    let r: ExtenderBindingResult = round_trip("bind-result.json");
    assert_eq!(r.error, "");
}

#[test]
fn preempt_args_and_result_round_trip() {
    let a: ExtenderPreemptionArgs = round_trip("preempt-args.json");
    assert!(a.node_name_to_victims.is_none());
    let meta = a.node_name_to_meta_victims.unwrap();
    assert_eq!(meta["gpu-node-b"].num_pdb_violations, 1);
    let r: ExtenderPreemptionResult = round_trip("preempt-result.json");
    let v = serde_json::to_value(&r).unwrap();
    assert_eq!(top_keys(&v["NodeNameToMetaVictims"]["gpu-node-a"]), ["NumPDBViolations", "Pods"]);
    assert_eq!(top_keys(&v["NodeNameToMetaVictims"]["gpu-node-a"]["Pods"][0]), ["UID"]);
}
