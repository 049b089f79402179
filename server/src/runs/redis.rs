//! The cluster over Redis (`--redis-url`): each run's chunks in a stream whose entry ids are its
//! seqs, live events on the run's channel, "run started" on the user's channel, and stop on the
//! owning instance's control channel.
//!
//! Keys of run `R` share the hash tag `{R}`: `wadi:run:{R}:log` (a stream: chunk `n` is entry
//! `n-0` with field `c`, the end is `n-1` with field `end`), `wadi:run:{R}:meta` (a hash: `owner`,
//! `status`, `seq`, `stop`), and the channel `wadi:run:{R}:ev`. Only the owner appends, in one
//! script per batch that checks it still owns the running run (the fence), that the batch
//! follows what the log holds, and publishes what it appended. The owner never waits on Redis
//! per token: its replicator follows the run's handle and sends whatever accumulated while the
//! previous append was in flight. Postgres stays the source of truth: if Redis is lost, the
//! owner re-appends from its memory and followers fall back to the store.
//!
//! Two connections: one multiplexed connection for commands (never a blocking command on it),
//! and one RESP3 connection for subscriptions, re-established and resubscribed automatically;
//! after it reconnects, every followed run reads its log again (pub/sub is at most once).

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use redis::{
    AsyncCommands, Client, ProtocolVersion, PushInfo, PushKind, Script, Value,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use wadi_protocol::RunStatus;

use super::{
    cluster::{
        BusHealth, Changed, Cluster, ClusterEvent, Lease, LiveEvent, LogRead, RunStarted, UserNews,
        Watch,
    },
    handle::RunHandle,
};
use crate::{
    ids::{InstanceId, RunId, UserId},
    limits::{Rate, SharedRates},
    metrics::Metrics,
    store::RunRecord,
};

/// How long a run's log and meta live after the last write (sliding while it runs), and after
/// its end: late resumes replay from here, then from the store.
const LOG_TTL: Duration = Duration::from_secs(600);
/// Chunks sent in one append script at most.
const APPEND_BATCH: usize = 512;
/// Entries read per `XRANGE`.
const READ_BATCH: usize = 512;
/// A Redis command that takes longer than this failed (the default of 500 ms is too tight for a
/// busy server, and the retries make a longer one pointless).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Backoff of a failing append or end, between these bounds.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// How often the subscription connection is probed (a dead one is re-established, and every
/// followed run catches up from its log).
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Appends a batch of chunks. KEYS: log, meta. ARGV: owner, first seq, ttl (s), channel, texts.
/// Returns `{last, stop}`, or `{-1, 0}` (no meta and the batch does not start at seq 1: the log
/// was lost, resend from 1), `{-2, 0}` (fenced: not this owner's running run), `{-3, last}` (the
/// log stops short of the batch: resend from `last + 1`). A batch already appended is a no-op,
/// so a retry after an unknown outcome is safe.
const APPEND: &str = r"
local m = redis.call('HMGET', KEYS[2], 'owner', 'status', 'seq', 'stop')
local first = tonumber(ARGV[2])
if not m[1] then
  if first ~= 1 then return {-1, 0} end
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'owner', ARGV[1], 'status', 'running', 'seq', 0, 'stop', 0)
  m = {ARGV[1], 'running', '0', '0'}
