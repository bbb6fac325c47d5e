//! Gang reservations that outlive the replica that planned them.
//!
//! A planned gang holds devices for members that have not bound yet. The plan lives in the
//! planning replica's memory; on its own, a restart or a leader change would forget it and plan
//! again (maybe elsewhere, maybe not at all once other pods took the devices). So the leader
//! writes each planned member's reservation onto the member pod (`tessera.dev/reservation`, a
//! [`Reservation`]) and removes it when the member binds or the plan is dropped; on every
//! rebuild of the cluster state, plans found complete and unexpired on pending pods are reserved
//! again (`restore`, from `Scheduler::restore_reservations`), with their original deadline.
//!
//! Writes go through an outbox drained by one task ([`writer`]), so filter and bind never
//! wait for the API server; only the leader writes. This module holds the annotation format, the
//! pure restore over a snapshot and the gang book, the outbox and the writer task; it never sees
//! the scheduler.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tessera_api::annotations::RESERVATION;
use tessera_api::pod as podparse;
use tessera_core::gang::GangPlan;
use tessera_core::{Demand, Grant, MigOp, NodeName, Placement, PodKey, Snapshot};

use crate::gangs::{GangBook, GangState};

/// One planned member's reservation, as written on the pod.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reservation {
    /// The gang, `namespace/name`.
    pub gang: String,
    pub node: NodeName,
    /// The exact devices, as the core names them.
    pub grants: Vec<Grant>,
    /// MIG steps the plan assumed on `node` (instances the bind will ask the node for).
    #[serde(default)]
    pub ops: Vec<MigOp>,
    /// When the reservation lapses, RFC 3339 (UTC).
    pub deadline: String,
    /// Members in the plan: it is restored only when every one of them carries its part.
    pub members: u32,
}

impl Reservation {
    pub fn to_annotation(&self) -> String {
        // Plain data: serialising it cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses and checks an annotation value.
    pub fn from_annotation(v: &str) -> Result<Self, String> {
        let r: Reservation = serde_json::from_str(v).map_err(|e| format!("{RESERVATION}: {e}"))?;
        r.deadline_at()?;
        if r.members == 0 {
            return Err(format!("{RESERVATION}: members must be positive"));
        }
        Ok(r)
    }

    pub fn deadline_at(&self) -> Result<Timestamp, String> {
        self.deadline.parse::<Timestamp>().map_err(|e| format!("{RESERVATION}: deadline {:?}: {e}", self.deadline))
    }

    fn placement(&self) -> Placement {
        Placement { node: self.node.clone(), grants: self.grants.clone(), ops: self.ops.clone(), score: 0.0 }
    }
}

/// A plan's identity: the gang and its deadline as annotated.
pub type PlanId = (String, String);
/// A plan's members: each pod and its reservation.
pub type Members = Vec<(Arc<Pod>, Reservation)>;

/// What the pods carry: whole plans to restore, and reservations to remove with the reason.
#[derive(Debug, Default)]
pub struct Found {
    /// Complete, unexpired plans by (gang, deadline): each member pod and its reservation.
    pub plans: BTreeMap<PlanId, Members>,
    /// Reservations that will never be used: expired, malformed, part of an incomplete plan, or
    /// on a pod that is no longer pending (`false` in the last place).
    pub stale: Vec<(PodKey, String, bool)>,
}

/// Reads the reservations of pending pods at `now`. Pure.
pub fn collect(pods: &[Arc<Pod>], now: Timestamp) -> Found {
    let mut found = Found::default();
    let mut groups: BTreeMap<PlanId, Members> = BTreeMap::new();
    for pod in pods {
        let Some(v) = pod.metadata.annotations.as_ref().and_then(|a| a.get(RESERVATION)) else { continue };
        let Ok(key) = podparse::pod_key(pod) else { continue };
        let bound = pod.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        if bound || matches!(phase, Some("Succeeded" | "Failed")) {
            found.stale.push((key, "the pod is bound or finished".into(), false));
            continue;
        }
        match Reservation::from_annotation(v) {
            Err(e) => found.stale.push((key, e, true)),
            Ok(r) => match r.deadline_at() {
                Ok(at) if at > now => {
                    groups.entry((r.gang.clone(), r.deadline.clone())).or_default().push((pod.clone(), r))
                }
                Ok(_) => found.stale.push((key, format!("the reservation lapsed at {}", r.deadline), true)),
                Err(e) => found.stale.push((key, e, true)),
            },
        }
    }
    for (id, members) in groups {
        let want = members.first().map_or(0, |(_, r)| r.members) as usize;
        if members.len() == want && members.iter().all(|(_, r)| r.members as usize == want) {
            found.plans.insert(id, members);
        } else {
            let why = format!("gang {}: {} of {want} members carry this plan", id.0, members.len());
            for (pod, _) in members {
                if let Ok(key) = podparse::pod_key(&pod) {
                    found.stale.push((key, why.clone(), true));
                }
            }
        }
    }
    found
}

/// Annotation writes waiting for the [`writer`]: the gang reservation (`Some` sets it, `None`
/// removes it) and the requeue nudge ([`tessera_api::annotations::REQUEUE`]).
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    /// Off (demo mode, tests without a writer): nothing is queued, so nothing piles up.
    enabled: bool,
    pending: Vec<(PodKey, &'static str, Option<String>)>,
}

impl Outbox {
    pub(crate) fn new(enabled: bool) -> Self {
        Self { enabled, pending: Vec::new() }
    }

