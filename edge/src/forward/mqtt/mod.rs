//! The MQTT transport (rumqttc): QoS 1 publishes on `{prefix}/{device_id}/batches`, end-to-end acks
//! on `{prefix}/{device_id}/acks`, a retained status with a last will on `{prefix}/{device_id}/status`.
//!
//! - The link runs on its own thread, a current-thread tokio runtime polling the event loop
//!   (awaiting a publish from the polling task deadlocks, rumqtt #1025). The forwarder's thread
//!   publishes with the non-blocking `try_publish`.
//! - Every connection gets a **new** client and event loop, and the link's own backoff (full
//!   jitter) between attempts: rumqttc's built-in reconnect keeps requests across connections and
//!   drops its pending publishes when the broker lost the session (PITFALLS), and its collision slot
//!   can wedge reconnects (rumqtt #1014). A fresh client per connection means every `Outgoing`
//!   event belongs to the connection it is tagged with, and the forwarder resends everything in
//!   flight itself.
//! - rumqttc has no per-publish ack token: publishes go into its request channel in the order the
//!   forwarder makes them, and it reports `Outgoing::Publish(pkid)` in that same order, so a FIFO
//!   of requested batch ids pairs each pkid with its batch ([`PacketIds`]); the PUBACK names the
//!   pkid.
//! - A persistent session (MQTT 5: `clean_start = false` and a session that never expires; 3.1.1:
//!   `clean_session = false`; client id `backhaul-edge-{device_id}`): acks the cloud publishes
//!   while the device is away wait at the broker.
//! - MQTT 5 by default ([`protocol`]): a PUBACK reason code of 0x80 or more is a refusal, never a
//!   delivery, with either ack mode; the broker's maximum packet size from the CONNACK (and
//!   `transport.mqtt.max_message_bytes`) bounds what is sent ([`Transport::max_payload`]).

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use backhaul_shared::{AckMessage, AckStatus, BatchId, DeviceStatus, Topics};
use tokio::sync::watch;

use super::{Event, Outcome, Transport};
use crate::config::MqttProtocol;
use crate::queue::QueuedBatch;
use backhaul_shared::link::{Backoff, MqttEndpoint};

pub mod protocol;

use protocol::{Client, Connection, Polled};

/// Where and how to connect.
#[derive(Clone)]
pub struct MqttSettings {
    /// The broker's address, login and TLS (`backhaul_shared::link`).
    pub endpoint: MqttEndpoint,
    pub client_id: String,
    pub topics: Topics,
    pub device_id: String,
    /// Delete on PUBACK (`broker`) or on the cloud's ack (`cloud`).
    pub ack_on_puback: bool,
    pub ack_timeout: Duration,
    pub backoff_max: Duration,
    pub max_inflight: usize,
    pub keep_alive: Duration,
    pub protocol: MqttProtocol,
    /// `transport.mqtt.max_message_bytes`: the largest PUBLISH packet we send, bytes.
    pub max_message_bytes: Option<usize>,
    /// The key the cloud signs this device's acks with (`BACKHAUL_API_KEY`, issue #16). Never
    /// logged. `None`: every ack from the cloud is ignored (allowed only with `ack = "broker"`).
    pub ack_key: Option<Vec<u8>>,
    /// Where messages on `{prefix}/{device_id}/commands` go (the command stage, issue #18);
    /// `None`: the commands topic is not subscribed.
    pub commands: Option<std::sync::mpsc::Sender<crate::commands::Incoming>>,
}

impl std::fmt::Debug for MqttSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSettings")
            .field("endpoint", &self.endpoint)
            .field("client_id", &self.client_id)
            .field("ack_key", &self.ack_key.as_ref().map(|_| "***"))
            .field("protocol", &self.protocol)
            .finish_non_exhaustive()
    }
}

