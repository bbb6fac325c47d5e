//! `kubectl tessera capture`: the cluster as the scheduler sees it (nodes, pods, GpuNodes,
//! PodGroups), in one JSON document for offline what-if runs.
//!
//! Environment values, `last-applied-configuration` annotations and `managedFields` are removed:
//! a capture is meant to be shared, and those can hold secrets.

use anyhow::Result;
use serde_json::{Map, Value, json};

use crate::source::Kubectl;

/// Format marker of the document.
pub const KIND: &str = "TesseraCapture";
pub const VERSION: u64 = 1;

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Lists every object of a resource (`-A` when namespaced), or `None` with a note when the
/// cluster does not serve that resource (an optional CRD).
fn items(
    kubectl: &Kubectl,
    resource: &str,
    namespaced: bool,
    optional: bool,
    notes: &mut Vec<String>,
) -> Result<Value> {
    let mut args = vec!["get", resource, "-o", "json"];
    if namespaced {
        args.push("--all-namespaces");
    }
    match kubectl.json(&args) {
        Ok(list) => Ok(Value::Array(list.get("items").and_then(Value::as_array).cloned().unwrap_or_default())),
        Err(e) if optional && e.to_string().contains("the server doesn't have a resource type") => {
            notes.push(format!("{resource}: not served by this cluster (CRD not installed); captured as empty"));
            Ok(Value::Array(Vec::new()))
        }
        Err(e) => Err(e),
    }
}

/// Removes what a capture must not carry.
pub fn scrub(obj: &mut Value) {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
        if let Some(a) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
            a.remove(LAST_APPLIED);
        }
    }
    if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
        for key in ["containers", "initContainers", "ephemeralContainers"] {
            for c in spec.get_mut(key).and_then(Value::as_array_mut).into_iter().flatten() {
                let Some(c) = c.as_object_mut() else { continue };
                for e in c.get_mut("env").and_then(Value::as_array_mut).into_iter().flatten() {
                    if let Some(e) = e.as_object_mut()
                        && e.remove("value").is_some()
                    {
                        e.insert("value".into(), Value::String("(removed)".into()));
                    }
                }
            }
        }
    }
}

/// Captures the cluster `kubectl` points at.
pub fn capture(kubectl: &Kubectl) -> Result<Value> {
    let mut notes = Vec::new();
    let context =
        kubectl.run(&["config", "current-context"]).map(|o| String::from_utf8_lossy(&o).trim().to_owned()).ok();
    let mut doc = Map::new();
    doc.insert("kind".into(), json!(KIND));
    doc.insert("version".into(), json!(VERSION));
    doc.insert("context".into(), json!(context));
    for (key, resource, namespaced, optional) in [
        ("nodes", "nodes", false, false),
        ("pods", "pods", true, false),
        ("gpuNodes", "gpunodes.tessera.dev", false, true),
        ("podGroups", "podgroups.scheduling.x-k8s.io", true, true),
    ] {
        let mut list = items(kubectl, resource, namespaced, optional, &mut notes)?;
        for o in list.as_array_mut().into_iter().flatten() {
            scrub(o);
        }
        doc.insert(key.into(), list);
    }
    doc.insert("notes".into(), json!(notes));
    Ok(Value::Object(doc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_removes_env_values_managed_fields_and_last_applied() {
        let mut pod = json!({
            "metadata": {"name": "p", "managedFields": [{}], "annotations": {LAST_APPLIED: "{...}", "tessera.dev/gpu-memory": "4Gi"}},
            "spec": {"containers": [{"name": "c", "env": [{"name": "TOKEN", "value": "s3cret"}, {"name": "FROM", "valueFrom": {}}]}]}
        });
        scrub(&mut pod);
        let text = pod.to_string();
        assert!(!text.contains("s3cret") && !text.contains("managedFields") && !text.contains(LAST_APPLIED), "{text}");
        assert_eq!(pod["metadata"]["annotations"]["tessera.dev/gpu-memory"], "4Gi");
        assert_eq!(pod["spec"]["containers"][0]["env"][1], json!({"name": "FROM", "valueFrom": {}}));
    }
}
