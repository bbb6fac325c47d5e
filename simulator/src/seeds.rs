//! Seeds, and running one job per seed on all cores.

use anyhow::{Context as _, Result, anyhow, bail};

/// `42`, `42-51` or `1,5,9`.
pub fn parse(s: &str) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let (a, b): (u64, u64) = (a.trim().parse()?, b.trim().parse()?);
            if a > b {
                bail!("seed range {part} is empty");
            }
            out.extend(a..=b);
        } else {
            out.push(part.parse().with_context(|| format!("seed {part:?} is not a number"))?);
        }
    }
    if out.is_empty() {
        bail!("no seeds given");
    }
    Ok(out)
}

/// `job(seed)` for every seed, in the seeds' order. The seeds are independent: thread `t` of
/// as many as there are cores (at most one per seed) runs seeds `t`, `t + n`, `t + 2n`, ….
/// `what` names the job in the error when a thread panics.
pub fn each<T: Send>(what: &str, seeds: &[u64], job: &(dyn Fn(u64) -> Result<T> + Sync)) -> Result<Vec<T>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(seeds.len()).max(1);
    let results: Vec<Result<Vec<T>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| scope.spawn(move || seeds.iter().skip(t).step_by(threads).map(|&s| job(s)).collect()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("a {what} thread panicked")))).collect()
    });
    let mut by_thread = Vec::with_capacity(threads);
    for r in results {
        by_thread.push(r?.into_iter());
    }
    (0..seeds.len())
        .map(|i| by_thread[i % threads].next().with_context(|| format!("a {what} thread lost seed {}", seeds[i])))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_parse_as_ranges_and_lists() {
        assert_eq!(parse("42-44").ok(), Some(vec![42, 43, 44]));
        assert_eq!(parse("1, 5,9").ok(), Some(vec![1, 5, 9]));
        assert!(parse("9-1").is_err());
        assert!(parse("x").is_err());
        assert!(parse("").is_err());
    }

    #[test]
    fn each_keeps_the_seeds_order_and_reports_the_first_error() {
        let seeds: Vec<u64> = (0..37).rev().collect();
        let squares = each("test", &seeds, &|s| Ok(s * s)).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(squares, seeds.iter().map(|s| s * s).collect::<Vec<_>>());
        let e = each("test", &seeds, &|s| if s == 5 { bail!("seed 5 failed") } else { Ok(s) }).expect_err("an error");
        assert_eq!(e.to_string(), "seed 5 failed");
    }
}
