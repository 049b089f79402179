//! Password hashing off the async executor, on a small fixed set of threads that each reuse one
//! work area.
//!
//! argon2id works in 19 MiB. Allocated and freed per hash, those blocks were kept by glibc
//! (measured: +19 MiB of RSS per signup up to ~380 MiB), so each hashing thread keeps one area
//! and reuses it: two threads, at most 2 × 19 MiB, for good.

use std::{
    cell::RefCell,
    sync::{Arc, Mutex, mpsc},
};

use argon2::{
    Algorithm, Argon2, Block, Params, Version,
    password_hash::{Output, ParamsString, PasswordHash, SaltString},
};
use tokio::sync::oneshot;

thread_local! {
    /// This thread's argon2 work area, grown to the parameters' block count once.
    static WORK_AREA: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

/// The argon2id output for `password` and `salt`, computed in this thread's work area.
fn compute(
    algorithm: Algorithm,
    version: Version,
    params: Params,
    password: &[u8],
    salt: &[u8],
    output_len: usize,
) -> Result<Vec<u8>, String> {
    let count = params.block_count();
    let argon2 = Argon2::new(algorithm, version, params);
    let mut out = vec![0u8; output_len];
    WORK_AREA.with(|area| {
        let mut area = area.borrow_mut();
        if area.len() < count {
            area.resize(count, Block::default());
        }
        argon2
            .hash_password_into_with_memory(password, salt, &mut out, &mut area[..count])
            .map_err(|e| e.to_string())
    })?;
    Ok(out)
}

/// A PHC string (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`) for `password`, with the crate's
/// default (OWASP) parameters: the same format and parameters as `argon2`'s own hasher.
pub fn hash(password: &[u8], salt: &[u8]) -> Result<String, String> {
    let params = Params::default();
    let params_text = ParamsString::try_from(&params).map_err(|e| e.to_string())?;
    let out = compute(
        Algorithm::Argon2id,
        Version::V0x13,
        params,
        password,
        salt,
        Params::DEFAULT_OUTPUT_LEN,
    )?;
    let salt = SaltString::encode_b64(salt).map_err(|e| e.to_string())?;
    let output = Output::new(&out).map_err(|e| e.to_string())?;
    Ok(format!(
        "$argon2id$v=19${params_text}${}${output}",
        salt.as_str()
    ))
}

/// True if `password` matches the PHC string `stored` (compared in constant time).
pub fn verify(password: &[u8], stored: &str) -> Result<bool, String> {
    let parsed = PasswordHash::new(stored).map_err(|e| e.to_string())?;
    let algorithm = Algorithm::try_from(parsed.algorithm).map_err(|e| e.to_string())?;
    let version = match parsed.version {
        Some(version) => Version::try_from(version).map_err(|e| e.to_string())?,
        None => Version::V0x13,
    };
    let params = Params::try_from(&parsed).map_err(|e| e.to_string())?;
    let expected = parsed.hash.ok_or("the stored hash has no output")?;
    let salt = parsed.salt.ok_or("the stored hash has no salt")?;
    let mut salt_bytes = [0u8; 64];
    let salt = salt
        .decode_b64(&mut salt_bytes)
        .map_err(|e| e.to_string())?;
    let out = compute(algorithm, version, params, password, salt, expected.len())?;
    let computed = Output::new(&out).map_err(|e| e.to_string())?;
    Ok(computed == expected)
}

/// Threads hashing passwords: enough for logins not to queue behind each other for long on a
/// small machine, few enough to bound the memory they keep.
const HASHING_THREADS: usize = 2;
/// Jobs that may wait for a hashing thread. A hash takes ~50 ms here, so a full queue is about a
/// second of work; beyond it a signup or login is refused at once (429) instead of piling up.
const QUEUE: usize = 32;

type Job = Box<dyn FnOnce() + Send>;

/// Why a job did not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    #[error("too many passwords are being checked; try again shortly")]
    Busy,
    #[error("the password hashing threads stopped")]
    Stopped,
}

/// The hashing threads; they end when this is dropped.
pub struct Hasher {
    jobs: mpsc::SyncSender<Job>,
}

impl Hasher {
    pub fn start() -> std::io::Result<Self> {
        Self::with_queue(QUEUE)
    }

