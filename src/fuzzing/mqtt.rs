//! The MQTT codec and mapping oracle ([`mqtt`]).

use crate::mqtt::bridge::{self, Ctx, Inflight, Mode, Step};
use crate::mqtt::codec::{self, Packet, Version};

/// The MQTT codec and its mapping: decodes `data` as a client's byte
/// stream (the first byte picks the limit), runs every packet through
/// [`bridge::on_packet`] as the server does.
///
/// Checks: never panics; a decoded packet re-encodes to bytes that decode
/// to the same packet; every prefix of a packet is incomplete (never an
/// error: errors come from the bytes, not from where they were cut, and
/// the remaining length is refused as soon as it is known to be too
/// large); the Tern frames the mapping makes decode under the server's
/// limits.
pub fn mqtt(data: &[u8]) {
    let Some((&pick, stream)) = data.split_first() else {
        return;
    };
    let packet_bytes_max = if pick & 1 == 0 { 65536 } else { 64 };
    let ctx = Ctx {
        user: 7,
        device: 0,
        body_bytes_max: packet_bytes_max / 2,
        packet_bytes_max,
        idle_timeout_ms: 300_000,
    };
    let limits = crate::proto::Limits {
        frame_bytes_max: 65536,
        body_bytes_max: 65000,
    };
    let mut mode = Mode::accepted();
    let mut inflight = Inflight::default();
    let (mut tern, mut out) = (Vec::new(), Vec::new());
    let mut rest = stream;
    // Every packet takes at least 2 bytes: bounded by the input.
    for _ in 0..=stream.len() / 2 {
        let version = mode.version();
        let outcome = codec::decode(rest, version, packet_bytes_max);
        let (packet, used) = match outcome {
            Ok(Some(p)) => p,
            Ok(None) => return,
            Err(e) => {
                assert!(!e.to_string().is_empty());
                bridge::refused(mode, e, &mut out);
                return;
            }
        };
        for n in 0..used.min(64) {
            assert_eq!(
                codec::decode(&rest[..n], version, packet_bytes_max),
                Ok(None)
            );
        }
        check_round_trip(&packet, version);
        tern.clear();
        let step = bridge::on_packet(&mut mode, &mut inflight, packet, &ctx, &mut tern, &mut out);
        let mut at = 0;
        while at < tern.len() {
            match crate::proto::decode(&tern[at..], &limits) {
                Ok(Some((_, n))) => at += n,
                other => panic!("the mapping made a bad Tern frame: {other:?}"),
            }
        }
        if step == Step::Close {
            return;
        }
        rest = &rest[used..];
    }
}

fn check_round_trip(packet: &Packet<'_>, version: Option<Version>) {
    let v = match packet {
        Packet::Connect(c) => c.version,
        _ => version.unwrap_or(Version::V311),
    };
    let mut bytes = Vec::new();
    codec::encode(packet, v, &mut bytes);
    let (back, used) = codec::decode(&bytes, Some(v), usize::MAX)
        .expect("a re-encoded packet decodes")
        .expect("a re-encoded packet is complete");
    assert_eq!(used, bytes.len());
    assert_eq!(&back, packet);
}
