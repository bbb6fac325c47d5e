//! Twins: nodes whose placement state is equal get one evaluation per decision.
//!
//! A large cluster is mostly nodes in a handful of states (empty nodes of one type, nodes
//! packed the same way), and a cold decision — the first of a demand shape, or the first after
//! the expected workload changed — evaluated every one of them. For a policy whose verdict
//! follows from the node's GPUs, cpu, memory and interconnect alone ([`Policy::twins`]), a
//! node that passes its own node-level checks (schedulable, labels, taints, rules, cpu and
//! memory) takes the verdict of an equal node evaluated earlier in the same pass, with its own
//! index and name. Equality is checked field by field, so a hash collision costs a comparison,
//! never a wrong verdict.

use std::collections::HashMap;

use super::{Context, Policy, Score, mix, node_verdict};
use crate::cluster::{Gpu, Node, Snapshot};
use crate::demand::Demand;
use crate::placement::{Candidate, Rejection, check_node, quick_reject};

/// A node's verdict under one demand: its best candidate and score, or why it fits nothing.
type Verdict = Result<(Candidate, Score), Rejection>;

/// Verdicts of the nodes evaluated so far in one pass over one snapshot, demand and context.
#[derive(Debug, Default)]
pub(crate) struct Twins {
    /// By state hash: (node index, verdict) of each distinct state seen.
    seen: HashMap<u64, smallvec::SmallVec<[(usize, Verdict); 1]>>,
    /// Nodes that took a twin's verdict (for tests and the bench).
    pub(crate) shared: usize,
}

impl Twins {
    /// [`node_verdict`], taken from an equal node evaluated earlier in this pass when the policy
    /// allows it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn verdict(
        &mut self,
        snap: &Snapshot,
        ni: usize,
        demand: &Demand,
        policy: &dyn Policy,
        ctx: &Context<'_>,
        cands: &mut Vec<Candidate>,
        scores: &mut Vec<Score>,
    ) -> Verdict {
        let node = &snap.nodes()[ni];
        // A node that certainly cannot host the demand is refused faster than looked up.
        if !policy.twins() || quick_reject(node, demand) {
            return node_verdict(snap, ni, demand, policy, ctx, cands, scores);
        }
        // What depends on the node's name, labels, taints and free cpu/memory is its own.
        check_node(node, demand)?;
        let key = state_hash(node);
        if let Some(list) = self.seen.get(&key)
            && let Some((_, v)) = list.iter().find(|(r, _)| same_state(&snap.nodes()[*r], node))
        {
            self.shared += 1;
            return match v {
                Ok((c, s)) => Ok((Candidate { node: ni, ..c.clone() }, *s)),
                Err(r) => Err(r.clone().at_node(node.name.clone())),
            };
        }
        let v = node_verdict(snap, ni, demand, policy, ctx, cands, scores);
        self.seen.entry(key).or_default().push((ni, v.clone()));
        v
    }
}

/// A hash of most of what [`same_state`] compares (cheap: it runs for every node evaluated;
/// what it leaves out, such as the GPU model, only makes more nodes compare as candidates).
fn state_hash(n: &Node) -> u64 {
    let mut h = mix(n.cpu_milli ^ n.memory_mib.rotate_left(32));
    h = mix(h ^ n.used_cpu_milli ^ n.used_memory_mib.rotate_left(32));
    for g in &n.gpus {
        let layout = g.mig.as_ref().map_or(0, |l| {
            l.instances()
                .iter()
                .fold(u64::from(l.used_mask()), |x, i| x.rotate_left(11) ^ u64::from(i.start) << 8 ^ i.class as u64)
        });
        h = mix(h
            ^ u64::from(g.index)
            ^ u64::from(g.used_milli) << 8
            ^ u64::from(g.mig_busy) << 24
            ^ (g.mode as u64) << 32
            ^ u64::from(g.healthy) << 40);
        h = mix(h ^ layout ^ g.memory_mib.rotate_left(17));
    }
    h
}

