//! The `ble` source: a thin adapter from btleplug (BlueZ over D-Bus) to [`Advertisement`]s; all
//! decoding happens after it, in code tested without a radio. **Not tested on a real radio here**
//! (these machines have none): it builds, and its logic is kept to the few lines below.
//!
//! - The first adapter, or the one whose name starts with `source.adapter` (e.g. "hci0"); an
//!   optional service-UUID filter.
//! - BlueZ never sends `DeviceUpdated` (PITFALLS): every `DeviceDiscovered`, `RssiUpdate`,
//!   `ManufacturerDataAdvertisement`, `ServiceDataAdvertisement` and `ServicesAdvertisement` is
//!   read as "this peripheral was heard now": its current properties become one advertisement.
//! - It never exits on adapter resets or bluetoothd restarts: the scan is set up again with backoff,
//!   logged.
//! - BlueZ is known to stop reporting advertisements silently after hours (bluez #1126): when
//!   nothing is heard for `stall_after_s`, the scan is restarted; if still nothing, the adapter is
//!   opened again from scratch. Each recovery is counted (`/status`: `source.recoveries`). (A power
//!   cycle of the adapter through BlueZ's `Adapter1.Powered` is not done: btleplug has no call
//!   for it.)

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use btleplug::api::{Central, CentralEvent, Manager as _, Peripheral as _, ScanFilter};
use btleplug::platform::Manager;
use futures_util::StreamExt;

use super::{Next, Source};
use crate::decode::{Advertisement, Decoder};
use crate::telemetry::Telemetry;
use backhaul_shared::link::Backoff;

/// What to scan with.
#[derive(Debug, Clone)]
pub struct BleSettings {
    /// A prefix of the adapter's name ("hci0"); `None`: the first.
    pub adapter: Option<String>,
    /// Service UUIDs to filter on; empty: everything.
    pub services: Vec<String>,
    pub stall_after: Duration,
}

/// The scanner's thread and the advertisements it hears.
#[derive(Debug)]
pub struct Scanner {
    rx: mpsc::Receiver<Advertisement>,
}

/// Advertisements buffered between the radio and the pipeline before the oldest are lost
/// (counted in the log): a Pi 4 hears at most a few thousand a second.
const BUFFER: usize = 20_000;

impl Scanner {
    /// Starts scanning on a thread of its own; it keeps trying until the receiver is dropped.
    pub fn start(settings: BleSettings, telemetry: Arc<Telemetry>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(BUFFER);
        std::thread::Builder::new().name("ble".into()).spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                tracing::error!("cannot start the BLE scanner's runtime");
                return;
            };
            rt.block_on(scan_forever(settings, tx, telemetry));
        })?;
        Ok(Self { rx })
    }

    /// The next advertisement heard, waiting at most `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<Advertisement> {
        self.rx.recv_timeout(timeout).ok()
    }
}