/// What the link thread reports, tagged with the connection it happened on.
#[derive(Debug)]
pub enum MqttEvent {
    Up {
        conn: u64,
        client: Client,
        /// The broker's maximum packet size (MQTT 5 CONNACK), if it said one.
        max_packet_size: Option<u32>,
    },
    Down {
        conn: u64,
        error: String,
    },
    /// rumqttc wrote a PUBLISH with this packet id.
    Sent {
        conn: u64,
        pkid: u16,
    },
    /// The broker's PUBACK. `refusal`: an MQTT 5 reason code of 0x80 or more, in words.
    PubAck {
        conn: u64,
        pkid: u16,
        refusal: Option<String>,
    },
    /// A message on the acks topic.
    Acks {
        payload: Vec<u8>,
    },
}

/// Pairs rumqttc's packet ids with batch ids (see the module docs). Plain state.
#[derive(Debug, Default)]
pub struct PacketIds {
    /// Publishes requested and not yet reported written, in request order (`None`: not a batch).
    requested: VecDeque<Option<BatchId>>,
    by_pkid: HashMap<u16, BatchId>,
}

impl PacketIds {
    pub fn requested(&mut self, batch: Option<BatchId>) {
        self.requested.push_back(batch);
    }

    pub fn sent(&mut self, pkid: u16) {
        if let Some(Some(batch)) = self.requested.pop_front() {
            self.by_pkid.insert(pkid, batch);
        }
    }

    pub fn puback(&mut self, pkid: u16) -> Option<BatchId> {
        self.by_pkid.remove(&pkid)
    }
}

/// The MQTT transport: the forwarder's side of the link.
#[derive(Debug)]
pub struct MqttTransport {
    settings: MqttSettings,
    /// `{prefix}/{device_id}/batches`, made once (every send and every size check uses it).
    batches_topic: String,
    client: Option<Client>,
    /// The broker's maximum packet size on this connection (MQTT 5 CONNACK).
    broker_max_packet: Option<u32>,
    conn: u64,
    ids: PacketIds,
    stop: watch::Sender<bool>,
    link: Option<JoinHandle<()>>,
}

impl MqttTransport {
    /// Starts the link thread; it connects (and reconnects) until closed.
    pub fn start(settings: MqttSettings, events: Sender<Event<MqttEvent>>) -> std::io::Result<Self> {
        let (stop, stop_rx) = watch::channel(false);
        let link_settings = settings.clone();
        let link = std::thread::Builder::new().name("mqtt-link".into()).spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the MQTT link's runtime");
                    return;
                }
            };
            runtime.block_on(link(link_settings, events, stop_rx));
        })?;
        Ok(Self {
            batches_topic: settings.topics.batches(&settings.device_id),
            settings,
            client: None,
            broker_max_packet: None,
            conn: 0,
            ids: PacketIds::default(),
            stop,
            link: Some(link),
        })
    }

    fn publish(&mut self, topic: String, payload: Vec<u8>, retain: bool, batch: Option<BatchId>) -> bool {
        let Some(client) = &self.client else { return false };
        match client.try_publish(topic, payload, retain) {
            Ok(()) => {
                self.ids.requested(batch);
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "the MQTT request queue is full; trying again shortly");
                false
            }
        }
    }
}

impl Transport for MqttTransport {
    type Event = MqttEvent;

    fn ready(&self) -> bool {
        self.client.is_some()
    }

    fn send(&mut self, batch: &QueuedBatch) -> bool {
        self.publish(self.batches_topic.clone(), batch.payload.clone(), false, Some(batch.batch_id))
    }

