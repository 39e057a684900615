//! End-to-end checks of what an operator watching sluice sees: the metrics during and after a
//! slow-reader load, `promtool check metrics` on a scrape, and the Grafana dashboard's queries
//! run by a real Prometheus against a real sluice.
//!
//! Every test runs the `sluice` binary with a temporary config (listen and metrics on
//! 127.0.0.1:0; the real ports come from its `READY=1` on `NOTIFY_SOCKET`) in front of an in-test
//! upstream (the Prometheus test adds a second service with two servers). Both ends of every
//! connection write as fast as they can and read slowly through small socket buffers, so both
//! directions back up within milliseconds.

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bytesize::ByteSize;
use serde_json::Value;
use sluice::config::ServiceSpec;
use sluice_testkit::{Daemon, Scrape, config, http, refusing_address};
use socket2::{Domain, Socket, Type};

/// Per-connection bound of each direction in sluice's config: small, so backpressure shows
/// after a few kilobytes.
const BOUND: u64 = 16 * 1024;
/// SO_RCVBUF / SO_SNDBUF on every socket of the test (the kernel doubles it), so the kernel
/// absorbs little and sluice's own buffers fill.
const SOCKET_BUFFER: usize = 4096;
/// How fast a slow reader consumes, in bytes per second.
const SLOW_READ_RATE: f64 = 16.0 * 1024.0;
/// Generous limit for anything the tests wait for; reached only when something is wrong.
const DEADLINE: Duration = Duration::from_secs(60);
/// How long one HTTP request (a scrape, a Prometheus query) may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// The two values of the `direction` label.
const DIRECTIONS: [&str; 2] = ["client_to_upstream", "upstream_to_client"];
/// What `$__rate_interval` becomes when the dashboard's queries are sent to Prometheus: at
/// 1 s scrape interval this window always holds several samples.
const RATE_INTERVAL: &str = "10s";
/// The dashboard under test.
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/grafana/dashboards/sluice.json"
);

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

/// During a load where both ends read slowly, the backpressure metrics show it within their
/// bounds and keep moving; once every connection has ended the gauges are exactly zero and the
/// byte counters equal what crossed.
#[test]
fn backpressure_metrics_track_slow_readers_and_return_to_zero() {
    const CONNS: usize = 4;
    let upstream = Upstream::start();
    let sluice = start_sluice(upstream.addr, Vec::new());
    let load = Load::start(sluice.addr, &upstream, CONNS);

    // Backed up: every connection open, both directions holding bytes and paused.
    let backed_up = sluice.poll("both directions backed up", DEADLINE, |s| {
        check_queued_within_bound(s, CONNS);
        s.require("sluice_connections_active", &[]) == CONNS as f64
            && DIRECTIONS.iter().all(|d| {
                s.require("sluice_queued_bytes", &[("direction", d)]) > 0.0
                    && s.require("sluice_paused_connections", &[("direction", d)]) > 0.0
            })
    });
    for d in DIRECTIONS {
        let dir = [("direction", d)];
        assert_eq!(
            backed_up.require("sluice_buffer_limit_bytes", &dir),
            BOUND as f64
        );
        eprintln!(
            "{d} backed up: {} bytes queued, {} paused",
            backed_up.require("sluice_queued_bytes", &dir),
            backed_up.require("sluice_paused_connections", &dir)
        );
    }

    // Still flowing: more pauses, drains and paused time in both directions at a later scrape.
    sluice.poll("pauses, drains and paused time rising", DEADLINE, |s| {
        check_queued_within_bound(s, CONNS);
        DIRECTIONS.iter().all(|d| {
            let dir = [("direction", *d)];
            [
                "sluice_pauses_total",
                "sluice_drains_total",
                "sluice_paused_seconds_total",
            ]
            .iter()
            .all(|m| s.require(m, &dir) > backed_up.require(m, &dir))
        })
    });

    // Every connection ends cleanly (both sides half-close, then close).
    let crossed = load.finish(&upstream);
    // Not atomic either: wait for a scrape that shows the gauges and the counters settled.
    let after = sluice.poll("all connections closed and counted", DEADLINE, |s| {
        s.require("sluice_connections_active", &[]) == 0.0
            && s.require("sluice_connections_closed_total", &[]) == CONNS as f64
            && DIRECTIONS
                .iter()
                .zip(crossed)
                .all(|(d, n)| s.require("sluice_bytes_total", &[("direction", d)]) == n as f64)
    });
    for (d, n) in DIRECTIONS.iter().zip(crossed) {
        let dir = [("direction", *d)];
        eprintln!(
            "{d}: {n} bytes crossed, {} pauses, {} drains, {:.3} s paused",
            after.require("sluice_pauses_total", &dir),
            after.require("sluice_drains_total", &dir),
            after.require("sluice_paused_seconds_total", &dir)
        );
        assert!(n > 0, "no byte crossed {d}");
        assert_eq!(after.require("sluice_bytes_total", &dir), n as f64, "{d}");
        assert_eq!(after.require("sluice_queued_bytes", &dir), 0.0, "{d}");
        assert_eq!(after.require("sluice_paused_connections", &dir), 0.0, "{d}");
    }
    // Every connection counted once wherever connections are counted; "complete" because
    // both sides half-closed and then closed.
    for (series, labels) in [
        ("sluice_connections_accepted_total", &[][..]),
        ("sluice_connections_closed_total", &[]),
        ("sluice_connections_closed_total", &[("reason", "complete")]),
        ("sluice_connection_duration_seconds_count", &[]),
        ("sluice_upstream_connect_duration_seconds_count", &[]),
    ] {
        assert_eq!(
            after.require(series, labels),
            CONNS as f64,
            "{series}{labels:?}"
        );
    }
}

