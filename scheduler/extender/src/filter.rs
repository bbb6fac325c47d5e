//! The filter verb: which offered nodes can take the pod.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tessera_api::pod::{self as podparse};
use tessera_core::policy::{self, NodeVerdict, Workload};
use tessera_core::{Context, Demand, Grant, NodeName, Rejection, Snapshot};

use crate::error::Error;
use crate::request::{NodesRequest, Offered};
use crate::wire::{self, ExtenderArgs, ExtenderFilterResult, FailedNodesMap, NodeList};

use crate::bounded::{Refused, Seen};
use crate::state::{Inner, Scheduler};

/// Demands remembered for the expected workload.
pub(crate) const RECENT_DEMANDS: usize = 512;

/// How far a workload class's share may move before the workload is replaced.
pub(crate) const WORKLOAD_SHARE_DRIFT: f64 = 0.05;

/// Whether `fresh` differs from `current` by more than noise: another set of classes, or a
/// class whose share moved by more than [`WORKLOAD_SHARE_DRIFT`].
pub(crate) fn drifted(current: &Workload, fresh: &Workload) -> bool {
    if current.classes.len() != fresh.classes.len() {
        return true;
    }
    fresh.classes.iter().any(|f| {
        let same = |c: &&tessera_core::policy::WorkloadClass| {
            c.cpu_milli == f.cpu_milli && c.gpu == f.gpu && c.gpu_models == f.gpu_models
        };
        current.classes.iter().find(same).is_none_or(|c| (c.weight - f.weight).abs() > WORKLOAD_SHARE_DRIFT)
    })
}

impl Scheduler {
    pub fn filter(&self, args: ExtenderArgs) -> ExtenderFilterResult {
        self.filter_reply(args).into_result()
    }

    /// [`Self::filter_request`] from the wire arguments, an error answered in the reply.
    pub fn filter_reply(&self, args: ExtenderArgs) -> FilterReply {
        match NodesRequest::try_from(args).and_then(|r| self.filter_request(r)) {
            Ok(r) => r,
            Err(e) => {
                self.metrics.decision("filter", e.kind());
                FilterReply::error(e.chain())
            }
        }
    }

    /// The filter, answered as a [`FilterReply`] that serialises straight from the verdicts
    /// (the HTTP path: no per-node copies of names and reasons). An error is the request's
    /// (no pod name, no nodes), for the caller to answer and count.
    pub fn filter_request(&self, req: NodesRequest<'_>) -> Result<FilterReply, Error> {
        let names = req.offered.node_names()?;
        let pod = req.pod;
        let key = podparse::pod_key(&pod).map_err(|e| Error::BadRequest(e.to_string()))?;
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let demand = self.demand_of(&pod);
        let (plan, generation, queued) = {
            let mut inner = self.lock();
            if !uid.is_empty() {
                inner.uids.insert(uid.clone(), key.clone());
            }
            let plan = match &demand {
                Ok(d) => self.prepare(&mut inner, d, &names),
                Err(e) => {
                    let reason = format!("pod {key}: {e}");
                    let r = if e.is_permanent() {
                        Rejection::unresolvable(reason)
                    } else {
                        Rejection::unschedulable(reason)
                    };
                    Verdicts::Done(
                        names.iter().map(|n| NodeVerdict { node: n.clone(), outcome: Err(r.clone()) }).collect(),
                    )
                }
            };
            (plan, inner.generation, !inner.outbox.is_empty())
        };
        if queued {
            self.writes_ready();
        }
        // The expensive part runs without the lock, on the snapshot as it was.
        let verdicts = match (plan, &demand) {
            (Verdicts::Evaluate { snap, workload }, Ok(d)) => self.evaluate_offered(&snap, &workload, d, names),
            (Verdicts::Evaluate { .. }, Err(_)) => Vec::new(),
            (Verdicts::Done(v), _) => v,
        };
        let fits = verdicts.iter().any(|v| v.outcome.is_ok());
        let refused = Refused::of(&verdicts);
        if !fits
            && self.settings.preemption
            && crate::preemption::may_preempt(&pod)
            && let Ok(d) = &demand
            && !crate::preemption::kube_scheduler_preempts(d)
            && refused.for_capacity
        {
            self.queue_preemption(d);
        }
        let result = if fits { "fits" } else { "unschedulable" };
        self.metrics.decision("filter", if demand.is_err() { "invalid_pod" } else { result });
        let at_ms = self.now_ms();
        let verdicts = Arc::new(verdicts);
        let seen = Seen {
            uid,
            demand: demand.map_err(|e| e.to_string()),
            generation,
            at_ms,
            verdicts: verdicts.clone(),
            refused,
        };
        // Evicted entries hold a verdict per node: dropped after the lock is released, their
        // names kept for the next filter's.
        let evicted = self.lock().seen.insert(key, seen);
        for s in evicted {
            crate::request::recycle_names(s.verdicts);
        }
        let nodes = match req.offered {
            // Not nodeCacheCapable: answer with the Node objects that pass.
            Offered::Nodes(mut list) => {
                let pass: HashSet<&str> =
                    verdicts.iter().filter(|v| v.outcome.is_ok()).map(|v| v.node.0.as_str()).collect();
                list.items.retain(|n| n.metadata.name.as_deref().is_some_and(|name| pass.contains(name)));
                Some(list)
            }
            Offered::Names(_) => None,
        };
        Ok(FilterReply { verdicts, nodes, error: None })
    }

