//! The node rules kube-scheduler's own filters apply before tessera is asked: taints against
//! the pod's tolerations, the pod's required node affinity, and the extended resources a pod
//! requests by NVIDIA name (`nvidia.com/gpu`, `nvidia.com/mig-3g.40gb`) against what the node
//! advertises. tessera applies them too, so that a gang plan puts each member only where
//! kube-scheduler will accept it.

use serde::{Deserialize, Serialize};

/// A node taint (`key=value:effect`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Taint {
    pub key: String,
    #[serde(default)]
    pub value: String,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`.
    pub effect: String,
}

impl Taint {
    /// Whether the taint keeps pods that do not tolerate it off the node at scheduling time.
    pub fn repels(&self) -> bool {
        self.effect == "NoSchedule" || self.effect == "NoExecute"
    }
}

/// A pod toleration, as Kubernetes matches it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Toleration {
    /// Empty with `Exists`: every taint.
    #[serde(default)]
    pub key: String,
    /// `Equal` (the default) or `Exists`.
    #[serde(default)]
    pub operator: String,
    #[serde(default)]
    pub value: String,
    /// Empty: every effect.
    #[serde(default)]
    pub effect: String,
}

impl Toleration {
    pub fn tolerates(&self, t: &Taint) -> bool {
        if !self.effect.is_empty() && self.effect != t.effect {
            return false;
        }
        match self.operator.as_str() {
            "Exists" => self.key.is_empty() || self.key == t.key,
            _ => self.key == t.key && self.value == t.value,
        }
    }
}

/// One requirement of a node selector term: on a label, or (`field`) on `metadata.name`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Requirement {
    pub key: String,
    /// `In`, `NotIn`, `Exists`, `DoesNotExist`, `Gt` or `Lt`.
    pub operator: String,
    #[serde(default)]
    pub values: Vec<String>,
    /// A `matchFields` requirement (`metadata.name`), not a label.
    #[serde(default)]
    pub field: bool,
}

impl Requirement {
    fn matches(&self, node_name: &str, labels: &std::collections::BTreeMap<String, String>) -> bool {
        let value = if self.field {
            (self.key == "metadata.name").then_some(node_name)
        } else {
            labels.get(&self.key).map(String::as_str)
        };
        let int = |s: &str| s.parse::<i64>().ok();
        match self.operator.as_str() {
            "In" => value.is_some_and(|v| self.values.iter().any(|x| x == v)),
            "NotIn" => value.is_none_or(|v| !self.values.iter().any(|x| x == v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            "Gt" => {
                matches!((value.and_then(int), self.values.first().and_then(|x| int(x))), (Some(v), Some(x)) if v > x)
            }
            "Lt" => {
                matches!((value.and_then(int), self.values.first().and_then(|x| int(x))), (Some(v), Some(x)) if v < x)
            }
            _ => false,
        }
    }
}

/// What of kube-scheduler's node filters a pod carries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeRules {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Required node affinity: the node must match one term, every requirement of it. Empty:
    /// any node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub affinity: Vec<Vec<Requirement>>,
    /// Extended resources by NVIDIA name and how many the pod requests; kube-scheduler counts
    /// them against the node's allocatable minus what bound pods request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extended: Vec<(String, u64)>,
}

impl NodeRules {
    pub fn is_empty(&self) -> bool {
        self.tolerations.is_empty() && self.affinity.is_empty() && self.extended.is_empty()
    }

    /// The first taint of `taints` that repels the pod.
    pub fn untolerated<'a>(&self, taints: &'a [Taint]) -> Option<&'a Taint> {
        taints.iter().find(|t| t.repels() && !self.tolerations.iter().any(|tol| tol.tolerates(t)))
    }

    /// Whether the node satisfies the required node affinity.
    pub fn affinity_matches(&self, node_name: &str, labels: &std::collections::BTreeMap<String, String>) -> bool {
        self.affinity.is_empty() || self.affinity.iter().any(|term| term.iter().all(|r| r.matches(node_name, labels)))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn taint(key: &str, value: &str, effect: &str) -> Taint {
        Taint { key: key.into(), value: value.into(), effect: effect.into() }
    }

    #[test]
    fn tolerations_match_as_kubernetes_matches_them() {
        let t = taint("nvidia.com/gpu", "present", "NoSchedule");
        let tol = |k: &str, op: &str, v: &str, e: &str| Toleration {
            key: k.into(),
            operator: op.into(),
            value: v.into(),
            effect: e.into(),
        };
        assert!(tol("nvidia.com/gpu", "Exists", "", "").tolerates(&t));
        assert!(tol("", "Exists", "", "").tolerates(&t));
        assert!(tol("nvidia.com/gpu", "Equal", "present", "NoSchedule").tolerates(&t));
        assert!(!tol("nvidia.com/gpu", "Equal", "absent", "").tolerates(&t));
        assert!(!tol("nvidia.com/gpu", "Exists", "", "NoExecute").tolerates(&t));
        let rules = NodeRules::default();
        assert_eq!(rules.untolerated(std::slice::from_ref(&t)), Some(&t));
        assert_eq!(rules.untolerated(&[taint("x", "", "PreferNoSchedule")]), None);
    }

    #[test]
    fn required_affinity_needs_one_whole_term() {
        let labels: BTreeMap<String, String> = [("pool".to_owned(), "h100".to_owned())].into();
        let req = |k: &str, op: &str, vs: &[&str], field: bool| Requirement {
            key: k.into(),
            operator: op.into(),
            values: vs.iter().map(|v| (*v).to_owned()).collect(),
            field,
        };
        let rules = NodeRules {
            affinity: vec![
                vec![req("pool", "In", &["a100"], false)],
                vec![req("pool", "In", &["h100"], false), req("metadata.name", "NotIn", &["n2"], true)],
            ],
            ..Default::default()
        };
        assert!(rules.affinity_matches("n1", &labels));
        assert!(!rules.affinity_matches("n2", &labels));
        assert!(!rules.affinity_matches("n1", &BTreeMap::new()));
        assert!(NodeRules::default().affinity_matches("n2", &BTreeMap::new()));
    }
}
