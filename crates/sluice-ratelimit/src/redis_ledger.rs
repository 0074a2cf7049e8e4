//! The shared ledger: one Redis hash per limit, changed only by the Lua scripts below.
//!
//! Keys: `sluice:{<limit>}:w` holds `slot → granted` for the limit's window; the `{…}` hash
//! tag keeps each limit's key on one Redis Cluster slot. Replica heartbeats live in
//! `sluice:{replicas}` (a sorted set scored by last-seen milliseconds). Every script reads the
//! time with `redis.call('TIME')`, so replicas' clocks never matter.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::Script;
use tokio::sync::OnceCell;

use crate::ledger::{Grant, Ledger, LedgerError, Window};

/// The claim step of the protocol (crate docs), atomically. Mirrors `ledger::claim_step`.
/// KEYS[1] = window hash; ARGV = limit, ask, min, slot_ms, slots.
/// Returns {granted, slot, remaining, retry_after_ms}.
const CLAIM: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit, ask, min = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local slot_ms, n = tonumber(ARGV[4]), tonumber(ARGV[5])
local cur = math.floor(now / slot_ms)
local oldest = cur - n + 1
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
if grant > 0 then redis.call('HINCRBY', KEYS[1], cur, grant) end
redis.call('PEXPIRE', KEYS[1], slot_ms * n + 1000)
local retry = 0
if grant == 0 then
  if first == nil then first = cur end
  retry = (first + n - cur) * slot_ms
end
return {grant, cur, avail - grant, retry}
";

/// The refund step. KEYS[1] = window hash; ARGV = slot, amount, slot_ms, slots.
/// Returns what was given back.
const REFUND: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local slot, amount = tonumber(ARGV[1]), tonumber(ARGV[2])
local slot_ms, n = tonumber(ARGV[3]), tonumber(ARGV[4])
local cur = math.floor(now / slot_ms)
if slot + n <= cur then return 0 end
local v = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local back = amount
if back > v then back = v end
if back > 0 then redis.call('HINCRBY', KEYS[1], ARGV[1], -back) end
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
        key: &str,
        args: &[u64],
        id: Option<&str>,
    ) -> Result<T, LedgerError> {
        let call = async {
            let conn = self.conn.get_or_try_init(|| self.connect()).await?;
            let mut invocation = script.key(key);
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

fn window_key(limit: &str) -> String {
    format!("sluice:{{{limit}}}:w")
}

#[async_trait]
impl Ledger for RedisLedger {
    async fn claim(&self, key: &str, limit: u64, ask: u64, min: u64) -> Result<Grant, LedgerError> {
        let w = self.window;
        let (granted, slot, remaining, retry_ms): (u64, u64, u64, u64) = self
            .run(
                &self.claim,
                &window_key(key),
                &[limit, ask, min, w.slot_ms(), u64::from(w.slots)],
                None,
            )
            .await?;
        Ok(Grant {
            granted,
            slot,
            remaining,
            retry_after: Duration::from_millis(retry_ms),
        })
    }

    async fn refund(&self, key: &str, slot: u64, amount: u64) -> Result<u64, LedgerError> {
        let w = self.window;
        self.run(
            &self.refund,
            &window_key(key),
            &[slot, amount, w.slot_ms(), u64::from(w.slots)],
            None,
        )
        .await
    }

    async fn heartbeat(&self, id: &str, ttl: Duration) -> Result<u64, LedgerError> {
        self.run(
            &self.heartbeat,
            "sluice:{replicas}",
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
    /// property test covers): a seeded random sequence of claims and refunds on a real Redis,
    /// compared answer by answer. Redis's clock cannot be driven, so real time passes (short
    /// pauses between steps) and the model is fed the slot Redis reports, which makes the
    /// comparison exact while windows slide.
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
            if r % 4 == 0 && current > 0 {
                // Refund into a slot safely inside the window (≥ 2 slots from its edge), so
                // the time between this and the last claim cannot change the answer.
                let slot = current.saturating_sub(r % (n - 2));
                let amount = 1 + next() % 40;
                let got = ledger.refund("diff", slot, amount).await.unwrap();
                let want = refund_step(&mut model, window, current, slot, amount);
                assert_eq!(got, want, "refund({slot}, {amount}) at {current}");
                refunds += 1;
            } else {
                let ask = 1 + r % 60;
                let min = next() % (ask + 1);
                let g = ledger.claim("diff", limit, ask, min).await.unwrap();
                current = g.slot;
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
}
