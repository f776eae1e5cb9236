//! The router's listener: HTTP/1.1 connections (over TLS when configured) with a connection
//! limit, a header-read timeout that also closes idle keep-alive connections, and graceful
//! shutdown. What a request may contain is the front door's business (`api::front`); this is
//! what a connection may do.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};

/// Why the listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} holds no PEM {what}")]
    Pem { path: PathBuf, what: &'static str },
    #[error("the private key in {path} is not usable: {source}")]
    Key { path: PathBuf, source: rustls::Error },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// What one connection may do.
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    /// Open connections at once; further clients wait in the kernel's accept queue.
    pub max_connections: usize,
    /// A request's headers must arrive within this, counted from the connection's start or the
    /// end of its previous response: it is also the idle keep-alive timeout.
    pub header_read_timeout: Duration,
    /// A TLS handshake must finish within this.
    pub handshake_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// A certificate and key as PEM files (a kubernetes.io/tls Secret's `tls.crt` and `tls.key`,
/// which cert-manager renews in place); reread when either file changes.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How often the certificate files are checked for changes.
const TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

impl TlsFiles {
    fn load(&self) -> Result<Arc<CertifiedKey>, ListenerError> {
        let read =
            |path: &Path| std::fs::read(path).map_err(|source| ListenerError::Read { path: path.into(), source });
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&read(&self.cert)?).filter_map(Result::ok).collect();
        if certs.is_empty() {
            return Err(ListenerError::Pem { path: self.cert.clone(), what: "certificate" });
        }
        let key = PrivateKeyDer::from_pem_slice(&read(&self.key)?)
            .map_err(|_| ListenerError::Pem { path: self.key.clone(), what: "private key" })?;
        let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)
            .map_err(|source| ListenerError::Key { path: self.key.clone(), source })?;
        let key = CertifiedKey::new(certs, signing);
        // Mid-rotation the files may not match yet: refuse the pair rather than serve it.
        key.keys_match().map_err(|source| ListenerError::Key { path: self.key.clone(), source })?;
        Ok(Arc::new(key))
    }

    fn modified(&self) -> Option<(SystemTime, SystemTime)> {
        let at = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        Some((at(&self.cert)?, at(&self.key)?))
    }

    /// A rustls acceptor whose certificate follows the files.
    pub fn acceptor(&self) -> Result<TlsAcceptor, ListenerError> {
        let resolver = Arc::new(Reloading { current: RwLock::new(self.load()?) });
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let files = self.clone();
        let weak = Arc::downgrade(&resolver);
        tokio::spawn(async move {
            let mut seen = files.modified();
            let mut tick = tokio::time::interval(TLS_RELOAD_INTERVAL);
            loop {
                tick.tick().await;
                let Some(resolver) = weak.upgrade() else { return };
                let now = files.modified();
                if now == seen {
                    continue;
                }
                seen = now;
                match files.load() {
                    Ok(key) => {
                        *resolver.current.write().unwrap_or_else(|e| e.into_inner()) = key;
                        tracing::info!(cert = %files.cert.display(), "TLS certificate reloaded");
                    }
                    // Mid-rotation the two files may not match yet; the next change completes it.
                    Err(e) => {
                        tracing::warn!(error = %e, "the TLS files changed but do not load; keeping the previous certificate")
                    }
                }
            }
        });
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

#[derive(Debug)]
struct Reloading {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// Serves `app` on `listener` until `shutdown` fires, then lets open connections finish their
/// requests (the caller bounds how long).
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    tls: Option<TlsAcceptor>,
    limits: ConnectionLimits,
    mut shutdown: oneshot::Receiver<()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit { Ok(p) => p, Err(_) => break },
            _ = &mut shutdown => break,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // Streamed events are written one by one: send each at once.
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let tls = tls.clone();
        let limits = limits.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => serve_connection(TokioIo::new(tcp), app, &limits, watcher, peer).await,
                Some(acceptor) => match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => serve_connection(TokioIo::new(stream), app, &limits, watcher, peer).await,
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                },
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

async fn serve_connection<I>(
    io: TokioIo<I>,
    app: axum::Router,
    limits: &ConnectionLimits,
    watcher: hyper_util::server::graceful::Watcher,
    peer: SocketAddr,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(app);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).keep_alive(true);
    let connection = http.serve_connection(io, service);
    if let Err(e) = watcher.watch(connection).await {
        tracing::debug!(%peer, error = %e, "connection closed with an error");
    }
}
