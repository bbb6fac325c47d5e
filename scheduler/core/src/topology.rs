//! The interconnect between a node's GPUs, as a petgraph graph.
//!
//! Edges carry the best link between two GPUs. Queries answer the two questions placement asks:
//! which GPUs form NVLink islands, and which `k` free GPUs are best connected.

use petgraph::graphmap::UnGraphMap;
use serde::{Deserialize, Serialize};

/// How two GPUs talk to each other, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Link {
    /// Through an NVSwitch fabric (HGX H100/H200/B200): full bandwidth between every pair.
    NvSwitch,
    /// Direct NVLink with this many lanes (bridges on PCIe cards, A100 HGX meshes).
    NvLink { lanes: u8 },
    /// Behind the same PCIe switch.
    PcieSwitch,
    /// Same NUMA node / CPU socket, across the host bridge.
    SameNuma,
    /// Across sockets (SMP interconnect).
    CrossSocket,
}

impl Link {
    /// Relative bandwidth weight used to rank GPU sets. NVLink dominates PCIe by an order of
    /// magnitude; within NVLink, more lanes is better.
    pub fn weight(self) -> u32 {
        match self {
            Link::NvSwitch => 1000,
            Link::NvLink { lanes } => 100 + 50 * u32::from(lanes),
            Link::PcieSwitch => 40,
            Link::SameNuma => 20,
            Link::CrossSocket => 10,
        }
    }

    pub fn is_nvlink(self) -> bool {
        matches!(self, Link::NvSwitch | Link::NvLink { .. })
    }
}

/// One edge for serialization: `a`–`b` with `link`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Edge {
    pub a: u32,
    pub b: u32,
    pub link: Link,
}

/// The interconnect graph of one node. GPU indices are the node's GPU indices.
#[derive(Clone, Debug, Default)]
pub struct Topology {
    graph: UnGraphMap<u32, Link>,
    /// Dense link weights for GPU indices `0..dense`, so set scoring does not hash.
    dense: usize,
    weights: Vec<u32>,
    nvlink: bool,
    islands: Vec<Vec<u32>>,
}

impl PartialEq for Topology {
    fn eq(&self, other: &Self) -> bool {
        self.edges() == other.edges() && self.gpus() == other.gpus()
    }
}
impl Eq for Topology {}

impl Topology {
    /// GPUs with no known links (treated as cross-socket pairs).
    pub fn unconnected(gpus: u32) -> Self {
        let mut graph = UnGraphMap::new();
        for g in 0..gpus {
            graph.add_node(g);
        }
        let mut t = Self { graph, dense: 0, weights: Vec::new(), nvlink: false, islands: Vec::new() };
        t.index();
        t
    }

    /// Every pair behind one NVSwitch fabric (HGX 8-GPU boards).
    pub fn nvswitch(gpus: u32) -> Self {
        Self::all_pairs(gpus, |_, _| Link::NvSwitch)
    }

    /// PCIe cards split evenly over `sockets` NUMA nodes, `pcie_per_switch` cards per switch.
    pub fn pcie(gpus: u32, sockets: u32, pcie_per_switch: u32) -> Self {
        let per_socket = gpus.div_ceil(sockets.max(1)).max(1);
        let per_switch = pcie_per_switch.max(1);
        Self::all_pairs(gpus, |a, b| {
            if a / per_socket != b / per_socket {
                Link::CrossSocket
            } else if a / per_switch == b / per_switch {
                Link::PcieSwitch
            } else {
                Link::SameNuma
            }
        })
    }

