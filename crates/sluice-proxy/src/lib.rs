//! The Sluice gateway: the only crate that knows Pingora.
//!
//! # Why `HttpServerApp` and not `ProxyHttp`
//! Sluice must read a request's whole body before it knows where the request goes (the model
//! group is in the JSON), and must be able to send that same body to a second deployment when
//! the first answers 429. Pingora's `ProxyHttp` does not carry a body consumed in
//! `request_filter` upstream, its retry buffer stops at 64 KiB, and it does not retry a POST on
//! a 429 (DESIGN.md §1). With the body read up front, `ProxyHttp` would contribute nothing but
//! its phases. So [`Gateway`] implements `pingora_core`'s `HttpServerApp` directly: Sluice keeps
//! Pingora's server, listeners, TLS, graceful shutdown/upgrade and its transport connector
//! (TLS to upstreams; plain TCP ones are tokio sockets, `upstream::h1::Io` says why), owns the
//! fallback loop and body replay, and does not compile `pingora-proxy`/`pingora-cache` at all.
//! Plain HTTP/1 connections run their keep-alive loop in `Front` rather than Pingora's, calling
//! the gateway without the trait, so a request's state lives in its connection's task instead
//! of two boxes allocated per request; HTTP/2 and TLS take Pingora's loop, which calls the same
//! code through `HttpServerApp`.
//!
//! # Why an HTTP/1.1 server side of its own
//! On a plain connection the common request (HTTP/1.1, a `Content-Length` or no body) is read
//! and answered by `downstream::h1`: its head parsed once by `httparse` and its fields looked
//! up in place, the answer's head and body written in one `send`. Anything else (chunked
//! bodies, `Expect`, upgrades, HTTP/1.0, malformed heads) is declined: the bytes read go back
//! in front of the socket and Pingora's session serves the connection from there on, so
//! nothing Pingora would have accepted or refused is treated differently. The gateway sees
//! either side through `downstream::Client`. On the load bench's profile (callgrind, per
//! request): 78.8k → 62.5k instructions, 1,475 → 977 L1 misses, and at 256 connections 491 →
//! 295 misses of a 1 MiB cache; the module docs say what Pingora's session spent them on.
//!
//! # Why an HTTP/1.1 client of its own
//! Upstream requests go through `upstream::h1`, a small HTTP/1.1 client on plain TCP sockets
//! of its own or the TLS connections Pingora's `TransportConnector` opens, with its own pool.
//! Pingora's `HttpSession` sent a request's header and body in two writes, kept a 64 KiB body
//! buffer per connection and spawned a task per pooled connection; on the load bench replacing
//! it took CPU per request from 43–48 µs to 31–36 µs and 1,000 open streams from 157 MB to
//! 98 MB (the module docs say how).
//!
//! # One runtime per worker
//! The binary's `server.threads` workers are Pingora's "no steal" runtimes, one single-threaded
//! tokio runtime each, like nginx's worker processes: a connection, its task and its upstream
//! connections stay on one thread. With one work-stealing runtime (Pingora's default) a task ran on
//! whichever worker polled its socket last, so connection state moved between cores and workers
//! woke each other. Pingora spawns each accepted connection on a random worker, while the socket
//! reports readiness to the runtime that accepted it, which would cost an `eventfd` write and a
//! cross-thread wake-up per event; so `Front` first moves a plain-TCP connection's socket onto the
//! runtime that serves it (a `dup`, one `epoll_ctl` each way, once per connection). TLS connections
//! stay where they were accepted (correct, a little slower). Upstream pools are sharded per worker
//! thread to match (`upstream::h1::Pool`). On the load bench (three alternating rounds): 25.0k →
//! 37.1k requests/s and CPU per request 42.4 → 27.0 µs at 64 connections, 23.4k → 27.0k and 47.5 →
//! 40.2 µs at 256. The cost: a busy worker cannot hand work to an idle one, so an uneven share of
//! long-lived connections stays uneven (as with nginx). HTTP/2 is not pinned: Pingora spawns each
//! stream of a connection on a random worker, so one busy HTTP/2 connection (from a load balancer,
//! say) still uses every worker. In-process tests, which start and stop many servers, keep
//! Pingora's work-stealing runtime ([`Lifecycle::runtime_per_worker`] says why); the binary, and so
//! the process tests, run one runtime per worker.
//!
//! # Built with profile-guided optimisation
//! The release build (`scripts/pgo-build.sh`, also the container image's) trains an
//! instrumented binary on loopback for ~20 s and compiles again with the profile: the same code,
//! its hot path laid out together and inlined where it runs. Callgrind on the load bench's
//! profile (`PHASES=profile`), plain → PGO, per request: 46.0k → 38.0k instructions at 8
//! connections, 47.8k → 40.6k at 256; on earlier code, instruction-cache misses at 256
//! connections 2,372 → 1,611 (the request path is long and spread over many crates).
//!
//! # Entry points
//! [`build_server`] assembles a Pingora `Server` for a [`sluice_config::Config`]; the binary
//! (`sluice`) and the end-to-end tests both start Sluice through it.