    /// Queues `d` (or its whole gang, once `minMember` members are pending) for tessera's own
    /// preemption ([`crate::preemption`]).
    pub(crate) fn queue_preemption(&self, d: &Demand) {
        let now = self.now_ms();
        let mut inner = self.lock();
        let (key, members) = match &d.gang {
            Some(g) => {
                let Some(st) = inner.gangs.get(&g.name) else { return };
                let members: Vec<Demand> = st.pending_members(&inner.snap);
                if (members.len() as u64) < u64::from(g.min_member) || st.plan().is_some() {
                    return;
                }
                (format!("gang {}", g.name), members)
            }
            None => (format!("pod {}", d.pod), vec![d.clone()]),
        };
        inner.preemptions.want(key, members, now);
        drop(inner);
        self.preempts_ready();
    }

    /// Decides under the lock what a demand's verdicts need: answered already (held devices,
    /// gangs: they change the snapshot) or a plain evaluation, done by the caller unlocked.
    pub(crate) fn prepare(&self, inner: &mut Inner, demand: &Demand, names: &[NodeName]) -> Verdicts {
        inner.recent.push_back(demand.clone());
        if inner.recent.len() > RECENT_DEMANDS {
            inner.recent.pop_front();
        }
        inner.filtered += 1;
        // FGD's target workload: the popular shapes among recent demands (95% coverage). Kept
        // while the shapes and their shares hold steady: every new workload empties the core's
        // memo, and replacing it for sampling noise would make every shape cold every 64 filters.
        if inner.filtered % 64 == 1 || inner.workload.is_empty() {
            let fresh = Workload::from_demands_top(inner.recent.iter(), 0.95);
            if drifted(&inner.workload, &fresh) {
                inner.workload = Arc::new(fresh);
            }
        }
        if let Some(a) = inner.snap.allocation(&demand.pod) {
            // Already assumed or reserved: only its node.
            let (here, grants, reserved) = (a.node.clone(), a.grants.clone(), a.reserved_until_ms.is_some());
            match &demand.gang {
                // A planned member whose filter comes without its planned node: kube-scheduler's
                // own filters refused that node for it (resources it counts, taints, affinity).
                // Holding the plan would only wait for the deadline; plan again without it.
                Some(g) if reserved && !names.contains(&here) => {
                    let now = self.now_ms();
                    if let Some(st) = inner.gangs.get_mut(&g.name) {
                        st.refuse(&demand.pod, &here, now);
                    }
                    tracing::info!(gang = %g.name, pod = %demand.pod, node = %here, "kube-scheduler did not offer the planned node; replanning without it");
                    let why = format!("kube-scheduler refused node {here} for pod {}; replanning", demand.pod);
                    inner.fail_gang(&g.name, &why);
                }
                _ => return Verdicts::Done(self.pinned(inner, demand, &here, grants, names)),
            }
        }
        if let Some(g) = &demand.gang
            && let Some(v) = self.gang_verdicts(inner, demand, g, names)
        {
            return Verdicts::Done(v);
        }
        Verdicts::Evaluate { snap: inner.snap.clone(), workload: inner.workload.clone() }
    }

