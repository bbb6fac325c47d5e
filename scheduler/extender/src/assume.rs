//! The assume cache: pods this replica bound that the informer has not shown yet.

use tessera_core::{Demand, Placement};

/// A pod this replica bound (or is binding) that the informer has not reported bound yet.
#[derive(Clone, Debug)]
pub(crate) struct Assumed {
    pub(crate) placement: Placement,
    pub(crate) demand: Demand,
    pub(crate) at_ms: u64,
}