mod access;
mod alarm;
mod downstream;
mod gateway;
mod limits;
pub mod logging;
mod metrics;
mod reject;
mod upstream;

use std::sync::Arc;

use pingora_core::server::configuration::ServerConf;
use pingora_core::server::{Server, ShutdownWatch};
use pingora_core::services::background::{background_service, BackgroundService};
use pingora_core::services::listening::Service;
use sluice_config::Config;
use sluice_ratelimit::{Ledger, Limiter, MemoryLedger, RedisLedger, Settings, Window};

pub use gateway::Gateway;
pub use reject::Rejection;

/// The request path's lookup maps: built from the config, read per request. foldhash instead
/// of std's SipHash, which was ~1 % of a request's instructions over four lookups; the keys
/// come from the config, so a client can only look up, never fill a map with collisions.
pub(crate) type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Locks `m`, carrying on past a holder's panic: every mutex in this crate guards plain data
/// (a log buffer, idle connections, a map of pools) that a panic cannot leave half-changed.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether the header field name `name` is `lower`, ASCII case ignored.
///
/// `name` must be a token (httparse's and `http`'s field names are) and `lower` lowercase
/// letters, digits and `-` (every name Sluice looks for). Then setting each byte's 0x20 bit
/// lowercases a name exactly: it turns `A`-`Z` into `a`-`z`, leaves `a`-`z`, digits and `-` as
/// they are, and the only other bytes it could map onto a digit or `-` are control characters,
/// which no token has. So the comparison runs 8 bytes at a time: callgrind had the std
/// `eq_ignore_ascii_case` (chunked, with a set-up of its own) at ~240 instructions per
/// request-field lookup, and a byte loop at ~8 per byte.
#[inline]
pub(crate) fn field_is(name: &[u8], lower: &str) -> bool {
    let lower = lower.as_bytes();
    if name.len() != lower.len() {
        return false;
    }
    let (mut a, mut b) = (name.chunks_exact(8), lower.chunks_exact(8));
    for (x, y) in (&mut a).zip(&mut b) {
        let (Ok(x), Ok(y)) = (<[u8; 8]>::try_from(x), <[u8; 8]>::try_from(y)) else {
            return false; // cannot happen: both chunks are 8 bytes
        };
        if u64::from_ne_bytes(x) | 0x2020_2020_2020_2020 != u64::from_ne_bytes(y) {
            return false;
        }
    }
    a.remainder()
        .iter()
        .zip(b.remainder())
        .all(|(x, y)| x | 0x20 == *y)
}

/// The read buffer Pingora puts in front of each client connection: none. Its HTTP/1 parser
/// reads the request into a buffer of its own, so an L4 buffer would only copy the bytes once
/// more and hold memory per connection (64 KiB by default: 64 MB with a thousand open streams).
const CLIENT_READ_BUFFER: usize = 0;

/// Where and how to listen, after command-line overrides.
#[derive(Debug, Clone)]
pub struct Listen {
    /// `host:port` to bind.
    pub addr: String,
    /// Worker threads.
    pub threads: usize,
}

impl Listen {
    /// The config's `server.host`/`server.port`/`server.threads`, with optional overrides.
    pub fn from_config(config: &Config, host: Option<&str>, port: Option<u16>) -> Self {
        let host = host.unwrap_or(&config.server.host);
        let port = port.unwrap_or(config.server.port);
        let addr = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let threads = config
            .server
            .threads
            .or_else(|| std::thread::available_parallelism().ok().map(usize::from))
            .unwrap_or(1);
        Self { addr, threads }
    }
}