    pub(crate) fn set(&mut self, pod: PodKey, r: &Reservation) {
        self.annotate(pod, RESERVATION, Some(r.to_annotation()));
    }

    pub(crate) fn clear(&mut self, pod: PodKey) {
        self.annotate(pod, RESERVATION, None);
    }

    pub(crate) fn annotate(&mut self, pod: PodKey, key: &'static str, value: Option<String>) {
        if self.enabled {
            self.pending.push((pod, key, value));
        }
    }

    /// Drops every queued write to `pod` (it was deleted: there is nothing left to write to).
    pub(crate) fn forget(&mut self, pod: &PodKey) {
        self.pending.retain(|(p, _, _)| p != pod);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// The writes in order, keeping only the last one per pod and key.
    pub(crate) fn take(&mut self) -> Vec<(PodKey, &'static str, Option<String>)> {
        let all = std::mem::take(&mut self.pending);
        let last: BTreeMap<(&PodKey, &str), usize> =
            all.iter().enumerate().map(|(i, (k, a, _))| ((k, *a), i)).collect();
        let keep: Vec<bool> = (0..all.len()).map(|i| last.get(&(&all[i].0, all[i].1)) == Some(&i)).collect();
        all.into_iter().zip(keep).filter_map(|(w, k)| k.then_some(w)).collect()
    }
}

/// A plan found on pods: the gang, its deadline as annotated, and each member's demand (read
/// through the PodGroup lookup) with its reservation.
pub(crate) type Carried = (String, String, Vec<(Demand, Reservation)>);

/// Reserves again in `snap` the complete, unexpired `plans` unless `gangs` already holds a plan
/// for the gang or dropped that very plan, and enters them in `gangs` as planned; queues in
/// `outbox` the removal of the `stale` reservations (pod, why, pending) and of plans that do not
/// fit. `now` is the wall-clock time, `now_ms` the same instant in the scheduler's clock.
/// Returns the gangs restored.
pub(crate) fn restore(
    plans: Vec<Carried>,
    stale: Vec<(PodKey, String, bool)>,
    snap: &mut Arc<Snapshot>,
    gangs: &mut GangBook,
    outbox: &mut Outbox,
    now: Timestamp,
    now_ms: u64,
) -> Vec<String> {
    let mut restored = Vec::new();
    for (pod, why, pending) in stale {
        // A pending pod of a plan this replica holds is left alone: its writes are in flight.
        let live = pending && (snap.allocation(&pod).is_some() || gangs.values().any(|st| st.planned(&pod)));
        if !live {
            tracing::info!(%pod, reason = %why, "Removing a gang reservation that will not be used");
            outbox.clear(pod);
        }
    }
    for (gang, deadline, members) in plans {
        let held = gangs.has_plan(&gang);
        let dropped = gangs.was_dropped(&gang, &deadline);
        let Some(gang_ref) = members.first().and_then(|(d, _)| d.gang.clone()) else { continue };
        if held || dropped || members.len() != members.first().map_or(0, |(_, r)| r.members as usize) {
            continue;
        }
        if members.iter().any(|(d, _)| snap.allocation(&d.pod).is_some()) {
            continue;
        }
        let Some(left) = members.first().and_then(|(_, r)| r.deadline_at().ok()).map(|at| at.duration_since(now))
        else {
            continue;
        };
        // The annotation is pod data anyone who may edit the pod can write: it is trusted
        // only as far as a plan of this gang could go. It never outlives the gang's own
        // timeout, covers at least `minMember` pods, and each member's devices are what its
        // demand asks for on a node that may host it.
        let left_ms = u64::try_from(left.as_millis()).unwrap_or(0).min(gang_ref.timeout_ms);
        let deadline_ms = now_ms.saturating_add(left_ms);
        let snap = Arc::make_mut(snap);
        let cp = snap.checkpoint();
        let mut failed = (members.len() < gang_ref.min_member as usize)
            .then(|| format!("{} members planned, the gang needs {}", members.len(), gang_ref.min_member));
        for (d, r) in &members {
            if failed.is_some() {
                break;
            }
            let fits = match snap.node(&r.node) {
                Some(node) => tessera_core::placement::check_grants(node, d, &r.grants, &r.ops),
                None => Err(format!("node {} is unknown", r.node)),
            };
            if let Err(e) =
                fits.and_then(|()| r.placement().apply(snap, d, Some(deadline_ms)).map_err(|e| e.to_string()))
            {
                failed = Some(format!("pod {}: {e}", d.pod));
            }
        }
        if let Some(why) = failed {
            snap.rollback(cp);
            tracing::warn!(%gang, reason = %why, "A persisted gang plan does not fit its members or the cluster; dropped");
            for (d, _) in &members {
                outbox.clear(d.pod.clone());
            }
            gangs.remember_dropped(gang, deadline, deadline_ms);
            continue;
        }
        let plan = GangPlan {
            gang: gang.clone(),
            members: members.iter().map(|(d, r)| (d.pod.clone(), r.placement())).collect(),
            deadline_ms,
        };
        let mut st = GangState::new(&gang_ref);
        st.members = members.iter().map(|(d, _)| (d.pod.clone(), (d.clone(), now_ms))).collect();
        st.planned_with(plan, Some(deadline));
        gangs.insert(gang.clone(), st);
        tracing::info!(%gang, members = members.len(), "Gang reservation restored from its members' annotations");
        restored.push(gang);
    }
    restored
}

/// A deadline as written in the annotation: RFC 3339, UTC, whole milliseconds.
pub(crate) fn deadline_text(t: Timestamp) -> String {
    Timestamp::from_millisecond(t.as_millisecond()).unwrap_or(t).to_string()
}

/// What the [`writer`] drains: a signal that something is queued, and one round of writes.
pub trait Drain: Send + Sync + 'static {
    /// Resolves when something is queued.
    fn wait(&self) -> impl Future<Output = ()> + Send;
    /// Performs what is queued.
    fn drain(&self) -> impl Future<Output = ()> + Send;
}

/// Drains the outbox whenever something is queued (and at least every second).
pub async fn writer<D: Drain>(queue: Arc<D>) {
    loop {
        tokio::select! {
            () = queue.wait() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        queue.drain().await;
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn reservation(gang: &str, deadline: &str, members: u32) -> Reservation {
        Reservation {
            gang: gang.into(),
            node: NodeName("n1".into()),
            grants: vec![Grant::Whole { gpu: 1 }],
            ops: Vec::new(),
            deadline: deadline.into(),
            members,
        }
    }

    fn pod(name: &str, r: Option<&Reservation>, node: Option<&str>) -> Arc<Pod> {
        let annotations = r.map(|r| [(RESERVATION.to_owned(), r.to_annotation())].into());
        Arc::new(Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ml".into()),
                annotations,
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::core::v1::PodSpec {
                node_name: node.map(str::to_owned),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    #[test]
    fn the_annotation_round_trips_and_bad_values_are_named() {
        let r = reservation("ml/train", "2026-11-22T13:00:00Z", 2);
        let v = r.to_annotation();
        assert!(v.contains("\"deadline\":\"2026-11-22T13:00:00Z\"") && v.contains("\"kind\":\"whole\""), "{v}");
        assert_eq!(Reservation::from_annotation(&v).unwrap(), r);
        let e = Reservation::from_annotation("{").unwrap_err();
        assert!(e.starts_with("tessera.dev/reservation:"), "{e}");
        let e = Reservation::from_annotation(&reservation("ml/t", "tomorrow", 2).to_annotation()).unwrap_err();
        assert!(e.contains("deadline \"tomorrow\""), "{e}");
        let e =
            Reservation::from_annotation(&reservation("ml/t", "2026-11-22T13:00:00Z", 0).to_annotation()).unwrap_err();
        assert!(e.contains("members must be positive"), "{e}");
    }

    #[test]
    fn only_complete_unexpired_plans_of_pending_pods_are_collected() {
        let now: Timestamp = "2026-11-22T12:00:00Z".parse().unwrap();
        let live = reservation("ml/a", "2026-11-22T12:01:00Z", 2);
        let lapsed = reservation("ml/b", "2026-11-22T11:59:59Z", 1);
        let partial = reservation("ml/c", "2026-11-22T12:01:00Z", 3);
        let pods = vec![
            pod("a0", Some(&live), None),
            pod("a1", Some(&live), None),
            pod("b0", Some(&lapsed), None),
            pod("c0", Some(&partial), None),
            pod("c1", Some(&partial), None),
            pod("d0", Some(&live), Some("n1")),
            pod("plain", None, None),
        ];
        let found = collect(&pods, now);
        assert_eq!(found.plans.len(), 1);
        let members = &found.plans[&("ml/a".to_owned(), "2026-11-22T12:01:00Z".to_owned())];
        assert_eq!(members.len(), 2);
        let stale: BTreeMap<String, String> = found.stale.into_iter().map(|(k, why, _)| (k.0, why)).collect();
        assert_eq!(stale.keys().map(String::as_str).collect::<Vec<_>>(), ["ml/b0", "ml/c0", "ml/c1", "ml/d0"]);
        assert!(stale["ml/b0"].contains("lapsed"), "{}", stale["ml/b0"]);
        assert!(stale["ml/c0"].contains("2 of 3 members"), "{}", stale["ml/c0"]);
        assert!(stale["ml/d0"].contains("bound"), "{}", stale["ml/d0"]);
    }

    #[test]
    fn the_outbox_keeps_the_last_write_per_pod_in_order() {
        let mut off = Outbox::default();
        off.set(PodKey::from("ml/a0"), &reservation("ml/a", "2026-11-22T12:01:00Z", 1));
        assert!(off.is_empty());
        let mut o = Outbox::new(true);
        let r = reservation("ml/a", "2026-11-22T12:01:00Z", 1);
        o.set(PodKey::from("ml/a0"), &r);
        o.set(PodKey::from("ml/a1"), &r);
        o.clear(PodKey::from("ml/a0"));
        let w = o.take();
        assert_eq!(w.len(), 2);
        assert_eq!((w[0].0.0.as_str(), w[0].2.is_some()), ("ml/a1", true));
        assert_eq!((w[1].0.0.as_str(), w[1].2.is_none()), ("ml/a0", true));
        assert!(o.is_empty());
        // A deleted pod's queued writes are dropped, others kept.
        o.set(PodKey::from("ml/a0"), &r);
        o.annotate(PodKey::from("ml/a1"), tessera_api::annotations::REQUEUE, Some("t".into()));
        o.forget(&PodKey::from("ml/a0"));
        let w = o.take();
        assert_eq!(w.len(), 1);
        assert_eq!((w[0].0.0.as_str(), w[0].1), ("ml/a1", tessera_api::annotations::REQUEUE));
    }
}