/// A client that never reads: its direction stays paused, shows up in
/// `sluice_paused_connections`, and its paused time keeps growing at each scrape although no
/// pause ends. When the client then resets, every gauge returns to zero.
#[test]
fn a_reader_that_never_reads_stays_paused_with_growing_time() {
    let upstream = Upstream::start();
    let sluice = start_sluice(upstream.addr, Vec::new());
    let mut client = small_buffered_connect(sluice.addr);
    client.write_all(LOAD).unwrap();
    let dir = [("direction", "upstream_to_client")];

    // A scrape is not atomic: one taken as the pause begins may show the pause but not yet
    // the counter or the queued bytes. Wait for one that shows all three.
    let paused = sluice.poll("the never-read direction paused", DEADLINE, |s| {
        s.require("sluice_paused_connections", &dir) == 1.0
            && s.require("sluice_pauses_total", &dir) == 1.0
            && s.require("sluice_queued_bytes", &dir) > 0.0
    });
    let later = sluice.poll("its paused time growing", DEADLINE, |s| {
        s.require("sluice_paused_seconds_total", &dir)
            > paused.require("sluice_paused_seconds_total", &dir) + 0.2
    });
    for s in [&paused, &later] {
        assert_eq!(s.require("sluice_paused_connections", &dir), 1.0);
        // Paused when the buffer filled; the kernel may still take a little of it, but not
        // enough to reach the resume mark (half the bound).
        let queued = s.require("sluice_queued_bytes", &dir);
        assert!(
            queued > BOUND as f64 / 2.0 && queued <= BOUND as f64,
            "{queued} bytes queued in a paused direction\n{}",
            s.text()
        );
    }
    for m in ["sluice_pauses_total", "sluice_drains_total"] {
        assert_eq!(
            later.require(m, &dir),
            paused.require(m, &dir),
            "{m}: nothing drained"
        );
    }

    // Closing with unread data resets the connection.
    drop(client);
    let after = sluice.poll("the reset connection gone", DEADLINE, |s| {
        s.require("sluice_connections_active", &[]) == 0.0
            && s.require("sluice_connections_closed_total", &[]) == 1.0
    });
    for d in DIRECTIONS {
        let dir = [("direction", d)];
        assert_eq!(after.require("sluice_queued_bytes", &dir), 0.0, "{d}");
        assert_eq!(after.require("sluice_paused_connections", &dir), 0.0, "{d}");
    }
    assert_eq!(
        after.require(
            "sluice_connections_closed_total",
            &[("reason", "client_reset")]
        ),
        1.0,
        "{}\n{}",
        after.text(),
        sluice.process.log_text()
    );
    assert!(
        after.require("sluice_paused_seconds_total", &dir)
            >= later.require("sluice_paused_seconds_total", &dir),
        "paused time went backwards"
    );
}

