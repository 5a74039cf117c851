//! TLS 1.3 on the client listener (`tls_listen`), with rustls' unbuffered API.
//!
//! The session logic never sees TLS: a shard feeds a TLS connection's
//! ciphertext to its [`TlsConn`], runs the usual frame processing on the
//! plaintext that comes out, and encrypts its output once per flush.
//!
//! **Memory.** rustls' buffered `ServerConnection` keeps a 4 KiB read buffer
//! per connection for its whole life. The unbuffered connection keeps none:
//! ciphertext of a partial record waits in [`TlsConn`]'s own `inp`, which is
//! freed as soon as it is drained, and output goes straight into the
//! session's on-demand output buffer. An idle TLS connection costs the
//! session slot plus the boxed rustls state (keys, record layer, handshake
//! state machine); see `results/tls/` for the measured figure.
//!
//! **Certificates** are read from PEM files at start and again on
//! [`TlsContext::reload`] (`reload tls` on the stats socket, SIGHUP). The
//! current `ServerConfig` sits behind a lock that is read once per new TLS
//! connection, never on the data path; connections keep the config they
//! started with.
//!
//! **Resumption.** One ticketer per process, kept across reloads: TLS 1.3
//! tickets stay valid when the certificate changes, so a reconnect storm
//! after a reload still resumes. Its keys are ours ([`crate::ticket`]) and
//! pass to the successor of a live upgrade, so tickets survive that too.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ProducesTickets, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError};
use rustls::ServerConfig;

use crate::ticket::{TicketKeys, Ticketer};

/// Plaintext bytes in one TLS record at most (RFC 8446 §5.1).
const RECORD_PLAIN_BYTES_MAX: usize = 16 * 1024;
/// Bytes a TLS 1.3 record adds to its plaintext at most: 5 header bytes, 1
/// content type, a 16-byte AEAD tag; rounded up.
const RECORD_OVERHEAD_BYTES_MAX: usize = 32;
/// Bytes reserved for one handshake message encoding before rustls says how
/// much it really needs.
const ENCODE_RESERVE_BYTES: usize = 2048;
/// TLS 1.3 tickets sent after each full handshake. One is enough for a
/// client that reconnects with its latest ticket; each costs ~200 bytes.
const TICKETS_PER_HANDSHAKE: usize = 1;

/// The process's TLS settings: the current `ServerConfig` and where it came
/// from. Shared by every shard and the stats thread.
pub struct TlsContext {
    cert_path: PathBuf,
    key_path: PathBuf,
    /// Kept across reloads so tickets issued before one still resume.
    ticketer: Arc<Ticketer>,
    /// Read once per new TLS connection; replaced whole by `reload`.
    config: RwLock<Arc<ServerConfig>>,
    /// Successful reloads since start.
    reloads: AtomicU64,
}

impl fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsContext")
            .field("cert", &self.cert_path)
            .field("key", &self.key_path)
            .field("reloads", &self.reloads.load(Ordering::Relaxed))
            .finish()
    }
}

impl TlsContext {
    /// Reads the certificate chain and key; errors name the file at fault.
    /// Session tickets use fresh keys.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<TlsContext, String> {
        TlsContext::load_with_keys(cert_path, key_path, None)
    }

    /// [`TlsContext::load`] with the ticket keys of a predecessor (live
    /// upgrade), so its tickets resume here; `None` makes fresh ones.
    pub fn load_with_keys(
        cert_path: &Path,
        key_path: &Path,
        keys: Option<TicketKeys>,
    ) -> Result<TlsContext, String> {
        let keys = match keys {
            Some(keys) => keys,
            None => TicketKeys::generate()?,
        };
        let ticketer = Arc::new(Ticketer::new(keys));
        let config = build_config(cert_path, key_path, &ticketer)?;
        Ok(TlsContext {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            ticketer,
            config: RwLock::new(Arc::new(config)),
            reloads: AtomicU64::new(0),
        })
    }

    /// Re-reads the certificate and key files. New handshakes use them;
    /// connections already open keep theirs. On error the old ones stay.
    pub fn reload(&self) -> Result<String, String> {
        let config = build_config(&self.cert_path, &self.key_path, &self.ticketer)?;
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        let n = self.reloads.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(format!(
            "TLS certificate reloaded from {} (reload {n})",
            self.cert_path.display()
        ))
    }

    /// The session ticket keys now, for a successor.
    pub fn ticket_keys(&self) -> TicketKeys {
        self.ticketer.keys()
    }

    /// The configuration new connections start with.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Server-side TLS state for a newly accepted connection.
    pub fn accept(&self) -> Result<TlsConn, rustls::Error> {
        Ok(TlsConn {
            conn: UnbufferedServerConnection::new(self.current())?,
            inp: Vec::new(),
            handshaken: false,
            closed: false,
        })
    }
}

