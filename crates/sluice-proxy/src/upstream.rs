//! One deployment as an HTTP peer, and one exchange with it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use pingora_core::connectors::TransportConnector;
use pingora_core::upstreams::peer::HttpPeer;
use sluice_config::{Deployment, Provider};
use sluice_openai::{Allowlist, Endpoint, FieldPolicy};
use tokio::time::{timeout_at, Instant};

mod h1;

pub use h1::Head;

/// How long an idle upstream connection stays in the pool.
const POOL_IDLE: Duration = Duration::from_secs(60);
/// Most idle connections kept per upstream server and worker thread.
const POOL_KEEP: usize = 1024;
/// Cap on connecting (TCP + TLS), whatever the deployment's `timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest error body drained to keep a connection reusable before moving on.
const DRAIN_LIMIT: usize = 64 * 1024;

/// A deployment ready to be called: its address (resolved once, lazily) and fixed headers.
pub struct Upstream {
    /// The deployment it came from.
    pub deployment: Deployment,
    /// Which request fields it may see (compiled for the request path).
    pub policy: Allowlist,
    peer: OnceLock<Peer>,
    /// The request-head fields every request to this deployment carries (`host`,
    /// `content-type`, the organization and the key), serialized once; an error when the
    /// configured key cannot be a header value.
    fixed_fields: Result<Vec<u8>, &'static str>,
    pool: Arc<h1::Pool>,
}

/// Where a deployment's connections go, resolved once.
enum Peer {
    /// Plain HTTP: the address, connected to with tokio (see [`h1::Io`] for why not Pingora).
    Tcp(std::net::SocketAddr),
    /// HTTPS: Pingora's peer (SNI, certificate checks), connected to through its connector.
    Tls(Box<HttpPeer>),
}

/// Upstream connections: Pingora's connector (for TLS) and one pool of idle connections per
/// upstream server. Both outlive config reloads, so a reload keeps warm connections.
pub struct Connections {
    connector: TransportConnector,
    /// Pools by (`https`?, host, port).
    pools: Mutex<HashMap<(bool, String, u16), Arc<h1::Pool>>>,
    /// Shards of each pool: one per worker thread with one runtime per worker, else one.
    shards: usize,
}

impl Connections {
    /// Pools with a shard per worker thread when each worker runs a runtime of its own
    /// (`per_worker`), else one shared shard.
    pub fn new(per_worker: bool) -> Self {
        Self {
            connector: TransportConnector::new(None),
            pools: Mutex::new(HashMap::new()),
            shards: if per_worker { h1::POOL_SHARDS } else { 1 },
        }
    }

    /// Opens a connection to `peer`, giving up after `limit`: plain TCP with tokio and
    /// `TCP_NODELAY` (as Pingora's connector sets it: a request head and body leave in one
    /// write, and nothing should wait for an ACK), TLS through Pingora's connector.
    async fn connect(&self, peer: &Peer, limit: Duration) -> Result<h1::Conn, Failure> {
        match peer {
            Peer::Tcp(addr) => {
                let failed = |why: String| Failure::Connect(format!("connecting to {addr}: {why}"));
                let tcp = tokio::time::timeout(limit, tokio::net::TcpStream::connect(*addr))
                    .await
                    .map_err(|_| failed(format!("no connection after {} ms", limit.as_millis())))?
                    .map_err(|e| failed(e.to_string()))?;
                tcp.set_nodelay(true).map_err(|e| failed(e.to_string()))?;
                Ok(h1::Conn::new(h1::Io::Left(tcp)))
            }
            Peer::Tls(peer) => self
                .connector
                .new_stream(&**peer)
                .await
                .map(|tls| h1::Conn::new(h1::Io::Right(tls)))
                .map_err(|e| Failure::Connect(e.to_string())),
        }
    }

    /// The pool for `deployment`'s server, shared by every deployment on it.
    fn pool(&self, deployment: &Deployment) -> Arc<h1::Pool> {
        let b = &deployment.api_base;
        crate::lock(&self.pools)
            .entry((b.tls, b.host.clone(), b.port))
            .or_insert_with(|| Arc::new(h1::Pool::new(POOL_KEEP, POOL_IDLE, self.shards)))
            .clone()
    }

