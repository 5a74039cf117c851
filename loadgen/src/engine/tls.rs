//! TLS 1.3 over any [`Engine`] (`--tls`): a wrapper that runs a rustls
//! client connection per slot on top of the inner engine's bytes.
//!
//! The driver sees the same contract: [`Event::Connected`] comes once the
//! TLS handshake is done (not at the TCP connect), [`Event::Recv`] carries
//! plaintext, and [`Engine::send`] takes plaintext. A handshake that fails
//! is reported as [`Event::ConnectFailed`] with `EPROTO` (the inner slot is
//! closed here and its release swallowed); a TLS error after the handshake
//! as [`Event::PeerClosed`] with `EPROTO`.
//!
//! Memory: rustls' buffered client keeps its buffers per connection (tens of
//! KiB while busy), so `--tls` is for handshake and throughput runs, not
//! for million-connection idle runs.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};

use super::{Engine, EngineStats, Event};

/// Plaintext bytes read out of one connection per inner event at most, so
/// one busy connection cannot grow the scratch buffer without bound.
const PLAIN_PER_EVENT_BYTES_MAX: usize = 4 * 1024 * 1024;

/// One slot's TLS state.
struct Slot {
    conn: ClientConnection,
    /// `Connected` was reported to the driver.
    reported: bool,
}

/// Wraps an engine with TLS; see the module docs.
pub struct TlsEngine<E> {
    inner: E,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    slots: Vec<Option<Box<Slot>>>,
    /// The inner slot was closed here after a failed handshake: its
    /// `Released` is not the driver's business.
    swallow_release: Vec<bool>,
    inner_events: Vec<Event>,
    inner_scratch: Vec<u8>,
    out: Vec<u8>,
}

impl<E: Engine> TlsEngine<E> {
    /// Wraps `inner` (slots `0..conns`), verifying the server as `name`.
    pub fn new(inner: E, conns: u32, config: Arc<ClientConfig>, name: ServerName<'static>) -> Self {
        TlsEngine {
            inner,
            config,
            name,
            slots: (0..conns).map(|_| None).collect(),
            swallow_release: vec![false; conns as usize],
            inner_events: Vec::new(),
            inner_scratch: Vec::new(),
            out: Vec::new(),
        }
    }

    /// Sends what rustls has queued for slot `l`.
    fn flush(&mut self, l: u32) {
        let Some(slot) = self.slots[l as usize].as_mut() else {
            return;
        };
        self.out.clear();
        while slot.conn.wants_write() {
            if slot.conn.write_tls(&mut self.out).is_err() {
                break;
            }
        }
        if !self.out.is_empty() {
            self.inner.send(l, &self.out);
        }
    }

    /// A TLS error on slot `l`.
    fn fail(&mut self, l: u32, events: &mut Vec<Event>) {
        let reported = self.slots[l as usize].as_ref().is_some_and(|s| s.reported);
        self.flush(l); // the alert, if any
        self.slots[l as usize] = None;
        if reported {
            events.push(Event::PeerClosed(l, libc::EPROTO));
        } else {
            self.swallow_release[l as usize] = true;
            self.inner.close(l);
            events.push(Event::ConnectFailed(l, libc::EPROTO));
        }
    }

    fn on_recv(
        &mut self,
        l: u32,
        start: usize,
        len: usize,
        events: &mut Vec<Event>,
        scratch: &mut Vec<u8>,
    ) {
        let Some(slot) = self.slots[l as usize].as_mut() else {
            return;
        };
        let mut data = &self.inner_scratch[start..start + len];
        let mut failed = false;
        while !data.is_empty() {
            if slot.conn.read_tls(&mut data).is_err() || slot.conn.process_new_packets().is_err() {
                failed = true;
                break;
            }
        }
        if failed {
            return self.fail(l, events);
        }
        if !slot.reported && !slot.conn.is_handshaking() {
            slot.reported = true;
            events.push(Event::Connected(l));
        }
        let begin = scratch.len();
        loop {
            let at = scratch.len();
            if at - begin >= PLAIN_PER_EVENT_BYTES_MAX {
                break;
            }
            scratch.resize(at + 16 * 1024, 0);
            match slot.conn.reader().read(&mut scratch[at..]) {
                Ok(n) if n > 0 => scratch.truncate(at + n),
                _ => {
                    scratch.truncate(at);
                    break;
                }
            }
        }
        if scratch.len() > begin {
            events.push(Event::Recv(l, begin, scratch.len() - begin));
        }
        self.flush(l);
    }
}

