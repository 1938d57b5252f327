//! Default values, named so that the configuration reference can point at them.

use std::time::Duration;

use super::values::{AbsolutePath, HumanDuration};

pub(super) fn version() -> usize {
    1
}
pub(super) fn threads() -> usize {
    1
}
pub(super) fn yes() -> bool {
    true
}
pub(super) fn upgrade_sock() -> AbsolutePath {
    AbsolutePath("/run/pingora-lb/upgrade.sock".into())
}
pub(super) fn grace_period_seconds() -> u64 {
    30
}
pub(super) fn stop_accepting_after() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
pub(super) fn graceful_shutdown_timeout_seconds() -> u64 {
    5
}
pub(super) fn upstream_keepalive_pool_size() -> usize {
    128
}
pub(super) fn retries() -> usize {
    2
}
pub(super) fn health_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
pub(super) fn health_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
pub(super) fn threshold() -> usize {
    1
}
pub(super) fn health_path() -> String {
    "/".into()
}
pub(super) fn expected_status() -> u16 {
    200
}
pub(super) fn connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(3))
}
pub(super) fn read_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
pub(super) fn idle_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
pub(super) fn client_header_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
pub(super) fn client_keepalive_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(75))
}
pub(super) fn client_body_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
pub(super) fn client_tunnel_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(3600))
}
pub(super) fn client_send_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
pub(super) fn keepalive_requests() -> u32 {
    1000
}
pub(super) fn max_uri_length() -> usize {
    8 * 1024
}
pub(super) fn max_header_size() -> usize {
    32 * 1024
}
pub(super) fn max_header_count() -> usize {
    100
}
pub(super) fn syslog_identifier() -> String {
    "pingora-lb".into()
}
pub(super) fn sample_rate() -> f64 {
    1.0
}
pub(super) fn consecutive_failures() -> u32 {
    5
}
pub(super) fn ejection_time() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
pub(super) fn max_ejection_time() -> HumanDuration {
    HumanDuration(Duration::from_secs(300))
}
pub(super) fn root_path() -> String {
    "/".into()
}
pub(super) fn no_route_status() -> u16 {
    404
}
