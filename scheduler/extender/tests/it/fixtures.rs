//! Shared helpers: the wire fixtures and a demo scheduler.

use std::path::PathBuf;
use std::sync::Arc;

use tessera_scheduler::binder::MemoryBinder;
use tessera_scheduler::http::{App, Surface};
use tessera_scheduler::state::Scheduler;

pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wire").join(name)
}

pub fn fixture(name: &str) -> String {
    std::fs::read_to_string(fixture_path(name)).unwrap_or_else(|e| panic!("reading fixture {name}: {e}"))
}

pub fn fixture_json(name: &str) -> serde_json::Value {
    serde_json::from_str(&fixture(name)).unwrap()
}

pub fn demo() -> (Arc<Scheduler>, Arc<MemoryBinder>, App) {
    let (s, b) = tessera_scheduler::demo::scheduler(tessera_core::policy::by_name("tessera").unwrap(), 0);
    let app = App::new(s.clone(), Surface::ALL);
    (s, b, app)
}
