//! What a push POST carries: the JSON body and its signature. Pure, so the
//! documented example (docs/OPERATIONS.md) is checked here byte for byte.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::Notice;

/// The header carrying the body's signature: `sha256=` and the lowercase
/// hex HMAC-SHA256 of the exact body bytes under `push_secret`.
pub const SIGNATURE_HEADER: &str = "X-Tern-Signature";

/// The POST body: `{"sent_ms":…,"notices":[{"user":…,"device":…,
/// "waiting":…,"oldest_ms":…},…]}`, compact, numbers only (nothing to
/// escape). `sent_ms` (Unix ms of the attempt) lets the gateway refuse
/// replays of an old signed body.
pub fn body_json(sent_ms: u64, notices: &[Notice]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(32 + notices.len() * 80);
    // `write!` to a String cannot fail.
    let _ = write!(out, "{{\"sent_ms\":{sent_ms},\"notices\":[");
    for (i, n) in notices.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            "{{\"user\":{},\"device\":{},\"waiting\":{},\"oldest_ms\":{}}}",
            n.user, n.device, n.waiting, n.oldest_ms
        );
    }
    out.push_str("]}");
    out
}

/// The [`SIGNATURE_HEADER`] value for `body` under `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(body);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in mac.finalize().into_bytes() {
        out.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        out.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of docs/OPERATIONS.md, "Push for offline devices".
    #[test]
    fn documented_example() {
        let notices = [
            Notice {
                user: 42,
                device: 0,
                waiting: 3,
                oldest_ms: 1_765_040_000_000,
            },
            Notice {
                user: 7,
                device: 0,
                waiting: 1,
                oldest_ms: 1_765_040_005_000,
            },
        ];
        let body = body_json(1_765_040_010_000, &notices);
        assert_eq!(
            body,
            "{\"sent_ms\":1765040010000,\"notices\":[\
             {\"user\":42,\"device\":0,\"waiting\":3,\"oldest_ms\":1765040000000},\
             {\"user\":7,\"device\":0,\"waiting\":1,\"oldest_ms\":1765040005000}]}"
        );
        assert_eq!(
            signature(b"push-secret-0123456789", body.as_bytes()),
            DOC_SIGNATURE,
        );
    }

    /// The documented signature, computed independently with
    /// `openssl dgst -sha256 -hmac push-secret-0123456789`.
    const DOC_SIGNATURE: &str =
        "sha256=ea7b173c560430ea2f79e9eccc8d1165b30c71369f083a2f8c77bd577114f0ae";

    #[test]
    fn empty_batch_is_valid_json_shape() {
        assert_eq!(body_json(5, &[]), "{\"sent_ms\":5,\"notices\":[]}");
    }

    /// RFC 4231 test case 2: the hex encoding is the standard one.
    #[test]
    fn rfc4231_case_2() {
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
