//! The shared ledger: one Redis hash per limit, changed only by the Lua scripts below.
//!
//! Keys: `sluice:{<limit>}:w` holds `slot → granted` for the limit's window, and
//! `sluice:{<limit>}:l` the leases not yet ended, a sorted set of `slot:granted:holder.seq`
//! scored by the millisecond after which the holder is presumed dead. The `{…}` hash tag keeps
//! each limit's keys on one Redis Cluster slot. Replica heartbeats live in `sluice:{replicas}`
//! (a sorted set scored by last-seen milliseconds). Every script reads the time with
//! `redis.call('TIME')`, so replicas' clocks never matter.
//!
//! **Crashed replicas.** A replica ends each lease with REFUND (amount 0 when it used it all),
//! which removes its record. Every CLAIM first takes back the leases whose record outlived its
//! hold: their holder died, and their whole grant returns to its slot. What the dead replica
//! had spent of it is then uncounted; that is at most one lease (≤ `max_lease`) per crash, the
//! share of the overshoot bound the crashed replica held while it lived.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::Script;
use tokio::sync::OnceCell;

use crate::ledger::{Grant, LeaseRef, Ledger, LedgerError, Window};

/// The claim step of the protocol (crate docs), atomically. Mirrors `ledger::claim_step`,
/// after taking back the leases of dead holders.
/// KEYS[1] = window hash, KEYS[2] = lease set; ARGV = holder.seq, limit, ask, min, slot_ms,
/// slots, hold_ms. Returns {granted, slot, remaining, retry_after_ms}.
const CLAIM: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit, ask, min = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local slot_ms, n, hold = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local cur = math.floor(now / slot_ms)
local oldest = cur - n + 1
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, m in ipairs(dead) do
  local s, a = string.match(m, '^(%d+):(%d+):')
  if s and tonumber(s) >= oldest then
    local v = tonumber(redis.call('HGET', KEYS[1], s) or '0')
    local back = tonumber(a)
    if back > v then back = v end
    if back > 0 then redis.call('HINCRBY', KEYS[1], s, -back) end
  end
end
if #dead > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now) end
local h = redis.call('HGETALL', KEYS[1])
local used, first = 0, nil
for i = 1, #h, 2 do
  local s, v = tonumber(h[i]), tonumber(h[i + 1])
  if s < oldest then
    redis.call('HDEL', KEYS[1], h[i])
  else
    used = used + v
    if v > 0 and (first == nil or s < first) then first = s end
  end
end
local avail = limit - used
if avail < 0 then avail = 0 end
local grant = ask
if grant > avail then grant = avail end
if grant < min then grant = 0 end
local ttl = slot_ms * n + 1000
if grant > 0 then
  redis.call('HINCRBY', KEYS[1], cur, grant)
  redis.call('ZADD', KEYS[2], now + hold, cur .. ':' .. grant .. ':' .. ARGV[1])
  redis.call('PEXPIRE', KEYS[2], math.max(ttl, hold + 1000))
end
redis.call('PEXPIRE', KEYS[1], ttl)
local retry = 0
if grant == 0 then
  if first == nil then first = cur end
  retry = (first + n - cur) * slot_ms
end
return {grant, cur, avail - grant, retry}
";

/// The refund step, ending a lease. Mirrors `ledger::refund_step` for a lease still recorded;
/// a lease already taken back (or never recorded) gives back nothing.
/// KEYS[1] = window hash, KEYS[2] = lease set; ARGV = record, slot, amount, slot_ms, slots.
/// Returns what was given back.
const REFUND: &str = r"
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local slot, amount = tonumber(ARGV[2]), tonumber(ARGV[3])
local slot_ms, n = tonumber(ARGV[4]), tonumber(ARGV[5])
local cur = math.floor(now / slot_ms)
if slot + n <= cur then return 0 end
local v = tonumber(redis.call('HGET', KEYS[1], ARGV[2]) or '0')
local back = amount
if back > v then back = v end
if back > 0 then redis.call('HINCRBY', KEYS[1], ARGV[2], -back) end
return back
";

/// Heartbeat. KEYS[1] = replicas set; ARGV = id, ttl_ms. Returns the live replica count.
const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return redis.call('ZCARD', KEYS[1])
";

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// A [`Ledger`] in Redis (single node, or Cluster with a `redis+cluster://` URL).
pub struct RedisLedger {
    url: String,
    /// This ledger's name in lease records (random per process), and the next lease's number.
    holder: String,
    seq: AtomicU64,
    window: Window,
    timeout: Duration,
    conn: OnceCell<Conn>,
    claim: Script,
    refund: Script,
    heartbeat: Script,
}

