use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[test]
fn fake_backend_agent_applies_a_spec_serves_status_metrics_and_the_plugin_socket() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("spec.json");
    std::fs::write(
        &spec,
        r#"{"gpus":[{"index":0,"mode":"mig","instances":[{"profile":"3g.40gb","start":0},{"profile":"3g.40gb","start":4}]},{"index":7,"mode":"full"}]}"#,
    )
    .unwrap();
    let port = free_port();
    let dp = dir.path().join("dp");
    let child = Command::new(env!("CARGO_BIN_EXE_tessera-mig-manager"))
        .args([
            "--node-name",
            "dev",
            "--backend",
            "fake",
            "--fake-gpus",
            "h100x8:mig",
            "--standalone",
            "--resync-secs",
            "1",
        ])
        .arg("--spec-file")
        .arg(&spec)
        .arg("--device-plugin-dir")
        .arg(&dp)
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _child = Killed(child);

    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(r) = get(port, "/status").filter(|r| r.starts_with("HTTP/1.1 200")) {
            break r;
        }
        assert!(Instant::now() < deadline, "no status within 20 s");
        std::thread::sleep(Duration::from_millis(100));
    };
    let body = &status[status.find("\r\n\r\n").unwrap() + 4..];
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    let gpus = v["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 8);
    assert_eq!(gpus[0]["instances"].as_array().unwrap().len(), 2);
    assert_eq!(gpus[7]["mode"], "full");
    let reconciled = v["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Reconciled").unwrap();
    assert_eq!(reconciled["reason"], "Converged");

    let metrics = get(port, "/metrics").unwrap();
    assert!(metrics.contains("tessera_node_reconcile_converged 1"), "{metrics}");
    assert!(metrics.contains("tessera_node_mig_instance_info{gpu=\"0\",profile=\"3g.40gb\""));
    assert!(dp.join("tessera-gpu.sock").exists(), "device plugin socket served");
}

#[test]
fn null_backend_reports_no_nvml() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_tessera-mig-manager"))
        .args(["--node-name", "dev", "--backend", "null", "--standalone", "--resync-secs", "1"])
        .arg("--device-plugin-dir")
        .arg(dir.path())
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _child = Killed(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(r) = get(port, "/status").filter(|r| r.starts_with("HTTP/1.1 200")) {
            break r;
        }
        assert!(Instant::now() < deadline, "no status within 20 s");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.contains("\"NoNvml\""), "{status}");
    assert!(!dir.path().join("tessera-gpu.sock").exists(), "nothing served without NVML");
}