/// Equal for placement: everything candidates and twin-safe scores read, except the name, the
/// GPUs' UUIDs and what [`check_node`] already judged per node.
fn same_state(a: &Node, b: &Node) -> bool {
    a.cpu_milli == b.cpu_milli
        && a.memory_mib == b.memory_mib
        && a.used_cpu_milli == b.used_cpu_milli
        && a.used_memory_mib == b.used_memory_mib
        && a.gpus.len() == b.gpus.len()
        && a.gpus.iter().zip(&b.gpus).all(|(x, y)| same_gpu(x, y))
        && (std::sync::Arc::ptr_eq(&a.topology, &b.topology) || a.topology == b.topology)
}

fn same_gpu(x: &Gpu, y: &Gpu) -> bool {
    x.index == y.index
        && x.model == y.model
        && x.memory_mib == y.memory_mib
        && x.numa == y.numa
        && x.healthy == y.healthy
        && x.mode == y.mode
        && x.used_milli == y.used_milli
        && x.mig == y.mig
        && x.mig_busy == y.mig_busy
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{Grant, PodKey};
    use crate::demand::GpuDemand;
    use crate::placement::Placement;
    use crate::policy::{Memo, Workload, by_name, choose, evaluate, evaluate_memo};

    /// The same policy with twins turned off: every node evaluated on its own.
    #[derive(Debug)]
    struct Alone(Box<dyn Policy>);

    impl Policy for Alone {
        fn name(&self) -> &'static str {
            self.0.name()
        }
        fn score(&self, snap: &Snapshot, d: &Demand, c: &Candidate, ctx: &Context<'_>) -> Score {
            self.0.score(snap, d, c, ctx)
        }
        fn score_node(
            &self,
            snap: &Snapshot,
            d: &Demand,
            cands: &[Candidate],
            ctx: &Context<'_>,
            out: &mut Vec<Score>,
        ) {
            self.0.score_node(snap, d, cands, ctx, out);
        }
    }

    fn demands(i: usize) -> Demand {
        let gpu = match i % 5 {
            0 => GpuDemand::Mig { profile: "1g.10gb".into() },
            1 => GpuDemand::Model { memory_mib: 18 * 1024, compute_slices: None },
            2 => GpuDemand::Share { milli: 300 },
            3 => GpuDemand::Whole { count: 4 },
            _ => GpuDemand::Mig { profile: "3g.40gb".into() },
        };
        // Half ask for no cpu or memory, so nodes differ by their GPUs alone.
        let (cpu, mem) = if i.is_multiple_of(2) { (0, 0) } else { (4000 * (i as u64 % 3), 8192) };
        Demand::new(PodKey(format!("ns/p{i}")), gpu).with_cpu(cpu, mem)
    }

    /// Nodes that share a twin's verdict get exactly the verdict they would have on their own,
    /// name and index included, as the cluster fills (states diverge) and demands fail.
    #[test]
    fn twins_give_every_node_the_verdict_it_would_get_alone() {
        let mix: Vec<Demand> = (0..5).map(demands).collect();
        let w = Workload::from_demands(mix.iter());
        for policy in ["tessera", "fgd"] {
            let mut s = crate::testing::synth_cluster(11, 120);
            let p = by_name(policy).unwrap_or_else(|| panic!("{policy}"));
            let alone = Alone(by_name(policy).unwrap_or_else(|| panic!("{policy}")));
            assert!(p.twins() && !alone.twins());
            let ctx = Context { workload: &w, seed: 3 };
            let (mut memo, mut shared) = (Memo::new(), 0);
            for i in 0..150 {
                let d = demands(i);
                let mut twins = Twins::default();
                let (mut cands, mut scores) = (Vec::new(), Vec::new());
                for ni in 0..s.nodes().len() {
                    let with = twins.verdict(&s, ni, &d, p.as_ref(), &ctx, &mut cands, &mut scores);
                    let without = node_verdict(&s, ni, &d, &alone, &ctx, &mut cands, &mut scores);
                    assert_eq!(with, without, "{policy}, decision {i}, node {ni}");
                }
                shared += twins.shared;
                let fresh = evaluate(&s, &d, &alone, &ctx, None).unwrap_or_else(|e| panic!("{e}"));
                let memoised =
                    evaluate_memo(&s, &d, p.as_ref(), &ctx, None, &mut memo).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(fresh, memoised, "{policy}, decision {i}");
                if let Some(v) = choose(&fresh, &ctx)
                    && let Ok((c, sc)) = &v.outcome
                {
                    let pl = Placement {
                        node: v.node.clone(),
                        grants: c.grants.to_vec(),
                        ops: c.ops.clone(),
                        score: sc.node,
                    };
                    pl.apply(&mut s, &d, None).unwrap_or_else(|e| panic!("{e}"));
                }
            }
            assert!(shared > 1000, "{policy}: only {shared} verdicts shared; the test would not see a wrong one");
        }
    }

    /// A node that differs only in a GPU's UUID and its name is a twin; one more pod's share on
    /// one GPU is not.
    #[test]
    fn twins_ignore_names_and_uuids_but_not_allocations() {
        let a = Node::test("a").with_capacity(64_000, 256 * 1024).with_shared_gpus(2, "L4");
        let mut b = Node::test("b").with_capacity(64_000, 256 * 1024).with_shared_gpus(2, "L4");
        b.gpus[0].uuid = "GPU-other".into();
        assert!(same_state(&a, &b) && state_hash(&a) == state_hash(&b));
        let mut s = Snapshot::new([a, b]).unwrap_or_else(|e| panic!("{e}"));
        s.allocate(crate::cluster::Allocation {
            pod: "ns/x".into(),
            node: "b".into(),
            cpu_milli: 0,
            memory_mib: 0,
            grants: vec![Grant::Share { gpu: 0, milli: 100 }],
            priority: 0,
            gang: None,
            reserved_until_ms: None,
            extended: Vec::new(),
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let (a, b) = (&s.nodes()[0], &s.nodes()[1]);
        assert!(!same_state(a, b));
    }

    /// Two nodes with the same MIG layout, one of whose instances a pod holds, are not twins:
    /// each gets its own verdict (the held instance is not offered again).
    #[test]
    fn a_held_mig_instance_makes_a_node_no_twin() {
        let node = |name| Node::test(name).with_gpus(1, "H100-80GB").with_mig(0, &["3g.40gb", "3g.40gb"]);
        let mut s = Snapshot::new([node("a"), node("b")]).unwrap_or_else(|e| panic!("{e}"));
        assert!(same_state(&s.nodes()[0], &s.nodes()[1]));
        let held = Grant::Mig { gpu: 0, class: crate::mig::ProfileClass::G3, start: 0 };
        s.allocate(crate::cluster::Allocation {
            pod: "ns/held".into(),
            node: "b".into(),
            cpu_milli: 0,
            memory_mib: 0,
            grants: vec![held],
            priority: 0,
            gang: None,
            reserved_until_ms: None,
            extended: Vec::new(),
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let d = Demand::new(PodKey::from("ns/x"), GpuDemand::Mig { profile: "3g.40gb".into() });
        let w = Workload::from_demands([&d]);
        let ctx = Context { workload: &w, seed: 1 };
        let p = by_name("tessera").unwrap_or_else(|| panic!("tessera"));
        let alone = Alone(by_name("tessera").unwrap_or_else(|| panic!("tessera")));
        let mut twins = Twins::default();
        let (mut cands, mut scores) = (Vec::new(), Vec::new());
        for ni in [0, 1] {
            let with = twins.verdict(&s, ni, &d, p.as_ref(), &ctx, &mut cands, &mut scores);
            let without = node_verdict(&s, ni, &d, &alone, &ctx, &mut cands, &mut scores);
            assert_eq!(with, without, "node {ni}");
        }
        assert_eq!(twins.shared, 0);
    }
}
