//! The admin endpoint on `metrics.address`: `GET /metrics`, `/healthz`, `/readyz` and
//! `/connections`, routed by axum and served by hyper's HTTP/1.1, keep-alive included.
//!
//! Its clients are a scraper and an operator's tools, so it keeps at most
//! [`MAX_CONNECTIONS`] connections open. One more arriving closes the connection that has
//! waited longest for a request (nginx reuses its idle connections the same way when it
//! runs out), so a flood of idle or slow clients cannot keep a scrape from being answered;
//! only while every connection is in the middle of an answer does a newcomer wait.
//! [`HEADER_READ_TIMEOUT`] bounds a request head, [`REQUEST_TIMEOUT`] an answer.

use std::convert::Infallible;
use std::io;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http_body::{Body, Frame, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::listener::{Readiness, Server};
use crate::registry::SortBy;

/// Admin connections open at once. A scraper or two and an operator's `top` need a
/// handful; the bound keeps a flood from holding more than this many descriptors and
/// buffers.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a request head may take to arrive whole, counted from the connection's
/// start and, on a kept-alive connection, from the end of the previous response: a
/// client that sends nothing, or trickles its headers (slowloris), is closed after it.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long answering a request may take, from its head to the last byte of the
/// response handed to the socket; a client that stops reading its answer is closed
/// after it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request head (request line and headers); a larger one is answered 431.
/// An admin request is a line and a few headers.
const MAX_HEAD: usize = 16 * 1024;
/// How often histogram samples are folded, so memory stays flat when nobody scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);
/// The pause after a failed accept (EMFILE and the like), so a full descriptor table
/// does not spin the control thread.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The routes over which each connection is served.
type App = TowerToHyperService<Router>;

/// Serves the admin endpoint on `listener` until `shutdown` fires, then closes the
/// connections waiting for a request, lets those being answered finish, and returns.
///
/// `shutdown` is the endpoint's own: keep it apart from the token given to
/// [`Server::run`], so that `/readyz` can answer 503 while the server drains.
pub async fn serve(listener: TcpListener, server: Arc<Server>, shutdown: CancellationToken) {
    tokio::spawn(upkeep(server.clone(), shutdown.clone()));
    let app = TowerToHyperService::new(router(server));
    let clients = Arc::new(Clients::new(MAX_CONNECTIONS));
    let conversations = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "admin endpoint accept failed");
                tokio::select! {
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    _ = shutdown.cancelled() => break,
                }
            }
        };
        let room = tokio::select! {
            room = clients.make_room() => room,
            _ = shutdown.cancelled() => break,
        };
        let admitted = clients.admit(room);
        conversations.spawn(converse(stream, app.clone(), admitted, shutdown.clone()));
        // The connection just admitted gets a turn to read its request before the next
        // accept: under a flood, a scrape is then being answered, not still waiting among
        // the idle connections that newer ones push out.
        tokio::task::yield_now().await;
    }
    drop(listener);
    conversations.close();
    conversations.wait().await;
}

/// `/metrics`, `/connections`, `/healthz` and `/readyz`; any other path is 404, any
/// method but GET (and HEAD) 405.
fn router(server: Arc<Server>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/connections", get(connections))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(server)
}

/// The Prometheus exposition, fresh at each request.
async fn metrics(State(server): State<Arc<Server>>) -> Response {
    ([(CONTENT_TYPE, PROMETHEUS_TEXT)], server.metrics().render()).into_response()
}

/// The live connections as JSON (`?sort=queued|kernel|age`, `?limit=N`); 400 with the
/// reason for anything else.
async fn connections(State(server): State<Arc<Server>>, RawQuery(query): RawQuery) -> Response {
    match connections_query(query.as_deref().unwrap_or_default()) {
        Ok((sort, limit)) => {
            let metrics = server.metrics();
            let listing = metrics.connections.list(sort, limit, metrics.now());
            let mut body = serde_json::to_string(&listing).expect("plain data serializes");
            body.push('\n');
            ([(CONTENT_TYPE, "application/json")], body).into_response()
        }
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    }
}

/// The process is alive and its control thread answers.
async fn healthz() -> &'static str {
    "ok\n"
}

