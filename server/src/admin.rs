//! `wadi admin …`: operator tasks on the database a configuration points at, run from the same
//! binary (and the same `--config`, environment and flags) as the server.

use std::{
    io::{BufRead, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, anyhow, bail};
use rand_core::RngCore;
use sqlx::{
    Connection, SqliteConnection,
    sqlite::{SqliteConnectOptions, SqlitePoolOptions},
};

use crate::{
    auth::embedded::{MAX_PASSWORD_BYTES, hashing, keep_retired_keys, keys},
    config::{Config, SecretUrl},
    ids::UserId,
    store::{Store, UserRecord, create_private_dir, create_private_file},
    util::now_millis,
};

/// `wadi admin`.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum AdminCommand {
    /// The embedded auth service's accounts.
    #[command(subcommand)]
    Users(UsersCommand),
    /// Write a consistent copy of the SQLite database to FILE, online (the server may run). On
    /// Postgres, says how to use `pg_dump` instead.
    Backup { file: PathBuf },
    /// Replace the SQLite database with the backup FILE. Stop the server first.
    Restore {
        file: PathBuf,
        /// Replace a database that holds data (it is kept beside, as `wadi.db.before-restore`,
        /// or `.before-restore.2`, … when that exists).
        #[arg(long)]
        force: bool,
    },
    /// Sign new access tokens with a new key. The old key keeps verifying the tokens it signed
    /// until they expire (`--access-token-ttl`); running instances switch within a minute.
    RotateSigningKey,
}

/// `wadi admin users`.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum UsersCommand {
    /// Every account: id, email, created, last sign-in, sessions, conversations.
    List {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// One account (by email or id).
    Show { user: String },
    /// Delete an account, its sessions and its conversations.
    Delete {
        user: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Set a new password (read from standard input, or generated and printed) and end every
    /// session of the account.
    ResetPassword {
        user: String,
        /// Read the new password from standard input instead of generating one.
        #[arg(long)]
        password_stdin: bool,
    },
    /// End every session of the account: its refresh tokens stop working at once, its access
    /// tokens at their next request or socket sign-in (sockets already open keep theirs until
    /// it expires).
    RevokeSessions { user: String },
}

impl AdminCommand {
    /// Whether the command only reads (a listing): cut short, it has changed nothing.
    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            Self::Users(UsersCommand::List { .. } | UsersCommand::Show { .. })
        )
    }
}

/// Runs `command` against the database `config` names. Reads confirmations and passwords from
/// `input`; writes what it did to `out`.
pub async fn run(
    command: AdminCommand,
    config: &Config,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    match command {
        AdminCommand::Users(command) => users(command, config, input, out).await,
        AdminCommand::Backup { file } => backup(config, &file, out).await,
        AdminCommand::Restore { file, force } => restore(config, &file, force, out).await,
        AdminCommand::RotateSigningKey => rotate_signing_key(config, out).await,
    }
}

/// The database the server uses; a SQLite file that does not exist is an error (a mistyped
/// data directory must not get a new, empty database that an operator then edits).
async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    if let Some(path) = sqlite_path(config)?
        && !path.exists()
    {
        bail!(
            "there is no database at {} (is --data-dir / WADI_DATA_DIR right? The server creates \
             it when it first starts)",
            path.display()
        );
    }
    crate::store::connect(
        config.database_url.as_ref().map(SecretUrl::expose),
        &config.data_dir,
    )
    .await
    .with_context(|| match &config.database_url {
        Some(url) => format!("cannot open the database at {url}"),
        None => format!("cannot open the database in {}", config.data_dir.display()),
    })
}

