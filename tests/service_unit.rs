//! `contrib/sluice.service`, the unit sluice ships: systemd's own checker finds nothing
//! wrong with it, it runs the daemon the way README says, and it keeps the promises the
//! issue asked of it (notify, reload, descriptors, sandbox).

use std::path::{Path, PathBuf};
use std::process::Command;

const INSTALLED_BINARY: &str = "/usr/local/bin/sluice";
const INSTALLED_CONFIG: &str = "/etc/sluice/proxy.toml";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn unit_text() -> String {
    std::fs::read_to_string(repo().join("contrib/sluice.service")).expect("contrib/sluice.service")
}

/// `systemd-analyze verify` on the unit, with the installed paths pointed at this build and
/// this repository's `proxy.toml` (verify checks that every command exists and is executable).
/// It must exit 0 and say nothing: systemd prints warnings (unknown keys, bad values) on
/// stderr without failing.
#[test]
fn systemd_analyze_verify_finds_nothing_wrong() {
    if which("systemd-analyze").is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-analyze is missing (Debian package systemd); CI must install it"
        );
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("sluice.service");
    let text = unit_text()
        .replace(INSTALLED_BINARY, env!("CARGO_BIN_EXE_sluice"))
        .replace(
            INSTALLED_CONFIG,
            repo().join("proxy.toml").to_str().unwrap(),
        );
    std::fs::write(&unit, text).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
}

/// The unit's commands are the ones README documents and the binary accepts: its
/// `ExecStartPre` (`--check-config`) passes on the shipped `proxy.toml`.
#[test]
fn the_units_config_check_passes_on_the_shipped_config() {
    let text = unit_text();
    let pre = setting(&text, "ExecStartPre");
    let start = setting(&text, "ExecStart");
    assert_eq!(
        pre,
        format!("{INSTALLED_BINARY} --check-config --config {INSTALLED_CONFIG}")
    );
    assert_eq!(
        start,
        format!("{INSTALLED_BINARY} --config {INSTALLED_CONFIG}")
    );
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["--check-config", "--config"])
        .arg(repo().join("proxy.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the unit promises: sluice tells systemd when it is ready (Type=notify), reloads on
/// SIGHUP, may hold two descriptors for each of the default `listen.max_connections`, and
/// runs sandboxed with no capabilities.
#[test]
fn the_unit_keeps_its_promises() {
    let text = unit_text();
    assert_eq!(setting(&text, "Type"), "notify");
    assert_eq!(setting(&text, "ExecReload"), "/bin/kill -HUP $MAINPID");
    let nofile: usize = setting(&text, "LimitNOFILE").parse().unwrap();
    assert!(nofile >= 2 * sluice::config::DEFAULT_MAX_CONNECTIONS + 64);
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("CapabilityBoundingSet", ""),
    ] {
        assert_eq!(setting(&text, key), value, "{key}");
    }
    // SIGTERM drains for shutdown_grace; systemd must not kill sooner.
    let stop = humantime::parse_duration(&setting(&text, "TimeoutStopSec")).unwrap();
    assert!(stop > sluice::config::DEFAULT_SHUTDOWN_GRACE);
}

/// The value of `key=` in the unit (the first assignment).
fn setting(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("the unit sets no {key}="))
        .trim()
        .to_string()
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(tool))
            .find(|p| Path::new(p).is_file())
    })
}
