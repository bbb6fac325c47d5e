//! Log setup for the binary: `RUST_LOG`-style filter (default `info`), optional JSON lines.
//! Request logs carry method, route, status, latency and error kind; never prompts or texts.

use tracing_subscriber::EnvFilter;

pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
