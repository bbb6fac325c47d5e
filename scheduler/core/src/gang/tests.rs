use super::*;
use crate::cluster::{Allocation, Grant, Node};
use crate::policy::{Workload, by_name};
use crate::topology::Topology;

fn snap(nodes: Vec<Node>) -> Snapshot {
    Snapshot::new(nodes).unwrap_or_else(|e| panic!("{e}"))
}

fn member(gang: &str, i: usize, size: u32, gpus: u32) -> Demand {
    Demand::new(format!("ml/{gang}-{i}").as_str(), GpuDemand::Whole { count: gpus }).in_gang(gang, size, 30_000)
}

fn gang(name: &str, size: u32, gpus: u32) -> Vec<Demand> {
    (0..size as usize).map(|i| member(name, i, size, gpus)).collect()
}

fn occupy(s: &mut Snapshot, pod: &str, node: &str, gpus: &[u32], priority: i32, gang: Option<&str>) {
    s.allocate(Allocation {
        pod: pod.into(),
        node: node.into(),
        cpu_milli: 0,
        memory_mib: 0,
        grants: gpus.iter().map(|&gpu| Grant::Whole { gpu }).collect(),
        priority,
        gang: gang.map(str::to_owned),
        reserved_until_ms: None,
        extended: Vec::new(),
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

fn a100(name: &str) -> Node {
    Node::test(name).with_gpus(8, "A100-80GB").with_topology(Topology::islands(&[4, 4], 12))
}

fn plan(s: &mut Snapshot, members: &[Demand]) -> Result<GangPlan, Rejection> {
    let p = by_name("tessera").unwrap_or_else(|| panic!("tessera"));
    let w = Workload::default();
    plan_gang(s, members, p.as_ref(), &Context { workload: &w, seed: 1 }, 1_000)
}

#[test]
fn gang_of_four_times_two_gpus_fits_only_when_eight_suitable_gpus_are_free() {
    // Node a has 6 free GPUs, node b 2: 8 free, four members of 2 fit (3 on a, 1 on b).
    let mut s = snap(vec![a100("a"), a100("b")]);
    occupy(&mut s, "x/a01", "a", &[0, 1], 0, None);
    occupy(&mut s, "x/b", "b", &[0, 1, 2, 3, 4, 5], 0, None);
    let before = s.clone();
    let p = plan(&mut s, &gang("g", 4, 2)).unwrap_or_else(|r| panic!("{r}"));
    assert_eq!(p.members.len(), 4);
    assert_eq!(p.deadline_ms, 31_000);
    // Each member's two GPUs sit on one NVLink island of one node.
    for (_, pl) in &p.members {
        let gpus: Vec<u32> = pl.grants.iter().map(|g| g.gpu()).collect();
        assert!(gpus.iter().all(|g| *g < 4) || gpus.iter().all(|g| *g >= 4), "{gpus:?} spans islands");
    }
    assert_eq!(s.audit(), Ok(()));
    // With one GPU fewer, nothing is reserved.
    let mut s = before;
    occupy(&mut s, "x/b6", "b", &[6], 0, None);
    let untouched = s.clone();
    let r = plan(&mut s, &gang("g", 4, 2)).expect_err("only 7 GPUs free");
    assert!(r.reason().starts_with("gang ml/g") || r.reason().starts_with("gang g"), "{r}");
    assert!(r.reason().contains("does not fit after 3 of 4 members were placed"), "{r}");
    assert_eq!(s, untouched);
}

#[test]
fn a_gang_that_fits_partially_leaves_the_snapshot_unchanged() {
    let mut s = snap(vec![a100("a")]);
    let before = s.clone();
    let r = plan(&mut s, &gang("big", 3, 4)).expect_err("12 GPUs on an 8-GPU node");
    assert!(!r.is_unresolvable());
    assert_eq!(s, before);
    assert!(s.allocations().is_empty());
}

#[test]
fn a_gang_waits_for_its_members_without_reserving() {
    let mut s = snap(vec![a100("a")]);
    let mut members = gang("g", 4, 1);
    members.truncate(3);
    let r = plan(&mut s, &members).expect_err("3 of 4");
    assert_eq!(r, Rejection::unschedulable("gang g: 3 of 4 members exist; waiting for the rest"));
    assert!(s.allocations().is_empty());
}

#[test]
fn two_gangs_competing_for_the_same_gpus_never_both_get_partial_plans() {
    let mut s = snap(vec![a100("a")]);
    let first = plan(&mut s, &gang("one", 3, 2));
    let second = plan(&mut s, &gang("two", 3, 2));
    assert!(first.is_ok());
    assert!(second.is_err());
    let holders: BTreeSet<String> = s.allocations().values().filter_map(|a| a.gang.clone()).collect();
    assert_eq!(holders, BTreeSet::from(["one".to_owned()]));
    assert_eq!(s.allocations().len(), 3);
}

#[test]
fn members_of_a_gang_share_nodes_when_they_can() {
    let mut s = snap(vec![a100("a"), a100("b"), a100("c")]);
    let p = plan(&mut s, &gang("tp", 4, 2)).unwrap_or_else(|r| panic!("{r}"));
    let nodes: BTreeSet<String> = p.members.iter().map(|(_, pl)| pl.node.0.clone()).collect();
    assert_eq!(nodes.len(), 1, "{nodes:?}");
}

#[test]
fn an_expired_plan_frees_everything_and_a_bound_one_stays() {
    let mut s = snap(vec![a100("a")]);
    let empty = s.clone();
    let p = plan(&mut s, &gang("g", 2, 2)).unwrap_or_else(|r| panic!("{r}"));
    assert!(expire(&mut s, p.deadline_ms - 1).is_empty());
    let gone = expire(&mut s, p.deadline_ms);
    assert_eq!(gone.len(), 2);
    assert_eq!(s, empty);
    // Bound members no longer lapse.
    let p = plan(&mut s, &gang("h", 2, 2)).unwrap_or_else(|r| panic!("{r}"));
    for (pod, _) in &p.members {
        bind(&mut s, pod).unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(expire(&mut s, u64::MAX).is_empty());
    assert_eq!(release_gang(&mut s, "h").len(), 2);
    assert_eq!(s, empty);
}

#[test]
fn preemption_evicts_whole_gangs_or_single_pods_never_part_of_a_gang() {
    let mut s = snap(vec![a100("a")]);
    // A low-priority gang holds 4 GPUs (2 members), a single low pod 2, a high pod 2.
    occupy(&mut s, "lo/g0", "a", &[0, 1], 0, Some("lo-gang"));
    occupy(&mut s, "lo/g1", "a", &[2, 3], 0, Some("lo-gang"));
    occupy(&mut s, "lo/single", "a", &[4, 5], 0, None);
    occupy(&mut s, "hi/keep", "a", &[6, 7], 100, None);
    let p = by_name("tessera").unwrap_or_else(|| panic!("tessera"));
    let w = Workload::default();
    let ctx = Context { workload: &w, seed: 1 };
    // Needs 2 GPUs: the single low pod is the smallest unit that frees 2 on one island.
    let d = Demand::new("hi/new", GpuDemand::Whole { count: 2 }).with_priority(50);
    let v = preemption_victims(&s, &[d], p.as_ref(), &ctx);
    assert_eq!(v, Some(vec![PodKey::from("lo/single")]));
    // Needs 4 GPUs on one island: only the whole gang frees an island; never one member.
    let d = Demand::new("hi/tp4", GpuDemand::Whole { count: 4 }).with_priority(50);
    let v = preemption_victims(&s, &[d], p.as_ref(), &ctx).unwrap_or_default();
    assert!(v.contains(&PodKey::from("lo/g0")) && v.contains(&PodKey::from("lo/g1")), "{v:?}");
    // Nothing outranks priority 100: no victims for an equal-priority demand of 8 GPUs.
    let d = Demand::new("x/all", GpuDemand::Whole { count: 8 }).with_priority(100);
    assert_eq!(preemption_victims(&s, &[d], p.as_ref(), &ctx), None);
}

#[test]
fn a_mig_member_weighs_its_profiles_compute_slices_from_the_geometry() {
    let mig = |name: &str| Demand::new("ml/m", GpuDemand::Mig { profile: name.into() });
    for product in crate::mig::MigProduct::ALL {
        for p in product.geometry().profiles {
            assert_eq!(weight(&mig(p.name)), u64::from(p.compute_slices) * 1000 / 7, "{product} {}", p.name);
        }
    }
    // Names match without regard to case (as validation accepts them): a 3g is still a 3g.
    assert_eq!(weight(&mig("3G.40GB")), 3000 / 7);
    assert_eq!(weight(&mig("4G.24GB")), 4000 / 7);
    // The resource form of a media profile.
    assert_eq!(weight(&mig("2g.12gb.me")), 2000 / 7);
}
