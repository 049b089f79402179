//! A generator process holding idle connections, so that one scenario can hold more sockets
//! than one process may open (20 000 files here). The parent writes a [`Plan`] as one JSON line
//! on stdin; the worker opens and authenticates the sockets, prints a [`Ready`] line, keeps them
//! open (answering pings) until its stdin closes, then prints a [`Done`] line and exits.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use crate::{
    client::{self, Sources},
    stats::Errors,
};

#[derive(Serialize, Deserialize)]
pub struct Plan {
    pub server: SocketAddr,
    pub ws_base: String,
    /// `(token, conversation)`: sockets are spread over them round-robin.
    pub seats: Vec<(String, String)>,
    /// The first socket's index, so workers spread over the seats evenly.
    pub offset: usize,
    pub count: usize,
    pub concurrency: usize,
    pub sources_first: u32,
    pub sources_count: u32,
}

#[derive(Serialize, Deserialize)]
pub struct Ready {
    pub connected: u64,
    pub errors: Errors,
    pub seconds: f64,
}

#[derive(Serialize, Deserialize)]
pub struct Done {
    /// Sockets that ended while they were supposed to be held.
    pub dropped: u64,
}

pub async fn run() -> Result<()> {
    let mut stdin = BufReader::new(tokio::io::stdin());
    let mut line = String::new();
    stdin.read_line(&mut line).await?;
    let plan: Plan = serde_json::from_str(&line).context("bad plan on stdin")?;
    let sources = Sources {
        first: plan.sources_first,
        count: plan.sources_count,
    };
    let dropped = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let plan = Arc::new(plan);
    let mut opened = futures_util::stream::iter(0..plan.count)
        .map(|index| {
            let plan = plan.clone();
            async move {
                let (token, conversation) = &plan.seats[(plan.offset + index) % plan.seats.len()];
                let source = sources.addr(index as u64);
                client::open_chat(plan.server, &plan.ws_base, conversation, token, source).await
            }
        })
        .buffer_unordered(plan.concurrency.max(1));
    let mut ready = Ready {
        connected: 0,
        errors: Errors::default(),
        seconds: 0.0,
    };
    let mut held = Vec::with_capacity(plan.count);
    while let Some(result) = opened.next().await {
        match result {
            Ok(mut socket) => {
                ready.connected += 1;
                let dropped = dropped.clone();
                // Reading answers the server's pings; an idle socket sees nothing else.
                held.push(tokio::spawn(async move {
                    while let Some(Ok(_)) = socket.next().await {}
                    dropped.fetch_add(1, Ordering::Relaxed);
                }));
            }
            Err(error) => {
                ready.errors.add(format!("{error:#}"));
            }
        }
    }
    ready.seconds = started.elapsed().as_secs_f64();
    println!("{}", serde_json::to_string(&ready)?);

    // Hold until the parent closes our stdin.
    let mut rest = Vec::new();
    let _ = stdin.read_to_end(&mut rest).await;
    let done = Done {
        dropped: dropped.load(Ordering::Relaxed),
    };
    println!("{}", serde_json::to_string(&done)?);
    for task in held {
        task.abort();
    }
    Ok(())
}
