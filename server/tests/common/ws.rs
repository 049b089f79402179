//! A real WebSocket client (tokio-tungstenite) speaking protocol v1 to the test server.

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{Message, protocol::frame::coding::CloseCode},
};

use super::{TIMEOUT, TestServer};

pub struct WsClient {
    pub socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What arrived next on a socket.
#[derive(Debug)]
pub enum Incoming {
    Frame(Value),
    /// The server closed with this code.
    Closed(u16),
    /// The connection ended without a close frame.
    Ended,
}

impl WsClient {
    /// Opens a socket and reads the `connected` frame.
    pub async fn connect(server: &TestServer, path: &str) -> Self {
        let url = format!("ws://{}{path}", server.addr);
        let (socket, _) = tokio::time::timeout(TIMEOUT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect timed out")
            .expect("connect failed");
        let mut client = Self { socket };
        let connected = client.next().await;
        assert_eq!(connected["type"], "connected", "{connected}");
        assert_eq!(connected["protocolVersion"], 1);
        client
    }

    /// Opens a socket as a proxy in front of the server would, with `X-Forwarded-For: <from>`;
    /// the HTTP status if the upgrade is refused.
    pub async fn connect_from(server: &TestServer, path: &str, from: &str) -> Result<Self, u16> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = format!("ws://{}{path}", server.addr)
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("x-forwarded-for", from.parse().unwrap());
        match tokio::time::timeout(TIMEOUT, tokio_tungstenite::connect_async(request))
            .await
            .expect("connect timed out")
        {
            Ok((socket, _)) => {
                let mut client = Self { socket };
                let connected = client.next().await;
                assert_eq!(connected["type"], "connected", "{connected}");
                Ok(client)
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                Err(response.status().as_u16())
            }
            Err(error) => panic!("connect failed: {error}"),
        }
    }

    /// Opens a socket and authenticates; returns the `authenticated` frame too.
    pub async fn authed(server: &TestServer, path: &str, token: &str) -> (Self, Value) {
        let mut client = Self::connect(server, path).await;
        client.send(json!({"type": "auth", "token": token})).await;
        let frame = client.next().await;
        assert_eq!(frame["type"], "authenticated", "{frame}");
        (client, frame)
    }

    pub async fn send(&mut self, frame: Value) {
        self.socket
            .send(Message::Text(frame.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.socket.send(message).await.unwrap();
    }

    /// The next frame, close or end, skipping protocol pings and pongs.
    pub async fn incoming(&mut self) -> Incoming {
        loop {
            let next = tokio::time::timeout(TIMEOUT, self.socket.next())
                .await
                .expect("nothing arrived in time");
            match next {
                Some(Ok(Message::Text(text))) => {
                    return Incoming::Frame(serde_json::from_str(text.as_str()).unwrap());
                }
                Some(Ok(Message::Close(frame))) => {
                    return Incoming::Closed(frame.map_or(1005, |f| u16::from(f.code)));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(other)) => panic!("unexpected message {other:?}"),
                Some(Err(_)) | None => return Incoming::Ended,
            }
        }
    }

    /// The next JSON frame; fails the test on a close.
    pub async fn next(&mut self) -> Value {
        match self.incoming().await {
            Incoming::Frame(frame) => frame,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// Frames until (and including) one of type `kind`.
    pub async fn until(&mut self, kind: &str) -> Vec<Value> {
        let mut frames = Vec::new();
        loop {
            let frame = self.next().await;
            let done = frame["type"] == kind;
            frames.push(frame);
            if done {
                return frames;
            }
        }
    }

    /// Reads frames until the server closes; returns the frames and the close code.
    pub async fn until_closed(&mut self) -> (Vec<Value>, u16) {
        let mut frames = Vec::new();
        loop {
            match self.incoming().await {
                Incoming::Frame(frame) => frames.push(frame),
                Incoming::Closed(code) => return (frames, code),
                Incoming::Ended => return (frames, 1006),
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self
            .socket
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            }))
            .await;
    }
}

/// The chunks among `frames` as `(seq, content)`.
pub fn chunks(frames: &[Value]) -> Vec<(u64, String)> {
    frames
        .iter()
        .filter(|f| f["type"] == "chunk")
        .map(|f| {
            (
                f["seq"].as_u64().unwrap(),
                f["content"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The concatenated content of the chunks among `frames`.
pub fn text(frames: &[Value]) -> String {
    chunks(frames)
        .into_iter()
        .map(|(_, content)| content)
        .collect()
}