/// `promtool check metrics` finds nothing to complain about in a scrape taken after some
/// traffic (so the histograms have observations).
#[test]
fn promtool_finds_no_problem_in_a_scrape() {
    if !tool_available("promtool") {
        return;
    }
    let upstream = Upstream::start();
    let sluice = start_sluice(upstream.addr, Vec::new());
    one_short_connection(sluice.addr);
    sluice.poll("the short connection counted", DEADLINE, |s| {
        s.require("sluice_connections_closed_total", &[]) == 1.0
    });
    let scrape = sluice.scrape().text().to_string();

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().expect("run promtool");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics ({}):\n{report}\n--- scrape ---\n{scrape}",
        out.status
    );
}

/// The dashboard JSON is what Grafana file provisioning and the issue ask for, every metric
/// it names is one a freshly started sluice exports (before any traffic), and every query
/// follows both pickers: Instance everywhere, Service wherever the series has a `service`
/// label.
#[test]
fn dashboard_is_well_formed_and_names_only_exported_metrics() {
    let dashboard = load_dashboard();
    let upstream = Upstream::start();
    let sluice = start_sluice(upstream.addr, Vec::new());
    let scrape = sluice.scrape();
    assert!(
        scrape.unparsed().is_empty(),
        "unparsable lines: {:?}",
        scrape.unparsed()
    );
    let exported = scrape.names();
    let per_service = scrape.names_with_label("service");

    assert_eq!(
        dashboard["uid"], "sluice",
        "fixed uid so links survive re-provisioning"
    );
    assert!(
        dashboard.get("__inputs").is_none(),
        "__inputs breaks file provisioning"
    );
    assert!(
        dashboard["schemaVersion"].as_u64().is_some(),
        "schemaVersion missing"
    );

    // Template variables.
    let vars = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no template variable {name}"))
    };
    let ds = var("datasource");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    let instance = var("instance");
    assert_eq!(instance["type"], "query");
    assert_eq!(instance["datasource"]["uid"], "${datasource}");
    let query_of = |v: &Value| {
        v["query"]
            .as_str()
            .or_else(|| v["query"]["query"].as_str())
            .unwrap_or_else(|| panic!("variable {} has no query", v["name"]))
            .to_string()
    };
    let instance_query = query_of(instance);
    assert_eq!(instance_query, "label_values(sluice_build_info, instance)");
    // The Service picker: like Instance, but listing the services of the chosen instances.
    let service = var("service");
    for key in [
        "type",
        "datasource",
        "multi",
        "includeAll",
        "allValue",
        "current",
        "refresh",
    ] {
        assert_eq!(service[key], instance[key], "service variable's {key}");
    }
    let service_query = query_of(service);
    assert_eq!(
        service_query,
        r#"label_values(sluice_connections_active{instance=~"$instance"}, service)"#
    );

    // Panels: rows in the issue's order, allowed types, unique ids, datasource everywhere.
    let panels = all_panels(&dashboard);
    let rows: Vec<&str> = panels
        .iter()
        .filter(|p| p["type"] == "row")
        .map(|p| p["title"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        rows,
        [
            "Is something backing up?",
            "Traffic",
            "Upstream",
            "Servers",
            "Process"
        ]
    );
    let mut ids = BTreeSet::new();
    for p in &panels {
        let title = p["title"].as_str().unwrap_or("(untitled)");
        let id = p["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("panel {title:?} has no id"));
        assert!(ids.insert(id), "panel id {id} used twice ({title:?})");
        let kind = p["type"].as_str().unwrap_or_default();
        if kind == "row" {
            // A row is only a heading; it must not query anything.
            assert!(p.get("targets").is_none(), "row {title:?} has targets");
            continue;
        }
        assert!(
            ["timeseries", "stat", "heatmap", "state-timeline"].contains(&kind),
            "panel {title:?} has type {kind:?}; only timeseries, stat, heatmap and \
             state-timeline are allowed"
        );
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {title:?}");
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("{title:?}: no targets"));
        assert!(!targets.is_empty(), "panel {title:?} has no targets");
        for t in targets {
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "a target of {title:?}"
            );
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(!expr.is_empty(), "a target of {title:?} has no expr");
            for window in range_windows(expr) {
                assert_eq!(
                    window, "$__rate_interval",
                    "{title:?}: use $__rate_interval in {expr}"
                );
            }
            for (name, matchers) in selectors(expr) {
                let has = |m: &str| matchers.split(", ").any(|x| x == m);
                assert!(
                    has(r#"instance=~"$instance""#),
                    "{title:?}: {name} does not follow the Instance picker in {expr}"
                );
                assert_eq!(
                    has(r#"service=~"$service""#),
                    per_service.contains(&name),
                    "{title:?}: {name} should follow the Service picker exactly when it has \
                     a service label, in {expr}"
                );
            }
        }
    }

    // Every metric named anywhere in a query is exported from start-up.
    let mut used: BTreeSet<String> = metric_names(&instance_query);
    used.extend(metric_names(&service_query));
    for (_, expr) in dashboard_queries(&dashboard) {
        used.extend(metric_names(&expr));
    }
    let unknown: Vec<_> = used.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "dashboard names metrics sluice does not export: {unknown:?}"
    );
    use sluice::metrics::names;
    let bucket = format!("{}_bucket", names::UPSTREAM_CONNECT_DURATION_SECONDS);
    for family in [
        names::QUEUED_BYTES,
        names::KERNEL_QUEUED_BYTES,
        names::BUDGET_USED_BYTES,
        names::BUDGET_LIMIT_BYTES,
        names::BUDGET_WAITS_TOTAL,
        names::PAUSED_CONNECTIONS,
        names::BYTES_TOTAL,
        names::SERVER_UP,
        names::SERVER_CONNECTIONS,
        names::SERVER_QUEUED_BYTES,
        names::SERVER_PAUSED_CONNECTIONS,
        names::SERVER_EJECTIONS_TOTAL,
        names::UPSTREAM_CONNECT_ERRORS_TOTAL,
        &bucket,
        names::UPSTREAM_RETRIES_TOTAL,
    ] {
        assert!(used.contains(family), "dashboard does not show {family}");
    }
}