    fn handle(&mut self, event: MqttEvent, out: &mut Vec<Outcome>) {
        match event {
            MqttEvent::Up { conn, client, max_packet_size } => {
                self.conn = conn;
                self.client = Some(client);
                self.broker_max_packet = max_packet_size;
                self.ids = PacketIds::default();
                out.push(Outcome::LinkUp);
            }
            MqttEvent::Down { conn, error } => {
                if conn == self.conn {
                    self.client = None;
                }
                out.push(Outcome::LinkDown { error, resend_in_flight: true });
            }
            MqttEvent::Sent { conn, pkid } if conn == self.conn => self.ids.sent(pkid),
            MqttEvent::PubAck { conn, pkid, refusal } if conn == self.conn => {
                let Some(batch_id) = self.ids.puback(pkid) else { return };
                match refusal {
                    // A refusal is never a delivery, with either ack mode: the cloud cannot
                    // have it. It is the broker's configuration (an ACL, no subscriber), not the
                    // batch, so the batch stays queued and sending pauses.
                    Some(reason) => {
                        let topic = &self.batches_topic;
                        out.push(Outcome::Refused {
                            batch_id,
                            error: format!(
                                "the broker did not deliver the batch published on {topic} by user {} ({reason}); \
                                 batches stay queued",
                                self.settings.endpoint.username.as_deref().unwrap_or("anonymous")
                            ),
                        });
                    }
                    // With `ack = "cloud"` the broker's PUBACK only frees the pkid: the cloud's
                    // ack (or, after `ack_timeout`, a resend) decides.
                    None if self.settings.ack_on_puback => out.push(Outcome::Acked { batch_id, duplicate: false }),
                    None => {}
                }
            }
            MqttEvent::Sent { .. } | MqttEvent::PubAck { .. } => {} // an earlier connection's
            // Without a key (allowed with ack = "broker" only) the cloud's acks cannot be verified:
            // not applied, and not counted as forgeries either.
            MqttEvent::Acks { .. } if self.settings.ack_key.is_none() => {
                tracing::debug!("an ack from the cloud, ignored: no API key to verify it (ack = \"broker\")");
            }
            MqttEvent::Acks { payload } => match serde_json::from_slice::<AckMessage>(&payload) {
                Ok(message) => out.extend(message.acks.into_iter().map(|ack| match ack.status {
                    // Issue #16: whoever can publish on the acks topic could otherwise make this
                    // edge delete batches the cloud never stored.
                    _ if !self.settings.ack_key.as_ref().is_some_and(|k| ack.verify(&self.settings.device_id, k)) => {
                        Outcome::Unverified { batch_id: ack.batch_id, signed: ack.mac.is_some() }
                    }
                    AckStatus::Stored => Outcome::Acked { batch_id: ack.batch_id, duplicate: false },
                    AckStatus::Duplicate => Outcome::Acked { batch_id: ack.batch_id, duplicate: true },
                    AckStatus::Rejected => Outcome::Rejected {
                        batch_id: ack.batch_id,
                        reason: format!("rejected by the cloud: {}", ack.reason.unwrap_or_default()),
                    },
                })),
                Err(e) => {
                    tracing::warn!(error = %e, size = payload.len(), "ignoring a malformed message on the acks topic")
                }
            },
        }
    }

    fn tick(&mut self, _now: Instant) -> Option<Instant> {
        None
    }

    fn ack_timeout(&self) -> Option<Duration> {
        Some(self.settings.ack_timeout)
    }

    fn max_payload(&self) -> Option<usize> {
        let packet = match (self.settings.max_message_bytes, self.broker_max_packet) {
            (Some(ours), Some(broker)) => ours.min(broker as usize),
            (Some(ours), None) => ours,
            (None, Some(broker)) => broker as usize,
            (None, None) => return None,
        };
        Some(packet.saturating_sub(protocol::publish_overhead(&self.batches_topic)))
    }

    fn missing_acks_hint(&self) -> String {
        let (batches, acks) = (&self.batches_topic, self.settings.topics.acks(&self.settings.device_id));
        if self.settings.ack_on_puback {
            "the broker does not PUBACK: check the broker".into()
        } else {
            format!(
                "the cloud's acks are not coming: check that the broker's ACL lets this device publish on \
                 {batches} and read {acks}, that backhaul-cloud is running and connected to this broker, and \
                 that edge and cloud use the same topic_prefix"
            )
        }
    }

    fn publish_command_result(&mut self, payload: Vec<u8>) -> bool {
        let topic = self.settings.topics.command_results(&self.settings.device_id);
        self.publish(topic, payload, false, None)
    }

    fn publish_status(&mut self, status: &DeviceStatus) {
        let topic = self.settings.topics.status(&self.settings.device_id);
        let payload = serde_json::to_vec(status).expect("a status serializes");
        self.publish(topic, payload, true, None);
    }

