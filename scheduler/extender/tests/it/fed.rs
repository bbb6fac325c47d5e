//! A watch fed by the caller (`Watch::fed`) runs the live state path: the first lists build the
//! state with signed assignments checked, and a pod deletion frees what the pod held.

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::watcher::Event;
use tessera_api::signing::{Keyring, Keys};
use tessera_api::synthetic::{a100_nodes, bound_pod};
use tessera_scheduler::binder::MemoryBinder;
use tessera_scheduler::cluster::Watch;
use tessera_scheduler::state::{MemoryLookup, Scheduler, Settings};

const KEY: &str = "k1 dGVzc2VyYS1yZWJ1aWxkLWJlbmNoLWtleS0zMmJ5dGVzLg";

/// Waits (bounded) until `cond` holds on the scheduler's state.
async fn until(s: &Scheduler, what: &str, cond: impl Fn(&tessera_core::Snapshot) -> bool) {
    for _ in 0..250 {
        if s.with_snapshot(&cond) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("not reached within 5 s: {what}");
}

#[tokio::test]
async fn a_fed_watch_builds_the_state_and_applies_a_deletion() {
    let ring = Keyring::parse(KEY).expect("key");
    let (nodes, gpunodes) = a100_nodes(2);
    // Pods 0–3 hold a GPU each (two per node); 4–5 only cpu.
    let pods: Vec<_> = (0..6).map(|p| bound_pod(&ring, 2, p, &format!("uid-{p}"), 2)).collect();
    let sched = Arc::new(Scheduler::new(
        tessera_core::Snapshot::default(),
        tessera_core::policy::by_name("tessera").expect("policy"),
        Arc::new(MemoryBinder::default()),
        Arc::new(MemoryLookup::default()),
        Settings {
            mode: "live",
            assignment_keys: Some(Arc::new(Keys::fixed(Keyring::parse(KEY).expect("key")))),
            ..Settings::default()
        },
    ));
    let (watch, mut feed) = Watch::fed();
    let task = tokio::spawn(watch.sync(sched.clone(), Duration::from_millis(10)));
    feed.list(nodes, gpunodes, pods.clone(), Vec::new());
    until(&sched, "6 pods on 2 nodes", |s| s.nodes().len() == 2 && s.allocations().len() == 6).await;
    let gpus_held = |s: &tessera_core::Snapshot| s.allocations().values().filter(|a| !a.grants.is_empty()).count();
    assert_eq!(sched.with_snapshot(gpus_held), 4, "the signed assignments are trusted");

    feed.pod(Event::Delete(pods[0].clone()));
    until(&sched, "pod 0 released", |s| s.allocations().len() == 5).await;
    assert_eq!(sched.with_snapshot(gpus_held), 3, "its GPU is free again");
    assert!(sched.with_snapshot(|s| s.allocation(&"bench/p-0".into()).is_none()));
    task.abort();
}
