//! PodGroup status, as the scheduler-plugins coscheduling plugin writes it: `phase`,
//! `scheduled`, `running`, `succeeded`, `failed` and `scheduleStartTime`, for the PodGroups
//! whose members tessera schedules. Tools built for scheduler-plugins (Kueue, dashboards,
//! `kubectl get podgroups`) read these fields.
//!
//! After every rebuild the leader works out each group's status from its member pods and
//! queues a status write when it differs from what the object shows; the annotation writer
//! task performs the writes ([`Scheduler::write_reservations`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use tessera_api::podgroup::{POD_GROUP_LABEL, PodGroup, PodGroupStatus, phase};

use crate::state::Scheduler;

/// Counts of a group's member pods.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Members {
    pub total: i32,
    pub scheduled: i32,
    pub running: i32,
    pub succeeded: i32,
    pub failed: i32,
}

/// Counts the members of each group, by `namespace/name`.
pub fn members(pods: &[Arc<Pod>]) -> BTreeMap<String, Members> {
    let mut out: BTreeMap<String, Members> = BTreeMap::new();
    for p in pods {
        if p.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let Some(group) = p.metadata.labels.as_ref().and_then(|l| l.get(POD_GROUP_LABEL)) else { continue };
        let ns = p.metadata.namespace.as_deref().unwrap_or("default");
        let m = out.entry(format!("{ns}/{group}")).or_default();
        m.total += 1;
        if p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some() {
            m.scheduled += 1;
        }
        match p.status.as_ref().and_then(|s| s.phase.as_deref()) {
            Some("Running") => m.running += 1,
            Some("Succeeded") => m.succeeded += 1,
            Some("Failed") => m.failed += 1,
            _ => {}
        }
    }
    out
}

/// The status a group should show: `planned` when tessera holds a plan for it now.
pub fn status_of(
    min_member: i32,
    m: Members,
    planned: bool,
    current: Option<&PodGroupStatus>,
    now: &str,
) -> PodGroupStatus {
    let min = min_member.max(1);
    let phase = if m.failed > 0 {
        phase::FAILED
    } else if m.succeeded >= min {
        phase::FINISHED
    } else if m.running >= min || (m.running > 0 && m.running + m.succeeded >= min) {
        phase::RUNNING
    } else if m.scheduled >= min {
        phase::SCHEDULED
    } else if planned {
        phase::SCHEDULING
    } else {
        phase::PENDING
    };
    PodGroupStatus {
        phase: Some(phase.to_owned()),
        occupied_by: current.and_then(|c| c.occupied_by.clone()),
        scheduled: m.scheduled,
        running: m.running,
        succeeded: m.succeeded,
        failed: m.failed,
        schedule_start_time: current
            .and_then(|c| c.schedule_start_time.clone())
            .or_else(|| (m.total > 0).then(|| now.to_owned())),
    }
}

/// A PodGroup status write: namespace, name, status.
pub(crate) type GroupWrite = (String, String, PodGroupStatus);

/// PodGroup status writes waiting for the writer, and the last status queued per group (so a
/// status is queued once, not at every rebuild until the watch shows it).
#[derive(Debug, Default)]
pub(crate) struct GroupWrites {
    pending: Vec<GroupWrite>,
    written: HashMap<String, PodGroupStatus>,
}

impl GroupWrites {
    /// Queues `want` for the group unless the object shows it or it was queued already.
    /// Returns whether it was queued.
    pub(crate) fn want(
        &mut self,
        ns: &str,
        name: &str,
        current: Option<&PodGroupStatus>,
        want: PodGroupStatus,
    ) -> bool {
        let key = format!("{ns}/{name}");
        if current == Some(&want) || self.written.get(&key) == Some(&want) {
            return false;
        }
        self.written.insert(key, want.clone());
        self.pending.push((ns.to_owned(), name.to_owned(), want));
        true
    }

    /// The queued writes, in order; the queue is left empty.
    pub(crate) fn take(&mut self) -> Vec<GroupWrite> {
        std::mem::take(&mut self.pending)
    }