/// How the process around the gateway behaves (the binary's choices; tests use the default).
#[derive(Debug, Clone, Default)]
pub struct Lifecycle {
    /// The config file, re-read on SIGHUP and `POST /admin/reload`.
    pub config_path: Option<std::path::PathBuf>,
    /// Exit as soon as a graceful shutdown has drained (instead of sleeping out Pingora's
    /// whole grace period). Only for a process of its own: it calls `process::exit`.
    pub exit_when_drained: bool,
    /// One single-threaded runtime per worker (crate docs, "One runtime per worker"), else one
    /// work-stealing runtime. Only for a process that starts one server: Pingora's per-thread
    /// runtimes find their siblings through a `thread_local::ThreadLocal`, whose thread ids are
    /// recycled, so in a process that has stopped a server before (a test binary), a new
    /// worker thread can inherit a stopped runtime's handles and spawn onto it.
    pub runtime_per_worker: bool,
    /// Take the listening sockets over from a running Sluice (Pingora's upgrade socket).
    pub upgrade: bool,
    /// The upgrade socket's path.
    pub upgrade_sock: Option<String>,
}

/// Builds a Pingora server running Sluice for `config` on `listen`. Run it with
/// `Server::run` (or `run_forever`); the returned [`Gateway`] handle lets the caller flip
/// readiness when draining.
///
/// # Errors
/// When the TLS certificate or key cannot be loaded.
pub fn build_server(config: Config, listen: &Listen) -> Result<(Server, Arc<Gateway>), String> {
    build_server_with(config, listen, Lifecycle::default())
}

/// [`build_server`] with the process's [`Lifecycle`].
///
/// Shutdown (SIGTERM, or SIGQUIT for an upgrade): Pingora stops accepting at once and flips
/// the shutdown watch; Sluice then answers readiness with 503, lets in-flight requests and
/// streams finish for up to `server.grace_period`, refunds its leases to the ledger, and
/// (with `exit_when_drained`) exits 0 as soon as nothing is in flight. Pingora alone would
/// sleep out the whole grace period even when idle, and then cut what still runs.
///
/// # Errors
/// When the TLS certificate or key cannot be loaded.
pub fn build_server_with(
    config: Config,
    listen: &Listen,
    lifecycle: Lifecycle,
) -> Result<(Server, Arc<Gateway>), String> {
    // Pingora's "fast" timers are shared per 10 ms tick and live until their deadline, even
    // when the wait they bounded finished long before: with one 60 s pooled-connection idle
    // timer per request, that held ~15 MB more after ten minutes at 12k requests/s. Timers
    // longer than 1 s use tokio's, which are freed when the wait ends.
    pingora_timeout::fast_timeout::set_fast_timeout_to_tokio_threshold(Some(
        std::time::Duration::from_secs(1),
    ));
    let grace = config.server.grace_period;
    let mut conf = ServerConf {
        threads: listen.threads.max(1),
        // One single-threaded runtime per worker (crate docs, "One runtime per worker").
        work_stealing: !lifecycle.runtime_per_worker,
        // In-flight requests get the grace period; after it, whatever still runs is cut.
        grace_period_seconds: Some(grace.as_secs().max(1)),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    if let Some(sock) = &lifecycle.upgrade_sock {
        conf.upgrade_sock.clone_from(sock);
    }
    let opt = pingora_core::server::configuration::Opt {
        upgrade: lifecycle.upgrade,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    server.bootstrap();
    let limiter = limiter_for(&config, listen.threads);
    let tls = config.server.tls.clone();
    let gateway = Arc::new(Gateway::new(
        config,
        limiter.clone(),
        lifecycle.runtime_per_worker,
    ));
    gateway.set_config_path(lifecycle.config_path.clone());
    let mut service = Service::new("sluice".to_owned(), Front::new(&gateway));
    let endpoint = pingora_core::listeners::ListenerConfig::tcp(listen.addr.clone()).l4_buffer(
        pingora_core::protocols::l4::stream::L4BufferSettings::default().read(CLIENT_READ_BUFFER),
    );
    let endpoint = match &tls {
        Some(files) => {
            let mut settings =
                pingora_core::listeners::tls::TlsSettings::intermediate(&files.cert, &files.key)
                    .map_err(|e| format!("server.tls: {e}"))?;
            settings.enable_h2();
            endpoint.tls(settings)
        }
        None => endpoint,
    };
    service.add_listener(endpoint);
    server.add_service(service);
    if let Some(admin) = &gateway.admin_listen() {
        let mut admin_service = Service::new("sluice-admin".to_owned(), AdminApp(gateway.clone()));
        admin_service.add_tcp(admin);
        server.add_service(admin_service);
    }
    server.add_service(background_service("sluice-limits", LimiterTask(limiter)));
    server.add_service(background_service(
        "sluice-lifecycle",
        LifecycleTask {
            gateway: gateway.clone(),
            grace,
            exit_when_drained: lifecycle.exit_when_drained,
        },
    ));
    Ok((server, gateway))
}

/// Readiness to systemd, SIGHUP reloads, and the drain on shutdown.
struct LifecycleTask {
    gateway: Arc<Gateway>,
    grace: std::time::Duration,
    exit_when_drained: bool,
}

#[async_trait::async_trait]
impl BackgroundService for LifecycleTask {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let gw = &self.gateway;
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(50));
        let mut told_ready = false;
        // Pooled upstream connections are swept once a second (every 20 ticks).
        const SWEEP_EVERY: u32 = 20;
        let mut ticks: u32 = 0;
        loop {
            tokio::select! {
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        break;
                    }
                }
                Some(()) = async {
                    match hangup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
                    match gw.reload_from_file() {
                        Ok(()) => {}
                        Err(e) => log::error!("SIGHUP: reload refused, the old config stays: {e}"),
                    }
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
                }
                _ = tick.tick() => {
                    ticks = ticks.wrapping_add(1);
                    if ticks % SWEEP_EVERY == 0 {
                        gw.sweep_pools();
                    }
                    if !told_ready && gw.limiter().ready() {
                        told_ready = true;
                        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
                    }
                }
            }
        }
        // Shutting down: the listener has stopped accepting.
        gw.start_draining();
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        let deadline = tokio::time::Instant::now() + self.grace;
        while gw.in_flight() > 0 && tokio::time::Instant::now() < deadline {
            tick.tick().await;
        }
        log::info!(
            "drained ({} request(s) still in flight); refunding leases",
            gw.in_flight()
        );
        gw.limiter().release_all().await;
        if self.exit_when_drained {
            logging::flush();
            std::process::exit(0);
        }
    }
}

