//! Reading detections from the stored batches (issue #15; the layout is in the module doc of
//! `store`): a page of `GET /api/v1/detections`, newest first, and `reprocess`.
//!
//! A page is the `limit` greatest keys `(ts, batch_id, idx)` below the cursor among the detections
//! that pass the filters. A detection lies inside its batch's `[first_ts, last_ts]`, so a batch
//! with `last_ts` below the page's current last `ts` cannot add a row to a full page: the batches
//! are read newest `last_ts` first and the scan stops there. A batch that can hold a row at or below
//! `hi` (the highest `ts` a row may have) has `first_ts <= hi`, hence `last_ts <= hi + span`: the
//! scan starts at `hi` plus the widest span of the batches it reads (`devices.max_span_us`), not
//! at the newest batch, so deep pages cost what the first page costs. Wide batches (span over
//! [`WIDE_SPAN_US`]) are left out of that bound and scanned on their own index, newest `last_ts`
//! first too; the two scans are merged and stop together.
//!
//! Cost of a page: the batches whose range overlaps it are decoded. With a device filter that is
//! about one batch plus the page's rows; fleet-wide it is about one batch per device that was
//! sending at that time, so a fleet of many devices pays per page what a per-row index would not.
//! Wide batches that overlap the page are decoded too, so a device that keeps sending wide
//! batches (a broken clock, or a hostile device key) slows fleet-wide pages; the per-device rate
//! limit bounds how many there can be.

use std::cmp::Reverse;

use backhaul_shared::{Batch, Detection};

use super::backend::{on_pool, on_tx};
use super::{ts_string, zone_str, DetectionQuery, DetectionRow, Store, StoreError};

/// A batch whose detections span more than this (µs, one hour) is *wide*: it is left out of
/// `devices.max_span_us` and found through the partial index `batches_wide` (migration 5 spells
/// the number out). Normal batches span seconds to minutes (the edge's `max_batch_age`); a wide one
/// is rare, e.g. its clock was set (NTP) while it was being filled.
pub(super) const WIDE_SPAN_US: i64 = 3_600_000_000;

/// Batches fetched per query of a page's scan, at first; doubled up to [`MAX_CHUNK`] while the
/// page is not full.
const FIRST_CHUNK: i64 = 4;
const MAX_CHUNK: i64 = 256;

/// The span (µs) a batch adds to its device's `max_span_us`: its own, or 0 when it is wide or has
/// no detections.
pub(super) fn narrow_span(first_ts: Option<i64>, last_ts: Option<i64>) -> i64 {
    match (first_ts, last_ts) {
        (Some(first), Some(last)) => {
            let span = last.saturating_sub(first);
            if span <= WIDE_SPAN_US {
                span
            } else {
                0
            }
        }
        _ => 0,
    }
}

/// A row with its page key.
struct Keyed {
    key: (i64, String, i64),
    row: DetectionRow,
}

/// The rows of one page being gathered.
struct Page<'q> {
    q: &'q DetectionQuery,
    limit: usize,
    rows: Vec<Keyed>,
    /// `rows` is sorted, newest first, and at most `limit` long.
    compact: bool,
    /// Batches whose payload was offered: a page's statements are not one snapshot, and a batch
    /// whose index a concurrent `reprocess` moved could be met twice.
    offered: std::collections::HashSet<String>,
}

impl<'q> Page<'q> {
    fn new(q: &'q DetectionQuery) -> Self {
        let limit = usize::try_from(q.limit.clamp(1, i64::from(u32::MAX))).unwrap_or(1);
        Self { q, limit, rows: Vec::new(), compact: true, offered: Default::default() }
    }

    /// Adds `row` if it passes the query's time window and lies below its cursor.
    fn offer(&mut self, key: (i64, String, i64), row: impl FnOnce() -> DetectionRow) {
        let ts = key.0;
        if self.q.since_us.is_some_and(|s| ts < s) || self.q.until_us.is_some_and(|u| ts >= u) {
            return;
        }
        if let Some((a_ts, a_batch, a_idx)) = &self.q.after {
            if (ts, key.1.as_str(), key.2) >= (*a_ts, a_batch.as_str(), *a_idx) {
                return;
            }
        }
        self.rows.push(Keyed { key, row: row() });
        self.compact = false;
        // Memory stays about twice a page, however many batches are offered.
        if self.rows.len() >= 2 * self.limit + 1024 {
            self.sort();
        }
    }

