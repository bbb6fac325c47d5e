use serde_json::json;

use super::*;

fn pod(limits: serde_json::Value, annotations: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": "p", "namespace": "ml", "annotations": annotations},
        "spec": {"containers": [{"name": "c", "resources": {"limits": limits}}]}
    }))
    .unwrap()
}

fn gpu_of(limits: serde_json::Value, annotations: serde_json::Value) -> Result<GpuDemand, PodError> {
    demand(&pod(limits, annotations), None).map(|d| d.gpu)
}

#[test]
fn nvidia_gpu_count_is_whole_gpus() {
    assert_eq!(gpu_of(json!({"nvidia.com/gpu": "4"}), json!({})), Ok(GpuDemand::Whole { count: 4 }));
}

#[test]
fn nvidia_mig_resource_is_that_profile() {
    assert_eq!(
        gpu_of(json!({"nvidia.com/mig-3g.40gb": "1"}), json!({})),
        Ok(GpuDemand::Mig { profile: "3g.40gb".into() })
    );
}

#[test]
fn tessera_gpu_with_memory_is_model_sized() {
    let d = gpu_of(
        json!({"tessera.dev/gpu": "1"}),
        json!({"tessera.dev/gpu-memory": "18Gi", "tessera.dev/gpu-compute": "2"}),
    );
    assert_eq!(d, Ok(GpuDemand::Model { memory_mib: 18 * 1024, compute_slices: Some(2) }));
}

#[test]
fn tessera_gpu_without_annotations_is_one_whole_gpu() {
    assert_eq!(gpu_of(json!({"tessera.dev/gpu": "1"}), json!({})), Ok(GpuDemand::Whole { count: 1 }));
}

#[test]
fn tessera_gpus_and_share_annotations() {
    assert_eq!(
        gpu_of(json!({"tessera.dev/gpu": "1"}), json!({"tessera.dev/gpus": "4"})),
        Ok(GpuDemand::Whole { count: 4 })
    );
    assert_eq!(
        gpu_of(json!({"tessera.dev/gpu": "1"}), json!({"tessera.dev/gpu-share": "300"})),
        Ok(GpuDemand::Share { milli: 300 })
    );
}

#[test]
fn malformed_memory_names_the_annotation_and_value() {
    let e = gpu_of(json!({"tessera.dev/gpu": "1"}), json!({"tessera.dev/gpu-memory": "18Qb"})).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("tessera.dev/gpu-memory") && msg.contains("18Qb"), "{msg}");
    assert_eq!(e.kind(), "annotation");
}

#[test]
fn share_out_of_range_is_rejected_with_its_value() {
    let e = gpu_of(json!({"tessera.dev/gpu": "1"}), json!({"tessera.dev/gpu-share": "1500"})).unwrap_err();
    assert!(e.to_string().contains("1500"), "{e}");
}

#[test]
fn gpus_and_share_together_are_contradictory() {
    let e = gpu_of(json!({"tessera.dev/gpu": "1"}), json!({"tessera.dev/gpus": "2", "tessera.dev/gpu-share": "300"}))
        .unwrap_err();
    assert_eq!(e.kind(), "contradictory");
    assert!(e.to_string().contains("tessera.dev/gpus") && e.to_string().contains("tessera.dev/gpu-share"));
}

#[test]
fn nvidia_gpu_and_mig_resources_together_are_contradictory() {
    let e = gpu_of(json!({"nvidia.com/gpu": "1", "nvidia.com/mig-1g.10gb": "1"}), json!({})).unwrap_err();
    assert_eq!(e.kind(), "contradictory");
}

#[test]
fn sizing_annotation_on_an_nvidia_pod_is_contradictory() {
    let e = gpu_of(json!({"nvidia.com/gpu": "1"}), json!({"tessera.dev/gpu-memory": "10Gi"})).unwrap_err();
    assert_eq!(e.kind(), "contradictory");
}

#[test]
fn sizing_annotation_without_a_gpu_resource_says_what_is_missing() {
    let e = gpu_of(json!({"cpu": "1"}), json!({"tessera.dev/gpu-memory": "10Gi"})).unwrap_err();
    assert!(e.to_string().contains("tessera.dev/gpu: 1"), "{e}");
}

#[test]
fn compute_without_memory_is_rejected() {
    let e = gpu_of(json!({"tessera.dev/gpu": "1"}), json!({"tessera.dev/gpu-compute": "3"})).unwrap_err();
    assert!(e.to_string().contains("tessera.dev/gpu-compute"), "{e}");
}

#[test]
fn two_mig_instances_in_one_pod_are_rejected() {
    let e = gpu_of(json!({"nvidia.com/mig-1g.10gb": "2"}), json!({})).unwrap_err();
    assert_eq!(e.kind(), "resource");
}

#[test]
fn unknown_mig_profile_is_invalid() {
    let e = gpu_of(json!({"nvidia.com/mig-5g.50gb": "1"}), json!({})).unwrap_err();
    assert!(e.to_string().contains("5g.50gb"), "{e}");
}

