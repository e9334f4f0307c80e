//! The invariants the simulation checks, one file each.
pub mod acked_writes;
pub mod convergence;
pub mod flush_order;