/// The limiter for `config`: on Redis when configured, else on the in-process ledger.
pub fn limiter_for(config: &Config, threads: usize) -> Arc<Limiter> {
    let l = &config.limits;
    let window = Window {
        period: l.period,
        slots: l.slots,
    };
    let slot = l.period / l.slots.max(1);
    let settings = Settings {
        window,
        lease_ttl: l.lease_ttl,
        horizon: l.horizon,
        max_lease_fraction: l.max_lease_fraction,
        shards: threads.max(1),
        on_redis_error: match l.on_redis_error {
            sluice_config::OnRedisError::Local => sluice_ratelimit::OnRedisError::Local,
            sluice_config::OnRedisError::Open => sluice_ratelimit::OnRedisError::Open,
            sluice_config::OnRedisError::Closed => sluice_ratelimit::OnRedisError::Closed,
        },
        heartbeat: std::time::Duration::from_secs(1).min(l.period / 4),
        replica_id: format!(
            "sluice-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ),
        tick: std::time::Duration::from_millis(50)
            .min(slot / 2)
            .max(std::time::Duration::from_millis(5)),
        admit_wait: l.admit_wait,
    };
    let ledger: Arc<dyn Ledger> = match &config.redis {
        Some(r) => Arc::new(RedisLedger::new(r.url.expose(), window, l.redis_timeout)),
        None => Arc::new(MemoryLedger::new(window)),
    };
    Limiter::new(settings, ledger)
}

/// Runs the limiter's maintenance (demand sampling, lease expiry, prefetch, heartbeats) until
/// shutdown, then refunds every lease.
struct LimiterTask(Arc<Limiter>);

#[async_trait::async_trait]
impl BackgroundService for LimiterTask {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.0.clone().run(shutdown).await;
    }
}

/// Lets the server own a handle to a gateway the caller also holds.
/// The gateway as a Pingora HTTP app, with the options for one kind of connection.
struct SharedGateway(Arc<Gateway>, pingora_core::apps::HttpServerOptions);