/// 200 while every service accepts clients; 503 before that and once a shutdown has
/// begun, so a load balancer sends no new clients to a sluice that will not take them.
async fn readyz(State(server): State<Arc<Server>>) -> (StatusCode, &'static str) {
    match server.readiness() {
        Readiness::Accepting => (StatusCode::OK, "ready\n"),
        Readiness::Starting => (
            StatusCode::SERVICE_UNAVAILABLE,
            "starting: not every service accepts clients yet\n",
        ),
        Readiness::Draining => (
            StatusCode::SERVICE_UNAVAILABLE,
            "draining: shutting down, accepting no more clients\n",
        ),
    }
}

async fn not_found() -> (StatusCode, &'static str) {
    (
        StatusCode::NOT_FOUND,
        "try /metrics, /connections, /healthz or /readyz\n",
    )
}

async fn method_not_allowed() -> (StatusCode, &'static str) {
    (StatusCode::METHOD_NOT_ALLOWED, "GET only\n")
}

/// `sort` and `limit` from a `/connections` query string, with an error that says what
/// is accepted.
fn connections_query(query: &str) -> Result<(SortBy, usize), String> {
    let (mut sort, mut limit) = (SortBy::Queued, usize::MAX);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "sort" => {
                sort = SortBy::parse(value).ok_or_else(|| {
                    format!("sort={value}: expected sort=queued, sort=kernel or sort=age")
                })?
            }
            "limit" => {
                limit = value
                    .parse()
                    .map_err(|_| format!("limit={value}: expected a number of connections"))?
            }
            _ => return Err(format!("{key}: unknown parameter; try sort= and limit=")),
        }
    }
    Ok((sort, limit))
}