    /// Closes pooled connections that idled too long or that their upstream closed, and
    /// forgets the pools of servers no deployment uses any more.
    pub fn sweep(&self) {
        let pools: Vec<Arc<h1::Pool>> = {
            let mut pools = crate::lock(&self.pools);
            pools.retain(|_, pool| Arc::strong_count(pool) > 1);
            pools.values().cloned().collect()
        };
        for pool in pools {
            pool.sweep();
        }
    }
}

/// Client headers that may travel upstream (besides the ones Sluice sets itself). Everything
/// else, the client's `Authorization`, cookies and `x-sluice-*` included, stays behind.
#[derive(Debug, Default, Clone, Copy)]
pub struct ClientHeaders<'a> {
    /// `Accept`.
    pub accept: Option<&'a [u8]>,
    /// `User-Agent`.
    pub user_agent: Option<&'a [u8]>,
    /// `OpenAI-Beta` (opt-in beta features).
    pub openai_beta: Option<&'a [u8]>,
    /// Sluice's request id, so upstream logs can be matched with ours.
    pub request_id: Option<&'a [u8]>,
}

/// Why an exchange failed before a response header arrived.
#[derive(Debug)]
pub enum Failure {
    /// Name resolution, TCP connect or TLS failed.
    Connect(String),
    /// No response header within the deployment's `timeout`.
    Timeout,
    /// The connection broke or the peer spoke garbage.
    Protocol(String),
}

impl Failure {
    /// The outcome's name in the access log.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect_error",
            Self::Timeout => "timeout",
            Self::Protocol(_) => "broken",
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect(why) => write!(f, "cannot connect: {why}"),
            Self::Timeout => f.write_str("timed out"),
            Self::Protocol(why) => write!(f, "broken exchange: {why}"),
        }
    }
}

impl Exchange {
    /// The answer's status and header fields.
    pub fn head(&self) -> &Head {
        self.answer.head()
    }

    /// Whether the body has been read to its end.
    pub fn done(&self) -> bool {
        self.answer.done()
    }

    /// The next piece of the answer's body, waiting at most `idle` for it (a stalled upstream
    /// is [`Failure::Timeout`]).
    ///
    /// # Errors
    /// [`Failure::Timeout`] after `idle`, [`Failure::Protocol`] when the body breaks off or its
    /// framing is malformed.
    pub async fn read_chunk(&mut self, idle: Duration) -> Result<Option<Bytes>, Failure> {
        match self.answer.read_within(idle).await {
            Some(read) => read.map_err(|e| Failure::Protocol(e.to_string())),
            None => Err(Failure::Timeout),
        }
    }
}

/// An error answer read whole (bounded), to inspect and maybe pass on.
pub struct UpstreamAnswer {
    /// Status and headers.
    pub head: Head,
    /// The body.
    pub body: Bytes,
    /// When its last byte was read.
    pub at: Instant,
}

impl UpstreamAnswer {
    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.head
            .get(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::to_owned)
    }
}

/// A response header received; the body is still to be read. Dropping it closes the
/// connection (which is how an abandoned stream stops the upstream's generation);
/// [`Upstream::release`] pools it instead when the answer was read to its end.
pub struct Exchange {
    answer: h1::Answer,
}

impl Upstream {
    /// Wraps a deployment, with a pool from `connections`; resolves nothing yet.
    pub fn new(
        deployment: Deployment,
        reject_unknown_fields: bool,
        connections: &Connections,
    ) -> Self {
        let b = &deployment.api_base;
        let default_port = if b.tls { 443 } else { 80 };
        let host = if b.host.contains(':') {
            format!("[{}]", b.host)
        } else {
            b.host.clone()
        };
        let host_header = if b.port == default_port {
            host
        } else {
            format!("{host}:{}", b.port)
        };
        for f in &deployment.extra_allowed_fields {
            if sluice_openai::filter::is_internal(f) {
                log::warn!(
                    "deployment {}: extra_allowed_fields lists `{f}`, an internal field; \
                     it is never forwarded",
                    deployment.id
                );
            }
        }
        let policy = FieldPolicy {
            // `openai/` means OpenAI's own API semantics, also for compatible servers.
            openai: deployment.provider == Provider::OpenAi,
            extra_allowed: deployment.extra_allowed_fields.clone(),
            drop: deployment.drop_fields.clone(),
            reject_unknown: reject_unknown_fields,
        }
        .compile();
        let fixed_fields = fixed_fields(&deployment, &host_header);
        let pool = connections.pool(&deployment);
        Self {
            deployment,
            policy,
            peer: OnceLock::new(),
            fixed_fields,
            pool,
        }
    }

