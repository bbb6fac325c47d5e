//! The prioritize verb: scores of the offered nodes, from the pod's filter verdicts when they are current.

use std::collections::HashMap;

use tessera_api::pod::{self as podparse};
use tessera_core::NodeName;
use tessera_core::policy::{self, NodeVerdict};

use crate::error::Error;
use crate::wire::{ExtenderArgs, HostPriority};

use crate::filter::{Verdicts, offered};
use crate::state::Scheduler;

/// Whether scoring all of `verdicts` gives the offered nodes' scores: the names are the
/// verdicts' nodes in order, with only nodes that do not fit left out (kube-scheduler offers
/// prioritize the nodes that passed filter). Scores are normalised over the nodes that fit, so
/// the two agree exactly then.
pub(crate) fn covers(verdicts: &[NodeVerdict], names: &[NodeName]) -> bool {
    let mut vs = verdicts.iter();
    for n in names {
        loop {
            match vs.next() {
                Some(v) if v.node == *n => break,
                Some(v) if v.outcome.is_err() => continue,
                _ => return false,
            }
        }
    }
    vs.all(|v| v.outcome.is_err())
}

impl Scheduler {
    pub fn prioritize(&self, mut args: ExtenderArgs) -> Result<Vec<HostPriority>, Error> {
        let names = offered(&args.nodes, args.node_names.take()).map_err(Error::BadRequest)?;
        let pod = args.pod.ok_or_else(|| Error::BadRequest("ExtenderArgs.Pod is null".into()))?;
        let key = podparse::pod_key(&pod).map_err(|e| Error::BadRequest(e.to_string()))?;
        // From the pod's filter verdicts when the state has not changed since: scored in place
        // when they cover the offered nodes (the usual case), else the needed ones are copied.
        enum Cached {
            Scores(HashMap<NodeName, i64>),
            Verdicts(Vec<NodeVerdict>),
        }
        let cached = {
            let inner = self.lock();
            inner.seen.get(&key).filter(|s| s.generation == inner.generation).and_then(|s| {
                if covers(&s.verdicts, &names) {
                    return Some(Cached::Scores(policy::extender_scores(&s.verdicts).into_iter().collect()));
                }
                let by_node: HashMap<&NodeName, &NodeVerdict> = s.verdicts.iter().map(|v| (&v.node, v)).collect();
                names
                    .iter()
                    .map(|n| by_node.get(n).map(|v| (*v).clone()))
                    .collect::<Option<Vec<_>>>()
                    .map(Cached::Verdicts)
            })
        };
        let verdicts = match cached {
            Some(Cached::Scores(scores)) => return Ok(self.scored(&names, &scores)),
            Some(Cached::Verdicts(v)) => v,
            None => {
                let demand = self.demand_of(&pod).map_err(|e| Error::BadRequest(format!("pod {key}: {e}")))?;
                let plan = self.prepare(&mut self.lock(), &demand, &names);
                match plan {
                    Verdicts::Done(v) => v,
                    Verdicts::Evaluate { snap, workload } => self.evaluate(&snap, &workload, &demand, &names),
                }
            }
        };
        let scores: HashMap<NodeName, i64> = policy::extender_scores(&verdicts).into_iter().collect();
        Ok(self.scored(&names, &scores))
    }

    pub(crate) fn scored(&self, names: &[NodeName], scores: &HashMap<NodeName, i64>) -> Vec<HostPriority> {
        self.metrics.decision("prioritize", "scored");
        names.iter().map(|n| HostPriority { host: n.0.clone(), score: scores.get(n).copied().unwrap_or(0) }).collect()
    }
}

#[cfg(test)]
mod tests {
    use tessera_core::{Candidate, Rejection};

    use super::*;

    fn verdict(node: &str, fits: bool) -> NodeVerdict {
        NodeVerdict {
            node: NodeName(node.into()),
            outcome: if fits {
                Ok((Candidate { node: 0, grants: Vec::new(), ops: Vec::new() }, policy::Score::default()))
            } else {
                Err(Rejection::Unschedulable(format!("node {node}: full")))
            },
        }
    }

    #[test]
    fn filter_verdicts_cover_the_same_list_or_the_nodes_that_passed() {
        let vs = [verdict("a", true), verdict("b", false), verdict("c", true)];
        let names = |ns: &[&str]| ns.iter().map(|n| NodeName((*n).into())).collect::<Vec<_>>();
        assert!(covers(&vs, &names(&["a", "b", "c"])));
        assert!(covers(&vs, &names(&["a", "c"])));
        // A fitting node left out would change the normalisation; order and unknown names too.
        assert!(!covers(&vs, &names(&["a"])));
        assert!(!covers(&vs, &names(&["c", "a"])));
        assert!(!covers(&vs, &names(&["a", "c", "d"])));
    }
}
