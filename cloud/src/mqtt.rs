//! The MQTT ingress adapter (SPEC.md, "MQTT topics"), MQTT 5 (OASIS MQTT 5.0).
//!
//! - Subscribes with QoS 1 through `$share/{group}/{prefix}/+/batches` and to `{prefix}/+/status`,
//!   on a persistent session (`clean_start = false`, session expiry never, a fixed client id per
//!   replica), with manual acks: the broker keeps redelivering a message until we PUBACK it.
//! - The CONNECT announces a Maximum Packet Size (`max_body_bytes` + 64 KiB: the broker drops
//!   bigger messages for us instead of sending them, issue #14) and a Receive Maximum of 64 (the
//!   broker sends at most that many messages we have not PUBACKed). Mosquitto 2.0.11 ignores the
//!   Receive Maximum when `max_queued_messages` is 0 (PITFALLS.md); `deploy/` bounds it.
//! - Up to `IN_HAND` messages are handled at once (so their batches share the store's group
//!   commit); each is committed and its end-to-end ack published on `{prefix}/{device}/acks`, and
//!   PUBACKs go out strictly in arrival order, each only once its message is done.
//!   A crash between commit and PUBACK means a redelivery, which is then a duplicate.
//! - A malformed message is recorded in the dead-letter table and PUBACKed, so the broker stops
//!   redelivering it; a batch whose topic names another device than its payload is rejected.
//! - A panic while handling one message costs that message only: it is dead-lettered with the
//!   panic as its reason, refused to its device, counted (`panics`) and PUBACKed (redelivered, it
//!   would panic again after every restart and stall every device behind it).
//! - A stop finishes the messages in hand (committed, PUBACKed), leaves what the poller holds at the
//!   broker (unacked: redelivered), and sends DISCONNECT on both connections. If either event loop
//!   task dies, `run` returns an error at once: the service stops non-zero and systemd restarts it.
//! - Bounded work: the event loop hands messages over a bounded channel, so a slow database stops
//!   reading from the broker instead of growing memory. While storage fails, the worker retries the
//!   same message with backoff and acks nothing.
//! - The event loop is polled in its own task (awaiting a publish from the polling task deadlocks).
//!   Acks go out on a second connection with its own event loop: the ingest connection's loop
//!   may be blocked handing a message to the busy worker, and a worker waiting on that same loop
//!   to publish would never be freed. Its request queue is deep enough that PUBACKs never wait.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use backhaul_shared::link::{Backoff, MqttEndpoint};
use backhaul_shared::wire::TopicKind;
use backhaul_shared::{Ack, AckMessage, AckStatus, BatchId, DeviceStatus, Topics};
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::compat::{Compat, SeedTopic};
use crate::config::{parse_mqtt_url, ApiKeys, MqttConfig};
use crate::ingest::{Accepted, Ingest, Lookup};

/// Room in a PUBLISH packet for what is not payload: the fixed header, the topic (at most
/// `{prefix}/{device}/batches`, both bounded by the topic rules) and properties.
const PACKET_OVERHEAD: usize = 64 << 10;

/// Messages handled at once (their batches share a group commit).
const IN_HAND: usize = 32;

/// Messages the poller may hold for the worker beyond those in hand.
const HANDOVER: usize = 32;

/// MQTT 5 Receive Maximum (OASIS MQTT 5.0, section 3.1.2.11.3): the broker sends at most this many
/// QoS 1 messages we have not PUBACKed, so a burst or a backlog of any size costs at most this many
/// messages of memory (each at most the announced Maximum Packet Size). Enough to keep the worker's
/// hands and the handover full.
const RECEIVE_MAXIMUM: u16 = (IN_HAND + HANDOVER) as u16;

/// MQTT 5 session expiry (section 3.1.2.11.2) by default: never, like a 3.1.1 session with
/// `clean_session = false`; the broker keeps our subscriptions and the messages not PUBACKed
/// while we are away (`mqtt.session_expiry` bounds it for replicas).
const SESSION_NEVER_EXPIRES: u32 = u32::MAX;

