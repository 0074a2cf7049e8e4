//! A connection's deadline timer: one tokio timer, set again for each wait, instead of a timer
//! made and dropped per wait.
//!
//! `tokio::time::timeout` makes a timer for each wait it bounds; if the wait does not end on the
//! first poll, the timer is filed in the runtime's timer wheel, and it is taken out again when
//! the wait ends. Both take the wheel's lock, which every worker thread shares. A plain
//! connection waits twice per request: for the next request's head (keep-alive) and for the
//! upstream's answer head. Callgrind put those two timers at ~950 instructions a request on the
//! load bench (filing, removing, and the driver's work on them), a lock taken four times.
//!
//! An [`Alarm`] keeps its timer between waits. Moving a filed timer to a *later* deadline is one
//! atomic compare-and-swap in tokio (`TimerEntry::reset`: the wheel finds the new deadline when
//! the old one comes due, and files it again then), and a connection's successive deadlines
//! are later and later: the next head within `client_timeout` of the last answer, the answer
//! within the deployment's `timeout` of its request. So after its first wait, a connection's
//! timer costs a compare-and-swap per wait, no lock, and is removed from the wheel once, when
//! the connection closes. An earlier deadline (another deployment's shorter `timeout`) files
//! the timer again, as a new one would be.
//!
//! Nothing is set when the wait is over on its first poll (a body that came with its head).

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::Poll;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// A reusable deadline for one connection's waits, one at a time. Made without a timer; the
/// timer comes with the first wait that has to wait, and goes with the alarm.
#[derive(Debug, Default)]
pub(crate) struct Alarm(Option<Pin<Box<Sleep>>>);

impl Alarm {
    /// `fut`'s output, or `None` when `at` passes first.
    pub(crate) async fn until<F: Future>(&mut self, at: Instant, fut: F) -> Option<F::Output> {
        self.wait(fut, || at).await
    }

    /// `fut`'s output, or `None` when `limit` passes first. The clock is read only when `fut`
    /// is not ready on its first poll.
    pub(crate) async fn within<F: Future>(&mut self, limit: Duration, fut: F) -> Option<F::Output> {
        self.wait(fut, || Instant::now() + limit).await
    }

    async fn wait<F: Future>(
        &mut self,
        fut: F,
        deadline: impl FnOnce() -> Instant,
    ) -> Option<F::Output> {
        let mut fut = pin!(fut);
        let mut deadline = Some(deadline);
        poll_fn(|cx| {
            if let Poll::Ready(out) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(out));
            }
            // Not ready: set the timer, once per wait.
            if let Some(deadline) = deadline.take() {
                let at = deadline();
                match &mut self.0 {
                    Some(sleep) => sleep.as_mut().reset(at),
                    empty => *empty = Some(Box::pin(tokio::time::sleep_until(at))),
                }
            }
            match &mut self.0 {
                Some(sleep) => sleep.as_mut().poll(cx).map(|()| None),
                None => Poll::Ready(None), // cannot be: set above, before this wait's first Pending
            }
        })
        .await
    }
}

/// `fut`'s output, or `None` when `at` passes first: `tokio::time::timeout_at` for a wait
/// without an [`Alarm`] at hand, but the timer is made only when `fut` is not ready on its first
/// poll. (A `Timeout` makes its `Sleep` up front, which clones the runtime's handle: two atomic
/// operations on a count every worker thread shares, even when nothing waits, as for a request
/// body that came with its head.)
pub(crate) async fn by<F: Future>(at: Instant, fut: F) -> Option<F::Output> {
    let mut fut = pin!(fut);
    if let Poll::Ready(out) = poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
        return Some(out);
    }
    tokio::time::timeout_at(at, fut).await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each wait gets its own deadline, whether the alarm's timer is moved later (the cheap
    /// path), earlier, or set again after it went off; a wait that is over at once sets
    /// nothing.
    #[tokio::test(start_paused = true)]
    async fn every_wait_ends_at_its_own_deadline() {
        let mut alarm = Alarm::default();
        let start = Instant::now();
        let never = std::future::pending::<()>;

        assert_eq!(alarm.until(start, async { 7 }).await, Some(7));
        assert!(alarm.0.is_none(), "a wait over at once sets no timer");

        assert_eq!(alarm.within(Duration::from_secs(5), never()).await, None);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        // The timer went off; it is set again for the next wait.
        assert_eq!(alarm.within(Duration::from_secs(5), never()).await, None);
        assert_eq!(start.elapsed(), Duration::from_secs(10));

        // A wait that ends before its deadline, then a later deadline (the timer moved later
        // while still filed) and an earlier one (filed again).
        let sleep = tokio::time::sleep(Duration::from_secs(1));
        assert_eq!(
            alarm.until(start + Duration::from_secs(100), sleep).await,
            Some(())
        );
        assert_eq!(
            alarm.until(start + Duration::from_secs(200), never()).await,
            None
        );
        assert_eq!(start.elapsed(), Duration::from_secs(200));
        let ends = start + Duration::from_secs(300);
        let sleep = tokio::time::sleep(Duration::from_secs(30));
        assert_eq!(alarm.until(ends, sleep).await, Some(()));
        assert_eq!(
            alarm.until(start + Duration::from_secs(240), never()).await,
            None
        );
        assert_eq!(start.elapsed(), Duration::from_secs(240));
        // A deadline already past: the wait ends at once.
        assert_eq!(alarm.until(start, never()).await, None);
        assert_eq!(start.elapsed(), Duration::from_secs(240));
    }

    /// The one-off deadline: what is ready at once is taken even past the deadline (as
    /// `timeout_at` does), what waits ends at the deadline or with its output.
    #[tokio::test(start_paused = true)]
    async fn a_one_off_deadline_bounds_only_what_waits() {
        let start = Instant::now();
        assert_eq!(by(start, async { 1 }).await, Some(1));
        let later = start + Duration::from_secs(3);
        assert_eq!(by(later, std::future::pending::<()>()).await, None);
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        let sleep = tokio::time::sleep(Duration::from_secs(1));
        assert_eq!(by(later + Duration::from_secs(5), sleep).await, Some(()));
        assert_eq!(start.elapsed(), Duration::from_secs(4));
    }
}