/// A real Prometheus scrapes sluice under load, and every query of the dashboard (variables
/// substituted as for "All") parses and returns at least one number: a result that is empty or
/// only NaN would leave its panel blank.
///
/// sluice runs two services so that the Service picker lists both and every per-server panel
/// has something to draw: `default` in front of the test's upstream, under a slow-reader load;
/// and `pool`, whose two servers are that upstream and an address that refuses every connect.
/// A client loop keeps connecting to `pool`, so the refusing server keeps failing, being
/// ejected for a one-second cooldown and failing again, each failure retried on the good
/// server: connect errors, ejections, retries and connect latency all move while Prometheus
/// watches, and no client of `pool` notices.
#[test]
fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    if !tool_available("prometheus") {
        return;
    }
    let dashboard = load_dashboard();
    let upstream = Upstream::start();
    let (refusing, _refusing_guard) = refusing_address();
    let mut pool = config::service("pool", &[upstream.addr, refusing]);
    pool.balance = sluice::pool::Balance::LeastQueued;
    pool.upstream = Some(config::table([("retries", 1.into())]));
    pool.health = Some(config::table([
        ("max_failures", 1.into()),
        ("cooldown", "1s".into()),
    ]));
    let sluice = start_sluice(upstream.addr, vec![pool]);
    // A connection that has ended, so both histograms have an observation, plus a load.
    one_short_connection(sluice.addr);
    let load = Load::start(sluice.addr, &upstream, 3);
    let pool_clients =
        ShortClients::start(sluice.process.service_addr("pool").expect("service pool"));
    let prometheus = Prometheus::start(sluice.metrics_addr);

    // The instance variable's values: what label_values(sluice_build_info, instance) lists.
    let instances = prometheus.poll_query("sluice_build_info");
    let target = sluice.metrics_addr.to_string();
    assert!(
        instances
            .iter()
            .any(|s| s["metric"]["instance"] == target.as_str()),
        "sluice_build_info has no instance {target}: {instances:?}"
    );
    // The service variable's values: label_values(sluice_connections_active, service).
    let services: BTreeSet<String> = prometheus
        .poll_query("sluice_connections_active")
        .iter()
        .filter_map(|s| Some(s["metric"]["service"].as_str()?.to_string()))
        .collect();
    assert_eq!(
        services,
        BTreeSet::from(["default", "pool"].map(String::from)),
        "the Service picker's choices"
    );

    // One deadline for all queries: once the first ones have data, the rest have had every
    // scrape they need too.
    let deadline = Instant::now() + DEADLINE;
    let mut failures = Vec::new();
    for (title, expr) in dashboard_queries(&dashboard) {
        let query = substitute_variables(&expr);
        loop {
            match prometheus.query(&query) {
                Err(error) => {
                    failures.push(format!("{title}: {error}\n  {query}"));
                    break;
                }
                Ok(result) if has_a_number(&result) => break,
                Ok(result) if Instant::now() > deadline => {
                    failures.push(format!("{title}: no data ({result:?})\n  {query}"));
                    break;
                }
                Ok(_) => thread::sleep(Duration::from_millis(250)),
            }
        }
    }
    let pool_connections = pool_clients.finish();
    load.finish(&upstream);
    assert!(
        failures.is_empty(),
        "dashboard queries that failed:\n{}\n--- prometheus log ---\n{}",
        failures.join("\n"),
        prometheus.log()
    );

    // What the Servers row showed is what happened: the refusing server failed, was ejected,
    // and each failure was retried on the good server, so no client of pool was turned away.
    let refusing = refusing.to_string();
    let bad = [("service", "pool"), ("server", refusing.as_str())];
    let good = upstream.addr.to_string();
    let after = sluice.poll("every pool connection closed", DEADLINE, |s| {
        s.require("sluice_connections_closed_total", &[("service", "pool")])
            == pool_connections as f64
    });
    let refused = [bad[0], bad[1], ("kind", "refused")];
    let errors = after.require("sluice_upstream_connect_errors_total", &refused);
    assert!(errors >= 1.0, "{}", after.text());
    assert_eq!(
        after.require("sluice_upstream_connect_errors_total", &bad[..]),
        errors,
        "a refused connect counted as another kind"
    );
    assert!(after.require("sluice_server_ejections_total", &bad) >= 1.0);
    assert_eq!(
        after.require("sluice_upstream_retries_total", &[("service", "pool")]),
        errors,
        "every failed connect retried once on the good server"
    );
    assert_eq!(
        after.require(
            "sluice_upstream_connect_duration_seconds_count",
            &[("service", "pool"), ("server", good.as_str())]
        ),
        pool_connections as f64,
        "every pool client connected through the good server"
    );
    assert_eq!(
        after.require(
            "sluice_connections_closed_total",
            &[("service", "pool"), ("reason", "complete")]
        ),
        pool_connections as f64
    );
    eprintln!(
        "pool: {pool_connections} clients, {errors} refused connects, {} ejections",
        after.require("sluice_server_ejections_total", &bad)
    );
}