end
if m[1] ~= ARGV[1] or m[2] ~= 'running' then return {-2, 0} end
local last = tonumber(m[3]) or 0
local stop = tonumber(m[4]) or 0
if first > last + 1 then return {-3, last} end
local newlast = first + (#ARGV - 4) - 1
if newlast <= last then return {last, stop} end
local from = math.max(first, last + 1)
local out = {}
for s = from, newlast do
  local text = ARGV[4 + (s - first) + 1]
  redis.call('XADD', KEYS[1], s .. '-0', 'c', text)
  out[#out + 1] = text
end
redis.call('HSET', KEYS[2], 'seq', newlast)
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('PUBLISH', ARGV[4], cjson.encode({s = from, c = out}))
return {newlast, stop}
";

/// Writes a run's end (after it was saved). KEYS: log, meta. ARGV: owner (empty for the
/// reaper), status, last seq, ttl (s), channel. The owner may end only its running run; the
/// reaper a running or fenced one. Returns the last seq, or -2 if refused.
const END: &str = r"
local m = redis.call('HMGET', KEYS[2], 'owner', 'status', 'seq')
local last = tonumber(ARGV[3])
if m[1] then
  if ARGV[1] ~= '' and (m[1] ~= ARGV[1] or m[2] ~= 'running') then return -2 end
  if ARGV[1] == '' and m[2] ~= 'running' and m[2] ~= 'fenced' then return -2 end
  local held = tonumber(m[3]) or 0
  if held > last then last = held end
end
redis.call('HSET', KEYS[2], 'owner', m[1] or ARGV[1], 'status', ARGV[2], 'seq', last)
redis.call('XADD', KEYS[1], last .. '-1', 'end', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('PUBLISH', ARGV[5], cjson.encode({e = ARGV[2], s = last}))
return last
";

/// The reaper's fence: from now on the owner's appends are refused. KEYS: log, meta. ARGV: the
/// stored checkpoint's seq, ttl (s). Returns the log's entries after the checkpoint.
const FENCE: &str = r"
local m = redis.call('HMGET', KEYS[2], 'owner', 'status')
if not m[1] then
  redis.call('HSET', KEYS[2], 'owner', '', 'status', 'fenced', 'seq', ARGV[1], 'stop', 0)
  redis.call('EXPIRE', KEYS[2], ARGV[2])
  return {}
end
if m[2] == 'running' then redis.call('HSET', KEYS[2], 'status', 'fenced') end
return redis.call('XRANGE', KEYS[1], (tonumber(ARGV[1]) + 1) .. '-0', '+')
";

/// Raises a running run's stop flag (the owner sees it in its next append's answer). KEYS: meta.
const STOP: &str = r"
if redis.call('HGET', KEYS[1], 'status') == 'running' then
  redis.call('HSET', KEYS[1], 'stop', 1)
  return 1
end
return 0
";

/// One event of a rate shared by every instance, as a generic cell rate algorithm (a token
/// bucket kept as one number): the key holds the time, in µs on Redis's clock, at which the
/// allowance is whole again. KEYS: the rate's key. ARGV: µs per event, burst, `take` or `back`.
/// Returns 1 (taken, or given back) or 0 (refused). The key expires when the allowance is whole.
const RATE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local step = tonumber(ARGV[1])
local whole = tonumber(redis.call('GET', KEYS[1])) or now
if whole < now then whole = now end
if ARGV[3] == 'back' then
  whole = whole - step
else
  whole = whole + step
  if whole - now > tonumber(ARGV[2]) * step then return 0 end
end
if whole <= now then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], string.format('%.0f', whole), 'PX',
    string.format('%.0f', math.ceil((whole - now) / 1000)))
end
return 1
";

/// A shared rate's answer later than this is not waited for: the instance's own count decides.
const RATE_TIMEOUT: Duration = Duration::from_secs(1);
/// After a command that can be done without failed (a shared rate, a log read), it is not asked
/// of Redis for this long (a Redis that does not answer would otherwise cost every request, or
/// every read of a stopped run's end, the timeout).
const AWAY: Duration = Duration::from_secs(2);
/// The time one event of a rate with no refill holds its place: a century.
const RATE_STEP_MAX_MICROS: f64 = 100.0 * 365.0 * 86_400e6;

/// A spell of Redis failing a kind of command: it lasts `AWAY` past the last failure.
#[derive(Default)]
struct Spell(Mutex<Option<Instant>>);

impl Spell {
    fn until(&self) -> MutexGuard<'_, Option<Instant>> {
        crate::util::lock(&self.0)
    }

    fn lasts(&self) -> bool {
        self.until().is_some_and(|until| Instant::now() < until)
    }

    /// A failure: the spell lasts `AWAY` from now. True if it began with this failure.
    fn begin(&self) -> bool {
        self.until().replace(Instant::now() + AWAY).is_none()
    }

    /// A success: the spell is over.
    fn end(&self) {
        *self.until() = None;
    }
}

/// Runs a command, and once more if it failed because the connection was gone: the first
/// command after Redis restarted (or the connection was cut) meets the old, broken connection
/// and makes the manager reconnect; asked again, it goes out on the new one.
async fn again_if_gone<T, F: Future<Output = redis::RedisResult<T>>>(
    mut command: impl FnMut() -> F,
) -> redis::RedisResult<T> {
    match command().await {
        Err(error) if error.is_connection_dropped() || error.is_io_error() => command().await,
        answer => answer,
    }
}

/// Warnings about failed appends and ends, at most this many in a burst and per minute after
/// it: while Redis is away every streaming run fails once a second or so.
const FAILURE_LOG_BURST: u32 = 10;
const FAILURE_LOG_PER_MINUTE: f64 = 6.0;

fn log_key(run: RunId) -> String {
    format!("wadi:run:{{{run}}}:log")
}

fn meta_key(run: RunId) -> String {
    format!("wadi:run:{{{run}}}:meta")
}

fn run_channel(run: RunId) -> String {
    format!("wadi:run:{{{run}}}:ev")
}

fn user_channel(user: UserId) -> String {
    format!("wadi:user:{{{user}}}:ev")
}

fn control_channel(instance: InstanceId) -> String {
    format!("wadi:inst:{instance}:ctl")
}

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Append {
    Applied {
        last: u64,
        stop: bool,
    },
    /// The log is gone (Redis lost it): resend from seq 1.
    Missing,
    /// The run is not ours to write any more.
    Fenced,
    /// The log holds up to `last`: resend from there.
    Short {
        last: u64,
    },
}