#[async_trait::async_trait]
impl pingora_core::apps::HttpServerApp for SharedGateway {
    async fn process_new_http(
        self: &Arc<Self>,
        session: pingora_core::protocols::http::ServerSession,
        shutdown: &pingora_core::server::ShutdownWatch,
    ) -> Option<pingora_core::apps::ReusedHttpStream> {
        self.0.process_new_http(session, shutdown).await
    }

    fn server_options(&self) -> Option<&pingora_core::apps::HttpServerOptions> {
        Some(&self.1)
    }
}

/// Every new connection on the main listener. A plain one is served by Sluice's own HTTP/1.1
/// side (`downstream::h1`) until a request it declines, then by Pingora's session; TLS by
/// Pingora's loop. With h2c on, Pingora tells HTTP/2 from HTTP/1 by reading 24 bytes with no
/// deadline, so a client that sends fewer and stalls (a slow loris, or a tiny HTTP/1.0 request)
/// would hold the connection forever: `Front` reads them itself, within
/// `server.client_timeout`, stopping at the first byte that is not the preface's, and hands
/// HTTP/2 to an app that finds those bytes put back in front of the socket.
struct Front {
    h1: Arc<SharedGateway>,
    h2c: Option<Arc<SharedGateway>>,
}

impl Front {
    fn new(gateway: &Arc<Gateway>) -> Self {
        let options = gateway.server_options().cloned().unwrap_or_default();
        let mut h1 = options.clone();
        h1.h2c = false;
        Self {
            h1: Arc::new(SharedGateway(gateway.clone(), h1)),
            h2c: options
                .h2c
                .then(|| Arc::new(SharedGateway(gateway.clone(), options))),
        }
    }

    /// HTTP/1 on a plain connection: Sluice's own side request after request (keep-alive,
    /// `keepalive_request_limit`, none once shutting down), and from the first request it
    /// declines on, Pingora's session. Each head's time limit counts from `quiet_since`: the
    /// connection's opening, then the end of the previous answer.
    async fn serve_plain(
        &self,
        mut conn: downstream::h1::Conn,
        mut quiet_since: tokio::time::Instant,
        shutdown: &pingora_core::server::ShutdownWatch,
    ) -> Option<pingora_core::protocols::Stream> {
        // The connection's head timer, set again for each request (see `alarm`).
        let mut alarm = alarm::Alarm::default();
        loop {
            match self
                .h1
                .0
                .serve_h1(&mut conn, &mut alarm, quiet_since, shutdown)
                .await
            {
                gateway::Next::Another(answered) => quiet_since = answered,
                gateway::Next::Close => return None,
                gateway::Next::Pingora => break,
            }
        }
        let (tcp, read) = conn.into_parts();
        // Boxed: the hand-over is rare, and inline its 7.5 KB state would size the task of
        // every plain connection (8.0 KB against 5.7 KB for the common path).
        Box::pin(self.serve_pingora_h1(plain_stream(tcp, &read), shutdown)).await
    }

    /// HTTP/1 on a plain connection through Pingora's session: Pingora's loop for an
    /// `HttpServerApp` (`pingora_core::apps`, HTTP/1 branch: keep-alive 60 s, none once
    /// shutting down, `keepalive_request_limit`, settings carried to the next request), but
    /// calling [`Gateway::serve`] directly. Through the trait, each request's future went into
    /// a box of its own, twice (`async_trait` on `SharedGateway` and on `Gateway`): two
    /// allocations of the whole request state, and the copy into them, per request.
    async fn serve_pingora_h1(
        &self,
        stream: pingora_core::protocols::Stream,
        shutdown: &pingora_core::server::ShutdownWatch,
    ) -> Option<pingora_core::protocols::Stream> {
        let mut next = Some((stream, None::<pingora_core::apps::HttpPersistentSettings>));
        while let Some((stream, settings)) = next {
            let mut session = pingora_core::protocols::http::ServerSession::new_http1(stream);
            match settings {
                // A request after the first: what the previous one left (keep-alive, reuses).
                Some(settings) => settings.apply_to_session(&mut session),
                None => {
                    session.set_keepalive((!*shutdown.borrow()).then_some(60));
                    session.set_keepalive_reuses_remaining(self.h1.1.keepalive_request_limit);
                }
            }
            next = self
                .h1
                .0
                .serve(session, shutdown)
                .await
                .map(|r| r.consume());
        }
        None
    }
}

