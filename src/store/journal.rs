//! The resume journal: records of durable chunks, appended and synced on a thread of its own.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::{fs, io};

use super::{JOURNAL_MAGIC, JournalRecord};

/// A journal's header (the staged plan) and its complete records; None when unreadable.
pub(super) fn journal_records(path: &Path) -> Option<(Vec<u8>, Vec<JournalRecord>)> {
    let bytes = fs::read(path).ok()?;
    let rest = bytes.strip_prefix(&JOURNAL_MAGIC[..])?;
    let n = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?) as usize;
    let header = rest.get(8..8usize.checked_add(n)?)?.to_vec();
    // A torn last record (killed while appending) is ignored: it was not durable.
    let records = rest[8 + n..]
        .chunks_exact(28)
        .map(|r| {
            let entry = u32::from_le_bytes(r[..4].try_into().expect("4 bytes"));
            let chunk = u64::from_le_bytes(r[4..12].try_into().expect("8 bytes"));
            let digest = u128::from_le_bytes(r[12..].try_into().expect("16 bytes"));
            (entry, chunk, digest)
        })
        .collect();
    Some((header, records))
}

/// A batch for the journal's thread: records, and the files their chunks were written to.
type JournalBatch = (Vec<JournalRecord>, Vec<Arc<File>>);

/// The thread that makes journal batches durable, off the session's event loop. For each batch
/// it syncs the files the chunks were written to first, then appends the records and syncs the
/// journal: the journal never names bytes that are not durable. It stops at the first error
/// (later batches are then not journaled, which costs a resume only the chunks they name).
#[derive(Debug)]
pub(super) struct JournalWriter {
    pub(super) tx: crossbeam_channel::Sender<JournalBatch>,
    pub(super) thread: std::thread::JoinHandle<(usize, io::Result<()>)>,
}

impl JournalWriter {
    pub(super) fn start(mut journal: File) -> io::Result<Self> {
        // A rendezvous channel: a batch is handed over only once the previous one is durable,
        // so at most two batches (the one being synced and the one filling) are not durable
        // yet. Unbounded, a disk slower than the link let the undurable window grow without
        // bound, and a resume after a crash then sent all of it again.
        let (tx, rx) = crossbeam_channel::bounded::<JournalBatch>(0);
        let thread = std::thread::Builder::new().name("shardcast-journal".into()).spawn(move || {
            let mut durable = 0;
            for (records, files) in rx {
                if let Err(e) = append_durably(&mut journal, &records, &files) {
                    return (durable, Err(e));
                }
                durable += records.len();
            }
            (durable, Ok(()))
        })?;
        Ok(Self { tx, thread })
    }

    pub(super) fn send(&self, records: Vec<JournalRecord>, files: Vec<Arc<File>>) {
        // A thread that stopped at an error has said so when it is finished.
        let _ = self.tx.send((records, files));
    }

    /// Waits until every batch sent is durable (or the thread failed): the records made
    /// durable, and the first error.
    pub(super) fn finish(self) -> (usize, io::Result<()>) {
        drop(self.tx);
        self.thread.join().unwrap_or_else(|_| (0, Err(io::Error::other("the journal thread panicked"))))
    }
}

/// Syncs `files`, then appends `records` to the journal and syncs it.
pub(super) fn append_durably(journal: &mut File, records: &[JournalRecord], files: &[Arc<File>]) -> io::Result<()> {
    for f in files {
        f.sync_data()?;
    }
    let mut buf = Vec::with_capacity(records.len() * 28);
    for &(entry, chunk, digest) in records {
        buf.extend_from_slice(&entry.to_le_bytes());
        buf.extend_from_slice(&chunk.to_le_bytes());
        buf.extend_from_slice(&digest.to_le_bytes());
    }
    io::Write::write_all(journal, &buf)?;
    journal.sync_data()
}