    /// The peer, resolving the host on first use. Resolution happens once per config load;
    /// the request path after that touches no lock and no DNS.
    async fn peer(&self) -> Result<&Peer, Failure> {
        if let Some(p) = self.peer.get() {
            return Ok(p);
        }
        let b = &self.deployment.api_base;
        let addr = tokio::net::lookup_host((b.host.as_str(), b.port))
            .await
            .map_err(|e| Failure::Connect(format!("resolving {}: {e}", b.host)))?
            .next()
            .ok_or_else(|| Failure::Connect(format!("{} has no address", b.host)))?;
        let peer = if b.tls {
            let mut peer = HttpPeer::new(addr, true, b.host.clone());
            peer.options.connection_timeout = Some(self.connect_timeout());
            peer.options.total_connection_timeout = Some(self.connect_timeout());
            Peer::Tls(Box::new(peer))
        } else {
            Peer::Tcp(addr)
        };
        Ok(self.peer.get_or_init(|| peer))
    }

    /// How long a connection (TCP and TLS) may take to open.
    fn connect_timeout(&self) -> Duration {
        CONNECT_TIMEOUT.min(self.deployment.timeout)
    }

    /// Serializes the request head for `endpoint` into `out`.
    fn write_head(
        &self,
        out: &mut Vec<u8>,
        endpoint: Endpoint,
        body_len: usize,
        client: ClientHeaders<'_>,
    ) -> Result<(), Failure> {
        let fixed = self
            .fixed_fields
            .as_ref()
            .map_err(|why| Failure::Protocol((*why).to_owned()))?;
        let d = &self.deployment;
        out.extend_from_slice(b"POST ");
        out.extend_from_slice(d.api_base.path.as_bytes());
        if d.provider == Provider::Azure {
            out.extend_from_slice(b"/openai/deployments/");
            out.extend_from_slice(d.upstream_model.as_bytes());
            out.extend_from_slice(endpoint.path().as_bytes());
            out.extend_from_slice(b"?api-version=");
            out.extend_from_slice(d.api_version.as_deref().unwrap_or_default().as_bytes());
        } else {
            out.extend_from_slice(endpoint.path().as_bytes());
        }
        out.extend_from_slice(b" HTTP/1.1\r\n");
        out.extend_from_slice(fixed);
        push_field(out, b"content-length", body_len.to_string().as_bytes());
        // Values taken from the client's request were validated as header values when Pingora
        // parsed it; the request id is Sluice's own or one of those.
        let fields: [(&[u8], Option<&[u8]>); 4] = [
            (
                b"accept",
                Some(client.accept.unwrap_or(b"application/json")),
            ),
            (b"user-agent", client.user_agent),
            (b"openai-beta", client.openai_beta),
            (b"x-request-id", client.request_id),
        ];
        for (name, value) in fields {
            if let Some(value) = value {
                push_field(out, name, value);
            }
        }
        out.extend_from_slice(b"\r\n");
        Ok(())
    }

    /// Sends `body` and waits for the response header, until `deadline`; `sent_at` is the
    /// caller's clock read for this send.
    ///
    /// A pooled connection that turns out dead (the upstream closed it before answering) is
    /// replaced by a fresh one, transparently; a failure on a fresh connection is the
    /// deployment's.
    ///
    /// # Errors
    /// A [`Failure`] saying what went wrong before a response header arrived.
    pub async fn send(
        &self,
        connections: &Connections,
        endpoint: Endpoint,
        body: &sluice_openai::Body,
        client: ClientHeaders<'_>,
        sent_at: Instant,
        deadline: Instant,
    ) -> Result<Exchange, Failure> {
        let peer = self.peer().await?;
        let mut head = Vec::with_capacity(512);
        self.write_head(&mut head, endpoint, body.len(), client)?;
        loop {
            let (conn, reused) = match self.pool.take(sent_at) {
                Some(conn) => (conn, true),
                None => {
                    // Boxed: connecting (TLS included) is an 8 KB future, and inline it would
                    // make every request's task that much larger for the whole exchange, a
                    // stream's included; it runs once per connection.
                    let connect = Box::pin(connections.connect(peer, self.connect_timeout()));
                    let conn = timeout_at(deadline, connect)
                        .await
                        .unwrap_or(Err(Failure::Timeout))?;
                    (conn, false)
                }
            };
            // The wait for the answer runs on the connection's own timer (`crate::alarm`).
            match conn.exchange(&head, body.buf(), deadline).await {
                Ok(answer) => return Ok(Exchange { answer }),
                Err(e) if reused && e.stale() => continue, // try the next, or a fresh one
                Err(h1::H1Error::TimedOut) => return Err(Failure::Timeout),
                Err(e) => return Err(Failure::Protocol(e.to_string())),
            }
        }
    }