    fn close(&mut self, status: &DeviceStatus) {
        // A clean stop does not fire the last will: say "offline" ourselves, then disconnect.
        self.publish_status(status);
        if let Some(client) = &self.client {
            client.try_disconnect();
        }
        let _ = self.stop.send(true);
        if let Some(link) = self.link.take() {
            let _ = link.join();
        }
    }
}

/// A connection up this long counts as healthy: the reconnect backoff starts over after it.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// Capacity of rumqttc's request channel per connection: the window, resends and status.
fn request_capacity(max_inflight: usize) -> usize {
    max_inflight * 2 + 16
}

/// The link thread's loop: one client and event loop per connection, backoff between attempts,
/// until `stop`.
async fn link(s: MqttSettings, events: Sender<Event<MqttEvent>>, mut stop: watch::Receiver<bool>) {
    let report = |e: MqttEvent| events.send(Event::Link(e)).is_ok();
    let mut backoff = Backoff::new(Duration::from_millis(200), s.backoff_max);
    let acks_topic = s.topics.acks(&s.device_id);
    let commands_topic = s.topics.commands(&s.device_id);
    let mut conn = 0u64;
    loop {
        conn += 1;
        let (client, mut connection) = Connection::open(&s, request_capacity(s.max_inflight));
        let mut connected_at: Option<Instant> = None;
        // Why the broker said it closes the connection (MQTT 5), for the error that follows.
        let mut broker_said: Option<String> = None;
        let error = loop {
            let polled = tokio::select! {
                p = connection.poll(&s) => p,
                _ = stop.changed() => {
                    // Let the offline status and the DISCONNECT the forwarder queued go out.
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        while let Ok(p) = connection.poll(&s).await {
                            if p == Polled::Disconnected {
                                break;
                            }
                        }
                    })
                    .await;
                    return;
                }
            };
            let event = match polled {
                Ok(Polled::ConnAck { session_present, max_packet_size }) => {
                    connected_at = Some(Instant::now());
                    tracing::info!(broker = %s.endpoint.addr(), protocol = ?s.protocol, session_present, ?max_packet_size, "connected to the MQTT broker");
                    // Queued before any publish of this connection, so the broker has the
                    // subscription before the cloud can answer.
                    if let Err(e) = client.try_subscribe(acks_topic.clone()) {
                        break format!("subscribing to {acks_topic}: {e}");
                    }
                    // Commands (issue #18): on the persistent session, so one sent while the
                    // device was away waits at the broker.
                    if s.commands.is_some() {
                        if let Err(e) = client.try_subscribe(commands_topic.clone()) {
                            break format!("subscribing to {commands_topic}: {e}");
                        }
                    }
                    MqttEvent::Up { conn, client: client.clone(), max_packet_size }
                }
                Ok(Polled::Sent(pkid)) => MqttEvent::Sent { conn, pkid },
                Ok(Polled::PubAck { pkid, refusal }) => MqttEvent::PubAck { conn, pkid, refusal },
                Ok(Polled::Message { topic, payload }) if topic == acks_topic => MqttEvent::Acks { payload },
                Ok(Polled::Message { topic, payload }) if topic == commands_topic => {
                    // Straight to the command stage: the link feeds it, the forwarder never sees it.
                    if let Some(commands) = &s.commands {
                        let _ = commands.send(crate::commands::Incoming::Signed(payload));
                    }
                    continue;
                }
                Ok(Polled::BrokerDisconnect(why)) => {
                    broker_said = Some(why);
                    continue;
                }
                Ok(_) => continue,
                Err(e) => break broker_said.take().map_or(e.clone(), |why| format!("{why} ({e})")),
            };
            if !report(event) {
                return;
            }
        };
        // The backoff starts over only after a connection that lasted: one dropped right after its
        // CONNACK (a second device with the same client id taking the session over, a broker
        // refusing us) must not reconnect in a tight loop.
        let error = match connected_at.map(|t| t.elapsed()) {
            Some(up) if up >= STABLE_CONNECTION => {
                backoff.reset();
                error
            }
            Some(_) => format!("{error} (the connection dropped right after it was made)"),
            None => error,
        };
        if !report(MqttEvent::Down { conn, error: error.clone() }) {
            return;
        }
        let delay = backoff.next_random(None);
        tracing::warn!(%error, retry_in = ?delay, failures = backoff.failures(), "MQTT link down; batches stay queued on disk");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_ids_pair_in_request_order_and_skip_status_publishes() {
        let mut ids = PacketIds::default();
        let (a, b) = (BatchId::new(), BatchId::new());
        ids.requested(Some(a));
        ids.requested(None); // a status
        ids.requested(Some(b));
        ids.sent(1);
        ids.sent(2);
        ids.sent(3);
        assert_eq!(ids.puback(3), Some(b));
        assert_eq!(ids.puback(2), None, "the status is nobody's batch");
        assert_eq!(ids.puback(1), Some(a));
        assert_eq!(ids.puback(1), None, "answered once");
        // pkids are reused after their PUBACK.
        ids.requested(Some(b));
        ids.sent(1);
        assert_eq!(ids.puback(1), Some(b));
    }

    fn transport(ack_on_puback: bool) -> MqttTransport {
        let (stop, _) = watch::channel(false);
        MqttTransport {
            settings: MqttSettings {
                endpoint: MqttEndpoint { host: "127.0.0.1".into(), port: 1, username: None, password: None, tls: None },
                client_id: "t".into(),
                topics: Topics::default(),
                device_id: "pi".into(),
                ack_on_puback,
                ack_timeout: Duration::from_secs(30),
                backoff_max: Duration::from_secs(1),
                max_inflight: 4,
                keep_alive: Duration::from_secs(15),
                protocol: MqttProtocol::V5,
                max_message_bytes: None,
                ack_key: Some(KEY.to_vec()),
                commands: None,
            },
            batches_topic: Topics::default().batches("pi"),
            client: None,
            broker_max_packet: None,
            conn: 1,
            ids: PacketIds::default(),
            stop,
            link: None,
        }
    }

    const KEY: &[u8] = b"device-key-pi-0123456789";

    fn acks(acks: &[(BatchId, AckStatus, Option<&[u8]>)]) -> Vec<u8> {
        let acks = acks
            .iter()
            .map(|&(id, status, key)| match key {
                Some(key) => backhaul_shared::Ack::signed("pi", id, status, Some("bad".into()), key),
                None => backhaul_shared::Ack { batch_id: id, status, reason: None, mac: None },
            })
            .collect();
        serde_json::to_vec(&AckMessage { acks }).unwrap()
    }

    #[test]
    fn cloud_acks_become_outcomes_and_events_of_old_connections_are_ignored() {
        let mut t = transport(false);
        let (a, b, c) = (BatchId::new(), BatchId::new(), BatchId::new());
        let payload = acks(&[
            (a, AckStatus::Stored, Some(KEY)),
            (b, AckStatus::Duplicate, Some(KEY)),
            (c, AckStatus::Rejected, Some(KEY)),
        ]);
        let mut out = Vec::new();
        t.handle(MqttEvent::Acks { payload }, &mut out);
        assert_eq!(out[0], Outcome::Acked { batch_id: a, duplicate: false });
        assert_eq!(out[1], Outcome::Acked { batch_id: b, duplicate: true });
        assert!(matches!(&out[2], Outcome::Rejected { batch_id, reason } if *batch_id == c && reason.contains("bad")));
        out.clear();
        t.handle(MqttEvent::Acks { payload: b"not json".to_vec() }, &mut out);
        assert!(out.is_empty(), "a malformed ack message is ignored");
        t.ids.requested(Some(a));
        t.handle(MqttEvent::Sent { conn: 0, pkid: 1 }, &mut out);
        t.handle(MqttEvent::PubAck { conn: 0, pkid: 1, refusal: None }, &mut out);
        assert!(out.is_empty(), "events of an earlier connection mean nothing now");
        t.handle(MqttEvent::Sent { conn: 1, pkid: 1 }, &mut out);
        t.handle(MqttEvent::PubAck { conn: 1, pkid: 1, refusal: None }, &mut out);
        assert!(out.is_empty(), "with ack = cloud a PUBACK deletes nothing");
    }

    #[test]
    fn acks_without_a_valid_mac_are_never_applied() {
        // Issue #16: forged `stored` and `rejected` acks, unsigned or signed with another key
        // (another device's, or this key for another device's topic).
        let mut t = transport(false);
        let other_device = {
            let id = BatchId::new();
            let mut ack = backhaul_shared::Ack::signed("pi-2", id, AckStatus::Stored, None, KEY);
            ack.batch_id = id;
            serde_json::to_vec(&AckMessage { acks: vec![ack] }).unwrap()
        };
        let (a, b) = (BatchId::new(), BatchId::new());
        let mut out = Vec::new();
        for payload in [
            acks(&[(a, AckStatus::Stored, None), (b, AckStatus::Rejected, None)]),
            acks(&[(a, AckStatus::Stored, Some(b"another-key-0123456789")), (b, AckStatus::Rejected, Some(b"k"))]),
        ] {
            t.handle(MqttEvent::Acks { payload }, &mut out);
        }
        t.handle(MqttEvent::Acks { payload: other_device }, &mut out);
        assert_eq!(out.len(), 5, "{out:?}");
        assert!(out.iter().all(|o| matches!(o, Outcome::Unverified { .. })), "{out:?}");
        assert_eq!(out.iter().filter(|o| matches!(o, Outcome::Unverified { signed: false, .. })).count(), 2);
        // Without a key (only allowed with ack = "broker"), no cloud ack is ever applied, and
        // none is counted as a forgery.
        let mut t = transport(true);
        t.settings.ack_key = None;
        out.clear();
        t.handle(MqttEvent::Acks { payload: acks(&[(a, AckStatus::Rejected, Some(KEY))]) }, &mut out);
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn with_ack_broker_a_puback_is_final() {
        let mut t = transport(true);
        let a = BatchId::new();
        let mut out = Vec::new();
        t.ids.requested(Some(a));
        t.handle(MqttEvent::Sent { conn: 1, pkid: 7 }, &mut out);
        t.handle(MqttEvent::PubAck { conn: 1, pkid: 7, refusal: None }, &mut out);
        assert_eq!(out, vec![Outcome::Acked { batch_id: a, duplicate: false }]);
        t.handle(MqttEvent::Down { conn: 1, error: "gone".into() }, &mut out);
        assert_eq!(out[1], Outcome::LinkDown { error: "gone".into(), resend_in_flight: true });
        assert!(!t.ready());
    }

    #[test]
    fn a_refused_puback_is_never_a_delivery_in_either_ack_mode() {
        for ack_on_puback in [true, false] {
            let mut t = transport(ack_on_puback);
            let a = BatchId::new();
            let mut out = Vec::new();
            t.ids.requested(Some(a));
            t.handle(MqttEvent::Sent { conn: 1, pkid: 3 }, &mut out);
            let refusal =
                protocol::puback_refusal(&rumqttc::v5::mqttbytes::v5::PubAckReason::NotAuthorized, ack_on_puback);
            t.handle(MqttEvent::PubAck { conn: 1, pkid: 3, refusal }, &mut out);
            assert!(
                matches!(&out[..], [Outcome::Refused { batch_id, error }] if *batch_id == a && error.contains("0x87") && error.contains("ACL")),
                "{out:?}"
            );
        }
    }

    #[test]
    fn the_largest_payload_is_the_smaller_limit_less_the_publish_overhead() {
        let mut t = transport(false);
        assert_eq!(t.max_payload(), None, "no limit known");
        t.broker_max_packet = Some(10_000);
        let overhead = protocol::publish_overhead(&t.batches_topic);
        assert_eq!(t.max_payload(), Some(10_000 - overhead));
        t.settings.max_message_bytes = Some(4096);
        assert_eq!(t.max_payload(), Some(4096 - overhead), "ours is smaller");
        t.settings.max_message_bytes = Some(1 << 20);
        assert_eq!(t.max_payload(), Some(10_000 - overhead), "the broker's is smaller");
    }
}
