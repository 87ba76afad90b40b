use std::sync::Arc;
use std::time::Duration;

use shardserve_e2e::pki::TestCa;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

fn files(leaf: &shardserve_e2e::pki::Leaf) -> CertFiles {
    CertFiles {
        cert: leaf.cert.clone(),
        key: leaf.key.clone(),
    }
}

#[test]
fn bad_files_are_refused_with_their_names() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let a = ca.leaf("a", &["a.test"]);
    let b = ca.leaf("b", &["b.test"]);
    let missing = CertFiles {
        cert: dir.path().join("nope.crt"),
        key: a.key.clone(),
    };
    let e = Certified::load(missing).unwrap_err().to_string();
    assert!(e.contains("nope.crt"), "{e}");
    let crossed = CertFiles {
        cert: a.cert.clone(),
        key: b.key.clone(),
    };
    let e = Certified::load(crossed).unwrap_err().to_string();
    assert!(
        e.contains("does not fit") && e.contains("a.crt") && e.contains("b.key"),
        "{e}"
    );
    let swapped = CertFiles {
        cert: a.key.clone(),
        key: a.cert.clone(),
    };
    let e = Certified::load(swapped).unwrap_err().to_string();
    assert!(e.contains("no PEM certificate"), "{e}");
    let no_key = CertFiles {
        cert: a.cert.clone(),
        key: a.cert.clone(),
    };
    let e = Certified::load(no_key).unwrap_err().to_string();
    assert!(e.contains("no PEM private key"), "{e}");
    assert!(Certified::load(files(&a)).is_ok());
}

#[test]
fn a_changed_pair_is_served_and_a_broken_one_keeps_the_last() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let first = ca.leaf("server", &["first.test"]);
    let cert = Certified::load(files(&first)).unwrap();
    let before = cert.current();
    assert!(!cert.refresh().unwrap(), "nothing changed");
    // Renewed in place, as a Secret update does.
    let renewed = ca.leaf("server", &["second.test"]);
    assert_eq!(renewed.cert, first.cert);
    assert!(cert.refresh().unwrap());
    let after = cert.current();
    assert_ne!(before.cert[0], after.cert[0]);
    // Half written: refused, the renewed one stays.
    std::fs::write(&first.key, "-----BEGIN PRIVATE KEY-----\ngarbage\n").unwrap();
    assert!(cert.refresh().is_err());
    assert_eq!(cert.current().cert[0], after.cert[0]);
}

/// One TLS exchange: the server echoes a line back.
async fn exchange(server: ServerTls, client: ClientTls) -> std::io::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut stream = server.accept(tcp).await?;
        let has_peer = stream.info().peer_certificates.is_some();
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).await?;
        stream
            .write_all(if has_peer { b"mtls!" } else { b"tls!!" })
            .await?;
        stream.flush().await?;
        Ok::<_, std::io::Error>(())
    });
    let mut connector = client.connector();
    let uri: tonic::codegen::http::Uri = format!("http://{addr}").parse().unwrap();
    let result = async {
        let io = tower::Service::call(&mut connector, uri).await?;
        let mut stream = io.into_inner();
        stream.write_all(b"hello").await?;
        stream.flush().await?;
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).await?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
    .await;
    let _ = serving.await;
    result
}

#[tokio::test]
async fn mutual_tls_serves_only_clients_with_a_certificate_of_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let other = TestCa::new(dir.path(), "other");
    let worker = Certified::load(files(&ca.leaf("worker", &["shardserve-worker"]))).unwrap();
    let router = Certified::load(files(&ca.leaf("router", &["router"]))).unwrap();
    let stranger = Certified::load(files(&other.leaf("stranger", &["router"]))).unwrap();
    let timeout = Duration::from_secs(5);
    let mtls = ServerTls::new(Arc::clone(&worker), Some(&ca.ca_file), true, timeout).unwrap();
    let plain = ServerTls::new(Arc::clone(&worker), None, true, timeout).unwrap();
    let client =
        |cert: Option<Arc<Certified>>, name: &str| ClientTls::new(&ca.ca_file, cert, name).unwrap();

    let ok = exchange(
        mtls.clone(),
        client(Some(Arc::clone(&router)), "shardserve-worker"),
    )
    .await;
    assert_eq!(ok.unwrap(), "mtls!");
    // TLS 1.3 clients learn of a refused certificate on their first read.
    assert!(
        exchange(mtls.clone(), client(None, "shardserve-worker"))
            .await
            .is_err()
    );
    assert!(
        exchange(mtls.clone(), client(Some(stranger), "shardserve-worker"))
            .await
            .is_err()
    );
    // The worker's certificate must carry the name the router expects.
    assert!(
        exchange(plain.clone(), client(None, "another-name"))
            .await
            .is_err()
    );
    let tls_only = exchange(plain, client(None, "shardserve-worker")).await;
    assert_eq!(tls_only.unwrap(), "tls!!");
    // A server whose certificate another CA signed is not trusted.
    let impostor = Certified::load(files(&other.leaf("impostor", &["shardserve-worker"]))).unwrap();
    let impostor = ServerTls::new(impostor, None, true, timeout).unwrap();
    assert!(
        exchange(impostor, client(None, "shardserve-worker"))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_stalled_handshake_ends_at_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let cert = Certified::load(files(&ca.leaf("server", &["server.test"]))).unwrap();
    let server = ServerTls::new(cert, None, false, Duration::from_millis(200)).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Connects and sends nothing.
    let _idle = TcpStream::connect(addr).await.unwrap();
    let (tcp, _) = listener.accept().await.unwrap();
    let started = std::time::Instant::now();
    let e = server.accept(tcp).await.err().expect("no handshake");
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_listener_that_allows_plaintext_tells_the_two_apart() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let cert = Certified::load(files(&ca.leaf("worker", &["shardserve-worker"]))).unwrap();
    let server = ServerTls::new(cert, Some(&ca.ca_file), true, Duration::from_secs(5)).unwrap();
    assert!(server.verifies_clients());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();

    // An HTTP/2 preface in plain text: accepted as plain, unauthenticated.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let (tcp, _) = listener.accept().await.unwrap();
    let mut stream = server.accept_either(tcp).await.unwrap();
    assert!(!stream.info().tls && !stream.info().authenticated());
    let mut preface = [0u8; 3];
    stream.read_exact(&mut preface).await.unwrap();
    assert_eq!(
        &preface, b"PRI",
        "nothing of the plain stream is lost to the peek"
    );

    // A TLS client with a certificate of the CA: authenticated.
    let router = Certified::load(files(&ca.leaf("router", &["router"]))).unwrap();
    let client = ClientTls::new(&ca.ca_file, Some(router), "shardserve-worker").unwrap();
    let serving = tokio::spawn({
        let server = server.clone();
        async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut stream = server.accept_either(tcp).await.unwrap();
            let info = stream.info().clone();
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await.unwrap();
            info
        }
    });
    let uri: tonic::codegen::http::Uri = format!("http://{addr}").parse().unwrap();
    let mut connector = client.connector();
    let io = tower::Service::call(&mut connector, uri).await.unwrap();
    let mut stream = io.into_inner();
    stream.write_all(b"x").await.unwrap();
    stream.flush().await.unwrap();
    let info = serving.await.unwrap();
    assert!(info.tls && info.authenticated());
}
