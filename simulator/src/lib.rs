//! tessera-sim's library: the openb replay, scenarios, what-if on a capture and the HTML report,
//! all driving `tessera-core`'s placement entry points. The `tessera-sim` binary is a thin CLI
//! over these modules; benches and tests use them directly.

pub mod bound;
pub mod capture;
pub mod compare;
pub mod driver;
pub mod family;
pub mod occupancy;
pub mod openb;
pub mod report;
pub mod scenario;
pub mod seeds;
pub mod trace;
pub mod whatif;