    /// The memo that holds `demand`'s shape (what a verdict depends on besides the node).
    pub(crate) fn memo_for(&self, demand: &Demand) -> Option<&Mutex<policy::Memo>> {
        let i = usize::try_from(policy::demand_shape(demand) % self.memos.len().max(1) as u64).unwrap_or(0);
        self.memos.get(i)
    }

    /// [`Self::evaluate`] taking the offered names: with a memo, each verdict keeps its name
    /// from the request instead of a copy (thousands of names per filter).
    pub(crate) fn evaluate_offered(
        &self,
        snap: &Snapshot,
        workload: &Workload,
        demand: &Demand,
        names: Vec<NodeName>,
    ) -> Vec<NodeVerdict> {
        let memo = if self.policy.memoizable() { self.memo_for(demand).and_then(|m| m.lock().ok()) } else { None };
        let Some(mut memo) = memo else { return self.evaluate(snap, workload, demand, &names) };
        let ctx = Context { workload, seed: self.settings.seed };
        match policy::evaluate_memo_offered(snap, demand, self.policy.as_ref(), &ctx, names, &mut memo) {
            Ok(v) => v,
            Err(failed) => {
                let (e, names) = *failed;
                let why = Rejection::unresolvable(format!("pod {}: {e}", demand.pod));
                names.into_iter().map(|n| NodeVerdict { node: n, outcome: Err(why.clone()) }).collect()
            }
        }
    }

    /// The core's verdicts on the offered nodes, split across threads for long node lists
    /// (nodes are independent, so the result is the same as one call).
    pub(crate) fn evaluate(
        &self,
        snap: &Snapshot,
        workload: &Workload,
        demand: &Demand,
        names: &[NodeName],
    ) -> Vec<NodeVerdict> {
        let ctx = Context { workload, seed: self.settings.seed };
        let run = |chunk: &[NodeName]| policy::evaluate(snap, demand, self.policy.as_ref(), &ctx, Some(chunk));
        let parts = self.settings.threads.max(1).min(names.len() / PARALLEL_MIN_NODES).max(1);
        // Memoised: only nodes whose state changed since this demand shape was last filtered are
        // scored again (same verdicts as a fresh evaluation). A poisoned memo lock falls back to
        // the fresh, threaded path.
        let memo = if self.policy.memoizable() { self.memo_for(demand).and_then(|m| m.lock().ok()) } else { None };
        let result = if let Some(mut memo) = memo {
            policy::evaluate_memo(snap, demand, self.policy.as_ref(), &ctx, Some(names), &mut memo)
        } else if parts == 1 {
            run(names)
        } else {
            let size = names.len().div_ceil(parts);
            std::thread::scope(|scope| {
                let mut chunks = names.chunks(size);
                let first = chunks.next().unwrap_or(&[]);
                let handles: Vec<_> = chunks.map(|c| scope.spawn(move || run(c))).collect();
                let mut out = run(first)?;
                for h in handles {
                    match h.join() {
                        Ok(v) => out.extend(v?),
                        Err(_) => return Err(tessera_core::Error::Invalid("evaluation thread panicked".into())),
                    }
                }
                Ok(out)
            })
        };
        match result {
            Ok(v) => v,
            Err(e) => names
                .iter()
                .map(|n| NodeVerdict {
                    node: n.clone(),
                    outcome: Err(Rejection::unresolvable(format!("pod {}: {e}", demand.pod))),
                })
                .collect(),
        }
    }

