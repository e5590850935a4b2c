//! The OpenAPI document (issue #19): `GET /api/v1/openapi.json` covers every route the cloud
//! serves, and schemathesis (pinned in `tests/schemathesis/requirements.txt`, installed by
//! `scripts/test` into `target/schemathesis`) fuzzes a live cloud with it: no 5xx, and every
//! answer's status code, content type, headers and body as the document says; a route that needs
//! a key refuses a request without one.
//!
//! Left out of the fuzzing: `GET /api/v1/live`, a stream that never ends (the browser test reads
//! it). The fuzzer runs with a fleet key and with a device key.

use std::path::{Path, PathBuf};
use std::process::Command;

use backhaul_tests::cloud::{get_json, http, post_batch, Cloud, CloudOptions, DEVICE, DEVICE_KEY, FLEET_KEY};
use backhaul_tests::{skip, wire_batch};
use serde_json::Value;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the workspace").to_owned()
}

/// The routes the router serves, as `METHOD path` (kept in step with `cloud/src/http/mod.rs`).
const ROUTES: &[&str] = &[
    "get /",
    "get /health",
    "get /metrics",
    "get /api/v1/openapi.json",
    "post /api/v1/detections/bulk",
    "get /api/v1/stats",
    "get /api/v1/devices",
    "get /api/v1/detections",
    "get /api/v1/devices/{device_id}/gaps",
    "get /api/v1/devices/{device_id}/batches",
    "post /api/v1/devices/{device_id}/status",
    "get /api/v1/dead-letters",
    "get /api/v1/ingest-rate",
    "get /api/v1/live",
    "post /api/v1/devices/{device_id}/commands",
    "get /api/v1/devices/{device_id}/commands",
    "get /api/v1/devices/{device_id}/commands/{command_id}",
    "post /api/v1/devices/{device_id}/commands/{command_id}/result",
];

#[test]
fn the_document_names_every_route_with_its_statuses_and_every_route_needs_a_key_unless_public() {
    let cloud = Cloud::start(CloudOptions::default()).unwrap();
    let (code, doc) = get_json(&http(), &cloud, "/api/v1/openapi.json");
    assert_eq!(code, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{}", doc["openapi"]);
    let mut documented: Vec<String> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            documented.push(format!("{method} {path}"));
            let responses = op["responses"].as_object().unwrap();
            assert!(responses.keys().any(|c| c.starts_with('2')), "{method} {path}: no success answer");
            let public = op["security"] == serde_json::json!([{}]);
            if !public {
                assert!(responses.contains_key("401"), "{method} {path}: 401 not documented");
            }
            // Every documented route exists: without a key it is a 401 (or served, if public),
            // never axum's 404 or 405.
            let url =
                cloud.url(&path.replace("{device_id}", DEVICE).replace("{command_id}", "01JAAAAAAAAAAAAAAAAAAAAAAA"));
            if path == "/api/v1/live" {
                continue;
            }
            let r = match method.as_str() {
                "get" => http().get(&url).call(),
                "post" => http().post(&url).header("Content-Type", "application/json").send("{}".as_bytes()),
                other => panic!("unexpected method {other}"),
            }
            .unwrap();
            let want = if public { 200 } else { 401 };
            assert_eq!(r.status().as_u16(), want, "{method} {path}");
        }
    }
    // Every POST says what its body is.
    for (path, item) in doc["paths"].as_object().unwrap() {
        if let Some(post) = item.get("post") {
            let schema = &post["requestBody"]["content"]["application/json"]["schema"];
            assert!(
                schema["$ref"].as_str().is_some_and(|r| r.starts_with("#/components/schemas/")),
                "POST {path}: {schema}"
            );
        }
    }
    documented.sort();
    let mut routes: Vec<String> = ROUTES.iter().map(|s| s.to_string()).collect();
    routes.sort();
    assert_eq!(documented, routes);
    // A schema for every body it names.
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for name in [
        "DeviceRow",
        "Ledger",
        "Backlog",
        "CommandRow",
        "ErrorBody",
        "LiveEvent",
        "RatePoint",
        "Stats",
        // Request bodies, from the shared types themselves.
        "BulkBody",
        "Batch",
        "Detection",
        "Telemetry",
        "AgentBody",
        "DeviceStatus",
        "CommandKind",
        "CommandResult",
    ] {
        assert!(schemas.contains_key(name), "no schema {name}: {:?}", schemas.keys().collect::<Vec<_>>());
    }
}

