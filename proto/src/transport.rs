//! Every transport setting in one place: no other call site configures tonic.
//!
//! - `TCP_NODELAY` on every socket, both ends. tonic's `serve_with_incoming` ignores the
//!   server builder's nodelay, so the incoming stream is built here with it set: without
//!   it a small round trip costs about 44 ms (Nagle plus delayed ACK) instead of 0.1 ms.
//! - Messages up to [`MAX_MESSAGE_BYTES`] both ways (tonic decodes 4 MiB by default; a
//!   prefill chunk of 512 tokens x 5120 f32 is 10 MiB).
//! - HTTP/2 windows large enough that a prefill chunk is not throttled by flow control.
//! - HTTP/2 and TCP keepalive, so a dead peer is noticed while a stream idles.
//! - [`Security`]: plain TCP, or mutual TLS 1.3 with the cluster's identity
//!   ([`crate::security`]) at both ends. A TLS handshake runs in a task of its own (a
//!   stalled peer never holds up the accept loop), and a refused peer is one log line.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};
use tonic::transport::{Channel, Endpoint, Server, Uri};

use crate::security::{ClusterKey, SERVER_NAME, SecurityError, describe_handshake_error};
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
/// A peer gets this long to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How node connections are protected.
#[derive(Clone, Debug, Default)]
pub enum Security {
    /// Plain TCP: loopback, or a node started with `--insecure`.
    #[default]
    Plain,
    /// Mutual TLS 1.3 with the cluster's identity.
    Cluster(ClusterKey),
}

impl Security {
    /// The cluster's public fingerprint, if any (for mDNS adverts and discovery).
    pub fn fingerprint(&self) -> Option<&str> {
        match self {
            Security::Plain => None,
            Security::Cluster(key) => Some(key.fingerprint()),
        }
    }
}

/// Why the transport failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("invalid address `{addr}`: {message}")]
    Address { addr: String, message: String },
    /// `cause` is not a `source`: its whole chain is in the message already, and callers
    /// that print chains would repeat it.
    #[error("cannot connect to {addr}: {}", error_chain(cause))]
    Connect { addr: String, cause: tonic::transport::Error },
    #[error("server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error(transparent)]
    Security(#[from] SecurityError),
}

/// Wraps a `Stage` implementation with this module's message limits.
pub fn stage_server<S: Stage>(stage: S) -> StageServer<S> {
    StageServer::new(stage).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// Serves `stage` on `listener` until `shutdown` completes.
pub async fn serve<S: Stage>(
    listener: TcpListener,
    stage: S,
    security: &Security,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), TransportError> {
    let router = Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(stage_server(stage));
    match security {
        Security::Plain => {
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true)).with_keepalive(Some(TCP_KEEPALIVE));
            router.serve_with_incoming_shutdown(incoming, shutdown).await?;
        }
        Security::Cluster(key) => {
            let incoming = tls_incoming(listener, key.server_config()?);
            router.serve_with_incoming_shutdown(incoming, shutdown).await?;
        }
    }
    Ok(())
}

/// Accepted connections after a successful handshake; refused peers are logged and
/// dropped. The accept loop ends when the server drops the stream.
fn tls_incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = accept(&listener) => accepted,
                () = tx.closed() => return,
            };
            tune(&tcp);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                // A connection closed before its first byte is a liveness probe (`strata
                // nodes` measures latency by connecting): not worth a warning.
                let mut first = [0u8; 1];
                if let Ok(Ok(0)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await {
                    tracing::debug!(%peer, "a connection closed before sending anything (a probe)");
                    return;
                }
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(TlsConn(stream))).await;
                    }
                    Ok(Err(e)) => tracing::warn!(%peer, "refused a connection: {}", describe_handshake_error(&e)),
                    Err(_) => {
                        tracing::warn!(%peer, "refused a connection: no TLS handshake within {HANDSHAKE_TIMEOUT:?}")
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The next connection; failures (out of file descriptors and the like) are logged and
/// waited out instead of spinning or ending the server.
pub async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(a) => return a,
            Err(e) => {
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// `TCP_NODELAY` and keepalive on a socket tonic does not set up itself.
fn tune(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE));
}

/// A server-side TLS connection, as tonic's server takes it.
pub struct TlsConn(tokio_rustls::server::TlsStream<TcpStream>);

impl Connected for TlsConn {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Binds `addr` (port 0: an ephemeral port); the bound address is `local_addr()`.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// A client of the stage at `addr` (`host:port` or `http://host:port`), connected now.
pub async fn connect(addr: &str, security: &Security) -> Result<StageClient<Channel>, TransportError> {
    let uri = if addr.contains("://") { addr.to_owned() } else { format!("http://{addr}") };
    let endpoint = Endpoint::from_shared(uri)
        .map_err(|e| TransportError::Address { addr: addr.to_owned(), message: e.to_string() })?
        .tcp_nodelay(true)
        .tcp_keepalive(Some(TCP_KEEPALIVE))
        .connect_timeout(CONNECT_TIMEOUT)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    let connected = match security {
        Security::Plain => endpoint.connect().await,
        Security::Cluster(key) => {
            let connector = tokio_rustls::TlsConnector::from(key.client_config()?);
            endpoint
                .connect_with_connector(tower::service_fn(move |uri: Uri| {
                    let connector = connector.clone();
                    async move { connect_tls(uri, connector).await }
                }))
                .await
        }
    };
    let channel = connected.map_err(|cause| TransportError::Connect { addr: addr.to_owned(), cause })?;
    Ok(StageClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// TCP, then the cluster's TLS handshake, for tonic's channel (which reconnects through
/// this too).
async fn connect_tls(uri: Uri, connector: tokio_rustls::TlsConnector) -> std::io::Result<TokioIo<ClientTls>> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{what} in `{uri}`"));
    let host = uri.host().ok_or_else(|| bad("no host"))?.trim_start_matches('[').trim_end_matches(']').to_owned();
    let port = uri.port_u16().ok_or_else(|| bad("no port"))?;
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host.as_str(), port)))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connecting timed out"))??;
    tune(&tcp);
    let name = rustls::pki_types::ServerName::try_from(SERVER_NAME).expect("a valid DNS name");
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no TLS handshake within 10 s"))?
        .map_err(|e| std::io::Error::new(e.kind(), describe_handshake_error(&e)))?;
    Ok(TokioIo::new(stream))
}

type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;

/// The whole chain of an error's causes, `: `-joined: tonic's own Display says only
/// "transport error".
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    // Layers often repeat their cause's text: keep each text once, the longest form.
    let mut pieces: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if !pieces.iter().any(|p| p.contains(&text)) {
            pieces.retain(|p| !text.contains(p.as_str()));
            pieces.push(text);
        }
        cur = err.source();
    }
    pieces.join(": ")
}