/// Limits and gauges of the MQTT ingress.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Largest message payload accepted (`max_body_bytes`, as over HTTP). Announced to the broker
    /// as our Maximum Packet Size (payload + [`PACKET_OVERHEAD`]); MQTT 5 brokers drop bigger
    /// messages for us instead of sending them (section 3.1.2.11.4).
    pub max_message_bytes: usize,
    /// This ingress's progress, for `/health`, `/metrics` and the watchdog.
    pub progress: Arc<crate::progress::Ingresses>,
    /// The API keys: each ack is signed with its device's key ([`ApiKeys::ack_key`]).
    pub keys: ApiKeys,
    /// TLS for an `mqtts://` url, loaded and checked at start ([`MqttConfig::tls_material`]).
    pub tls: Option<Arc<backhaul_shared::tls::rustls::ClientConfig>>,
    /// Woken when an operator queued a command (issue #18): it is published at once.
    pub commands_queued: Arc<tokio::sync::Notify>,
    /// The seed senders' topics taken (`[compat]`, issue #20).
    pub compat: Arc<Compat>,
}

/// Commands published per round.
const PUBLISH_ROUND: i64 = 100;

/// Publishes the commands operators queued, each signed with its device's key, on
/// `{prefix}/{device_id}/commands` (QoS 1: a device on a persistent session gets it when it
/// returns), and again while unanswered and the device is online, with backoff
/// ([`crate::store::republish_delay`]). Runs until aborted; storage errors are logged and retried
/// at the next round. Several replicas may publish the same command: the device runs it once.
async fn publish_commands(ingest: Arc<Ingest>, acks: AckSender, queued: Arc<tokio::sync::Notify>) {
    loop {
        let _ = tokio::time::timeout(Duration::from_secs(5), queued.notified()).await;
        let due = match ingest.commands().to_publish(PUBLISH_ROUND).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "reading the commands to publish failed; retrying in 5 s");
                continue;
            }
        };
        for (device, message, publishes) in due {
            let id = message.command_id.to_string();
            let Some(key) = acks.keys.ack_key(&device) else {
                tracing::warn!(
                    device,
                    command_id = id,
                    "no API key for this device and no fleet key: its command cannot be signed and is not sent (tried \
                     again in an hour); add the device's key to auth.keys_file"
                );
                if let Err(e) = ingest.commands().postpone(&device, &id).await {
                    tracing::warn!(error = %e, "putting off a command failed");
                }
                continue;
            };
            let signed = backhaul_shared::command::Signed::seal(
                &message,
                backhaul_shared::command::Purpose::Command,
                &device,
                key,
            );
            let payload = serde_json::to_vec(&signed).expect("an envelope serializes");
            match acks.client.try_publish(acks.topics.commands(&device), QoS::AtLeastOnce, false, payload) {
                Ok(()) => {
                    if let Err(e) = ingest.commands().delivered(&device, &id, Some(publishes + 1)).await {
                        tracing::warn!(error = %e, device, command_id = id, "recording a command as published failed; it is published again");
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "the MQTT request queue is full; commands wait for the next round");
                    break;
                }
            }
        }
    }
}

/// Publishes acks on `{prefix}/{device_id}/acks`, each signed with its device's key (issue #16:
/// the edge applies no ack it cannot verify).
#[derive(Debug, Clone)]
struct AckSender {
    client: AsyncClient,
    topics: Topics,
    keys: ApiKeys,
}

impl AckSender {
    async fn send(&self, device: &str, batch_id: BatchId, status: AckStatus, reason: Option<String>) {
        let ack = match self.keys.ack_key(device) {
            Some(key) => Ack::signed(device, batch_id, status, reason, key),
            None => {
                tracing::warn!(
                    device,
                    %batch_id,
                    "no API key for this device and no fleet key: its ack goes out unsigned and the edge will \
                     ignore it; add the device's key to auth.keys_file"
                );
                Ack { batch_id, status, reason, mac: None }
            }
        };
        let payload = serde_json::to_vec(&AckMessage { acks: vec![ack] }).expect("an ack serializes");
        // Never wait: if the ack connection is down and its queue full, the device resends after its
        // timeout and gets a duplicate ack.
        if let Err(e) = self.client.try_publish(self.topics.acks(device), QoS::AtLeastOnce, false, payload) {
            tracing::warn!(error = %e, device, "publishing an ack failed; the device will resend and get a duplicate ack");
        }
    }
}

/// Test-only fault injection: `BACKHAUL_FAILPOINT=before_puback` parks the worker after a commit,
/// before its PUBACK, so a test can SIGKILL the process exactly there.
fn failpoint_before_puback() -> bool {
    crate::failpoint::value() == Some("before_puback")
}

