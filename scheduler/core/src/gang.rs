//! Gang scheduling: all members placed in one transaction, or none.
//!
//! A plan reserves every member's devices at once (allocations carrying a deadline) so other
//! pods see them as taken; nothing is reserved for a gang that does not fit as a whole, so a
//! waiting gang never hoards GPUs. Members are placed largest first, each preferring nodes the
//! gang already uses, so the gang lands on as few nodes (and, through the placement core's
//! topology-aware candidates, NVLink islands) as the cluster allows.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::cluster::{PodKey, Snapshot};
use crate::demand::{Demand, GpuDemand};
use crate::placement::{Candidate, Placement, Rejection};
use crate::policy::{Context, Policy, Score, choose, evaluate, summarize};

/// Default reservation lifetime when a gang names none (`scheduleTimeoutSeconds` default 60 s).
pub const DEFAULT_TIMEOUT_MS: u64 = 60_000;

/// A gang's reserved placements.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GangPlan {
    pub gang: String,
    pub members: Vec<(PodKey, Placement)>,
    /// The reservation lapses at this time (caller's clock, ms).
    pub deadline_ms: u64,
}

/// Wraps a policy so members prefer nodes the gang already occupies.
#[derive(Debug)]
struct Cohesive<'a> {
    inner: &'a dyn Policy,
    nodes: BTreeSet<usize>,
}

/// Larger than any policy's spread of node scores, so co-location decides first.
const TOGETHER: f64 = 1e12;

impl Policy for Cohesive<'_> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn score(&self, snap: &Snapshot, d: &Demand, c: &Candidate, ctx: &Context<'_>) -> Score {
        let s = self.inner.score(snap, d, c, ctx);
        let bonus = if self.nodes.contains(&c.node) { TOGETHER } else { 0.0 };
        Score::new(s.node + bonus, s.device)
    }
    fn score_node(&self, snap: &Snapshot, d: &Demand, cands: &[Candidate], ctx: &Context<'_>, out: &mut Vec<Score>) {
        let start = out.len();
        self.inner.score_node(snap, d, cands, ctx, out);
        if cands.first().is_some_and(|c| self.nodes.contains(&c.node)) {
            for s in &mut out[start..] {
                s.node += TOGETHER;
            }
        }
    }
}

/// How much GPU a member asks for, to place the largest first.
fn weight(d: &Demand) -> u64 {
    match &d.gpu {
        GpuDemand::None => 0,
        GpuDemand::Whole { count } => u64::from(*count) * 1000,
        GpuDemand::Share { milli } => u64::from(*milli),
        GpuDemand::Mig { profile } => {
            crate::mig::profile_named(profile).map_or(1, |p| u64::from(p.compute_slices)) * 1000 / 7
        }
        GpuDemand::Model { memory_mib, .. } => *memory_mib / 100,
    }
}

/// Plans and reserves a whole gang, or changes nothing and explains the bottleneck.
pub fn plan_gang(
    snap: &mut Snapshot,
    members: &[Demand],
    policy: &dyn Policy,
    ctx: &Context<'_>,
    now_ms: u64,
) -> Result<GangPlan, Rejection> {
    plan_gang_avoiding(snap, members, policy, ctx, now_ms, &|_, _| None)
}

