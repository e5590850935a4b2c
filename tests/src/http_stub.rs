//! A stub of a misbehaving third-party HTTP server for tests: a `std::net::TcpListener` on a free
//! loopback port, one thread, canned answers by method and path, and a record of every request it
//! saw (method, path, headers), so a test can assert what an edge sent where.
//!
//! HTTP/1.1 with `Connection: close` on every answer: one request per connection, nothing more is
//! needed to stand in for a proxy, a captive portal or a web server at the wrong URL.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};

/// A canned answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    /// Extra headers, e.g. `("Location", "/")`.
    pub headers: Vec<(String, String)>,
    pub content_type: String,
    pub body: String,
}

impl Reply {
    pub fn new(code: u16, content_type: &str, body: &str) -> Self {
        Self { code, headers: Vec::new(), content_type: content_type.into(), body: body.into() }
    }

    /// A redirect to `location` with an empty body.
    pub fn redirect(code: u16, location: &str) -> Self {
        Self { headers: vec![("Location".into(), location.into())], ..Self::new(code, "text/plain", "") }
    }

    /// 200 with an HTML page.
    pub fn html() -> Self {
        Self::new(200, "text/html; charset=utf-8", "<!doctype html><html><body><h1>Welcome</h1></body></html>")
    }

    /// 200 `{"status":"ok"}`, the cloud's `/health`.
    pub fn health_ok() -> Self {
        Self::new(200, "application/json", r#"{"status":"ok"}"#)
    }
}

/// One request the stub received. Header names are lower case.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: BTreeMap<String, String>,
}

/// The stub server; stops (and frees its port) when dropped.
#[derive(Debug)]
pub struct HttpStub {
    pub port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
}

type Routes = Vec<((String, String), Reply)>;

impl HttpStub {
    /// Serves `routes` (`(method, path)` → reply); anything else gets 404.
    pub fn start(routes: &[((&str, &str), Reply)]) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the stub's port")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let routes: Routes = routes.iter().map(|((m, p), r)| ((m.to_string(), p.to_string()), r.clone())).collect();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        std::thread::Builder::new().name(format!("http-stub-{port}")).spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if let Some(request) = serve(stream, &routes) {
                            seen2.lock().unwrap_or_else(|p| p.into_inner()).push(request);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        })?;
        Ok(Self { port, seen, stop })
    }

    /// `http://127.0.0.1:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The requests so far with this method and path.
    pub fn seen_at(&self, method: &str, path: &str) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.method == method && s.path == path).collect()
    }
}

impl Drop for HttpStub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Reads one request (head and a `Content-Length` body) and answers it.
fn serve(stream: TcpStream, routes: &Routes) -> Option<Seen> {
    stream.set_nonblocking(false).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_owned(), parts.next()?.to_owned());
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let length: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    let reply = routes
        .iter()
        .find(|((m, p), _)| *m == method && *p == path)
        .map(|(_, r)| r.clone())
        .unwrap_or_else(|| Reply::new(404, "text/plain", "not found"));
    let mut out = format!(
        "HTTP/1.1 {} Stub\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        reply.code,
        reply.content_type,
        reply.body.len()
    );
    for (k, v) in &reply.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(&reply.body);
    let mut stream = stream;
    let _ = stream.write_all(out.as_bytes());
    let _ = stream.flush();
    Some(Seen { method, path, headers })
}
