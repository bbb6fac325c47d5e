//! The one placement driver of the openb replay, the scenarios and the what-if: a [`Unit`] (a pod
//! or a whole gang) goes through the core entry points the extender uses
//! ([`tessera_core::policy::place`], or its memoised twin, and
//! [`tessera_core::gang::plan_gang`]) and, when placed, is recorded in the snapshot; and the
//! [`EventQueue`] of arrivals and departures that scenarios with churn run on.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use anyhow::{Context as _, Result, bail};
use tessera_core::gang::plan_gang;
use tessera_core::policy::{Context, Memo, Policy, Workload, place, place_memo};
use tessera_core::{Demand, Placement, Rejection, Snapshot};

/// What to place: one pod, or a whole gang.
#[derive(Debug, Clone)]
pub enum Unit {
    Pod(Demand),
    Gang { name: String, members: Vec<Demand> },
}

impl Unit {
    /// The pods of the unit, in the order given.
    pub fn demands(&self) -> &[Demand] {
        match self {
            Unit::Pod(d) => std::slice::from_ref(d),
            Unit::Gang { members, .. } => members,
        }
    }
}

/// A unit's fate.
#[derive(Debug)]
pub enum Decision {
    /// One placement per pod of the unit, in its order, already recorded in the snapshot.
    Placed(Vec<Placement>),
    /// The core found no place.
    Refused(Rejection),
    /// The core found a place, but it needs MIG changes, which a fixed layout forbids; nothing
    /// was recorded.
    NeedsReconfig,
}

/// Places units with one policy and context.
#[derive(Debug)]
pub struct Driver<'a> {
    policy: &'a dyn Policy,
    ctx: Context<'a>,
    /// `Some`: pods go through `place_memo` (same choices, faster on long runs).
    memo: Option<Memo>,
    fixed_layout: bool,
}

impl<'a> Driver<'a> {
    /// Pods go through `place`, which explains a refusal node by node as the extender does.
    pub fn new(policy: &'a dyn Policy, ctx: Context<'a>) -> Self {
        Self { policy, ctx, memo: None, fixed_layout: false }
    }

    /// Pods go through `place_memo`, which reuses node evaluations across pods of one shape.
    pub fn memoized(mut self) -> Self {
        self.memo = Some(Memo::new());
        self
    }

    /// Refuse placements that change MIG layouts (the static baseline never reconfigures).
    pub fn fixed_layout(mut self) -> Self {
        self.fixed_layout = true;
        self
    }

    pub fn place(&mut self, snap: &mut Snapshot, unit: &Unit) -> Result<Decision> {
        match unit {
            Unit::Pod(d) => self.place_pod(snap, d),
            Unit::Gang { members, .. } => self.place_gang(snap, members),
        }
    }

    pub fn place_pod(&mut self, snap: &mut Snapshot, d: &Demand) -> Result<Decision> {
        let ctx = self.ctx;
        self.place_pod_in(snap, d, &ctx)
    }

    /// Like [`Driver::place_pod`], with `workload` as the expected workload for this decision
    /// (a workload learnt from recent demand, as the extender's is).
    pub fn place_pod_under(&mut self, snap: &mut Snapshot, d: &Demand, workload: &Workload) -> Result<Decision> {
        let ctx = Context { workload, seed: self.ctx.seed };
        self.place_pod_in(snap, d, &ctx)
    }

    fn place_pod_in(&mut self, snap: &mut Snapshot, d: &Demand, ctx: &Context<'_>) -> Result<Decision> {
        let found = match &mut self.memo {
            Some(memo) => place_memo(snap, d, self.policy, ctx, memo),
            None => place(snap, d, self.policy, ctx),
        };
        Ok(match found {
            Ok(p) if self.fixed_layout && !p.ops.is_empty() => Decision::NeedsReconfig,
            Ok(p) => {
                p.apply(snap, d, None).with_context(|| format!("recording pod {}", d.pod))?;
                Decision::Placed(vec![p])
            }
            Err(r) => Decision::Refused(r),
        })
    }

    /// All members at once, or none (a refused plan leaves the snapshot as it was).
    pub fn place_gang(&mut self, snap: &mut Snapshot, members: &[Demand]) -> Result<Decision> {
        let cp = snap.checkpoint();
        let plan = match plan_gang(snap, members, self.policy, &self.ctx, 0) {
            Ok(plan) if self.fixed_layout && plan.members.iter().any(|(_, p)| !p.ops.is_empty()) => {
                snap.rollback(cp);
                return Ok(Decision::NeedsReconfig);
            }
            Ok(plan) => plan,
            Err(r) => {
                snap.rollback(cp);
                return Ok(Decision::Refused(r));
            }
        };
        snap.commit(cp);
        let mut by_pod: BTreeMap<_, _> = plan.members.into_iter().collect();
        let mut placed = Vec::with_capacity(members.len());
        for d in members {
            let Some(p) = by_pod.remove(&d.pod) else {
                bail!("gang plan left out pod {}", d.pod);
            };
            placed.push(p);
        }
        Ok(Decision::Placed(placed))
    }
}

/// A pod's arrival or departure; the number indexes the caller's arrivals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Arrive(usize),
    Depart(usize),
}

/// Arrivals at their times, and the departures scheduled as pods are placed, in time order.
/// Departures at the same millisecond go before arrivals, so freed devices are reusable.
#[derive(Debug, Default)]
pub struct EventQueue {
    heap: BinaryHeap<Reverse<(u64, u8, usize)>>,
}

const DEPART: u8 = 0;
const ARRIVE: u8 = 1;

impl EventQueue {
    /// Arrival `i` at `times[i]` (ms).
    pub fn arrivals(times: impl IntoIterator<Item = u64>) -> Self {
        Self { heap: times.into_iter().enumerate().map(|(i, t)| Reverse((t, ARRIVE, i))).collect() }
    }

    /// Arrival `i` leaves at `at_ms`.
    pub fn depart(&mut self, at_ms: u64, i: usize) {
        self.heap.push(Reverse((at_ms, DEPART, i)));
    }

    /// The next event and its time (ms).
    pub fn pop(&mut self) -> Option<(u64, Event)> {
        let Reverse((t, kind, i)) = self.heap.pop()?;
        Some((t, if kind == ARRIVE { Event::Arrive(i) } else { Event::Depart(i) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn departures_at_an_instant_go_before_arrivals_then_by_index() {
        let mut q = EventQueue::arrivals([5, 3, 5]);
        q.depart(5, 1);
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(
            order,
            vec![(3, Event::Arrive(1)), (5, Event::Depart(1)), (5, Event::Arrive(0)), (5, Event::Arrive(2))]
        );
    }
}