/// A live event as published by the scripts.
#[derive(Deserialize)]
struct Published {
    #[serde(default)]
    s: u64,
    #[serde(default)]
    c: Option<Vec<String>>,
    #[serde(default)]
    e: Option<String>,
}

/// Where a channel's messages go.
enum Route {
    /// A run's followers here (several while a finished mirror's feeder winds down).
    Run(Vec<(u64, mpsc::UnboundedSender<LiveEvent>)>),
    /// A user's channel, or this instance's control channel: to the runs service.
    Events,
}

enum SubscriptionOp {
    /// One more acquirer of `channel`; `events` routes the channel to the runs service (a
    /// user's channel, this instance's control channel) while it is acquired. `done` says
    /// whether Redis confirmed the subscription.
    Acquire {
        channel: String,
        events: bool,
        done: oneshot::Sender<bool>,
    },
    Release {
        channel: String,
    },
    /// Redis answers again: subscribe what was acquired meanwhile, unsubscribe what was
    /// released meanwhile; `done` says whether all of it went through.
    Restore {
        done: oneshot::Sender<bool>,
    },
}

struct Shared {
    instance: InstanceId,
    routes: Mutex<HashMap<String, Route>>,
    next_route: AtomicU64,
    events: mpsc::UnboundedSender<ClusterEvent>,
    metrics: Arc<Metrics>,
    /// The subscription connection was lost since the last successful probe.
    gap: AtomicBool,
    /// The subscription connection failed a ping or a subscription: acquires are counted and
    /// answered at once (unconfirmed) until the probe finds it answering again and restores.
    subscriber_down: AtomicBool,
}

impl Shared {
    fn routes(&self) -> MutexGuard<'_, HashMap<String, Route>> {
        crate::util::lock(&self.routes)
    }

    /// Tells every followed run that live events may have been lost.
    fn resync(&self) {
        for route in self.routes().values() {
            if let Route::Run(followers) = route {
                for (_, follower) in followers {
                    let _ = follower.send(LiveEvent::Resync);
                }
            }
        }
    }

    fn dispatch(&self, push: PushInfo) {
        match push.kind {
            PushKind::Message => {}
            PushKind::Disconnection => {
                tracing::warn!("lost the Redis subscription connection; followers will catch up");
                self.metrics.redis_errors.inc();
                self.gap.store(true, Ordering::SeqCst);
                self.resync();
                return;
            }
            _ => return,
        }
        let mut data = push.data.into_iter();
        let (Some(channel), Some(payload)) = (data.next(), data.next()) else {
            return;
        };
        let (Ok(channel), Ok(payload)) = (
            redis::from_redis_value::<String>(channel),
            redis::from_redis_value::<String>(payload),
        ) else {
            return;
        };
        let routes = self.routes();
        match routes.get(&channel) {
            Some(Route::Run(followers)) => {
                let Some(event) = live_event(&payload) else {
                    tracing::warn!(%channel, "unreadable run event");
                    return;
                };
                for (_, follower) in followers {
                    let _ = follower.send(event.clone());
                }
            }
            Some(Route::Events) => {
                drop(routes);
                if let Some(event) = cluster_event(&channel, &payload) {
                    let _ = self.events.send(event);
                }
            }
            None => {}
        }
    }
}

fn live_event(payload: &str) -> Option<LiveEvent> {
    let published: Published = serde_json::from_str(payload).ok()?;
    if let Some(status) = published.e {
        return Some(LiveEvent::End {
            status: RunStatus::parse(&status)?,
            last_seq: published.s,
        });
    }
    Some(LiveEvent::Chunks {
        first: published.s,
        texts: published.c.unwrap_or_default(),
    })
}

fn cluster_event(channel: &str, payload: &str) -> Option<ClusterEvent> {
    if channel.starts_with("wadi:inst:") {
        let run = payload.strip_prefix("stop ")?.parse().ok()?;
        return Some(ClusterEvent::Stop(run));
    }
    match serde_json::from_str(payload).ok()? {
        UserNews::RunStarted(started) => Some(ClusterEvent::RunStarted(started)),
        UserNews::Changed { changed } => Some(ClusterEvent::Changed(changed)),
    }
}

pub struct RedisCluster {
    shared: Arc<Shared>,
    commands: ConnectionManager,
    subscriptions: mpsc::UnboundedSender<SubscriptionOp>,
    append: Script,
    end: Script,
    fence: Script,
    stop: Script,
    rate: Script,
    /// Shared rates failed lately: each instance's own counts decide meanwhile.
    rates_away: Spell,
    /// A log read failed lately: mirrors read the store alone meanwhile.
    reads_away: Spell,
    /// Warnings about failed appends left to log (`wadi_redis_errors_total` counts them all).
    failure_log: Mutex<crate::limits::TokenBucket>,
}

