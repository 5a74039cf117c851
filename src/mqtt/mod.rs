//! MQTT 3.1.1 and 5.0 on the `mqtt_listen` port (docs/MQTT.md): [`codec`]
//! decodes and encodes packets, [`bridge`] maps them onto the Tern frames
//! the session layer speaks and back. Both are pure: bytes and frames in,
//! bytes and frames out, no sockets.

pub mod bridge;
pub mod codec;