/// Reads a PEM certificate chain and private key into a TLS 1.3 config.
fn build_config(
    cert_path: &Path,
    key_path: &Path,
    ticketer: &Arc<Ticketer>,
) -> Result<ServerConfig, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| format!("tls_cert {}: {e}", cert_path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls_cert {}: {e}", cert_path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "tls_cert {}: no CERTIFICATE in the file",
            cert_path.display()
        ));
    }
    crate::privacy::check_file(key_path, "tls_key")?;
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| format!("tls_key {}: {e}", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            format!(
                "tls_cert {} / tls_key {}: {e}",
                cert_path.display(),
                key_path.display()
            )
        })?;
    config.ticketer = ticketer.clone() as Arc<dyn ProducesTickets>;
    config.send_tls13_tickets = TICKETS_PER_HANDSHAKE;
    Ok(config)
}

/// What one [`TlsConn::read`] found besides plaintext.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadOutcome {
    /// The handshake completed during this call.
    pub handshake_done: bool,
    /// The peer sent close_notify.
    pub peer_closed: bool,
}

/// One connection's TLS state, boxed in its session (8 bytes when absent).
pub struct TlsConn {
    conn: UnbufferedServerConnection,
    /// Ciphertext received but not yet a whole record; no allocation when
    /// empty (`Vec::new()` after every drain).
    inp: Vec<u8>,
    /// The handshake completed: application data may be sent.
    handshaken: bool,
    /// close_notify was written: nothing more may be encrypted.
    closed: bool,
}

impl fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConn")
            .field("inp_bytes", &self.inp.len())
            .field("handshaken", &self.handshaken)
            .finish()
    }
}

impl TlsConn {
    /// True once application data can flow.
    pub fn is_handshaken(&self) -> bool {
        self.handshaken
    }

