//! `tessera-sim whatif` end to end: flags, exit status, text and JSON answers.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/whatif").join(name)
}

fn sim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera-sim")).arg("whatif").args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn whatif_prints_where_each_pod_goes_and_exits_zero_when_everything_fits() {
    let cap = fixture("capture.json");
    let pods = fixture("extra.yaml");
    let out = sim(&["--capture", cap.to_str().unwrap(), "--pods", pods.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    let line = |pod: &str| stdout.lines().find(|l| l.trim_start().starts_with(pod)).unwrap_or_default().to_owned();
    let asr = line("ml/asr-1 ");
    assert!(asr.contains("gpu-a") && asr.ends_with("GPU0 1g.10gb@5"), "{stdout}");
    assert!(stdout.contains("gang ml/train: 2 members, all placed"), "{stdout}");
    assert!(line("ml/train-0").contains("gpu-b") && line("ml/train-1").contains("gpu-b"), "{stdout}");
    assert!(stdout.contains("3 of 3 pods fit."), "{stdout}");
}

#[test]
fn whatif_exits_three_when_a_gang_does_not_fit_and_writes_the_reason_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("out.json");
    let cap = fixture("capture.json");
    let pods = fixture("big-gang.yaml");
    let out =
        sim(&["--capture", cap.to_str().unwrap(), "--pods", pods.to_str().unwrap(), "--json", json.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}{}", text(&out.stdout), text(&out.stderr));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!((v["fits"].as_bool(), v["placed"].as_u64(), v["pods"].as_u64()), (Some(false), Some(0), Some(2)));
    let why = v["outcomes"][0]["reason"].as_str().unwrap_or_default();
    assert!(why.contains("needs 4 whole GPUs, 3 free"), "{why}");
    assert_eq!(v["outcomes"][0]["gang"], "ml/finetune");
}

#[test]
fn whatif_finds_the_fewest_added_nodes_and_answers_in_json_on_stdout() {
    let cap = fixture("capture.json");
    let pods = fixture("big-gang.yaml");
    let (cap, pods) = (cap.to_str().unwrap(), pods.to_str().unwrap());
    let out = sim(&["--capture", cap, "--pods", pods, "--add-nodes-like", "gpu-b", "--max-add", "4", "--json", "-"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["added"]["nodes"], 2);
    assert_eq!(v["added"]["template"], "like gpu-b");
    assert_eq!(v["outcomes"][1]["node"], "gpu-b-new-2");

    let out = sim(&["--capture", cap, "--pods", pods, "--add-nodes-like", "gpu-b", "--max-add", "1"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out.stdout).contains("does not fit even with 1 added nodes like gpu-b (--max-add)"));
}

#[test]
fn whatif_refuses_bad_input_with_a_message_and_no_panic() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\"kind\": \"List\", \"items\": [").unwrap();
    let cap = fixture("capture.json");
    let pods = fixture("extra.yaml");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--capture", bad.to_str().unwrap(), "--pods", pods.to_str().unwrap()], "not valid JSON"),
        (vec!["--capture", cap.to_str().unwrap(), "--pods", bad.to_str().unwrap()], "not valid JSON"),
        (vec!["--capture", cap.to_str().unwrap()], "nothing to place"),
        (vec!["--capture", cap.to_str().unwrap(), "--pending", "--policy", "nope"], "unknown policy \"nope\""),
        (
            vec!["--capture", cap.to_str().unwrap(), "--pending", "--add-nodes-like", "gpu-z"],
            "the capture has no node gpu-z",
        ),
        (vec!["--capture", "/nonexistent/cap.json", "--pending"], "reading /nonexistent/cap.json"),
    ];
    for (args, want) in cases {
        let out = sim(&args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(want) && !stderr.contains("panicked"), "{args:?}: want {want:?} in {stderr}");
    }
}
