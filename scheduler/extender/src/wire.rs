//! The `k8s.io/kube-scheduler/extender/v1` wire types.
//!
//! The Go structs have no json tags, so keys are the Go field names (PascalCase; `PodUID`,
//! `UID` and `NumPDBViolations` spelled out). Go sends nil pointers, maps and slices as `null`
//! (no `omitempty`), so every nullable field is an `Option` that serialises `None` as `null`,
//! exactly as Go writes it. Lowercase keys are accepted too, as Go's case-insensitive decoder
//! does.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Pod};
use serde::{Deserialize, Serialize};

/// Highest score an extender may give (`MaxExtenderPriority`).
pub const MAX_EXTENDER_PRIORITY: i64 = 10;

/// `v1.NodeList`: the Node objects sent when `nodeCacheCapable` is false.
pub type NodeList = k8s_openapi::List<Node>;

/// node name → why it was rejected.
pub type FailedNodesMap = BTreeMap<String, String>;

/// Body of filter and prioritize.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ExtenderArgs {
    #[serde(default, alias = "pod", serialize_with = "informer_pod")]
    pub pod: Option<Box<Pod>>,
    /// Full Node objects; set when `nodeCacheCapable` is false.
    #[serde(default, alias = "nodes")]
    pub nodes: Option<NodeList>,
    /// Node names; set when `nodeCacheCapable` is true.
    #[serde(default, alias = "nodenames", alias = "nodeNames")]
    pub node_names: Option<Vec<String>>,
}

/// Reply to filter.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ExtenderFilterResult {
    #[serde(default, alias = "nodes")]
    pub nodes: Option<NodeList>,
    #[serde(default, alias = "nodenames", alias = "nodeNames")]
    pub node_names: Option<Vec<String>>,
    #[serde(default, alias = "failednodes", alias = "failedNodes")]
    pub failed_nodes: Option<FailedNodesMap>,
    #[serde(default, alias = "failedandunresolvablenodes", alias = "failedAndUnresolvableNodes")]
    pub failed_and_unresolvable_nodes: Option<FailedNodesMap>,
    #[serde(default, alias = "error")]
    pub error: String,
}

impl ExtenderFilterResult {
    /// A failed call: kube-scheduler fails this scheduling cycle with `message`.
    pub fn error(message: impl Into<String>) -> Self {
        Self { error: message.into(), ..Default::default() }
    }
}

/// One element of the prioritize reply (`HostPriorityList`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HostPriority {
    #[serde(alias = "host")]
    pub host: String,
    #[serde(alias = "score")]
    pub score: i64,
}

/// Reply to prioritize.
pub type HostPriorityList = Vec<HostPriority>;

/// Body of bind.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ExtenderBindingArgs {
    #[serde(default, alias = "podname", alias = "podName")]
    pub pod_name: String,
    #[serde(default, alias = "podnamespace", alias = "podNamespace")]
    pub pod_namespace: String,
    #[serde(default, rename = "PodUID", alias = "poduid", alias = "podUID")]
    pub pod_uid: String,
    #[serde(default, alias = "node")]
    pub node: String,
}

/// Reply to bind: `""` is success.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ExtenderBindingResult {
    #[serde(default, alias = "error")]
    pub error: String,
}

/// Body of preempt.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ExtenderPreemptionArgs {
    #[serde(default, alias = "pod", serialize_with = "informer_pod")]
    pub pod: Option<Box<Pod>>,
    /// Victims as full pods; set when `nodeCacheCapable` is false.
    #[serde(default, alias = "nodenametovictims", alias = "nodeNameToVictims")]
    pub node_name_to_victims: Option<BTreeMap<String, Victims>>,
    /// Victims as UIDs; set when `nodeCacheCapable` is true.
    #[serde(default, alias = "nodenametometavictims", alias = "nodeNameToMetaVictims")]
    pub node_name_to_meta_victims: Option<BTreeMap<String, MetaVictims>>,
}

/// Reply to preempt: the accepted nodes and the victims chosen on each.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ExtenderPreemptionResult {
    #[serde(default, alias = "nodenametometavictims", alias = "nodeNameToMetaVictims")]
    pub node_name_to_meta_victims: Option<BTreeMap<String, MetaVictims>>,
}

/// Victims on one node, as full pods.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Victims {
    #[serde(default, alias = "pods", serialize_with = "informer_pods")]
    pub pods: Option<Vec<Pod>>,
    #[serde(default, rename = "NumPDBViolations", alias = "numpdbviolations", alias = "numPDBViolations")]
    pub num_pdb_violations: i64,
}

/// Victims on one node, by UID.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct MetaVictims {
    #[serde(default, alias = "pods")]
    pub pods: Option<Vec<MetaPod>>,
    #[serde(default, rename = "NumPDBViolations", alias = "numpdbviolations", alias = "numPDBViolations")]
    pub num_pdb_violations: i64,
}

/// A victim pod by UID.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaPod {
    #[serde(rename = "UID", alias = "uid")]
    pub uid: String,
}

/// A pod as kube-scheduler sends it: from its informer cache, so without `apiVersion`/`kind`
/// (k8s-openapi always writes them).
fn without_type_meta(pod: &Pod) -> Result<serde_json::Value, serde_json::Error> {
    let mut v = serde_json::to_value(pod)?;
    if let Some(o) = v.as_object_mut() {
        o.remove("apiVersion");
        o.remove("kind");
    }
    Ok(v)
}

