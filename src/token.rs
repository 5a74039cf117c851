//! Login tokens: `v1.<user>.<expiry>.<mac>` or `v2.<user>.<device>.<expiry>.<mac>`,
//! signed with HMAC-SHA256.
//!
//! A token is plain ASCII so it can travel in a command line, an environment
//! variable or a config file:
//!
//! ```text
//! v1.<user id, decimal u64>.<expiry, unix seconds, decimal>.<base64url-no-pad(HMAC-SHA256(secret, "v1.<user>.<expiry>"))>
//! v2.<user id, decimal u64>.<device, decimal u32>.<expiry>.<base64url-no-pad(HMAC-SHA256(secret, "v2.<user>.<device>.<expiry>"))>
//! ```
//!
//! A v2 token names one of the user's devices; a v1 token is device 0, so
//! tokens minted before devices existed keep working unchanged.
//!
//! Every field has exactly one spelling: decimals carry no sign, no
//! whitespace and no leading zeros, and the MAC must be the canonical 43
//! character encoding of 32 bytes. So a token cannot be altered into a
//! different string that still verifies, and [`verify`] can compare MACs
//! without normalising first. User id 0 is reserved ("no user") and never
//! valid.
//!
//! [`verify`] checks the shape, then the MAC (in constant time), then the
//! expiry. A forged token therefore reports [`TokenError::BadSignature`] even
//! when it is also expired, and only a genuine token can learn that it expired.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The version tag of a token without a device (device 0).
const TOKEN_VERSION: &[u8] = b"v1";

/// The version tag of a token that names a device.
const TOKEN_VERSION_DEVICE: &[u8] = b"v2";

/// Digits in `u64::MAX` (18446744073709551615).
const U64_DIGITS_MAX: usize = 20;

/// Digits in `u32::MAX` (4294967295), the largest device id.
const U32_DIGITS_MAX: usize = 10;

/// Bytes of an HMAC-SHA256 tag.
const MAC_BYTES: usize = 32;

/// Characters of the unpadded base64 encoding of [`MAC_BYTES`] bytes.
const MAC_B64_CHARS: usize = 43;

/// Longest well-formed token in bytes: `v2`, two 20-digit decimals, a
/// 10-digit device, the MAC and four dots. Anything longer is rejected
/// before it is split.
pub const TOKEN_BYTES_MAX: usize =
    TOKEN_VERSION_DEVICE.len() + 2 * U64_DIGITS_MAX + U32_DIGITS_MAX + MAC_B64_CHARS + 4;

// The base64 length follows from the tag length: 4 characters per 3 bytes,
// rounded up, without padding.
const _: () = assert!(MAC_B64_CHARS == (MAC_BYTES * 4).div_ceil(3));
const _: () = assert!(TOKEN_BYTES_MAX == 99);

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// The token has neither the `v1.<user>.<expiry>.<mac>` nor the
    /// `v2.<user>.<device>.<expiry>.<mac>` shape, a number is not in
    /// canonical form or out of range, or the user id is the reserved 0.
    Malformed,
    /// The shape is right but the MAC does not match: wrong secret or a
    /// tampered field.
    BadSignature,
    /// The token is genuine but its expiry is at or before the current time.
    Expired,
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenError::Malformed => "malformed token",
            TokenError::BadSignature => "bad token signature",
            TokenError::Expired => "token expired",
        })
    }
}

impl std::error::Error for TokenError {}

/// Mints a token for `user`, valid while the clock is before `expires_unix_s`.
///
/// # Panics
///
/// If `user` is 0: that id is reserved and [`verify`] would refuse the token,
/// so minting one is a bug in the caller, which must validate ids it takes
/// from outside.
pub fn mint(secret: &[u8], user: u64, expires_unix_s: u64) -> String {
    assert!(user != 0, "user id 0 is reserved and cannot hold a token");
    sign(
        secret,
        format!("v1.{user}.{expires_unix_s}"),
        user,
        0,
        expires_unix_s,
    )
}

/// Mints a v2 token for `device` of `user`, valid while the clock is before
/// `expires_unix_s`. Device 0 is the device of v1 tokens: both spellings
/// log in as the same device.
///
/// # Panics
///
/// If `user` is 0, as [`mint`].
pub fn mint_device(secret: &[u8], user: u64, device: u32, expires_unix_s: u64) -> String {
    assert!(user != 0, "user id 0 is reserved and cannot hold a token");
    let signed = format!("v2.{user}.{device}.{expires_unix_s}");
    sign(secret, signed, user, device, expires_unix_s)
}

