//! Issue #14, kind 6 (edge inputs): what an operator or a capture hands the edge must not stop it
//! or garble what it reports. A capture line that is not UTF-8 is one bad line, skipped and
//! counted, not the end of the replay; a `device_id` with a quote or a backslash is escaped in
//! `/metrics`. Real edge and cloud binaries.

use std::io::Write;
use std::time::Duration;

use backhaul_tests::cloud::{Cloud, CloudOptions, DEVICE};
use backhaul_tests::edge::{num, Edge, EdgeOptions};

const T: Duration = Duration::from_secs(60);
const SECRET: &str = "edge-inputs-secret-0123456789";

fn metrics(edge: &Edge) -> String {
    edge.metrics().unwrap()
}

/// Before: the line iterator's UTF-8 error was taken for a failing read, and the replay ended
/// there: 150 of 300 detections were never produced.
#[test]
fn a_capture_line_that_is_not_utf8_is_skipped_and_counted_and_the_replay_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("capture.jsonl");
    let mut f = std::fs::File::create(&path).unwrap();
    for i in 0..300u32 {
        if i == 150 {
            f.write_all(b"{\"t\":\"2026-11-21T10:02:30Z\",\"address\":\"\xff\xfe\xfd\",\"rssi\":-60}\n").unwrap();
        }
        writeln!(
            f,
            r#"{{"t":"2026-11-21T10:{:02}:{:02}Z","address":"11:22:33:44:{:02X}:{:02X}","rssi":-60,"manufacturer_data":{{}}}}"#,
            i / 60,
            i % 60,
            i / 256,
            i % 256
        )
        .unwrap();
    }
    drop(f);

    let cloud = Cloud::start(CloudOptions::default()).unwrap();
    let edge = Edge::start(EdgeOptions {
        mode: "http",
        http_url: cloud.url(""),
        source: Some(format!("kind = \"replay\"\npath = \"{}\"", path.display())),
        env: vec![("BACKHAUL_HASH_SECRET".into(), SECRET.into())],
        ..Default::default()
    })
    .unwrap();
    cloud.wait_detections(DEVICE, 300, T).unwrap();
    let status = edge.wait_drained(300, T).unwrap();
    let status = edge.wait_status("the replay to end", T, |s| s["source"]["done"] == true).unwrap_or(status);
    assert_eq!(num(&status, "/source/detections"), 300, "{status}");
    assert_eq!(num(&status, "/source/bad_lines"), 1, "{status}");
    let error = status["source"]["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("line 151") && error.contains("UTF-8"), "{status}");
    let text = metrics(&edge);
    assert!(text.contains(&format!("backhaul_edge_source_bad_lines_total{{device_id=\"{DEVICE}\"}} 1\n")), "{text}");
}

/// A `device_id` with `"` and `\` (the config allows both: they do not break an MQTT topic) was
/// written into every `/metrics` label unescaped, which breaks the whole scrape.
#[test]
fn a_device_id_with_a_quote_and_a_backslash_is_escaped_in_metrics() {
    // The TOML form of `dev"a\b` (the harness writes the id into a TOML string as given).
    let edge = Edge::start(EdgeOptions { device_id: r#"dev\"a\\b"#.into(), ..Default::default() }).unwrap();
    let status = edge.status().unwrap();
    assert_eq!(status["device_id"], "dev\"a\\b");
    let text = metrics(&edge);
    let mut samples = 0;
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let labels = parse_sample(line).unwrap_or_else(|e| panic!("not the Prometheus text format: {e}: {line}"));
        assert_eq!(labels.iter().find(|l| l.0 == "device_id").map(|l| l.1.as_str()), Some("dev\"a\\b"), "{line}");
        samples += 1;
    }
    assert!(samples > 20, "{text}");
}

/// Parses `name{label="value",...} number` (the Prometheus text format, with its escapes);
/// returns the labels, unescaped.
fn parse_sample(line: &str) -> Result<Vec<(String, String)>, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    let name_ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    if name.is_empty() || !name.chars().all(name_ok) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = r;
        loop {
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let eq = rest.find("=\"").ok_or("a label without =\"")?;
            let label = rest[..eq].trim_start_matches(',').to_owned();
            let mut value = String::new();
            let mut chars = rest[eq + 2..].char_indices();
            let end = loop {
                match chars.next().ok_or("an unterminated label value")? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next().ok_or("a dangling backslash")?.1 {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        c => return Err(format!("an unknown escape \\{c}")),
                    },
                    (_, c) => value.push(c),
                }
            };
            rest = &rest[eq + 2 + end + 1..];
            labels.push((label, value));
        }
    }
    let value = rest.strip_prefix(' ').ok_or("no space before the value")?;
    value.parse::<f64>().map_err(|e| format!("value {value:?}: {e}"))?;
    Ok(labels)
}
