//! Heap held by one idle server-side TLS connection, counted exactly by a
//! counting allocator (this test binary only): a `tern::tls::TlsConn` driven
//! through a handshake and one exchange with an in-memory rustls client.
//! The bytes it holds are what dropping it frees.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;

use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use tern::tls::{TlsConn, TlsContext};

struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Heap bytes an idle TLS connection may hold (requested sizes, before the
/// allocator's rounding). Measured 3305 with rustls 0.23.46 / ring 0.17: the
/// boxed connection (1120), the handshake-done state (640), two AES-GCM
/// record keys (560 each), the key schedule (224), two emptied deques rustls
/// keeps (96 each) and the SNI name (9). The session, backend and timer
/// costs come on top (see results/tls/).
const IDLE_TLS_HEAP_BYTES_MAX: isize = 3584;

fn pump_client_to_server(client: &mut ClientConnection, server: &mut TlsConn, plain: &mut Vec<u8>) {
    let mut wire = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut wire).unwrap();
    }
    let mut out = Vec::new();
    if !wire.is_empty() {
        server.read(&wire, plain, &mut out).unwrap();
    }
    let mut rd = &out[..];
    while !rd.is_empty() {
        client.read_tls(&mut rd).unwrap();
    }
    client.process_new_packets().unwrap();
}

#[test]
fn idle_tls_connection_heap_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
    // The server refuses a private key others can read.
    let private = std::os::unix::fs::PermissionsExt::from_mode(0o600);
    std::fs::set_permissions(dir.path().join("key.pem"), private).unwrap();
    let ctx = TlsContext::load(&dir.path().join("cert.pem"), &dir.path().join("key.pem")).unwrap();

    let mut roots = RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let mut client =
        ClientConnection::new(config, ServerName::try_from("localhost").unwrap()).unwrap();
    let mut server = Box::new(ctx.accept().unwrap());
    let mut plain = Vec::new();
    for _ in 0..8 {
        pump_client_to_server(&mut client, &mut server, &mut plain);
        if server.is_handshaken() && !client.is_handshaking() {
            break;
        }
    }
    assert!(server.is_handshaken() && !client.is_handshaking());
    // One exchange each way, like a LOGIN and its answer.
    std::io::Write::write_all(&mut client.writer(), b"hello server").unwrap();
    pump_client_to_server(&mut client, &mut server, &mut plain);
    assert_eq!(plain, b"hello server");
    let mut out = Vec::new();
    server.encrypt(b"hello client", &mut out).unwrap();
    let mut rd = &out[..];
    client.read_tls(&mut rd).unwrap();
    client.process_new_packets().unwrap();
    let mut got = [0u8; 12];
    std::io::Read::read_exact(&mut client.reader(), &mut got).unwrap();
    assert_eq!(&got, b"hello client");
    drop((out, plain));

    let before = LIVE_BYTES.load(Ordering::Relaxed);
    drop(server);
    let held = before - LIVE_BYTES.load(Ordering::Relaxed);
    println!("idle server TLS connection holds {held} heap bytes");
    assert!(
        held > 0 && held <= IDLE_TLS_HEAP_BYTES_MAX,
        "idle TLS connection holds {held} bytes"
    );
}