/// Appends the MAC of `signed` to it; `user`, `device` and `expires_unix_s`
/// are what it says, for the read-back check.
fn sign(secret: &[u8], signed: String, user: u64, device: u32, expires_unix_s: u64) -> String {
    let tag = mac(secret, signed.as_bytes()).finalize().into_bytes();
    let mut token = signed;
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(tag, &mut token);
    debug_assert!(token.len() <= TOKEN_BYTES_MAX);
    // Read-back check: what we mint, we accept (until it expires).
    debug_assert_eq!(
        verify_device(secret, token.as_bytes(), expires_unix_s.saturating_sub(1)),
        if expires_unix_s == 0 {
            Err(TokenError::Expired)
        } else {
            Ok(Claims { user, device })
        }
    );
    token
}

/// Who a verified token proves: a user and one of its devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claims {
    /// The user id, never 0.
    pub user: u64,
    /// The device: 0 for a v1 token, as named for a v2 token.
    pub device: u32,
}

/// Verifies `token` against `secret` at time `now_unix_s` and returns its
/// user id (whatever device it names); see [`verify_device`].
pub fn verify(secret: &[u8], token: &[u8], now_unix_s: u64) -> Result<u64, TokenError> {
    verify_device(secret, token, now_unix_s).map(|c| c.user)
}

/// Verifies a v1 or v2 `token` against `secret` at time `now_unix_s` and
/// returns its user and device (0 for v1).
///
/// The MAC is compared in constant time (hmac's `verify_slice`). Only then is
/// the expiry checked: the token is expired when `now_unix_s >= expiry`.
pub fn verify_device(secret: &[u8], token: &[u8], now_unix_s: u64) -> Result<Claims, TokenError> {
    if token.len() > TOKEN_BYTES_MAX {
        return Err(TokenError::Malformed);
    }
    // The signed part is everything before the last dot; the MAC contains no
    // dot (base64url's alphabet is A-Z a-z 0-9 - _).
    let dot_last = token
        .iter()
        .rposition(|&b| b == b'.')
        .ok_or(TokenError::Malformed)?;
    let (signed, mac_b64) = (&token[..dot_last], &token[dot_last + 1..]);

    let mut fields = signed.split(|&b| b == b'.');
    let version = fields.next().ok_or(TokenError::Malformed)?;
    let user = fields.next().ok_or(TokenError::Malformed)?;
    let device = match version {
        v if v == TOKEN_VERSION => 0,
        v if v == TOKEN_VERSION_DEVICE => {
            let device = fields.next().ok_or(TokenError::Malformed)?;
            let device = parse_decimal(device).ok_or(TokenError::Malformed)?;
            u32::try_from(device).map_err(|_| TokenError::Malformed)?
        }
        _ => return Err(TokenError::Malformed),
    };
    let (Some(expiry), None) = (fields.next(), fields.next()) else {
        return Err(TokenError::Malformed);
    };
    let user = parse_decimal(user).ok_or(TokenError::Malformed)?;
    let expiry = parse_decimal(expiry).ok_or(TokenError::Malformed)?;
    if user == 0 {
        return Err(TokenError::Malformed);
    }

    if mac_b64.len() != MAC_B64_CHARS {
        return Err(TokenError::Malformed);
    }
    // The engine refuses padding and non-zero trailing bits, so each tag has
    // exactly one accepted spelling.
    let mut tag = [0u8; MAC_BYTES];
    match URL_SAFE_NO_PAD.decode_slice(mac_b64, &mut tag) {
        Ok(MAC_BYTES) => {}
        _ => return Err(TokenError::Malformed),
    }
    mac(secret, signed)
        .verify_slice(&tag)
        .map_err(|_| TokenError::BadSignature)?;

    if now_unix_s >= expiry {
        return Err(TokenError::Expired);
    }
    Ok(Claims { user, device })
}

/// The current wall-clock time in whole seconds since the Unix epoch (0 if
/// the clock is set before 1970).
pub fn now_unix_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Parses a token lifetime: a positive whole number followed by an optional
/// unit, `s` (seconds, also the default), `m` (minutes), `h` (hours) or `d`
/// (days). Examples: `"90s"`, `"15m"`, `"24h"`, `"7d"`, `"3600"`.
///
/// Zero, signs, fractions, whitespace and overflowing values are refused with
/// a message naming the input.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let (digits, unit_s) = match s.as_bytes().last() {
        Some(b's') => (&s[..s.len() - 1], 1),
        Some(b'm') => (&s[..s.len() - 1], 60),
        Some(b'h') => (&s[..s.len() - 1], 60 * 60),
        Some(b'd') => (&s[..s.len() - 1], 24 * 60 * 60),
        _ => (s, 1),
    };
    let bad = |why: &str| {
        format!("invalid TTL {s:?}: {why} (expected e.g. 90s, 15m, 24h, 7d or plain seconds)")
    };
    if digits.is_empty() {
        return Err(bad("missing number"));
    }
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("not a whole number with an optional s/m/h/d unit"));
    }
    let count: u64 = digits.parse().map_err(|_| bad("too large"))?;
    if count == 0 {
        return Err(bad("must be positive"));
    }
    let secs = count.checked_mul(unit_s).ok_or_else(|| bad("too large"))?;
    Ok(Duration::from_secs(secs))
}