// ---------------------------------------------------------------------------------------------
// sluice, run as a child process, and what its scrapes must show
// ---------------------------------------------------------------------------------------------

/// The `default` service in front of `upstream` with small bounds and socket buffers,
/// plus `services`.
fn start_sluice(upstream: SocketAddr, services: Vec<ServiceSpec>) -> Daemon {
    let mut c = config::relay_to(upstream);
    c.upstream.connect_timeout = Duration::from_secs(5);
    c.buffer.client_to_upstream = ByteSize::b(BOUND);
    c.buffer.upstream_to_client = ByteSize::b(BOUND);
    c.buffer.resume_at = 0.5;
    let small = ByteSize::b(SOCKET_BUFFER as u64);
    c.socket.client_recv_buffer = small;
    c.socket.client_send_buffer = small;
    c.socket.upstream_recv_buffer = small;
    c.socket.upstream_send_buffer = small;
    c.log.level = "info".into();
    c.services = services;
    Daemon::start(&c)
}

/// Queued bytes never exceed connections × bound, per direction. `conns` is the number of
/// connections the test opened, not `sluice_connections_active`: a scrape is not atomic
/// (counters, gauges and the pause figures are read one after another), so the active
/// gauge from the same scrape may lag a connection whose bytes are already counted.
fn check_queued_within_bound(s: &Scrape, conns: usize) {
    assert!(
        s.unparsed().is_empty(),
        "unparsable lines: {:?}",
        s.unparsed()
    );
    for d in DIRECTIONS {
        let dir = [("direction", d)];
        let (queued, limit) = (
            s.require("sluice_queued_bytes", &dir),
            s.require("sluice_buffer_limit_bytes", &dir),
        );
        assert!(
            queued <= conns as f64 * limit,
            "{d}: {queued} bytes queued > {conns} connections × {limit}\n{}",
            s.text()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Traffic: an upstream and clients that write fast and read slowly
// ---------------------------------------------------------------------------------------------

/// First byte a client sends: this connection is part of a slow-reader load.
const LOAD: &[u8; 1] = b"L";
/// First byte a client sends: a short request/response connection.
const SHORT: &[u8; 1] = b"S";

/// A TCP server on 127.0.0.1:0. A connection whose first byte is [`LOAD`] gets a
/// slow-reading, fast-writing [`Peer`]; one starting with [`SHORT`] gets a short reply.
struct Upstream {
    addr: SocketAddr,
    /// The peers of accepted load connections.
    peers: mpsc::Receiver<Peer>,
    /// Tells every peer (both ends) to stop writing and read at full speed.
    stop: Arc<AtomicBool>,
}

impl Upstream {
    fn start() -> Upstream {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        // Accepted sockets inherit these.
        socket.set_recv_buffer_size(SOCKET_BUFFER).unwrap();
        socket.set_send_buffer_size(SOCKET_BUFFER).unwrap();
        socket
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        socket.listen(128).unwrap();
        let listener: TcpListener = socket.into();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, peers) = mpsc::channel();
        let peer_stop = stop.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { break };
                let (tx, stop) = (tx.clone(), peer_stop.clone());
                thread::spawn(move || {
                    stream.set_read_timeout(Some(DEADLINE)).unwrap();
                    let mut kind = [0u8];
                    stream.read_exact(&mut kind).expect("connection kind byte");
                    match &kind {
                        LOAD => {
                            let _ = tx.send(Peer::start(stream, stop));
                        }
                        SHORT => {
                            // Read the request to its end, answer, close.
                            let mut request = Vec::new();
                            stream.read_to_end(&mut request).expect("short request");
                            stream.write_all(b"bye").expect("short reply");
                        }
                        other => panic!("unknown connection kind {other:?}"),
                    }
                });
            }
        });
        Upstream { addr, peers, stop }
    }
}

