//! Per-tenant admission control, checked before a request is queued (so before the GPU).
//!
//! The tenant is the `x-tessera-tenant` request header ([`TENANT_HEADER`]); requests without it
//! share the tenant `default`. Each tenant gets the same [`Policy`]: a cap on input tokens per
//! request, on output tokens per request, on requests in flight, and a daily (UTC) token budget.
//! A request reserves `input + max_output` tokens of budget when admitted; when it finishes the
//! reservation is settled to what it really used, so concurrent requests cannot overspend.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::{Error, Result};

pub const TENANT_HEADER: &str = "x-tessera-tenant";
pub const DEFAULT_TENANT: &str = "default";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub max_input_tokens: u64,
    pub max_output_tokens: u64,
    pub max_concurrent: u32,
    pub daily_token_budget: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { max_input_tokens: 8192, max_output_tokens: 512, max_concurrent: 64, daily_token_budget: 10_000_000 }
    }
}

#[derive(Debug, Default)]
struct Tenant {
    in_flight: u32,
    day: u64,
    used_tokens: u64,
}

#[derive(Debug, Clone)]
pub struct Admission {
    policy: Policy,
    tenants: Arc<Mutex<HashMap<String, Tenant>>>,
}

/// Days since the Unix epoch, UTC: the budget's reset boundary.
#[allow(clippy::disallowed_methods)] // the budget resets on the UTC day
pub fn utc_day() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() / 86_400).unwrap_or(0)
}

impl Admission {
    pub fn new(policy: Policy) -> Self {
        Admission { policy, tenants: Arc::default() }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Admits one request or says why not. Input/output size violations are the request's
    /// fault (400/413); concurrency and budget are the tenant's state (429).
    pub fn admit(&self, tenant: &str, input_tokens: u64, max_output_tokens: u64, day: u64) -> Result<Permit> {
        let p = &self.policy;
        if input_tokens > p.max_input_tokens {
            return Err(Error::InputTooLarge(format!(
                "{input_tokens} input tokens; the limit is {}",
                p.max_input_tokens
            )));
        }
        if max_output_tokens > p.max_output_tokens {
            return Err(Error::BadRequest(format!(
                "max_tokens {max_output_tokens}; the limit is {}",
                p.max_output_tokens
            )));
        }
        let over = |reason: String| Error::OverLimit { tenant: tenant.to_string(), reason };
        let reserved = input_tokens + max_output_tokens;
        let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        let t = tenants.entry(tenant.to_string()).or_default();
        if t.day != day {
            t.day = day;
            t.used_tokens = 0;
        }
        if t.in_flight >= p.max_concurrent {
            return Err(over(format!("{} requests in flight; the limit is {}", t.in_flight, p.max_concurrent)));
        }
        if t.used_tokens + reserved > p.daily_token_budget {
            return Err(over(format!(
                "daily token budget exhausted: {} of {} used, this request needs up to {reserved}",
                t.used_tokens, p.daily_token_budget
            )));
        }
        t.in_flight += 1;
        t.used_tokens += reserved;
        Ok(Permit { admission: self.clone(), tenant: tenant.to_string(), day, reserved, used: None })
    }

    /// Tokens the tenant has been charged today (reservations included).
    pub fn used_tokens(&self, tenant: &str) -> u64 {
        let tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        tenants.get(tenant).map_or(0, |t| t.used_tokens)
    }
}

/// Held while a request runs; dropping it frees the concurrency slot and settles the budget.
#[derive(Debug)]
pub struct Permit {
    admission: Admission,
    tenant: String,
    day: u64,
    reserved: u64,
    used: Option<u64>,
}

impl Permit {
    /// Records what the request really consumed (input + generated tokens).
    pub fn settle(&mut self, used_tokens: u64) {
        self.used = Some(used_tokens);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut tenants = self.admission.tenants.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = tenants.get_mut(&self.tenant) {
            t.in_flight = t.in_flight.saturating_sub(1);
            // A request that never settled (failed, cancelled) keeps its reservation charged:
            // the work may have been done.
            if t.day == self.day
                && let Some(used) = self.used
            {
                t.used_tokens = t.used_tokens.saturating_sub(self.reserved) + used;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy { max_input_tokens: 100, max_output_tokens: 50, max_concurrent: 2, daily_token_budget: 300 }
    }

    #[test]
    fn oversized_input_and_output_are_rejected_with_reasons() {
        let a = Admission::new(policy());
        let e = a.admit("t", 101, 0, 1).unwrap_err();
        assert_eq!(e.status(), 413);
        assert!(e.to_string().contains("101 input tokens"), "{e}");
        let e = a.admit("t", 1, 51, 1).unwrap_err();
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn concurrency_is_per_tenant_and_freed_on_drop() {
        let a = Admission::new(policy());
        let p1 = a.admit("t", 1, 1, 1).unwrap();
        let _p2 = a.admit("t", 1, 1, 1).unwrap();
        let e = a.admit("t", 1, 1, 1).unwrap_err();
        assert_eq!(e.status(), 429);
        assert!(e.to_string().contains("in flight"), "{e}");
        assert!(a.admit("other", 1, 1, 1).is_ok());
        drop(p1);
        assert!(a.admit("t", 1, 1, 1).is_ok());
    }

    #[test]
    fn budget_reserves_then_settles_and_resets_next_day() {
        let a = Admission::new(policy());
        let mut p = a.admit("t", 100, 50, 7).unwrap();
        assert_eq!(a.used_tokens("t"), 150);
        p.settle(110);
        drop(p);
        assert_eq!(a.used_tokens("t"), 110);
        let _p = a.admit("t", 100, 50, 7).unwrap(); // 260 reserved
        let e = a.admit("t", 40, 1, 7).unwrap_err();
        assert_eq!(e.status(), 429);
        assert!(e.to_string().contains("budget"), "{e}");
        assert!(a.admit("t", 40, 1, 8).is_ok(), "a new UTC day resets the budget");
    }
}