impl RedisLedger {
    /// A ledger for `url` (`redis://`, `rediss://`, `redis+cluster://h1:p1[,h2:p2…]`). Nothing
    /// is contacted until the first call; every call is bounded by `timeout`.
    pub fn new(url: &str, window: Window, timeout: Duration) -> Self {
        Self {
            url: url.to_owned(),
            holder: format!("{:016x}", rand::random::<u64>()),
            seq: AtomicU64::new(1),
            window,
            timeout,
            conn: OnceCell::new(),
            claim: Script::new(CLAIM),
            refund: Script::new(REFUND),
            heartbeat: Script::new(HEARTBEAT),
        }
    }

    async fn connect(&self) -> Result<Conn, LedgerError> {
        let err = |e: redis::RedisError| LedgerError(e.to_string());
        let cluster = self
            .url
            .strip_prefix("redis+cluster://")
            .map(|rest| ("redis", rest))
            .or_else(|| {
                self.url
                    .strip_prefix("rediss+cluster://")
                    .map(|r| ("rediss", r))
            });
        match cluster {
            Some((scheme, nodes)) => {
                let (auth, hosts) = match nodes.rsplit_once('@') {
                    Some((auth, hosts)) => (format!("{auth}@"), hosts),
                    None => (String::new(), nodes),
                };
                let urls: Vec<String> = hosts
                    .split(',')
                    .map(|h| format!("{scheme}://{auth}{}", h.trim_end_matches('/')))
                    .collect();
                let client = redis::cluster::ClusterClient::builder(urls)
                    .connection_timeout(self.timeout)
                    .response_timeout(self.timeout)
                    .build()
                    .map_err(err)?;
                Ok(Conn::Cluster(
                    client.get_async_connection().await.map_err(err)?,
                ))
            }
            None => {
                let client = redis::Client::open(self.url.as_str()).map_err(err)?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                Ok(Conn::Single(
                    client
                        .get_connection_manager_with_config(config)
                        .await
                        .map_err(err)?,
                ))
            }
        }
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[u64],
        id: Option<&str>,
    ) -> Result<T, LedgerError> {
        let call = async {
            let conn = self.conn.get_or_try_init(|| self.connect()).await?;
            let mut invocation = script.prepare_invoke();
            for key in keys {
                invocation.key(*key);
            }
            if let Some(id) = id {
                invocation.arg(id);
            }
            for a in args {
                invocation.arg(*a);
            }
            let result = match conn.clone() {
                Conn::Single(mut c) => invocation.invoke_async(&mut c).await,
                Conn::Cluster(mut c) => invocation.invoke_async(&mut c).await,
            };
            result.map_err(|e| LedgerError(e.to_string()))
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .unwrap_or_else(|_| Err(LedgerError(format!("no answer within {:?}", self.timeout))))
    }
}

impl RedisLedger {
    /// The holder part of a lease record: `holder.seq`.
    fn record_tag(&self, lease: u64) -> String {
        format!("{}.{lease}", self.holder)
    }
}

fn window_key(limit: &str) -> String {
    format!("sluice:{{{limit}}}:w")
}

fn lease_key(limit: &str) -> String {
    format!("sluice:{{{limit}}}:l")
}

#[async_trait]
impl Ledger for RedisLedger {
    async fn claim(
        &self,
        key: &str,
        limit: u64,
        ask: u64,
        min: u64,
        hold: Duration,
    ) -> Result<Grant, LedgerError> {
        let w = self.window;
        let lease = self.seq.fetch_add(1, Ordering::Relaxed);
        let hold_ms = hold.as_millis() as u64;
        let (granted, slot, remaining, retry_ms): (u64, u64, u64, u64) = self
            .run(
                &self.claim,
                &[&window_key(key), &lease_key(key)],
                &[limit, ask, min, w.slot_ms(), u64::from(w.slots), hold_ms],
                Some(&self.record_tag(lease)),
            )
            .await?;
        Ok(Grant {
            granted,
            slot,
            remaining,
            retry_after: Duration::from_millis(retry_ms),
            lease,
        })
    }

    async fn refund(&self, key: &str, lease: LeaseRef, amount: u64) -> Result<u64, LedgerError> {
        let w = self.window;
        let record = format!(
            "{}:{}:{}",
            lease.slot,
            lease.granted,
            self.record_tag(lease.id)
        );
        self.run(
            &self.refund,
            &[&window_key(key), &lease_key(key)],
            &[lease.slot, amount, w.slot_ms(), u64::from(w.slots)],
            Some(&record),
        )
        .await
    }

    async fn heartbeat(&self, id: &str, ttl: Duration) -> Result<u64, LedgerError> {
        self.run(
            &self.heartbeat,
            &["sluice:{replicas}"],
            &[ttl.as_millis() as u64],
            Some(id),
        )
        .await
    }

