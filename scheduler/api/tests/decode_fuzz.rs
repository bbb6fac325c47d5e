//! Property-based fuzzing of everything tessera reads from a pod: resource quantities, every
//! `tessera.dev/*` annotation, the PodGroup, the assignment and its signature, and the key file.
//! The properties: nothing panics, and a refused input is an error that names what to fix.
//!
//! The suite runs a few hundred cases per property; a long run takes `PROPTEST_CASES`, e.g.
//! `PROPTEST_CASES=1000000 cargo test --release -p tessera-api --test decode_fuzz` (see
//! docs/operations.md, "Hostile input").

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use proptest::prelude::*;
use tessera_api::annotations as ann;
use tessera_api::pod::{self, PodError};
use tessera_api::signing::Keyring;
use tessera_api::{Assignment, PodGroupSpec};

const KEYS: &str = "k1 Zmlyc3Qtc2VjcmV0LWtleS0xNi1ieXRlcw==\n";

/// Strings near the edges of what the parsers accept: numbers of every size and sign,
/// quantities with every suffix, exponents, separators, and arbitrary text.
fn edgy() -> impl Strategy<Value = String> {
    let number = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| f.to_string()),
        Just("18446744073709551616".to_owned()),
        Just("1e308".to_owned()),
        Just("1e-400".to_owned()),
        Just("NaN".to_owned()),
        Just("inf".to_owned()),
        Just("".to_owned()),
        Just(" ".to_owned()),
    ];
    let suffix = prop_oneof![
        Just(""),
        Just("m"),
        Just("Mi"),
        Just("Gi"),
        Just("Ei"),
        Just("E"),
        Just("e9"),
        Just("e99999"),
        Just("e-3"),
        Just("k"),
        Just("x")
    ];
    prop_oneof![
        (number, suffix).prop_map(|(n, s)| format!("{n}{s}")),
        "[0-9.+eE-]{0,12}[a-zA-Z]{0,3}",
        "[0-9|, ]{0,16}",
        "[a-zA-Z0-9| ._-]{0,24}",
        any::<String>(),
        // Typical values of the annotations, so the deeper checks run too.
        prop_oneof![Just("8Gi"), Just("2"), Just("300"), Just("4"), Just("H100-80GB|A100-80GB"), Just("gang-a")]
            .prop_map(str::to_owned),
    ]
}

fn annotation_map() -> impl Strategy<Value = BTreeMap<String, String>> {
    let key = prop_oneof![
        Just(ann::GPU_MEMORY),
        Just(ann::GPU_COMPUTE),
        Just(ann::GPUS),
        Just(ann::GPU_SHARE),
        Just(ann::GPU_MODELS),
        Just(ann::GANG_NAME),
        Just(ann::GANG_SIZE),
        Just(ann::ASSIGNMENT),
        Just(ann::ASSIGNMENT_SIGNATURE),
        Just(ann::RESERVATION),
        Just("tessera.dev/unknown"),
    ]
    .prop_map(str::to_owned);
    proptest::collection::btree_map(key, edgy(), 0..6)
}

fn resources() -> impl Strategy<Value = Option<BTreeMap<String, Quantity>>> {
    let name = prop_oneof![
        Just("cpu".to_owned()),
        Just("memory".to_owned()),
        Just(ann::RESOURCE_GPU.to_owned()),
        Just(pod::NVIDIA_GPU.to_owned()),
        Just("nvidia.com/mig-1g.10gb".to_owned()),
        Just("nvidia.com/mig-3g.40gb".to_owned()),
        "nvidia.com/mig-[0-9a-z.+]{0,10}",
        "nvidia.com/[a-z-]{0,8}",
    ];
    proptest::option::of(proptest::collection::btree_map(name, edgy().prop_map(Quantity), 0..4))
}

fn container() -> impl Strategy<Value = Container> {
    (resources(), resources()).prop_map(|(limits, requests)| Container {
        name: "c".into(),
        resources: Some(ResourceRequirements { limits, requests, ..Default::default() }),
        ..Default::default()
    })
}

fn hostile_pod() -> impl Strategy<Value = Pod> {
    (
        annotation_map(),
        proptest::collection::vec(container(), 0..3),
        proptest::collection::vec(container(), 0..2),
        proptest::option::of(any::<i32>()),
        proptest::option::of("[a-z0-9.-]{0,12}"),
    )
        .prop_map(|(annotations, containers, init, priority, group)| Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("ml".into()),
                uid: Some("uid-1".into()),
                annotations: Some(annotations),
                labels: group.map(|g| [(tessera_api::podgroup::POD_GROUP_LABEL.to_owned(), g)].into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers,
                init_containers: (!init.is_empty()).then_some(init),
                priority,
                scheduler_name: Some("tessera".into()),
                ..Default::default()
            }),
            ..Default::default()
        })
}

