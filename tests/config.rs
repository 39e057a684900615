//! The configuration as users meet it: the shipped proxy.toml, every invalid fixture
//! (one clear line naming the key, exit code 2), and flags overriding the file.

use std::path::PathBuf;
use std::process::Command;

fn sluice() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
}

/// What `sluice --check-config` prints with the rest of `command`'s arguments; it must
/// succeed.
fn check_config(command: &mut Command) -> String {
    let out = command.arg("--check-config").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn shipped_proxy_toml_is_valid_and_prints_its_effective_config() {
    let printed = check_config(sluice().arg("--config").arg(root().join("proxy.toml")));
    // What it prints is itself a valid configuration with the same services as the
    // file's, each spelled out.
    let reparsed = sluice::Config::parse(&printed, "printed").unwrap();
    let shipped = sluice::Config::load(&root().join("proxy.toml")).unwrap();
    assert_eq!(reparsed.services().unwrap(), shipped.services().unwrap());
    assert!(
        printed.contains("[[service]]\nname = \"default\""),
        "{printed}"
    );
    assert_eq!(shipped.buffer.resume_at, 0.5);
    assert_eq!(shipped.bounds(), [65536, 65536]);
}

#[test]
fn every_invalid_fixture_fails_with_its_key_named_and_exit_code_2() {
    let dir = root().join("tests/fixtures/invalid");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 10, "fixtures missing");
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} lacks '# expect:'", file.display()));
        let out = sluice().arg("--config").arg(&file).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {stderr}", file.display());
        assert_eq!(
            stderr.lines().count(),
            1,
            "{}: not one line: {stderr}",
            file.display()
        );
        assert!(
            stderr.contains(&file.display().to_string()),
            "{}: file not named: {stderr}",
            file.display()
        );
        assert!(
            stderr.contains(expect),
            "{}: `{expect}` not in: {stderr}",
            file.display()
        );
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn missing_file_is_one_line_and_exit_code_2() {
    let out = sluice()
        .args(["--config", "/nonexistent/sluice.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/sluice.toml") && stderr.lines().count() == 1,
        "{stderr}"
    );
}

#[test]
fn flags_and_environment_override_the_file() {
    let printed = check_config(
        sluice()
            .arg("--config")
            .arg(root().join("proxy.toml"))
            .args(["--listen", "127.0.0.1:7001", "--log-level", "debug"])
            .env("SLUICE_UPSTREAM", "upstream.example:7002")
            .env("SLUICE_METRICS", "127.0.0.1:7003"),
    );
    let c = sluice::Config::parse(&printed, "printed").unwrap();
    let services = c.services().unwrap();
    assert_eq!(services[0].name, "default");
    assert_eq!(services[0].listen, "127.0.0.1:7001".parse().unwrap());
    assert_eq!(services[0].servers, ["upstream.example:7002"]);
    assert_eq!(c.metrics.address, "127.0.0.1:7003");
    assert_eq!(c.log.level, "debug");
}

#[test]
fn a_bad_flag_value_is_blamed_on_the_flag() {
    let out = sluice()
        .args(["--check-config", "--listen", "nope", "--upstream", "h:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--listen") && stderr.contains("listen.address"),
        "{stderr}"
    );
}

#[test]
fn help_and_version() {
    let out = sluice().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--listen",
        "--upstream",
        "--metrics",
        "--log-level",
        "--check-config",
        "SLUICE_LISTEN",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
    let out = sluice().arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

/// A file with two services (and overlays) prints each service's effective settings,
/// and `--listen`/`--upstream` add the `default` service beside them.
#[test]
fn check_config_prints_every_effective_service() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("two.toml");
    std::fs::write(
        &path,
        r#"
[buffer]
client_to_upstream = "32KiB"
[[service]]
name = "db"
listen = "127.0.0.1:4001"
servers = ["127.0.0.1:5000", "127.0.0.1:5001"]
balance = "least_queued"
[service.buffer]
upstream_to_client = "16KiB"
[[service]]
name = "api"
listen = "127.0.0.1:4002"
servers = ["localhost:6000"]
send_proxy = "v2"
"#,
    )
    .unwrap();
    let services = effective_services(&path, &[]);
    let names: Vec<_> = services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["db", "api"]);
    // The overlay replaced one key; the other came from the top-level [buffer].
    assert_eq!(services[0].bounds(), [32 * 1024, 16 * 1024]);
    assert_eq!(services[1].bounds(), [32 * 1024, 64 * 1024]);
    assert_eq!(services[0].balance, sluice::config::Balance::LeastQueued);
    assert_eq!(
        services[1].send_proxy,
        Some(sluice::config::ProxyVersion::V2)
    );

    let services = effective_services(
        &path,
        &["--listen", "127.0.0.1:4000", "--upstream", "127.0.0.1:5000"],
    );
    let names: Vec<_> = services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["default", "db", "api"]);
    assert_eq!(services[0].servers, ["127.0.0.1:5000"]);
}

/// The services `sluice --check-config --config FILE ARGS` prints, parsed back.
fn effective_services(path: &std::path::Path, args: &[&str]) -> Vec<sluice::config::Service> {
    let printed = check_config(sluice().arg("--config").arg(path).args(args));
    sluice::Config::parse(&printed, "printed")
        .unwrap()
        .services()
        .unwrap()
}
