//! Child processes: one log file each, stopped with SIGTERM and then SIGKILL when dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};

/// A running process and its log.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    pub name: String,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `program args` with stdout and stderr in `log` (appended: a restart keeps the
    /// earlier run's lines).
    pub fn spawn(name: &str, program: &Path, args: &[String], env: &[(&str, String)], log: &Path) -> Result<Self> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::from(out)).stderr(Stdio::from(err));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().with_context(|| format!("starting {name} ({})", program.display()))?;
        Ok(Self { child, name: name.to_owned(), log: log.to_owned() })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// `kill -9`: no chance to clean up, as a crashed or OOM-killed process.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Already reaped: Drop has nothing left to stop.
    }

    fn stop(&mut self) {
        if !self.running() {
            return;
        }
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        for _ in 0..50 {
            if !self.running() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// A loopback port nothing listens on, never the same twice in this process (parallel tests
/// each start several servers).
pub fn free_port() -> Result<u16> {
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut seen = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if !seen.contains(&port) {
            seen.push(port);
            return Ok(port);
        }
    }
    anyhow::bail!("no free loopback port after 100 tries")
}

/// The last `lines` lines of every `*.log` in `dir`, for a failed test's report.
pub fn log_tails(dir: &Path, lines: usize) -> String {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "log")).collect()
        })
        .unwrap_or_default();
    logs.sort();
    let mut out = String::new();
    for log in logs {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let from = all.len().saturating_sub(lines);
        out.push_str(&format!("----- {} (last {} of {} lines)\n", log.display(), all.len() - from, all.len()));
        for l in &all[from..] {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}
