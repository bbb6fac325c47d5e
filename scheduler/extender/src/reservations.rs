//! Gang reservations that outlive the replica that planned them.
//!
//! A planned gang holds devices for members that have not bound yet. The plan lives in the
//! planning replica's memory; on its own, a restart or a leader change would forget it and plan
//! again (maybe elsewhere, maybe not at all once other pods took the devices). So the leader
//! writes each planned member's reservation onto the member pod (`tessera.dev/reservation`, a
//! [`Reservation`]) and removes it when the member binds or the plan is dropped; on every
//! rebuild of the cluster state, plans found complete and unexpired on pending pods are reserved
//! again ([`Scheduler::restore_reservations`]), with their original deadline.
//!
//! Writes go through an outbox drained by one task ([`writer`]), so filter and bind never wait
//! for the API server; only the leader writes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use tessera_api::annotations::RESERVATION;
use tessera_api::pod as podparse;
use tessera_core::gang::GangPlan;
use tessera_core::{Grant, MigOp, NodeName, Placement, PodKey};

use crate::gangs::GangState;
use crate::state::Scheduler;

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
    fn take(&mut self) -> Vec<(PodKey, &'static str, Option<String>)> {
        let all = std::mem::take(&mut self.pending);
        let last: BTreeMap<(&PodKey, &str), usize> =
            all.iter().enumerate().map(|(i, (k, a, _))| ((k, *a), i)).collect();
        let keep: Vec<bool> = (0..all.len()).map(|i| last.get(&(&all[i].0, all[i].1)) == Some(&i)).collect();
        all.into_iter().zip(keep).filter_map(|(w, k)| k.then_some(w)).collect()
    }
}

impl Scheduler {
    /// The wall-clock time of a [`Scheduler::now_ms`] instant.
    pub fn wall_at(&self, ms: u64) -> Timestamp {
        let ahead = SignedDuration::from_millis(i64::try_from(ms).unwrap_or(i64::MAX));
        self.origin_wall().checked_add(ahead).unwrap_or(Timestamp::MAX)
    }

    /// The reservation annotation of a plan member.
    pub(crate) fn reservation_of(&self, plan: &GangPlan, placement: &Placement) -> Reservation {
        Reservation {
            gang: plan.gang.clone(),
            node: placement.node.clone(),
            grants: placement.grants.clone(),
            ops: placement.ops.clone(),
            deadline: deadline_text(self.wall_at(plan.deadline_ms)),
            members: u32::try_from(plan.members.len()).unwrap_or(u32::MAX),
        }
    }

    /// Reserves again the complete, unexpired gang plans that pending pods carry, unless this
    /// replica already holds a plan for the gang or dropped that very plan; queues the removal
    /// of reservations that will never be used. Returns the gangs restored.
    pub fn restore_reservations(&self, pods: &[Arc<Pod>]) -> Vec<String> {
        self.restore_reservations_at(pods, Timestamp::now())
    }

    /// [`Scheduler::restore_reservations`] at wall-clock `now`.
    pub fn restore_reservations_at(&self, pods: &[Arc<Pod>], now: Timestamp) -> Vec<String> {
        let found = collect(pods, now);
        if found.plans.is_empty() && found.stale.is_empty() {
            return Vec::new();
        }
        // Demands first: the PodGroup lookup takes its own locks.
        let mut plans = Vec::new();
        let mut stale = found.stale;
        'plans: for ((gang, deadline), members) in found.plans {
            let mut with_demand = Vec::new();
            for (pod, r) in members {
                let Ok(key) = podparse::pod_key(&pod) else { continue 'plans };
                match self.demand_of(&pod) {
                    Ok(d) if d.gang.as_ref().is_some_and(|g| g.name == gang) => with_demand.push((d, r)),
                    Ok(_) => stale.push((key, format!("the pod is no longer a member of gang {gang}"), true)),
                    Err(e) => stale.push((key, e.to_string(), true)),
                }
            }
            plans.push((gang, deadline, with_demand));
        }
        let now_ms = self.now_ms();
        let mut restored = Vec::new();
        let mut inner = self.lock();
        for (pod, why, pending) in stale {
            // A pending pod of a plan this replica holds is left alone: its writes are in flight.
            let live =
                pending && (inner.snap.allocation(&pod).is_some() || inner.gangs.values().any(|st| st.planned(&pod)));
            if !live {
                tracing::info!(%pod, reason = %why, "Removing a gang reservation that will not be used");
                inner.outbox.clear(pod);
            }
        }
        for (gang, deadline, members) in plans {
            let held = inner.gangs.has_plan(&gang);
            let dropped = inner.gangs.was_dropped(&gang, &deadline);
            let Some(gang_ref) = members.first().and_then(|(d, _)| d.gang.clone()) else { continue };
            if held || dropped || members.len() != members.first().map_or(0, |(_, r)| r.members as usize) {
                continue;
            }
            if members.iter().any(|(d, _)| inner.snap.allocation(&d.pod).is_some()) {
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
            let snap = Arc::make_mut(&mut inner.snap);
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
                    inner.outbox.clear(d.pod.clone());
                }
                inner.gangs.remember_dropped(gang, deadline, deadline_ms);
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
            inner.gangs.insert(gang.clone(), st);
            inner.generation += 1;
            tracing::info!(%gang, members = members.len(), "Gang reservation restored from its members' annotations");
            restored.push(gang);
        }
        let has_writes = !inner.outbox.is_empty();
        drop(inner);
        if has_writes {
            self.writes_ready();
        }
        restored
    }

    /// Performs the queued annotation writes; returns how many succeeded. A follower drops them:
    /// only the leader writes (it is the one that plans and binds).
    pub async fn write_reservations(&self) -> usize {
        let writes = self.lock().outbox.take();
        if writes.is_empty() || !self.is_leader() {
            return 0;
        }
        let mut done = 0;
        for (pod, key, value) in writes {
            // A pod deleted while its write waited: nothing to write to.
            if self.is_deleted(&pod) {
                continue;
            }
            match self.binder().annotate(&pod, key, value.as_deref()).await {
                Ok(()) => done += 1,
                // A lost write costs only the plan's survival across a restart (or one early
                // retry), never a bind.
                Err(e) => tracing::warn!(%pod, annotation = key, error = %e.chain(), "Writing a pod annotation failed"),
            }
        }
        done
    }
}

/// A deadline as written in the annotation: RFC 3339, UTC, whole milliseconds.
fn deadline_text(t: Timestamp) -> String {
    Timestamp::from_millisecond(t.as_millisecond()).unwrap_or(t).to_string()
}

/// Drains the outbox whenever something is queued (and at least every second).
pub async fn writer(scheduler: Arc<Scheduler>) {
    loop {
        tokio::select! {
            () = scheduler.writes_wait() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        scheduler.write_reservations().await;
        scheduler.write_pod_group_status().await;
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
