//! What the last filter saw per pod, in a map capped in size.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tessera_core::policy::NodeVerdict;
use tessera_core::{Demand, PodKey};

/// What the last filter saw for one pod.
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    pub(crate) uid: String,
    pub(crate) demand: Result<Demand, String>,
    pub(crate) generation: u64,
    pub(crate) at_ms: u64,
    /// Shared with the filter's [`FilterReply`], which is written from them.
    pub(crate) verdicts: Arc<Vec<NodeVerdict>>,
}

/// A map that forgets its oldest entries past `cap`.
#[derive(Debug)]
pub(crate) struct Bounded<V> {
    map: HashMap<PodKey, V>,
    order: VecDeque<PodKey>,
    cap: usize,
}

impl<V> Bounded<V> {
    pub(crate) fn new(cap: usize) -> Self {
        Self { map: HashMap::new(), order: VecDeque::new(), cap }
    }
    /// Inserts; returns what was evicted or replaced, for the caller to drop outside its lock.
    pub(crate) fn insert(&mut self, k: PodKey, v: V) -> Vec<V> {
        let mut gone = Vec::new();
        match self.map.insert(k.clone(), v) {
            Some(old) => gone.push(old),
            None => self.order.push_back(k),
        }
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front().and_then(|k| self.map.remove(&k)) {
                gone.push(old);
            }
        }
        gone
    }
    pub(crate) fn get(&self, k: &PodKey) -> Option<&V> {
        self.map.get(k)
    }
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&PodKey, &V)> {
        self.map.iter()
    }
    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.map.values()
    }
}