    /// NVLink islands of the given sizes (e.g. `[4, 4]`), PCIe/NUMA between islands.
    pub fn islands(sizes: &[u32], lanes: u8) -> Self {
        let mut island_of = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            island_of.extend(std::iter::repeat_n(i, n as usize));
        }
        let half = sizes.len().div_ceil(2).max(1);
        Self::all_pairs(island_of.len() as u32, |a, b| {
            let (ia, ib) = (island_of[a as usize], island_of[b as usize]);
            if ia == ib {
                Link::NvLink { lanes }
            } else if ia / half == ib / half {
                Link::SameNuma
            } else {
                Link::CrossSocket
            }
        })
    }

    fn all_pairs(gpus: u32, link: impl Fn(u32, u32) -> Link) -> Self {
        let mut t = Self::unconnected(gpus);
        for a in 0..gpus {
            for b in a + 1..gpus {
                t.graph.add_edge(a, b, link(a, b));
            }
        }
        t.index();
        t
    }

    /// Rebuilds the dense weight matrix and the NVLink flag from the graph.
    fn index(&mut self) {
        let n = self.graph.nodes().map(|g| g as usize + 1).max().unwrap_or(0).min(64);
        self.dense = n;
        self.weights = vec![Link::CrossSocket.weight(); n * n];
        for (a, b, l) in self.graph.all_edges() {
            let (a, b) = (a as usize, b as usize);
            if a < n && b < n {
                self.weights[a * n + b] = l.weight();
                self.weights[b * n + a] = l.weight();
            }
        }
        self.nvlink = self.graph.all_edges().any(|(_, _, l)| l.is_nvlink());
        self.islands = self.compute_islands();
    }

    fn weight(&self, a: u32, b: u32) -> u32 {
        let (ai, bi) = (a as usize, b as usize);
        if ai < self.dense && bi < self.dense { self.weights[ai * self.dense + bi] } else { self.link(a, b).weight() }
    }

    /// Builds from explicit edges (e.g. `GpuNode.status` links). Later edges for the same pair
    /// keep the better link.
    pub fn from_edges(gpus: u32, edges: &[Edge]) -> Self {
        let mut t = Self::unconnected(gpus);
        for e in edges {
            if e.a == e.b {
                continue;
            }
            let best = match t.graph.edge_weight(e.a, e.b) {
                Some(old) => (*old).min(e.link),
                None => e.link,
            };
            t.graph.add_edge(e.a, e.b, best);
        }
        t.index();
        t
    }

    pub fn gpus(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.graph.nodes().collect();
        v.sort_unstable();
        v
    }

    /// Edges sorted by endpoints, `a < b`.
    pub fn edges(&self) -> Vec<Edge> {
        let mut v: Vec<Edge> =
            self.graph.all_edges().map(|(a, b, &link)| Edge { a: a.min(b), b: a.max(b), link }).collect();
        v.sort_by_key(|e| (e.a, e.b));
        v
    }

    /// The link between two GPUs; unknown pairs count as cross-socket.
    pub fn link(&self, a: u32, b: u32) -> Link {
        self.graph.edge_weight(a, b).copied().unwrap_or(Link::CrossSocket)
    }

    /// Whether any pair of GPUs is NVLink/NVSwitch-connected.
    pub fn has_nvlink(&self) -> bool {
        self.nvlink
    }

    /// Connected components over NVLink/NVSwitch edges, each sorted, ordered by first GPU.
    /// A GPU with no NVLink is an island of one.
    pub fn nvlink_islands(&self) -> &[Vec<u32>] {
        &self.islands
    }

    fn compute_islands(&self) -> Vec<Vec<u32>> {
        let gpus = self.gpus();
        let mut seen = std::collections::BTreeSet::new();
        let mut islands = Vec::new();
        for &g in &gpus {
            if !seen.insert(g) {
                continue;
            }
            let mut island = vec![g];
            let mut stack = vec![g];
            while let Some(x) = stack.pop() {
                for (_, y, link) in self.graph.edges(x) {
                    if link.is_nvlink() && seen.insert(y) {
                        island.push(y);
                        stack.push(y);
                    }
                }
            }
            island.sort_unstable();
            islands.push(island);
        }
        islands
    }

    /// Sum of pairwise link weights of a set (higher is better connected).
    pub fn set_score(&self, set: &[u32]) -> u32 {
        let mut s = 0;
        for (i, &a) in set.iter().enumerate() {
            for &b in &set[i + 1..] {
                s += self.weight(a, b);
            }
        }
        s
    }

    /// Whether every pair in the set is NVLink-connected.
    pub fn all_nvlink(&self, set: &[u32]) -> bool {
        set.iter().enumerate().all(|(i, &a)| set[i + 1..].iter().all(|&b| self.link(a, b).is_nvlink()))
    }

    /// The best-connected `k` GPUs out of `free` (sorted input gives deterministic output):
    /// maximal pairwise score, ties to the lexicographically smallest set. Exact search up to
    /// 16 candidates (HGX boards have 8), greedy growth beyond.
    pub fn best_set(&self, free: &[u32], k: usize) -> Option<Vec<u32>> {
        if k == 0 {
            return Some(Vec::new());
        }
        if free.len() < k {
            return None;
        }
        let mut free = free.to_vec();
        free.sort_unstable();
        free.dedup();
        if free.len() < k {
            return None;
        }
        if k == 1 {
            return Some(vec![free[0]]);
        }
        // One uniform fabric (an NVSwitch board, or no links at all): any k are equally good.
        let w0 = self.weight(free[0], free[1]);
        if free.iter().enumerate().all(|(i, &a)| free[i + 1..].iter().all(|&b| self.weight(a, b) == w0)) {
            return Some(free[..k].to_vec());
        }
        if free.len() <= 16 {
            let mut best: Option<(u32, Vec<u32>)> = None;
            let mut cur = Vec::with_capacity(k);
            self.search(&free, k, 0, &mut cur, &mut best);
            return best.map(|(_, s)| s);
        }
        // Greedy: seed from each GPU, grow by the best marginal gain.
        let mut best: Option<(u32, Vec<u32>)> = None;
        for &seed in &free {
            let mut set = vec![seed];
            while set.len() < k {
                let next = free
                    .iter()
                    .filter(|g| !set.contains(g))
                    .max_by_key(|&&g| {
                        let gain: u32 = set.iter().map(|&s| self.weight(s, g)).sum();
                        (gain, std::cmp::Reverse(g))
                    })
                    .copied();
                match next {
                    Some(g) => set.push(g),
                    None => break,
                }
            }
            set.sort_unstable();
            let score = self.set_score(&set);
            if best.as_ref().is_none_or(|(b, _)| score > *b) {
                best = Some((score, set));
            }
        }
        best.map(|(_, s)| s)
    }

    fn search(&self, free: &[u32], k: usize, from: usize, cur: &mut Vec<u32>, best: &mut Option<(u32, Vec<u32>)>) {
        if cur.len() == k {
            let score = self.set_score(cur);
            if best.as_ref().is_none_or(|(b, _)| score > *b) {
                *best = Some((score, cur.clone()));
            }
            return;
        }
        let need = k - cur.len();
        for i in from..=free.len() - need {
            cur.push(free[i]);
            self.search(free, k, i + 1, cur, best);
            cur.pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn islands_of_two_quads_are_found() {
        let t = Topology::islands(&[4, 4], 4);
        assert_eq!(t.nvlink_islands(), vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
    }

    #[test]
    fn pcie_gpus_are_islands_of_one() {
        let t = Topology::pcie(4, 2, 2);
        assert_eq!(t.nvlink_islands().len(), 4);
        assert_eq!(t.link(0, 1), Link::PcieSwitch);
        assert_eq!(t.link(1, 2), Link::CrossSocket);
    }

    #[test]
    fn best_set_stays_inside_one_island() {
        let t = Topology::islands(&[4, 4], 4);
        // 0,1 taken on the first island: 4 GPUs must come from the second.
        let set = t.best_set(&[2, 3, 4, 5, 6, 7], 4);
        assert_eq!(set, Some(vec![4, 5, 6, 7]));
        // Two GPUs: the free pair in island one ties with pairs in island two; lowest wins.
        assert_eq!(t.best_set(&[2, 3, 4, 5, 6, 7], 2), Some(vec![2, 3]));
    }

    #[test]
    fn best_set_prefers_more_lanes() {
        let edges = [
            Edge { a: 0, b: 1, link: Link::NvLink { lanes: 2 } },
            Edge { a: 2, b: 3, link: Link::NvLink { lanes: 12 } },
        ];
        let t = Topology::from_edges(4, &edges);
        assert_eq!(t.best_set(&[0, 1, 2, 3], 2), Some(vec![2, 3]));
        assert!(t.all_nvlink(&[2, 3]));
        assert!(!t.all_nvlink(&[1, 2]));
    }

    #[test]
    fn best_set_greedy_handles_many_gpus() {
        let t = Topology::islands(&[8, 8, 8], 4);
        let free: Vec<u32> = (0..24).collect();
        let set = t.best_set(&free, 8).unwrap_or_default();
        assert!(t.all_nvlink(&set), "{set:?}");
        assert_eq!(t.best_set(&free, 25), None);
    }
}