    /// Verdicts for a pod that already holds devices on `here`: that node fits; every other
    /// node is refused, keeping "never fits" where the core says so.
    pub(crate) fn pinned(
        &self,
        inner: &Inner,
        demand: &Demand,
        here: &NodeName,
        grants: Vec<Grant>,
        names: &[NodeName],
    ) -> Vec<NodeVerdict> {
        let others: Vec<NodeName> = names.iter().filter(|n| *n != here).cloned().collect();
        let ctx = Context { workload: &inner.workload, seed: self.settings.seed };
        let mut never: HashMap<NodeName, Rejection> = HashMap::new();
        if let Ok(vs) = policy::evaluate(&inner.snap, demand, self.policy.as_ref(), &ctx, Some(&others)) {
            for v in vs {
                if let Err(r) = v.outcome
                    && r.is_unresolvable()
                {
                    never.insert(v.node, r);
                }
            }
        }
        let held = match &demand.gang {
            Some(g) => format!("gang {} placed pod {} on {here}", g.name, demand.pod),
            None => format!("pod {} already holds devices on {here}", demand.pod),
        };
        names
            .iter()
            .map(|n| NodeVerdict {
                node: n.clone(),
                outcome: if n == here {
                    Ok((
                        tessera_core::Candidate { node: 0, grants: grants.as_slice().into(), ops: Vec::new() },
                        policy::Score::default(),
                    ))
                } else if let Some(r) = never.remove(n) {
                    Err(r)
                } else {
                    Err(Rejection::unschedulable(held.as_str()).at_node(n.clone()))
                },
            })
            .collect()
    }
}

/// A filter's answer, written on the wire straight from the verdicts (shared with the pod's
/// cached verdicts): the same JSON as the [`ExtenderFilterResult`] of [`FilterReply::into_result`].
#[derive(Debug)]
pub struct FilterReply {
    verdicts: Arc<Vec<NodeVerdict>>,
    /// The passing Node objects, when the request carried Node objects instead of names.
    nodes: Option<NodeList>,
    /// The call failed: kube-scheduler fails this scheduling cycle with this message.
    error: Option<String>,
}

impl FilterReply {
    pub(crate) fn error(message: impl Into<String>) -> Self {
        Self { verdicts: Arc::default(), nodes: None, error: Some(message.into()) }
    }

    fn passing(&self) -> impl Iterator<Item = &str> {
        self.verdicts.iter().filter(|v| v.outcome.is_ok()).map(|v| v.node.0.as_str())
    }

    fn failing(&self, unresolvable: bool) -> impl Iterator<Item = (&str, &Rejection)> {
        self.verdicts.iter().filter_map(move |v| match &v.outcome {
            Err(r) if r.is_unresolvable() == unresolvable => Some((v.node.0.as_str(), r)),
            _ => None,
        })
    }

