//! backhaul-cloud: ingest that stores every batch exactly once by its `batch_id`.
//!
//! `http` and `mqtt` are thin ingress adapters that both call [`ingest::Ingest::accept`], which
//! validates, deduplicates and calls [`store`]; no SQL in the adapters.

pub mod compat;
pub mod config;
pub mod failpoint;
pub mod http;
pub mod ingest;
pub mod live;
pub mod mqtt;
pub mod progress;
pub mod ratelimit;
pub mod serve;
pub mod store;

/// Aborts a task when dropped (a helper task that must not outlive its owner).
#[derive(Debug)]
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