/// Runs until `shutdown` turns true: then finishes the messages in hand (committed and PUBACKed),
/// leaves the rest at the broker for redelivery, and disconnects cleanly. Returns an error, at
/// once, if either connection's event loop dies (a panic): the caller ends the process.
pub async fn run(
    ingest: Arc<Ingest>,
    cfg: MqttConfig,
    password: Option<String>,
    settings: Settings,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let (host, port, _) = parse_mqtt_url(&cfg.url)?;
    let endpoint = MqttEndpoint { host, port, username: cfg.username.clone(), password, tls: settings.tls.clone() };
    let max_packet = u32::try_from(settings.max_message_bytes.saturating_add(PACKET_OVERHEAD)).unwrap_or(u32::MAX);
    let mut options = endpoint.v5_options(cfg.client_id.clone());
    options
        .set_keep_alive(Duration::from_secs(15))
        .set_clean_start(false)
        .set_session_expiry_interval(Some(session_expiry(&cfg)))
        .set_manual_acks(true)
        .set_max_packet_size(Some(max_packet))
        .set_receive_maximum(Some(RECEIVE_MAXIMUM));
    // The request queue carries PUBACKs (at most one per message the broker may have sent us
    // unacked) and subscriptions.
    let (client, eventloop) = AsyncClient::new(options.clone(), 4 * usize::from(RECEIVE_MAXIMUM));
    let topics = Topics::new(cfg.topic_prefix.clone());
    let (tx, mut rx) = mpsc::channel::<(u64, Publish)>(HANDOVER);
    let connection = Arc::new(AtomicU64::new(0));
    let ingresses = settings.progress.clone();
    ingresses.mqtt_configured.store(true, Ordering::SeqCst);
    // Batches and command results shared by the group's replicas, every status, and the seed
    // senders' topics turned on in `[compat]`.
    let filters: Vec<String> = [
        topics.shared_batches_filter(&cfg.shared_group),
        topics.all_status_filter(),
        topics.shared_command_results_filter(&cfg.shared_group),
    ]
    .into_iter()
    .chain(settings.compat.filters(&cfg.shared_group))
    .collect();
    let poller = tokio::spawn(poll(eventloop, client.clone(), filters, tx, connection.clone(), ingresses.clone()));

    let mut ack_options = options;
    ack_options
        .set_client_id(format!("{}-acks", cfg.client_id))
        .set_clean_start(true)
        .set_session_expiry_interval(None)
        .set_manual_acks(false);
    let (acks, ack_eventloop) = AsyncClient::new(ack_options, 1024);
    let acks = AckSender { client: acks, topics: topics.clone(), keys: settings.keys.clone() };
    let ack_poller = tokio::spawn(poll_acks(ack_eventloop));
    let publisher = tokio::spawn(publish_commands(ingest.clone(), acks.clone(), settings.commands_queued.clone()));
    let _stop_publisher = crate::AbortOnDrop(publisher);

    // Up to IN_HAND messages are handled at once, so their new batches share the store's group
    // commit; PUBACKs still go out strictly in arrival order, each after its own message is done.
    let mut in_hand: VecDeque<(u64, Publish, JoinHandle<()>)> = VecDeque::new();
    // The two event loops: neither ends before we disconnect, so one that ends now died (a panic
    // inside rumqttc or our loop). Ingest would then be dead with the process still up: end here
    // instead, and let systemd restart the service.
    let mut poller = Some(poller);
    let mut ack_poller = Some(ack_poller);
    // PUBACKs waiting for room in the client's request queue, in arrival order (see
    // `send_pubacks`).
    let mut pubacks: VecDeque<(u64, Publish)> = VecDeque::new();
    let mut stopping = false;
    let mut rx_closed = false;
    let mut result = Ok(());
    loop {
        // Checked before the select: once stopping with nothing in hand, every branch below is
        // disabled (and a select with no branch left panics).
        if stopping && in_hand.is_empty() {
            // The PUBACKs still waiting get a moment to go out with the disconnect.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            while !pubacks.is_empty() && tokio::time::Instant::now() < deadline {
                send_pubacks(&client, &mut pubacks, &connection);
                tokio::time::sleep(PUBACK_RETRY).await;
            }
            break;
        }
        let next = tokio::select! {
            // The oldest message in hand is done: PUBACK it.
            r = async { (&mut in_hand.front_mut().expect("not empty").2).await }, if !in_hand.is_empty() => {
                let (received_on, publish, _) = in_hand.pop_front().expect("not empty");
                match r {
                    Ok(()) => {}
                    // A panic costs that message only (issue #14): redelivered, it would panic again
                    // after every restart and stall every device behind it. It is dead-lettered with
                    // the reason, refused to its device, counted, and PUBACKed below.
                    Err(e) if e.is_panic() => handler_panicked(&ingest, &acks, &publish, &panic_message(e)).await,
                    Err(e) => {
                        result = Err(anyhow::anyhow!("handling an MQTT message failed: {e}; stopping so the broker redelivers it"));
                        break;
                    }
                }
                if failpoint_before_puback() {
                    eprintln!("FAILPOINT before_puback: committed, parked before PUBACK");
                    loop {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                }
                // A message from an earlier connection: its packet id means nothing now (after a
                // session loss the ids start again, and the PUBACK could acknowledge a new,
                // uncommitted message). It is stored; the broker redelivers it if it kept the
                // session, as a duplicate.
                if received_on == connection.load(Ordering::SeqCst) {
                    // A PUBACK needs only the packet id (and QoS): the payload can go.
                    let mut publish = publish;
                    publish.payload = Default::default();
                    publish.topic = Default::default();
                    pubacks.push_back((received_on, publish));
                    send_pubacks(&client, &mut pubacks, &connection);
                }
                ingresses.mqtt.finish();
                continue;
            }
            r = async { poller.as_mut().expect("checked").await }, if poller.is_some() => {
                poller = None;
                result = Err(task_died("the MQTT ingest connection's event loop", r));
                break;
            }
            r = async { ack_poller.as_mut().expect("checked").await }, if ack_poller.is_some() => {
                ack_poller = None;
                result = Err(task_died("the MQTT ack connection's event loop", r));
                break;
            }
            // PUBACKs the request queue had no room for: try again shortly.
            _ = tokio::time::sleep(PUBACK_RETRY), if !pubacks.is_empty() => {
                send_pubacks(&client, &mut pubacks, &connection);
                continue;
            }
            p = rx.recv(), if !stopping && !rx_closed && in_hand.len() < IN_HAND => p,
            _ = shutdown.changed(), if !stopping => {
                stopping = true;
                continue;
            }
        };
        match next {
            Some((received_on, publish)) => {
                crate::failpoint::panic_in("mqtt-worker");
                let (ingest, acks, p) = (ingest.clone(), acks.clone(), publish.clone());
                let (max, compat) = (settings.max_message_bytes, settings.compat.clone());
                let task = tokio::spawn(async move { handle(&ingest, &acks, &compat, &p, max).await });
                in_hand.push_back((received_on, publish, task));
            }
            // The poller is gone: its handle's branch above says how.
            None => rx_closed = true,
        }
    }
    // Let the PUBACKs and acks already queued go out: stop taking messages (the poller discards
    // them unacked once `rx` is gone, so the broker redelivers them), disconnect, and wait for each
    // event loop to write its DISCONNECT, which comes after everything queued before it. Messages
    // still in hand (only after a failure) are neither PUBACKed nor lost: the broker redelivers them.
    drop(rx);
    for (_, _, task) in &in_hand {
        task.abort();
    }
    let _ = client.disconnect().await;
    let _ = acks.client.disconnect().await;
    for (name, task) in [("ingest", poller), ("acks", ack_poller)] {
        let Some(task) = task else { continue };
        let abort = task.abort_handle();
        match tokio::time::timeout(Duration::from_secs(3), task).await {
            Ok(_) => tracing::info!(connection = name, "disconnected from the MQTT broker"),
            Err(_) => {
                tracing::warn!(connection = name, "the MQTT connection did not close in time; closing it hard");
                abort.abort();
            }
        }
    }
    result
}