impl RedisCluster {
    /// Connects (failing if Redis cannot be reached now) and subscribes to this instance's
    /// control channel. The receiver gets what other instances tell this one.
    pub async fn connect(
        url: &str,
        instance: InstanceId,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<(Arc<Self>, mpsc::UnboundedReceiver<ClusterEvent>)> {
        let client = Client::open(url)?;
        let info = client.get_connection_info().clone();
        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let subscriber_client = Client::open(info.set_redis_settings(resp3))?;
        let settings = ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(RETRY_MAX)
            .set_number_of_retries(3);
        let commands = client
            .get_connection_manager_with_config(settings.clone())
            .await?;
        let (pushes_tx, pushes) = mpsc::unbounded_channel::<PushInfo>();
        let subscriber = subscriber_client
            .get_connection_manager_with_config(
                settings
                    .set_push_sender(pushes_tx)
                    .set_automatic_resubscription(),
            )
            .await?;
        let (events_tx, events) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            instance,
            routes: Mutex::new(HashMap::new()),
            next_route: AtomicU64::new(1),
            events: events_tx,
            metrics,
            gap: AtomicBool::new(false),
            subscriber_down: AtomicBool::new(false),
        });
        tokio::spawn(dispatch(Arc::downgrade(&shared), pushes));
        let (subscriptions, ops) = mpsc::unbounded_channel();
        tokio::spawn(probe(
            Arc::downgrade(&shared),
            subscriber.clone(),
            subscriptions.clone(),
        ));
        tokio::spawn(manage_subscriptions(
            Arc::downgrade(&shared),
            ops,
            subscriber,
        ));
        let cluster = Arc::new(Self {
            shared,
            commands,
            subscriptions,
            append: Script::new(APPEND),
            end: Script::new(END),
            fence: Script::new(FENCE),
            stop: Script::new(STOP),
            rate: Script::new(RATE),
            rates_away: Spell::default(),
            reads_away: Spell::default(),
            failure_log: Mutex::new(crate::limits::TokenBucket::new(
                FAILURE_LOG_BURST,
                FAILURE_LOG_PER_MINUTE / 60.0,
            )),
        });
        if !cluster.acquire(control_channel(instance), true).await {
            anyhow::bail!("cannot subscribe to this instance's control channel on Redis");
        }
        Ok((cluster, events))
    }

    /// Subscribes (counted: the first acquirer subscribes); resolves once Redis confirmed, or
    /// false if it did not (the acquire still counts: release it, and while it is held the
    /// channel is subscribed as soon as Redis answers again).
    async fn acquire(&self, channel: String, events: bool) -> bool {
        let (done, confirmed) = oneshot::channel();
        if self
            .subscriptions
            .send(SubscriptionOp::Acquire {
                channel,
                events,
                done,
            })
            .is_err()
        {
            return false;
        }
        confirmed.await.unwrap_or(false)
    }

    fn release_lease(&self, channel: String) -> Lease {
        let subscriptions = self.subscriptions.clone();
        Lease::new(move || {
            let _ = subscriptions.send(SubscriptionOp::Release { channel });
        })
    }

    async fn append(&self, run: RunId, first: u64, texts: &[String]) -> redis::RedisResult<Append> {
        let started = Instant::now();
        let mut invocation = self.append.prepare_invoke();
        invocation
            .key(log_key(run))
            .key(meta_key(run))
            .arg(self.shared.instance.to_string())
            .arg(first)
            .arg(LOG_TTL.as_secs())
            .arg(run_channel(run));
        for text in texts {
            invocation.arg(text.as_str());
        }
        let mut connection = self.commands.clone();
        let (code, value): (i64, i64) = invocation.invoke_async(&mut connection).await?;
        self.shared
            .metrics
            .redis_append_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(match code {
            -1 => Append::Missing,
            -2 => Append::Fenced,
            -3 => Append::Short {
                last: u64::try_from(value).unwrap_or_default(),
            },
            last => Append::Applied {
                last: u64::try_from(last).unwrap_or_default(),
                stop: value == 1,
            },
        })
    }

    async fn write_end(
        &self,
        run: RunId,
        owner: Option<InstanceId>,
        status: RunStatus,
        last_seq: u64,
    ) -> redis::RedisResult<i64> {
        let mut connection = self.commands.clone();
        self.end
            .key(log_key(run))
            .key(meta_key(run))
            .arg(owner.map(|owner| owner.to_string()).unwrap_or_default())
            .arg(status.as_str())
            .arg(last_seq)
            .arg(LOG_TTL.as_secs())
            .arg(run_channel(run))
            .invoke_async(&mut connection)
            .await
    }

    /// One call of the rate script, or `None` if Redis did not answer within `RATE_TIMEOUT`,
    /// or failed less than `AWAY` ago.
    async fn count(&self, key: &str, rate: Rate, op: &str) -> Option<bool> {
        if self.rates_away.lasts() {
            return None;
        }
        let step = if rate.per_second > 0.0 {
            (1e6 / rate.per_second).clamp(1.0, RATE_STEP_MAX_MICROS)
        } else {
            RATE_STEP_MAX_MICROS
        };
        let mut invocation = self.rate.key(key);
        invocation
            .arg(format!("{step:.0}"))
            .arg(rate.burst.max(1))
            .arg(op);
        let invocation = &invocation;
        let answer = tokio::time::timeout(
            RATE_TIMEOUT,
            again_if_gone(|| {
                let mut connection = self.commands.clone();
                async move { invocation.invoke_async::<i64>(&mut connection).await }
            }),
        )
        .await;
        let error = match answer {
            Ok(Ok(taken)) => {
                self.rates_away.end();
                return Some(taken == 1);
            }
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("no answer within {RATE_TIMEOUT:?}"),
        };
        self.shared.metrics.redis_errors.inc();
        // Said once per spell (not per request, and without the key: it may name an address).
        if self.rates_away.begin() {
            tracing::warn!(
                %error,
                "Redis cannot count rates: each instance's own counts decide until it can"
            );
        }
        None
    }

    fn failed(&self, what: &str, error: &redis::RedisError, run: RunId) {
        self.shared.metrics.redis_errors.inc();
        let mut budget = crate::util::lock(&self.failure_log);
        if budget.try_take() {
            tracing::warn!(%run, %error, "Redis {what} failed");
        }
    }
}