#[test]
fn a_malformed_query_or_path_is_a_json_400_naming_the_problem() {
    let cloud = Cloud::start(CloudOptions::default()).unwrap();
    // Each with the parameter its `field` must name (a fresh operator's try: none was named).
    let device = DEVICE;
    let b = wire_batch(DEVICE, 0, 1);
    let stored = post_batch(&http(), &cloud, Some(DEVICE_KEY), Some(&b.batch_id.to_string()), &b.to_json());
    assert_eq!(stored.0, 201, "{}", stored.1);
    for (path, field) in [
        ("/api/v1/detections?limit=abc".to_owned(), "limit"),
        ("/api/v1/dead-letters?limit=1.5".to_owned(), "limit"),
        ("/api/v1/ingest-rate?seconds=-1".to_owned(), "seconds"),
        ("/api/v1/detections?since=2026-11-30T10:00:00Z&limit=".to_owned(), "limit"),
        // A misspelt parameter is refused, not ignored (a typo in device_id would read the fleet).
        ("/api/v1/detections?devce_id=pi".to_owned(), ""),
        // A limit out of its range is refused, not quietly changed (limit=0 was a page of 1).
        ("/api/v1/detections?limit=0".to_owned(), "limit"),
        ("/api/v1/detections?limit=1001".to_owned(), "limit"),
        ("/api/v1/dead-letters?limit=-3".to_owned(), "limit"),
        // An empty device_id matched nothing and answered an empty page.
        ("/api/v1/detections?device_id=".to_owned(), "device_id"),
        (format!("/api/v1/devices/{device}/gaps?limit=10001"), "limit"),
        (format!("/api/v1/devices/{device}/batches?limit=0"), "limit"),
        (format!("/api/v1/devices/{device}/commands?limit=0"), "limit"),
    ] {
        let mut r = http().get(cloud.url(&path)).header("X-API-Key", FLEET_KEY).call().unwrap();
        let status = r.status().as_u16();
        let ct = r.headers().get("content-type").unwrap().to_str().unwrap().to_owned();
        assert!(ct.starts_with("application/json"), "{path}: {ct}");
        let body: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
        assert_eq!(status, 400, "{path}: {body}");
        let e = body["error"].as_str().unwrap();
        if field.is_empty() {
            assert!(e.contains("devce_id") && e.contains("openapi.json"), "{path}: {e}");
        } else {
            assert_eq!(body["field"], field, "{path}: {body}");
            assert!(e.contains(field), "{path}: {e}");
        }
    }
    let (code, body) =
        get_json(&http(), &cloud, "/api/v1/detections?since=2026-11-30T10:00:00Z&until=2026-11-30T09:00:00Z");
    assert_eq!((code, body["field"].clone()), (400, serde_json::json!("until")), "{body}");
    // Unknown paths and methods: JSON too.
    for (method, path, want) in
        [("GET", "/api/v1/nothing", 404), ("DELETE", "/api/v1/devices", 405), ("PUT", "/health", 405)]
    {
        let url = cloud.url(path);
        let mut r = match method {
            "GET" => http().get(&url).header("X-API-Key", FLEET_KEY).call(),
            "DELETE" => http().delete(&url).header("X-API-Key", FLEET_KEY).call(),
            _ => http().put(&url).header("X-API-Key", FLEET_KEY).send("{}".as_bytes()),
        }
        .unwrap();
        assert_eq!(r.status().as_u16(), want, "{method} {path}");
        let body: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
        assert!(body["error"].as_str().unwrap().contains("openapi.json"), "{method} {path}: {body}");
    }
}

#[test]
fn schemathesis_finds_no_server_error_and_no_answer_off_the_document() {
    let st = workspace().join("target/schemathesis/bin/schemathesis");
    if !st.exists() {
        return skip("schemathesis", "target/schemathesis is not installed (scripts/test installs it)");
    }
    let cloud = Cloud::start(CloudOptions::default()).unwrap();
    // A device with batches, so the fuzzer's reads find something.
    let agent = http();
    for seq in 1..=3 {
        let b = wire_batch(DEVICE, seq, 5);
        let (code, body, _) = post_batch(&agent, &cloud, Some(DEVICE_KEY), Some(&b.batch_id.to_string()), &b.to_json());
        assert_eq!(code, 201, "{body}");
    }
    let spec = cloud.url("/api/v1/openapi.json");
    for key in [FLEET_KEY, DEVICE_KEY] {
        let out = Command::new(&st)
            .args(["run", &spec, "--checks", "all", "--exclude-checks", "negative_data_rejection"])
            .args(["--exclude-path", "/api/v1/live", "--experimental", "openapi-3.1"])
            .args(["--hypothesis-max-examples", "40", "--hypothesis-seed", "19", "--hypothesis-derandomize"])
            .args(["--request-timeout", "10000", "--generation-allow-x00", "false"])
            // The key is the -H below; generated Authorization values with control characters are
            // refused by hyper before any route (a plain 400: not an HTTP request).
            .args(["--generation-with-security-parameters", "false"])
            .args(["-H", &format!("X-API-Key: {key}")])
            .env("SCHEMATHESIS_HOOKS", "")
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "schemathesis found problems with key {key}:\n{text}");
        eprintln!("{}", text.lines().rev().take(3).collect::<Vec<_>>().join("\n"));
    }
    // The cloud lived through it.
    let (code, _) = get_json(&agent, &cloud, "/health");
    assert_eq!(code, 200);
}
