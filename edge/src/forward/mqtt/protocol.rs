//! One MQTT connection, MQTT 5 or 3.1.1, behind one small surface: the link in [`super`] only
//! sees [`Client`] (publish, subscribe, disconnect without blocking) and [`Connection::poll`],
//! which reduces each protocol's packets to the few [`Polled`] facts the link acts on.
//!
//! What MQTT 5 adds, and why it is the default (OASIS MQTT 5.0):
//! - a PUBACK carries a reason code; 0x80 and above is a refusal (section 3.4.2.1), e.g. 0x87 when
//!   the broker's ACL denies the topic. MQTT 3.1.1 has no way to refuse: Mosquitto drops the
//!   publish and PUBACKs it all the same (PITFALLS.md).
//! - the CONNACK may carry the broker's Maximum Packet Size (section 3.2.2.3.6); a bigger PUBLISH
//!   makes the broker close the connection, so the link must never send one.
//! - the CONNECT carries ours (section 3.1.2.11.4), so the broker never sends us a message bigger
//!   than we read (it drops it instead of cutting us off).
//! - a DISCONNECT from the broker carries a reason code, which goes into the link's error.

use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode as V5ConnectCode, DisconnectReasonCode, LastWill as V5LastWill, Packet as V5Packet, PubAckReason,
};
use rumqttc::v5::mqttbytes::QoS as V5QoS;
use rumqttc::Outgoing;

use super::MqttSettings;
use crate::config::MqttProtocol;

/// Largest message the edge reads (acks and, later, commands are small). Announced to an MQTT 5
/// broker, which then drops bigger messages for us instead of sending them.
pub const MAX_INCOMING: usize = 1 << 20;

/// A connection's client: queues requests for its event loop without blocking.
#[derive(Debug, Clone)]
pub enum Client {
    V5(rumqttc::v5::AsyncClient),
    V311(rumqttc::AsyncClient),
}

impl Client {
    /// Queues a QoS 1 publish; an error means the request queue is full (or the loop is gone).
    pub fn try_publish(&self, topic: String, payload: Vec<u8>, retain: bool) -> Result<(), String> {
        match self {
            Self::V5(c) => c.try_publish(topic, V5QoS::AtLeastOnce, retain, payload).map_err(|e| e.to_string()),
            Self::V311(c) => {
                c.try_publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload).map_err(|e| e.to_string())
            }
        }
    }

    /// Queues a QoS 1 subscription.
    pub fn try_subscribe(&self, filter: String) -> Result<(), String> {
        match self {
            Self::V5(c) => c.try_subscribe(filter, V5QoS::AtLeastOnce).map_err(|e| e.to_string()),
            Self::V311(c) => c.try_subscribe(filter, rumqttc::QoS::AtLeastOnce).map_err(|e| e.to_string()),
        }
    }

    /// Queues a DISCONNECT.
    pub fn try_disconnect(&self) {
        let _ = match self {
            Self::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Self::V311(c) => c.try_disconnect().map_err(|e| e.to_string()),
        };
    }
}

/// What the link acts on, whichever the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Polled {
    /// Connected. `max_packet_size`: the broker's limit from an MQTT 5 CONNACK, if it said one.
    ConnAck { session_present: bool, max_packet_size: Option<u32> },
    /// A PUBLISH with this packet id was written.
    Sent(u16),
    /// The broker answered a PUBLISH. `refusal`: an MQTT 5 reason code of 0x80 or more, in words.
    PubAck { pkid: u16, refusal: Option<String> },
    /// A message on a subscribed topic.
    Message { topic: String, payload: Vec<u8> },
    /// The broker says it is closing the connection (MQTT 5), and why.
    BrokerDisconnect(String),
    /// Our DISCONNECT was written.
    Disconnected,
    /// Anything else (pings, SUBACKs).
    Other,
}