#[async_trait]
impl SharedRates for RedisCluster {
    async fn take(&self, key: &str, rate: Rate) -> Option<bool> {
        self.count(key, rate, "take").await
    }

    async fn give_back(&self, key: &str, rate: Rate) {
        self.count(key, rate, "back").await;
    }
}

#[async_trait]
impl Cluster for RedisCluster {
    fn mode(&self) -> &'static str {
        "redis"
    }

    async fn replicate(&self, handle: Arc<RunHandle>) {
        let run = handle.id;
        let mut changes = handle.subscribe();
        let mut sent = 0;
        let mut delay = RETRY_MIN;
        // After the run ended, retrying stops once its log would have expired anyway (the
        // store has everything; followers read it there).
        let mut ended_at: Option<Instant> = None;
        loop {
            changes.borrow_and_update();
            // The ending first: once it is set, every chunk is in the handle, so the batch read
            // after it is the last one.
            let ending = handle.ending();
            let batch = handle.chunks_after(sent, APPEND_BATCH);
            if ending.is_some() && ended_at.is_none() {
                ended_at = Some(Instant::now());
            }
            if ended_at.is_some_and(|at| at.elapsed() > LOG_TTL) {
                tracing::warn!(%run, "giving up copying the run to Redis");
                return;
            }
            let result = if let Some((first, _)) = batch.first() {
                let first = *first;
                let texts: Vec<String> = batch.into_iter().map(|(_, text)| text).collect();
                self.append(run, first, &texts).await.map(|append| match append {
                    Append::Applied { last, stop } => {
                        sent = last;
                        if stop && !handle.is_finished() {
                            tracing::info!(%run, "stop flag seen in the log");
                            handle.stop(RunStatus::Stopped);
                        }
                        true
                    }
                    Append::Missing => {
                        tracing::warn!(%run, "the run's log is gone from Redis; writing it again");
                        sent = 0;
                        true
                    }
                    Append::Short { last } => {
                        tracing::warn!(%run, last, "Redis lost the end of the run's log; writing it again");
                        sent = last;
                        true
                    }
                    Append::Fenced => false,
                })
            } else if let Some(ending) = ending {
                match self
                    .write_end(run, Some(self.shared.instance), ending.status, sent)
                    .await
                {
                    Ok(_) => return,
                    Err(error) => Err(error),
                }
            } else {
                if changes.changed().await.is_err() {
                    return;
                }
                continue;
            };
            match result {
                Ok(true) => delay = RETRY_MIN,
                Ok(false) => {
                    if !handle.is_finished() {
                        tracing::warn!(%run, "the run was reaped while this instance was away; cutting it off");
                        self.shared.metrics.fenced_runs.inc();
                        handle.stop(RunStatus::Interrupted);
                    }
                    return;
                }
                Err(error) => {
                    self.failed("append", &error, run);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RETRY_MAX);
                }
            }
        }
    }

    async fn announce(&self, event: &RunStarted) {
        let Ok(payload) = serde_json::to_string(event) else {
            return;
        };
        let mut connection = self.commands.clone();
        if let Err(error) = connection
            .publish::<_, _, ()>(user_channel(event.user), payload)
            .await
        {
            self.failed("announce", &error, event.run);
        }
    }

    async fn announce_change(&self, event: &Changed) {
        let news = UserNews::Changed {
            changed: event.clone(),
        };
        let Ok(payload) = serde_json::to_string(&news) else {
            return;
        };
        let mut connection = self.commands.clone();
        if let Err(error) = connection
            .publish::<_, _, ()>(user_channel(event.user), payload)
            .await
        {
            tracing::warn!(%error, conversation = %event.conversation, "cannot tell other instances of a change");
            self.shared.metrics.redis_errors.inc();
        }
    }

    async fn send_stop(&self, owner: InstanceId, run: RunId) {
        let mut connection = self.commands.clone();
        if let Err(error) = self
            .stop
            .key(meta_key(run))
            .invoke_async::<i64>(&mut connection)
            .await
        {
            self.failed("stop flag", &error, run);
        }
        if let Err(error) = connection
            .publish::<_, _, ()>(control_channel(owner), format!("stop {run}"))
            .await
        {
            self.failed("stop", &error, run);
        }
    }

    async fn watch_run(&self, run: RunId) -> Option<Watch> {
        let channel = run_channel(run);
        let (sender, events) = mpsc::unbounded_channel();
        let token = self.shared.next_route.fetch_add(1, Ordering::Relaxed);
        {
            let mut routes = self.shared.routes();
            match routes
                .entry(channel.clone())
                .or_insert_with(|| Route::Run(Vec::new()))
            {
                Route::Run(followers) => followers.push((token, sender)),
                Route::Events => return None,
            }
        }
        let shared = Arc::downgrade(&self.shared);
        let release = self.release_lease(channel.clone());
        let route_channel = channel.clone();
        let lease = Lease::new(move || {
            if let Some(shared) = shared.upgrade() {
                let mut routes = shared.routes();
                if let Some(Route::Run(followers)) = routes.get_mut(&route_channel) {
                    followers.retain(|(id, _)| *id != token);
                    if followers.is_empty() {
                        routes.remove(&route_channel);
                    }
                }
            }
            drop(release);
        });
        // Not confirmed now, it is subscribed once Redis answers again (then a `Resync`
        // comes); meanwhile the follower reads the store more often.
        let confirmed = self.acquire(channel, false).await;
        Some(Watch {
            events,
            lease,
            confirmed,
        })
    }

    async fn read_log(&self, run: RunId, after_seq: u64) -> Option<LogRead> {
        if self.reads_away.lasts() {
            return None;
        }
        let mut read = LogRead::default();
        // From `after-1`: the end entry of a run whose last chunk is `after` is `after-1`.
        let mut from = format!("{after_seq}-1");
        let mut connection = self.commands.clone();
        loop {
            let entries: redis::RedisResult<Value> = redis::cmd("XRANGE")
                .arg(log_key(run))
                .arg(&from)
                .arg("+")
                .arg("COUNT")
                .arg(READ_BATCH)
                .query_async(&mut connection)
                .await;
            let entries = match entries {
                Ok(entries) => entries,
                Err(error) => {
                    self.failed("read", &error, run);
                    self.reads_away.begin();
                    return None;
                }
            };
            self.reads_away.end();
            let count = parse_entries(entries, &mut read);
            if count < READ_BATCH || read.ended {
                return Some(read);
            }
            match read.chunks.last() {
                Some((seq, _)) => from = format!("{}-0", seq + 1),
                None => return Some(read),
            }
        }
    }

    async fn watch_user(&self, user: UserId) -> Lease {
        let channel = user_channel(user);
        // Held even if Redis did not confirm it: the channel is subscribed when Redis answers
        // again, and the sockets are then told to reload what they missed.
        self.acquire(channel.clone(), true).await;
        self.release_lease(channel)
    }

    async fn fence(&self, run: &RunRecord) -> Vec<String> {
        let checkpoint = u64::try_from(run.last_seq).unwrap_or_default();
        let mut connection = self.commands.clone();
        let entries: redis::RedisResult<Value> = self
            .fence
            .key(log_key(run.id))
            .key(meta_key(run.id))
            .arg(checkpoint)
            .arg(LOG_TTL.as_secs())
            .invoke_async(&mut connection)
            .await;
        match entries {
            Ok(entries) => {
                let mut read = LogRead::default();
                parse_entries(entries, &mut read);
                // Only what follows the checkpoint without a hole.
                (checkpoint + 1..)
                    .zip(read.chunks)
                    .take_while(|(expected, (seq, _))| expected == seq)
                    .map(|(_, (_, text))| text)
                    .collect()
            }
            Err(error) => {
                self.failed("fence", &error, run.id);
                Vec::new()
            }
        }
    }

    async fn end(&self, run: RunId, status: RunStatus, last_seq: u64) {
        if let Err(error) = self.write_end(run, None, status, last_seq).await {
            self.failed("end", &error, run);
        }
    }

    async fn health(&self) -> BusHealth {
        // A write, not a `PING`: a Redis that answers but refuses writes (out of memory with
        // `noeviction`, or made a read-only replica) cannot hold logs or count rates.
        let probe = redis::cmd("SET")
            .arg(format!("wadi:health:{}", self.shared.instance))
            .arg(1)
            .arg("PX")
            .arg(10_000)
            .clone();
        let probe = &probe;
        let answer = tokio::time::timeout(
            RESPONSE_TIMEOUT,
            again_if_gone(|| {
                let mut connection = self.commands.clone();
                async move { probe.query_async::<String>(&mut connection).await }
            }),
        )
        .await;
        match answer {
            Ok(Ok(_)) => BusHealth::Up,
            _ => BusHealth::Down,
        }
    }
}