    /// Appends the reply's JSON to `out`: the same bytes as its [`Serialize`] impl, written by
    /// hand for the usual reply (names, no error), through `serde_json` otherwise.
    pub fn write_json(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        if self.error.is_some() || self.nodes.is_some() {
            return serde_json::to_writer(out, self);
        }
        out.extend_from_slice(b"{\"Nodes\":null,\"NodeNames\":[");
        for (i, n) in self.passing().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            wire::out::str(out, n);
        }
        out.extend_from_slice(b"],\"FailedNodes\":");
        self.write_failed(out, false);
        out.extend_from_slice(b",\"FailedAndUnresolvableNodes\":");
        self.write_failed(out, true);
        out.extend_from_slice(b",\"Error\":\"\"}");
        Ok(())
    }

    fn write_failed(&self, out: &mut Vec<u8>, unresolvable: bool) {
        out.push(b'{');
        for (i, (n, r)) in self.failing(unresolvable).enumerate() {
            if i > 0 {
                out.push(b',');
            }
            wire::out::str(out, n);
            out.push(b':');
            wire::out::reason(out, r);
        }
        out.push(b'}');
    }

    /// The reply as the wire type.
    pub fn into_result(self) -> ExtenderFilterResult {
        if let Some(e) = self.error {
            return ExtenderFilterResult::error(e);
        }
        let map = |u| -> FailedNodesMap { self.failing(u).map(|(n, r)| (n.to_owned(), r.to_string())).collect() };
        ExtenderFilterResult {
            node_names: self.nodes.is_none().then(|| self.passing().map(str::to_owned).collect()),
            failed_nodes: Some(map(false)),
            failed_and_unresolvable_nodes: Some(map(true)),
            nodes: self.nodes,
            error: String::new(),
        }
    }
}

impl Serialize for FilterReply {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        struct Seq<I>(std::cell::Cell<Option<I>>);
        impl<'a, I: Iterator<Item = &'a str>> Serialize for Seq<I> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq(self.0.take().into_iter().flatten())
            }
        }
        // A rejection's text, written as it is formatted (no string built for it).
        struct Reason<'a>(&'a Rejection);
        impl Serialize for Reason<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self.0)
            }
        }
        struct Map<I>(std::cell::Cell<Option<I>>);
        impl<'a, I: Iterator<Item = (&'a str, &'a Rejection)>> Serialize for Map<I> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_map(self.0.take().into_iter().flatten().map(|(n, r)| (n, Reason(r))))
            }
        }
        let mut st = serializer.serialize_struct("ExtenderFilterResult", 5)?;
        if let Some(e) = &self.error {
            st.serialize_field("Nodes", &None::<NodeList>)?;
            st.serialize_field("NodeNames", &None::<Vec<String>>)?;
            st.serialize_field("FailedNodes", &None::<FailedNodesMap>)?;
            st.serialize_field("FailedAndUnresolvableNodes", &None::<FailedNodesMap>)?;
            st.serialize_field("Error", e)?;
            return st.end();
        }
        st.serialize_field("Nodes", &self.nodes)?;
        match self.nodes {
            Some(_) => st.serialize_field("NodeNames", &None::<Vec<String>>)?,
            None => st.serialize_field("NodeNames", &Seq(std::cell::Cell::new(Some(self.passing()))))?,
        }
        st.serialize_field("FailedNodes", &Map(std::cell::Cell::new(Some(self.failing(false)))))?;
        st.serialize_field("FailedAndUnresolvableNodes", &Map(std::cell::Cell::new(Some(self.failing(true)))))?;
        st.serialize_field("Error", "")?;
        st.end()
    }
}

/// What a filter or prioritize still has to do after the locked part.
pub(crate) enum Verdicts {
    Done(Vec<NodeVerdict>),
    Evaluate { snap: Arc<Snapshot>, workload: Arc<Workload> },
}

/// Below this many offered nodes per thread, splitting an evaluation costs more than it saves.
pub(crate) const PARALLEL_MIN_NODES: usize = 128;

#[cfg(test)]
mod tests {
    use tessera_core::GpuDemand;

    use super::*;

    fn workload(counts: &[(GpuDemand, usize)]) -> Workload {
        let demands: Vec<Demand> = counts
            .iter()
            .flat_map(|(g, n)| (0..*n).map(move |i| Demand::new(format!("ml/p{i}").as_str(), g.clone())))
            .collect();
        Workload::from_demands_top(demands.iter(), 1.0)
    }

