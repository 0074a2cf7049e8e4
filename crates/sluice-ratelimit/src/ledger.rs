//! The ledger contract, its window model, and the in-process ledger.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

/// The rolling window every ledger keeps per limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Length of the window (a limit is "per period").
    pub period: Duration,
    /// How many slots the window is split into; budget returns slot by slot.
    pub slots: u32,
}

impl Window {
    /// One slot's length in milliseconds (at least 1).
    pub fn slot_ms(&self) -> u64 {
        (self.period.as_millis() as u64 / u64::from(self.slots.max(1))).max(1)
    }
}

impl Default for Window {
    fn default() -> Self {
        Self {
            period: Duration::from_secs(60),
            slots: 60,
        }
    }
}

/// What a claim got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Budget granted (0 when less than the claim's `min` was left).
    pub granted: u64,
    /// The slot it was charged to (refunds go back there).
    pub slot: u64,
    /// What the window has left after this grant.
    pub remaining: u64,
    /// When `granted` is 0: how long until the oldest charged slot leaves the window.
    pub retry_after: Duration,
    /// The ledger's id for this grant's lease record (0 when it keeps none).
    pub lease: u64,
}

impl Grant {
    /// What to hand back to [`Ledger::refund`] when this grant's lease ends.
    pub fn lease_ref(&self) -> LeaseRef {
        LeaseRef {
            slot: self.slot,
            granted: self.granted,
            id: self.lease,
        }
    }
}

/// A lease as the ledger knows it: the slot it was charged to, its size and its record id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseRef {
    /// The slot it was charged to.
    pub slot: u64,
    /// What was granted.
    pub granted: u64,
    /// The ledger's record id ([`Grant::lease`]).
    pub id: u64,
}

/// A ledger could not be reached or answered nonsense.
#[derive(Debug, Clone, thiserror::Error)]
#[error("ledger unavailable: {0}")]
pub struct LedgerError(pub String);

/// A store of per-limit windows shared by every replica. See the crate docs for the protocol.
///
/// Implementations must make each method atomic per limit, must never grant more than the
/// window has left (invariant L), and must use one clock for every replica.
#[async_trait]
pub trait Ledger: Send + Sync + 'static {
    /// Grants `min(ask, limit − used)`, or 0 when that is below `min`, and charges it to the
    /// current slot.
    ///
    /// A shared ledger also records the grant as a lease held for `hold`: a lease its holder
    /// has not ended ([`Ledger::refund`]) by then is presumed dead (the replica crashed) and
    /// its whole grant is given back to its slot, so a crash strands budget for at most
    /// `hold`, not for the rest of the window.
    ///
    /// # Errors
    /// [`LedgerError`] when the ledger cannot be reached; nothing was charged then.
    async fn claim(
        &self,
        key: &str,
        limit: u64,
        ask: u64,
        min: u64,
        hold: Duration,
    ) -> Result<Grant, LedgerError>;

    /// Ends `lease`, giving back up to `amount` of what its slot was charged if the slot is
    /// still in the window; returns what was given back. Every lease of a shared ledger must
    /// be ended once, with `amount` 0 when it was used up; a lease the ledger already gave
    /// back (its holder was presumed dead) gives back nothing more.
    ///
    /// # Errors
    /// [`LedgerError`] when the ledger cannot be reached.
    async fn refund(&self, key: &str, lease: LeaseRef, amount: u64) -> Result<u64, LedgerError>;

    /// Records that replica `id` is alive (for `ttl`) and returns how many are.
    ///
    /// # Errors
    /// [`LedgerError`] when the ledger cannot be reached.
    async fn heartbeat(&self, id: &str, ttl: Duration) -> Result<u64, LedgerError>;

    /// Whether other replicas share this ledger (the in-process one is not shared).
    fn shared(&self) -> bool;
}

/// One limit's window: `(slot, granted)` pairs, oldest first.
pub(crate) type Slots = VecDeque<(u64, u64)>;