/// [`plan_gang`], keeping each member off the nodes `refused(member, node)` names a reason for
/// (nodes the caller learned kube-scheduler will not accept for that member).
pub fn plan_gang_avoiding(
    snap: &mut Snapshot,
    members: &[Demand],
    policy: &dyn Policy,
    ctx: &Context<'_>,
    now_ms: u64,
    refused: &dyn Fn(&PodKey, &crate::cluster::NodeName) -> Option<String>,
) -> Result<GangPlan, Rejection> {
    let Some(first) = members.first() else {
        return Err(Rejection::unresolvable("gang has no members"));
    };
    let gang = first.gang.as_ref().map_or_else(|| first.pod.0.clone(), |g| g.name.clone());
    let min_member = first.gang.as_ref().map_or(1, |g| g.min_member) as usize;
    let timeout_ms = first.gang.as_ref().map_or(DEFAULT_TIMEOUT_MS, |g| g.timeout_ms);
    for m in members {
        if m.gang.as_ref().map(|g| g.name.as_str()) != first.gang.as_ref().map(|g| g.name.as_str()) {
            return Err(Rejection::unresolvable(format!("pod {} is not a member of gang {gang}", m.pod)));
        }
        m.validate().map_err(|e| Rejection::unresolvable(e.to_string()))?;
        if snap.allocation(&m.pod).is_some() {
            return Err(Rejection::unresolvable(format!("gang {gang}: pod {} already holds an allocation", m.pod)));
        }
    }
    if members.len() < min_member {
        return Err(Rejection::unschedulable(format!(
            "gang {gang}: {} of {min_member} members exist; waiting for the rest",
            members.len()
        )));
    }
    let deadline_ms = now_ms.saturating_add(timeout_ms);
    let mut order: Vec<&Demand> = members.iter().collect();
    order.sort_by(|a, b| weight(b).cmp(&weight(a)).then_with(|| a.pod.cmp(&b.pod)));

    let cp = snap.checkpoint();
    let mut planned = Vec::with_capacity(order.len());
    let mut cohesive = Cohesive { inner: policy, nodes: BTreeSet::new() };
    for (i, d) in order.iter().enumerate() {
        let mut verdicts = match evaluate(snap, d, &cohesive, ctx, None) {
            Ok(v) => v,
            Err(e) => {
                snap.rollback(cp);
                return Err(Rejection::unresolvable(e.to_string()));
            }
        };
        for v in &mut verdicts {
            if v.outcome.is_ok()
                && let Some(why) = refused(&d.pod, &v.node)
            {
                v.outcome = Err(Rejection::unschedulable(why).at_node(v.node.clone()));
            }
        }
        let Some(best) = choose(&verdicts, ctx) else {
            let why = summarize(d, &verdicts);
            snap.rollback(cp);
            return Err(bottleneck(&gang, i, order.len(), d, why));
        };
        let Ok((cand, score)) = &best.outcome else {
            snap.rollback(cp);
            return Err(Rejection::unschedulable(format!("gang {gang}: no verdict for {}", d.pod)));
        };
        let placement = Placement {
            node: best.node.clone(),
            grants: cand.grants.to_vec(),
            ops: cand.ops.clone(),
            score: score.node - if cohesive.nodes.contains(&cand.node) { TOGETHER } else { 0.0 },
        };
        if let Err(e) = placement.apply(snap, d, Some(deadline_ms)) {
            snap.rollback(cp);
            return Err(Rejection::unschedulable(format!("gang {gang}: {e}")));
        }
        cohesive.nodes.insert(cand.node);
        planned.push((d.pod.clone(), placement));
    }
    snap.commit(cp);
    Ok(GangPlan { gang, members: planned, deadline_ms })
}

/// One rejection naming the member that did not fit and why.
fn bottleneck(gang: &str, placed: usize, total: usize, d: &Demand, why: Rejection) -> Rejection {
    let msg = format!(
        "gang {gang}: member {} ({}) does not fit after {placed} of {total} members were placed: {why}",
        d.pod, d.gpu
    );
    if why.is_unresolvable() { Rejection::unresolvable(msg) } else { Rejection::unschedulable(msg) }
}

/// Marks a reserved member as bound: its allocation no longer lapses.
pub fn bind(snap: &mut Snapshot, pod: &PodKey) -> crate::Result<()> {
    snap.confirm(pod)
}

/// Releases every reservation whose deadline has passed, whole gangs at a time: when one
/// member lapses, every still-reserved member of its gang is released with it.
pub fn expire(snap: &mut Snapshot, now_ms: u64) -> Vec<PodKey> {
    let lapsed: BTreeSet<String> = snap
        .allocations()
        .values()
        .filter(|a| a.reserved_until_ms.is_some_and(|t| t <= now_ms))
        .map(|a| a.gang.clone().unwrap_or_else(|| a.pod.0.clone()))
        .collect();
    let victims: Vec<PodKey> = snap
        .allocations()
        .values()
        .filter(|a| a.reserved_until_ms.is_some())
        .filter(|a| lapsed.contains(a.gang.as_ref().unwrap_or(&a.pod.0)))
        .map(|a| a.pod.clone())
        .collect();
    for p in &victims {
        // Listed from the snapshot just above, so the release cannot miss.
        let _ = snap.release(p);
    }
    victims
}

