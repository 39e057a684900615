//! The name of every series sluice exports, for the daemon, the tests, the stress tool and
//! the dashboard test to share: each constant is the name less `sluice_`, in capitals.
//!
//! What each one means, its kind and its labels are in [`SERIES`](super::SERIES).

// Process-wide.
pub const LISTENER_PAUSED_TOTAL: &str = "sluice_listener_paused_total";
pub const BUDGET_LIMIT_BYTES: &str = "sluice_budget_limit_bytes";
pub const BUDGET_USED_BYTES: &str = "sluice_budget_used_bytes";
pub const CONFIG_RELOADS_TOTAL: &str = "sluice_config_reloads_total";
pub const CONNECTION_PANICS_TOTAL: &str = "sluice_connection_panics_total";
pub const BUILD_INFO: &str = "sluice_build_info";

// By service.
pub const CONNECTIONS_ACCEPTED_TOTAL: &str = "sluice_connections_accepted_total";
pub const CONNECTIONS_ACTIVE: &str = "sluice_connections_active";
pub const CONNECTIONS_CLOSED_TOTAL: &str = "sluice_connections_closed_total";
pub const CONNECTIONS_REJECTED_TOTAL: &str = "sluice_connections_rejected_total";
pub const CONNECTION_DURATION_SECONDS: &str = "sluice_connection_duration_seconds";
pub const UPSTREAM_RETRIES_TOTAL: &str = "sluice_upstream_retries_total";

// By service and direction.
pub const BYTES_TOTAL: &str = "sluice_bytes_total";
pub const QUEUED_BYTES: &str = "sluice_queued_bytes";
pub const BUFFER_LIMIT_BYTES: &str = "sluice_buffer_limit_bytes";
pub const BUDGET_WAITS_TOTAL: &str = "sluice_budget_waits_total";
pub const PAUSES_TOTAL: &str = "sluice_pauses_total";
pub const DRAINS_TOTAL: &str = "sluice_drains_total";
pub const PAUSED_CONNECTIONS: &str = "sluice_paused_connections";
pub const PAUSED_SECONDS_TOTAL: &str = "sluice_paused_seconds_total";
pub const KERNEL_QUEUED_BYTES: &str = "sluice_kernel_queued_bytes";

// By service and server (and direction).
pub const UPSTREAM_CONNECT_ERRORS_TOTAL: &str = "sluice_upstream_connect_errors_total";
pub const UPSTREAM_CONNECT_DURATION_SECONDS: &str = "sluice_upstream_connect_duration_seconds";
pub const SERVER_UP: &str = "sluice_server_up";
pub const SERVER_CONNECTIONS: &str = "sluice_server_connections";
pub const SERVER_EJECTIONS_TOTAL: &str = "sluice_server_ejections_total";
pub const SERVER_QUEUED_BYTES: &str = "sluice_server_queued_bytes";
pub const SERVER_PAUSED_CONNECTIONS: &str = "sluice_server_paused_connections";