async fn scan_forever(settings: BleSettings, tx: mpsc::SyncSender<Advertisement>, telemetry: Arc<Telemetry>) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    // One D-Bus connection for the thread's life: btleplug keeps each Manager's connection task
    // running forever, so a Manager per retry would leak one per attempt.
    let manager = loop {
        match Manager::new().await {
            Ok(m) => break m,
            Err(e) => {
                let delay = backoff.next_random(None);
                let e = format!(
                    "cannot reach BlueZ: the D-Bus system bus does not answer (are dbus and bluetoothd running?): {e}"
                );
                tracing::warn!(error = %e, retry_in = ?delay, "BLE scanning cannot start yet");
                telemetry.set_source_error(e);
                tokio::time::sleep(delay).await;
            }
        }
    };
    backoff.reset();
    loop {
        let started = Instant::now();
        match scan(&manager, &settings, &tx, &telemetry).await {
            Ok(()) => return, // nobody listens any more
            Err(e) => {
                if started.elapsed() > Duration::from_secs(60) {
                    backoff.reset();
                }
                let delay = backoff.next_random(None);
                tracing::warn!(error = %e, retry_in = ?delay, "BLE scanning stopped; starting it again");
                telemetry.set_source_error(e);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// One scanning session; `Ok` only when the receiver is gone.
async fn scan(
    manager: &Manager,
    settings: &BleSettings,
    tx: &mpsc::SyncSender<Advertisement>,
    telemetry: &Telemetry,
) -> Result<(), String> {
    let adapters =
        manager.adapters().await.map_err(|e| format!("cannot reach BlueZ over D-Bus (is bluetoothd running?): {e}"))?;
    let mut chosen = None;
    for adapter in adapters {
        let info = adapter.adapter_info().await.unwrap_or_default();
        if settings.adapter.as_deref().is_none_or(|want| info.starts_with(want)) {
            chosen = Some((adapter, info));
            break;
        }
    }
    let (central, info) = chosen.ok_or_else(|| match &settings.adapter {
        Some(a) => format!("no Bluetooth adapter named {a} (source.adapter; `hciconfig` lists them)"),
        None => "no Bluetooth adapter found (`hciconfig`; is bluetoothd running?)".to_owned(),
    })?;
    let services = settings
        .services
        .iter()
        .map(|s| uuid::Uuid::parse_str(s).map_err(|e| format!("source.services: `{s}` is not a UUID: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let filter = ScanFilter { services };
    let mut events = central.events().await.map_err(|e| format!("{info}: no event stream: {e}"))?;
    central.start_scan(filter.clone()).await.map_err(|e| format!("{info}: cannot start scanning: {e}"))?;
    tracing::info!(adapter = %info, "scanning for BLE advertisements");
    let mut rescanned = false;
    loop {
        let next = tokio::select! {
            n = tokio::time::timeout(settings.stall_after, events.next()) => n,
            // An operator's `rescan` command (issue #18): reopen the adapter, as after a stall.
            _ = telemetry.rescan.notified() => {
                telemetry.source_recoveries.fetch_add(1, Ordering::Relaxed);
                let _ = central.stop_scan().await;
                return Err(format!("{info}: rescan asked by an operator's command; opening the adapter again"));
            }
        };
        let event = match next {
            Ok(Some(e)) => e,
            Ok(None) => return Err(format!("{info}: the event stream ended (adapter reset or bluetoothd restarted?)")),
            Err(_) if !rescanned => {
                telemetry.source_recoveries.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(adapter = %info, silent = ?settings.stall_after, "nothing heard: restarting the scan (BlueZ stalls, bluez #1126)");
                let _ = central.stop_scan().await;
                central
                    .start_scan(filter.clone())
                    .await
                    .map_err(|e| format!("{info}: cannot restart scanning: {e}"))?;
                rescanned = true;
                continue;
            }
            Err(_) => {
                telemetry.source_recoveries.fetch_add(1, Ordering::Relaxed);
                return Err(format!(
                    "{info}: still nothing heard after restarting the scan; opening the adapter again"
                ));
            }
        };
        let id = match event {
            CentralEvent::DeviceDiscovered(id)
            | CentralEvent::RssiUpdate { id, .. }
            | CentralEvent::ManufacturerDataAdvertisement { id, .. }
            | CentralEvent::ServiceDataAdvertisement { id, .. }
            | CentralEvent::ServicesAdvertisement { id, .. } => id,
            _ => continue,
        };
        let Ok(peripheral) = central.peripheral(&id).await else { continue };
        let Ok(Some(p)) = peripheral.properties().await else { continue };
        let Some(rssi) = p.rssi else { continue };
        rescanned = false;
        let adv = Advertisement {
            t: crate::clock::now(),
            address: p.address.to_string(),
            address_type: p.address_type.map(|t| format!("{t:?}").to_ascii_lowercase()),
            rssi,
            tx_power: p.tx_power_level,
            manufacturer_data: p.manufacturer_data.into_iter().collect(),
            service_data: p.service_data.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            services: p.services.iter().map(ToString::to_string).collect(),
            name: p.local_name,
        };
        match tx.try_send(adv) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Full(_)) => tracing::warn!("the pipeline is behind: an advertisement was dropped"),
            Err(mpsc::TrySendError::Disconnected(_)) => return Ok(()),
        }
    }
}

/// The live source: advertisements from the scanner through the decoders. Not resumable (a radio
/// cannot be rewound): its detections carry no position.
#[derive(Debug)]
pub struct Ble {
    scanner: Scanner,
    decoder: Decoder,
    ready: std::collections::VecDeque<backhaul_shared::Detection>,
}

impl Ble {
    pub fn new(scanner: Scanner, decoder: Decoder) -> Self {
        Self { scanner, decoder, ready: Default::default() }
    }
}

impl Source for Ble {
    fn next(&mut self, _now: Instant) -> Next {
        loop {
            if let Some(d) = self.ready.pop_front() {
                return Next::Detection(d, None);
            }
            match self.scanner.rx.try_recv() {
                Ok(adv) => self.ready.extend(self.decoder.decode(&adv)),
                Err(mpsc::TryRecvError::Empty) => return Next::Wait(Duration::from_millis(50)),
                Err(mpsc::TryRecvError::Disconnected) => return Next::Done,
            }
        }
    }
}
