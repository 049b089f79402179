//! A lean protocol v1 client: sockets from many loopback source addresses, and frames parsed
//! leniently (only the fields the benchmarks read), so it works against any implementation of
//! the protocol and costs little CPU on the machine it shares with the server.

use std::{
    borrow::Cow,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{Message, Utf8Bytes, protocol::WebSocketConfig},
};

pub type Socket = WebSocketStream<TcpStream>;

/// How long one protocol step (connect, a handshake, an expected frame) may take.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Server frames are small (a chunk frame is about 110 bytes); a 512-byte read buffer (instead
/// of 128 KiB) keeps tens of thousands of client sockets cheap, and costs little per read:
/// tungstenite zero-fills the free part of its buffer before every read, twice per frame (the
/// frame, then the read that finds nothing more). Larger frames grow it. Writes go out at once:
/// the client only sends a few small frames.
fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(512)
        .write_buffer_size(0)
}

/// The loopback addresses client sockets are bound to. Each source address has its own ~28 000
/// ephemeral ports towards the server, and closed sockets hold theirs for a minute (TIME_WAIT),
/// so sockets are spread over many: 127.a.b.c with a, b, c from 1 to 250 (never 127.0.0.x,
/// which other services on the machine use).
#[derive(Debug, Clone, Copy)]
pub struct Sources {
    pub first: u32,
    pub count: u32,
}

impl Sources {
    /// The source address of the `index`th socket.
    pub fn addr(self, index: u64) -> Ipv4Addr {
        let n = self.first as u64 + index % u64::from(self.count.max(1));
        // 250³ addresses; the three bytes are 1..=250.
        let byte = |shift: u64| ((n / shift) % 250 + 1) as u8;
        Ipv4Addr::new(127, byte(250 * 250), byte(250), byte(1))
    }

    /// Splits the range into `parts` disjoint ranges (one per worker process).
    pub fn split(self, parts: u32, part: u32) -> Sources {
        let each = (self.count / parts.max(1)).max(1);
        Sources {
            first: self.first + each * part,
            count: each,
        }
    }
}

/// A server frame: the fields the benchmarks need, everything else ignored.
#[derive(Debug, Deserialize)]
pub struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(default, borrow)]
    pub content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub status: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub code: Option<Cow<'a, str>>,
}

impl<'a> Frame<'a> {
    pub fn parse(text: &'a str) -> Result<Self> {
        serde_json::from_str(text).with_context(|| format!("not a protocol frame: {text:.200}"))
    }

    /// A short description for error reports.
    pub fn describe(&self) -> String {
        match &self.code {
            Some(code) => format!("{} {code}", self.kind),
            None => self.kind.to_string(),
        }
    }
}

/// Opens a WebSocket to `url` (on the server at `server`) from `source`.
pub async fn connect(server: SocketAddr, url: &str, source: Ipv4Addr) -> Result<Socket> {
    let open = async {
        let socket = TcpSocket::new_v4()?;
        socket
            .bind(SocketAddr::new(source.into(), 0))
            .with_context(|| format!("cannot bind to {source}"))?;
        let stream = socket
            .connect(server)
            .await
            .with_context(|| format!("cannot connect to {server} from {source}"))?;
        stream.set_nodelay(true)?;
        let (socket, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config()))
            .await
            .context("WebSocket handshake failed")?;
        anyhow::Ok(socket)
    };
    tokio::time::timeout(STEP_TIMEOUT, open)
        .await
        .map_err(|_| anyhow!("connect timed out"))?
}

/// Sends one JSON text frame.
pub async fn send(socket: &mut Socket, frame: &serde_json::Value) -> Result<()> {
    socket
        .send(Message::Text(frame.to_string().into()))
        .await
        .context("send failed")
}

/// The next text frame's text; pings are answered by tungstenite on the next read.
pub async fn next_text(socket: &mut Socket) -> Result<Utf8Bytes> {
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) => return Ok(text),
            Some(Ok(Message::Close(frame))) => {
                bail!(
                    "closed by the server ({})",
                    frame.map_or(1005, |f| u16::from(f.code))
                )
            }
            Some(Ok(_)) => {}
            Some(Err(error)) => return Err(error).context("read failed"),
            None => bail!("connection ended"),
        }
    }
}

/// Reads the next frame and checks its type.
pub async fn expect(socket: &mut Socket, kind: &str) -> Result<()> {
    let text = tokio::time::timeout(STEP_TIMEOUT, next_text(socket))
        .await
        .map_err(|_| anyhow!("no {kind} frame in time"))??;
    let frame = Frame::parse(text.as_str())?;
    if frame.kind != kind {
        bail!("expected {kind}, got {}", frame.describe());
    }
    Ok(())
}

/// Connects to a conversation's chat socket and authenticates.
pub async fn open_chat(
    server: SocketAddr,
    ws_base: &str,
    conversation: &str,
    token: &str,
    source: Ipv4Addr,
) -> Result<Socket> {
    let url = format!("{ws_base}/ws/chat/{conversation}");
    let mut socket = connect(server, &url, source).await?;
    expect(&mut socket, "connected").await?;
    send(
        &mut socket,
        &serde_json::json!({"type": "auth", "token": token}),
    )
    .await?;
    expect(&mut socket, "authenticated").await?;
    Ok(socket)
}

/// Closes politely: a close frame, then reading until the server's close (bounded).
pub async fn close(mut socket: Socket) {
    let _ = tokio::time::timeout(STEP_TIMEOUT, async {
        let _ = socket.close(None).await;
        while let Some(Ok(_)) = socket.next().await {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_stay_in_loopback_and_off_127_0_0() {
        let sources = Sources {
            first: 0,
            count: 1_000_000,
        };
        for index in [0, 1, 249, 250, 62_499, 62_500, 999_999] {
            let addr = sources.addr(index);
            assert!(addr.is_loopback());
            assert_ne!(addr.octets()[1..], [0, 0, 1]);
            assert!(addr.octets()[1..].iter().all(|b| (1..=250).contains(b)));
        }
        assert_ne!(sources.addr(0), sources.addr(1));
    }

    #[test]
    fn split_sources_do_not_overlap() {
        let sources = Sources {
            first: 100,
            count: 64,
        };
        let a = sources.split(4, 0);
        let b = sources.split(4, 1);
        assert_eq!(a.count, 16);
        assert_eq!(b.first, a.first + a.count);
    }

    #[test]
    fn frames_parse_leniently() {
        let frame =
            Frame::parse(r#"{"type":"chunk","runId":"r","seq":3,"content":"a\"b","x":1}"#).unwrap();
        assert_eq!(frame.kind, "chunk");
        assert_eq!(frame.seq, Some(3));
        assert_eq!(frame.content.as_deref(), Some("a\"b"));
    }
}