/// Reads `XRANGE` entries into `read`; returns how many entries there were.
fn parse_entries(entries: Value, read: &mut LogRead) -> usize {
    let Value::Array(entries) = entries else {
        return 0;
    };
    let count = entries.len();
    for entry in entries {
        let Value::Array(parts) = entry else {
            continue;
        };
        let mut parts = parts.into_iter();
        let (Some(id), Some(fields)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Ok(id) = redis::from_redis_value::<String>(id) else {
            continue;
        };
        let Ok(fields) = redis::from_redis_value::<Vec<String>>(fields) else {
            continue;
        };
        let Some((seq, part)) = id.split_once('-') else {
            continue;
        };
        let Ok(seq) = seq.parse::<u64>() else {
            continue;
        };
        match (part, fields.as_slice()) {
            ("0", [name, text]) if name == "c" => read.chunks.push((seq, text.clone())),
            ("1", [name, _]) if name == "end" => read.ended = true,
            _ => {}
        }
    }
    count
}

/// Routes pushed messages until the connection manager goes away.
async fn dispatch(shared: std::sync::Weak<Shared>, mut pushes: mpsc::UnboundedReceiver<PushInfo>) {
    while let Some(push) = pushes.recv().await {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.dispatch(push);
    }
}

/// Pings the subscription connection: a broken one is re-established by the ping (and its
/// channels resubscribed); then what was acquired or released while it was down is brought in
/// line, and every followed run and socket catches up, since events may have been lost.
async fn probe(
    shared: std::sync::Weak<Shared>,
    mut subscriber: ConnectionManager,
    subscriptions: mpsc::UnboundedSender<SubscriptionOp>,
) {
    let mut healthy = true;
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let ping = redis::cmd("PING");
        let ok = matches!(
            tokio::time::timeout(RESPONSE_TIMEOUT, ping.query_async::<Value>(&mut subscriber))
                .await,
            Ok(Ok(_))
        );
        // Back after a failed probe or subscription, or reconnected by this probe after a
        // lost connection: the channels are subscribed again, so what was missed meanwhile can
        // be read now.
        let reconnected = ok && shared.gap.swap(false, Ordering::SeqCst);
        if ok && (!healthy || reconnected || shared.subscriber_down.load(Ordering::SeqCst)) {
            let (done, restored) = oneshot::channel();
            if subscriptions
                .send(SubscriptionOp::Restore { done })
                .is_err()
            {
                return;
            }
            // Not all restored: asked again at the next probe, and only then caught up.
            if restored.await.unwrap_or(false) {
                tracing::info!(
                    "Redis subscriptions are back; followers and announcements catch up"
                );
                shared.resync();
                let _ = shared.events.send(ClusterEvent::Resync);
            }
        }
        if !ok {
            shared.subscriber_down.store(true, Ordering::SeqCst);
            if healthy {
                shared.metrics.redis_errors.inc();
                tracing::warn!("Redis subscription connection is down");
            }
        }
        healthy = ok;
    }
}

