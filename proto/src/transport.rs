//! Every transport setting in one place: no other call site configures tonic.
//!
//! - `TCP_NODELAY` on every socket, both ends. tonic's `serve_with_incoming` ignores the
//!   server builder's nodelay, so the incoming stream is built here with it set: without
//!   it a small round trip costs about 44 ms (Nagle plus delayed ACK) instead of 0.1 ms.
//! - Messages up to [`MAX_MESSAGE_BYTES`] both ways (tonic decodes 4 MiB by default; a
//!   prefill chunk of 512 tokens x 5120 f32 is 10 MiB).
//! - HTTP/2 windows large enough that a prefill chunk is not throttled by flow control.
//! - HTTP/2 and TCP keepalive, so a dead peer is noticed while a stream idles.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};

use crate::v1::stage_client::StageClient;
use crate::v1::stage_server::{Stage, StageServer};

/// The largest message either end encodes or decodes.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// HTTP/2 per-stream and per-connection windows.
const STREAM_WINDOW: u32 = 16 << 20;
const CONNECTION_WINDOW: u32 = 64 << 20;
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the transport failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("invalid address `{addr}`: {message}")]
    Address { addr: String, message: String },
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: tonic::transport::Error },
    #[error("server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Wraps a `Stage` implementation with this module's message limits.
pub fn stage_server<S: Stage>(stage: S) -> StageServer<S> {
    StageServer::new(stage).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// Serves `stage` on `listener` until `shutdown` completes.
pub async fn serve<S: Stage>(
    listener: TcpListener,
    stage: S,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), TransportError> {
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true)).with_keepalive(Some(TCP_KEEPALIVE));
    Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(stage_server(stage))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// Binds `addr` (port 0: an ephemeral port); the bound address is `local_addr()`.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// A client of the stage at `addr` (`host:port` or `http://host:port`), connected now.
pub async fn connect(addr: &str) -> Result<StageClient<Channel>, TransportError> {
    let uri = if addr.contains("://") { addr.to_owned() } else { format!("http://{addr}") };
    let endpoint = Endpoint::from_shared(uri)
        .map_err(|e| TransportError::Address { addr: addr.to_owned(), message: e.to_string() })?;
    let channel = endpoint
        .tcp_nodelay(true)
        .tcp_keepalive(Some(TCP_KEEPALIVE))
        .connect_timeout(CONNECT_TIMEOUT)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(|source| TransportError::Connect { addr: addr.to_owned(), source })?;
    Ok(StageClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}
