//! Mutual TLS for every connection (Invariant 7), with rustls and the ring provider only.
//!
//! Both sides present certificates from the coordinator's CA. A client verifies the server's
//! chain against the CA and then its identity (URI SAN), never a host name: machines are
//! reached by IP address, often through NAT port mappings. A server requires a client
//! certificate from the CA and hands the client's [`PeerInfo`] to every request, where handlers
//! authorise it. Both refuse revoked certificates (`verify`). tonic's own TLS is not used; this
//! module supplies the incoming stream and the connector.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::trust::identity::{CertFacts, Identity};
use crate::trust::keys::Keys;
use crate::trust::pki::{CA_FILE, CERT_FILE, KEY_FILE};
use crate::trust::revocation::DenyList;
use crate::trust::verify::{ClientVerifier, PeerVerifier, PinnedVerifier};

use crate::trust::quota::{Permit, Quota};
pub use crate::trust::verify::Expect;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path}: no usable PEM data: {detail}")]
    Pem { path: String, detail: String },
    #[error("{0}")]
    Config(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("our own certificate: {0}")]
    Identity(#[from] crate::trust::identity::IdentityError),
    #[error("invalid address {0:?}: {1}")]
    Address(String, String),
}

/// The crypto provider of the whole process: ring, and nothing else.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process default (harmless when already installed).
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A node's CA, certificate chain and key, as read from a TLS directory, and what its verifiers
/// refuse. Clones share the keys (a renewal reaches every configuration built from any clone)
/// and the deny list.
#[derive(Clone)]
pub struct TlsMaterial {
    pub ca: Vec<CertificateDer<'static>>,
    /// The chain and key as loaded (the join endpoint presents these; see [`TlsMaterial::keys`]
    /// for what is presented now).
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Arc<PrivateKeyDer<'static>>,
    pub identity: Identity,
    /// What this process presents from its next handshake on (replaced by a renewal).
    pub keys: Arc<Keys>,
    /// Certificates every verifier built from this material refuses.
    pub deny: DenyList,
    /// Server side: let certificates that expired at most this long ago through the handshake
    /// (the coordinator, so agents can renew after an outage; see `verify`).
    pub expired_grace: Option<Duration>,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsMaterial({})", self.identity)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&bytes).collect();
    let certs = certs.map_err(|e| TlsError::Pem {
        path: path.display().to_string(),
        detail: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.display().to_string(),
            detail: "no certificate".into(),
        });
    }
    Ok(certs)
}

impl TlsMaterial {
    /// Reads `ca.pem`, `node.pem` and `node.key` from `dir`.
    pub fn load(dir: &Path) -> Result<TlsMaterial, TlsError> {
        let ca = certs(&dir.join(CA_FILE))?;
        let chain = certs(&dir.join(CERT_FILE))?;
        let kp = dir.join(KEY_FILE);
        let key = PrivateKeyDer::from_pem_slice(&read(&kp)?).map_err(|e| TlsError::Pem {
            path: kp.display().to_string(),
            detail: e.to_string(),
        })?;
        TlsMaterial::new(ca, chain, key)
    }

    fn new(
        ca: Vec<CertificateDer<'static>>,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<TlsMaterial, TlsError> {
        let first = chain.first().ok_or_else(|| TlsError::Pem {
            path: "certificate".into(),
            detail: "empty".into(),
        })?;
        let identity = Identity::from_cert_der(first)?;
        let keys = Keys::new(chain.clone(), key.clone_key())?;
        Ok(TlsMaterial {
            ca,
            chain,
            key: Arc::new(key),
            identity,
            keys: Arc::new(keys),
            deny: DenyList::new(),
            expired_grace: None,
        })
    }

    /// What the certificate presented now says (its serial and validity change on renewal).
    pub fn facts(&self) -> CertFacts {
        self.keys.facts()
    }

