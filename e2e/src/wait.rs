//! Bounded polling.

use std::future::Future;
use std::time::Duration;

use anyhow::{Result, bail};

/// Polls `f` every 250 ms until it returns `Some`, for at most `timeout`; the error names `what`
/// and the last observation `f` reported through `Err`.
pub async fn until<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let start = tokio::time::Instant::now();
    let mut last = String::from("nothing observed");
    while start.elapsed() < timeout {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!("timed out after {:?} waiting for {what}; last: {last}", timeout)
}
