//! Test-only fault injection through `BACKHAUL_FAILPOINT` (unset in production: every check is then
//! false). Read once per process.
//!
//! | value | effect |
//! | --- | --- |
//! | `before_puback` | the MQTT worker parks after a commit, before its PUBACK (a test SIGKILLs it there) |
//! | `bulk_500:N` | the next N HTTP bulk posts answer 500 |
//! | `panic:TASK` | the long-lived task `TASK` panics at its first unit of work: `mqtt-poller` (first message received), `mqtt-acks` (first ack sent), `mqtt-worker` (first message taken), `watchdog` (first tick) |
//! | `stall_mqtt` | the MQTT worker hangs on every batch message (a stalled ingress, issue #14 kind 4) |
//! | `stall_http` | every HTTP bulk post hangs once its body is read |
//! | `panic:mqtt-message` | handling the first MQTT batch message panics (the panic stays with that message) |

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// The failpoint set for this process, if any.
pub fn value() -> Option<&'static str> {
    static VALUE: OnceLock<Option<String>> = OnceLock::new();
    VALUE.get_or_init(|| std::env::var("BACKHAUL_FAILPOINT").ok()).as_deref()
}

/// Panics if `BACKHAUL_FAILPOINT=panic:{task}`, once per process (the first call that matches).
pub fn panic_in(task: &str) {
    static FIRED: AtomicBool = AtomicBool::new(false);
    if value().and_then(|v| v.strip_prefix("panic:")) == Some(task) && !FIRED.swap(true, Ordering::SeqCst) {
        panic!("FAILPOINT panic:{task}");
    }
}
