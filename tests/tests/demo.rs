//! `backhaul-cloud demo`, the README's first command, run as a newcomer would: it must end with
//! every Pi's batches stored exactly once, over MQTT with a Pi and the broker killed mid-run, and
//! over HTTP.

fn demo(args: &[&str]) -> String {
    let (code, out, err) = backhaul_tests::run("backhaul-cloud", args, &[]).unwrap();
    assert_eq!(code, 0, "demo failed:\n{out}\n{err}");
    assert!(out.contains("RESULT: nothing lost, nothing stored twice"), "{out}");
    out
}

#[test]
fn the_demo_over_mqtt_survives_its_own_kill_9s_and_loses_nothing() {
    let out = demo(&["demo", "--seconds", "6", "--devices", "2"]);
    assert!(out.contains("kill -9 demo-pi-2") && out.contains("kill -9 the broker"), "{out}");
    assert!(out.contains("private Mosquitto"), "{out}");
}

#[test]
fn the_demo_over_http_loses_nothing() {
    let out = demo(&["demo", "--seconds", "4", "--devices", "2", "--http"]);
    assert!(out.contains("Pis use HTTP"), "{out}");
}

#[test]
fn the_demo_over_mqtt_with_tls_and_client_certificates_loses_nothing() {
    // Issue #16: the CA made with deploy/pki's scripts, Mosquitto's TLS listener with the shipped
    // ACL, every Pi and the cloud with its own certificate; the Pi and broker kills included.
    let out = demo(&["demo", "--seconds", "6", "--devices", "2", "--tls"]);
    assert!(out.contains("TLS listener") && out.contains("kill -9 the broker"), "{out}");
}

#[test]
fn the_demo_over_https_with_client_certificates_loses_nothing() {
    let out = demo(&["demo", "--seconds", "4", "--devices", "2", "--http", "--tls"]);
    assert!(out.contains("Pis use HTTPS"), "{out}");
}
