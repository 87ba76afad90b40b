//! The client side: the router's connections to workers under mutual TLS.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tonic::codegen::http::Uri;

use crate::server::{ALPN_GRPC, roots};
use crate::{Certified, TlsError, provider};

/// How the router reaches workers over TLS: the CA their certificates must chain
/// to, the name they must carry (workers are reached by pod address, which
/// changes, so all of a deployment's workers carry one name), and the router's own
/// certificate, which workers that ask for one check.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

impl ClientTls {
    pub fn new(
        ca: &Path,
        certificate: Option<Arc<Certified>>,
        server_name: &str,
    ) -> Result<Self, TlsError> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots(ca)?);
        let mut config = match certificate {
            Some(cert) => builder.with_client_cert_resolver(cert),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = ALPN_GRPC.iter().map(|p| p.to_vec()).collect();
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|_| TlsError::ServerName(server_name.to_string()))?;
        Ok(Self {
            config: Arc::new(config),
            server_name,
        })
    }

    /// A connector for `tonic::transport::Endpoint::connect_with_connector_lazy`.
    pub fn connector(&self) -> TlsConnector {
        TlsConnector { tls: self.clone() }
    }
}

/// TCP to the URI's host and port, then the TLS handshake.
#[derive(Clone)]
pub struct TlsConnector {
    tls: ClientTls,
}

type Connecting = Pin<
    Box<
        dyn Future<Output = io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>> + Send,
    >,
>;

impl tower::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Connecting {
        let tls = self.tls.clone();
        Box::pin(async move {
            let host = uri.host().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("{uri} has no host"))
            })?;
            // `[::1]` in a URI is `::1` to connect to.
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host, port)).await?;
            let _ = tcp.set_nodelay(true);
            let connector = tokio_rustls::TlsConnector::from(tls.config);
            let stream = connector.connect(tls.server_name, tcp).await?;
            Ok(TokioIo::new(stream))
        })
    }
}
