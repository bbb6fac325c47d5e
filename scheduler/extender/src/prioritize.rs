//! The prioritize verb: scores of the offered nodes, from the pod's filter verdicts when they are current.

use std::collections::HashMap;

use tessera_api::pod::{self as podparse};
use tessera_core::NodeName;
use tessera_core::policy::{self, NodeVerdict};

use crate::error::Error;
use crate::wire::{ExtenderArgs, HostPriority};

use crate::filter::{Verdicts, offered};
use crate::state::Scheduler;

impl Scheduler {
    pub fn prioritize(&self, mut args: ExtenderArgs) -> Result<Vec<HostPriority>, Error> {
        let names = offered(&args.nodes, args.node_names.take()).map_err(Error::BadRequest)?;
        let pod = args.pod.ok_or_else(|| Error::BadRequest("ExtenderArgs.Pod is null".into()))?;
        let key = podparse::pod_key(&pod).map_err(|e| Error::BadRequest(e.to_string()))?;
        // From the pod's filter verdicts when the state has not changed since: scored in place
        // when they cover the offered nodes (the usual case), else the needed ones are copied.
        enum Cached {
            /// In the offered order.
            Scores(Vec<i64>),
            Verdicts(Vec<NodeVerdict>),
        }
        let cached = {
            let inner = self.lock();
            inner.seen.get(&key).filter(|s| s.generation == inner.generation).and_then(|s| {
                if let Some(scores) = policy::extender_scores_covering(&s.verdicts, &names) {
                    return Some(Cached::Scores(scores));
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
            Some(Cached::Scores(scores)) => {
                self.metrics.decision("prioritize", "scored");
                return Ok(names.into_iter().zip(scores).map(|(n, score)| HostPriority { host: n.0, score }).collect());
            }
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