/// The Session Expiry Interval to ask for, seconds: `mqtt.session_expiry`, or never.
fn session_expiry(cfg: &MqttConfig) -> u32 {
    cfg.session_expiry.map_or(SESSION_NEVER_EXPIRES, |d| u32::try_from(d.0.as_secs()).unwrap_or(u32::MAX - 1))
}

/// How soon PUBACKs that found the request queue full are tried again.
const PUBACK_RETRY: Duration = Duration::from_millis(20);

/// Queues the waiting PUBACKs, in order, while the client's request queue has room; the rest wait.
///
/// Never awaited (issue #14: a burst stopped MQTT ingest for good). rumqttc's event loop hands
/// out the incoming messages it has read before it takes the next request, so under a burst the
/// request queue fills with PUBACKs; a worker awaiting room there stops taking messages, the
/// poller then blocks handing it the next one, and nothing polls the event loop that would make
/// the room. Waiting here instead costs a `Publish` a message until the burst is read.
///
/// A PUBACK whose message came on an earlier connection is dropped (its packet id means nothing on
/// the new one; after a session loss it could acknowledge a new, uncommitted message). The broker
/// redelivers that message if it kept the session: a duplicate.
fn send_pubacks(client: &AsyncClient, pubacks: &mut VecDeque<(u64, Publish)>, connection: &AtomicU64) {
    let current = connection.load(Ordering::SeqCst);
    while let Some((received_on, publish)) = pubacks.front() {
        if *received_on != current {
            pubacks.pop_front();
            continue;
        }
        match client.try_ack(publish) {
            Ok(()) => {
                pubacks.pop_front();
            }
            Err(rumqttc::v5::ClientError::TryRequest(_)) => return, // full: later
            Err(e) => {
                tracing::warn!(error = %e, "queueing a PUBACK failed; the broker will redeliver (a duplicate)");
                pubacks.pop_front();
            }
        }
    }
}

