//! MQTT over WebSocket (path `/mqtt`, subprotocol `mqtt`), for browser and Flutter apps.
//!
//! After the HTTP upgrade, the WebSocket's binary messages are turned into a byte stream
//! (an in-memory duplex pipe) so that the connection goes through the same gate code as a TCP
//! client: same authentication, ACLs and durability.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// The only path MQTT is served on.
pub const PATH: &str = "/mqtt";
/// Bytes buffered between the WebSocket and the gate in each direction.
const PIPE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("WebSocket handshake failed: {0}")]
    Handshake(String),
    #[error("WebSocket handshake timed out")]
    Timeout,
}

/// Performs the upgrade (within `timeout`, the gate's CONNECT timeout, so that a silent socket
/// is dropped as on the other listeners) and returns the byte stream the gate reads MQTT from.
pub async fn accept<S>(
    stream: S,
    max_packet_size: usize,
    timeout: Duration,
) -> Result<DuplexStream, WsError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The callback's signature, with its large error type, is tungstenite's.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, mut response: Response| -> Result<Response, ErrorResponse> {
        if request.uri().path() != PATH {
            let mut refusal = ErrorResponse::new(Some(format!("MQTT is served on {PATH}")));
            *refusal.status_mut() = StatusCode::NOT_FOUND;
            return Err(refusal);
        }
        let offers_mqtt = request
            .headers()
            .get_all("Sec-WebSocket-Protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|p| p.trim().eq_ignore_ascii_case("mqtt"));
        if offers_mqtt {
            response
                .headers_mut()
                .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
        }
        Ok(response)
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(max_packet_size + 16))
        .max_frame_size(Some(max_packet_size + 16));
    let ws = tokio::time::timeout(
        timeout,
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)),
    )
    .await
    .map_err(|_| WsError::Timeout)?
    .map_err(|e| WsError::Handshake(e.to_string()))?;

    let (gate_side, mut pipe) = tokio::io::duplex(PIPE);
    tokio::spawn(async move {
        let (mut sink, mut source) = ws.split();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            tokio::select! {
                message = source.next() => match message {
                    Some(Ok(Message::Binary(data))) => {
                        if pipe.write_all(&data).await.is_err() {
                            break;
                        }
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                    // MQTT over WebSocket is binary only; text or close ends the connection.
                    Some(Ok(Message::Text(_) | Message::Close(_))) | Some(Err(_)) | None => break,
                },
                n = pipe.read(&mut buf) => match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if sink.send(Message::binary(buf[..n].to_vec())).await.is_err() {
                            break;
                        }
                    }
                },
            }
        }
        let _ = sink.close().await;
    });
    Ok(gate_side)
}