impl<E: Engine> Engine for TlsEngine<E> {
    fn open(&mut self, conn: u32, src: usize, dst: usize) -> io::Result<()> {
        self.inner.open(conn, src, dst)
    }

    fn send(&mut self, conn: u32, bytes: &[u8]) {
        let Some(slot) = self.slots[conn as usize].as_mut() else {
            return;
        };
        if slot.conn.writer().write_all(bytes).is_err() {
            return;
        }
        self.flush(conn);
    }

    fn close(&mut self, conn: u32) {
        self.slots[conn as usize] = None;
        self.inner.close(conn);
    }

    fn poll(
        &mut self,
        timeout: Duration,
        events: &mut Vec<Event>,
        scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        self.inner_events.clear();
        self.inner_scratch.clear();
        let mut inner_events = std::mem::take(&mut self.inner_events);
        let result = self
            .inner
            .poll(timeout, &mut inner_events, &mut self.inner_scratch);
        for ev in inner_events.drain(..) {
            match ev {
                Event::Connected(l) => {
                    match ClientConnection::new(self.config.clone(), self.name.clone()) {
                        Ok(conn) => {
                            self.slots[l as usize] = Some(Box::new(Slot {
                                conn,
                                reported: false,
                            }));
                            self.flush(l);
                        }
                        Err(_) => {
                            self.swallow_release[l as usize] = true;
                            self.inner.close(l);
                            events.push(Event::ConnectFailed(l, libc::EPROTO));
                        }
                    }
                }
                Event::Recv(l, start, len) => self.on_recv(l, start, len, events, scratch),
                Event::PeerClosed(l, errno) => {
                    let reported = self.slots[l as usize].as_ref().is_some_and(|s| s.reported);
                    if reported {
                        events.push(Event::PeerClosed(l, errno));
                    } else if self.slots[l as usize].is_some() {
                        // Closed during the handshake: a failed connect.
                        self.slots[l as usize] = None;
                        self.swallow_release[l as usize] = true;
                        self.inner.close(l);
                        events.push(Event::ConnectFailed(
                            l,
                            if errno == 0 { libc::ECONNRESET } else { errno },
                        ));
                    }
                }
                Event::Released(l) => {
                    if std::mem::take(&mut self.swallow_release[l as usize]) {
                        continue;
                    }
                    self.slots[l as usize] = None;
                    events.push(ev);
                }
                Event::ConnectFailed(..) => events.push(ev),
            }
        }
        self.inner_events = inner_events;
        result
    }

    fn stats(&self) -> EngineStats {
        self.inner.stats()
    }

    fn server_index(&mut self, addr: std::net::SocketAddr) -> Option<usize> {
        self.inner.server_index(addr)
    }
}

/// A TLS 1.3 client configuration: roots from the PEM file `ca`, or no
/// verification at all with `insecure` (tests and benchmarks only).
pub fn client_config(
    ca: Option<&std::path::Path>,
    insecure: bool,
) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?;
    let config = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth()
    } else {
        let ca = ca.ok_or("--tls needs --tls-ca FILE or --tls-insecure")?;
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(ca)
            .map_err(|e| format!("--tls-ca {}: {e}", ca.display()))?;
        for cert in certs {
            let cert = cert.map_err(|e| format!("--tls-ca {}: {e}", ca.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("--tls-ca {}: {e}", ca.display()))?;
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// Accepts any server certificate (`--tls-insecure`); signatures on the
/// handshake are still checked.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