/// Subscribes and unsubscribes in order, counting acquirers per channel, so that a release and
/// an acquire of one channel can never overtake each other on the connection. While the
/// connection is down (`Shared::subscriber_down`) nothing is sent, so nobody waits on a Redis
/// that does not answer: acquires and releases are only counted, and `Restore` makes Redis's
/// subscriptions match the counts once it answers again.
async fn manage_subscriptions(
    shared: std::sync::Weak<Shared>,
    mut ops: mpsc::UnboundedReceiver<SubscriptionOp>,
    subscriber: ConnectionManager,
) {
    let mut subscriptions = Subscriptions {
        subscriber,
        acquired: HashMap::new(),
        subscribed: HashSet::new(),
        uncertain: HashSet::new(),
    };
    while let Some(op) = ops.recv().await {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        match op {
            SubscriptionOp::Acquire {
                channel,
                events,
                done,
            } => {
                if events {
                    shared
                        .routes()
                        .entry(channel.clone())
                        .or_insert(Route::Events);
                }
                *subscriptions.acquired.entry(channel.clone()).or_default() += 1;
                let confirmed = subscriptions.holds(&channel)
                    || (!shared.subscriber_down.load(Ordering::SeqCst)
                        && subscriptions.subscribe(&shared, &channel).await);
                let _ = done.send(confirmed);
            }
            SubscriptionOp::Release { channel } => {
                let Some(count) = subscriptions.acquired.get_mut(&channel) else {
                    continue;
                };
                *count -= 1;
                if *count > 0 {
                    continue;
                }
                subscriptions.acquired.remove(&channel);
                {
                    let mut routes = shared.routes();
                    if let Some(Route::Events) = routes.get(&channel) {
                        routes.remove(&channel);
                    }
                }
                if !shared.subscriber_down.load(Ordering::SeqCst) {
                    subscriptions.unsubscribe(&shared, &channel).await;
                }
            }
            SubscriptionOp::Restore { done } => {
                shared.subscriber_down.store(false, Ordering::SeqCst);
                let restored = subscriptions.restore(&shared).await;
                let _ = done.send(restored);
            }
        }
    }
}

