//! The primary's coder threads (`push --compress`, `push --delta`): they compress chunks, and
//! XOR them with their base and compress that, so that the session thread only reads, hashes
//! and sends.
//!
//! A coder never touches the pool: the session copies a chunk's bytes from its slot into a
//! job's own buffer, the coder codes them into the job's output buffer, and the session copies
//! the result back into the slot before the machine hears the chunk is ready (a 4 MiB copy is
//! about 1 ms, compressing it about 13). Jobs circulate (one more than coders), so memory is
//! fixed: per job two buffers of a chunk, per coder one scratch buffer (and one more for a delta
//! push's base).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, unbounded};

use crate::compress::{Coder, Compress, coded_capacity};
use crate::pool::SlotId;
use crate::store::BaseChunk;
use crate::wire::{Coding, Header};

/// Coder threads of a push: `SHARDCAST_CODERS` (benchmarks compare counts), else one per core
/// the process may run on but the session thread's; at least one. On the emulated cluster
/// (5 nodes on 2 vCPUs) two coders took the cycles the relays need: `auto` at 1 Gbit/s was
/// 1.3 x slower than `off` with two, 0.94 x with one (BENCHMARKS.md).
pub(super) fn coder_count() -> usize {
    std::env::var("SHARDCAST_CODERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get).saturating_sub(1))
        .max(1)
}

/// One chunk to code, and what came of it.
#[derive(Debug)]
pub(super) struct Job {
    pub(super) seq: u64,
    /// A copy of the chunk's bytes (the coder XORs a base into them and back).
    pub(super) raw: Vec<u8>,
    /// Code it as a delta against this base first (a delta push).
    pub(super) base: Option<BaseChunk>,
    /// Else (or when the delta does not shrink it) compress it so.
    pub(super) compress: Option<Compress>,
    /// The coded payload.
    pub(super) out: Vec<u8>,
    /// Its coding and length; None: the chunk goes raw.
    pub(super) coded: Option<(Coding, usize)>,
    /// The coding is a delta.
    pub(super) delta: bool,
    /// The time compressing took (not a delta's), for `auto`.
    pub(super) took: Option<Duration>,
    /// Why a base could not be used.
    pub(super) warning: Option<String>,
}

/// The coder threads of a session, and the chunks waiting for them or at them.
#[derive(Debug)]
pub(super) struct Coders {
    jobs: Option<Sender<Job>>,
    done: Receiver<Job>,
    /// Readable when a coder finished a job (the session polls it with its executor).
    wake: UnixStream,
    threads: Vec<std::thread::JoinHandle<()>>,
    free: Vec<Job>,
    /// Chunks read and hashed that wait for a coder, in the order they were read.
    pub(super) waiting: VecDeque<(SlotId, Header)>,
    /// Chunks at a coder. One taken back (sent raw meanwhile) is no longer here, and its
    /// result is dropped.
    pub(super) at_coder: HashMap<u64, (SlotId, Header)>,
    /// A readiness poll on `wake` is in flight.
    pub(super) polling: bool,
}

impl Coders {
    /// `count` coder threads for chunks of at most `chunk_size` bytes, at zstd `level`.
    pub(super) fn new(count: usize, level: Option<i32>, chunk_size: u32) -> std::io::Result<Self> {
        let (jobs, todo) = unbounded::<Job>();
        let (finished, done) = unbounded::<Job>();
        let (wake, signal) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        signal.set_nonblocking(true)?;
        let mut threads = Vec::with_capacity(count);
        for _ in 0..count {
            let coder = Coder::new(level, chunk_size)?;
            let (todo, finished, signal) = (todo.clone(), finished.clone(), signal.try_clone()?);
            let t = std::thread::Builder::new()
                .name("shardcast-coder".into())
                .spawn(move || work(coder, todo, finished, signal))?;
            threads.push(t);
        }
        let free = (0..=count)
            .map(|_| Job {
                seq: 0,
                raw: Vec::with_capacity(chunk_size as usize),
                base: None,
                compress: None,
                out: vec![0; coded_capacity(chunk_size)],
                coded: None,
                delta: false,
                took: None,
                warning: None,
            })
            .collect();
        Ok(Self {
            jobs: Some(jobs),
            done,
            wake,
            threads,
            free,
            waiting: VecDeque::new(),
            at_coder: HashMap::new(),
            polling: false,
        })
    }

    /// The descriptor that turns readable when a coder finished a job.
    pub(super) fn wake_fd(&self) -> std::os::fd::RawFd {
        self.wake.as_raw_fd()
    }

    /// Whether chunk `seq` waits for a coder or is at one.
    pub(super) fn holds(&self, seq: u64) -> bool {
        self.at_coder.contains_key(&seq) || self.waiting.iter().any(|(_, h)| h.seq == seq)
    }

    /// A free job, if every one is not at a coder.
    pub(super) fn free_job(&mut self) -> Option<Job> {
        self.free.pop()
    }

    /// Hands `job` (for the chunk in `slot`, header `h`) to the coders.
    pub(super) fn start(&mut self, job: Job, slot: SlotId, h: Header) {
        self.at_coder.insert(h.seq, (slot, h));
        let sent = self.jobs.as_ref().is_some_and(|j| j.send(job).is_ok());
        assert!(sent, "coder threads live as long as the session");
    }

    /// The jobs finished since the last call (the wake-up signal drained first, so a job
    /// finished meanwhile signals again).
    pub(super) fn finished(&mut self) -> Vec<Job> {
        let mut sink = [0u8; 64];
        while matches!((&self.wake).read(&mut sink), Ok(n) if n > 0) {}
        self.done.try_iter().collect()
    }

    /// Takes a job back once its result was used (or dropped).
    pub(super) fn recycle(&mut self, job: Job) {
        self.free.push(job);
    }
}

impl Drop for Coders {
    fn drop(&mut self) {
        // Closing the queue ends each thread after its job in hand.
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A coder thread: codes jobs until the session closes the queue.
fn work(mut coder: Coder, todo: Receiver<Job>, finished: Sender<Job>, mut signal: UnixStream) {
    let mut files: HashMap<PathBuf, File> = HashMap::new();
    let mut base = Vec::new();
    for mut job in todo {
        code(&mut coder, &mut files, &mut base, &mut job);
        if finished.send(job).is_err() {
            return;
        }
        // Non-blocking: a full socket means a wake-up is pending anyway.
        let _ = signal.write(&[1]);
    }
}

/// Codes one job: as a delta when it has a base and that shrinks it, else compressed when
/// asked and that shrinks it, else raw.
fn code(coder: &mut Coder, files: &mut HashMap<PathBuf, File>, base: &mut Vec<u8>, job: &mut Job) {
    (job.coded, job.delta, job.took, job.warning) = (None, false, None, None);
    if let Some(b) = &job.base {
        match read_base(files, b, base, job.raw.len()) {
            Ok(()) => {
                if let Some(c) = coder.delta(&mut job.raw, base, b.digest, &mut job.out) {
                    (job.coded, job.delta) = (Some(c), true);
                    return;
                }
            }
            Err(e) => job.warning = Some(e),
        }
    }
    if let Some(mode) = job.compress {
        let t = Instant::now();
        job.coded = coder.compress(mode, &job.raw, &mut job.out);
        job.took = Some(t.elapsed());
    }
}

/// Reads base chunk `b` (`len` bytes) into `buf`.
fn read_base(files: &mut HashMap<PathBuf, File>, b: &BaseChunk, buf: &mut Vec<u8>, len: usize) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let file = match files.entry(b.from.clone()) {
        std::collections::hash_map::Entry::Occupied(f) => f.into_mut(),
        std::collections::hash_map::Entry::Vacant(v) => match File::open(&b.from) {
            Ok(f) => v.insert(f),
            Err(e) => return Err(format!("cannot open the base {}: {e}", b.from.display())),
        },
    };
    buf.resize(len, 0);
    file.read_exact_at(buf, b.offset).map_err(|e| format!("cannot read the base {}: {e}", b.from.display()))
}