/// The window model: the claim step (what the Redis script does, in Rust).
pub(crate) fn claim_step(
    slots: &mut Slots,
    window: Window,
    current: u64,
    limit: u64,
    ask: u64,
    min: u64,
) -> Grant {
    let n = u64::from(window.slots.max(1));
    let oldest = (current + 1).saturating_sub(n);
    while slots.front().is_some_and(|(s, _)| *s < oldest) {
        slots.pop_front();
    }
    let used: u64 = slots.iter().map(|(_, v)| v).sum();
    let available = limit.saturating_sub(used);
    let mut granted = ask.min(available);
    if granted < min {
        granted = 0;
    }
    if granted > 0 {
        match slots.back_mut() {
            Some((s, v)) if *s == current => *v += granted,
            _ => slots.push_back((current, granted)),
        }
    }
    let retry_after = if granted == 0 {
        let first = slots
            .iter()
            .find(|(_, v)| *v > 0)
            .map_or(current, |(s, _)| *s);
        let slot_ms = window.slot_ms();
        Duration::from_millis((first + n - current) * slot_ms)
    } else {
        Duration::ZERO
    };
    Grant {
        granted,
        slot: current,
        remaining: available - granted,
        retry_after,
        lease: 0,
    }
}

/// The window model: the refund step.
pub(crate) fn refund_step(
    slots: &mut Slots,
    window: Window,
    current: u64,
    slot: u64,
    amount: u64,
) -> u64 {
    let n = u64::from(window.slots.max(1));
    if slot + n <= current {
        return 0;
    }
    match slots.iter_mut().find(|(s, _)| *s == slot) {
        Some((_, v)) => {
            let back = amount.min(*v);
            *v -= back;
            back
        }
        None => 0,
    }
}

/// The in-process ledger: exact for a single replica, and the fallback when Redis is down.
/// Its clock is tokio's, so tests drive it with `tokio::time::pause`/`advance`.
#[derive(Debug)]
pub struct MemoryLedger {
    window: Window,
    epoch: Instant,
    limits: Mutex<HashMap<String, Slots>>,
}

impl MemoryLedger {
    /// An empty ledger with `window`.
    pub fn new(window: Window) -> Self {
        Self {
            window,
            epoch: Instant::now(),
            limits: Mutex::new(HashMap::new()),
        }
    }

    fn current(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 / self.window.slot_ms()
    }

    fn with<R>(&self, key: &str, f: impl FnOnce(&mut Slots) -> R) -> R {
        let mut map = self
            .limits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(map.entry(key.to_owned()).or_default())
    }

    /// Claim, synchronously (the in-process ledger never waits).
    pub fn claim_now(&self, key: &str, limit: u64, ask: u64, min: u64) -> Grant {
        let current = self.current();
        self.with(key, |s| {
            claim_step(s, self.window, current, limit, ask, min)
        })
    }
}

#[async_trait]
impl Ledger for MemoryLedger {
    async fn claim(
        &self,
        key: &str,
        limit: u64,
        ask: u64,
        min: u64,
        _hold: Duration,
    ) -> Result<Grant, LedgerError> {
        // One process: a lease cannot outlive its holder, so none is recorded.
        Ok(self.claim_now(key, limit, ask, min))
    }

    async fn refund(&self, key: &str, lease: LeaseRef, amount: u64) -> Result<u64, LedgerError> {
        let current = self.current();
        Ok(self.with(key, |s| {
            refund_step(s, self.window, current, lease.slot, amount)
        }))
    }

    async fn heartbeat(&self, _id: &str, _ttl: Duration) -> Result<u64, LedgerError> {
        Ok(1)
    }

