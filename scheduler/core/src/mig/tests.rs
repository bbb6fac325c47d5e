use std::collections::BTreeSet;

use super::*;

/// The `nvidia-smi mig -lgipp` table for 8-slice products: (class, allowed starts, size).
const LGIPP_8: &[(ProfileClass, &[u8], u8)] = &[
    (ProfileClass::G1, &[0, 1, 2, 3, 4, 5, 6], 1),
    (ProfileClass::G1Me, &[0, 1, 2, 3, 4, 5, 6], 1),
    (ProfileClass::G1X2, &[0, 2, 4, 6], 2),
    (ProfileClass::G2, &[0, 2, 4], 2),
    (ProfileClass::G3, &[0, 4], 4),
    (ProfileClass::G4, &[0], 4),
    (ProfileClass::G7, &[0], 8),
];

/// Profile names per product from the MIG User Guide (1g, 1g+me, 1g double, 2g, 3g, 4g, 7g).
const NAMES: &[(MigProduct, [&str; 7])] = &[
    (MigProduct::A100_40GB, ["1g.5gb", "1g.5gb+me", "1g.10gb", "2g.10gb", "3g.20gb", "4g.20gb", "7g.40gb"]),
    (MigProduct::A100_80GB, ["1g.10gb", "1g.10gb+me", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"]),
    (MigProduct::H100_80GB, ["1g.10gb", "1g.10gb+me", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"]),
    (MigProduct::H100_94GB, ["1g.12gb", "1g.12gb+me", "1g.24gb", "2g.24gb", "3g.47gb", "4g.47gb", "7g.94gb"]),
    (MigProduct::H100_96GB, ["1g.12gb", "1g.12gb+me", "1g.24gb", "2g.24gb", "3g.48gb", "4g.48gb", "7g.96gb"]),
    (MigProduct::H200_141GB, ["1g.18gb", "1g.18gb+me", "1g.35gb", "2g.35gb", "3g.71gb", "4g.71gb", "7g.141gb"]),
    (MigProduct::B200_180GB, ["1g.23gb", "1g.23gb+me", "1g.45gb", "2g.45gb", "3g.90gb", "4g.90gb", "7g.180gb"]),
];

/// (compute, memory slices, max count) per class, identical on every 8-slice product.
fn slices(class: ProfileClass) -> (u8, u8, u8) {
    match class {
        ProfileClass::G1 => (1, 1, 7),
        ProfileClass::G1Me => (1, 1, 1),
        ProfileClass::G1X2 => (1, 2, 4),
        ProfileClass::G2 | ProfileClass::G2Me => (2, 2, 3),
        ProfileClass::G3 => (3, 4, 2),
        ProfileClass::G4 => (4, 4, 1),
        ProfileClass::G7 => (7, 8, 1),
    }
}

#[test]
fn every_eight_slice_product_matches_the_nvidia_table() {
    for (product, names) in NAMES {
        let geom = product.geometry();
        assert_eq!((geom.memory_slices, geom.compute_slices, geom.max_instances), (8, 7, 7), "{product}");
        assert_eq!(geom.profiles.len(), 7, "{product}");
        for ((class, starts, size), name) in LGIPP_8.iter().zip(names) {
            let p = geom.profile(*class).unwrap_or_else(|| panic!("{product} lacks {class:?}"));
            assert_eq!(p.name, *name, "{product} {class:?}");
            assert_eq!(geom.profile_by_name(name).map(|p| p.class), Some(*class), "{product} {name}");
            assert_eq!(p.starts, *starts, "{product} {name} starts");
            assert_eq!(p.memory_slices, *size, "{product} {name} size");
            let (c, m, n) = slices(*class);
            assert_eq!((p.compute_slices, p.memory_slices, p.max_count), (c, m, n), "{product} {name}");
        }
    }
}

#[test]
fn a100_memory_sizes_are_the_exact_nvml_values() {
    let mib = |p: MigProduct, n: &str| p.geometry().profile_by_name(n).map(|p| p.memory_mib);
    assert_eq!(mib(MigProduct::A100_40GB, "1g.5gb"), Some(4_864));
    assert_eq!(mib(MigProduct::A100_40GB, "2g.10gb"), Some(9_856));
    assert_eq!(mib(MigProduct::A100_40GB, "3g.20gb"), Some(19_968));
    assert_eq!(mib(MigProduct::A100_40GB, "7g.40gb"), Some(40_192));
    assert_eq!(mib(MigProduct::A100_80GB, "1g.10gb"), Some(9_856));
    assert_eq!(mib(MigProduct::A100_80GB, "1g.20gb"), Some(19_968));
    assert_eq!(mib(MigProduct::A100_80GB, "4g.40gb"), Some(40_192));
    assert_eq!(mib(MigProduct::A100_80GB, "7g.80gb"), Some(80_384));
}

#[test]
fn every_allowed_start_is_accepted_and_every_other_rejected_with_a_reason() {
    for product in MigProduct::ALL {
        let geom = product.geometry();
        for p in geom.profiles {
            for start in 0..geom.memory_slices {
                let empty = MigLayout::empty(product);
                let r = empty.check(p.class, start);
                if p.starts.contains(&start) {
                    assert!(r.is_ok(), "{product} {} at {start}: {r:?}", p.name);
                    let mut l = MigLayout::empty(product);
                    l.create(p.class, start).unwrap_or_else(|e| panic!("{product} {}: {e}", p.name));
                    assert_eq!(l.used_mask(), p.mask_at(start));
                } else {
                    let e = r.expect_err("illegal start accepted");
                    assert!(matches!(e, MigError::BadStart { .. }), "{product} {} at {start}: {e}", p.name);
                    assert!(e.to_string().contains("allowed starts"), "{e}");
                }
            }
        }
    }
}

#[test]
fn a30_has_four_slices_and_its_own_table() {
    let g = MigProduct::A30_24GB.geometry();
    assert_eq!((g.memory_slices, g.compute_slices, g.max_instances), (4, 4, 4));
    let row = |n: &str| g.profile_by_name(n).map(|p| (p.compute_slices, p.memory_slices, p.max_count, p.starts));
    assert_eq!(row("1g.6gb"), Some((1, 1, 4, &[0u8, 1, 2, 3][..])));
    assert_eq!(row("1g.6gb+me"), Some((1, 1, 1, &[0u8, 1, 2, 3][..])));
    assert_eq!(row("2g.12gb"), Some((2, 2, 2, &[0u8, 2][..])));
    assert_eq!(row("2g.12gb+me"), Some((2, 2, 1, &[0u8, 2][..])));
    assert_eq!(row("4g.24gb"), Some((4, 4, 1, &[0u8][..])));
    let mut l = MigLayout::empty(MigProduct::A30_24GB);
    l.create(ProfileClass::G1Me, 0).ok();
    assert!(matches!(l.check(ProfileClass::G2Me, 2), Err(MigError::MediaTaken { .. })));
    assert_eq!(l.placements(ProfileClass::G2), vec![2]);
}

#[test]
fn overlaps_are_rejected_naming_the_slices() {
    let mut l = MigLayout::empty(MigProduct::H100_80GB);
    l.create(ProfileClass::G3, 0).unwrap_or_else(|e| panic!("{e}"));
    let e = l.check(ProfileClass::G2, 2).expect_err("overlap accepted");
    assert_eq!(e.to_string(), "2g.20gb at 2 overlaps memory slices 2,3 already in use");
    assert_eq!(l.placements(ProfileClass::G2), vec![4]);
    assert_eq!(l.placements(ProfileClass::G1), vec![4, 5, 6]);
    assert_eq!(l.placements(ProfileClass::G4), Vec::<u8>::new());
    // 4g + 3g is allowed (driver R510+).
    let l = MigLayout::from_instances(
        MigProduct::H100_80GB,
        &[Instance { class: ProfileClass::G4, start: 0 }, Instance { class: ProfileClass::G3, start: 4 }],
    );
    assert!(l.is_ok());
}

#[test]
fn media_engines_go_to_one_instance_only() {
    let mut l = MigLayout::empty(MigProduct::A100_40GB);
    l.create(ProfileClass::G1Me, 0).unwrap_or_else(|e| panic!("{e}"));
    let e = l.check(ProfileClass::G1Me, 1).expect_err("second +me accepted");
    assert!(matches!(e, MigError::TooMany { max: 1, .. }), "{e}");
}

#[test]
fn the_eighth_memory_slice_is_reachable_only_by_7g_3g_at_4_or_double_memory_1g_at_6() {
    for p in MigProduct::H100_80GB.geometry().profiles {
        let reaches = p.starts.iter().any(|&s| p.mask_at(s) & 0x80 != 0);
        assert_eq!(reaches, matches!(p.class, ProfileClass::G7 | ProfileClass::G3 | ProfileClass::G1X2), "{}", p.name);
    }
    // 3g@0 + 1g@{4,5,6} strands slice 7 and one compute slice; 3g@4 + 4x1g uses all 7.
    let a = MigLayout::from_instances(
        MigProduct::H100_80GB,
        &[(ProfileClass::G3, 0), (ProfileClass::G1, 4), (ProfileClass::G1, 5), (ProfileClass::G1, 6)]
            .map(|(class, start)| Instance { class, start }),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(a.used_compute(), 6);
    assert_eq!(a.largest_placeable(), None, "slice 7 alone fits no profile");
    let b = MigLayout::from_instances(
        MigProduct::H100_80GB,
        &[
            (ProfileClass::G3, 4),
            (ProfileClass::G1, 0),
            (ProfileClass::G1, 1),
            (ProfileClass::G1, 2),
            (ProfileClass::G1, 3),
        ]
        .map(|(class, start)| Instance { class, start }),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(b.used_compute(), 7);
}

/// Every maximal layout (nothing more fits) reachable with non-media profiles.
fn maximal_layouts(product: MigProduct, use_class: fn(ProfileClass) -> bool) -> BTreeSet<Vec<Instance>> {
    fn grow(l: &MigLayout, use_class: fn(ProfileClass) -> bool, out: &mut BTreeSet<Vec<Instance>>) {
        let mut extended = false;
        for p in l.geometry().profiles.iter().filter(|p| use_class(p.class)) {
            for s in l.placements(p.class) {
                let mut next = l.clone();
                if next.create(p.class, s).is_ok() {
                    extended = true;
                    if !out.contains(next.instances()) {
                        grow(&next, use_class, out);
                    }
                }
            }
        }
        if !extended {
            out.insert(l.instances().to_vec());
        }
    }
    let mut out = BTreeSet::new();
    grow(&MigLayout::empty(product), use_class, &mut out);
    out
}

#[test]
fn one_gpu_has_19_maximal_layouts_and_14_profile_multisets() {
    // Over 1g, 2g, 3g, 4g and 7g (no media, no double-memory 1g), as the geometry spec computes.
    let plain =
        |c| matches!(c, ProfileClass::G1 | ProfileClass::G2 | ProfileClass::G3 | ProfileClass::G4 | ProfileClass::G7);
    let layouts = maximal_layouts(MigProduct::A100_40GB, plain);
    let multisets: BTreeSet<Vec<ProfileClass>> = layouts
        .iter()
        .map(|v| {
            let mut c: Vec<_> = v.iter().map(|i| i.class).collect();
            c.sort();
            c
        })
        .collect();
    assert_eq!((layouts.len(), multisets.len()), (19, 14));
}

#[test]
fn enumeration_finds_every_maximal_layout() {
    // Every maximal layout is legal, leaves no free placement, and never exceeds 7 compute slices.
    let layouts = maximal_layouts(MigProduct::H100_80GB, |c| !c.has_media());
    assert!(!layouts.is_empty());
    for inst in &layouts {
        let l = MigLayout::from_instances(MigProduct::H100_80GB, inst).unwrap_or_else(|e| panic!("{e}"));
        assert!(l.used_compute() <= 7, "{inst:?}");
        assert!(l.largest_placeable().is_none(), "{inst:?} is not maximal");
    }
    // The well-known maximal layouts are among them.
    let has = |v: &[(ProfileClass, u8)]| {
        layouts.contains(&v.iter().map(|&(class, start)| Instance { class, start }).collect::<Vec<_>>())
    };
    assert!(has(&[(ProfileClass::G7, 0)]));
    assert!(has(&[(ProfileClass::G4, 0), (ProfileClass::G3, 4)]));
    assert!(has(&[(ProfileClass::G3, 0), (ProfileClass::G3, 4)]));
    assert!(has(&[(ProfileClass::G2, 0), (ProfileClass::G2, 2), (ProfileClass::G2, 4), (ProfileClass::G1X2, 6)]));
}

#[test]
fn layouts_round_trip_through_serde_and_illegal_ones_are_refused() {
    let l = MigLayout::from_instances(MigProduct::H200_141GB, &[Instance { class: ProfileClass::G3, start: 4 }])
        .unwrap_or_else(|e| panic!("{e}"));
    let json = serde_json::to_string(&l).unwrap_or_default();
    let back: MigLayout = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(back, l);
    assert_eq!(back.used_mask(), 0xF0);
    let bad = r#"{"product":"H100-80GB","instances":[{"class":"g3","start":0},{"class":"g2","start":2}]}"#;
    let e = serde_json::from_str::<MigLayout>(bad).expect_err("overlap accepted");
    assert!(e.to_string().contains("overlaps"), "{e}");
}

#[test]
fn nvidia_resource_names_replace_plus_with_a_dot() {
    let h100 = MigProduct::H100_80GB.geometry();
    assert_eq!(nvidia_resource_name(h100.profile(ProfileClass::G3).unwrap()), "nvidia.com/mig-3g.40gb");
    assert_eq!(nvidia_resource_name(h100.profile(ProfileClass::G1Me).unwrap()), "nvidia.com/mig-1g.10gb.me");
    let a30 = MigProduct::A30_24GB.geometry();
    assert_eq!(nvidia_resource_name(a30.profile(ProfileClass::G2Me).unwrap()), "nvidia.com/mig-2g.12gb.me");
    // The resource form names the same profile.
    assert_eq!(h100.profile_by_name("1g.10gb.me").map(|p| p.class), Some(ProfileClass::G1Me));
    assert_eq!(h100.profile_by_name("1G.10GB+ME").map(|p| p.class), Some(ProfileClass::G1Me));
    assert_eq!(h100.profile_by_name("1g.10gb"), h100.profile(ProfileClass::G1));
    assert!(h100.profile_by_name("1g.10gbxme").is_none());
}

#[test]
fn all_nvidia_resource_names_cover_every_product_once() {
    let names = all_nvidia_resource_names();
    assert_eq!(names[0], "nvidia.com/gpu");
    let unique: BTreeSet<&String> = names.iter().collect();
    assert_eq!(unique.len(), names.len(), "duplicates in {names:?}");
    for product in MigProduct::ALL {
        for p in product.geometry().profiles {
            assert!(names.contains(&nvidia_resource_name(p)), "{product} {} missing", p.name);
        }
    }
    for name in ["nvidia.com/mig-1g.6gb", "nvidia.com/mig-2g.12gb.me", "nvidia.com/mig-4g.24gb"] {
        assert!(names.iter().any(|n| n == name), "A30 {name} missing");
    }
    for name in ["nvidia.com/mig-7g.180gb", "nvidia.com/mig-3g.48gb", "nvidia.com/mig-7g.96gb"] {
        assert!(names.iter().any(|n| n == name), "{name} missing");
    }
}

const SCHEDULER_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../manifests/base/scheduler-config.yaml");
const BEGIN: &str = "# BEGIN generated: every NVIDIA resource name of tessera-core's MIG table";
const END: &str = "# END generated";

/// `text` with the lines between the BEGIN and END markers replaced by the generated list.
fn with_generated_managed_resources(text: &str) -> Result<String, String> {
    let lines: Vec<&str> = text.lines().collect();
    let begin = lines.iter().position(|l| l.trim_start().starts_with(BEGIN)).ok_or("no BEGIN marker")?;
    let end = begin + lines[begin..].iter().position(|l| l.trim() == END).ok_or("no END marker after BEGIN")?;
    let indent = &lines[begin][..lines[begin].len() - lines[begin].trim_start().len()];
    let mut out: Vec<String> = lines[..=begin].iter().map(|l| l.to_string()).collect();
    out.extend(all_nvidia_resource_names().iter().map(|n| format!("{indent}- name: {n}")));
    out.extend(lines[end..].iter().map(|l| l.to_string()));
    Ok(out.join("\n") + "\n")
}

#[test]
fn managed_resources_in_the_scheduler_config_are_the_generated_list() {
    let have = std::fs::read_to_string(SCHEDULER_CONFIG).expect("manifests/base/scheduler-config.yaml");
    let want = with_generated_managed_resources(&have).expect("markers in manifests/base/scheduler-config.yaml");
    if std::env::var_os("TESSERA_BLESS").is_some() && have != want {
        std::fs::write(SCHEDULER_CONFIG, &want).unwrap();
        return;
    }
    assert!(
        have == want,
        "managedResources in manifests/base/scheduler-config.yaml differ from tessera-core's MIG table; \
         run TESSERA_BLESS=1 cargo test -p tessera-core managed_resources"
    );
}

#[test]
fn the_generated_block_replaces_only_what_is_between_the_markers() {
    let text = format!("a: 1\n  {BEGIN} (x)\n  - name: stale\n  {END}\nb: 2\n");
    let out = with_generated_managed_resources(&text).unwrap();
    assert!(out.starts_with(&format!("a: 1\n  {BEGIN} (x)\n  - name: nvidia.com/gpu\n")));
    assert!(out.ends_with(&format!("  - name: nvidia.com/mig-4g.24gb\n  {END}\nb: 2\n")));
    assert!(!out.contains("stale"));
    assert_eq!(with_generated_managed_resources("a: 1\n"), Err("no BEGIN marker".to_string()));
}

#[test]
fn a_profile_name_has_the_same_compute_slices_on_every_product_that_has_it() {
    for product in MigProduct::ALL {
        for p in product.geometry().profiles {
            let found = crate::mig::profile_named(p.name).map(|f| f.compute_slices);
            assert_eq!(found, Some(p.compute_slices), "{product} {}", p.name);
            let resource = p.name.replace('+', ".");
            let found = crate::mig::profile_named(&resource).map(|f| f.compute_slices);
            assert_eq!(found, Some(p.compute_slices), "{product} {resource}");
        }
    }
    assert_eq!(crate::mig::profile_named("5g.50gb"), None);
}