#[async_trait::async_trait]
impl pingora_core::apps::ServerApp for Front {
    async fn process_new(
        self: &Arc<Self>,
        stream: pingora_core::protocols::Stream,
        shutdown: &pingora_core::server::ShutdownWatch,
    ) -> Option<pingora_core::protocols::Stream> {
        let tcp = match rehome(stream) {
            Ok(tcp) => tcp,
            // TLS: Pingora's loop (HTTP/2 when ALPN chose it, else HTTP/1.1).
            Err(stream) if stream.get_ssl_digest().is_some() => {
                return self.h1.process_new(stream, shutdown).await;
            }
            // A socket that could not be moved: Pingora's loop, which sniffs h2c itself.
            Err(stream) => {
                let app = self.h2c.as_ref().unwrap_or(&self.h1);
                return app.process_new(stream, shutdown).await;
            }
        };
        let mut conn = downstream::h1::Conn::new(tcp, self.h1.1.keepalive_request_limit);
        // The connection's first clock read; the first head's time limit counts from here.
        let opened = tokio::time::Instant::now();
        if let Some(h2c) = &self.h2c {
            let limit = self.h1.0.client_timeout();
            match tokio::time::timeout_at(opened + limit, conn.sniff_h2()).await {
                Ok(Ok(true)) => {
                    let (tcp, read) = conn.into_parts();
                    return h2c.process_new(plain_stream(tcp, &read), shutdown).await;
                }
                Ok(Ok(false)) => {}
                _ => return None, // closed, or too slow to say even what protocol it speaks
            }
        }
        self.serve_plain(conn, opened, shutdown).await
    }

    async fn cleanup(&self) {}
}

/// A plain-TCP client connection with its socket registered on the current runtime (the one
/// Pingora spawned its task on) instead of the accepting one; see "One runtime per worker" in
/// the crate docs. Anything else (TLS, or when the socket cannot be duplicated) is handed back
/// as it is. Call it before anything is read: bytes buffered in the old stream would be lost.
fn rehome(
    stream: pingora_core::protocols::Stream,
) -> Result<tokio::net::TcpStream, pingora_core::protocols::Stream> {
    use std::os::fd::{AsRawFd, BorrowedFd};
    let Some(l4) = stream
        .as_any()
        .downcast_ref::<pingora_core::protocols::l4::stream::Stream>()
    else {
        return Err(stream); // TLS: the handshake's state lives in the stream
    };
    let fd = l4.as_raw_fd();
    // SAFETY: `fd` is the open socket `l4` owns, and `l4` (inside `stream`) outlives the
    // borrow, which ends at the `dup` in `try_clone_to_owned`.
    #[allow(unsafe_code)]
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let Ok(owned) = borrowed.try_clone_to_owned() else {
        return Err(stream);
    };
    // The duplicate shares the socket (non-blocking, TCP_NODELAY and all). Registering it here
    // and dropping the original (which deregisters it from the accepting runtime and closes
    // that descriptor) leaves one descriptor, polled by this runtime.
    let Ok(tcp) = tokio::net::TcpStream::from_std(std::net::TcpStream::from(owned)) else {
        return Err(stream);
    };
    drop(stream);
    Ok(tcp)
}

/// A rehomed connection as a Pingora stream, with the bytes already read from it put back in
/// front.
fn plain_stream(tcp: tokio::net::TcpStream, read: &[u8]) -> pingora_core::protocols::Stream {
    let mut l4 = pingora_core::protocols::l4::stream::Stream::from(tcp);
    l4.rewind(read);
    Box::new(Rehomed(tokio::io::BufWriter::with_capacity(
        CLIENT_WRITE_BUFFER,
        l4,
    )))
}

/// The write buffer of a rehomed client connection: Pingora's default for the ones it accepts,
/// which lets a small answer's header and body leave in one `send`.
const CLIENT_WRITE_BUFFER: usize =
    pingora_core::protocols::l4::stream::DEFAULT_L4_WRITE_BUFFER_SIZE;

/// A rehomed client connection: Pingora's TCP stream built from a socket has no write buffer
/// (the listener's streams get theirs from settings only Pingora can apply), so writes are
/// buffered here until Pingora flushes, as they would be there. Everything else is the inner
/// stream's.
#[derive(Debug)]
struct Rehomed(tokio::io::BufWriter<pingora_core::protocols::l4::stream::Stream>);

