//! The TLS flags the router and the worker share.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use shardserve_tls::CertFiles;

/// `--tls-cert` and `--tls-key`: PEM files, as a Kubernetes TLS Secret mounts them
/// (`tls.crt`, `tls.key`), re-read within 10 s of a change.
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// Serve TLS with this certificate chain (PEM, leaf first); needs --tls-key.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl TlsArgs {
    pub fn files(&self) -> Option<CertFiles> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(CertFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        }
    }
}

/// A certificate given as two flags, both or neither.
pub fn pair(
    cert_flag: &str,
    cert: &Option<PathBuf>,
    key_flag: &str,
    key: &Option<PathBuf>,
) -> Result<Option<CertFiles>> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(CertFiles {
            cert: cert.clone(),
            key: key.clone(),
        })),
        (None, None) => Ok(None),
        (Some(_), None) => bail!("--{cert_flag} needs --{key_flag}"),
        (None, Some(_)) => bail!("--{key_flag} needs --{cert_flag}"),
    }
}
