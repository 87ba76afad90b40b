//! A certificate chain and its key, from PEM files, read again when they change.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{SignatureScheme, crypto::CryptoProvider};

use crate::{TlsError, provider};

/// Where a certificate chain (leaf first) and its private key are, in PEM: a
/// Kubernetes TLS Secret's `tls.crt` and `tls.key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The certificate of [`CertFiles`] as last read. It serves TLS handshakes (as a
/// server's certificate or a client's) and [`Certified::watch`] keeps it current.
pub struct Certified {
    files: CertFiles,
    current: RwLock<Current>,
}

struct Current {
    /// The files' bytes when read, to see a change whatever the mtime says (a
    /// Secret volume swaps a symlink; clocks and mtimes may lie).
    bytes: (Vec<u8>, Vec<u8>),
    key: Arc<CertifiedKey>,
}

impl fmt::Debug for Certified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certified")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl Certified {
    /// Reads and checks the files (the key must be the certificate's).
    pub fn load(files: CertFiles) -> Result<Arc<Self>, TlsError> {
        let bytes = read_both(&files)?;
        let key = Arc::new(parse(&files, &bytes)?);
        Ok(Arc::new(Self {
            files,
            current: RwLock::new(Current { bytes, key }),
        }))
    }

    pub fn files(&self) -> &CertFiles {
        &self.files
    }

    /// The certificate and key served now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(current) => Arc::clone(&current.key),
            Err(poisoned) => Arc::clone(&poisoned.into_inner().key),
        }
    }

    /// Reads the files again; `Ok(true)` when they changed and the new pair is now
    /// served. On an error the last good pair stays.
    pub fn refresh(&self) -> Result<bool, TlsError> {
        let bytes = read_both(&self.files)?;
        let unchanged = match self.current.read() {
            Ok(current) => current.bytes == bytes,
            Err(poisoned) => poisoned.into_inner().bytes == bytes,
        };
        if unchanged {
            return Ok(false);
        }
        let key = Arc::new(parse(&self.files, &bytes)?);
        let mut current = match self.current.write() {
            Ok(current) => current,
            Err(poisoned) => poisoned.into_inner(),
        };
        *current = Current { bytes, key };
        Ok(true)
    }

    /// Looks at the files every `every` while `self` lives, serving a changed pair
    /// from the next handshake on. Needs a Tokio runtime.
    pub fn watch(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let this: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut last_error = None;
            loop {
                tokio::time::sleep(every).await;
                let Some(this) = this.upgrade() else { return };
                match this.refresh() {
                    Ok(true) => {
                        tracing::info!(cert = %this.files.cert.display(), "TLS certificate reloaded");
                        last_error = None;
                    }
                    Ok(false) => last_error = None,
                    Err(e) => {
                        // Once per distinct problem: a half-written Secret update is
                        // normal for a moment; the old certificate serves meanwhile.
                        let text = e.to_string();
                        if last_error.as_ref() != Some(&text) {
                            tracing::warn!(
                                "TLS certificate not reloaded, the last one serves: {text}"
                            );
                            last_error = Some(text);
                        }
                    }
                }
            }
        })
    }
}

impl ResolvesServerCert for Certified {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for Certified {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_both(files: &CertFiles) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    Ok((read(&files.cert)?, read(&files.key)?))
}

/// Every certificate of a PEM file, in order.
pub(crate) fn certificates(
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(chain)
}

pub(crate) fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    certificates(path, &read(path)?)
}

fn parse(files: &CertFiles, (cert, key): &(Vec<u8>, Vec<u8>)) -> Result<CertifiedKey, TlsError> {
    let chain = certificates(&files.cert, cert)?;
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: files.key.clone(),
        },
        other => TlsError::Pem {
            path: files.key.clone(),
            reason: other.to_string(),
        },
    })?;
    let provider: Arc<CryptoProvider> = provider();
    CertifiedKey::from_der(chain, key, &provider).map_err(|e| TlsError::Mismatch {
        cert: files.cert.clone(),
        key: files.key.clone(),
        reason: e.to_string(),
    })
}
