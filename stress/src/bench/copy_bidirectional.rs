//! tokio's `copy_bidirectional`, the relay most Rust code starts from, served from a child
//! process (`sluice-stress bench --serve-copy-bidirectional UPSTREAM`) so that its memory is
//! measured alone, like every other subject's.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};

/// The first line the relay prints on stdout, followed by the address it listens on (for
/// people; `bench` learns the address from its `READY=1` on `NOTIFY_SOCKET`).
pub const READY_PREFIX: &str = "copy_bidirectional listening on ";

/// What `tokio::io::copy_bidirectional` uses per direction.
pub const TOKIO_DEFAULT_BUFFER: usize = 8 * 1024;

/// Serve until killed: accept on 127.0.0.1:0, connect each client to `upstream`, relay with
/// `copy_bidirectional_with_sizes(buffer, buffer)`. No timeouts, no limits: the naive relay.
pub fn serve(upstream: SocketAddr, buffer: usize) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the runtime")?;
    runtime.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        sluice_testkit::notify::ready(&[("copy_bidirectional", listener.local_addr()?)], None);
        let mut stdout = std::io::stdout();
        writeln!(stdout, "{READY_PREFIX}{}", listener.local_addr()?)?;
        stdout.flush()?;
        loop {
            let mut client = match listener.accept().await {
                Ok((client, _)) => client,
                Err(_) => {
                    // EMFILE and friends: back off rather than spin or die.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                let _ = client.set_nodelay(true);
                let Ok(mut server) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = server.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional_with_sizes(
                    &mut client,
                    &mut server,
                    buffer,
                    buffer,
                )
                .await;
            });
        }
    })
}
