//! tessera on a real control plane, one cluster per test (docs/testing.md says what each shows).
//!
//! Run: `KUBEBUILDER_ASSETS=... cargo test -p tessera-e2e` (scripts/test.sh sets it). Tests run
//! `TESSERA_E2E_PARALLEL` at a time (default 2). Without the Kubernetes binaries the tests are
//! ignored with one line, except under `CI=true`, where that is a failure.
#![allow(clippy::disallowed_methods)] // tests wait on a real cluster with deadlines

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use anyhow::Result;
use libtest_mimic::{Arguments, Failed, Trial};
use tessera_e2e::Bins;

#[path = "../common/mod.rs"]
mod common;
mod examples;
mod scenarios;

/// What each test gets: the binaries and its own log folder.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub bins: Bins,
    pub dir: PathBuf,
}

pub type TestFuture = Pin<Box<dyn Future<Output = Result<()>> + Send>>;
pub type TestFn = Box<dyn Fn(Ctx) -> TestFuture + Send + Sync>;

/// Runs one test on its own runtime; on failure, the error and the tail of every process log.
fn run(name: &str, bins: &Bins, f: &TestFn) -> Result<(), Failed> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("tessera-e2e-{name}-"))
        .tempdir()
        .map_err(|e| Failed::from(format!("creating a temp dir: {e}")))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failed::from(format!("starting a runtime: {e}")))?;
    let ctx = Ctx { bins: bins.clone(), dir: dir.path().to_owned() };
    let fut = f(ctx);
    // A panic inside the test still drops the cluster (and stops its processes) on unwind.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(300), fut).await })
    }));
    rt.shutdown_timeout(Duration::from_secs(5));
    let error = match outcome {
        Ok(Ok(Ok(()))) => None,
        Ok(Ok(Err(e))) => Some(format!("{e:#}")),
        Ok(Err(_)) => Some("the test ran longer than 300 s".to_owned()),
        Err(p) => Some(
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panicked".into()),
        ),
    };
    match error {
        None => Ok(()),
        Some(e) => {
            let logs = tessera_e2e::proc::log_tails(dir.path(), 40);
            if std::env::var_os("TESSERA_E2E_KEEP").is_some() {
                let kept = dir.keep();
                return Err(Failed::from(format!("{e}\nlogs kept in {}\n{logs}", kept.display())));
            }
            Err(Failed::from(format!("{e}\n{logs}")))
        }
    }
}

fn main() {
    let mut args = Arguments::from_args();
    if args.test_threads.is_none() {
        let n = std::env::var("TESSERA_E2E_PARALLEL").ok().and_then(|v| v.parse().ok()).unwrap_or(2usize);
        args.test_threads = Some(n.max(1));
    }
    let mut tests: Vec<(String, TestFn)> = Vec::new();
    scenarios::register(&mut tests);
    examples::register(&mut tests);

    // Listing needs no binaries (and must not build them).
    let located = if args.list { Err(String::new()) } else { Bins::locate() };
    let trials: Vec<Trial> = match located {
        Ok(bins) => tests
            .into_iter()
            .map(|(name, f)| {
                let bins = bins.clone();
                let n = name.clone();
                Trial::test(name, move || run(&n, &bins, &f))
            })
            .collect(),
        Err(why) if args.list => {
            let _ = why;
            tests.into_iter().map(|(name, _)| Trial::test(name, || Ok(()))).collect()
        }
        Err(why) => common::unavailable("tessera-e2e", tests.into_iter().map(|(name, _)| name), &why),
    };
    libtest_mimic::run(&args, trials).exit();
}