/// Releases every allocation (reserved or bound) of a gang; returns the pods released.
pub fn release_gang(snap: &mut Snapshot, gang: &str) -> Vec<PodKey> {
    let pods: Vec<PodKey> =
        snap.allocations().values().filter(|a| a.gang.as_deref() == Some(gang)).map(|a| a.pod.clone()).collect();
    for p in &pods {
        let _ = snap.release(p);
    }
    pods
}

/// A unit that can be preempted: a whole gang or a single pod.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Unit {
    pods: Vec<PodKey>,
    priority: i32,
    gpu_milli: u64,
}

/// The smallest set of lower-priority victims (whole gangs or single pods, never part of a
/// gang) whose eviction lets `members` (one pod, or a gang) fit; `None` when no such set exists.
///
/// Greedy: add units from lowest priority and smallest size until the demand fits, then drop
/// every unit that is not needed (an irreducible set, not always the global minimum).
pub fn preemption_victims(
    snap: &Snapshot,
    members: &[Demand],
    policy: &dyn Policy,
    ctx: &Context<'_>,
) -> Option<Vec<PodKey>> {
    let priority = members.iter().map(|m| m.priority).max()?;
    let mut units: BTreeMap<String, Unit> = BTreeMap::new();
    let mut reserved: BTreeSet<String> = BTreeSet::new();
    for a in snap.allocations().values() {
        let key = a.gang.clone().map_or_else(|| format!("pod:{}", a.pod), |g| format!("gang:{g}"));
        // A reservation is a pod that does not run yet: nothing to evict, and its gang is not
        // a whole unit until every member runs.
        if a.reserved_until_ms.is_some() {
            reserved.insert(key.clone());
        }
        let u = units.entry(key).or_insert(Unit { pods: Vec::new(), priority: i32::MIN, gpu_milli: 0 });
        u.pods.push(a.pod.clone());
        u.priority = u.priority.max(a.priority);
        u.gpu_milli += a.grants.len() as u64 * 1000;
    }
    let mut candidates: Vec<Unit> =
        units.into_iter().filter(|(k, u)| u.priority < priority && !reserved.contains(k)).map(|(_, u)| u).collect();
    candidates
        .sort_by(|a, b| a.priority.cmp(&b.priority).then(a.gpu_milli.cmp(&b.gpu_milli)).then(a.pods.cmp(&b.pods)));

    let fits = |chosen: &[&Unit]| -> bool {
        let mut trial = snap.clone();
        for u in chosen {
            for p in &u.pods {
                let _ = trial.release(p);
            }
        }
        plan_members(&mut trial, members, policy, ctx)
    };
    if fits(&[]) {
        return Some(Vec::new());
    }
    let mut chosen: Vec<&Unit> = Vec::new();
    let mut found = false;
    for u in &candidates {
        chosen.push(u);
        if fits(&chosen) {
            found = true;
            break;
        }
    }
    if !found {
        return None;
    }
    // Drop units that are not needed, latest-added (highest priority) first.
    let mut i = chosen.len();
    while i > 0 {
        i -= 1;
        let mut without = chosen.clone();
        without.remove(i);
        if fits(&without) {
            chosen = without;
        }
    }
    let mut pods: Vec<PodKey> = chosen.iter().flat_map(|u| u.pods.iter().cloned()).collect();
    pods.sort();
    Some(pods)
}

fn plan_members(trial: &mut Snapshot, members: &[Demand], policy: &dyn Policy, ctx: &Context<'_>) -> bool {
    if members.len() == 1 && members[0].gang.is_none() {
        return crate::policy::place(trial, &members[0], policy, ctx).is_ok();
    }
    plan_gang(trial, members, policy, ctx, 0).is_ok()
}

#[cfg(test)]
mod tests;
