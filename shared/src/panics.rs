//! Panics as values: their message, and panics that a caller catches on purpose.
//!
//! Both services install a process-wide panic hook (the edge's exits, so that systemd restarts a
//! process whose thread died). A hook runs *before* unwinding, so code that catches a panic as an
//! expected outcome (sled panicking on damaged files, which the queue turns into "move the database
//! aside") must say so, or the hook would end the process first: [`catch`] marks the thread while it
//! runs, and the hook asks [`is_caught`].

use std::any::Any;
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};

thread_local! {
    static CATCHING: Cell<u32> = const { Cell::new(0) };
}

/// A panic payload's message (`panic!` gives a `&str` or a `String`).
pub fn message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(a panic without a message)".to_owned())
}

/// Runs `f`, catching a panic in it as an `Err` with its message; meanwhile [`is_caught`] is true
/// on this thread.
pub fn catch<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    CATCHING.with(|c| c.set(c.get() + 1));
    let result = catch_unwind(AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(c.get() - 1));
    result.map_err(|p| message(p.as_ref()))
}

/// Whether a panic on this thread now would be caught by a [`catch`] (a panic hook lets it unwind).
pub fn is_caught() -> bool {
    CATCHING.with(|c| c.get() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caught_panic_is_a_message_and_marks_the_thread_only_meanwhile() {
        assert!(!is_caught());
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r: Result<(), String> = catch(|| {
            seen.store(is_caught(), std::sync::atomic::Ordering::SeqCst);
            panic!("damaged file {}", 7)
        });
        assert_eq!(r, Err("damaged file 7".to_owned()));
        assert!(seen.load(std::sync::atomic::Ordering::SeqCst));
        assert!(!is_caught());
        assert_eq!(catch(|| 5), Ok(5));
        assert_eq!(message(&"static"), "static");
    }
}
