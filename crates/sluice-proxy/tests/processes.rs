//! Sluice as real processes. Mostly limits across replicas: N `sluice` processes sharing one
//! real `redis-server`, in front of one mock upstream; periods are shrunk to seconds to keep
//! CI fast, the guarantees are the same per period (DESIGN.md §3, G1–G4). Also the access log
//! a process writes.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sluice_testkit::{free_port, Fault, MockConfig, MockUpstream, RedisServer, ScratchDir};
use tokio::time::Instant;

/// Seconds per window in these tests.
const PERIOD: Duration = Duration::from_secs(3);
/// The request every test sends: 8 prompt tokens + `max_tokens` 7, and the mock answers with
/// 7 completion tokens, so reservation = usage = 15.
const BODY: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":7}"#;
const COST: u64 = 15;

struct Replica {
    child: Child,
    port: u16,
    /// The config file it was started with (rewritten by the reload tests).
    config: PathBuf,
    /// Holds the config and the log; removed after the process is stopped (`Drop` below runs
    /// before the fields are dropped).
    _dir: ScratchDir,
}

impl Replica {
    fn spawn(config: &str, tag: &str) -> Self {
        Self::spawn_logging(config, tag, "warn").0
    }

    /// Spawns with `RUST_LOG=log`, returning the path stderr goes to.
    fn spawn_logging(config: &str, tag: &str, log: &str) -> (Self, PathBuf) {
        Self::spawn_with(config, tag, log, &[])
    }

