//! What the real-cluster test binaries share.

use libtest_mimic::{Failed, Trial};

/// Trials for tests whose prerequisites are missing (`why` names them all): under `CI=true`
/// each fails with it, since CI must never pass by skipping; otherwise each is ignored, after
/// one line saying why.
pub fn unavailable<N: Into<String>>(suite: &str, names: impl IntoIterator<Item = N>, why: &str) -> Vec<Trial> {
    let ci = std::env::var("CI").as_deref() == Ok("true");
    if ci {
        eprintln!("{suite}: {why}");
    } else {
        println!("{suite}: every test ignored: {why}");
    }
    names
        .into_iter()
        .map(|name| {
            let message = if ci { format!("under CI=true this is a failure: {why}") } else { why.to_owned() };
            Trial::test(name.into(), move || Err(Failed::from(message))).with_ignored_flag(!ci)
        })
        .collect()
}