    /// Every detection of a decoded batch (once per page).
    fn offer_batch(&mut self, batch_id: &str, batch: &Batch) {
        if !self.offered.insert(batch_id.to_owned()) {
            return;
        }
        for (idx, d) in batch.detections.iter().enumerate() {
            let ts = d.timestamp().unix_micros();
            let idx = idx as i64;
            self.offer((ts, batch_id.to_owned(), idx), || from_detection(&batch.device_id, batch_id, idx, ts, d));
        }
    }

    fn sort(&mut self) {
        if !self.compact {
            self.rows.sort_unstable_by(|a, b| Reverse(&a.key).cmp(&Reverse(&b.key)));
            self.rows.truncate(self.limit);
            self.compact = true;
        }
    }

    /// The `ts` of the page's last row once the page is full: no batch whose `last_ts` is below it
    /// can change the page.
    fn floor(&mut self) -> Option<i64> {
        self.sort();
        (self.rows.len() >= self.limit).then(|| self.rows[self.limit - 1].key.0)
    }

    fn finish(mut self) -> Vec<DetectionRow> {
        self.sort();
        self.rows.into_iter().map(|k| k.row).collect()
    }
}

fn from_detection(device_id: &str, batch_id: &str, idx: i64, ts: i64, d: &Detection) -> DetectionRow {
    let mut row = DetectionRow {
        device_id: device_id.to_owned(),
        batch_id: batch_id.to_owned(),
        kind: String::new(),
        timestamp: ts_string(ts),
        rssi: d.rssi().map(i64::from),
        device_hash: None,
        zone: None,
        node: None,
        temp: None,
        humidity: None,
        co2_ppm: None,
        window_open: None,
        battery: None,
        entity_id: None,
        fields: None,
        cursor: format!("{ts}.{batch_id}.{idx}"),
    };
    match d {
        Detection::Presence(p) => {
            row.kind = "presence".into();
            row.device_hash = Some(p.device_hash.clone());
            row.zone = Some(zone_str(p.zone).into());
        }
        Detection::Sensor(s) => {
            row.kind = "sensor".into();
            row.node = Some(s.node.clone());
            row.temp = s.temp;
            row.humidity = s.humidity.map(i64::from);
            row.co2_ppm = s.co2_ppm.map(i64::from);
            row.window_open = s.window_open;
            row.battery = s.battery.map(i64::from);
        }
        Detection::Telemetry(t) => {
            row.kind = "telemetry".into();
            row.entity_id = Some(i64::from(t.entity_id));
            row.fields = Some(t.fields.clone());
        }
    }
    row
}

/// Decodes a stored payload (see the layout). With serde alone: the batch was validated when it was
/// acked, and a later, stricter validation must not make stored batches unreadable.
fn decode(payload: &[u8]) -> Result<Batch, String> {
    let raw = lz4_flex::decompress_size_prepended(payload).map_err(|e| format!("decompressing: {e}"))?;
    serde_json::from_slice::<Batch>(&raw).map_err(|e| format!("parsing: {e}"))
}