/// One end of a connection: a thread writing a counted pattern as fast as it can and a thread
/// reading it back slowly (checking the pattern) until told to stop.
struct Peer {
    writer: JoinHandle<Result<u64, String>>,
    reader: JoinHandle<Result<u64, String>>,
}

impl Peer {
    fn start(stream: TcpStream, stop: Arc<AtomicBool>) -> Peer {
        stream.set_write_timeout(Some(DEADLINE)).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut out = stream.try_clone().unwrap();
        let writer_stop = stop.clone();
        let writer = thread::spawn(move || {
            let chunk: Vec<u8> = (0..251u8).cycle().take(251 * 16).collect();
            let mut sent = 0u64;
            while !writer_stop.load(Ordering::Relaxed) {
                let from = (sent % 251) as usize;
                match out.write(&chunk[from..from + 2048]) {
                    Ok(n) => sent += n as u64,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("write failed after {sent} bytes: {e}")),
                }
            }
            out.shutdown(Shutdown::Write)
                .map_err(|e| format!("half-close: {e}"))?;
            Ok(sent)
        });
        let mut input = stream;
        let reader = thread::spawn(move || {
            let start = Instant::now();
            let mut buf = vec![0u8; 64 * 1024];
            let mut received = 0u64;
            loop {
                let fast = stop.load(Ordering::Relaxed);
                if !fast {
                    // Pace to SLOW_READ_RATE, in short sleeps so a stop is seen quickly.
                    let due = received as f64 / SLOW_READ_RATE;
                    let ahead = due - start.elapsed().as_secs_f64();
                    if ahead > 0.0 {
                        thread::sleep(Duration::from_secs_f64(ahead.min(0.05)));
                        continue;
                    }
                }
                let want = if fast { buf.len() } else { 1024 };
                match input.read(&mut buf[..want]) {
                    Ok(0) => break,
                    Ok(n) => {
                        for (i, b) in buf[..n].iter().enumerate() {
                            let offset = received + i as u64;
                            if *b != (offset % 251) as u8 {
                                return Err(format!("byte {offset} corrupted"));
                            }
                        }
                        received += n as u64;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("read failed after {received} bytes: {e}")),
                }
            }
            Ok(received)
        });
        Peer { writer, reader }
    }

    /// (bytes this end wrote, bytes it read) once both threads are done; `end` names this
    /// end in a failure message.
    fn join(self, end: &str) -> (u64, u64) {
        let sent = self.writer.join().unwrap();
        let received = self.reader.join().unwrap();
        match (sent, received) {
            (Ok(sent), Ok(received)) => (sent, received),
            (sent, received) => panic!("{end}: writer {sent:?}, reader {received:?}"),
        }
    }
}