/// The error for a long-lived task that ended on its own: it panicked (the panic's message) or
/// returned when it never should.
fn task_died(what: &str, r: Result<(), tokio::task::JoinError>) -> anyhow::Error {
    match r {
        Err(e) => {
            anyhow::anyhow!("{what} panicked: {}; ingest over MQTT is dead, so the service stops", panic_message(e))
        }
        Ok(()) => anyhow::anyhow!("{what} ended unexpectedly; ingest over MQTT is dead, so the service stops"),
    }
}

/// What a failed task said: its panic message, or that it was cancelled.
pub fn panic_message(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return e.to_string();
    }
    backhaul_shared::panics::message(e.into_panic().as_ref())
}

/// Reconnect pacing of both connections: full jitter from 100 ms, capped at 10 s.
fn reconnect_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(100), Duration::from_secs(10))
}

/// The ack connection's event loop: nothing comes in that matters; keep it connected.
async fn poll_acks(mut eventloop: EventLoop) {
    let mut backoff = reconnect_backoff();
    loop {
        match eventloop.poll().await {
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_))) => {
                crate::failpoint::panic_in("mqtt-acks");
                backoff.reset();
            }
            Ok(_) => backoff.reset(),
            Err(e) => {
                let retry_in = backoff.next_random(None);
                let error = backhaul_shared::tls::explain_handshake_error(&e.to_string());
                tracing::warn!(%error, ?retry_in, "MQTT ack connection lost; reconnecting");
                tokio::time::sleep(retry_in).await;
            }
        }
    }
}

