//! TLS 1.3 session tickets sealed with keys this process holds and can
//! hand on: a live upgrade passes them to the successor (see
//! [`crate::upgrade`]), so a TLS client that reconnects after its
//! BYE(upgrade) resumes with the ticket the old process gave it instead of
//! a full handshake. (rustls' own ticketer makes its keys inside and never
//! shows them.)
//!
//! A ticket is `key name (16) || nonce (12) || ChaCha20-Poly1305(state) ||
//! tag (16)`, the key name also authenticated. A key seals new tickets for
//! [`ROTATE_S`], then only opens them for one more period (as rustls'
//! rotator): a ticket resumes for up to twice that. Keys come from the
//! system's random source; the hand-over sends them over the process's
//! own Unix socket pair, never to disk.

use std::fmt;
use std::sync::RwLock;
use std::time::{SystemTime, UNIX_EPOCH};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::server::ProducesTickets;

/// Bytes of a ticket key.
pub const KEY_BYTES: usize = 32;
/// Bytes of a key's name (random), which starts each ticket.
pub const NAME_BYTES: usize = 16;
/// Seconds a key seals new tickets before the next one takes over (it
/// then still opens tickets for as long again).
pub const ROTATE_S: u64 = 6 * 3600;
/// Bytes of [`TicketKeys::encode`]: rotation time, then the current key,
/// then a flag and the previous key (zeros when there is none).
pub const ENCODED_BYTES: usize = 8 + (NAME_BYTES + KEY_BYTES) + 1 + (NAME_BYTES + KEY_BYTES);

/// A ticket shorter than this is no ticket of ours.
const OVERHEAD_BYTES: usize = NAME_BYTES + NONCE_LEN + 16;

/// One named key.
#[derive(Clone, Copy, PartialEq, Eq)]
struct NamedKey {
    name: [u8; NAME_BYTES],
    key: [u8; KEY_BYTES],
}

impl fmt::Debug for NamedKey {
    /// The name only: key bytes never reach a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key {}", hex(&self.name))
    }
}

/// The ticket keys of a process: what a live upgrade hands on.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TicketKeys {
    current: NamedKey,
    previous: Option<NamedKey>,
    /// When `current` took over (unix seconds).
    rotated_unix_s: u64,
}

impl fmt::Debug for TicketKeys {
    /// Names only: key bytes never reach a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TicketKeys")
            .field("current", &self.current)
            .field("previous", &self.previous)
            .field("rotated_unix_s", &self.rotated_unix_s)
            .finish()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_unix_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn random_key(rng: &SystemRandom) -> Result<NamedKey, String> {
    let mut k = NamedKey {
        name: [0; NAME_BYTES],
        key: [0; KEY_BYTES],
    };
    rng.fill(&mut k.name)
        .and_then(|()| rng.fill(&mut k.key))
        .map_err(|_| "TLS ticket keys: no randomness from the system".to_string())?;
    Ok(k)
}

/// Malformed key bytes in a hand-over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl TicketKeys {
    /// Fresh keys (a process started fresh).
    pub fn generate() -> Result<TicketKeys, String> {
        Ok(TicketKeys {
            current: random_key(&SystemRandom::new())?,
            previous: None,
            rotated_unix_s: now_unix_s(),
        })
    }

    /// Appends [`ENCODED_BYTES`] bytes, little-endian.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.rotated_unix_s.to_le_bytes());
        out.extend_from_slice(&self.current.name);
        out.extend_from_slice(&self.current.key);
        let previous = self.previous.unwrap_or(NamedKey {
            name: [0; NAME_BYTES],
            key: [0; KEY_BYTES],
        });
        out.push(u8::from(self.previous.is_some()));
        out.extend_from_slice(&previous.name);
        out.extend_from_slice(&previous.key);
    }

    /// Reads what [`TicketKeys::encode`] wrote (exactly [`ENCODED_BYTES`]).
    pub fn decode(bytes: &[u8]) -> Result<TicketKeys, Malformed> {
        if bytes.len() != ENCODED_BYTES {
            return Err(Malformed("ticket keys of the wrong length"));
        }
        let named = |b: &[u8]| NamedKey {
            name: b[..NAME_BYTES].try_into().expect("16 bytes"),
            key: b[NAME_BYTES..].try_into().expect("32 bytes"),
        };
        let one = NAME_BYTES + KEY_BYTES;
        let previous = match bytes[8 + one] {
            0 => None,
            1 => Some(named(&bytes[9 + one..])),
            _ => return Err(Malformed("ticket keys: bad previous-key flag")),
        };
        Ok(TicketKeys {
            rotated_unix_s: u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")),
            current: named(&bytes[8..8 + one]),
            previous,
        })
    }
}

/// The sealing state: the keys and their AEAD keys.
struct State {
    keys: TicketKeys,
    current: LessSafeKey,
    previous: Option<LessSafeKey>,
}

impl State {
    fn new(keys: TicketKeys) -> State {
        let aead = |k: &NamedKey| {
            LessSafeKey::new(
                UnboundKey::new(&CHACHA20_POLY1305, &k.key).expect("a 32-byte ChaCha20 key"),
            )
        };
        State {
            current: aead(&keys.current),
            previous: keys.previous.as_ref().map(aead),
            keys,
        }
    }
}

/// rustls' [`ProducesTickets`] over [`TicketKeys`]: shared by every shard.
pub struct Ticketer {
    state: RwLock<State>,
    rng: SystemRandom,
}