/// `n` slow clients through sluice, each served by a slow upstream peer.
struct Load {
    clients: Vec<Peer>,
}

impl Load {
    fn start(sluice: SocketAddr, upstream: &Upstream, n: usize) -> Load {
        let clients = (0..n)
            .map(|_| {
                let mut stream = small_buffered_connect(sluice);
                stream.write_all(LOAD).unwrap();
                Peer::start(stream, upstream.stop.clone())
            })
            .collect();
        Load { clients }
    }

    /// Stops every peer, waits until each end has read the other's last byte, and returns the
    /// bytes that crossed sluice, per direction (in [`DIRECTIONS`] order; the kind bytes
    /// included).
    fn finish(self, upstream: &Upstream) -> [u64; 2] {
        upstream.stop.store(true, Ordering::Relaxed);
        let (mut client_sent, mut client_received) = (0, 0);
        let n = self.clients.len();
        for client in self.clients {
            let (sent, received) = client.join("client");
            client_sent += sent;
            client_received += received;
        }
        let (mut upstream_sent, mut upstream_received) = (0, 0);
        for _ in 0..n {
            let peer = upstream
                .peers
                .recv_timeout(DEADLINE)
                .expect("upstream peer");
            let (sent, received) = peer.join("upstream");
            upstream_sent += sent;
            upstream_received += received;
        }
        assert_eq!(
            client_sent, upstream_received,
            "client_to_upstream lost or gained bytes"
        );
        assert_eq!(
            upstream_sent, client_received,
            "upstream_to_client lost or gained bytes"
        );
        [client_sent + n as u64, upstream_sent]
    }
}

/// Short connections, one after another, until told to stop.
struct ShortClients {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<usize>,
}

impl ShortClients {
    /// Pause between two connections: a few connects per second is enough for every rate
    /// to move.
    const PAUSE: Duration = Duration::from_millis(100);

    fn start(sluice: SocketAddr) -> ShortClients {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    one_short_connection(sluice);
                    n += 1;
                    thread::sleep(Self::PAUSE);
                }
                n
            })
        };
        ShortClients { stop, thread }
    }

    /// Stops the loop; the number of connections made, every one answered.
    fn finish(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("a short connection failed")
    }
}

/// A blocking connection whose socket buffers were made small before connecting.
fn small_buffered_connect(addr: SocketAddr) -> TcpStream {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(SOCKET_BUFFER).unwrap();
    socket.set_send_buffer_size(SOCKET_BUFFER).unwrap();
    socket.connect(&addr.into()).expect("connect to sluice");
    let stream: TcpStream = socket.into();
    stream.set_nodelay(true).unwrap();
    stream
}

/// One request/response exchange through sluice that ends with both sides closing, so the
/// connection-duration and connect-duration histograms each get an observation.
fn one_short_connection(sluice: SocketAddr) {
    let mut client = TcpStream::connect(sluice).unwrap();
    client.set_read_timeout(Some(DEADLINE)).unwrap();
    client.write_all(SHORT).unwrap();
    client.write_all(b"hello").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).expect("short reply");
    assert_eq!(reply, b"bye");
}

// ---------------------------------------------------------------------------------------------
// Prometheus, run as a child process
// ---------------------------------------------------------------------------------------------

/// SIGTERM, a few seconds for a graceful exit, then SIGKILL.
fn stop_child(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        // SAFETY: plain kill(2) on the pid of a child this test spawned and has not reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Ok(None) = child.try_wait() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = child.wait();
}

