//! TLS for shardserve (rustls on ring): the router's HTTP and gRPC listeners, and
//! optional mutual TLS between the router and the workers' gRPC.
//!
//! Certificates and keys come from PEM files, as Kubernetes mounts a Secret, and are
//! read again when the files change ([`CertFiles`] polls them): a certificate
//! renewed by cert-manager is served from the next handshake on, without a restart.
//! A file that cannot be read or parsed keeps the last good certificate and says so.

mod client;
mod files;
mod server;

pub use client::{ClientTls, TlsConnector};
pub use files::{CertFiles, Certified};
pub use server::{Plaintext, ServerTls, TlsConnectInfo, TlsStream, incoming};

use std::path::PathBuf;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: PathBuf },
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("the key in {key} does not fit the certificate in {cert}: {reason}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("the CA bundle {path}: {reason}")]
    Ca { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
}

/// The crypto of every configuration: ring, as kube's client uses.
fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests;
