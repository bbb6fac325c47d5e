//! The scheduler-plugins `PodGroup` (`podgroups.scheduling.x-k8s.io`, v1alpha1): the standard way
//! to declare a gang. tessera reads the spec and writes the status (`phase`, `scheduled`,
//! `running`, ...) as the coscheduling plugin does, so tools that read it (Kueue, dashboards)
//! see the gang's progress. `manifests/crds/podgroups.scheduling.x-k8s.io.yaml` is generated
//! from these types.

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
#[schemars(transform = crate::gpunode::kubernetes_formats)]
pub struct PodGroupSpec {
    /// Members that must be schedulable before any binds.
    #[serde(default)]
    pub min_member: i32,
    /// Resources the whole group needs, as quantities (informational for tessera).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "quantity_map")]
    pub min_resources: Option<BTreeMap<String, serde_json::Value>>,
    /// How long a planned gang may wait for all its members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_timeout_seconds: Option<i32>,
}

/// A map of resource names to quantities (`"4"`, `"80Gi"`, `2`), as Kubernetes writes
/// `ResourceList`.
fn quantity_map(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "nullable": true,
        "additionalProperties": {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "x-kubernetes-int-or-string": true,
            "pattern": "^(\\+|-)?(([0-9]+(\\.[0-9]*)?)|(\\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\\+|-)?(([0-9]+(\\.[0-9]*)?)|(\\.[0-9]+))))?$"
        }
    })
}

/// Phases of a PodGroup, as the coscheduling plugin names them.
pub mod phase {
    /// Fewer than `minMember` members exist, or the gang does not fit yet.
    pub const PENDING: &str = "Pending";
    /// The gang is planned: its devices are reserved and its members are being bound.
    pub const SCHEDULING: &str = "Scheduling";
    /// At least `minMember` members are bound to nodes.
    pub const SCHEDULED: &str = "Scheduled";
    /// At least `minMember` members run.
    pub const RUNNING: &str = "Running";
    /// At least `minMember` members finished successfully.
    pub const FINISHED: &str = "Finished";
    /// A member failed.
    pub const FAILED: &str = "Failed";
}

/// The group's progress, written by tessera-scheduler (the coscheduling plugin's fields).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::gpunode::kubernetes_formats)]
pub struct PodGroupStatus {
    /// `Pending`, `Scheduling`, `Scheduled`, `Running`, `Finished` or `Failed` ([`phase`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occupied_by: Option<String>,
    /// Members bound to a node (running or not).
    #[serde(default)]
    pub scheduled: i32,
    #[serde(default)]
    pub running: i32,
    #[serde(default)]
    pub succeeded: i32,
    #[serde(default)]
    pub failed: i32,
    /// When tessera first saw the group's members waiting (RFC 3339).
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

    const CRD_PATH: &str =
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../manifests/crds/podgroups.scheduling.x-k8s.io.yaml");

    #[test]
    fn podgroup_crd_manifest_equals_what_the_type_generates() {
        let want = format!(
            "# Generated from tessera-api's PodGroup type (the scheduler-plugins v1alpha1 fields); regenerate with\n# TESSERA_BLESS=1 cargo test -p tessera-api\n{}",
            serde_yaml::to_string(&PodGroup::crd()).unwrap()
        );
        if std::env::var_os("TESSERA_BLESS").is_some() {
            std::fs::write(CRD_PATH, &want).unwrap();
        }
        let have = std::fs::read_to_string(CRD_PATH).unwrap_or_default();
        assert!(
            have == want,
            "manifests/crds/podgroups.scheduling.x-k8s.io.yaml is missing or stale; run TESSERA_BLESS=1 cargo test -p tessera-api"
        );
    }

    #[test]
    fn podgroup_crd_has_the_status_fields_tools_read_and_known_formats_only() {
        let crd = serde_json::to_value(PodGroup::crd()).unwrap();
        let v = &crd["spec"]["versions"][0];
        assert!(v["subresources"]["status"].is_object(), "{v}");
        let status = &v["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"];
        for field in ["phase", "scheduled", "running", "succeeded", "failed", "scheduleStartTime", "occupiedBy"] {
            assert!(status[field].is_object(), "status.{field} missing: {status}");
        }
        let mut found = Vec::new();
        crate::gpunode::tests::formats(&crd, &mut found);
        assert!(found.iter().all(|f| f == "int32" || f == "int64"), "{found:?}");
    }
}
