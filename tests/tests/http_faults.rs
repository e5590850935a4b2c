//! Issue #13, HTTP: an ack must be the cloud's answer, nothing else. `backhaul-edge run` posts to a
//! stub of a misbehaving server (a redirect to a web page, a proxy or portal answering 200, a
//! redirect to another origin) and must keep every batch queued, say what is wrong in
//! `link.last_error`, and never send the API key anywhere but the configured origin. Once pointed at
//! the real cloud, everything it kept is delivered.

use std::time::Duration;

use backhaul_tests::cloud::{Cloud, CloudOptions, DEVICE, DEVICE_KEY};
use backhaul_tests::edge::{num, Edge, EdgeOptions};
use backhaul_tests::http_stub::{HttpStub, Reply};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);
const BULK: &str = "/api/v1/detections/bulk";

/// An HTTP edge that produces 250 detections (5 batches of 50) and posts them to `url`.
fn edge_posting_to(url: String) -> Edge {
    Edge::start(EdgeOptions { mode: "http", http_url: url, count: 250, ..Default::default() }).unwrap()
}

fn last_error(s: &Value) -> &str {
    s["link"]["last_error"].as_str().unwrap_or_default()
}

/// Nothing acked, everything produced still on the Pi.
fn assert_all_kept(status: &Value) {
    assert_eq!(num(status, "/produced/batches"), 5, "{status}");
    assert_eq!(num(status, "/sent/acked_batches"), 0, "no answer but the cloud's is an ack: {status}");
    assert_eq!(
        num(status, "/queue/pending") + num(status, "/queue/in_flight"),
        5,
        "every batch stays queued: {status}"
    );
    assert_eq!(num(status, "/queue/dead_letters"), 0, "{status}");
}

/// Points the edge at the real cloud (the operator fixes `transport.http.url`) and checks that
/// every batch it kept arrives, once.
fn fix_the_url_and_deliver(mut edge: Edge, wrong_url: &str) {
    let cloud = Cloud::start(CloudOptions::default()).unwrap();
    let config = std::fs::read_to_string(edge.config_path()).unwrap();
    let fixed = config.replace(&format!("url = \"{wrong_url}\""), &format!("url = \"{}\"", cloud.url("")));
    assert_ne!(config, fixed, "the config names {wrong_url}");
    std::fs::write(edge.config_path(), fixed).unwrap();
    edge.kill9_and_restart().unwrap();
    let status = edge.wait_drained(250, T).unwrap();
    let device = cloud.wait_detections(DEVICE, 250, T).unwrap();
    assert_eq!(num(&device, "/batches"), 5, "{device}");
    assert_eq!(num(&status, "/sent/acked_batches"), 5, "{status}");
}

#[test]
fn a_post_redirected_to_a_web_page_is_never_an_ack_and_the_key_stays_at_the_configured_origin() {
    // The listed input: POST bulk → 301 Location: /, GET / → 200 text/html. ureq used to follow
    // the redirect as a GET and count 5 of 5 batches as acked, with nothing stored anywhere.
    let stub = HttpStub::start(&[
        (("GET", "/health"), Reply::health_ok()),
        (("POST", BULK), Reply::redirect(301, "/")),
        (("GET", "/"), Reply::html()),
    ])
    .unwrap();
    let edge = edge_posting_to(stub.url(""));
    let status = edge
        .wait_status("the redirect named in link.last_error after every batch was tried", T, |s| {
            num(s, "/produced/detections") == 250
                && stub.seen_at("POST", BULK).len() >= 5
                && last_error(s).contains("Location: /")
        })
        .unwrap();
    assert_all_kept(&status);
    assert!(last_error(&status).contains("transport.http.url"), "the error says what to fix: {status}");
    // The redirect was never followed: its target saw nothing, so never the key either.
    assert!(stub.seen_at("GET", "/").is_empty(), "the redirect was followed: {:?}", stub.seen());
    let posts = stub.seen_at("POST", BULK);
    assert!(posts.iter().all(|r| r.headers.get("x-api-key").map(String::as_str) == Some(DEVICE_KEY)), "{posts:?}");
    // The key goes only to the API routes at the configured origin (bulk posts, and since issue
    // #18 the command fetch and the status post), never to the redirect's target.
    for r in stub.seen() {
        assert!(
            !r.headers.contains_key("x-api-key")
                || r.path == BULK
                || r.path.starts_with(&format!("/api/v1/devices/{DEVICE}/")),
            "the key went to {} {}",
            r.method,
            r.path
        );
    }
    fix_the_url_and_deliver(edge, &stub.url(""));
}