/// A connection's event loop.
pub enum Connection {
    V5(Box<rumqttc::v5::EventLoop>),
    V311(Box<rumqttc::EventLoop>),
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::V5(_) => "Connection::V5",
            Self::V311(_) => "Connection::V311",
        })
    }
}

/// MQTT 5 session expiry (section 3.1.2.11.2): 0xFFFFFFFF never expires, like a 3.1.1 session
/// with `clean_session = false`: acks the cloud publishes while the device is away wait for it.
const SESSION_NEVER_EXPIRES: u32 = u32::MAX;

impl Connection {
    /// A new client and event loop for one connection (nothing is sent until the first poll).
    /// `capacity`: the client's request queue.
    pub fn open(s: &MqttSettings, capacity: usize) -> (Client, Connection) {
        let inflight = u16::try_from(s.max_inflight + 8).unwrap_or(u16::MAX);
        let will_topic = s.topics.status(&s.device_id);
        let will = br#"{"online":false}"#.to_vec();
        match s.protocol {
            MqttProtocol::V5 => {
                let mut o = s.endpoint.v5_options(s.client_id.clone());
                o.set_keep_alive(s.keep_alive)
                    .set_clean_start(false)
                    .set_session_expiry_interval(Some(SESSION_NEVER_EXPIRES))
                    .set_max_packet_size(Some(MAX_INCOMING as u32))
                    .set_outgoing_inflight_upper_limit(inflight)
                    .set_last_will(V5LastWill::new(will_topic, will, V5QoS::AtLeastOnce, true, None));
                let (client, eventloop) = rumqttc::v5::AsyncClient::new(o, capacity);
                (Client::V5(client), Connection::V5(Box::new(eventloop)))
            }
            MqttProtocol::V311 => {
                let mut o = s.endpoint.v311_options(s.client_id.clone());
                o.set_keep_alive(s.keep_alive)
                    .set_clean_session(false)
                    // 3.1.1 cannot tell the broker our limit: a bigger message ends the connection.
                    .set_max_packet_size(MAX_INCOMING, 256 << 20)
                    .set_inflight(inflight)
                    .set_last_will(rumqttc::LastWill::new(will_topic, will, rumqttc::QoS::AtLeastOnce, true));
                let (client, eventloop) = rumqttc::AsyncClient::new(o, capacity);
                (Client::V311(client), Connection::V311(Box::new(eventloop)))
            }
        }
    }

    /// The next event; an error (in words an operator can act on) ends the connection.
    pub async fn poll(&mut self, s: &MqttSettings) -> Result<Polled, String> {
        match self {
            Self::V5(eventloop) => match eventloop.poll().await {
                Ok(rumqttc::v5::Event::Incoming(packet)) => Ok(match packet {
                    V5Packet::ConnAck(ack) => Polled::ConnAck {
                        session_present: ack.session_present,
                        max_packet_size: ack.properties.and_then(|p| p.max_packet_size),
                    },
                    V5Packet::PubAck(ack) => {
                        Polled::PubAck { pkid: ack.pkid, refusal: puback_refusal(&ack.reason, s.ack_on_puback) }
                    }
                    V5Packet::Publish(p) => Polled::Message {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload.to_vec(),
                    },
                    V5Packet::Disconnect(d) => Polled::BrokerDisconnect(disconnect_reason(d.reason_code)),
                    _ => Polled::Other,
                }),
                Ok(rumqttc::v5::Event::Outgoing(out)) => Ok(outgoing(out)),
                Err(e) => Err(describe_v5(&e, s)),
            },
            Self::V311(eventloop) => match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(packet)) => Ok(match packet {
                    rumqttc::Packet::ConnAck(ack) => {
                        Polled::ConnAck { session_present: ack.session_present, max_packet_size: None }
                    }
                    rumqttc::Packet::PubAck(ack) => Polled::PubAck { pkid: ack.pkid, refusal: None },
                    rumqttc::Packet::Publish(p) => Polled::Message { topic: p.topic, payload: p.payload.to_vec() },
                    _ => Polled::Other,
                }),
                Ok(rumqttc::Event::Outgoing(out)) => Ok(outgoing(out)),
                Err(e) => Err(describe_v311(&e, s)),
            },
        }
    }
}