/// Folds histogram samples every [`UPKEEP_EVERY`] until `shutdown`.
async fn upkeep(server: Arc<Server>, shutdown: CancellationToken) {
    let metrics = server.metrics();
    let mut tick = tokio::time::interval(UPKEEP_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => metrics.upkeep(),
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Serves one connection until the client leaves, a timeout or a newcomer closes it,
/// or `shutdown` fires: then it closes at once if it is waiting for a request, or after
/// the answer it is writing.
async fn converse(stream: TcpStream, app: App, admitted: Admitted, shutdown: CancellationToken) {
    let client = admitted.client.clone();
    let service = {
        let client = client.clone();
        hyper::service::service_fn(move |request| {
            let answer = Answer::begin(&client);
            let response = hyper::service::Service::call(&app, request);
            async move {
                let response = response.await?;
                Ok::<_, Infallible>(response.map(|body| Answered {
                    body,
                    _answer: answer,
                }))
            }
        })
    };
    let io = TokioIo::new(Watched {
        stream,
        client: client.clone(),
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_header_size(MAX_HEAD)
        .serve_connection(io, service);
    let mut connection = pin!(connection);
    tokio::select! {
        r = connection.as_mut() => return ended(r),
        _ = client.close.cancelled() => return,
        _ = shutdown.cancelled() => {}
    }
    if client.close_if_waiting() {
        return;
    }
    connection.as_mut().graceful_shutdown();
    tokio::select! {
        r = connection => ended(r),
        _ = client.close.cancelled() => {}
    }
}

/// A connection's end: a client that timed out or spoke garbage is its own trouble.
fn ended(result: hyper::Result<()>) {
    if let Err(e) = result {
        tracing::debug!(error = %e, "admin connection ended");
    }
}

/// The open admin connections, oldest first, and the bound on them.
struct Clients {
    /// One permit per open connection, [`MAX_CONNECTIONS`] in all.
    room: Arc<Semaphore>,
    /// In the order they were accepted, so the one that has waited longest is found
    /// first.
    open: Mutex<Vec<Arc<Client>>>,
    /// Told each time an answer has been written, for a newcomer waiting while every
    /// connection was answering.
    answered: Arc<Notify>,
}

impl Clients {
    fn new(max: usize) -> Clients {
        Clients {
            room: Arc::new(Semaphore::new(max)),
            open: Mutex::new(Vec::with_capacity(max)),
            answered: Arc::default(),
        }
    }

    /// A place for one more connection: a free one, else that of the connection that
    /// has waited longest for a request (closed for it), else, while every connection is
    /// answering, that of the first one to finish its answer.
    async fn make_room(&self) -> OwnedSemaphorePermit {
        loop {
            if let Ok(room) = self.room.clone().try_acquire_owned() {
                return room;
            }
            if self.close_longest_waiting() {
                // Its task ends at its next poll and gives its place back.
                return self.free_place().await;
            }
            tokio::select! {
                room = self.free_place() => return room,
                _ = self.answered.notified() => {}
            }
        }
    }

    async fn free_place(&self) -> OwnedSemaphorePermit {
        self.room
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    /// Closes the oldest connection that is waiting for a request; false if every one
    /// is answering.
    fn close_longest_waiting(&self) -> bool {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.iter().any(|c| c.close_if_waiting())
    }

    fn admit(self: &Arc<Self>, room: OwnedSemaphorePermit) -> Admitted {
        let client = Arc::new(Client {
            phase: AtomicU8::new(Phase::Waiting as u8),
            close: CancellationToken::new(),
            deadline: Mutex::new(None),
            answered: self.answered.clone(),
        });
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(client.clone());
        Admitted {
            client,
            clients: self.clone(),
            _room: room,
        }
    }
}

/// Where a connection is between requests.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    /// Waiting for a request, or reading its head: may be closed to make room.
    Waiting,
    /// A request's head has arrived; its response is not yet all handed to hyper.
    Answering,
    /// Hyper holds the end of the response and has not yet written it to the socket.
    Flushing,
    /// Closed to make room or at shutdown.
    Closing,
}

/// One admin connection.
struct Client {
    /// A [`Phase`], changed by compare-and-swap so a connection is never both closed to
    /// make room and answering.
    phase: AtomicU8,
    /// Fired to close the connection (a newcomer needs its place, or an answer outlived
    /// [`REQUEST_TIMEOUT`]).
    close: CancellationToken,
    /// The timer that closes the connection if the answer under way outlives
    /// [`REQUEST_TIMEOUT`].
    deadline: Mutex<Option<AbortHandle>>,
    /// [`Clients::answered`].
    answered: Arc<Notify>,
}

impl Client {
    fn moves(&self, from: Phase, to: Phase) -> bool {
        self.phase
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Closes the connection if it is waiting for a request.
    fn close_if_waiting(&self) -> bool {
        let closing = self.moves(Phase::Waiting, Phase::Closing);
        if closing {
            self.close.cancel();
        }
        closing
    }

    /// The answer's last byte has reached the socket: the connection waits again.
    fn written(&self) {
        if self.moves(Phase::Flushing, Phase::Waiting) {
            if let Some(timer) = self.lock_deadline().take() {
                timer.abort();
            }
            self.answered.notify_one();
        }
    }

    fn lock_deadline(&self) -> std::sync::MutexGuard<'_, Option<AbortHandle>> {
        self.deadline.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A connection's place among the open ones, given back when its task ends.
struct Admitted {
    client: Arc<Client>,
    clients: Arc<Clients>,
    _room: OwnedSemaphorePermit,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(timer) = self.client.lock_deadline().take() {
            timer.abort();
        }
        self.clients
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|c| !Arc::ptr_eq(c, &self.client));
    }
}

/// A request being answered, until hyper has taken the whole response body; then the
/// connection is flushing until [`Watched`] sees the last byte written.
struct Answer {
    client: Arc<Client>,
}

impl Answer {
    /// The request's head has arrived: its connection is no longer closed to make room,
    /// and is closed if the answer is not written within [`REQUEST_TIMEOUT`].
    fn begin(client: &Arc<Client>) -> Answer {
        // Fails only for a connection being closed already; it ends at its next poll.
        if client.moves(Phase::Waiting, Phase::Answering) {
            let close = client.close.clone();
            let timer = tokio::spawn(async move {
                tokio::time::sleep(REQUEST_TIMEOUT).await;
                close.cancel();
            });
            *client.lock_deadline() = Some(timer.abort_handle());
        }
        Answer {
            client: client.clone(),
        }
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        self.client.moves(Phase::Answering, Phase::Flushing);
    }
}

/// A response body that keeps its request's [`Answer`] until hyper drops it, after its
/// last frame.
struct Answered<B> {
    body: B,
    _answer: Answer,
}

impl<B: Body + Unpin> Body for Answered<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The connection's socket, watched for the moment hyper's buffered bytes are all
/// written: hyper flushes the socket only once its own write buffer is empty.
struct Watched {
    stream: TcpStream,
    client: Arc<Client>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let flushed = Pin::new(&mut this.stream).poll_flush(cx);
        if let Poll::Ready(Ok(())) = flushed {
            this.client.written();
        }
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