impl tokio::io::AsyncRead for Rehomed {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Rehomed {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[async_trait::async_trait]
impl pingora_core::protocols::Shutdown for Rehomed {
    async fn shutdown(&mut self) {
        let _ = tokio::io::AsyncWriteExt::flush(&mut self.0).await;
        pingora_core::protocols::Shutdown::shutdown(self.0.get_mut()).await;
    }
}

impl pingora_core::protocols::UniqueID for Rehomed {
    fn id(&self) -> pingora_core::protocols::UniqueIDType {
        self.0.get_ref().id()
    }
}

impl pingora_core::protocols::Ssl for Rehomed {}

#[async_trait::async_trait]
impl pingora_core::protocols::Peek for Rehomed {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.0.get_mut().try_peek(buf).await
    }
}

impl pingora_core::protocols::GetTimingDigest for Rehomed {
    fn get_timing_digest(&self) -> Vec<Option<pingora_core::protocols::TimingDigest>> {
        self.0.get_ref().get_timing_digest()
    }
}

impl pingora_core::protocols::GetProxyDigest for Rehomed {
    fn get_proxy_digest(&self) -> Option<Arc<pingora_core::protocols::raw_connect::ProxyDigest>> {
        self.0.get_ref().get_proxy_digest()
    }
}

impl pingora_core::protocols::GetSocketDigest for Rehomed {
    fn get_socket_digest(&self) -> Option<Arc<pingora_core::protocols::SocketDigest>> {
        self.0.get_ref().get_socket_digest()
    }
}

/// The admin listener (`server.admin_listen`): `/metrics` and health, nothing else.
struct AdminApp(Arc<Gateway>);

#[async_trait::async_trait]
impl pingora_core::apps::HttpServerApp for AdminApp {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: pingora_core::protocols::http::ServerSession,
        _shutdown: &pingora_core::server::ShutdownWatch,
    ) -> Option<pingora_core::apps::ReusedHttpStream> {
        match session.read_request().await {
            Ok(true) => {}
            _ => return None,
        }
        self.0.handle_admin(&mut session).await;
        let settings = pingora_core::apps::HttpPersistentSettings::for_session(&session);
        match session.finish().await {
            Ok(Some(stream)) => Some(pingora_core::apps::ReusedHttpStream::from_reusable_stream(
                stream, settings,
            )),
            _ => None,
        }
    }
}

/// The binary's signals: `SIGTERM` and `SIGINT` drain (Pingora's own watch treats `SIGINT` as
/// a fast shutdown that cuts in-flight requests; a gateway should not drop streams on Ctrl-C
/// either), `SIGQUIT` hands the sockets to an upgrading process. `SIGHUP` (reload) is handled
/// by the lifecycle service.
pub struct Signals;

#[async_trait::async_trait]
impl pingora_core::server::ShutdownSignalWatch for Signals {
    async fn recv(&self) -> pingora_core::server::ShutdownSignal {
        use pingora_core::server::ShutdownSignal;
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) else {
            log::error!("cannot install signal handlers; shutting down");
            return ShutdownSignal::FastShutdown;
        };
        tokio::select! {
            _ = term.recv() => ShutdownSignal::GracefulTerminate,
            _ = int.recv() => ShutdownSignal::GracefulTerminate,
            _ = quit.recv() => ShutdownSignal::GracefulUpgrade,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::field_is;

    #[test]
    fn field_names_match_in_any_case_and_only_themselves() {
        for lower in [
            "te",
            "x-request-id",
            "content-length",
            "proxy-authorization",
        ] {
            assert!(field_is(lower.as_bytes(), lower));
            assert!(field_is(lower.to_ascii_uppercase().as_bytes(), lower));
            for i in 0..lower.len() {
                // Any other token byte at any position is another name.
                for other in [b'a', b'Z', b'0', b'-', b'_', b'^', b'~', b'!'] {
                    let mut name = lower.as_bytes().to_vec();
                    if name[i].eq_ignore_ascii_case(&other) {
                        continue;
                    }
                    name[i] = other;
                    assert!(
                        !field_is(&name, lower),
                        "{}",
                        String::from_utf8_lossy(&name)
                    );
                }
            }
            assert!(!field_is(&lower.as_bytes()[1..], lower));
            assert!(!field_is(format!("{lower}s").as_bytes(), lower));
        }
    }
}
