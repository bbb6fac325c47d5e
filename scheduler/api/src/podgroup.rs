//! The scheduler-plugins `PodGroup` (`podgroups.scheduling.x-k8s.io`, v1alpha1): the standard way
//! to declare a gang. tessera reads it; it never writes it.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The pod label naming a pod's `PodGroup` (same namespace).
pub const POD_GROUP_LABEL: &str = "scheduling.x-k8s.io/pod-group";

/// Reservation lifetime of a planned gang when the group does not say (DESIGN §4).
pub const DEFAULT_SCHEDULE_TIMEOUT_SECONDS: i32 = 60;

/// A gang: at least `minMember` pods are scheduled together or not at all.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "scheduling.x-k8s.io",
    version = "v1alpha1",
    kind = "PodGroup",
    plural = "podgroups",
    shortname = "pg",
    namespaced,
    status = "PodGroupStatus"
)]
#[serde(rename_all = "camelCase")]
pub struct PodGroupSpec {
    /// Members that must be schedulable before any binds.
    #[serde(default)]
    pub min_member: i32,
    /// Resources the whole group needs, as quantities (informational for tessera).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_resources: Option<BTreeMap<String, serde_json::Value>>,
    /// How long a planned gang may wait for all its members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_timeout_seconds: Option<i32>,
}

/// What the coscheduling controller reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodGroupStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occupied_by: Option<String>,
    #[serde(default)]
    pub running: i32,
    #[serde(default)]
    pub succeeded: i32,
    #[serde(default)]
    pub failed: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_start_time: Option<String>,
}

impl PodGroupSpec {
    /// The reservation lifetime in milliseconds: `scheduleTimeoutSeconds`, else the default;
    /// non-positive values fall back to the default too.
    pub fn timeout_ms(&self) -> u64 {
        let s = self.schedule_timeout_seconds.filter(|s| *s > 0).unwrap_or(DEFAULT_SCHEDULE_TIMEOUT_SECONDS);
        u64::from(s.unsigned_abs()) * 1000
    }
}

#[cfg(test)]
mod tests {
    use kube::{CustomResourceExt, Resource};

    use super::*;

    #[test]
    fn podgroup_reads_the_scheduler_plugins_json() {
        let pg: PodGroup = serde_json::from_str(
            r#"{"apiVersion":"scheduling.x-k8s.io/v1alpha1","kind":"PodGroup",
                "metadata":{"name":"train-job-7","namespace":"ml"},
                "spec":{"minMember":4,"scheduleTimeoutSeconds":30,"minResources":{"nvidia.com/gpu":"4"}},
                "status":{"phase":"Pending","running":1}}"#,
        )
        .unwrap();
        assert_eq!(pg.spec.min_member, 4);
        assert_eq!(pg.spec.timeout_ms(), 30_000);
        assert_eq!(pg.status.as_ref().map(|s| s.running), Some(1));
        assert_eq!(PodGroup::api_version(&()), "scheduling.x-k8s.io/v1alpha1");
    }

    #[test]
    fn podgroup_without_timeout_uses_sixty_seconds() {
        let spec = PodGroupSpec { min_member: 2, ..Default::default() };
        assert_eq!(spec.timeout_ms(), 60_000);
        let spec = PodGroupSpec { min_member: 2, schedule_timeout_seconds: Some(-5), ..Default::default() };
        assert_eq!(spec.timeout_ms(), 60_000);
    }

    #[test]
    fn podgroup_is_namespaced() {
        assert_eq!(PodGroup::crd().spec.scope, "Namespaced");
    }
}