impl Store {
    /// One page of detections, newest first (`(ts, batch_id, idx)` descending), below `q.after`,
    /// at most `q.limit` rows; read from the stored batches, and from the `detections` rows of
    /// batches stored before migration 4. A stored payload that no longer decodes is skipped and
    /// logged (the batch stays stored; a bug to report).
    ///
    /// Errors: the database's ([`StoreError::Db`]).
    pub async fn detections(&self, q: &DetectionQuery) -> Result<Vec<DetectionRow>, StoreError> {
        let mut hi = i64::MAX;
        if let Some(until) = q.until_us {
            hi = hi.min(until.saturating_sub(1));
        }
        if let Some((ts, _, _)) = &q.after {
            hi = hi.min(*ts);
        }
        let lo = q.since_us.unwrap_or(i64::MIN);
        let mut page = Page::new(q);
        if hi < lo {
            return Ok(Vec::new());
        }
        for r in self.legacy_detections(q, page.limit).await? {
            let (ts, idx) = (r.4, r.2);
            let row = legacy_row(r);
            page.offer((ts, row.batch_id.clone(), idx), || row);
        }

        // Narrow batches from hi plus the widest span of the batches read; wide ones (any span)
        // from their own index. Both newest last_ts first, merged.
        let span: i64 = {
            let sql = format!(
                "SELECT COALESCE(MAX(max_span_us), 0) FROM devices WHERE 1 = 1{}",
                q.device_id.as_deref().map(|_| " AND device_id = $1").unwrap_or_default()
            );
            // Only the fixed clause above is spliced in; values are bound.
            on_pool!(&self.db, p => {
                let mut query = sqlx::query_scalar(sqlx::AssertSqlSafe(sql));
                if let Some(d) = &q.device_id {
                    query = query.bind(d);
                }
                query.fetch_one(p).await
            })?
        };
        let mut narrow = Scan::new(false, hi.saturating_add(span.max(0)));
        let mut wide = Scan::new(true, i64::MAX);
        loop {
            let n = narrow.peek(self, q, lo, hi).await?;
            let w = wide.peek(self, q, lo, hi).await?;
            let scan = match (n, w) {
                (None, None) => return Ok(page.finish()),
                (Some(_), None) => &mut narrow,
                (None, Some(_)) => &mut wide,
                (Some(a), Some(b)) => {
                    if a >= b {
                        &mut narrow
                    } else {
                        &mut wide
                    }
                }
            };
            let candidate = scan.pop().expect("peeked");
            if page.floor().is_some_and(|floor| candidate.last_ts < floor) {
                // The newest of both scans can hold no row of the page: neither can the rest.
                return Ok(page.finish());
            }
            match candidate.payload.as_deref().map(decode) {
                Some(Ok(batch)) => page.offer_batch(&candidate.batch_id, &batch),
                Some(Err(e)) => tracing::error!(
                    batch_id = %candidate.batch_id, error = %e,
                    "a stored batch cannot be decoded: its detections are left out of reads (a bug to report; the batch stays stored)"
                ),
                None => {}
            }
        }
    }