    fn shared(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{claim_step, refund_step, Slots};
    use sluice_testkit::RedisServer;

    /// The Lua scripts against the Rust model (`ledger::claim_step`/`refund_step`, which the
    /// property test covers): a seeded random sequence of claims and lease ends on a real
    /// Redis, compared answer by answer. Redis's clock cannot be driven, so real time passes
    /// (short pauses between steps) and the model is fed the slot Redis reports, which makes
    /// the comparison exact while windows slide. Leases are held far longer than the test runs,
    /// so none is taken back here (the next test covers that).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lua_matches_the_model() {
        let redis = RedisServer::start().unwrap();
        let window = Window {
            period: Duration::from_millis(1200),
            slots: 12,
        };
        let ledger = RedisLedger::new(&redis.url(), window, Duration::from_secs(2));
        let n = u64::from(window.slots);
        let (limit, mut model, mut current) = (120u64, Slots::new(), 0u64);
        let hold = Duration::from_secs(600);
        let mut open: Vec<LeaseRef> = Vec::new();
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let (mut claims, mut refunds, mut zero_grants) = (0, 0, 0);
        for _ in 0..240 {
            let r = next();
            // End a lease whose slot is safely inside the window (≥ 3 slots from its edge), so
            // the time between this and the last claim cannot change the answer.
            open.retain(|l| l.slot + n > current + 3);
            if r % 4 == 0 && !open.is_empty() {
                let lease = open.swap_remove((next() % open.len() as u64) as usize);
                let amount = next() % (lease.granted + 1);
                let got = ledger.refund("diff", lease, amount).await.unwrap();
                let want = refund_step(&mut model, window, current, lease.slot, amount);
                assert_eq!(got, want, "refund({lease:?}, {amount}) at {current}");
                assert_eq!(
                    ledger.refund("diff", lease, amount).await.unwrap(),
                    0,
                    "a lease ends once"
                );
                refunds += 1;
            } else {
                let ask = 1 + r % 60;
                let min = next() % (ask + 1);
                let g = ledger.claim("diff", limit, ask, min, hold).await.unwrap();
                current = g.slot;
                if g.granted > 0 {
                    open.push(g.lease_ref());
                }
                let m = claim_step(&mut model, window, current, limit, ask, min);
                assert_eq!(
                    (g.granted, g.remaining),
                    (m.granted, m.remaining),
                    "claim({ask}, {min})"
                );
                if g.granted == 0 {
                    assert_eq!(g.retry_after, m.retry_after);
                    zero_grants += 1;
                }
                claims += 1;
            }
            // Let Redis's clock move: 240 steps × 20 ms cover about four windows.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            claims > 100 && refunds > 30 && zero_grants > 5,
            "{claims}/{refunds}/{zero_grants}"
        );
    }

    /// A replica that dies holding a lease (it never ends it) loses it to the ledger once the
    /// lease's hold has passed: the next claim from anyone finds the whole grant back, a lease
    /// its holder ended stays as it was ended, and a late end gives nothing back twice.
    #[tokio::test]
    async fn a_dead_holders_lease_comes_back_after_its_hold() {
        let redis = RedisServer::start().unwrap();
        let window = Window::default();
        let a = RedisLedger::new(&redis.url(), window, Duration::from_secs(2));
        let b = RedisLedger::new(&redis.url(), window, Duration::from_secs(2));
        let hold = Duration::from_millis(400);
        let used = a.claim("crash", 100, 40, 1, hold).await.unwrap();
        let held = a.claim("crash", 100, 60, 1, hold).await.unwrap();
        assert_eq!((used.granted, held.granted), (40, 60));
        assert_eq!(a.refund("crash", used.lease_ref(), 0).await.unwrap(), 0);
        let started = tokio::time::Instant::now();
        assert_eq!(b.claim("crash", 100, 60, 1, hold).await.unwrap().granted, 0);
        // A now "crashes": it never ends `held`. B asks until the ledger takes it back.
        let back = loop {
            let g = b.claim("crash", 100, 60, 1, hold).await.unwrap();
            if g.granted > 0 {
                break g;
            }
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "the dead lease never came back"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(300),
            "back too early: {took:?}"
        );
        assert_eq!(
            (back.granted, back.remaining),
            (60, 0),
            "exactly the dead lease; the 40 A used stay charged"
        );
        assert_eq!(
            a.refund("crash", held.lease_ref(), 60).await.unwrap(),
            0,
            "an end after the take-back gives nothing twice"
        );
        assert_eq!(b.refund("crash", back.lease_ref(), 60).await.unwrap(), 60);
    }
}