fn informer_pod<S: serde::Serializer>(pod: &Option<Box<Pod>>, s: S) -> Result<S::Ok, S::Error> {
    match pod {
        None => s.serialize_none(),
        Some(p) => without_type_meta(p).map_err(serde::ser::Error::custom)?.serialize(s),
    }
}

fn informer_pods<S: serde::Serializer>(pods: &Option<Vec<Pod>>, s: S) -> Result<S::Ok, S::Error> {
    match pods {
        None => s.serialize_none(),
        Some(ps) => {
            let vs =
                ps.iter().map(without_type_meta).collect::<Result<Vec<_>, _>>().map_err(serde::ser::Error::custom)?;
            vs.serialize(s)
        }
    }
}

/// Hand-written JSON for the filter and prioritize replies (thousands of names each), byte for
/// byte what `serde_json` writes: a string without `"`, `\\` or control characters is copied
/// as it is, any other goes through `serde_json`'s own escaping.
pub(crate) mod out {
    use tessera_core::Rejection;

    /// Whether `s` is written as it is inside quotes.
    fn plain(s: &str) -> bool {
        s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\')
    }

    /// The contents of a JSON string (no quotes).
    pub(crate) fn str_contents(out: &mut Vec<u8>, s: &str) {
        if plain(s) {
            out.extend_from_slice(s.as_bytes());
        } else {
            let mut quoted = Vec::with_capacity(s.len() + 8);
            // A `str` always encodes.
            if serde_json::to_writer(&mut quoted, s).is_ok() && quoted.len() >= 2 {
                out.extend_from_slice(&quoted[1..quoted.len() - 1]);
            }
        }
    }

    /// A JSON string.
    pub(crate) fn str(out: &mut Vec<u8>, s: &str) {
        out.push(b'"');
        str_contents(out, s);
        out.push(b'"');
    }

    /// A rejection's text as a JSON string, as its `Display` writes it.
    pub(crate) fn reason(out: &mut Vec<u8>, r: &Rejection) {
        out.push(b'"');
        if let Some(n) = r.node() {
            out.extend_from_slice(b"node ");
            str_contents(out, &n.0);
            out.extend_from_slice(b": ");
        }
        str_contents(out, r.cause());
        out.push(b'"');
    }

    /// An integer, formatted by `itoa` as `serde_json` itself formats it.
    pub(crate) fn int(out: &mut Vec<u8>, v: i64) {
        out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn filter_result_writes_go_keys_and_nulls() {
        let r = ExtenderFilterResult {
            node_names: Some(vec!["gpu-node-2".into()]),
            failed_nodes: Some([("gpu-node-1".to_owned(), "no free 1g slice".to_owned())].into()),
            failed_and_unresolvable_nodes: Some([("cpu-node-1".to_owned(), "no GPU".to_owned())].into()),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"Nodes":null,"NodeNames":["gpu-node-2"],"FailedNodes":{"gpu-node-1":"no free 1g slice"},"FailedAndUnresolvableNodes":{"cpu-node-1":"no GPU"},"Error":""}"#
        );
    }

    #[test]
    fn binding_args_use_pod_uid_in_capitals() {
        let a = ExtenderBindingArgs {
            pod_name: "embed-0".into(),
            pod_namespace: "ml".into(),
            pod_uid: "9b2e".into(),
            node: "gpu-node-2".into(),
        };
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            r#"{"PodName":"embed-0","PodNamespace":"ml","PodUID":"9b2e","Node":"gpu-node-2"}"#
        );
    }

    #[test]
    fn preemption_result_and_host_priority_use_go_keys() {
        let r = ExtenderPreemptionResult {
            node_name_to_meta_victims: Some(
                [(
                    "gpu-node-2".to_owned(),
                    MetaVictims { pods: Some(vec![MetaPod { uid: "3f1c".into() }]), num_pdb_violations: 0 },
                )]
                .into(),
            ),
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"NodeNameToMetaVictims":{"gpu-node-2":{"Pods":[{"UID":"3f1c"}],"NumPDBViolations":0}}}"#
        );
        let h = HostPriority { host: "gpu-node-2".into(), score: 7 };
        assert_eq!(serde_json::to_string(&h).unwrap(), r#"{"Host":"gpu-node-2","Score":7}"#);
        assert_eq!(serde_json::to_string(&ExtenderBindingResult::default()).unwrap(), r#"{"Error":""}"#);
    }

    #[test]
    fn lowercase_keys_decode_like_go() {
        let a: ExtenderArgs = serde_json::from_value(json!({"pod": null, "nodes": null, "nodenames": ["a"]})).unwrap();
        assert_eq!(a.node_names, Some(vec!["a".to_owned()]));
        let b: ExtenderBindingArgs =
            serde_json::from_value(json!({"podname": "p", "podnamespace": "ns", "poduid": "u", "node": "n"})).unwrap();
        assert_eq!(b.pod_uid, "u");
        let r: ExtenderFilterResult = serde_json::from_value(json!({"error": "boom"})).unwrap();
        assert_eq!(r.error, "boom");
    }

    #[test]
    fn null_and_missing_fields_are_none() {
        let a: ExtenderArgs = serde_json::from_str(r#"{"Pod":null,"Nodes":null,"NodeNames":null}"#).unwrap();
        assert_eq!(a, ExtenderArgs::default());
        let a: ExtenderArgs = serde_json::from_str("{}").unwrap();
        assert_eq!(a, ExtenderArgs::default());
    }
}