async fn poll(
    mut eventloop: EventLoop,
    client: AsyncClient,
    filters: Vec<String>,
    tx: mpsc::Sender<(u64, Publish)>,
    connection: Arc<AtomicU64>,
    ingresses: Arc<crate::progress::Ingresses>,
) {
    let mut backoff = reconnect_backoff();
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff.reset();
                connection.fetch_add(1, Ordering::SeqCst);
                ingresses.mqtt_connected.store(true, Ordering::SeqCst);
                tracing::info!(session_present = ack.session_present, "connected to the MQTT broker");
                // try_subscribe_many only queues the request: never await from the polling task.
                let filters = filters.iter().map(|f| Filter::new(f.clone(), QoS::AtLeastOnce));
                if let Err(e) = client.try_subscribe_many(filters) {
                    tracing::error!(error = %e, "subscribing failed");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode;
                let refused: Vec<_> =
                    ack.return_codes.iter().filter(|c| !matches!(c, SubscribeReasonCode::Success(_))).collect();
                if refused.is_empty() {
                    tracing::info!("subscribed to batches and status (and command results)");
                } else {
                    tracing::error!(
                        reasons = ?refused,
                        "the broker refused a subscription (batches, status, command results): nothing arrives over MQTT; \
                         check the broker's ACL for this client and that it supports shared subscriptions"
                    );
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                crate::failpoint::panic_in("mqtt-poller");
                // Waiting from here: a worker that takes no message for `ingest_stall_after`
                // makes the service unhealthy.
                ingresses.mqtt.begin();
                // Bounded: a slow worker stops us reading from the broker. Once the worker is
                // gone (stopping), messages are left unacked and the broker redelivers them.
                if tx.send((connection.load(Ordering::SeqCst), p)).await.is_err() {
                    ingresses.mqtt.finish();
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(e) => {
                // From here, PUBACKs for what this connection delivered are stale.
                connection.fetch_add(1, Ordering::SeqCst);
                let retry_in = backoff.next_random(None);
                let error = backhaul_shared::tls::explain_handshake_error(&e.to_string());
                if ingresses.mqtt_connected.swap(false, Ordering::SeqCst) {
                    tracing::warn!(%error, ?retry_in, "MQTT connection lost; reconnecting");
                } else {
                    tracing::warn!(%error, ?retry_in, "connecting to the MQTT broker failed (is it running, and is mqtt.url right?); retrying");
                }
                tokio::time::sleep(retry_in).await;
            }
        }
    }
}

/// After handling `publish` panicked: dead-letters it with the panic as its reason (counted in
/// `panics` as well as `dead_letters`), and tells its device the batch is refused, if its topic and
/// batch_id can be read (else the device would resend it after every ack timeout, forever).
async fn handler_panicked(ingest: &Ingest, acks: &AckSender, publish: &Publish, panic: &str) {
    let reason = format!("the cloud panicked handling this message (a bug; kept for inspection): {panic}");
    let topic = topic_str(publish);
    let device = acks.topics.parse(&topic).map(|(d, _)| d);
    tracing::error!(topic = %topic, size = publish.payload.len(), "{reason}; dead-lettered, PUBACKed, going on");
    retry_storage(|| ingest.dead_letter("mqtt", Some(&topic), device, publish.payload.len(), &reason, true)).await;
    if let (Some(device), Some(batch_id)) = (device, readable_batch_id(&publish.payload)) {
        acks.send(device, batch_id, AckStatus::Rejected, Some(reason)).await;
    }
}

/// The topic as text (a topic that is not UTF-8 cannot be one of ours; MQTT requires UTF-8).
fn topic_str(publish: &Publish) -> String {
    String::from_utf8_lossy(&publish.topic).into_owned()
}

/// Handles one message to completion: stored (or recorded as unusable) before it returns.
async fn handle(ingest: &Ingest, acks: &AckSender, compat: &Compat, publish: &Publish, max_bytes: usize) {
    let topic = topic_str(publish);
    let Some((device, kind)) = acks.topics.parse(&topic) else {
        if let Some(seed) = compat.classify(&topic) {
            return handle_seed(ingest, compat, publish, seed, max_bytes).await;
        }
        dead_letter(ingest, publish, None, "topic is not {prefix}/{device}/batches or /status").await;
        return;
    };
    if crate::failpoint::value() == Some("stall_mqtt") && kind == TopicKind::Batches {
        eprintln!("FAILPOINT stall_mqtt: the worker hangs on a batch");
        std::future::pending::<()>().await;
    }
    // A topic level can hold what no device_id may (control characters, more than 64 bytes):
    // nothing from such a topic is stored, not even as a device (issue #16: phantom devices).
    if let Err(e) = backhaul_shared::batch::validate_device_id(device) {
        dead_letter(ingest, publish, None, &format!("the topic's device_id {e}")).await;
        return;
    }
    // Within our Maximum Packet Size (max_body_bytes + 64 KiB of slack for the topic and header) a
    // payload can still be over max_body_bytes: refused like an HTTP body of that size.
    if publish.payload.len() > max_bytes {
        let reason = format!("message of {} bytes is over max_body_bytes ({max_bytes})", publish.payload.len());
        dead_letter(ingest, publish, Some(device), &reason).await;
        // Final, like a 413: the device stops resending it (its batch_id is read from a payload no
        // bigger than the announced packet size).
        if kind == TopicKind::Batches {
            if let Some(batch_id) = readable_batch_id(&publish.payload) {
                acks.send(device, batch_id, AckStatus::Rejected, Some(reason)).await;
            }
        }
        return;
    }
    match kind {
        TopicKind::Batches => {
            crate::failpoint::panic_in("mqtt-message");
            handle_batch(ingest, acks, publish, device).await
        }
        TopicKind::Status => match serde_json::from_slice::<DeviceStatus>(&publish.payload) {
            Ok(status) => {
                // A retained status comes again at every subscribe, old: it must not pass for news.
                retry_storage(|| ingest.device_status(device, &status, publish.retain)).await;
            }
            Err(e) => dead_letter(ingest, publish, Some(device), &format!("status is not valid: {e}")).await,
        },
        TopicKind::CommandResults => handle_command_result(ingest, acks, publish, device).await,
        TopicKind::Acks | TopicKind::Commands => {}
    }
}

/// A seed sender's message (issue #20, [`crate::compat`]): a heartbeat updates its device's
/// liveness (written at most every [`crate::store::HEARTBEAT_WRITE_EVERY`]); anything else
/// becomes a batch stored through the one ingest path, with no ack (seed senders listen for
/// none) and no rate limit (they do not resend what the broker took). Unusable: dead-lettered.
async fn handle_seed(ingest: &Ingest, compat: &Compat, publish: &Publish, seed: SeedTopic<'_>, max_bytes: usize) {
    let device = match seed {
        SeedTopic::Agent => None,
        SeedTopic::Thingy { gateway: d, .. } | SeedTopic::Heartbeat { client: d } | SeedTopic::State { client: d } => {
            if let Err(e) = backhaul_shared::batch::validate_device_id(d) {
                return dead_letter(ingest, publish, None, &format!("the topic's device id {e}")).await;
            }
            Some(d)
        }
    };
    if publish.payload.len() > max_bytes {
        let reason = format!("message of {} bytes is over max_body_bytes ({max_bytes})", publish.payload.len());
        return dead_letter(ingest, publish, device, &reason).await;
    }
    let limits = &ingest.limits;
    let batch = match seed {
        SeedTopic::Heartbeat { client } => {
            if serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&publish.payload).is_err() {
                let why = "a heartbeat must be a JSON object (the fleet client sends {\"timestamp\": ...})";
                return dead_letter(ingest, publish, device, why).await;
            }
            if !compat.heartbeat_due(client) {
                return;
            }
            // A heartbeat can create a device: at most NEW_DEVICES_PER_MINUTE new ones, so a flood of
            // made-up client ids cannot fill the fleet.
            match ingest.commands().device_known(client).await {
                Ok(true) => {}
                Ok(false) if compat.new_device_allowed() => {}
                Ok(false) => {
                    compat.heartbeat_failed(client);
                    let why = format!(
                        "more than {} new devices a minute announced by heartbeats: this one is not recorded \
                         (its next heartbeat tries again); check who publishes on rpi/+/heartbeat",
                        crate::compat::NEW_DEVICES_PER_MINUTE
                    );
                    return dead_letter(ingest, publish, device, &why).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, client, "recording a heartbeat failed; the next one tries again");
                    compat.heartbeat_failed(client);
                    return;
                }
            }
            if let Err(e) = ingest.heartbeat(client, backhaul_shared::Timestamp::now().unix_micros()).await {
                tracing::warn!(error = %e, client, "recording a heartbeat failed; the next one tries again");
                compat.heartbeat_failed(client);
            }
            return;
        }
        SeedTopic::Agent => crate::compat::agent_batch(&publish.payload, None, limits),
        SeedTopic::Thingy { gateway, node } => crate::compat::thingy_batch(gateway, node, &publish.payload, limits),
        SeedTopic::State { client } => {
            crate::compat::state_batch(client, &publish.payload, backhaul_shared::Timestamp::now(), limits)
        }
    };
    let batch = match batch {
        Ok(b) => b,
        Err(e) => return dead_letter(ingest, publish, device, &e.to_string()).await,
    };
    // A device that runs backhaul-edge sends its own batches: a seed message in its name can only
    // be someone else's (every agent publishes on one topic, which no ACL can split by device).
    loop {
        match ingest.runs_edge(&batch.device_id).await {
            Ok(false) => break,
            Ok(true) => {
                let why = format!(
                    "device `{}` runs backhaul-edge: seed messages in its name are refused (stop its seed agent)",
                    batch.device_id
                );
                return dead_letter(ingest, publish, Some(&batch.device_id), &why).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "reading a device failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    let raw = batch.to_json();
    let batch_id = batch.batch_id;
    loop {
        match ingest.accept(batch.clone(), &raw, "mqtt-seed", Lookup::First).await {
            Ok(Accepted::Conflict(_)) => {
                return dead_letter(ingest, publish, device, "its derived batch id is stored with another payload")
                    .await
            }
            Ok(_) => return,
            Err(e) => {
                tracing::error!(error = %e, %batch_id, "storing a seed sender's batch failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// A device's answer to a command (issue #18): a [`backhaul_shared::command::Signed`] result,
/// verified with the device's key; recorded unless the command is final already. Anything else
/// is dead-lettered.
async fn handle_command_result(ingest: &Ingest, acks: &AckSender, publish: &Publish, device: &str) {
    use backhaul_shared::command::{CommandResult, Purpose, Signed};
    let opened = serde_json::from_slice::<Signed>(&publish.payload)
        .map_err(|e| format!("a command result is not a signed envelope: {e}"))
        .and_then(|signed| {
            let key = acks.keys.ack_key(device).ok_or("no API key for this device to verify its command result")?;
            let body = signed
                .open(Purpose::Result, device, key)
                .ok_or("a command result whose MAC does not verify with the device's key (forged, or another key)")?;
            serde_json::from_str::<CommandResult>(body)
                .map_err(|e| format!("a command result that does not parse: {e}"))
        })
        .and_then(|r| if r.status.is_final() { Ok(r) } else { Err("a command result must be done or failed".into()) });
    let result = match opened {
        Ok(r) => r,
        Err(why) => return dead_letter(ingest, publish, Some(device), &why).await,
    };
    loop {
        match ingest.commands().finish(device, &result).await {
            Ok(crate::store::Finished::Recorded) => {
                tracing::info!(device, command_id = %result.command_id, status = result.status.as_str(), "command answered");
                return;
            }
            Ok(crate::store::Finished::AlreadyFinal) => return,
            Ok(crate::store::Finished::Unknown) => {
                return dead_letter(ingest, publish, Some(device), "a result for a command this device was never sent")
                    .await
            }
            Err(e) => {
                tracing::error!(error = %e, "storing a command result failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn handle_batch(ingest: &Ingest, acks: &AckSender, publish: &Publish, device: &str) {
    let batch = match ingest.parse(&publish.payload) {
        Ok(b) => b,
        Err(e) => {
            dead_letter(ingest, publish, Some(device), &e.to_string()).await;
            // If its batch_id can be read, tell the device: a rejected batch is final, so it stops
            // resending it.
            if let Some(batch_id) = readable_batch_id(&publish.payload) {
                acks.send(device, batch_id, AckStatus::Rejected, Some(e.to_string())).await;
            }
            return;
        }
    };
    if batch.device_id != device {
        let reason = format!("payload device_id `{}` differs from the topic's `{device}`", batch.device_id);
        retry_storage(|| ingest.count_rejected()).await;
        tracing::warn!(topic = %topic_str(publish), batch_id = %batch.batch_id, "{reason}");
        acks.send(device, batch.batch_id, AckStatus::Rejected, Some(reason)).await;
        return;
    }
    // Over its rate: PUBACKed unstored and not acked, so the edge resends it after its ack timeout
    // (see crate::ratelimit). Charged only for a valid batch of the topic's device, so junk on a
    // device's topic does not use up its allowance.
    if ingest.rates.check(device).is_err() {
        tracing::debug!(device, batch_id = %batch.batch_id, "batch over the device's rate limit: not stored, the edge resends it later");
        return;
    }
    let batch_id = batch.batch_id;
    let mut batch = Some(batch);
    let accepted = loop {
        let b = batch.take().expect("put back on every retry");
        match ingest.accept(b.clone(), &publish.payload, "mqtt", Lookup::Done).await {
            Ok(a) => break a,
            Err(e) => {
                tracing::error!(error = %e, %batch_id, "storing a batch failed; retrying (nothing is acked meanwhile)");
                batch = Some(b);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let (status, reason) = match &accepted {
        Accepted::Stored(_) => (AckStatus::Stored, None),
        Accepted::Duplicate(_) => (AckStatus::Duplicate, None),
        Accepted::Conflict(_) => {
            (AckStatus::Rejected, Some("batch_id already stored with a different payload".to_owned()))
        }
    };
    acks.send(device, batch_id, status, reason).await;
}

fn readable_batch_id(payload: &[u8]) -> Option<backhaul_shared::BatchId> {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        batch_id: backhaul_shared::BatchId,
    }
    serde_json::from_slice::<IdOnly>(payload).ok().map(|i| i.batch_id)
}

async fn dead_letter(ingest: &Ingest, publish: &Publish, device: Option<&str>, error: &str) {
    let topic = topic_str(publish);
    tracing::warn!(topic = %topic, size = publish.payload.len(), error, "unusable MQTT message: dead-lettered");
    retry_storage(|| ingest.dead_letter("mqtt", Some(&topic), device, publish.payload.len(), error, false)).await;
}

async fn retry_storage<F, Fut>(mut op: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), crate::store::StoreError>>,
{
    loop {
        match op().await {
            Ok(()) => return,
            Err(e) => {
                tracing::error!(error = %e, "storage failed; retrying (nothing is acked meanwhile)");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