    /// A write failed: the status may be queued again.
    pub(crate) fn failed(&mut self, ns: &str, name: &str) {
        self.written.remove(&format!("{ns}/{name}"));
    }
}

impl Scheduler {
    /// Queues status writes for the PodGroups tessera schedules (a member was filtered by this
    /// replica, or holds devices here) whose status differs from what it should be.
    pub fn queue_pod_group_status(&self, groups: &[Arc<PodGroup>], pods: &[Arc<Pod>]) {
        if !self.is_leader() {
            return;
        }
        let counts = members(pods);
        let now = self.wall_at(self.now_ms()).to_string();
        let mut inner = self.lock();
        let mut queued = false;
        for g in groups {
            let (Some(ns), Some(name)) = (g.metadata.namespace.as_deref(), g.metadata.name.as_deref()) else {
                continue;
            };
            let key = format!("{ns}/{name}");
            let ours = inner.gangs.contains_key(&key)
                || inner.snap.allocations().values().any(|a| a.gang.as_deref() == Some(key.as_str()))
                || inner.seen_gang(&key);
            if !ours {
                continue;
            }
            let planned = inner.gangs.has_plan(&key);
            let m = counts.get(&key).copied().unwrap_or_default();
            let want = status_of(g.spec.min_member, m, planned, g.status.as_ref(), &now);
            queued |= inner.group_writes.want(ns, name, g.status.as_ref(), want);
        }
        drop(inner);
        if queued {
            self.writes_ready();
        }
    }

    /// Performs the queued PodGroup status writes; returns how many succeeded.
    pub async fn write_pod_group_status(&self) -> usize {
        let writes = self.lock().group_writes.take();
        if writes.is_empty() || !self.is_leader() {
            return 0;
        }
        let mut done = 0;
        for (ns, name, status) in writes {
            match self.binder().pod_group_status(&ns, &name, &status).await {
                Ok(()) => done += 1,
                Err(e) => {
                    self.lock().group_writes.failed(&ns, &name);
                    tracing::warn!(group = %format!("{ns}/{name}"), error = %e.chain(), "Writing PodGroup status failed");
                }
            }
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_follow_the_members_as_the_coscheduling_plugin_reports_them() {
        let m = |total, scheduled, running, succeeded, failed| Members { total, scheduled, running, succeeded, failed };
        let p = |min, members, planned| status_of(min, members, planned, None, "t").phase.unwrap();
        assert_eq!(p(3, m(2, 0, 0, 0, 0), false), "Pending");
        assert_eq!(p(3, m(3, 0, 0, 0, 0), true), "Scheduling");
        assert_eq!(p(3, m(3, 3, 0, 0, 0), false), "Scheduled");
        assert_eq!(p(3, m(3, 3, 3, 0, 0), false), "Running");
        assert_eq!(p(3, m(3, 3, 0, 3, 0), false), "Finished");
        assert_eq!(p(3, m(3, 3, 2, 0, 1), false), "Failed");
        let s = status_of(3, m(3, 3, 1, 0, 0), false, None, "2026-01-01T00:00:00Z");
        assert_eq!((s.scheduled, s.running, s.schedule_start_time.as_deref()), (3, 1, Some("2026-01-01T00:00:00Z")));
        let kept = status_of(3, m(3, 3, 3, 0, 0), false, Some(&s), "later");
        assert_eq!(kept.schedule_start_time.as_deref(), Some("2026-01-01T00:00:00Z"));
    }

    #[test]
    fn a_status_is_queued_once_and_again_after_a_failed_write() {
        let m = Members { total: 3, scheduled: 3, ..Members::default() };
        let want = status_of(3, m, false, None, "t");
        let mut w = GroupWrites::default();
        assert!(!w.want("ml", "g", Some(&want), want.clone()), "the object shows it already");
        assert!(w.want("ml", "g", None, want.clone()));
        assert!(!w.want("ml", "g", None, want.clone()), "queued already");
        assert_eq!(w.take().len(), 1);
        assert!(w.take().is_empty());
        w.failed("ml", "g");
        assert!(w.want("ml", "g", None, want));
    }
}