fn outgoing(out: Outgoing) -> Polled {
    match out {
        Outgoing::Publish(pkid) => Polled::Sent(pkid),
        Outgoing::Disconnect => Polled::Disconnected,
        _ => Polled::Other,
    }
}

/// An MQTT 5 PUBACK reason (section 3.4.2.1) that refuses the publish, in words; `None` for a
/// delivery: 0x00 success, and 0x10 no matching subscribers unless the PUBACK is the ack
/// (`ack_on_puback`): then nobody received the batch (no backhaul-cloud session subscribes), and
/// deleting it would lose it.
pub fn puback_refusal(reason: &PubAckReason, ack_on_puback: bool) -> Option<String> {
    let (code, what) = match reason {
        PubAckReason::Success => return None,
        PubAckReason::NoMatchingSubscribers if !ack_on_puback => return None,
        PubAckReason::NoMatchingSubscribers => (
            0x10,
            "no matching subscribers: no backhaul-cloud session subscribes to the batches topic, so with \
             ack = \"broker\" the batch would be deleted undelivered; check that backhaul-cloud runs (its \
             session must persist) and shares this topic_prefix",
        ),
        PubAckReason::UnspecifiedError => (0x80, "unspecified error"),
        PubAckReason::ImplementationSpecificError => (0x83, "implementation specific error"),
        PubAckReason::NotAuthorized => {
            (0x87, "not authorized: the broker's ACL does not let this device publish there")
        }
        PubAckReason::TopicNameInvalid => (0x90, "topic name invalid"),
        PubAckReason::PacketIdentifierInUse => (0x91, "packet identifier in use"),
        PubAckReason::QuotaExceeded => (0x97, "quota exceeded"),
        PubAckReason::PayloadFormatInvalid => (0x99, "payload format invalid"),
    };
    Some(format!("PUBACK reason code 0x{code:02X}, {what}"))
}

fn disconnect_reason(code: DisconnectReasonCode) -> String {
    let hint = match code {
        DisconnectReasonCode::PacketTooLarge => {
            ": a message was larger than the broker accepts (set transport.mqtt.max_message_bytes)"
        }
        DisconnectReasonCode::SessionTakenOver => ": another client connected with the same client id",
        DisconnectReasonCode::NotAuthorized => ": check the broker's ACL for this device",
        _ => "",
    };
    format!("the broker closed the connection ({code:?}){hint}")
}

/// Words for a refused connection, by code.
fn refused(what: &str, s: &MqttSettings, hint: &str) -> String {
    format!("the broker {}:{} refused the connection ({what}): {hint}", s.endpoint.host, s.endpoint.port)
}

const CHECK_CREDENTIALS: &str =
    "check transport.mqtt.username and the password (BACKHAUL_MQTT_PASSWORD or transport.mqtt.password_file)";

fn describe_v5_refusal(code: &V5ConnectCode, s: &MqttSettings) -> String {
    let hint = match code {
        V5ConnectCode::BadUserNamePassword | V5ConnectCode::NotAuthorized => CHECK_CREDENTIALS,
        V5ConnectCode::BadClientId | V5ConnectCode::ClientIdentifierNotValid => {
            "the broker does not accept the client id: set transport.mqtt.client_id"
        }
        V5ConnectCode::UnsupportedProtocolVersion | V5ConnectCode::RefusedProtocolVersion => {
            "the broker does not speak MQTT 5: set transport.mqtt.protocol = \"3.1.1\" (with ack = \"cloud\")"
        }
        V5ConnectCode::ServiceUnavailable | V5ConnectCode::ServerUnavailable | V5ConnectCode::ServerBusy => {
            "the broker is unavailable; retrying"
        }
        _ => "check the broker's configuration",
    };
    refused(&format!("{code:?}"), s, hint)
}