/// What `manage_subscriptions` keeps.
struct Subscriptions {
    subscriber: ConnectionManager,
    /// Acquirers per channel.
    acquired: HashMap<String, usize>,
    /// The channels Redis confirmed and that were not unsubscribed since.
    subscribed: HashSet<String>,
    /// Channels whose last subscribe or unsubscribe was not answered in time: it may still be
    /// carried out when Redis answers again (a response timeout does not drop the connection,
    /// so the command stays queued on it), and their state on Redis is unknown until the next
    /// command for them is answered.
    uncertain: HashSet<String>,
}

impl Subscriptions {
    /// Subscribed for sure.
    fn holds(&self, channel: &str) -> bool {
        self.subscribed.contains(channel) && !self.uncertain.contains(channel)
    }

    /// False if Redis did not confirm in time: the connection is then taken for down.
    async fn subscribe(&mut self, shared: &Shared, channel: &str) -> bool {
        let answer =
            tokio::time::timeout(RESPONSE_TIMEOUT, self.subscriber.subscribe(channel)).await;
        if matches!(answer, Ok(Ok(()))) {
            self.uncertain.remove(channel);
            self.subscribed.insert(channel.to_owned());
            return true;
        }
        tracing::warn!(%channel, "cannot subscribe on Redis; its events are read from the store until it can");
        self.uncertain.insert(channel.to_owned());
        shared.metrics.redis_errors.inc();
        shared.subscriber_down.store(true, Ordering::SeqCst);
        false
    }

    async fn unsubscribe(&mut self, shared: &Shared, channel: &str) -> bool {
        if !self.subscribed.contains(channel) && !self.uncertain.contains(channel) {
            return true;
        }
        let answer =
            tokio::time::timeout(RESPONSE_TIMEOUT, self.subscriber.unsubscribe(channel)).await;
        if matches!(answer, Ok(Ok(()))) {
            self.uncertain.remove(channel);
            self.subscribed.remove(channel);
            return true;
        }
        tracing::warn!(%channel, "cannot unsubscribe on Redis; asked again when it answers");
        self.uncertain.insert(channel.to_owned());
        shared.metrics.redis_errors.inc();
        shared.subscriber_down.store(true, Ordering::SeqCst);
        false
    }

    /// Makes Redis's subscriptions match the counts: subscribes what is acquired and not
    /// surely subscribed, unsubscribes what is subscribed (or may be) and no longer acquired.
    /// Asked after a ping was answered, so every command sent before it has been carried out.
    /// False at the first failure (the probe restores again later).
    async fn restore(&mut self, shared: &Shared) -> bool {
        let missing: Vec<String> = self
            .acquired
            .keys()
            .filter(|channel| !self.holds(channel))
            .cloned()
            .collect();
        for channel in missing {
            if !self.subscribe(shared, &channel).await {
                return false;
            }
        }
        let released: Vec<String> = self
            .subscribed
            .iter()
            .chain(&self.uncertain)
            .filter(|channel| !self.acquired.contains_key(*channel))
            .cloned()
            .collect();
        for channel in released {
            if !self.unsubscribe(shared, &channel).await {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_events_parse() {
        assert_eq!(
            live_event(r#"{"s":3,"c":["a","b"]}"#),
            Some(LiveEvent::Chunks {
                first: 3,
                texts: vec!["a".into(), "b".into()]
            })
        );
        assert_eq!(
            live_event(r#"{"e":"stopped","s":7}"#),
            Some(LiveEvent::End {
                status: RunStatus::Stopped,
                last_seq: 7
            })
        );
        assert_eq!(live_event("not json"), None);
        let run = RunId::new();
        assert_eq!(
            cluster_event("wadi:inst:x:ctl", &format!("stop {run}")),
            Some(ClusterEvent::Stop(run))
        );
    }
}
