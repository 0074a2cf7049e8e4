//! Global TPM/RPM limits that hold across replicas, with Redis off the request path.
//!
//! # The protocol
//!
//! Every *limit* (a scope's token or request budget, e.g. `deployment:gpt4.0:tpm`) has a
//! **ledger**: a rolling window of `period` split into `slots` slots, each slot holding how
//! much budget was *granted* in it. One atomic operation changes a ledger:
//!
//! - `claim(ask, min)`: drop slots older than the window, grant
//!   `g = min(ask, limit − Σ slots)`, or 0 if `g < min`; add `g` to the current slot; return
//!   `g`, the slot, what remains, and (when `g = 0`) when the oldest charged slot leaves the
//!   window. Time is the ledger's own (`redis.call('TIME')`), never a replica's clock.
//! - `refund(slot, n)`: give back up to `n` of what `slot` was charged, if `slot` is still in
//!   the window.
//!
//! Invariant **L**: for every window, Σ grants ≤ limit. Claims are capped, so no interleaving
//! of claims, refunds and clock steps breaks it (property-tested in `ledger::tests`, and the
//! Redis script is checked against the in-process model in the end-to-end tests).
//!
//! A replica holds what it was granted as a **lease** in local sharded atomics
//! ([`local::Shards`]); requests take their cost from there with a CAS, never waiting on the
//! ledger while budget is local. A lease lives `lease_ttl`; what is unused when it expires is
//! refunded to the slot it was charged to.
//!
//! **Bound.** Tokens admitted in any window come from grants in that window (≤ limit, by L)
//! plus leases granted earlier and spent inside it; a replica holds at most `max_lease` at a
//! time, so admitted ≤ limit + N × `max_lease` = limit + B, with N the replica count.
//! [`Limiter::overshoot_bound`] exports B. Settlement can add the difference between a
//! request's estimate and its real usage (charged as local debt that later grants repay); so
//! can credit while the ledger is slow (below): a replica owes at most `max_lease` on credit,
//! charged a claim's latency after the window may have ended, so a window that ends while
//! claims are slower than `admit_wait` can take up to one more `max_lease` per replica.
//!
//! **Crashed replicas.** A shared ledger records each lease until its holder ends it (the
//! refund above, with 0 when it was used up). A record still there `lease_ttl` + a grace
//! (2 s) after its claim belongs to a replica that died: the next claim gives its whole grant
//! back to its slot. What the dead replica had spent of that lease goes uncounted, at most one
//! `max_lease` per crash, which is the share of B it held while alive (so N in the bound counts
//! the replicas that lived in the window).
//!
//! **Lease size** follows the replica's own demand: an EWMA of admitted cost per second ×
//! `horizon`, capped by `remaining ÷ N` (its share of what is left), never below the cost of
//! the request it is claimed for. A replica whose demand is below one request per horizon does
//! not prefetch: it claims on demand, and that request waits one ledger round trip.
//!
//! **Ledger down** ([`OnRedisError`]): `local` grants from an in-process ledger sized
//! `limit ÷ N` (N last known), `open` admits, `closed` refuses; the ledger is retried with
//! backoff and claims return to it as soon as it answers. **Ledger slow** (answering, but
//! later than `admit_wait`): the request that needs a claim is served on credit, its cost
//! debt on the local budget, and the claim completing in the background repays it (what it
//! reserved for that request goes to the shards); a claim that is refused leaves the debt to
//! the next grant. Every request is charged to the ledger, a claim's latency late. Credit is
//! given while the replica owes at most one lease and its share of what the ledger last
//! said was left covers it; past that (near the limit) the request waits for the ledger's
//! answer (each call bounded by `redis_timeout`), and a refusal answers every caller queued
//! behind it. So a slow Redis costs a request `admit_wait` while there is budget, and admits
//! at most one lease per replica ahead of the ledger. (Served as in an outage instead, each
//! slow claim gave a replica a lease the ledger never saw.)
//!
//! Not here: HTTP, config files, routing. The proxy builds [`LimitSpec`]s from its config and
//! asks [`Limiter::admit`].

mod ledger;
mod limiter;
pub mod local;
mod redis_ledger;

pub use ledger::{Grant, LeaseRef, Ledger, LedgerError, MemoryLedger, Window};
pub use limiter::{
    Admitted, ClaimResult, Kind, LedgerOp, LimitHandle, LimitSpec, Limiter, Mode, Observer,
    OnRedisError, Rejected, Settings,
};
pub use redis_ledger::RedisLedger;