    #[test]
    fn the_hand_written_reply_is_serdes_bytes() {
        let fits = |n: &str| NodeVerdict {
            node: NodeName(n.into()),
            outcome: Ok((
                tessera_core::Candidate { node: 0, grants: Default::default(), ops: Vec::new() },
                policy::Score::default(),
            )),
        };
        let refused = |n: &str, r: Rejection| NodeVerdict { node: NodeName(n.into()), outcome: Err(r) };
        let verdicts = vec![
            fits("gpu-1"),
            refused("gpu-2", Rejection::unschedulable("no free 1g slice").at_node(NodeName("gpu-2".into()))),
            fits("gpu-\"3\"\\"),
            refused("cpu-1", Rejection::unresolvable("no GPU")),
            refused(
                "odd\u{1}\n",
                Rejection::unresolvable("a \"quoted\"\tcause é").at_node(NodeName("odd\u{1}\n".into())),
            ),
            refused("gpu-4", Rejection::unschedulable("")),
        ];
        let replies = [
            FilterReply { verdicts: Arc::new(verdicts.clone()), nodes: None, error: None },
            FilterReply { verdicts: Arc::default(), nodes: None, error: None },
            FilterReply { verdicts: Arc::new(verdicts), nodes: Some(NodeList::default()), error: None },
            FilterReply::error("bad \"pod\""),
        ];
        for r in &replies {
            let mut out = Vec::new();
            r.write_json(&mut out).unwrap();
            assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(r).unwrap());
        }
        let mut out = Vec::new();
        replies[0].write_json(&mut out).unwrap();
        let back: ExtenderFilterResult = serde_json::from_slice(&out).unwrap();
        assert_eq!(back.node_names.unwrap(), ["gpu-1", "gpu-\"3\"\\"]);
        assert_eq!(back.failed_nodes.unwrap()["gpu-2"], "node gpu-2: no free 1g slice");
        assert_eq!(back.failed_and_unresolvable_nodes.unwrap()["odd\u{1}\n"], "node odd\u{1}\n: a \"quoted\"\tcause é");
    }

    #[test]
    fn forgotten_verdicts_lend_their_names_to_the_next_filter() {
        let names = |ns: &[&str]| Offered::Names(ns.iter().map(|n| std::borrow::Cow::Owned(n.to_string())).collect());
        let first = names(&["a-long-node-name-0", "a-long-node-name-1"]).node_names().unwrap();
        let verdicts: Vec<NodeVerdict> =
            first.into_iter().map(|n| NodeVerdict { node: n, outcome: Err(Rejection::unschedulable("x")) }).collect();
        let held = Arc::new(verdicts);
        // Still held elsewhere: nothing is taken.
        crate::request::recycle_names(Arc::clone(&held));
        assert_eq!(Arc::strong_count(&held), 1);
        crate::request::recycle_names(held);
        // Shorter, longer and more names than were kept: each one is its own text.
        let again = names(&["b", "a-much-longer-node-name-than-before", "c"]).node_names().unwrap();
        assert_eq!(
            again.iter().map(|n| n.0.as_str()).collect::<Vec<_>>(),
            ["b", "a-much-longer-node-name-than-before", "c"]
        );
    }

    #[test]
    fn the_workload_is_replaced_only_when_its_mix_really_moves() {
        let mig = GpuDemand::Mig { profile: "1g.10gb".into() };
        let whole = GpuDemand::Whole { count: 1 };
        let base = workload(&[(mig.clone(), 50), (whole.clone(), 50)]);
        assert!(drifted(&Workload::default(), &base));
        // Sampling noise: 52/48 is the same mix.
        assert!(!drifted(&base, &workload(&[(mig.clone(), 52), (whole.clone(), 48)])));
        // A real shift, a new class, a lost class.
        assert!(drifted(&base, &workload(&[(mig.clone(), 70), (whole.clone(), 30)])));
        assert!(drifted(&base, &workload(&[(mig.clone(), 50), (whole, 40), (GpuDemand::Share { milli: 300 }, 10)])));
        assert!(drifted(&base, &workload(&[(mig, 100)])));
    }
}
