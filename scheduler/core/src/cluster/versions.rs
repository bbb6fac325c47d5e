//! Node versions: where they come from.
//!
//! A node's version identifies its state so per-node caches (the policy memo) can reuse work
//! while it is unchanged. Versions are unique within one [`Versions`] source: every snapshot
//! owns one, its clones share it, and a snapshot rebuilt from scratch joins an older one's with
//! [`super::Snapshot::keep_versions`]. Versions from two sources say nothing about each other;
//! a cache that meets a second source starts over ([`Versions::same`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A source of node versions, shared by the snapshots of one lineage (a snapshot and its
/// clones, and the rebuilds that kept its versions). Versions start at 1; 0 is never issued.
#[derive(Clone, Debug)]
pub struct Versions(Arc<AtomicU64>);

impl Default for Versions {
    fn default() -> Self {
        Self(Arc::new(AtomicU64::new(1)))
    }
}

impl Versions {
    /// A fresh source.
    pub fn new() -> Self {
        Self::default()
    }

    /// A version this source never issued before.
    pub fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether `self` and `other` are one source (their versions are comparable).
    pub fn same(&self, other: &Versions) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
