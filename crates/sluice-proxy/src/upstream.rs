//! One deployment as an HTTP peer, and one exchange with it.

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use pingora_core::connectors::http::Connector;
use pingora_core::protocols::http::client::HttpSession;
use pingora_core::upstreams::peer::{HttpPeer, Peer, PeerOptions, Proxy, Tracer};
use pingora_core::utils::tls::CertKey;
use pingora_error::{Error, ErrorType};
use pingora_http::RequestHeader;
use sluice_config::{Deployment, Provider};
use sluice_openai::{Endpoint, FieldPolicy};
use tokio::time::{timeout_at, Instant};

/// How long an idle upstream connection stays in the pool.
const POOL_IDLE: Duration = Duration::from_secs(60);
/// Cap on connecting (TCP + TLS), whatever the deployment's `timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest error body drained to keep a connection reusable before moving on.
const DRAIN_LIMIT: usize = 64 * 1024;

/// A deployment ready to be called: its address (resolved once, lazily) and fixed headers.
pub struct Upstream {
    /// The deployment it came from.
    pub deployment: Deployment,
    /// Which request fields it may see.
    pub policy: FieldPolicy,
    peer: OnceLock<PooledPeer>,
    host_header: String,
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

/// A deployment's [`HttpPeer`], as Pingora's connection pool sees it. It differs in one place:
/// a pooled connection is not re-checked with `getpeername(2)` each time it is taken out
/// (Pingora's `matches_fd`, one syscall per request). The pool is keyed by this peer's
/// `reuse_hash`, and a pooled stream owns its socket, so its fd cannot have been reused for a
/// connection elsewhere; what the check could still catch, a dead connection, is caught by
/// Pingora's idle test and by `send`'s retry on a fresh connection.
#[derive(Clone)]
pub struct PooledPeer(HttpPeer);

impl std::fmt::Display for PooledPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl Peer for PooledPeer {
    fn address(&self) -> &pingora_core::protocols::l4::socket::SocketAddr {
        self.0.address()
    }
    fn tls(&self) -> bool {
        self.0.tls()
    }
    fn sni(&self) -> &str {
        self.0.sni()
    }
    fn reuse_hash(&self) -> u64 {
        self.0.reuse_hash()
    }
    fn get_peer_options(&self) -> Option<&PeerOptions> {
        self.0.get_peer_options()
    }
    fn get_mut_peer_options(&mut self) -> Option<&mut PeerOptions> {
        self.0.get_mut_peer_options()
    }
    fn get_proxy(&self) -> Option<&Proxy> {
        self.0.get_proxy()
    }
    fn matches_fd<V: std::os::unix::io::AsRawFd>(&self, _fd: V) -> bool {
        true
    }
    fn get_client_cert_key(&self) -> Option<&std::sync::Arc<CertKey>> {
        self.0.get_client_cert_key()
    }
    fn get_tracer(&self) -> Option<Tracer> {
        self.0.get_tracer()
    }
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
    /// The next piece of the answer's body, waiting at most `idle` for it (a stalled upstream
    /// is a `ReadTimedout` error, like any broken read).
    ///
    /// # Errors
    /// Pingora's read error, or `ReadTimedout` after `idle`.
    pub async fn read_chunk(&mut self, idle: Duration) -> pingora_error::Result<Option<Bytes>> {
        match tokio::time::timeout(idle, self.session.read_response_body()).await {
            Ok(read) => read,
            Err(_) => Error::e_explain(ErrorType::ReadTimedout, "no answer data in time"),
        }
    }
}

/// An error answer read whole (bounded), to inspect and maybe pass on.
pub struct UpstreamAnswer {
    /// Status and headers.
    pub header: pingora_http::ResponseHeader,
    /// The body.
    pub body: Bytes,
}

impl UpstreamAnswer {
    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.header
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }
}

/// A response header received; the body is still to be read from `session`.
pub struct Exchange {
    /// The live client session (owns the connection).
    pub session: HttpSession,
}