    /// Rows of the `detections` table (batches stored before migration 4) for `q`: at most a page.
    async fn legacy_detections(&self, q: &DetectionQuery, limit: usize) -> Result<Vec<LegacyColumns>, StoreError> {
        // Rows of a batch that has a payload are read from it (rows that a build before migration 5
        // still projected on a shared database are not read twice). INTEGER columns are int4 on
        // PostgreSQL: cast, so both backends decode an i64.
        let mut sql = String::from(
            "SELECT device_id, batch_id, CAST(idx AS BIGINT), kind, ts, CAST(rssi AS BIGINT), device_hash, zone, node,
                    temp, CAST(humidity AS BIGINT), co2_ppm, CAST(window_open AS BIGINT), CAST(battery AS BIGINT)
               FROM detections
              WHERE NOT EXISTS (SELECT 1 FROM batches b WHERE b.batch_id = detections.batch_id AND b.payload IS NOT NULL)",
        );
        let mut n = 0;
        let mut next = || {
            n += 1;
            format!("${n}")
        };
        if q.device_id.is_some() {
            sql.push_str(&format!(" AND device_id = {}", next()));
        }
        if q.since_us.is_some() {
            sql.push_str(&format!(" AND ts >= {}", next()));
        }
        if q.until_us.is_some() {
            sql.push_str(&format!(" AND ts < {}", next()));
        }
        if q.after.is_some() {
            let (a, b, c, d, e) = (next(), next(), next(), next(), next());
            sql.push_str(&format!(
                " AND (ts < {a} OR (ts = {b} AND (batch_id < {c} OR (batch_id = {d} AND idx < {e}))))"
            ));
        }
        sql.push_str(&format!(" ORDER BY ts DESC, batch_id DESC, idx DESC LIMIT {}", next()));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // Only placeholders are spliced in; values are bound.
        Ok(on_pool!(&self.db, p => {
            let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql));
            if let Some(d) = &q.device_id {
                query = query.bind(d);
            }
            if let Some(s) = q.since_us {
                query = query.bind(s);
            }
            if let Some(u) = q.until_us {
                query = query.bind(u);
            }
            if let Some((ts, batch, idx)) = &q.after {
                query = query.bind(*ts).bind(*ts).bind(batch).bind(batch).bind(*idx);
            }
            query.bind(limit).fetch_all(p).await
        })?)
    }

    /// Re-derives the index fields of stored batches from their payloads (`backhaul-cloud
    /// reprocess`, after a decoder fix): `first_ts`, `last_ts` and the devices' `max_span_us`; for
    /// those received at or after `since_us` (UTC µs), of `device_id` if given. Each batch is
    /// updated in place, so nothing is stored twice; one whose payload no longer decodes keeps its
    /// fields and is counted (and logged). Returns (reindexed, undecodable, skipped: stored before
    /// migration 4, without a payload, whose `detections` rows are their only copy).
    ///
    /// Errors: the database's ([`StoreError::Db`]).
    pub async fn reprocess(&self, since_us: Option<i64>, device_id: Option<&str>) -> Result<Reprocessed, StoreError> {
        let device_clause = if device_id.is_some() { " AND device_id = $2" } else { "" };
        let since = since_us.unwrap_or(i64::MIN);
        // One read of the batch_ids in range, each with whether it has a payload. Only the fixed
        // clause is spliced in; values are bound.
        let sql = format!(
            "SELECT batch_id, CASE WHEN payload IS NULL THEN 0 ELSE 1 END FROM batches
              WHERE received_at >= $1{device_clause} ORDER BY batch_id"
        );
        let rows: Vec<(String, i32)> = on_pool!(&self.db, p => {
            let q = sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(since);
            match device_id {
                Some(d) => q.bind(d),
                None => q,
            }
            .fetch_all(p)
            .await
        })?;
        let (with, without): (Vec<_>, Vec<_>) = rows.into_iter().partition(|(_, has_payload)| *has_payload != 0);
        let skipped = without.len();
        let ids: Vec<String> = with.into_iter().map(|(id, _)| id).collect();
        let mut done = Reprocessed { skipped: skipped as u64, ..Default::default() };
        // Payloads are read and decoded outside any transaction; each chunk's updates are one
        // short write transaction, so `serve`'s writes wait milliseconds, not a decode of 256 batches.
        for chunk in ids.chunks(256) {
            let mut updates = Vec::with_capacity(chunk.len());
            for batch_id in chunk {
                let sql = "SELECT payload FROM batches WHERE batch_id = $1";
                let payload: Vec<u8> =
                    on_pool!(&self.db, p => sqlx::query_scalar(sql).bind(batch_id).fetch_one(p).await)?;
                match decode(&payload) {
                    Ok(batch) => {
                        let times = batch.detections.iter().map(|d| d.timestamp().unix_micros());
                        let (first_ts, last_ts) = (times.clone().min(), times.max());
                        updates.push((batch_id.clone(), batch.device_id, first_ts, last_ts));
                    }
                    Err(e) => {
                        tracing::error!(%batch_id, error = %e, "a stored batch cannot be decoded: its index fields are kept (a bug to report)");
                        done.undecodable += 1;
                    }
                }
            }
            let _writer = self.writer().await;
            let mut tx = self.begin_write().await?;
            for (batch_id, device_id, first_ts, last_ts) in &updates {
                let span = narrow_span(*first_ts, *last_ts);
                on_tx!(&mut tx, t => async {
                    sqlx::query("UPDATE batches SET first_ts = $1, last_ts = $2 WHERE batch_id = $3")
                        .bind(*first_ts)
                        .bind(*last_ts)
                        .bind(batch_id)
                        .execute(&mut **t)
                        .await?;
                    sqlx::query(
                        "UPDATE devices SET max_span_us = CASE WHEN $1 > max_span_us THEN $1 ELSE max_span_us END
                          WHERE device_id = $2",
                    )
                    .bind(span)
                    .bind(device_id)
                    .execute(&mut **t)
                    .await
                    .map(|r| r.rows_affected())
                }
                .await)?;
            }
            tx.commit().await?;
            done.reindexed += updates.len() as u64;
        }
        Ok(done)
    }
}

/// A stored batch that may hold rows of a page.
struct Candidate {
    batch_id: String,
    last_ts: i64,
    payload: Option<Vec<u8>>,
}

/// One scan of a page over `batches`, newest `(last_ts, batch_id)` first, in chunks that double
/// from [`FIRST_CHUNK`] to [`MAX_CHUNK`] (keyset paging, so each chunk starts where the last ended):
/// the narrow batches from `top` down, or the wide ones (index `batches_wide`).
struct Scan {
    wide: bool,
    top: i64,
    chunk: i64,
    below: Option<(i64, String)>,
    buffer: std::collections::VecDeque<Candidate>,
    done: bool,
}