    fn shared(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const W: Window = Window {
        period: Duration::from_secs(10),
        slots: 10,
    };

    #[test]
    fn grants_are_capped_and_return_slot_by_slot() {
        let mut s = Slots::new();
        assert_eq!(claim_step(&mut s, W, 100, 50, 30, 1).granted, 30);
        let g = claim_step(&mut s, W, 103, 50, 30, 1);
        assert_eq!((g.granted, g.remaining), (20, 0), "capped at what is left");
        let g = claim_step(&mut s, W, 105, 50, 5, 5);
        assert_eq!(g.granted, 0);
        assert_eq!(
            g.retry_after,
            Duration::from_secs(5),
            "slot 100 leaves the window at 110"
        );
        assert_eq!(
            claim_step(&mut s, W, 110, 50, 40, 1).granted,
            30,
            "slot 100's 30 are back"
        );
        assert_eq!(
            refund_step(&mut s, W, 111, 103, 50),
            20,
            "refund capped at the charge"
        );
        assert_eq!(
            refund_step(&mut s, W, 113, 103, 5),
            0,
            "slot 103 has left the window"
        );
    }

    #[test]
    fn min_makes_a_claim_all_or_nothing() {
        let mut s = Slots::new();
        claim_step(&mut s, W, 1, 10, 8, 1);
        assert_eq!(
            claim_step(&mut s, W, 1, 10, 5, 3).granted,
            0,
            "2 left, 3 needed"
        );
        assert_eq!(claim_step(&mut s, W, 1, 10, 5, 2).granted, 2);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Claim { ask: u64, min: u64 },
        Refund { back: u8, amount: u64 },
        Tick(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1u64..80, 0u64..40).prop_map(|(ask, min)| Op::Claim { ask, min }),
            2 => (0u8..12, 1u64..80).prop_map(|(back, amount)| Op::Refund { back, amount }),
            2 => (0u64..4).prop_map(Op::Tick),
        ]
    }

    proptest! {
        /// Invariant L: for any interleaving of claims, refunds and clock steps, the grants
        /// charged to any window of `slots` consecutive slots never exceed the limit.
        #[test]
        fn window_invariant_holds(limit in 1u64..200, ops in proptest::collection::vec(op(), 1..200)) {
            let mut slots = Slots::new();
            let mut now = 0u64;
            let mut charged: std::collections::BTreeMap<u64, i64> = Default::default();
            for op in ops {
                match op {
                    Op::Claim { ask, min } => {
                        let g = claim_step(&mut slots, W, now, limit, ask, min);
                        prop_assert!(g.granted <= ask);
                        prop_assert!(g.granted == 0 || g.granted >= min);
                        *charged.entry(now).or_default() += g.granted as i64;
                    }
                    Op::Refund { back, amount } => {
                        let slot = now.saturating_sub(u64::from(back));
                        let r = refund_step(&mut slots, W, now, slot, amount);
                        let c = charged.entry(slot).or_default();
                        prop_assert!(r as i64 <= *c, "refunded more than the slot was charged");
                        *c -= r as i64;
                    }
                    Op::Tick(d) => now += d,
                }
                // Every window ending at or before now.
                let n = u64::from(W.slots);
                for end in now.saturating_sub(2 * n)..=now {
                    let start = (end + 1).saturating_sub(n);
                    let sum: i64 = charged.range(start..=end).map(|(_, v)| *v).sum();
                    prop_assert!(sum <= limit as i64, "window [{start},{end}] holds {sum} > {limit}");
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn memory_ledger_follows_tokio_time() {
        let l = MemoryLedger::new(W);
        let hold = Duration::from_secs(1);
        assert_eq!(l.claim("k", 10, 10, 1, hold).await.unwrap().granted, 10);
        assert_eq!(l.claim("k", 10, 1, 1, hold).await.unwrap().granted, 0);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(l.claim("k", 10, 10, 1, hold).await.unwrap().granted, 10);
        assert_eq!(l.heartbeat("me", Duration::from_secs(1)).await.unwrap(), 1);
    }
}