#[test]
fn cpu_memory_models_selector_and_priority_are_read() {
    let p: Pod = serde_json::from_value(json!({
        "metadata": {"name": "p", "namespace": "ml", "annotations": {"tessera.dev/gpu-models": "H100-80GB | A100-80GB"}},
        "spec": {
            "priority": 100,
            "nodeSelector": {"tessera.dev/pool": "h100"},
            "initContainers": [{"name": "i", "resources": {"requests": {"cpu": "8"}}}],
            "containers": [
                {"name": "a", "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"tessera.dev/gpu": "1"}}},
                {"name": "b", "resources": {"requests": {"cpu": "1500m", "memory": "512Mi"}}}
            ]
        }
    }))
    .unwrap();
    let d = demand(&p, None).unwrap();
    assert_eq!(d.pod, PodKey::new("ml", "p"));
    // The init container's 8 cores exceed the containers' 2.
    assert_eq!(d.cpu_milli, 8000);
    assert_eq!(d.memory_mib, 1536);
    assert_eq!(d.gpu_models, vec!["H100-80GB".to_owned(), "A100-80GB".to_owned()]);
    assert_eq!(d.node_selector, vec![("tessera.dev/pool".to_owned(), "h100".to_owned())]);
    assert_eq!(d.priority, 100);
}

#[test]
fn pod_group_label_takes_min_member_and_timeout_from_the_group() {
    let mut p = pod(json!({"nvidia.com/gpu": "1"}), json!({}));
    p.metadata.labels = Some([(POD_GROUP_LABEL.to_owned(), "job".to_owned())].into());
    assert_eq!(pod_group_name(&p), Some("job"));
    let e = demand(&p, None).unwrap_err();
    assert!(!e.is_permanent());
    let spec = PodGroupSpec { min_member: 4, schedule_timeout_seconds: Some(30), ..Default::default() };
    let g = demand(&p, Some(&spec)).unwrap().gang.unwrap();
    assert_eq!(g, GangRef { name: "ml/job".into(), min_member: 4, timeout_ms: 30_000 });
}

#[test]
fn annotation_gang_needs_name_and_size() {
    let d = demand(&pod(json!({}), json!({"tessera.dev/gang-name": "g", "tessera.dev/gang-size": "3"})), None).unwrap();
    assert_eq!(d.gang, Some(GangRef { name: "ml/g".into(), min_member: 3, timeout_ms: 60_000 }));
    let e = demand(&pod(json!({}), json!({"tessera.dev/gang-name": "g"})), None).unwrap_err();
    assert!(e.to_string().contains("tessera.dev/gang-size"), "{e}");
    let e =
        demand(&pod(json!({}), json!({"tessera.dev/gang-name": "g", "tessera.dev/gang-size": "x"})), None).unwrap_err();
    assert!(e.to_string().contains("\"x\""), "{e}");
}

#[test]
fn label_and_annotation_naming_different_gangs_are_contradictory() {
    let mut p = pod(json!({}), json!({"tessera.dev/gang-name": "a", "tessera.dev/gang-size": "2"}));
    p.metadata.labels = Some([(POD_GROUP_LABEL.to_owned(), "b".to_owned())].into());
    assert_eq!(demand(&p, None).unwrap_err().kind(), "contradictory");
}

#[test]
fn quantities_parse_like_kubernetes() {
    assert_eq!(parse_quantity("18Gi"), Some(18.0 * 1024.0 * 1024.0 * 1024.0));
    assert_eq!(parse_quantity("500m"), Some(0.5));
    assert_eq!(parse_quantity("1.5e3"), Some(1500.0));
    assert_eq!(parse_quantity("2k"), Some(2000.0));
    assert_eq!(parse_quantity("-1"), None);
    assert_eq!(parse_quantity("1Qi"), None);
    assert_eq!(parse_quantity(""), None);
}

#[test]
fn fixture_pod_asks_for_one_mig_slice_in_its_gang() {
    let args: serde_json::Value =
        serde_json::from_str(include_str!("../../../extender/tests/fixtures/wire/filter-args.json")).unwrap();
    let p: Pod = serde_json::from_value(args["Pod"].clone()).unwrap();
    assert!(wants_gpu(&p));
    let spec = PodGroupSpec { min_member: 1, ..Default::default() };
    let d = demand(&p, Some(&spec)).unwrap();
    assert_eq!(d.gpu, GpuDemand::Mig { profile: "1g.10gb".into() });
    assert_eq!((d.cpu_milli, d.memory_mib), (4000, 16 * 1024));
    assert_eq!(d.gang.map(|g| g.name), Some("ml/train-job-7".to_owned()));
}

#[test]
fn cpu_and_memory_come_from_requests_and_from_limits_only_where_no_request_is_set() {
    let p: Pod = serde_json::from_value(json!({
        "metadata": {"name": "p", "namespace": "ml"},
        "spec": {"containers": [
            // Both set: kube-scheduler counts the request, not the limit.
            {"name": "a", "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "4", "memory": "8Gi"}}},
            // Only a limit: the request defaults to it.
            {"name": "b", "resources": {"limits": {"cpu": "1", "memory": "512Mi"}}}
        ]}
    }))
    .unwrap();
    let d = demand(&p, None).unwrap();
    assert_eq!((d.cpu_milli, d.memory_mib), (1500, 1536));
    assert_eq!(requests(&p).unwrap(), (1500, 1536));
}