impl Scan {
    fn new(wide: bool, top: i64) -> Self {
        Self { wide, top, chunk: FIRST_CHUNK, below: None, buffer: Default::default(), done: false }
    }

    /// The next candidate's `(last_ts, batch_id)`, reading a chunk if needed.
    async fn peek(
        &mut self,
        store: &Store,
        q: &DetectionQuery,
        lo: i64,
        hi: i64,
    ) -> Result<Option<(i64, String)>, StoreError> {
        if self.buffer.is_empty() && !self.done {
            self.fill(store, q, lo, hi).await?;
        }
        Ok(self.buffer.front().map(|c| (c.last_ts, c.batch_id.clone())))
    }

    fn pop(&mut self) -> Option<Candidate> {
        self.buffer.pop_front()
    }

    async fn fill(&mut self, store: &Store, q: &DetectionQuery, lo: i64, hi: i64) -> Result<(), StoreError> {
        // `3600000000` is WIDE_SPAN_US, literal so that SQLite matches the partial index.
        let kind = if self.wide {
            "last_ts - first_ts > 3600000000"
        } else {
            "last_ts - first_ts <= 3600000000 AND last_ts <= $3"
        };
        let mut sql =
            format!("SELECT batch_id, last_ts, payload FROM batches WHERE {kind} AND last_ts >= $1 AND first_ts <= $2");
        let mut n = if self.wide { 2 } else { 3 };
        let mut next = || {
            n += 1;
            format!("${n}")
        };
        if q.device_id.is_some() {
            sql.push_str(&format!(" AND device_id = {}", next()));
        }
        if self.below.is_some() {
            let (a, b, c) = (next(), next(), next());
            sql.push_str(&format!(" AND (last_ts < {a} OR (last_ts = {b} AND batch_id < {c}))"));
        }
        sql.push_str(&format!(" ORDER BY last_ts DESC, batch_id DESC LIMIT {}", next()));
        // Only placeholders and the fixed clauses above are spliced in; values are bound.
        let rows: Vec<(String, i64, Option<Vec<u8>>)> = on_pool!(&store.db, p => {
            let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(lo).bind(hi);
            if !self.wide {
                query = query.bind(self.top);
            }
            if let Some(d) = &q.device_id {
                query = query.bind(d);
            }
            if let Some((last_ts, batch_id)) = &self.below {
                query = query.bind(*last_ts).bind(*last_ts).bind(batch_id);
            }
            query.bind(self.chunk).fetch_all(p).await
        })?;
        self.done = (rows.len() as i64) < self.chunk;
        self.chunk = (self.chunk * 2).min(MAX_CHUNK);
        for (batch_id, last_ts, payload) in rows {
            let candidate = Candidate { batch_id, last_ts, payload };
            self.below = Some((candidate.last_ts, candidate.batch_id.clone()));
            self.buffer.push_back(candidate);
        }
        Ok(())
    }
}

/// What [`Store::reprocess`] did, in batches.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reprocessed {
    /// Index fields re-derived from the payload.
    pub reindexed: u64,
    /// The payload no longer decodes: fields kept, logged.
    pub undecodable: u64,
    /// Stored before migration 4, without a payload: nothing to derive from.
    pub skipped: u64,
}

/// The columns [`Store::legacy_detections`] selects, in order: device_id, batch_id, idx, kind, ts,
/// rssi, device_hash, zone, node, temp, humidity, co2_ppm, window_open, battery.
type LegacyColumns = (
    String,
    String,
    i64,
    String,
    i64,
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<f64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

fn legacy_row(r: LegacyColumns) -> DetectionRow {
    let (
        device_id,
        batch_id,
        idx,
        kind,
        ts,
        rssi,
        device_hash,
        zone,
        node,
        temp,
        humidity,
        co2_ppm,
        window_open,
        battery,
    ) = r;
    DetectionRow {
        device_id,
        cursor: format!("{ts}.{batch_id}.{idx}"),
        batch_id,
        kind,
        timestamp: ts_string(ts),
        rssi,
        device_hash,
        zone,
        node,
        temp,
        humidity,
        co2_ppm,
        window_open: window_open.map(|v| v != 0),
        battery,
        entity_id: None,
        fields: None,
    }
}