fn describe_v5(e: &rumqttc::v5::ConnectionError, s: &MqttSettings) -> String {
    use rumqttc::v5::{ConnectionError as E, StateError};
    match e {
        E::ConnectionRefused(code) | E::MqttState(StateError::ConnFail { reason: code }) => {
            describe_v5_refusal(code, s)
        }
        E::MqttState(StateError::OutgoingPacketTooLarge { pkt_size, max }) => format!(
            "a message of {pkt_size} bytes is over the broker's maximum packet size of {max} bytes; \
             the connection to {}:{} was closed",
            s.endpoint.host, s.endpoint.port
        ),
        E::Io(io) => explain(format!("cannot reach the broker {}:{}: {io}", s.endpoint.host, s.endpoint.port)),
        other => explain(format!("MQTT connection to {}:{}: {other}", s.endpoint.host, s.endpoint.port)),
    }
}

/// A TLS failure in words an operator can act on (a certificate not valid yet: the clock).
fn explain(message: String) -> String {
    backhaul_shared::tls::explain_handshake_error(&message)
}

fn describe_v311(e: &rumqttc::ConnectionError, s: &MqttSettings) -> String {
    match e {
        rumqttc::ConnectionError::ConnectionRefused(code) => {
            use rumqttc::ConnectReturnCode as C;
            let hint = match code {
                C::BadUserNamePassword | C::NotAuthorized => CHECK_CREDENTIALS,
                C::BadClientId => "the broker does not accept the client id: set transport.mqtt.client_id",
                C::ServiceUnavailable => "the broker is unavailable; retrying",
                _ => "check the broker's configuration",
            };
            refused(&format!("{code:?}"), s, hint)
        }
        rumqttc::ConnectionError::Io(io) => {
            explain(format!("cannot reach the broker {}:{}: {io}", s.endpoint.host, s.endpoint.port))
        }
        other => explain(format!("MQTT connection to {}:{}: {other}", s.endpoint.host, s.endpoint.port)),
    }
}

/// The bytes of a QoS 1 PUBLISH beyond its payload, at most: the fixed header (1 byte and a
/// remaining length of up to 4), the topic (2 + its length), the packet id (2) and, with MQTT 5,
/// an empty property length (1) (OASIS MQTT 5.0 section 3.3).
pub fn publish_overhead(topic: &str) -> usize {
    1 + 4 + 2 + topic.len() + 2 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_reason_codes_of_0x80_and_above_refuse() {
        for ack_on_puback in [false, true] {
            assert_eq!(puback_refusal(&PubAckReason::Success, ack_on_puback), None);
            let r = puback_refusal(&PubAckReason::NotAuthorized, ack_on_puback).unwrap();
            assert!(r.contains("0x87") && r.contains("ACL"), "{r}");
            assert!(puback_refusal(&PubAckReason::QuotaExceeded, ack_on_puback).unwrap().contains("0x97"));
        }
        // Nobody subscribed: fine while the cloud's ack decides, a loss if the PUBACK is the ack.
        assert_eq!(puback_refusal(&PubAckReason::NoMatchingSubscribers, false), None);
        let r = puback_refusal(&PubAckReason::NoMatchingSubscribers, true).unwrap();
        assert!(r.contains("0x10") && r.contains("backhaul-cloud"), "{r}");
    }

    #[test]
    fn the_overhead_bounds_a_real_publish_packet() {
        // A v5 PUBLISH of 100 bytes on a 20-byte topic: 1 + 2 (remaining length 126) + 22 + 2 + 1.
        assert!(publish_overhead(&"t".repeat(20)) + 100 >= 1 + 2 + 22 + 2 + 1 + 100);
    }
}