/// A keyed HMAC-SHA256 state that has absorbed `msg`.
fn mac(secret: &[u8], msg: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length (long ones are hashed first), so this
    // cannot fail.
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(msg);
    mac
}

/// Parses a canonical unsigned decimal: ASCII digits only, no sign, no
/// leading zero unless the number is exactly `0`, and within `u64`.
fn parse_decimal(field: &[u8]) -> Option<u64> {
    if field.is_empty() || field.len() > U64_DIGITS_MAX {
        return None;
    }
    if field.len() > 1 && field[0] == b'0' {
        return None;
    }
    field.iter().try_fold(0u64, |acc, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"test-secret-0123456789abcdef";
    const NOW: u64 = 1_700_000_000;

    fn token_for(user: u64, expiry: u64) -> String {
        mint(SECRET, user, expiry)
    }

    /// Re-signs arbitrary signed text, to build tokens that are correctly
    /// signed but malformed.
    fn sign_raw(signed: &str) -> String {
        let tag = mac(SECRET, signed.as_bytes()).finalize().into_bytes();
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag))
    }

    #[test]
    fn round_trip() {
        for user in [1, 42, u64::MAX] {
            for expiry in [NOW + 1, NOW + 86_400, u64::MAX] {
                let t = token_for(user, expiry);
                assert!(t.starts_with(&format!("v1.{user}.{expiry}.")), "{t}");
                assert!(t.len() <= TOKEN_BYTES_MAX);
                assert_eq!(verify(SECRET, t.as_bytes(), NOW), Ok(user));
            }
        }
    }

    #[test]
    fn longest_token_fits_the_bound() {
        assert_eq!(token_for(u64::MAX, u64::MAX).len(), 88);
        let t = mint_device(SECRET, u64::MAX, u32::MAX, u64::MAX);
        assert_eq!(t.len(), TOKEN_BYTES_MAX);
    }

    #[test]
    fn device_tokens_round_trip_and_v1_is_device_0() {
        for (user, device) in [(1, 0), (42, 1), (42, 3), (u64::MAX, u32::MAX)] {
            let t = mint_device(SECRET, user, device, NOW + 60);
            assert!(t.starts_with(&format!("v2.{user}.{device}.")), "{t}");
            assert_eq!(
                verify_device(SECRET, t.as_bytes(), NOW),
                Ok(Claims { user, device })
            );
            assert_eq!(verify(SECRET, t.as_bytes(), NOW), Ok(user));
        }
        let v1 = token_for(42, NOW + 60);
        assert_eq!(
            verify_device(SECRET, v1.as_bytes(), NOW),
            Ok(Claims {
                user: 42,
                device: 0
            })
        );
        assert_eq!(
            mint_device(SECRET, 42, 3, NOW + 60),
            sign_raw(&format!("v2.42.3.{}", NOW + 60))
        );
    }

    /// The example in docs/PROTOCOL.md, "Login tokens".
    #[test]
    fn protocol_md_device_token_example() {
        let t = "v2.42.2.1767225600.uir04sYcxM-AUk2xPAf6QpN52VZ-7_ixjnxPfMSKTGU";
        assert_eq!(mint_device(b"secret", 42, 2, 1_767_225_600), t);
        assert_eq!(
            verify_device(b"secret", t.as_bytes(), 1_767_225_599),
            Ok(Claims {
                user: 42,
                device: 2
            })
        );
    }

    #[test]
    fn device_token_fields_are_signed() {
        let t = mint_device(SECRET, 42, 3, NOW + 60);
        let mac_part = t.rsplit('.').next().unwrap();
        for forged in [
            format!("v2.42.4.{}.{mac_part}", NOW + 60),
            format!("v2.43.3.{}.{mac_part}", NOW + 60),
            // The v1 spelling of another claim under the v2 MAC.
            format!("v1.42.{}.{mac_part}", NOW + 60),
        ] {
            assert_eq!(
                verify_device(SECRET, forged.as_bytes(), NOW),
                Err(TokenError::BadSignature),
                "{forged}"
            );
        }
        assert_eq!(
            verify_device(SECRET, t.as_bytes(), NOW + 60),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn device_token_shapes_are_canonical() {
        let exp = NOW + 60;
        for signed in [
            format!("v2.42.{exp}"),
            format!("v2.42.03.{exp}"),
            format!("v2.42.+3.{exp}"),
            format!("v2.42..{exp}"),
            format!("v2.42.3.{exp}.0"),
            format!("v2.0.3.{exp}"),
            // One past u32::MAX.
            format!("v2.42.4294967296.{exp}"),
            format!("v3.42.3.{exp}"),
        ] {
            let t = sign_raw(&signed);
            assert_eq!(
                verify_device(SECRET, t.as_bytes(), NOW),
                Err(TokenError::Malformed),
                "{t}"
            );
        }
    }

    #[test]
    fn mint_is_deterministic_and_sign_raw_matches() {
        assert_eq!(token_for(7, NOW + 5), token_for(7, NOW + 5));
        assert_eq!(
            token_for(7, NOW + 5),
            sign_raw(&format!("v1.7.{}", NOW + 5))
        );
    }

    #[test]
    #[should_panic(expected = "reserved")]
    fn mint_refuses_user_zero() {
        let _ = mint(SECRET, 0, NOW + 1);
    }

    #[test]
    fn wrong_secret() {
        let t = token_for(42, NOW + 60);
        assert_eq!(
            verify(b"another-secret", t.as_bytes(), NOW),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            verify(b"", t.as_bytes(), NOW),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn empty_secret_still_signs() {
        let t = mint(b"", 3, NOW + 1);
        assert_eq!(verify(b"", t.as_bytes(), NOW), Ok(3));
        assert_eq!(
            verify(SECRET, t.as_bytes(), NOW),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn tampered_user_expiry_or_mac() {
        let t = token_for(42, NOW + 60);
        let mac_part = t.rsplit('.').next().unwrap().to_string();

        let other_user = format!("v1.43.{}.{mac_part}", NOW + 60);
        assert_eq!(
            verify(SECRET, other_user.as_bytes(), NOW),
            Err(TokenError::BadSignature)
        );

        let later = format!("v1.42.{}.{mac_part}", NOW + 6000);
        assert_eq!(
            verify(SECRET, later.as_bytes(), NOW),
            Err(TokenError::BadSignature)
        );

        // Flip every character of the MAC in turn to another base64url
        // character that keeps the encoding canonical.
        for i in 0..MAC_B64_CHARS {
            let mut bytes = t.clone().into_bytes();
            let pos = t.len() - MAC_B64_CHARS + i;
            // The last character carries 4 data bits and 2 zero bits: 'A'
            // and 'Q' are both canonical; elsewhere any change will do.
            bytes[pos] = match (i == MAC_B64_CHARS - 1, bytes[pos]) {
                (true, b'A') => b'Q',
                (true, _) => b'A',
                (false, b'A') => b'B',
                (false, _) => b'A',
            };
            assert_eq!(
                verify(SECRET, &bytes, NOW),
                Err(TokenError::BadSignature),
                "position {i}"
            );
        }
    }

    #[test]
    fn expiry_boundary() {
        let t = token_for(9, NOW);
        assert_eq!(verify(SECRET, t.as_bytes(), NOW - 1), Ok(9));
        assert_eq!(verify(SECRET, t.as_bytes(), NOW), Err(TokenError::Expired));
        assert_eq!(
            verify(SECRET, t.as_bytes(), NOW + 1),
            Err(TokenError::Expired)
        );
        assert_eq!(
            verify(SECRET, t.as_bytes(), u64::MAX),
            Err(TokenError::Expired)
        );
        let t0 = token_for(9, 0);
        assert_eq!(verify(SECRET, t0.as_bytes(), 0), Err(TokenError::Expired));
    }

    #[test]
    fn forged_and_expired_reports_bad_signature() {
        let t = token_for(9, NOW - 10);
        assert_eq!(
            verify(b"wrong", t.as_bytes(), NOW),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn malformed_shapes() {
        let good = token_for(42, NOW + 60);
        let mac_part = good.rsplit('.').next().unwrap().to_string();
        let cases: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b".".to_vec(),
            b"...".to_vec(),
            b"v1".to_vec(),
            b"v1.42".to_vec(),
            format!("v1.42.{}", NOW + 60).into_bytes(),
            format!("v2.42.{}.{mac_part}", NOW + 60).into_bytes(),
            format!("V1.42.{}.{mac_part}", NOW + 60).into_bytes(),
            format!(".42.{}.{mac_part}", NOW + 60).into_bytes(),
            format!("v1..{}.{mac_part}", NOW + 60).into_bytes(),
            format!("v1.42..{mac_part}").into_bytes(),
            format!("v1.42.{}.", NOW + 60).into_bytes(),
            // Extra fields, before or after.
            format!("v1.42.{}.7.{mac_part}", NOW + 60).into_bytes(),
            format!("{good}.x").into_bytes(),
            format!("x.{good}").into_bytes(),
            // Whitespace anywhere.
            format!(" {good}").into_bytes(),
            format!("{good} ").into_bytes(),
            format!("{good}\n").into_bytes(),
            format!("v1. 42.{}.{mac_part}", NOW + 60).into_bytes(),
            format!("v1.42 .{}.{mac_part}", NOW + 60).into_bytes(),
            // MAC of the wrong length, padded, or outside the alphabet.
            format!("{good}A").into_bytes(),
            good.as_bytes()[..good.len() - 1].to_vec(),
            format!("{good}=").into_bytes(),
            format!(
                "v1.42.{}.{}",
                NOW + 60,
                &mac_part.replace(|_: char| true, "+")
            )
            .into_bytes(),
            // Far too long.
            vec![b'v'; TOKEN_BYTES_MAX + 1],
            // Not UTF-8.
            vec![0xff; 40],
        ];
        for case in cases {
            assert_eq!(
                verify(SECRET, &case, NOW),
                Err(TokenError::Malformed),
                "{:?}",
                String::from_utf8_lossy(&case)
            );
        }
    }

    #[test]
    fn non_canonical_numbers_are_malformed_even_when_signed() {
        let exp = NOW + 60;
        for signed in [
            format!("v1.0.{exp}"),
            format!("v1.00.{exp}"),
            format!("v1.042.{exp}"),
            format!("v1.+42.{exp}"),
            format!("v1.-42.{exp}"),
            format!("v1.42.+{exp}"),
            format!("v1.42.0{exp}"),
            format!("v1.4_2.{exp}"),
            format!("v1.0x2a.{exp}"),
            format!("v1.42.{exp}.0"),
            // One past u64::MAX, and 21 digits.
            format!("v1.18446744073709551616.{exp}"),
            format!("v1.100000000000000000000.{exp}"),
            "v1.42.18446744073709551616".to_string(),
        ] {
            let t = sign_raw(&signed);
            assert_eq!(
                verify(SECRET, t.as_bytes(), NOW),
                Err(TokenError::Malformed),
                "{t}"
            );
        }
    }

    #[test]
    fn non_canonical_mac_encoding_is_malformed() {
        let good = token_for(42, NOW + 60);
        let last = *good.as_bytes().last().unwrap();
        // Set one of the two unused low bits of the final character.
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let idx = alphabet.iter().position(|&c| c == last).unwrap();
        assert_eq!(
            idx & 0b11,
            0,
            "canonical encodings leave the low bits clear"
        );
        let mut bytes = good.into_bytes();
        *bytes.last_mut().unwrap() = alphabet[idx | 1];
        assert_eq!(verify(SECRET, &bytes, NOW), Err(TokenError::Malformed));
    }

    #[test]
    fn parse_decimal_edges() {
        assert_eq!(parse_decimal(b"0"), Some(0));
        assert_eq!(parse_decimal(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_decimal(b"18446744073709551616"), None);
        assert_eq!(parse_decimal(b"00"), None);
        assert_eq!(parse_decimal(b""), None);
        assert_eq!(parse_decimal(b"1a"), None);
    }

    #[test]
    fn ttl_units() {
        assert_eq!(parse_ttl("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("15m"), Ok(Duration::from_secs(15 * 60)));
        assert_eq!(parse_ttl("24h"), Ok(Duration::from_secs(24 * 3600)));
        assert_eq!(parse_ttl("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_ttl("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(
            parse_ttl("18446744073709551615"),
            Ok(Duration::from_secs(u64::MAX))
        );
    }

    #[test]
    fn ttl_rejects() {
        for bad in [
            "",
            "s",
            "m",
            "0",
            "0s",
            "0d",
            "-5m",
            "+5m",
            "1.5h",
            "5 m",
            " 5m",
            "5m ",
            "5ms",
            "5M",
            "5w",
            "h5",
            "1e3",
            "18446744073709551616",
            "213503982334602d",
        ] {
            let err = parse_ttl(bad).expect_err(bad);
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }
}
