//! The server side: a listener's TLS (optionally asking clients for certificates)
//! and accepted connections as a stream a tonic server serves.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::files::read_certificates;
use crate::{Certified, TlsError, provider};

/// ALPN of a gRPC listener.
pub const ALPN_GRPC: &[&[u8]] = &[b"h2"];
/// ALPN of an HTTP listener: HTTP/2 when the client can, else HTTP/1.1.
pub const ALPN_HTTP: &[&[u8]] = &[b"h2", b"http/1.1"];

/// A listener's TLS: its certificate (re-read as it changes), the CA whose
/// certificates clients must present when one is given, and how long a handshake
/// may take (a client that stalls it holds nothing for longer).
#[derive(Clone)]
pub struct ServerTls {
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
    verifies_clients: bool,
}

impl ServerTls {
    /// For HTTP (`grpc: false`, ALPN h2 and http/1.1) or gRPC (`grpc: true`, h2).
    pub fn new(
        cert: Arc<Certified>,
        client_ca: Option<&Path>,
        grpc: bool,
        handshake_timeout: Duration,
    ) -> Result<Self, TlsError> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?;
        let builder = match client_ca {
            Some(path) => {
                let roots = Arc::new(roots(path)?);
                let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
                    .build()
                    .map_err(|e| TlsError::Ca {
                        path: path.to_path_buf(),
                        reason: e.to_string(),
                    })?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(cert);
        config.alpn_protocols = if grpc { ALPN_GRPC } else { ALPN_HTTP }
            .iter()
            .map(|p| p.to_vec())
            .collect();
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            handshake_timeout,
            verifies_clients: client_ca.is_some(),
        })
    }

    /// Whether clients must present a certificate of the client CA.
    pub fn verifies_clients(&self) -> bool {
        self.verifies_clients
    }

    /// The TLS handshake on an accepted connection, within the handshake timeout.
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<TlsStream> {
        let remote = tcp.peer_addr().ok();
        let stream = tokio::time::timeout(self.handshake_timeout, self.acceptor.accept(tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        let peer_certificates = stream
            .get_ref()
            .1
            .peer_certificates()
            .map(|certs| Arc::new(certs.iter().map(|c| c.clone().into_owned()).collect()));
        Ok(TlsStream {
            inner: Inner::Tls(Box::new(stream)),
            info: TlsConnectInfo {
                remote,
                tls: true,
                peer_certificates,
            },
        })
    }

    /// [`Self::accept`] when the client starts a TLS handshake, else the plain
    /// connection ([`Plaintext::Allowed`]).
    pub async fn accept_either(&self, tcp: TcpStream) -> io::Result<TlsStream> {
        let mut first = [0u8; 1];
        let peeked = tokio::time::timeout(self.handshake_timeout, tcp.peek(&mut first))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the client sent nothing"))??;
        if peeked == 1 && first[0] == TLS_HANDSHAKE {
            self.accept(tcp).await
        } else {
            Ok(TlsStream::plain(tcp))
        }
    }
}

/// Every certificate of a PEM bundle, as trust roots.
pub(crate) fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certificates(path)? {
        roots.add(cert).map_err(|e| TlsError::Ca {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// Who is on the other end of a connection: its address, whether it speaks TLS and,
/// under mutual TLS, its verified certificate chain. Request extensions carry it
/// (tonic), so a service can refuse callers without a certificate.
#[derive(Clone, Debug)]
pub struct TlsConnectInfo {
    pub remote: Option<SocketAddr>,
    pub tls: bool,
    pub peer_certificates: Option<Arc<Vec<CertificateDer<'static>>>>,
}

impl TlsConnectInfo {
    /// Whether the caller presented a certificate that the listener's client CA
    /// verified (mutual TLS).
    pub fn authenticated(&self) -> bool {
        self.tls && self.peer_certificates.is_some()
    }
}

/// An accepted connection: after its TLS handshake, or, on a listener that allows
/// it, plain.
pub struct TlsStream {
    inner: Inner,
    info: TlsConnectInfo,
}

enum Inner {
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Plain(TcpStream),
}

impl TlsStream {
    pub fn info(&self) -> &TlsConnectInfo {
        &self.info
    }

    fn plain(tcp: TcpStream) -> Self {
        let remote = tcp.peer_addr().ok();
        Self {
            inner: Inner::Plain(tcp),
            info: TlsConnectInfo {
                remote,
                tls: false,
                peer_certificates: None,
            },
        }
    }
}

macro_rules! both {
    ($self:ident, $stream:ident => $call:expr) => {
        match &mut $self.inner {
            Inner::Tls($stream) => {
                let $stream = Pin::new($stream.as_mut());
                $call
            }
            Inner::Plain($stream) => {
                let $stream = Pin::new($stream);
                $call
            }
        }
    };
}

impl AsyncRead for TlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        both!(self, stream => stream.poll_read(cx, buf))
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        both!(self, stream => stream.poll_write(cx, buf))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        both!(self, stream => stream.poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        both!(self, stream => stream.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        both!(self, stream => stream.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.inner {
            Inner::Tls(stream) => stream.is_write_vectored(),
            Inner::Plain(stream) => stream.is_write_vectored(),
        }
    }
}

impl tonic::transport::server::Connected for TlsStream {
    type ConnectInfo = TlsConnectInfo;

    fn connect_info(&self) -> TlsConnectInfo {
        self.info.clone()
    }
}

/// What a listener accepts besides TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plaintext {
    /// TLS only: a plaintext client fails its handshake.
    Refused,
    /// Plaintext connections too (told apart by their first byte: a TLS record
    /// starts with 0x16, an HTTP/2 preface with `P`); their calls carry
    /// [`TlsConnectInfo::tls`] false, for the services to refuse what needs TLS.
    /// Kubelet's gRPC probes speak no TLS: a worker keeps its health open this way.
    Allowed,
}

/// TLS record type of a handshake: the first byte a TLS client sends.
const TLS_HANDSHAKE: u8 = 0x16;

/// Connections accepted on `listener` after their TLS handshake (or plain, when
/// `plaintext` allows), for `tonic::transport::Server::serve_with_incoming`.
/// Handshakes run concurrently, so a slow or failing client delays no other;
/// failures are logged and dropped.
pub fn incoming(
    listener: TcpListener,
    tls: ServerTls,
    plaintext: Plaintext,
) -> impl Stream<Item = io::Result<TlsStream>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<TlsStream>>(64);
    tokio::spawn(async move {
        loop {
            let tcp = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        // Out of file descriptors, say: wait rather than spin.
                        tracing::warn!("accepting a connection failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let (tls, tx) = (tls.clone(), tx.clone());
            tokio::spawn(async move {
                let accepted = match plaintext {
                    Plaintext::Refused => tls.accept(tcp).await,
                    Plaintext::Allowed => tls.accept_either(tcp).await,
                };
                match accepted {
                    Ok(stream) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Err(e) => tracing::debug!("TLS handshake failed: {e}"),
                }
            });
        }
    });
    tokio_stream_of(rx)
}

fn tokio_stream_of<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
