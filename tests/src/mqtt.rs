//! A small MQTT client for tests: rumqttc with its event loop polled in its own task (PITFALLS:
//! awaiting `publish` from the polling task deadlocks), incoming publishes and connection events
//! delivered on channels.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// What the event loop reported.
#[derive(Debug, Clone)]
pub enum ClientEvent {
    /// A CONNACK: connected (again).
    Connected { session_present: bool },
    /// A message on a subscribed topic.
    Message { topic: String, payload: Vec<u8>, dup: bool },
    /// The broker acknowledged the QoS 1 publish with this packet id.
    PubAck(u16),
    /// The broker granted a subscription.
    SubAck,
    /// The connection failed or dropped; the loop keeps retrying.
    Disconnected(String),
}

#[derive(Debug)]
pub struct TestClient {
    pub client: AsyncClient,
    pub events: mpsc::UnboundedReceiver<ClientEvent>,
    task: JoinHandle<()>,
}

impl TestClient {
    /// Connects to `127.0.0.1:port` as `client_id`. `clean_session = false` keeps the session in the broker.
    pub fn connect(port: u16, client_id: &str, clean_session: bool) -> Self {
        Self::connect_as(port, client_id, clean_session, None)
    }

    /// Like [`TestClient::connect`], logging in as `(username, password)`.
    pub fn connect_as(port: u16, client_id: &str, clean_session: bool, login: Option<(&str, &str)>) -> Self {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        if let Some((user, password)) = login {
            options.set_credentials(user, password);
        }
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_clean_session(clean_session)
            .set_max_packet_size(64 << 20, 64 << 20);
        let (client, eventloop) = AsyncClient::new(options, 100);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(poll(eventloop, tx));
        Self { client, events, task }
    }

    /// Waits for the next event matching `pick`, skipping others.
    pub async fn next_matching<T>(
        &mut self,
        timeout: Duration,
        what: &str,
        mut pick: impl FnMut(ClientEvent) -> Option<T>,
    ) -> Result<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let event = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .with_context(|| format!("timed out after {timeout:?} waiting for {what}"))?;
            let Some(event) = event else { bail!("the event loop ended while waiting for {what}") };
            if let Some(v) = pick(event) {
                return Ok(v);
            }
        }
    }

    pub async fn connected(&mut self, timeout: Duration) -> Result<bool> {
        self.next_matching(timeout, "a CONNACK", |e| match e {
            ClientEvent::Connected { session_present } => Some(session_present),
            _ => None,
        })
        .await
    }

    /// Waits for the next message on an acks topic (`{prefix}/{device}/acks`), parsed.
    pub async fn next_ack(&mut self, timeout: Duration) -> Result<backhaul_shared::AckMessage> {
        self.next_matching(timeout, "an ack", |e| match e {
            ClientEvent::Message { topic, payload, .. } if topic.ends_with("/acks") => {
                Some(serde_json::from_slice::<backhaul_shared::AckMessage>(&payload).expect("acks are valid JSON"))
            }
            _ => None,
        })
        .await
    }

    /// Subscribes with QoS 1 and waits for the SUBACK.
    pub async fn subscribe(&mut self, filter: &str) -> Result<()> {
        self.client.subscribe(filter, QoS::AtLeastOnce).await?;
        self.next_matching(Duration::from_secs(10), "SUBACK", |e| matches!(e, ClientEvent::SubAck).then_some(())).await
    }
}

impl Drop for TestClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn poll(mut eventloop: EventLoop, tx: mpsc::UnboundedSender<ClientEvent>) {
    loop {
        let event = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                ClientEvent::Connected { session_present: ack.session_present }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                ClientEvent::Message { topic: p.topic.clone(), payload: p.payload.to_vec(), dup: p.dup }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => ClientEvent::PubAck(ack.pkid),
            Ok(Event::Incoming(Packet::SubAck(_))) => ClientEvent::SubAck,
            Ok(_) => continue,
            Err(e) => {
                let _ = tx.send(ClientEvent::Disconnected(e.to_string()));
                // rumqttc reconnects on the next poll; don't spin while the broker is down.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if tx.send(event).is_err() {
            return;
        }
    }
}