    /// Builds material from PEM text (certificates issued in memory).
    pub fn from_node_cert(n: &crate::trust::pki::NodeCert) -> Result<TlsMaterial, TlsError> {
        let pem = |what: &str, e: rustls_pki_types::pem::Error| TlsError::Pem {
            path: what.into(),
            detail: e.to_string(),
        };
        let ca: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(n.ca_pem.as_bytes()).collect();
        let chain: Result<Vec<_>, _> =
            CertificateDer::pem_slice_iter(n.cert_pem.as_bytes()).collect();
        let chain = chain.map_err(|e| pem("certificate", e))?;
        let key = PrivateKeyDer::from_pem_slice(n.key_pem.as_bytes()).map_err(|e| pem("key", e))?;
        TlsMaterial::new(ca.map_err(|e| pem("CA", e))?, chain, key)
    }

    fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone())?;
        }
        Ok(roots)
    }

    /// Server side: client certificates from our CA are required.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        self.server_config_with(false)
    }

    /// Server side where a client may come without a certificate (the coordinator's join
    /// endpoint); every other call still requires one (see [`peer_of`]). The CA certificate is
    /// sent with ours so that a joining agent can pin it by fingerprint.
    pub fn server_config_join(&self) -> Result<Arc<ServerConfig>, TlsError> {
        self.server_config_with(true)
    }

    fn server_config_with(&self, optional: bool) -> Result<Arc<ServerConfig>, TlsError> {
        let builder =
            WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()?), provider());
        let inner = if optional {
            builder.allow_unauthenticated().build()?
        } else {
            builder.build()?
        };
        let verifier = Arc::new(ClientVerifier {
            inner,
            deny: self.deny.clone(),
            expired_grace: self.expired_grace,
        });
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier);
        let mut cfg = if optional {
            // The CA goes with our certificate, for a joining agent to pin by fingerprint.
            let mut chain = self.chain.clone();
            chain.extend(self.ca.iter().cloned());
            builder.with_single_cert(chain, self.key.clone_key())?
        } else {
            builder.with_cert_resolver(self.keys.clone())
        };
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// Client side: the server must hold a certificate of our CA naming an identity `expect`
    /// accepts.
    pub fn client_config(&self, expect: Expect) -> Result<Arc<ClientConfig>, TlsError> {
        let verifier = PeerVerifier {
            roots: Arc::new(self.roots()?),
            algs: provider().signature_verification_algorithms,
            expect,
            deny: self.deny.clone(),
        };
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(self.keys.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// A client configuration for joining: no certificate of our own yet, and the server must
/// present a chain whose CA has the SHA-256 `fingerprint` (from the join token) and name itself
/// `standby://coordinator`.
pub fn join_client_config(fingerprint: &str) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = PinnedVerifier {
        fingerprint: fingerprint.to_string(),
        algs: provider().signature_verification_algorithms,
    };
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Who is on the other end of a server-side connection; in every request's extensions.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub identity: Identity,
    pub addr: Option<SocketAddr>,
    /// The certificate's serial number (hex): what revocation names.
    pub serial: String,
    pub not_after_unix: i64,
}

/// The authenticated peer of a request.
pub fn peer_of<T>(req: &tonic::Request<T>) -> Result<PeerInfo, tonic::Status> {
    req.extensions()
        .get::<ConnInfo>()
        .and_then(|c| c.peer.clone())
        .ok_or_else(|| tonic::Status::unauthenticated("a client certificate is required"))
}

/// The remote address of a request, authenticated or not.
pub fn remote_addr<T>(req: &tonic::Request<T>) -> Option<SocketAddr> {
    req.extensions().get::<ConnInfo>().map(|c| c.addr)
}

/// A server-side TLS connection with its authenticated peer (None: no certificate).
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: Option<PeerInfo>,
    addr: SocketAddr,
    /// Its place in the per-address cap, given back when the connection closes.
    _slot: Permit<IpAddr>,
}

impl Connected for TlsConn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        ConnInfo {
            peer: self.info.clone(),
            addr: self.addr,
        }
    }
}