#[test]
fn a_2xx_that_is_not_the_clouds_answer_for_the_batch_keeps_it_queued() {
    // A proxy or captive portal that answers every POST with a page, and a server that answers with
    // JSON for some other batch: neither deletes anything.
    let portal = HttpStub::start(&[(("GET", "/health"), Reply::health_ok()), (("POST", BULK), Reply::html())]).unwrap();
    let other_id = backhaul_shared::BatchId::new();
    let wrong_id = HttpStub::start(&[
        (("GET", "/health"), Reply::health_ok()),
        (
            ("POST", BULK),
            Reply::new(201, "application/json", &format!(r#"{{"status":"stored","batch_id":"{other_id}"}}"#)),
        ),
    ])
    .unwrap();
    for stub in [&portal, &wrong_id] {
        let edge = edge_posting_to(stub.url(""));
        let status = edge
            .wait_status("every batch tried and the answer refused as an ack", T, |s| {
                num(s, "/produced/detections") == 250
                    && stub.seen_at("POST", BULK).len() >= 5
                    && last_error(s).contains("not the cloud's answer")
            })
            .unwrap();
        assert_all_kept(&status);
        // The link came up on the cloud-like /health and went down on each refused answer, as
        // after a 5xx.
        assert!(num(&status, "/link/link_ups") >= 1, "{status}");
    }
    // One of them fixed: everything it kept arrives.
    let edge = edge_posting_to(portal.url(""));
    edge.wait_status("a refused answer", T, |s| last_error(s).contains("not the cloud's answer")).unwrap();
    fix_the_url_and_deliver(edge, &portal.url(""));
}

#[test]
fn a_redirect_to_another_origin_is_followed_neither_by_posts_nor_by_the_health_probe() {
    // The other origin acts like a cloud (a 307 keeps the method and body, so a client following it
    // would re-post there, API key included, and take its 201 as an ack).
    let elsewhere = HttpStub::start(&[
        (("GET", "/health"), Reply::health_ok()),
        (("POST", BULK), Reply::new(201, "application/json", r#"{"status":"stored"}"#)),
    ])
    .unwrap();
    let redirecting_posts = HttpStub::start(&[
        (("GET", "/health"), Reply::health_ok()),
        (("POST", BULK), Reply::redirect(307, &elsewhere.url(BULK))),
    ])
    .unwrap();
    let edge = edge_posting_to(redirecting_posts.url(""));
    let status = edge
        .wait_status("the redirect named in link.last_error", T, |s| {
            num(s, "/produced/detections") == 250 && last_error(s).contains(&elsewhere.url(BULK))
        })
        .unwrap();
    assert_all_kept(&status);
    drop(edge);

    let redirecting_health =
        HttpStub::start(&[(("GET", "/health"), Reply::redirect(302, &elsewhere.url("/health")))]).unwrap();
    let edge = edge_posting_to(redirecting_health.url(""));
    let status = edge
        .wait_status("the health probe's redirect named in link.last_error", T, |s| {
            num(s, "/produced/detections") == 250 && last_error(s).contains(&elsewhere.url("/health"))
        })
        .unwrap();
    assert_eq!(num(&status, "/link/link_ups"), 0, "a redirected /health never brings the link up: {status}");
    assert_eq!(status["link"]["connected"], false, "{status}");
    assert!(redirecting_health.seen_at("POST", BULK).is_empty());
    assert_all_kept(&status);
    assert!(elsewhere.seen().is_empty(), "the other origin was reached: {:?}", elsewhere.seen());
}

#[test]
fn the_clouds_own_answers_are_acks_and_carry_the_batch_id_the_edge_checks() {
    // The contract the rule above relies on: backhaul-cloud answers 201 stored / 200 duplicate with
    // the batch_id, and the edge's classifier takes exactly those as acks, for that batch only.
    use backhaul_edge::forward::http::{classify, Answer, Class};
    let cloud = Cloud::start(CloudOptions::default()).unwrap();
    let agent = backhaul_tests::cloud::http();
    let batch = backhaul_tests::wire_batch(DEVICE, 1, 3);
    let id = batch.batch_id;
    for (expected_code, duplicate) in [(201, false), (200, true)] {
        let (code, body, _) = backhaul_tests::cloud::post_batch(
            &agent,
            &cloud,
            Some(DEVICE_KEY),
            Some(&id.to_string()),
            &batch.to_json(),
        );
        assert_eq!(code, expected_code, "{body}");
        let json: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["batch_id"], id.to_string(), "{body}");
        let answer = Answer::Status { code, retry_after: None, location: None, body: body.clone() };
        assert_eq!(classify(&answer, id), Class::Acked { duplicate }, "{body}");
        let other = backhaul_shared::BatchId::new();
        assert!(matches!(classify(&answer, other), Class::Retry { .. }), "an answer for {id} acks only {id}");
    }
}