async fn users(
    command: UsersCommand,
    config: &Config,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let store = open_store(config).await?;
    match command {
        UsersCommand::List { json } => {
            let users = store.list_users().await?;
            if json {
                for user in &users {
                    writeln!(out, "{}", serde_json::to_string(user)?)?;
                }
                return Ok(());
            }
            writeln!(
                out,
                "{:<36}  {:<32}  {:<20}  {:<20}  {:>8}  {:>13}",
                "id", "email", "created", "last sign-in", "sessions", "conversations"
            )?;
            for user in &users {
                writeln!(
                    out,
                    "{:<36}  {:<32}  {:<20}  {:<20}  {:>8}  {:>13}",
                    user.id,
                    user.email,
                    timestamp(user.created_at),
                    user.last_sign_in_at
                        .map_or_else(|| "never".to_owned(), timestamp),
                    user.sessions,
                    user.conversations
                )?;
            }
            writeln!(out, "{} account(s)", users.len())?;
        }
        UsersCommand::Show { user } => {
            let user = find_user(store.as_ref(), &user).await?;
            let summary = store
                .list_users()
                .await?
                .into_iter()
                .find(|summary| summary.id == user.id);
            writeln!(out, "id:             {}", user.id)?;
            writeln!(out, "email:          {}", user.email)?;
            writeln!(out, "created:        {}", timestamp(user.created_at))?;
            writeln!(out, "updated:        {}", timestamp(user.updated_at))?;
            writeln!(
                out,
                "last sign-in:   {}",
                user.last_sign_in_at
                    .map_or_else(|| "never".to_owned(), timestamp)
            )?;
            writeln!(out, "metadata:       {}", user.user_metadata)?;
            if let Some(summary) = summary {
                writeln!(out, "sessions:       {}", summary.sessions)?;
                writeln!(out, "conversations:  {}", summary.conversations)?;
            }
        }
        UsersCommand::Delete { user, yes } => {
            let user = find_user(store.as_ref(), &user).await?;
            if !yes {
                write!(
                    out,
                    "This deletes {} and all their conversations. Type the email to confirm: ",
                    user.email
                )?;
                out.flush()?;
                let mut answer = String::new();
                input.read_line(&mut answer)?;
                // Emails are stored lowercased and found in any case: confirmed in any case.
                if answer.trim().to_lowercase() != user.email.to_lowercase() {
                    bail!("not confirmed; nothing was deleted");
                }
            }
            if !store.delete_user(user.id).await? {
                bail!("{} was already gone", user.email);
            }
            writeln!(
                out,
                "deleted {} ({}) with their sessions and conversations",
                user.email, user.id
            )?;
        }
        UsersCommand::ResetPassword {
            user,
            password_stdin,
        } => {
            let user = find_user(store.as_ref(), &user).await?;
            let (password, generated) = if password_stdin {
                let mut line = String::new();
                input.read_line(&mut line)?;
                (line.trim_end_matches(['\r', '\n']).to_owned(), false)
            } else {
                (generate_password(), true)
            };
            if password.chars().count() < config.auth.password_min_length {
                bail!(
                    "the password is shorter than --password-min-length ({})",
                    config.auth.password_min_length
                );
            }
            if password.len() > MAX_PASSWORD_BYTES {
                bail!("the password is longer than {MAX_PASSWORD_BYTES} bytes");
            }
            let hash = tokio::task::spawn_blocking(move || {
                let mut salt = [0u8; 16];
                rand_core::OsRng.fill_bytes(&mut salt);
                hashing::hash(password.as_bytes(), &salt).map(|hash| (hash, password))
            })
            .await?
            .map_err(|error| anyhow!("cannot hash the password: {error}"))?;
            let (hash, password) = hash;
            if !store.reset_password(user.id, &hash, now_millis()).await? {
                bail!("{} was deleted meanwhile", user.email);
            }
            writeln!(
                out,
                "set a new password for {}; every session of the account is ended",
                user.email
            )?;
            if generated {
                writeln!(out, "new password: {password}")?;
            }
        }
        UsersCommand::RevokeSessions { user } => {
            let user = find_user(store.as_ref(), &user).await?;
            let ended = store.delete_user_sessions(user.id, None).await?;
            writeln!(
                out,
                "ended {ended} session(s) of {}: their refresh tokens no longer work, and their \
                 access tokens are refused from their next request or socket sign-in (sockets \
                 already open keep theirs until it expires)",
                user.email
            )?;
        }
    }
    Ok(())
}

/// The account named by `who`: an id, or an email address (any case).
async fn find_user(store: &dyn Store, who: &str) -> anyhow::Result<UserRecord> {
    let found = match who.parse::<UserId>() {
        Ok(id) => store.user_by_id(id).await?,
        Err(_) => store.user_by_email(&who.trim().to_lowercase()).await?,
    };
    found.ok_or_else(|| anyhow!("no account {who:?}"))
}

/// 24 random characters from a 64-letter alphabet (144 bits).
fn generate_password() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bytes = [0u8; 24];
    rand_core::OsRng.fill_bytes(&mut bytes);
    bytes
        .iter()
        .map(|byte| char::from(ALPHABET[usize::from(byte & 63)]))
        .collect()
}