/// What tonic stores per connection; handlers read it through [`peer_of`] and [`remote_addr`].
#[derive(Clone, Debug)]
pub struct ConnInfo {
    peer: Option<PeerInfo>,
    addr: SocketAddr,
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TCP connections and completes TLS handshakes concurrently; yields authenticated
/// connections. A failed handshake is logged and dropped, never ends the stream. At most
/// `defaults::CONNECTIONS_PER_ADDRESS` connections per source address ([`incoming_capped`]).
pub fn incoming(
    listener: TcpListener,
    cfg: Arc<ServerConfig>,
    shutdown: CancellationToken,
) -> ReceiverStream<Result<TlsConn, io::Error>> {
    let cap = crate::cli::defaults::CONNECTIONS_PER_ADDRESS;
    incoming_capped(listener, cfg, shutdown, cap)
}

/// [`incoming`] with at most `per_address` concurrent connections from one source IP, counted
/// from `accept` (handshakes in progress included) until the connection closes. One more is
/// closed at once, before any TLS, and logged at most once a second per address, so one host
/// cannot use up the server's handshakes, memory or file descriptors.
pub fn incoming_capped(
    listener: TcpListener,
    cfg: Arc<ServerConfig>,
    shutdown: CancellationToken,
    per_address: usize,
) -> ReceiverStream<Result<TlsConn, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let quota = Quota::new(per_address);
    tokio::spawn(async move {
        let mut refusals = Refusals::default();
        loop {
            let (tcp, addr) = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Some(slot) = quota.try_take(&addr.ip()) else {
                refusals.note(addr, per_address);
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                if let Some(conn) = handshake(&acceptor, tcp, addr, slot).await {
                    let _ = tx.send(Ok(conn)).await;
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// The TLS handshake of one accepted connection and its peer's identity; `None` (logged) when
/// it fails, times out or presents a certificate without a valid identity.
async fn handshake(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    addr: SocketAddr,
    slot: Permit<IpAddr>,
) -> Option<TlsConn> {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::info!(peer = %addr, error = %e, "TLS handshake refused");
            return None;
        }
        Err(_) => {
            tracing::info!(peer = %addr, "TLS handshake timed out");
            return None;
        }
    };
    // The verifier already required a certificate unless the server allows joins.
    let facts = match tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| CertFacts::from_der(c))
    {
        Some(Ok(f)) => Some(f),
        Some(Err(e)) => {
            tracing::info!(peer = %addr, error = %e, "client certificate refused");
            return None;
        }
        None => None,
    };
    Some(TlsConn {
        inner: tls,
        info: facts.map(|f| PeerInfo {
            identity: f.identity,
            addr: Some(addr),
            serial: f.serial,
            not_after_unix: f.not_after_unix,
        }),
        addr,
        _slot: slot,
    })
}

/// When each address was last logged as over its connection cap: at most one line a second
/// per address, however fast it knocks.
#[derive(Default)]
struct Refusals {
    logged: HashMap<IpAddr, Instant>,
}

impl Refusals {
    fn note(&mut self, addr: SocketAddr, cap: usize) {
        let now = Instant::now();
        if self.logged.len() > 4096 {
            self.logged
                .retain(|_, t| now.duration_since(*t) < Duration::from_secs(1));
        }
        match self.logged.get(&addr.ip()) {
            Some(t) if now.duration_since(*t) < Duration::from_secs(1) => {}
            _ => {
                self.logged.insert(addr.ip(), now);
                tracing::warn!(peer = %addr, cap, "too many connections from this address; closed");
            }
        }
    }
}

/// Parses `host:port`, `https://host:port` or `http://host:port` into an endpoint URI.
pub fn endpoint_uri(addr: &str) -> Result<Uri, TlsError> {
    let bare = addr
        .strip_prefix("https://")
        .or_else(|| addr.strip_prefix("http://"))
        .unwrap_or(addr)
        .trim_end_matches('/');
    let uri: Uri =
        format!("http://{bare}")
            .parse()
            .map_err(|e: tonic::codegen::http::uri::InvalidUri| {
                TlsError::Address(addr.into(), e.to_string())
            })?;
    if uri.port_u16().is_none() || uri.host().is_none_or(str::is_empty) {
        return Err(TlsError::Address(addr.into(), "expected host:port".into()));
    }
    if uri.path() != "/" {
        return Err(TlsError::Address(addr.into(), "unexpected path".into()));
    }
    Ok(uri)
}

#[derive(Clone)]
struct Connector {
    cfg: Arc<ClientConfig>,
}

type ConnectFuture = Pin<
    Box<
        dyn Future<Output = io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>> + Send,
    >,
>;

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> ConnectFuture {
        let cfg = self.cfg.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri
                .port_u16()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no port"))?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            // The name is not verified (identities are); it only fills SNI.
            let name = ServerName::try_from("standby.peer").expect("static name");
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// HTTP/2 settings shared by all clients: large windows (bulk data), keepalive (long streams).
pub fn endpoint(uri: Uri) -> Endpoint {
    Endpoint::from(uri)
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
}

/// Connects now; errors if the peer cannot be reached or fails verification.
pub async fn connect(addr: &str, cfg: Arc<ClientConfig>) -> Result<Channel, anyhow::Error> {
    let uri = endpoint_uri(addr)?;
    Ok(endpoint(uri)
        .connect_with_connector(Connector { cfg })
        .await?)
}

/// A channel that connects on first use and reconnects as needed.
pub fn connect_lazy(addr: &str, cfg: Arc<ClientConfig>) -> Result<Channel, TlsError> {
    let uri = endpoint_uri(addr)?;
    Ok(endpoint(uri).connect_with_connector_lazy(Connector { cfg }))
}

/// Server-side HTTP/2 settings matching [`endpoint`].
pub fn server_builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .tcp_nodelay(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_forms() {
        for a in [
            "127.0.0.1:7701",
            "https://127.0.0.1:7701",
            "http://h:1/",
            "[::1]:7701",
        ] {
            endpoint_uri(a).unwrap_or_else(|e| panic!("{a}: {e}"));
        }
        for a in ["127.0.0.1", "https://", "h:1/x", "h:99999"] {
            assert!(endpoint_uri(a).is_err(), "{a}");
        }
    }

    /// A TLS handshake with `addr` from source address `from` (a loopback address).
    async fn tls_from(from: IpAddr, addr: SocketAddr, fp: &str) -> io::Result<()> {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(from, 0))?;
        let tcp = sock.connect(addr).await?;
        let connector = tokio_rustls::TlsConnector::from(join_client_config(fp).unwrap());
        let name = ServerName::try_from("coordinator").unwrap();
        connector.connect(name, tcp).await.map(drop)
    }

    async fn tcp_from(from: IpAddr, addr: SocketAddr) -> TcpStream {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(from, 0)).unwrap();
        sock.connect(addr).await.unwrap()
    }

    /// The cap counts server-side connections from `accept` until they are dropped; connections
    /// are accepted in order, so each step below sees the ones before it.
    #[tokio::test]
    async fn connections_per_source_address_are_capped() {
        use tokio_stream::StreamExt;
        install_default_provider();
        let ca = crate::trust::pki::Ca::generate().unwrap();
        let m = TlsMaterial::from_node_cert(
            &ca.issue(&Identity::Coordinator, crate::trust::pki::days(1), &[])
                .unwrap(),
        )
        .unwrap();
        let fp = ca.fingerprint();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let cfg = m.server_config_join().unwrap();
        let mut inc = incoming_capped(listener, cfg, shutdown.clone(), 2);
        let one: IpAddr = "127.0.0.1".parse().unwrap();
        let two: IpAddr = "127.0.0.2".parse().unwrap();

        // Two connections from one address are served (and held here, server side).
        tls_from(one, addr, &fp).await.expect("first");
        let first = inc.next().await.unwrap().unwrap();
        tls_from(one, addr, &fp).await.expect("second");
        let _second = inc.next().await.unwrap().unwrap();
        // A third is closed before any TLS; another address has places of its own.
        tls_from(one, addr, &fp).await.expect_err("over the cap");
        tls_from(two, addr, &fp).await.expect("another address");
        let _other = inc.next().await.unwrap().unwrap();
        // A connection gives its place back when it closes; one that never starts its
        // handshake holds a place too.
        drop(first);
        let idle = tcp_from(one, addr).await;
        tls_from(one, addr, &fp)
            .await
            .expect_err("the idle connection holds the place");
        drop(idle);
        let mut served = false;
        for _ in 0..600 {
            if tls_from(one, addr, &fp).await.is_ok() {
                served = true;
                break;
            }
            // The server notices the idle connection's end on its own time.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(served, "the closed idle connection's place never came back");
        shutdown.cancel();
    }
}
