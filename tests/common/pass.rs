//! The README's second test pass (`TERN_TEST_IO=poll TERN_TEST_BACKEND_PASS=1`)
//! runs the server's tests again on the epoll/kqueue backend. A test whose
//! behaviour does not depend on the I/O backend (the simulator, the cluster
//! layer's leases and NATS faults) marks itself with [`first_pass_only`]:
//! it runs in the first pass, on every other run (FreeBSD's, one binary by
//! hand with `TERN_TEST_IO=poll`), and in the second pass only says why it
//! is not repeated (README, after the test command).

/// The variable the README's second pass sets to `1`.
pub const BACKEND_PASS_ENV: &str = "TERN_TEST_BACKEND_PASS";

/// True, after printing `why` (what makes the test independent of the
/// backend), when this is the README's second pass: the caller returns.
pub fn first_pass_only(why: &str) -> bool {
    let second = std::env::var_os(BACKEND_PASS_ENV).is_some_and(|v| v == "1");
    if second {
        eprintln!("{BACKEND_PASS_ENV}=1: not repeated on the second backend, {why}");
    }
    second
}