/// Unix milliseconds as an RFC 3339 UTC time, to the second.
fn timestamp(millis: i64) -> String {
    let seconds = millis.div_euclid(1000);
    time::OffsetDateTime::from_unix_timestamp(seconds)
        .ok()
        .and_then(|at| {
            at.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| millis.to_string())
}

/// Where the SQLite database is, or `None` on Postgres.
fn sqlite_path(config: &Config) -> anyhow::Result<Option<PathBuf>> {
    match config.database_url.as_ref().map(SecretUrl::expose) {
        None => Ok(Some(config.data_dir.join("wadi.db"))),
        Some(url) if url.starts_with("sqlite:") => {
            let options: SqliteConnectOptions = url.parse()?;
            let path = options.get_filename();
            if path.as_os_str().is_empty() || path.to_string_lossy().contains(":memory:") {
                bail!("{url} is an in-memory database: there is nothing to back up or restore");
            }
            Ok(Some(path.to_path_buf()))
        }
        Some(_) => Ok(None),
    }
}

fn postgres_pointer(config: &Config, what: &str) -> anyhow::Error {
    let url = config
        .database_url
        .as_ref()
        .map_or_else(String::new, ToString::to_string);
    match what {
        "backup" => anyhow!(
            "the database is Postgres: back it up with pg_dump, which takes a consistent \
             snapshot while WADI runs:\n  pg_dump --format=custom --file=wadi.dump '{url}'"
        ),
        _ => anyhow!(
            "the database is Postgres: restore a pg_dump backup with pg_restore (stop every \
             instance first):\n  pg_restore --clean --if-exists --dbname='{url}' wadi.dump"
        ),
    }
}

/// A consistent copy of the live SQLite database (`VACUUM INTO`: one read transaction, so
/// writers carry on), private to this user, checked before it is reported.
async fn backup(config: &Config, file: &Path, out: &mut dyn Write) -> anyhow::Result<()> {
    let Some(path) = sqlite_path(config)? else {
        return Err(postgres_pointer(config, "backup"));
    };
    if !path.exists() {
        bail!("there is no database at {}", path.display());
    }
    create_private_file(file).map_err(|error| match error.kind() {
        std::io::ErrorKind::AlreadyExists => anyhow!(
            "cannot create {}: it exists (a backup never overwrites a file; it must not exist)",
            file.display()
        ),
        _ => anyhow!("cannot create {}: {error}", file.display()),
    })?;
    let result = async {
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .busy_timeout(Duration::from_secs(30));
        let mut connection = SqliteConnection::connect_with(&options).await?;
        sqlx::query("VACUUM INTO ?")
            .bind(file.to_string_lossy().into_owned())
            .execute(&mut connection)
            .await?;
        connection.close().await?;
        check_database(file).await
    }
    .await;
    let counts = match result {
        Ok(counts) => counts,
        Err(error) => {
            let _ = std::fs::remove_file(file);
            return Err(error.context(format!("the backup to {} failed", file.display())));
        }
    };
    let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    writeln!(
        out,
        "backed up {} to {} ({size} bytes: {} account(s), {} conversation(s), {} message(s))",
        path.display(),
        file.display(),
        counts.users,
        counts.conversations,
        counts.messages
    )?;
    Ok(())
}

struct Counts {
    users: i64,
    conversations: i64,
    messages: i64,
}

/// Opens the SQLite file at `path` read-only, checks its integrity and that it is a WADI
/// database, and counts what it holds.
async fn check_database(path: &Path) -> anyhow::Result<Counts> {
    let options = SqliteConnectOptions::new().filename(path).read_only(true);
    let mut connection = SqliteConnection::connect_with(&options)
        .await
        .with_context(|| format!("cannot open {}", path.display()))?;
    let (integrity,): (String,) = sqlx::query_as("PRAGMA integrity_check")
        .fetch_one(&mut connection)
        .await
        .with_context(|| format!("{} is not a SQLite database", path.display()))?;
    if integrity != "ok" {
        bail!("{} is damaged: {integrity}", path.display());
    }
    let count = |table: &'static str| format!("SELECT COUNT(*) FROM {table}");
    let mut counts = Vec::new();
    for table in ["users", "conversations", "messages"] {
        let (n,): (i64,) = sqlx::query_as(&count(table))
            .fetch_one(&mut connection)
            .await
            .with_context(|| format!("{} is not a WADI database", path.display()))?;
        counts.push(n);
    }
    connection.close().await?;
    Ok(Counts {
        users: counts[0],
        conversations: counts[1],
        messages: counts[2],
    })
}

/// Replaces the SQLite database with a backup: refused while an instance is running on it, and
/// (without `force`) when it holds data. The replaced files are kept beside it.
async fn restore(
    config: &Config,
    file: &Path,
    force: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let Some(path) = sqlite_path(config)? else {
        return Err(postgres_pointer(config, "restore"));
    };
    let incoming = check_database(file)
        .await
        .with_context(|| format!("{} cannot be restored", file.display()))?;
    if path.exists() {
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await?;
        // An instance that heartbeated within its timeout is running on this file.
        let timeout = i64::try_from(config.runs.instance_timeout.as_millis()).unwrap_or(i64::MAX);
        let live: Result<(i64,), _> = sqlx::query_as(
            "SELECT COUNT(*) FROM instances WHERE heartbeat_at >= \
             CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER) - ?",
        )
        .bind(timeout)
        .fetch_one(&pool)
        .await;
        if let Ok((live,)) = live
            && live > 0
        {
            pool.close().await;
            bail!(
                "a WADI server is running on {} (it heartbeated within --instance-timeout): \
                 stop it first",
                path.display()
            );
        }
        let held: Result<(i64,), _> = sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM users) + (SELECT COUNT(*) FROM conversations)",
        )
        .fetch_one(&pool)
        .await;
        // Fold the write-ahead log into the file so that the copy kept aside is whole.
        let _ = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&pool)
            .await;
        pool.close().await;
        if let Ok((held,)) = held
            && held > 0
            && !force
        {
            bail!(
                "{} holds accounts or conversations; restoring replaces them (the current file \
                 is kept beside it, as {}.before-restore or the next free .before-restore.N). \
                 Run again with --force to do it",
                path.display(),
                path.display()
            );
        }
        // Never over an earlier restore's copy: `.before-restore`, then `.before-restore.2`, …
        let aside = (1..)
            .map(|n| match n {
                1 => ".before-restore".to_owned(),
                n => format!(".before-restore.{n}"),
            })
            .find(|name| !with_suffix(&path, name).exists())
            .unwrap_or_default();
        for suffix in ["", "-wal", "-shm"] {
            let current = with_suffix(&path, suffix);
            if current.exists() {
                let to = with_suffix(&path, &format!("{aside}{suffix}"));
                std::fs::rename(&current, &to)
                    .with_context(|| format!("cannot move {} aside", current.display()))?;
            }
        }
        writeln!(
            out,
            "kept the database it replaces as {}",
            with_suffix(&path, &aside).display()
        )?;
    } else if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        create_private_dir(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    create_private_file(&path)?;
    std::fs::copy(file, &path)
        .with_context(|| format!("cannot copy {} to {}", file.display(), path.display()))?;
    // The backup was taken from a running server: its heartbeat, copied with it, would make
    // this database look in use (and the runs that server drove look driven). A backup older
    // than the table has none.
    let options = SqliteConnectOptions::new().filename(&path);
    let mut connection = SqliteConnection::connect_with(&options).await?;
    let (heartbeats,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'instances'",
    )
    .fetch_one(&mut connection)
    .await?;
    if heartbeats > 0 {
        sqlx::query("DELETE FROM instances")
            .execute(&mut connection)
            .await
            .with_context(|| format!("cannot clear the copied heartbeats in {}", path.display()))?;
    }
    connection.close().await?;
    // Opening it applies the migrations a backup from an older version lacks.
    let store = open_store(config).await?;
    let users = store.list_users().await?.len();
    writeln!(
        out,
        "restored {} into {} ({} account(s), {} conversation(s), {} message(s); {users} \
         account(s) after migrations)",
        file.display(),
        path.display(),
        incoming.users,
        incoming.conversations,
        incoming.messages
    )?;
    Ok(())
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    name.into()
}