    fn with_queue(queue: usize) -> std::io::Result<Self> {
        let (jobs, receiver) = mpsc::sync_channel::<Job>(queue);
        let receiver = Arc::new(Mutex::new(receiver));
        for index in 0..HASHING_THREADS {
            let receiver = receiver.clone();
            std::thread::Builder::new()
                .name(format!("wadi-hash-{index}"))
                .spawn(move || {
                    loop {
                        let job = crate::util::lock(&receiver).recv();
                        match job {
                            Ok(job) => job(),
                            // The `Hasher` was dropped.
                            Err(_) => return,
                        }
                    }
                })?;
        }
        Ok(Self { jobs })
    }

    /// Runs `work` on a hashing thread and returns its result; [`HashError::Busy`] at once if
    /// the queue is full. If the caller goes away (a client that disconnected) before a thread
    /// takes the job, the work is skipped.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, HashError> {
        let (reply, result) = oneshot::channel();
        let job: Job = Box::new(move || {
            if reply.is_closed() {
                return;
            }
            let _ = reply.send(work());
        });
        self.jobs.try_send(job).map_err(|error| match error {
            mpsc::TrySendError::Full(_) => HashError::Busy,
            mpsc::TrySendError::Disconnected(_) => HashError::Stopped,
        })?;
        result.await.map_err(|_| HashError::Stopped)
    }
}

#[cfg(test)]
mod tests {
    use argon2::{PasswordHasher, PasswordVerifier};

    use super::*;

    const SALT: &[u8] = b"0123456789abcdef";

    #[test]
    fn hashes_verify_and_wrong_passwords_do_not() {
        let stored = hash(b"hunter22", SALT).unwrap();
        assert!(
            stored.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{stored}"
        );
        assert!(verify(b"hunter22", &stored).unwrap());
        assert!(!verify(b"hunter23", &stored).unwrap());
        assert!(verify(b"x", "not a phc string").is_err());
    }

    #[test]
    fn the_format_is_the_argon2_crates_own_both_ways() {
        let salt = SaltString::encode_b64(SALT).unwrap();
        let theirs = Argon2::default()
            .hash_password(b"hunter22", &salt)
            .unwrap()
            .to_string();
        assert_eq!(hash(b"hunter22", SALT).unwrap(), theirs);
        assert!(verify(b"hunter22", &theirs).unwrap());
        let ours = hash(b"correct horse", SALT).unwrap();
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(
            Argon2::default()
                .verify_password(b"correct horse", &parsed)
                .is_ok()
        );
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once_and_abandoned_jobs_are_skipped() {
        let hasher = Arc::new(Hasher::with_queue(1).unwrap());
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate));
        // Occupy both threads.
        let mut busy = Vec::new();
        for _ in 0..HASHING_THREADS {
            let gate = gate.clone();
            let (started, running) = oneshot::channel();
            let hasher = hasher.clone();
            busy.push(tokio::spawn(async move {
                let _ = hasher
                    .run(move || {
                        let _ = started.send(());
                        let _ = gate.lock().unwrap().recv();
                    })
                    .await;
            }));
            running.await.unwrap();
        }
        // One job fits in the queue; its caller gives up before a thread is free.
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ran.clone();
        let queued = hasher.run(move || flag.store(true, std::sync::atomic::Ordering::SeqCst));
        let mut queued = Box::pin(queued);
        assert!(futures_util::poll!(&mut queued).is_pending());
        // The next one is refused at once.
        assert_eq!(hasher.run(|| ()).await, Err(HashError::Busy));
        drop(queued);
        for _ in 0..HASHING_THREADS {
            release.send(()).unwrap();
        }
        for task in busy {
            task.await.unwrap();
        }
        // A job after those (once the queue has room) proves the abandoned one was taken, and
        // skipped, first.
        while hasher.run(|| ()).await == Err(HashError::Busy) {
            tokio::task::yield_now().await;
        }
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[tokio::test]
    async fn jobs_run_on_the_hashing_threads() {
        let hasher = Hasher::start().unwrap();
        let name = hasher
            .run(|| std::thread::current().name().map(str::to_owned))
            .await
            .unwrap();
        assert!(name.is_some_and(|n| n.starts_with("wadi-hash-")));
    }
}