impl Upstream {
    /// Wraps a deployment; resolves nothing yet.
    pub fn new(deployment: Deployment, reject_unknown_fields: bool) -> Self {
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
        };
        Self {
            deployment,
            policy,
            peer: OnceLock::new(),
            host_header,
        }
    }

    /// The peer, resolving the host on first use. Resolution happens once per config load;
    /// the request path after that touches no lock and no DNS.
    async fn peer(&self) -> Result<&PooledPeer, Failure> {
        if let Some(p) = self.peer.get() {
            return Ok(p);
        }
        let b = &self.deployment.api_base;
        let addr = tokio::net::lookup_host((b.host.as_str(), b.port))
            .await
            .map_err(|e| Failure::Connect(format!("resolving {}: {e}", b.host)))?
            .next()
            .ok_or_else(|| Failure::Connect(format!("{} has no address", b.host)))?;
        let mut peer = HttpPeer::new(addr, b.tls, b.host.clone());
        let d = &self.deployment;
        peer.options.connection_timeout = Some(CONNECT_TIMEOUT.min(d.timeout));
        peer.options.total_connection_timeout = Some(CONNECT_TIMEOUT.min(d.timeout));
        peer.options.idle_timeout = Some(POOL_IDLE);
        Ok(self.peer.get_or_init(|| PooledPeer(peer)))
    }

    /// The request line's path for `endpoint` on this deployment.
    fn path(&self, endpoint: Endpoint) -> String {
        let d = &self.deployment;
        match d.provider {
            Provider::Azure => format!(
                "{}/openai/deployments/{}{}?api-version={}",
                d.api_base.path,
                d.upstream_model,
                endpoint.path(),
                d.api_version.as_deref().unwrap_or_default()
            ),
            _ => format!("{}{}", d.api_base.path, endpoint.path()),
        }
    }

    fn request_header(
        &self,
        endpoint: Endpoint,
        body_len: usize,
        client: ClientHeaders<'_>,
    ) -> Result<RequestHeader, Failure> {
        let bad = |e: Box<Error>| Failure::Protocol(format!("building the request: {e}"));
        let mut req =
            RequestHeader::build("POST", self.path(endpoint).as_bytes(), Some(8)).map_err(bad)?;
        req.insert_header("host", self.host_header.as_str())
            .map_err(bad)?;
        req.insert_header("content-type", "application/json")
            .map_err(bad)?;
        req.insert_header("content-length", body_len.to_string())
            .map_err(bad)?;
        req.insert_header("accept", client.accept.unwrap_or(b"application/json"))
            .map_err(bad)?;
        if let Some(ua) = client.user_agent {
            req.insert_header("user-agent", ua).map_err(bad)?;
        }
        if let Some(beta) = client.openai_beta {
            req.insert_header("openai-beta", beta).map_err(bad)?;
        }
        if let Some(id) = client.request_id {
            req.insert_header("x-request-id", id).map_err(bad)?;
        }
        if let Some(org) = &self.deployment.organization {
            req.insert_header("openai-organization", org.as_str())
                .map_err(bad)?;
        }
        if let Some(key) = &self.deployment.api_key {
            match self.deployment.provider {
                Provider::Azure => req.insert_header("api-key", key.expose()),
                _ => req.insert_header("authorization", format!("Bearer {}", key.expose())),
            }
            .map_err(|_| {
                Failure::Protocol("the deployment's api_key is not a valid header value".into())
            })?;
        }
        Ok(req)
    }

    /// Sends `body` and waits for the response header, until `deadline`.
    ///
    /// A pooled connection that turns out dead is replaced once, transparently; a failure on a
    /// fresh connection is the deployment's.
    ///
    /// # Errors
    /// A [`Failure`] saying what went wrong before a response header arrived.
    pub async fn send(
        &self,
        connector: &Connector,
        endpoint: Endpoint,
        body: &Bytes,
        client: ClientHeaders<'_>,
        deadline: Instant,
    ) -> Result<Exchange, Failure> {
        let peer = self.peer().await?;
        let attempt = async {
            loop {
                let (mut session, reused) = connector
                    .get_http_session(peer)
                    .await
                    .map_err(|e| Failure::Connect(e.to_string()))?;
                // No Pingora read timeout: its timers live until they expire (10 min by
                // default here) whether or not the read finished, which holds megabytes at a
                // few thousand requests a second. The deadline below and `read_chunk` bound
                // every wait with tokio timers, which go away with the read.
                let header = self.request_header(endpoint, body.len(), client)?;
                let sent = async {
                    session.write_request_header(Box::new(header)).await?;
                    session.write_request_body(body.clone(), true).await?;
                    session.finish_request_body().await?;
                    session.read_response_header().await
                }
                .await;
                match sent {
                    Ok(()) => return Ok(Exchange { session }),
                    Err(mut e) => {
                        e.retry.decide_reuse(reused);
                        if reused && e.retry() {
                            continue; // a stale pooled connection: try a fresh one
                        }
                        return Err(classify(&e));
                    }
                }
            }
        };
        timeout_at(deadline, attempt)
            .await
            .unwrap_or(Err(Failure::Timeout))
    }

    /// Returns the connection to the pool when the response was read to its end; otherwise
    /// drops (closes) it.
    pub async fn release(&self, connector: &Connector, mut exchange: Exchange) {
        if !exchange.session.response_done() {
            return;
        }
        if let Some(peer) = self.peer.get() {
            connector
                .release_http_session(exchange.session, peer, Some(POOL_IDLE))
                .await;
        } else {
            exchange.session.shutdown().await;
        }
    }

    /// Reads a (small) error answer whole, returning the connection to the pool. `None` when
    /// it is larger than [`DRAIN_LIMIT`], broken, or slower than `deadline`.
    pub async fn read_error(
        &self,
        connector: &Connector,
        exchange: Exchange,
        deadline: Instant,
    ) -> Option<UpstreamAnswer> {
        self.read_whole(connector, exchange, deadline, DRAIN_LIMIT)
            .await
            .ok()
    }

    /// Reads an answer's body whole (at most `limit` bytes, by `deadline`, each read within the
    /// deployment's `stream_timeout`), returning the connection to the pool.
    ///
    /// # Errors
    /// [`Failure::Timeout`] past the deadline or a read timeout, [`Failure::Protocol`] when the
    /// body breaks off or outgrows `limit`; the connection is closed then.
    pub async fn read_whole(
        &self,
        connector: &Connector,
        mut exchange: Exchange,
        deadline: Instant,
        limit: usize,
    ) -> Result<UpstreamAnswer, Failure> {
        let header = exchange
            .session
            .response_header()
            .ok_or_else(|| Failure::Protocol("no response header".into()))?
            .clone();
        let body = timeout_at(deadline, async {
            let mut body = bytes::BytesMut::new();
            loop {
                match exchange.read_chunk(self.deployment.stream_timeout).await {
                    // The common case, one read holding the whole body: no copy.
                    Ok(Some(chunk)) if body.is_empty() && exchange.session.response_done() => {
                        if chunk.len() > limit {
                            return Err(Failure::Protocol("answer too large".into()));
                        }
                        return Ok(chunk);
                    }
                    Ok(Some(chunk)) => {
                        if body.len() + chunk.len() > limit {
                            return Err(Failure::Protocol("answer too large".into()));
                        }
                        body.extend_from_slice(&chunk);
                    }
                    Ok(None) => return Ok(body.freeze()),
                    Err(e) => return Err(classify(&e)),
                }
            }
        })
        .await
        .unwrap_or(Err(Failure::Timeout))?;
        self.release(connector, exchange).await;
        Ok(UpstreamAnswer { header, body })
    }
}

fn classify(e: &Error) -> Failure {
    match e.etype() {
        ErrorType::ConnectTimedout
        | ErrorType::ConnectRefused
        | ErrorType::ConnectNoRoute
        | ErrorType::TLSHandshakeFailure
        | ErrorType::TLSHandshakeTimedout
        | ErrorType::InvalidCert
        | ErrorType::HandshakeError
        | ErrorType::ConnectError
        | ErrorType::SocketError => Failure::Connect(e.to_string()),
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => Failure::Timeout,
        _ => Failure::Protocol(e.to_string()),
    }
}