/// A new signing key; the keys in use are retired and keep verifying until their tokens
/// expire.
async fn rotate_signing_key(config: &Config, out: &mut dyn Write) -> anyhow::Result<()> {
    if config.auth.supabase_url.is_some() {
        bail!(
            "with SUPABASE_URL, tokens are signed by the Supabase project: rotate its keys there"
        );
    }
    let store = open_store(config).await?;
    let now = now_millis();
    let keep = keep_retired_keys(&config.auth);
    let keep_ms = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
    let key = keys::generate(now)?;
    store
        .rotate_signing_key(&key, now.saturating_sub(keep_ms))
        .await?;
    writeln!(
        out,
        "new signing key {}; running instances sign with it within {} s; the retired key(s) \
         verify until {}",
        key.kid,
        keys::RELOAD_EVERY.as_secs(),
        timestamp(now.saturating_add(keep_ms))
    )?;
    Ok(())
}

/// `wadi healthcheck`: `GET /healthz` on the configured address (loopback when it listens on
/// every address).
pub fn healthcheck(addr: SocketAddr) -> anyhow::Result<()> {
    use std::io::Read;
    let target = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    };
    let timeout = Duration::from_secs(3);
    let mut stream = std::net::TcpStream::connect_timeout(&target, timeout)
        .with_context(|| format!("nothing answers at {target}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET /healthz HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream
        .take(4096)
        .read_to_end(&mut response)
        .with_context(|| {
            format!("{target} took the connection but did not answer within {timeout:?}")
        })?;
    let response = String::from_utf8_lossy(&response);
    let status = response.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) == Some("200") {
        Ok(())
    } else {
        bail!("{target} answered {status:?}")
    }
}