    /// Returns the connection to the pool when the answer was read to its end (and the
    /// connection may carry another request), otherwise drops (closes) it; hands back the
    /// answer's head.
    /// `now` is when the answer ended (the caller's clock read).
    pub fn release(&self, exchange: Exchange, now: Instant) -> Head {
        let (head, conn) = exchange.answer.finish();
        if let Some(conn) = conn {
            self.pool.put(conn, now);
        }
        head
    }

    /// Reads a (small) error answer whole, returning the connection to the pool. `None` when
    /// it is larger than [`DRAIN_LIMIT`], broken, or slower than `deadline`.
    pub async fn read_error(
        &self,
        exchange: Exchange,
        deadline: Instant,
    ) -> Option<UpstreamAnswer> {
        self.read_whole(exchange, deadline, DRAIN_LIMIT).await.ok()
    }

    /// Reads an answer's body whole (at most `limit` bytes, by `deadline`, each read within the
    /// deployment's `stream_timeout`), returning the connection to the pool.
    ///
    /// # Errors
    /// [`Failure::Timeout`] past the deadline or a read timeout, [`Failure::Protocol`] when the
    /// body breaks off or outgrows `limit`; the connection is closed then.
    pub async fn read_whole(
        &self,
        mut exchange: Exchange,
        deadline: Instant,
        limit: usize,
    ) -> Result<UpstreamAnswer, Failure> {
        // No timer for the deadline unless the body has to be waited for: it usually came with
        // the head (each read's own idle limit is on the connection's alarm).
        let body = crate::alarm::by(deadline, async {
            let mut body = bytes::BytesMut::new();
            loop {
                match exchange.read_chunk(self.deployment.stream_timeout).await? {
                    // The common case, one read holding the whole body: no copy.
                    Some(chunk) if body.is_empty() && exchange.done() => {
                        if chunk.len() > limit {
                            return Err(Failure::Protocol("answer too large".into()));
                        }
                        return Ok(chunk);
                    }
                    Some(chunk) => {
                        if body.len() + chunk.len() > limit {
                            return Err(Failure::Protocol("answer too large".into()));
                        }
                        body.extend_from_slice(&chunk);
                    }
                    None => return Ok(body.freeze()),
                }
            }
        })
        .await
        .unwrap_or(Err(Failure::Timeout))?;
        let at = Instant::now();
        let head = self.release(exchange, at);
        Ok(UpstreamAnswer { head, body, at })
    }
}

/// The request-head fields every request to `d` carries, serialized: `host`, `content-type`,
/// the organization and the key (Azure's `api-key`, else a bearer token).
fn fixed_fields(d: &Deployment, host: &str) -> Result<Vec<u8>, &'static str> {
    let valid = |v: &[u8]| http::HeaderValue::from_bytes(v).is_ok();
    let mut out = Vec::with_capacity(128);
    if !valid(host.as_bytes()) {
        return Err("the deployment's host is not a valid header value");
    }
    push_field(&mut out, b"host", host.as_bytes());
    push_field(&mut out, b"content-type", b"application/json");
    if let Some(org) = &d.organization {
        if !valid(org.as_bytes()) {
            return Err("the deployment's organization is not a valid header value");
        }
        push_field(&mut out, b"openai-organization", org.as_bytes());
    }
    if let Some(key) = &d.api_key {
        let key = key.expose().as_bytes();
        if !valid(key) {
            return Err("the deployment's api_key is not a valid header value");
        }
        match d.provider {
            Provider::Azure => push_field(&mut out, b"api-key", key),
            _ => push_field(&mut out, b"authorization", &[b"Bearer ", key].concat()),
        }
    }
    Ok(out)
}

/// Appends the header field `name: value` to a request head.
fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}
