//! Seeded deterministic simulation of 3–5 lock manager nodes.
//!
//! One `u64` seed drives everything: the topology, the client traffic (all modes and
//! flags, conversions, cancels, clients going away), message delays within TCP's
//! per-connection order, node crashes and false evictions, fence confirmations and
//! rejoins. After every step the invariants in `invariants.rs` are checked; after the
//! faults stop and the clients drain, every request must have ended.
//!
//! - default: 1,000 seeds;
//! - `TANDEM_SEEDS=n`: n seeds; `TANDEM_LONG=1`: 100,000 seeds;
//! - `TANDEM_SEED=n`: replay one seed with a trace of every step on stderr.
// This whole crate is a test harness (compiled only for `cargo test`).
#![allow(clippy::unwrap_used)]

mod invariants;
mod world;

use std::time::Instant;

fn seeds() -> (u64, u64) {
    if let Ok(s) = std::env::var("TANDEM_SEED") {
        let seed: u64 = s.parse().expect("TANDEM_SEED must be a number");
        return (seed, 1);
    }
    let count = if let Ok(n) = std::env::var("TANDEM_SEEDS") {
        n.parse().expect("TANDEM_SEEDS must be a number")
    } else if std::env::var("TANDEM_LONG").is_ok_and(|v| v == "1") {
        100_000
    } else {
        1_000
    };
    let base = std::env::var("TANDEM_SEED_BASE")
        .ok()
        .and_then(|b| b.parse().ok())
        .unwrap_or(0);
    (base, count)
}

#[test]
fn simulation_never_grants_incompatible_locks_and_every_request_ends() {
    let (base, count) = seeds();
    let trace = std::env::var("TANDEM_SEED").is_ok();
    let started = Instant::now();
    let mut totals = world::Totals::default();
    for seed in base..base + count {
        let result = std::panic::catch_unwind(|| world::run(seed, trace));
        match result {
            Ok(Ok(t)) => totals.add(&t),
            Ok(Err(e)) => panic!(
                "simulation seed {seed} failed: {e}\nreplay: TANDEM_SEED={seed} cargo test -p tandem-dlm --test sim"
            ),
            Err(_) => panic!(
                "simulation seed {seed} panicked\nreplay: TANDEM_SEED={seed} cargo test -p tandem-dlm --test sim"
            ),
        }
    }
    eprintln!("{count} seeds in {:.1?}: {totals}", started.elapsed());
    assert!(totals.grants > count, "too little traffic: {totals}");
    if count >= 200 {
        assert!(
            totals.crashes > 0 && totals.evictions > 0,
            "no faults: {totals}"
        );
        assert!(totals.remastered > 0, "no remastering: {totals}");
    }
}