/// A Prometheus server scraping one sluice every second, with its data in a temp directory.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: sluice\n    static_configs:\n      \
                 - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        // Prometheus cannot report the port it bound, so pick a free one; retry if another
        // process takes it in between.
        for _attempt in 0..5 {
            let addr = free_port();
            let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
            let mut child = Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start prometheus");
            let deadline = Instant::now() + DEADLINE;
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // exited, most likely the port was taken: try another
                }
                if let Ok((200, _)) = http::get(addr, "/-/ready", HTTP_TIMEOUT) {
                    return Prometheus { child, addr, dir };
                }
                if Instant::now() > deadline {
                    stop_child(&mut child);
                    panic!("prometheus not ready:\n{}", read_log(dir.path()));
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
        panic!("prometheus did not start:\n{}", read_log(dir.path()));
    }

    fn log(&self) -> String {
        read_log(self.dir.path())
    }

    /// Runs an instant query: the result vector, or the error Prometheus gave for it.
    fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let (status, body) =
            http::get(self.addr, &path, HTTP_TIMEOUT).map_err(|e| format!("HTTP: {e}"))?;
        let reply: Value = serde_json::from_str(&body)
            .map_err(|e| format!("HTTP {status}, not JSON ({e}): {body}"))?;
        if reply["status"] != "success" {
            return Err(format!("{}: {}", reply["errorType"], reply["error"]));
        }
        match reply["data"]["result"].as_array() {
            Some(result) => Ok(result.clone()),
            // A scalar or string result is data too.
            None => Ok(vec![reply["data"]["result"].clone()]),
        }
    }

    /// Queries until the result is non-empty.
    fn poll_query(&self, promql: &str) -> Vec<Value> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let result = self
                .query(promql)
                .unwrap_or_else(|e| panic!("{promql}: {e}"));
            if !result.is_empty() {
                return result;
            }
            assert!(
                Instant::now() < deadline,
                "{promql}: no data\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

fn read_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
}

/// A loopback port nobody listens on right now.
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Whether `tool` can be run. Without it a test is skipped with a note, except under CI
/// (env `CI` set), where a missing tool is a failure.
fn tool_available(tool: &str) -> bool {
    match Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => true,
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!(
                "CI is set but `{tool}` cannot be run ({e}); install Debian's prometheus package"
            )
        }
        Err(e) => {
            eprintln!(
                "note: skipping, `{tool}` cannot be run ({e}); install Debian's prometheus package"
            );
            false
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The dashboard
// ---------------------------------------------------------------------------------------------

fn load_dashboard() -> Value {
    let text = std::fs::read_to_string(PathBuf::from(DASHBOARD)).expect("read dashboard");
    serde_json::from_str(&text).expect("dashboard is JSON")
}

/// Whether an instant query's result holds a sample with a finite value: what a panel can draw.
fn has_a_number(result: &[Value]) -> bool {
    result.iter().any(|s| {
        s["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(f64::is_finite)
    })
}

/// Every panel, including those nested in collapsed rows.
fn all_panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(nested) = p["panels"].as_array() {
            out.extend(nested);
        }
    }
    out
}

/// (panel title, PromQL) for every query target.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in all_panels(dashboard) {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = t["expr"].as_str() {
                out.push((
                    p["title"].as_str().unwrap_or_default().to_string(),
                    expr.to_string(),
                ));
            }
        }
    }
    out
}

/// The dashboard's variables as Grafana would fill them in with "All" selected.
fn substitute_variables(expr: &str) -> String {
    let out = expr
        .replace("$__rate_interval", RATE_INTERVAL)
        .replace("${__rate_interval}", RATE_INTERVAL)
        .replace("$__interval", "5s")
        .replace("${__interval}", "5s")
        .replace("$__range", "5m")
        .replace("${instance}", ".+")
        .replace("$instance", ".+")
        .replace("${service}", ".+")
        .replace("$service", ".+");
    assert!(!out.contains('$'), "unknown variable left in {out}");
    out
}

/// The contents of every `[...]` range selector in `expr`.
fn range_windows(expr: &str) -> Vec<&str> {
    expr.split('[')
        .skip(1)
        .filter_map(|s| s.split(']').next())
        .collect()
}

/// Every metric selector in `expr`: the `sluice_*` / `process_*` name and what is between its
/// braces (empty when it has none).
fn selectors(expr: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = ["sluice_", "process_"]
        .iter()
        .filter_map(|p| rest.find(p))
        .min()
    {
        rest = &rest[at..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        let (name, after) = rest.split_at(end);
        let matchers = match after.strip_prefix('{') {
            Some(inner) => inner.split('}').next().unwrap_or_default(),
            None => "",
        };
        out.push((name.to_string(), matchers.to_string()));
        rest = after;
    }
    out
}

/// Every `sluice_*` / `process_*` identifier in `expr`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("sluice_") || w.starts_with("process_"))
        .map(str::to_string)
        .collect()
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
