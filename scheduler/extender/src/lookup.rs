//! How the scheduler reads pods and PodGroups by name: the reflector stores (live) or memory.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::RwLock;

use k8s_openapi::api::core::v1::Pod;
use tessera_api::podgroup::PodGroupSpec;

/// Pods and PodGroups by name, from the reflector stores (live) or memory (demo).
pub trait Lookup: Send + Sync + fmt::Debug {
    fn pod(&self, namespace: &str, name: &str) -> Option<Pod>;
    fn pod_group(&self, namespace: &str, name: &str) -> Option<PodGroupSpec>;
}

/// A [`Lookup`] held in memory: demo mode and tests.
#[derive(Debug, Default)]
pub struct MemoryLookup {
    pub pods: RwLock<BTreeMap<(String, String), Pod>>,
    pub groups: RwLock<BTreeMap<(String, String), PodGroupSpec>>,
}

impl MemoryLookup {
    pub fn add_group(&self, namespace: &str, name: &str, spec: PodGroupSpec) {
        if let Ok(mut g) = self.groups.write() {
            g.insert((namespace.to_owned(), name.to_owned()), spec);
        }
    }
}

impl Lookup for MemoryLookup {
    fn pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        self.pods.read().ok()?.get(&(namespace.to_owned(), name.to_owned())).cloned()
    }
    fn pod_group(&self, namespace: &str, name: &str) -> Option<PodGroupSpec> {
        self.groups.read().ok()?.get(&(namespace.to_owned(), name.to_owned())).cloned()
    }
}
