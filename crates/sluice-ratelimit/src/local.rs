//! Budget held locally, in cache-padded atomic shards: the only thing a request touches.
//!
//! Each worker thread has a home shard (assigned round-robin on first use), so threads rarely
//! write the same cache line. A take tries the home shard, then the others one by one, then
//! gathers from several; what it cannot complete it puts back. Shards may go negative: that
//! is debt from settlement (a request used more than it reserved), repaid by later deposits.

use std::cell::Cell;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;

static NEXT_HOME: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static HOME: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn home() -> usize {
    HOME.with(|h| {
        let mut v = h.get();
        if v == usize::MAX {
            v = NEXT_HOME.fetch_add(1, Ordering::Relaxed);
            h.set(v);
        }
        v
    })
}

/// One shard: its budget and the counters its thread bumps, on one cache line.
#[derive(Debug, Default)]
struct Shard {
    budget: AtomicI64,
    admitted: AtomicU64,
    requests: AtomicU64,
    consumed: AtomicU64,
}

/// Counters summed over shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Cost admitted.
    pub admitted: u64,
    /// Admissions.
    pub requests: u64,
    /// Usage settled.
    pub consumed: u64,
}

/// A budget split over shards. All operations are lock-free.
#[derive(Debug)]
pub struct Shards {
    shards: Box<[CachePadded<Shard>]>,
}

impl Shards {
    /// `n` empty shards (at least one).
    pub fn new(n: usize) -> Self {
        Self {
            shards: (0..n.max(1))
                .map(|_| CachePadded::new(Shard::default()))
                .collect(),
        }
    }

    fn home(&self) -> usize {
        home() % self.shards.len()
    }

    /// Takes `cost` if the shards together hold it; all or nothing.
    pub fn try_take(&self, cost: i64) -> bool {
        if cost <= 0 {
            return true;
        }
        let n = self.shards.len();
        let start = self.home();
        for i in 0..n {
            if take_whole(&self.shards[(start + i) % n].budget, cost) {
                return true;
            }
        }
        // No single shard holds it: gather, and give back on failure.
        let mut got = 0;
        for i in 0..n {
            got += take_upto(&self.shards[(start + i) % n].budget, cost - got);
            if got == cost {
                return true;
            }
        }
        if got > 0 {
            self.shards[start].budget.fetch_add(got, Ordering::AcqRel);
        }
        false
    }

    /// Takes up to `max` (for refunds), returning what was taken.
    pub fn drain_upto(&self, max: i64) -> i64 {
        let mut got = 0;
        for s in self.shards.iter() {
            if got >= max {
                break;
            }
            got += take_upto(&s.budget, max - got);
        }
        got
    }

    /// Adds `amount` (negative for debt) to the caller's home shard.
    pub fn put(&self, amount: i64) {
        self.shards[self.home()]
            .budget
            .fetch_add(amount, Ordering::AcqRel);
    }

    /// Counts one admission of `cost` on the caller's home shard.
    pub fn record_admission(&self, cost: u64) {
        let s = &self.shards[self.home()];
        s.admitted.fetch_add(cost, Ordering::Relaxed);
        s.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Settles a reservation on the caller's home shard: `reserved − actual` goes back to the
    /// budget (negative: debt) and `actual` is counted as consumed.
    pub fn settle(&self, reserved: u64, actual: u64) {
        let s = &self.shards[self.home()];
        if reserved != actual {
            s.budget
                .fetch_add(reserved as i64 - actual as i64, Ordering::AcqRel);
        }
        s.consumed.fetch_add(actual, Ordering::Relaxed);
    }

    /// The counters summed over shards.
    pub fn counts(&self) -> Counts {
        self.shards.iter().fold(Counts::default(), |c, s| Counts {
            admitted: c.admitted + s.admitted.load(Ordering::Relaxed),
            requests: c.requests + s.requests.load(Ordering::Relaxed),
            consumed: c.consumed + s.consumed.load(Ordering::Relaxed),
        })
    }

    /// Spreads a deposit over every shard, so every worker finds some at home.
    pub fn deposit(&self, amount: i64) {
        let n = self.shards.len() as i64;
        let each = amount / n;
        for (i, s) in self.shards.iter().enumerate() {
            let extra = if (i as i64) < amount % n { 1 } else { 0 };
            if each + extra != 0 {
                s.budget.fetch_add(each + extra, Ordering::AcqRel);
            }
        }
    }

    /// The sum over shards (a snapshot; may be negative while debt is outstanding).
    pub fn total(&self) -> i64 {
        self.shards
            .iter()
            .map(|s| s.budget.load(Ordering::Acquire))
            .sum()
    }
}

fn take_whole(s: &AtomicI64, cost: i64) -> bool {
    let mut cur = s.load(Ordering::Acquire);
    while cur >= cost {
        match s.compare_exchange_weak(cur, cur - cost, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return true,
            Err(v) => cur = v,
        }
    }
    false
}

fn take_upto(s: &AtomicI64, max: i64) -> i64 {
    let mut cur = s.load(Ordering::Acquire);
    loop {
        let take = cur.min(max);
        if take <= 0 {
            return 0;
        }
        match s.compare_exchange_weak(cur, cur - take, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return take,
            Err(v) => cur = v,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn take_is_all_or_nothing_and_gathers_across_shards() {
        let s = Shards::new(4);
        s.deposit(10); // 3,3,2,2
        assert!(!s.try_take(11));
        assert_eq!(s.total(), 10, "a failed take puts everything back");
        assert!(s.try_take(9), "no shard holds 9, together they do");
        assert_eq!(s.total(), 1);
        assert!(s.try_take(1));
        assert!(!s.try_take(1));
    }

    #[test]
    fn debt_blocks_until_repaid() {
        let s = Shards::new(1);
        s.deposit(5);
        s.put(-8);
        assert_eq!(s.total(), -3);
        assert!(!s.try_take(1));
        s.deposit(4);
        assert!(s.try_take(1));
        assert!(!s.try_take(1));
    }

    #[test]
    fn concurrent_takes_never_exceed_the_deposit() {
        let s = Arc::new(Shards::new(4));
        s.deposit(100_000);
        let taken: i64 = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let s = s.clone();
                    scope.spawn(move || {
                        let mut n = 0;
                        while s.try_take(3) {
                            n += 3;
                        }
                        n
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(taken + s.total(), 100_000);
        assert!(
            s.total() < 3 * 4,
            "at most a remainder smaller than a cost per shard is left"
        );
    }
}