    /// Spawns with `RUST_LOG=log` and `env` added, returning the path stderr goes to.
    fn spawn_with(config: &str, tag: &str, log: &str, env: &[(&str, &str)]) -> (Self, PathBuf) {
        let dir = ScratchDir::new(&format!("replica-{tag}")).unwrap();
        let port = free_port().unwrap();
        let path: PathBuf = dir.join(format!("{tag}-{port}.yaml"));
        std::fs::write(&path, config).unwrap();
        let log_path = dir.join(format!("{tag}-{port}.log"));
        let log_file = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args([
                "--config",
                path.to_str().unwrap(),
                "--port",
                &port.to_string(),
            ])
            .env("RUST_LOG", log)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap();
        let replica = Self {
            child,
            port,
            config: path,
            _dir: dir,
        };
        (replica, log_path)
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// `POST /v1/chat/completions` with `body`, to add headers to and send.
    fn chat(&self, body: impl Into<reqwest::Body>) -> reqwest::RequestBuilder {
        client().post(self.url("/v1/chat/completions")).body(body)
    }

    /// A gauge from `/metrics`, e.g. `sluice_ratelimit_overshoot_bound{scope="…"}`.
    async fn metric(&self, series: &str) -> u64 {
        let text = client()
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{series} not in /metrics:\n{text}"))
    }

    async fn readiness(&self) -> Option<serde_json::Value> {
        let resp = client()
            .get(self.url("/health/readiness"))
            .send()
            .await
            .ok()?;
        if resp.status() != 200 {
            return None;
        }
        serde_json::from_slice(&resp.bytes().await.ok()?).ok()
    }

    /// Waits (bounded) until readiness answers 200 and `check` accepts its body.
    async fn wait_for(&self, what: &str, check: impl Fn(&serde_json::Value) -> bool) -> Duration {
        let check = &check;
        eventually(what, || async move {
            self.readiness().await.filter(|v| check(v))
        })
        .await
    }
}

/// Probes until `probe` answers `Some` (bounded: 20 s), returning how long that took: the one
/// place these tests poll a replica from outside.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut probe: impl FnMut() -> F,
) -> Duration {
    let start = Instant::now();
    while probe().await.is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "replica never became {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

fn config(upstream: &str, redis: &str, limits: &str, keys: &str) -> String {
    format!(
        "model_list:\n  - model_name: m\n    litellm_params: {{model: openai/x, api_base: '{upstream}'{limits}}}\n\
         router_settings: {{redis_url: '{redis}'}}\n\
         limits: {{period: {}, slots: 30, lease_ttl: 1}}\n\
         server: {{threads: 1}}\n{keys}",
        PERIOD.as_secs_f64()
    )
}

async fn cluster(n: usize, config: &str) -> Vec<Replica> {
    let replicas: Vec<Replica> = (0..n)
        .map(|i| Replica::spawn(config, &format!("r{i}")))
        .collect();
    for r in &replicas {
        // Ready = the limiter reached Redis and knows every replica.
        r.wait_for("ready", |v| v["replicas"].as_u64() == Some(n as u64))
            .await;
    }
    replicas
}

/// Sends `rate` requests per second for `duration`, each to the replica `pick(i)` chooses,
/// and returns every status.
async fn drive(
    replicas: &[Replica],
    rate: f64,
    duration: Duration,
    key: Option<&str>,
    pick: impl Fn(usize) -> usize,
) -> Vec<u16> {
    let urls: Vec<String> = replicas
        .iter()
        .map(|r| r.url("/v1/chat/completions"))
        .collect();
    drive_urls(urls, rate, duration, key.map(str::to_owned), pick).await
}

async fn drive_urls(
    urls: Vec<String>,
    rate: f64,
    duration: Duration,
    key: Option<String>,
    pick: impl Fn(usize) -> usize,
) -> Vec<u16> {
    let client = client();
    let mut tasks = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let n = (rate * duration.as_secs_f64()) as usize;
    for i in 0..n {
        tick.tick().await;
        let mut req = client.post(&urls[pick(i) % urls.len()]).body(BODY);
        if let Some(k) = &key {
            req = req.bearer_auth(k);
        }
        tasks.spawn(async move { req.send().await.map(|r| r.status().as_u16()).unwrap_or(0) });
    }
    tasks.join_all().await
}

/// The most requests the upstream received in any interval of length `PERIOD`.
fn max_in_any_period(at: &[Instant]) -> usize {
    let mut at = at.to_vec();
    at.sort();
    (0..at.len())
        .map(|i| {
            at[i..]
                .iter()
                .take_while(|t| t.duration_since(at[i]) < PERIOD)
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// B = replicas × max(⌈limit × 5%⌉, largest request): the bound Sluice exports.
fn bound(replicas: u64, limit: u64, cost: u64) -> u64 {
    replicas * ((limit as f64 * 0.05).ceil() as u64).max(cost)
}

async fn g1(
    name: &str,
    scope: &str,
    limits: &str,
    keys: &str,
    key: Option<&str>,
    limit: u64,
    cost: u64,
) {
    let redis = RedisServer::start().unwrap();
    let up = MockUpstream::start(MockConfig {
        completion_tokens: 7,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let cfg = config(&up.base_url(), &redis.url(), limits, keys);
    let replicas = cluster(5, &cfg).await;
    // Three times the limit, round robin, for three periods.
    let per_period = 3.0 * limit as f64 / cost as f64;
    let statuses = drive(
        &replicas,
        per_period / PERIOD.as_secs_f64(),
        PERIOD * 3,
        key,
        |i| i,
    )
    .await;
    let served = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(
        served + limited,
        statuses.len(),
        "only 200s and 429s: {statuses:?}"
    );
    let times: Vec<Instant> = up.requests().iter().map(|r| r.at).collect();
    assert_eq!(times.len(), served);
    let worst = max_in_any_period(&times) as u64 * cost;
    // The bound every replica exports, checked against the crate docs' formula.
    let b = replicas[0]
        .metric(&format!(
            "sluice_ratelimit_overshoot_bound{{scope=\"{scope}\"}}"
        ))
        .await;
    assert_eq!(b, bound(5, limit, cost), "exported bound");
    eprintln!(
        "G1 {name}: sent {}, served {served}, 429 {limited}; worst period {worst} of limit {limit} (bound {b})",
        statuses.len()
    );
    assert!(
        worst <= limit + b,
        "worst period {worst} > limit {limit} + bound {b}"
    );
    assert!(
        served as u64 * cost <= 3 * (limit + b) + limit,
        "no more than ~3 periods' worth"
    );
    assert!(
        limited as f64 > statuses.len() as f64 * 0.5,
        "most of a 3× overload is refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g1_deployment_tpm_holds_across_five_replicas() {
    g1(
        "deployment tpm",
        "deployment:m.0:tpm",
        ", tpm: 500",
        "",
        None,
        500,
        COST,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g1_deployment_rpm_holds_across_five_replicas() {
    g1(
        "deployment rpm",
        "deployment:m.0:rpm",
        ", rpm: 30",
        "",
        None,
        30,
        1,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g1_key_tpm_holds_across_five_replicas() {
    let keys = "general_settings: {master_key: sk-m}\nkeys:\n  - {key: sk-a, key_alias: a, tpm_limit: 500}\n";
    g1("key tpm", "key:a:tpm", "", keys, Some("sk-a"), 500, COST).await;
}

async fn g2(n: usize) {
    let redis = RedisServer::start().unwrap();
    let up = MockUpstream::start(MockConfig {
        completion_tokens: 7,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let limit = 1500; // 100 requests per period
    let cfg = config(&up.base_url(), &redis.url(), &format!(", tpm: {limit}"), "");
    let replicas = cluster(n, &cfg).await;
    let per_period = 3.0 * limit as f64 / COST as f64;
    let start = Instant::now();
    // 70% of the traffic to replica 0, the rest spread over the others.
    let statuses = drive(
        &replicas,
        per_period / PERIOD.as_secs_f64(),
        PERIOD * 4,
        None,
        |i| {
            if i % 10 < 7 {
                0
            } else {
                1 + i % (n - 1)
            }
        },
    )
    .await;
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    let times: Vec<Instant> = up.requests().iter().map(|r| r.at).collect();
    // Every full period after the first (which starts cold): ≥ 95% of the limit served.
    for k in 1..4 {
        let from = start + PERIOD * k;
        let to = from + PERIOD;
        let served = times.iter().filter(|t| **t >= from && **t < to).count() as u64 * COST;
        eprintln!(
            "G2 n={n}: period {k}: {served} of {limit} ({:.1}%)",
            served as f64 * 100.0 / limit as f64
        );
        assert!(
            served * 100 >= limit * 95,
            "period {k}: only {served} of {limit} served"
        );
        assert!(
            served <= limit + bound(n as u64, limit, COST),
            "period {k}: {served} over the bound"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g2_skewed_demand_uses_the_budget_with_five_replicas() {
    g2(5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g2_skewed_demand_uses_the_budget_with_twenty_replicas() {
    g2(20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g4_redis_outage_switches_to_local_limits_and_recovers() {
    let mut redis = RedisServer::start().unwrap();
    let up = MockUpstream::start(MockConfig {
        completion_tokens: 7,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let limit = 600; // 40 requests per period
    let cfg = config(&up.base_url(), &redis.url(), &format!(", tpm: {limit}"), "");
    let replicas = cluster(3, &cfg).await;
    let urls: Vec<String> = replicas
        .iter()
        .map(|r| r.url("/v1/chat/completions"))
        .collect();
    let per_period = 3.0 * limit as f64 / COST as f64;
    let load = tokio::spawn(drive_urls(
        urls,
        per_period / PERIOD.as_secs_f64(),
        PERIOD * 5,
        None,
        |i| i,
    ));
    tokio::time::sleep(PERIOD).await; // let the load run on Redis for a period first
    redis.kill();
    let killed = Instant::now();
    for r in &replicas {
        r.wait_for("local", |v| v["limits"] == "local").await;
    }
    eprintln!(
        "G4: all replicas in local mode {:?} after Redis died",
        killed.elapsed()
    );
    // A full period inside the outage: each replica enforces limit ÷ 3 on its own.
    let outage_from = Instant::now();
    tokio::time::sleep(PERIOD).await;
    let outage_to = Instant::now();
    redis.restart(&[]).unwrap();
    let back = Instant::now();
    for r in &replicas {
        r.wait_for("global", |v| v["limits"] == "global").await;
    }
    let recovered = back.elapsed();
    eprintln!("G4: claims back on Redis {recovered:?} after it restarted");
    assert!(
        recovered <= Duration::from_secs(2),
        "recovery took {recovered:?}"
    );
    let statuses = load.await.unwrap();
    let served = statuses.iter().filter(|s| **s == 200).count();
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "no 5xx and no dropped connection through the outage: {statuses:?}"
    );
    let in_outage = up
        .requests()
        .iter()
        .filter(|r| r.at >= outage_from && r.at < outage_to)
        .count() as u64
        * COST;
    eprintln!(
        "G4: sent {}, served {served}; during a full outage period {in_outage} of {limit}",
        statuses.len()
    );
    // Local mode: each of 3 replicas admits at most ⌈600 ÷ 3⌉ per window.
    assert!(
        in_outage <= limit + bound(3, limit, COST),
        "{in_outage} served during the outage"
    );
    assert!(in_outage > 0, "local mode still serves");
}

/// A replica killed with SIGKILL while it holds unspent leases: the ledger takes them back
/// within one lease lifetime (`lease_ttl` 1 s + the 2 s grace), so the survivor can serve the
/// whole limit minus what the dead replica admitted, long before the 60 s window would have
/// returned the budget by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_replicas_leases_come_back_within_a_lease_lifetime() {
    let redis = RedisServer::start().unwrap();
    let up = MockUpstream::start(MockConfig::default()).await.unwrap();
    let limit = 40u64;
    let cfg = format!(
        "model_list:\n  - model_name: m\n    litellm_params: {{model: openai/x, api_base: '{}', rpm: {limit}}}\n\
         router_settings: {{redis_url: '{}'}}\n\
         limits: {{period: 60, slots: 60, lease_ttl: 1, max_lease_fraction: 0.5}}\n\
         server: {{threads: 1}}\n",
        up.base_url(),
        redis.url()
    );
    let mut replicas = cluster(2, &cfg).await;
    let a = &replicas[0];
    let held = "sluice_ratelimit_held{scope=\"deployment:m.0:rpm\"}";
    // Load on A (40 requests/s) until it holds budget it has not spent (its demand-sized
    // prefetch), then kill it.
    let mut pace = tokio::time::interval(Duration::from_millis(25));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let unspent = loop {
        pace.tick().await;
        assert_eq!(a.chat(BODY).send().await.unwrap().status(), 200);
        let h = a.metric(held).await;
        if h > 0 {
            break h;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "A never held an unspent lease"
        );
    };
    replicas[0].child.kill().unwrap();
    replicas[0].child.wait().unwrap();
    let killed = Instant::now();
    let by_a = up.requests().len() as u64;
    eprintln!("crash: A served {by_a} and held {unspent} unspent when killed");
    // B asks every 25 ms until the upstream has served the whole limit.
    let b = &replicas[1];
    let mut statuses = Vec::new();
    while (up.requests().len() as u64) < limit {
        pace.tick().await;
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "the dead replica's budget never came back: served {} of {limit}",
            up.requests().len()
        );
        statuses.push(b.chat(BODY).send().await.unwrap().status().as_u16());
    }
    let back = killed.elapsed();
    eprintln!(
        "crash: the whole limit ({limit}) served {back:?} after the kill; B answered {} × 200, {} × 429",
        statuses.iter().filter(|s| **s == 200).count(),
        statuses.iter().filter(|s| **s == 429).count()
    );
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    assert!(
        back <= Duration::from_secs(5),
        "budget back after {back:?}: more than a lease lifetime (3 s) and B's polling"
    );
    // Over-refund is capped: what A had spent of its live lease may be served twice, at most
    // one lease (max_lease = 50 % of 40 = 20) beyond the limit.
    let total = up.requests().len() as u64;
    assert!(total <= limit + 20, "{total} served of {limit}");
}

/// Sockets the process holds (client and upstream connections, listeners).
fn sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .count()
}

/// Broken upstreams and clients that hang up leave no connection behind: after bursts of cut,
/// stalled and abandoned exchanges (20 concurrent each), the process holds no more sockets
/// than before them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_faults_and_hang_ups_leak_no_connections() {
    let mock = |fault: Option<Fault>| {
        MockUpstream::start(MockConfig {
            fault,
            stream_chunks: 50,
            stream_interval: Duration::from_millis(20),
            ..MockConfig::default()
        })
    };
    let (ok, cut, stall) = (
        mock(None).await.unwrap(),
        mock(Some(Fault::CutJson)).await.unwrap(),
        mock(Some(Fault::Stall)).await.unwrap(),
    );
    let fast = ", timeout: 0.3, stream_timeout: 0.3";
    let cfg = lifecycle_config(&ok.base_url(), &["ok"], "")
        + &format!(
            "  - model_name: cut\n    litellm_params: {{model: openai/x, api_base: '{}'}}\n\
             \x20 - model_name: stall\n    litellm_params: {{model: openai/x, api_base: '{}'{fast}}}\n\
             \x20 - model_name: stall-stream\n    litellm_params: {{model: openai/x, api_base: '{}'{fast}}}\n\
             router_settings: {{allowed_fails: 1000}}\n",
            cut.base_url(),
            stall.base_url(),
            stall.base_url()
        );
    let replica = Replica::spawn(&cfg, "leaks");
    replica.wait_for("ready", |_| true).await;
    let pid = replica.child.id();
    let burst = |group: &'static str, stream: bool, hang_up: bool| {
        let url = replica.url("/v1/chat/completions");
        async move {
            let client = client();
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..20 {
                let req = client.post(&url).body(format!(
                    r#"{{"model":"{group}","stream":{stream},"messages":[{{"role":"user","content":"hi"}}]}}"#
                ));
                tasks.spawn(async move {
                    let Ok(mut resp) = req.send().await else {
                        return 0;
                    };
                    let status = resp.status().as_u16();
                    if hang_up {
                        let _ = resp.chunk().await; // one event, then hang up
                    } else {
                        while let Ok(Some(_)) = resp.chunk().await {}
                    }
                    status
                });
            }
            tasks.join_all().await
        }
    };
    // One healthy exchange first: its upstream connection stays pooled, in the baseline.
    let warm = replica.chat(BODY.replace("\"m\"", "\"ok\"")).send().await;
    assert_eq!(warm.unwrap().status(), 200);
    let settle = || async {
        // Our client is gone; let Sluice notice the closed client connections.
        let started = Instant::now();
        let mut last = sockets(pid);
        while started.elapsed() < Duration::from_secs(3) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = sockets(pid);
            if now == last {
                break;
            }
            last = now;
        }
        last
    };
    let baseline = settle().await;
    // Failures never cool a deployment down here (allowed_fails), so every request of a
    // burst reaches its broken upstream.
    for (group, stream, hang_up, want) in [
        ("cut", false, false, 502),
        ("stall", false, false, 504),
        ("stall-stream", true, false, 200),
        ("ok", true, true, 200),
    ] {
        let statuses = burst(group, stream, hang_up).await;
        assert!(statuses.iter().all(|s| *s == want), "{group}: {statuses:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let after = loop {
        let n = sockets(pid);
        if n <= baseline + 2 || Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("leaks: {baseline} sockets before, {after} after 80 broken exchanges");
    assert!(
        after <= baseline + 2,
        "{after} sockets open after the faults, {baseline} before: connections leaked"
    );
}

/// Three masters, slots spread by `redis-cli --cluster create`.
struct RedisCluster {
    nodes: Vec<RedisServer>,
    /// The nodes' working directories; removed after the nodes are stopped (fields are
    /// dropped in order).
    _dir: ScratchDir,
}

impl RedisCluster {
    fn start() -> Self {
        let base = ScratchDir::new("cluster").unwrap();
        let nodes: Vec<RedisServer> = (0..3)
            .map(|i| {
                let dir = base.join(format!("n{i}"));
                std::fs::create_dir_all(&dir).unwrap();
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--dir",
                    dir.to_str().unwrap(),
                ])
                .unwrap()
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        Self { nodes, _dir: base }
    }

    fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    fn cli(&self, node: usize, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.nodes[node].port().to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    async fn wait_ok(&self) {
        let start = Instant::now();
        while !(0..3).all(|i| {
            self.cli(i, &["cluster", "info"])
                .contains("cluster_state:ok")
        }) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "cluster never became ok"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_on_a_three_master_redis_cluster() {
    let cluster_redis = RedisCluster::start();
    cluster_redis.wait_ok().await;
    let up = MockUpstream::start(MockConfig {
        completion_tokens: 7,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let limit = 20;
    let cfg = config(
        &up.base_url(),
        &cluster_redis.url(),
        &format!(", rpm: {limit}"),
        "",
    );
    let replicas = cluster(2, &cfg).await;
    let statuses = drive(&replicas, 40.0, Duration::from_secs(1), None, |i| i).await;
    let served = statuses.iter().filter(|s| **s == 200).count() as u64;
    eprintln!(
        "cluster: sent {}, served {served} of rpm {limit}",
        statuses.len()
    );
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    assert!(served <= limit + bound(2, limit, 1), "{served} served");
    assert!(
        served >= limit - bound(2, limit, 1),
        "budget stranded: {served} served"
    );
    // The ledger and the heartbeat set live on the cluster, each key on its own slot.
    let keys: String = (0..3)
        .map(|i| cluster_redis.cli(i, &["--scan", "--pattern", "sluice:*"]))
        .collect();
    assert!(keys.contains("sluice:{deployment:m.0:rpm}:w"), "{keys}");
    assert!(keys.contains("sluice:{replicas}"), "{keys}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_names_every_attempt_and_skip_but_no_secret() {
    let bad = MockUpstream::start(MockConfig {
        status: Some(503),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let good = MockUpstream::start(MockConfig {
        completion_tokens: 7,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let cfg = [
        "model_list:".to_owned(),
        "  - model_name: m".to_owned(),
        format!(
            "    litellm_params: {{model: openai/a, api_base: '{}', order: 1}}",
            bad.base_url()
        ),
        "  - model_name: m".to_owned(),
        format!(
            "    litellm_params: {{model: openai/b, api_base: '{}', order: 2}}",
            good.base_url()
        ),
        "router_settings: {allowed_fails: 0}".to_owned(),
        "general_settings: {master_key: sk-master-secret}".to_owned(),
        "keys: [{key: sk-team-secret, key_alias: team}]".to_owned(),
    ]
    .join("\n");
    let (replica, log) = Replica::spawn_logging(&cfg, "access", "warn,sluice::access=info");
    replica.wait_for("ready", |_| true).await;
    for _ in 0..2 {
        let resp = replica
            .chat(BODY)
            .bearer_auth("sk-team-secret")
            .header("x-request-id", "req-42")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let _ = resp.bytes().await;
    }
    // The lines are written as the responses finish; wait (bounded) for both.
    let start = Instant::now();
    let lines: Vec<serde_json::Value> = loop {
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| l.split_once("sluice::access] ").map(|(_, json)| json))
            .map(|json| serde_json::from_str(json).unwrap())
            .collect();
        if lines.len() >= 2 {
            assert!(!text.contains("secret"), "a key reached the log:\n{text}");
            break lines;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no access lines in:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let first = &lines[0];
    assert_eq!(first["request_id"], "req-42");
    assert_eq!(
        (
            first["key"].as_str(),
            first["group"].as_str(),
            first["status"].as_u64()
        ),
        (Some("team"), Some("m"), Some(200))
    );
    assert_eq!(
        first["tried"],
        serde_json::json!([
            {"deployment": "m.0", "outcome": "http_503"},
            {"deployment": "m.1", "outcome": "http_200"},
        ])
    );
    // allowed_fails 0: the 503 cooled m.0 down, so the second request skipped it.
    assert_eq!(
        lines[1]["skipped"],
        serde_json::json!([{"deployment": "m.0", "reason": "cooldown"}])
    );
    assert_eq!(lines[1]["tried"][0]["deployment"], "m.1");
}

/// Sends `signal` (`TERM`, `HUP`, …) to a replica.
fn signal(replica: &Replica, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &replica.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn lifecycle_config(upstream: &str, groups: &[&str], extra: &str) -> String {
    let mut cfg = String::from("model_list:\n");
    for g in groups {
        cfg.push_str(&format!(
            "  - model_name: {g}\n    litellm_params: {{model: openai/x, api_base: '{upstream}'}}\n"
        ));
    }
    cfg.push_str(extra);
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_stream_finish_refuses_new_connections_and_exits_0() {
    drains_on("TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_drains_like_sigterm() {
    drains_on("INT").await;
}

async fn drains_on(sig: &str) {
    let pause = Duration::from_secs(2);
    let up = MockUpstream::start(MockConfig {
        stream_pause: pause,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let cfg = lifecycle_config(&up.base_url(), &["m"], "server: {grace_period: 20}\n");
    let mut replica = Replica::spawn(&cfg, &format!("drain-{sig}"));
    replica.wait_for("ready", |_| true).await;
    let mut stream = replica
        .chat(r#"{"model":"m","stream":true,"messages":[]}"#)
        .send()
        .await
        .unwrap();
    let first = stream.chunk().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: {"));
    let sent_term = Instant::now();
    signal(&replica, sig);
    // The listener closes at once: new connections are refused (bounded wait for the close).
    let addr = format!("127.0.0.1:{}", replica.port);
    while tokio::net::TcpStream::connect(&addr).await.is_ok() {
        assert!(
            sent_term.elapsed() < Duration::from_secs(2),
            "still accepting after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The stream in flight completes.
    let mut rest = Vec::new();
    while let Some(c) = stream.chunk().await.unwrap() {
        rest.extend_from_slice(&c);
    }
    let rest = String::from_utf8(rest).unwrap();
    assert!(rest.trim_end().ends_with("data: [DONE]"), "{rest}");
    // Then the process exits 0, well before the 20 s grace period.
    let status = loop {
        if let Some(s) = replica.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            sent_term.elapsed() < Duration::from_secs(10),
            "did not exit after draining"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("exited {status} {:?} after SIG{sig}", sent_term.elapsed());
    assert!(status.success(), "{status}");
    assert!(
        sent_term.elapsed() >= pause / 2,
        "it must have waited for the stream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_a_broken_config_leaves_the_old_one_serving() {
    let up = MockUpstream::start(MockConfig::default()).await.unwrap();
    let (replica, log) =
        Replica::spawn_logging(&lifecycle_config(&up.base_url(), &["a"], ""), "hup", "info");
    replica.wait_for("ready", |_| true).await;
    let pid = replica.child.id();
    let path = replica.config.clone();
    let ask = |group: &'static str| {
        replica
            .chat(format!(r#"{{"model":"{group}","messages":[]}}"#))
            .send()
    };
    assert_eq!(ask("b").await.unwrap().status(), 404);
    // Add group `b` and send SIGHUP: the same process serves it (bounded wait for the swap).
    std::fs::write(&path, lifecycle_config(&up.base_url(), &["a", "b"], "")).unwrap();
    signal(&replica, "HUP");
    let start = Instant::now();
    while ask("b").await.unwrap().status() != 200 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "group b never appeared"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(replica.child.id(), pid);
    // A broken config is refused; the old one keeps serving both groups.
    std::fs::write(&path, "model_lsit: [\n").unwrap();
    signal(&replica, "HUP");
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("reload refused") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no refusal logged:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ask("a").await.unwrap().status(), 200);
    assert_eq!(ask("b").await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reload_needs_the_master_key() {
    let up = MockUpstream::start(MockConfig::default()).await.unwrap();
    let keys = "general_settings: {master_key: sk-admin}\nkeys: [{key: sk-user}]\n";
    let replica = Replica::spawn(&lifecycle_config(&up.base_url(), &["a"], keys), "admin");
    replica.wait_for("ready", |_| true).await;
    let path = replica.config.clone();
    std::fs::write(&path, lifecycle_config(&up.base_url(), &["a", "c"], keys)).unwrap();
    let reload = |key: &'static str| {
        client()
            .post(replica.url("/admin/reload"))
            .bearer_auth(key)
            .send()
    };
    assert_eq!(reload("sk-user").await.unwrap().status(), 403);
    assert_eq!(reload("sk-admin").await.unwrap().status(), 200);
    let resp = replica
        .chat(r#"{"model":"c","messages":[]}"#)
        .bearer_auth("sk-admin")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    std::fs::write(&path, "nope: 1\n").unwrap();
    let refused = reload("sk-admin").await.unwrap();
    assert_eq!(refused.status(), 400);
    assert!(refused.text().await.unwrap().contains("unknown key"));
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../ops/systemd/sluice.service"
    ))
    .unwrap();
    // Verify checks that ExecStart exists: point it at the binary this build made.
    let unit = unit.replace("/usr/local/bin/sluice", env!("CARGO_BIN_EXE_sluice"));
    let dir = ScratchDir::new("unit").unwrap();
    let path = dir.join("sluice.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// TLS under the binary's one-runtime-per-worker model (in-process tests run the work-stealing
/// runtime): a TLS listener serving HTTP/2 (ALPN) and HTTP/1.1, JSON and streams, over many
/// connections at once; and a second Sluice using the first as an HTTPS upstream, trusting its
/// certificate through `SSL_CERT_FILE`, so the upstream TLS path carries real traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_and_https_upstream_under_one_runtime_per_worker() {
    let dir = ScratchDir::new("tls-processes").unwrap();
    let (cert, key) = sluice_testkit::self_signed_cert(&dir).unwrap();
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let up = MockUpstream::start(MockConfig::default()).await.unwrap();
    let provider = Replica::spawn(
        // `x` too: the gateway below sends its deployments' upstream model, `x`.
        &lifecycle_config(
            &up.base_url(),
            &["m", "x"],
            &format!("server: {{tls: {{cert: '{cert}', key: '{key}'}}}}\n"),
        ),
        "tls-provider",
    );
    let https = format!("https://127.0.0.1:{}", provider.port);
    let curl = |args: Vec<String>| {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            sluice_testkit::curl(&dir, &args)
        })
    };
    let readiness = format!("{https}/health/readiness");
    eventually("ready over TLS", || async {
        let probe = curl(vec!["--cacert".into(), cert.into(), readiness.clone()]);
        probe
            .await
            .unwrap()
            .ok()
            .filter(|(status, _)| status.ends_with(" 200"))
    })
    .await;
    // 32 clients at once, each its own TLS connection: HTTP/2 by ALPN, JSON.
    let chat = format!("{https}/v1/chat/completions");
    let json = |proto: &str| {
        vec![
            "--cacert".into(),
            cert.into(),
            proto.into(),
            "-H".into(),
            "content-type: application/json".into(),
            "-d".into(),
            BODY.into(),
            chat.clone(),
        ]
    };
    let calls: Vec<_> = (0..32).map(|_| curl(json("--http2"))).collect();
    for call in calls {
        let (status, body) = call.await.unwrap().unwrap();
        assert_eq!(status, "2 200", "{body}");
        assert!(body.contains("chat.completion"), "{body}");
    }
    // HTTP/1.1 over TLS, JSON and a stream.
    let (status, body) = curl(json("--http1.1")).await.unwrap().unwrap();
    assert_eq!(status, "1.1 200", "{body}");
    let stream = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut args = json("--http1.1");
    args[6] = stream.into();
    let (status, body) = curl(args).await.unwrap().unwrap();
    assert_eq!(status, "1.1 200", "{body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    assert_eq!(up.calls(), 34);

    // A gateway whose upstream is the provider, over HTTPS.
    let (gateway, _) = Replica::spawn_with(
        &lifecycle_config(&format!("{https}/v1"), &["m"], ""),
        "tls-gateway",
        "warn",
        &[("SSL_CERT_FILE", cert)],
    );
    gateway.wait_for("ready", |_| true).await;
    let sends: Vec<_> = (0..32)
        .map(|_| {
            gateway
                .chat(BODY)
                .header("content-type", "application/json")
                .send()
        })
        .collect();
    for send in sends {
        let resp = send.await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.text().await.unwrap();
        assert!(body.contains("chat.completion"), "{body}");
    }
    let resp = gateway
        .chat(stream)
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.unwrap();
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    assert_eq!(
        up.calls(),
        34 + 33,
        "every gateway request crossed both hops"
    );
}