impl fmt::Debug for Ticketer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticketer")
            .field("keys", &self.keys())
            .finish()
    }
}

impl Ticketer {
    /// Seals and opens with `keys` (fresh, or a predecessor's).
    pub fn new(keys: TicketKeys) -> Ticketer {
        Ticketer {
            state: RwLock::new(State::new(keys)),
            rng: SystemRandom::new(),
        }
    }

    /// The keys now (for a successor): rotated first if due.
    pub fn keys(&self) -> TicketKeys {
        self.rotate_if_due();
        self.state.read().unwrap_or_else(|p| p.into_inner()).keys
    }

    /// A key older than [`ROTATE_S`] makes room for a new one and only
    /// opens from now on; the one before it is dropped.
    fn rotate_if_due(&self) {
        let now = now_unix_s();
        let due = |s: &State| now >= s.keys.rotated_unix_s.saturating_add(ROTATE_S);
        if !due(&self.state.read().unwrap_or_else(|p| p.into_inner())) {
            return;
        }
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        if !due(&state) {
            return; // another shard rotated meanwhile
        }
        match random_key(&self.rng) {
            Ok(next) => {
                *state = State::new(TicketKeys {
                    current: next,
                    previous: Some(state.keys.current),
                    rotated_unix_s: now,
                });
            }
            // Keep sealing with the old key rather than fail handshakes.
            Err(e) => log::error!("{e}; keeping the current ticket key"),
        }
    }
}

impl ProducesTickets for Ticketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        ROTATE_S as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.rotate_if_due();
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        let name = state.keys.current.name;
        let mut out = Vec::with_capacity(OVERHEAD_BYTES + plain.len());
        out.extend_from_slice(&name);
        out.extend_from_slice(&nonce);
        let mut sealed = plain.to_vec();
        state
            .current
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name),
                &mut sealed,
            )
            .ok()?;
        out.extend_from_slice(&sealed);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < OVERHEAD_BYTES {
            return None;
        }
        let (name, rest) = cipher.split_at(NAME_BYTES);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        let key = if name == state.keys.current.name {
            &state.current
        } else if state.keys.previous.is_some_and(|p| p.name == name) {
            state.previous.as_ref()?
        } else {
            return None;
        };
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let plain = key.open_in_place(nonce, Aad::from(name), &mut buf).ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_bad_bytes_are_refused() {
        let mut keys = TicketKeys::generate().unwrap();
        for previous in [None, Some(TicketKeys::generate().unwrap().current)] {
            keys.previous = previous;
            let mut bytes = Vec::new();
            keys.encode(&mut bytes);
            assert_eq!(bytes.len(), ENCODED_BYTES);
            assert_eq!(TicketKeys::decode(&bytes), Ok(keys));
            assert!(TicketKeys::decode(&bytes[1..]).is_err());
            bytes[8 + NAME_BYTES + KEY_BYTES] = 2;
            assert!(TicketKeys::decode(&bytes).is_err());
        }
        // Debug shows names, never key bytes.
        let text = format!("{keys:?}");
        assert!(text.contains(&hex(&keys.current.name)));
        assert!(!text.contains(&hex(&keys.current.key)));
    }

    #[test]
    fn a_successor_with_the_keys_opens_the_tickets_others_do_not() {
        let keys = TicketKeys::generate().unwrap();
        let old = Ticketer::new(keys);
        let ticket = old.encrypt(b"resumption state").unwrap();
        assert_ne!(&ticket[OVERHEAD_BYTES - 16..], b"resumption state");
        let successor = Ticketer::new(old.keys());
        assert_eq!(successor.decrypt(&ticket).unwrap(), b"resumption state");
        let stranger = Ticketer::new(TicketKeys::generate().unwrap());
        assert_eq!(stranger.decrypt(&ticket), None);
        // Any flipped byte (name, nonce, body, tag) is refused.
        for i in [0, NAME_BYTES, NAME_BYTES + NONCE_LEN, ticket.len() - 1] {
            let mut bad = ticket.clone();
            bad[i] ^= 1;
            assert_eq!(successor.decrypt(&bad), None, "byte {i}");
        }
        assert_eq!(successor.decrypt(&ticket[..OVERHEAD_BYTES - 1]), None);
    }

    #[test]
    fn a_rotated_key_still_opens_for_one_period() {
        let mut keys = TicketKeys::generate().unwrap();
        let fresh = Ticketer::new(keys);
        let ticket = fresh.encrypt(b"state").unwrap();
        // The same keys, taken over long ago: due for rotation.
        keys.rotated_unix_s = now_unix_s() - ROTATE_S - 1;
        let t = Ticketer::new(keys);
        let newer = t.encrypt(b"later").unwrap();
        let now = t.keys();
        assert_ne!(now.current, keys.current);
        assert_eq!(now.previous, Some(keys.current));
        assert_eq!(t.decrypt(&ticket).unwrap(), b"state");
        assert_eq!(t.decrypt(&newer).unwrap(), b"later");
        // Another rotation drops the oldest key.
        let mut later = now;
        later.rotated_unix_s = now_unix_s() - ROTATE_S - 1;
        let t = Ticketer::new(later);
        t.keys();
        assert_eq!(t.decrypt(&ticket), None);
        assert_eq!(t.decrypt(&newer).unwrap(), b"later");
    }
}