    /// Takes `data` (ciphertext from the socket): decrypted application data
    /// is appended to `plain`, and TLS records to send (handshake flights,
    /// tickets, alerts) to `out`. An error means the connection must close
    /// (after sending `out`, which may hold an alert).
    pub fn read(
        &mut self,
        data: &[u8],
        plain: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<ReadOutcome, rustls::Error> {
        self.inp.extend_from_slice(data);
        let mut outcome = ReadOutcome::default();
        // Each round consumes a record or emits one; a record is at least 5
        // bytes, and a flight has a handful of messages.
        let rounds_max = self.inp.len() / 5 + 64;
        let mut result = Ok(());
        for _ in 0..rounds_max {
            let status = self.conn.process_tls_records(&mut self.inp);
            let discard = status.discard;
            let mut stop = false;
            match status.state {
                Err(e) => {
                    result = Err(e);
                    stop = true;
                }
                Ok(ConnectionState::ReadTraffic(mut r)) => {
                    while let Some(record) = r.next_record() {
                        match record {
                            Ok(record) => plain.extend_from_slice(record.payload),
                            Err(e) => {
                                result = Err(e);
                                stop = true;
                                break;
                            }
                        }
                    }
                }
                Ok(ConnectionState::EncodeTlsData(mut e)) => {
                    if let Err(err) = encode(&mut e, out) {
                        result = Err(err);
                        stop = true;
                    }
                }
                // The records are in `out`, which the shard sends in order.
                Ok(ConnectionState::TransmitTlsData(t)) => t.done(),
                Ok(ConnectionState::BlockedHandshake) => stop = true,
                Ok(ConnectionState::WriteTraffic(_)) => {
                    if !self.handshaken {
                        self.handshaken = true;
                        outcome.handshake_done = true;
                    }
                    stop = true;
                }
                Ok(ConnectionState::PeerClosed) | Ok(ConnectionState::Closed) => {
                    outcome.peer_closed = true;
                    stop = true;
                }
                // Early data is not enabled; anything newer: stop reading.
                Ok(_) => stop = true,
            }
            if discard > 0 {
                self.inp.drain(..discard);
            }
            if stop {
                break;
            }
        }
        if self.inp.is_empty() {
            self.inp = Vec::new(); // idle again: no buffer
        }
        result.map(|()| outcome)
    }

    /// Appends a close_notify alert to `out` (once; only after the
    /// handshake), so the peer sees a clean end of the TLS stream before
    /// the FIN.
    pub fn close_notify(&mut self, out: &mut Vec<u8>) {
        if !self.handshaken || self.closed {
            return;
        }
        self.closed = true;
        let status = self.conn.process_tls_records(&mut []);
        if let Ok(ConnectionState::WriteTraffic(mut w)) = status.state {
            let at = out.len();
            out.resize(at + RECORD_OVERHEAD_BYTES_MAX, 0);
            match w.queue_close_notify(&mut out[at..]) {
                Ok(n) => out.truncate(at + n),
                Err(_) => out.truncate(at),
            }
        }
    }

    /// Encrypts `plain` into TLS records appended to `out`.
    pub fn encrypt(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), rustls::Error> {
        debug_assert!(self.handshaken, "encrypt before the handshake");
        if self.closed {
            return Err(rustls::Error::General(
                "encrypt after close_notify".to_string(),
            ));
        }
        // Pending TLS output (e.g. a key update answered in `read`) goes first.
        for _ in 0..16 {
            let status = self.conn.process_tls_records(&mut []);
            match status.state? {
                ConnectionState::EncodeTlsData(mut e) => encode(&mut e, out)?,
                ConnectionState::TransmitTlsData(t) => t.done(),
                ConnectionState::WriteTraffic(mut w) => {
                    let at = out.len();
                    let records = plain.len() / RECORD_PLAIN_BYTES_MAX + 1;
                    out.resize(at + plain.len() + records * RECORD_OVERHEAD_BYTES_MAX, 0);
                    let n = match w.encrypt(plain, &mut out[at..]) {
                        Ok(n) => n,
                        Err(EncryptError::InsufficientSize(s)) => {
                            out.resize(at + s.required_size, 0);
                            w.encrypt(plain, &mut out[at..]).map_err(encrypt_error)?
                        }
                        Err(e) => return Err(encrypt_error(e)),
                    };
                    out.truncate(at + n);
                    return Ok(());
                }
                other => {
                    return Err(rustls::Error::General(format!(
                        "cannot send application data in state {other:?}"
                    )))
                }
            }
        }
        Err(rustls::Error::General(
            "TLS output did not drain".to_string(),
        ))
    }
}

/// Appends one pending TLS message to `out`.
fn encode(
    e: &mut rustls::unbuffered::EncodeTlsData<'_, rustls::server::ServerConnectionData>,
    out: &mut Vec<u8>,
) -> Result<(), rustls::Error> {
    let at = out.len();
    out.resize(at + ENCODE_RESERVE_BYTES, 0);
    let n = match e.encode(&mut out[at..]) {
        Ok(n) => n,
        Err(EncodeError::InsufficientSize(s)) => {
            out.resize(at + s.required_size, 0);
            e.encode(&mut out[at..])
                .map_err(|e| rustls::Error::General(e.to_string()))?
        }
        Err(e) => {
            out.truncate(at);
            return Err(rustls::Error::General(e.to_string()));
        }
    };
    out.truncate(at + n);
    Ok(())
}

fn encrypt_error(e: EncryptError) -> rustls::Error {
    rustls::Error::General(format!("TLS encrypt: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_state_is_small() {
        // The boxed part of an idle TLS connection, without its heap parts.
        let size = std::mem::size_of::<TlsConn>();
        assert!(size <= 2048, "{size}");
    }
}