fn group() -> impl Strategy<Value = Option<PodGroupSpec>> {
    proptest::option::of((any::<i32>(), proptest::option::of(any::<i32>())).prop_map(|(min, timeout)| {
        serde_json::from_value(serde_json::json!({"minMember": min, "scheduleTimeoutSeconds": timeout})).unwrap()
    }))
}

/// A refusal names what to fix and is a sentence, never a Rust debug dump.
fn check_error(e: &PodError, pod: &Pod) {
    let text = e.to_string();
    assert!(!text.is_empty());
    match e {
        PodError::Annotation { key, .. } => {
            assert!(text.contains(key), "{text}");
            let anns = pod.metadata.annotations.as_ref().unwrap();
            assert!(anns.contains_key(*key), "the error names an annotation the pod does not have: {text}");
        }
        PodError::Resource { name, .. } => assert!(text.contains(name.as_str()), "{text}"),
        _ => {}
    }
    // What the user wrote is quoted in the message; the rest must not be a debug dump.
    let mut rest = text.clone();
    let written = pod.metadata.annotations.iter().flatten().map(|(_, v)| v.clone()).chain(
        pod.spec.iter().flat_map(|s| s.containers.iter().chain(s.init_containers.iter().flatten())).flat_map(|c| {
            let r = c.resources.clone().unwrap_or_default();
            r.limits.into_iter().flatten().chain(r.requests.into_iter().flatten()).map(|(_, q)| q.0)
        }),
    );
    for v in written {
        rest = rest.replace(&format!("{v:?}"), "");
    }
    assert!(!rest.contains("Some(") && !rest.contains(" { "), "debug dump in {text}");
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_quantity_parses_to_a_finite_non_negative_value_or_nothing(s in edgy()) {
        if let Some(v) = pod::parse_quantity(&s) {
            prop_assert!(v.is_finite() && v >= 0.0, "{s:?} -> {v}");
        }
    }

    #[test]
    fn any_pod_gives_a_valid_demand_or_an_error_that_names_the_cause(p in hostile_pod(), g in group()) {
        match pod::demand(&p, g.as_ref()) {
            Ok(d) => prop_assert!(d.validate().is_ok(), "{d:?}"),
            Err(e) => check_error(&e, &p),
        }
        // The other readers of a pod never panic either.
        let _ = pod::requests(&p);
        let _ = pod::node_rules(&p);
        let _ = pod::gang_name(&p);
        let _ = pod::extended(&p);
        let _ = pod::wants_gpu(&p);
    }

    #[test]
    fn any_assignment_and_signature_is_verified_or_refused(a in edgy(), sig in proptest::option::of(edgy()),
                                                           tag in "[A-Za-z0-9_-]{0,48}") {
        let ring = Keyring::parse(KEYS).unwrap();
        let _ = Assignment::from_annotation(&a);
        prop_assert!(ring.verify("uid-1", "n1", &a, sig.as_deref()).is_err());
        let shaped = format!("v1:k1:uid-1:{tag}");
        prop_assert!(ring.verify("uid-1", "n1", &a, Some(&shaped)).is_err(), "an unsigned value verified");
    }

    #[test]
    fn any_key_file_parses_or_is_refused_with_its_line(text in prop_oneof![any::<String>(), "([a-z0-9]{0,4}[ =][A-Za-z0-9+/=]{0,40}\n){0,4}"]) {
        match Keyring::parse(&text) {
            Ok(r) => prop_assert!(!r.ids().is_empty()),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn any_json_is_read_as_a_pod_or_refused(v in json()) {
        if let Ok(p) = serde_json::from_value::<Pod>(v)
            && let Err(e) = pod::demand(&p, None)
        {
            prop_assert!(!e.to_string().is_empty());
        }
    }
}

/// JSON documents shaped like pods: the right keys at the top, anything below.
fn json() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        edgy().prop_map(Value::String),
    ];
    let tree = leaf.prop_recursive(4, 32, 6, |inner| {
        let key = prop_oneof![
            Just("metadata".to_owned()),
            Just("spec".to_owned()),
            Just("name".to_owned()),
            Just("namespace".to_owned()),
            Just("annotations".to_owned()),
            Just("containers".to_owned()),
            Just("resources".to_owned()),
            Just("limits".to_owned()),
            Just("requests".to_owned()),
            Just(ann::GPU_MEMORY.to_owned()),
            Just(ann::GPUS.to_owned()),
            Just(ann::RESOURCE_GPU.to_owned()),
            "[a-z]{1,6}",
        ];
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(key, inner, 0..5).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    tree.prop_map(|spec| serde_json::json!({"metadata": {"name": "p", "namespace": "ml", "uid": "u"}, "spec": spec}))
}
