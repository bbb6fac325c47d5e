//! The prioritize verb: scores of the offered nodes, from the pod's filter verdicts when they are current.

use std::collections::HashMap;

use serde::Serialize;
use tessera_api::pod::{self as podparse};
use tessera_core::NodeName;
use tessera_core::policy::{self, NodeVerdict};

use crate::error::Error;
use crate::request::NodesRequest;
use crate::wire::{ExtenderArgs, HostPriority};

use crate::filter::Verdicts;
use crate::state::Scheduler;

/// Prioritize's answer: a score per offered node, in the offered order, naming the nodes as the
/// request did. Serialises as the wire `HostPriorityList`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Priorities<'a> {
    pub hosts: Vec<&'a str>,
    pub scores: Vec<i64>,
}

impl Priorities<'_> {
    /// The reply as the wire type.
    pub fn into_list(self) -> Vec<HostPriority> {
        self.hosts.into_iter().zip(self.scores).map(|(h, score)| HostPriority { host: h.to_owned(), score }).collect()
    }
}

impl Priorities<'_> {
    /// Appends the reply's JSON to `out`: the same bytes as its [`Serialize`] impl, by hand.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.push(b'[');
        for (i, (host, &score)) in self.hosts.iter().zip(&self.scores).enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"Host\":");
            crate::wire::out::str(out, host);
            out.extend_from_slice(b",\"Score\":");
            crate::wire::out::int(out, score);
            out.push(b'}');
        }
        out.push(b']');
    }
}

impl Serialize for Priorities<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        #[serde(rename = "HostPriority", rename_all = "PascalCase")]
        struct Host<'a> {
            host: &'a str,
            score: i64,
        }
        s.collect_seq(self.hosts.iter().zip(&self.scores).map(|(host, &score)| Host { host, score }))
    }
}

impl Scheduler {
    pub fn prioritize(&self, args: ExtenderArgs) -> Result<Vec<HostPriority>, Error> {
        let req = NodesRequest::try_from(args)?;
        Ok(self.prioritize_request(&req)?.into_list())
    }

    /// The scores of `req`'s offered nodes; an error is the request's (answered 400).
    pub fn prioritize_request<'r>(&self, req: &'r NodesRequest<'_>) -> Result<Priorities<'r>, Error> {
        let hosts = req.offered.names()?;
        let pod = &req.pod;
        let key = podparse::pod_key(pod).map_err(|e| Error::BadRequest(e.to_string()))?;
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
                if let Some(scores) = policy::extender_scores_covering_names(&s.verdicts, &hosts) {
                    return Some(Cached::Scores(scores));
                }
                let by_node: HashMap<&str, &NodeVerdict> = s.verdicts.iter().map(|v| (v.node.0.as_str(), v)).collect();
                hosts
                    .iter()
                    .map(|n| by_node.get(n).map(|v| (*v).clone()))
                    .collect::<Option<Vec<_>>>()
                    .map(Cached::Verdicts)
            })
        };
        let verdicts = match cached {
            Some(Cached::Scores(scores)) => {
                self.metrics.decision("prioritize", "scored");
                return Ok(Priorities { hosts, scores });
            }
            Some(Cached::Verdicts(v)) => v,
            None => {
                let names = req.offered.node_names()?;
                let demand = self.demand_of(pod).map_err(|e| Error::BadRequest(format!("pod {key}: {e}")))?;
                let plan = self.prepare(&mut self.lock(), &demand, &names);
                match plan {
                    Verdicts::Done(v) => v,
                    Verdicts::Evaluate { snap, workload } => self.evaluate(&snap, &workload, &demand, &names),
                }
            }
        };
        let scores: HashMap<NodeName, i64> = policy::extender_scores(&verdicts).into_iter().collect();
        let by_name: HashMap<&str, i64> = scores.iter().map(|(n, s)| (n.0.as_str(), *s)).collect();
        self.metrics.decision("prioritize", "scored");
        let scores = hosts.iter().map(|h| by_name.get(h).copied().unwrap_or(0)).collect();
        Ok(Priorities { hosts, scores })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hand_written_reply_is_serdes_bytes() {
        let p = Priorities { hosts: vec!["gpu-1", "gpu-\"2\"", "x\u{7}"], scores: vec![0, 10, 7] };
        let mut out = Vec::new();
        p.write_json(&mut out);
        assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&p).unwrap());
        for score in [-5, 0, 9, 10, 99, 100, 12345, i64::MIN, i64::MAX] {
            let p = Priorities { hosts: vec!["n"], scores: vec![score] };
            let mut out = Vec::new();
            p.write_json(&mut out);
            assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&p).unwrap());
        }
        let mut out = Vec::new();
        Priorities::default().write_json(&mut out);
        assert_eq!(out, b"[]");
    }
}
