//! The HTTP server loop: hyper's HTTP/1 connection driver under limits that axum's `serve` does
//! not offer (issue #14, kind 5: idle and trickling connections must not take the service's
//! memory or file descriptors).
//!
//! - At most `max_connections` connections are open; the next is accepted only when one closes,
//!   so the rest wait in the kernel's accept queue (bounded by its backlog) and cost no file
//!   descriptor of ours.
//! - A client must send a request's headers within `header_read_timeout`, idle keep-alive
//!   connections included (hyper's `header_read_timeout`); the connection is closed otherwise.
//! - Bodies are read by the bulk handler's gate under `body_read_timeout` (see [`crate::http`]).
//! - A stop closes the listener and lets the connections in progress finish their request (idle
//!   ones close at once) for up to 10 s; the rest are closed with the process.
//! - With `[tls]`, each connection is a TLS session (rustls, ring) whose handshake must also end
//!   within `header_read_timeout`; the server config is read per connection from [`TlsState`], so
//!   a SIGHUP reload applies to new connections and drops none. With mTLS the client
//!   certificate's names reach the handlers as a [`PeerNames`] extension.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

/// The HTTP listener's TLS config, swapped whole on reload.
pub type TlsState = Arc<std::sync::RwLock<Arc<backhaul_shared::tls::rustls::ServerConfig>>>;

/// The names (DNS subjectAltNames and CNs) of the client certificate of an mTLS connection.
#[derive(Debug, Clone)]
pub struct PeerNames(pub Arc<Vec<String>>);

/// Connection limits (SPEC.md, "Cloud command line and configuration"; README "Valid ranges").
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
}

/// Serves `router` on `listener` until `stop` turns true, then waits for the requests in progress.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    tls: Option<TlsState>,
    mut stop: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    loop {
        if *stop.borrow() {
            break;
        }
        // A free slot first: without one, nothing is accepted (and no descriptor taken).
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = stop.changed() => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and friends: wait a little instead of spinning; the connection waits
                    // in the accept queue meanwhile.
                    tracing::warn!(error = %e, "accepting an HTTP connection failed; retrying in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let Some(tls) = &tls else {
            let connection = http1.serve_connection(TokioIo::new(stream), TowerToHyperService::new(router.clone()));
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                // Errors here are the client's (a reset, a header timeout): nothing to do about them.
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
                drop(permit);
            });
            continue;
        };
        let config = tls.read().unwrap_or_else(|p| p.into_inner()).clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let (http1, router, watcher) = (http1.clone(), router.clone(), graceful.watcher());
        let handshake_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!("TLS handshake not done within header_read_timeout; closed");
                    return;
                }
            };
            let names: Vec<String> = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|leaf| backhaul_shared::tls::certificate_names(leaf))
                .unwrap_or_default();
            let router =
                if names.is_empty() { router } else { router.layer(axum::Extension(PeerNames(Arc::new(names)))) };
            let connection = http1.serve_connection(TokioIo::new(stream), TowerToHyperService::new(router));
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!(error = %e, "HTTPS connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    // Bounded below the service's stop grace: a client trickling a body (up to body_read_timeout)
    // or reading a response slowly must not make a clean stop fail.
    if tokio::time::timeout(DRAIN, graceful.shutdown()).await.is_err() {
        tracing::warn!(
            "HTTP connections still busy {} s after the stop; closing them (their clients retry)",
            DRAIN.as_secs()
        );
    }
}

/// How long a stop waits for the HTTP requests in progress.
const DRAIN: Duration = Duration::from_secs(10);
