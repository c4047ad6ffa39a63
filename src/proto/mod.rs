//! Protobuf types (prost) of `relaybox.proto`, the schema published for app developers.
//!
//! The structs are written with prost's derive rather than generated at build time, so that a
//! build needs no `protoc`; they follow `relaybox.proto` field for field, and the test below
//! checks the wire encoding against bytes worked out by hand from the schema.

/// Where a record came from (`relaybox.v1.Origin`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Origin {
    Unspecified = 0,
    Mqtt = 1,
    Serial = 2,
    Modbus = 3,
    Hub = 4,
}

/// `relaybox.v1.Header`
#[derive(Clone, PartialEq, prost::Message)]
pub struct Header {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `relaybox.v1.OutboxRecord`: one accepted message, as the outbox keeps it on flash.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OutboxRecord {
    #[prost(string, tag = "1")]
    pub topic: String,
    #[prost(bytes = "bytes", tag = "2")]
    pub payload: bytes::Bytes,
    #[prost(uint32, tag = "3")]
    pub qos: u32,
    #[prost(bool, tag = "4")]
    pub retain: bool,
    #[prost(uint64, tag = "5")]
    pub accepted_unix_ms: u64,
    #[prost(enumeration = "Origin", tag = "6")]
    pub origin: i32,
    #[prost(string, tag = "7")]
    pub source: String,
    #[prost(message, repeated, tag = "8")]
    pub headers: Vec<Header>,
}

/// `relaybox.v1.RelayStatus`: what a relay reports about itself to the hub.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RelayStatus {
    #[prost(string, tag = "1")]
    pub relay: String,
    #[prost(string, tag = "2")]
    pub version: String,
    #[prost(uint64, tag = "3")]
    pub unix_ms: u64,
    #[prost(uint64, tag = "4")]
    pub uptime_s: u64,
    #[prost(uint64, tag = "5")]
    pub clients_connected: u64,
    #[prost(uint64, tag = "6")]
    pub outbox_messages: u64,
    #[prost(uint64, tag = "7")]
    pub outbox_bytes: u64,
    #[prost(uint64, tag = "8")]
    pub outbox_oldest_age_s: u64,
    #[prost(uint64, tag = "9")]
    pub dropped_total: u64,
    #[prost(uint64, tag = "10")]
    pub flash_bytes_written: u64,
    #[prost(uint64, tag = "11")]
    pub rss_bytes: u64,
    #[prost(uint64, tag = "12")]
    pub messages_in: u64,
    #[prost(uint64, tag = "13")]
    pub messages_to_hub: u64,
    #[prost(uint64, tag = "14")]
    pub messages_from_hub: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn record_encoding_follows_the_schema() {
        let r = OutboxRecord {
            topic: "a/b".into(),
            payload: bytes::Bytes::from_static(b"\x01\x02"),
            qos: 1,
            retain: true,
            accepted_unix_ms: 300,
            origin: Origin::Mqtt as i32,
            source: "c".into(),
            headers: vec![Header {
                name: "k".into(),
                value: "v".into(),
            }],
        };
        let want: &[u8] = &[
            0x0a, 3, b'a', b'/', b'b', // 1: topic
            0x12, 2, 1, 2, // 2: payload
            0x18, 1, // 3: qos
            0x20, 1, // 4: retain
            0x28, 0xac, 0x02, // 5: accepted_unix_ms = 300
            0x30, 1, // 6: origin
            0x3a, 1, b'c', // 7: source
            0x42, 6, 0x0a, 1, b'k', 0x12, 1, b'v', // 8: headers
        ];
        assert_eq!(r.encode_to_vec(), want);
        assert_eq!(OutboxRecord::decode(want).unwrap(), r);
    }
}
