//! This node's own side of a push: the primary's sources (files, or bytes in memory) and
//! reads, a replica's staging writes.

use super::*;

/// Bytes in memory that a push reads its chunks from (a checkpoint that was never written to
/// disk). Anything that can lend a byte slice and be shared with the session's thread.
pub type MemoryData = std::sync::Arc<dyn AsRef<[u8]> + Send + Sync>;

/// Where one file entry's bytes come from on the primary.
pub(crate) enum SourceData {
    /// An open file, read with the executor (io_uring or pread).
    File(File),
    /// A buffer in memory, copied into the pinned pool (its length is the entry's size).
    Memory(MemoryData),
}

impl std::fmt::Debug for SourceData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(file) => write!(f, "File({file:?})"),
            Self::Memory(m) => write!(f, "Memory({} bytes)", (**m).as_ref().len()),
        }
    }
}

/// Where a session's chunks come from and go to locally.
#[derive(Debug)]
pub(crate) enum Local {
    /// The primary: one source per entry (None for directories and empty files).
    Source(Vec<Option<SourceData>>),
    /// A replica: the staging area it writes into and publishes (taken when published).
    Staging(Option<Staging>),
}

/// This node's own reads (primary) or writes (replica).
#[derive(Debug)]
pub(super) struct LocalSide {
    pub(super) data: Local,
    /// The next chunk to read (primary).
    pub(super) next_read: u64,
    /// Bytes of all entries before entry i (progress in bytes; only when progress is watched).
    pub(super) bytes_before: Vec<u64>,
    /// A replica that stores part of the push: its staging entry for each manifest entry, and
    /// the manifest it publishes.
    pub(super) own: Option<config::OwnEntries>,
    /// Chunks this replica already held, being copied into staging: joined before syncing.
    pub(super) prefill: Option<std::thread::JoinHandle<Result<(), crate::error::StoreError>>>,
    /// The staging area being synced on a thread of its own (it comes back with the result).
    pub(super) syncing: Option<std::thread::JoinHandle<(Staging, Result<(), NodeError>)>>,
    /// When that sync started.
    pub(super) sync_started: Instant,
    /// Routed push progress: chunks counted into `ack_bytes` so far.
    pub(super) ack_counted: u64,
    pub(super) ack_bytes: u64,
    /// A replica: its version is published here (whatever happens to the hops after that).
    pub(super) published: bool,
}

impl LocalSide {
    pub(super) fn new(data: Local, bytes_before: Vec<u64>) -> Self {
        Self {
            data,
            next_read: 0,
            bytes_before,
            own: None,
            prefill: None,
            syncing: None,
            sync_started: Instant::now(),
            ack_counted: 0,
            ack_bytes: 0,
            published: false,
        }
    }
}

impl Session<'_> {
    /// Publishes the staging area as the version.
    pub(super) fn publish(&mut self) {
        let Local::Staging(st) = &mut self.here.data else { unreachable!("only replicas publish") };
        let st = st.take().expect("published once");
        let manifest = self.here.own.as_ref().map_or(&self.manifest, |s| &s.manifest);
        let result = st.publish(manifest).map_err(|e| e.to_node_error());
        self.here.published = result.is_ok();
        self.events.push_back(Event::PublishDone { result });
    }

    /// Syncs the staging area, once the copy of chunks held from an earlier version is done,
    /// on a thread: a large version's flush can take minutes on a slow disk, and the session
    /// loop goes on meanwhile (upstream hears this node is alive, the nodes after it are heard).
    /// [`Session::sync_done`] takes the staging back.
    pub(super) fn sync(&mut self) {
        let prefill = self.here.prefill.take();
        let Local::Staging(st) = &mut self.here.data else { unreachable!("only replicas sync") };
        let mut st = st.take().expect("a replica syncs once, before it publishes");
        let run = move || {
            let copied = match prefill.map(std::thread::JoinHandle::join) {
                None | Some(Ok(Ok(()))) => Ok(()),
                Some(Ok(Err(e))) => Err(e.to_node_error()),
                Some(Err(_)) => Err(NodeError::new(ErrorKind::Io, "the copy of held chunks panicked")),
            };
            let result = copied.and_then(|()| st.sync().map_err(|e| e.to_node_error()));
            (st, result)
        };
        match std::thread::Builder::new().name("sc-sync".into()).spawn(run) {
            Ok(h) => {
                self.here.syncing = Some(h);
                self.here.sync_started = Instant::now();
            }
            Err(e) => {
                // The staging went with the closure: dropped, it keeps what was journaled.
                let error = NodeError::io("cannot start the thread that syncs the staging area", &e);
                self.events.push_back(Event::SyncDone { result: Err(error) });
            }
        }
    }

    /// The sync thread's end (`wait`: waits for it, until the sync timeout at most): the staging
    /// back in place and `SyncDone` queued. Returns whether a sync ended.
    pub(super) fn sync_done(&mut self, wait: bool) -> bool {
        if wait {
            let deadline = self.here.sync_started + self.cfg.sync_timeout;
            while self.here.syncing.as_ref().is_some_and(|h| !h.is_finished()) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let Some(h) = self.here.syncing.take_if(|h| h.is_finished()) else { return false };
        let result = match h.join() {
            Ok((st, result)) => {
                self.here.data = Local::Staging(Some(st));
                result
            }
            // The staging was dropped while the thread unwound: it keeps what was journaled.
            Err(_) => Err(NodeError::new(ErrorKind::Io, "the sync of the staging area panicked")),
        };
        self.events.push_back(Event::SyncDone { result });
        true
    }

    /// The sync has run past `--sync-timeout`: this node's disk is hung or far too slow. The
    /// push fails here, and the sync thread is left to finish on its own (it owns the staging
    /// area, which keeps what was journaled when it is dropped there).
    pub(super) fn sync_overdue(&mut self) {
        let Some(h) = self.here.syncing.take() else { return };
        drop(h);
        let secs = self.cfg.sync_timeout.as_secs();
        self.abort(NodeError::new(
            ErrorKind::Stalled,
            format!(
                "the staging area did not finish syncing to disk in {secs} s: the disk is hung or far too slow \
                 (serve --sync-timeout)"
            ),
        ));
    }

    /// Every chunk before `through` is written on every node after this one (and here): the
    /// progress a caller watches, and the ack that goes upstream.
    pub(super) fn acked(&mut self, through: u64) {
        if let Some(p) = self.progress {
            use std::sync::atomic::Ordering::Relaxed;
            p.acked_chunks.store(through, Relaxed);
            let bytes = if !self.route.is_everything() {
                // Routed: count only the chunks that travel (incrementally: acks grow).
                while self.here.ack_counted < through {
                    if self.route.onward(self.here.ack_counted) {
                        let c = self.manifest.chunk(self.here.ack_counted).expect("acked chunk exists");
                        self.here.ack_bytes += u64::from(c.len);
                    }
                    self.here.ack_counted += 1;
                }
                self.here.ack_bytes
            } else if through == 0 {
                0
            } else {
                let c = self.manifest.chunk(through - 1).expect("acked chunk exists");
                self.here.bytes_before[c.entry] + c.offset + u64::from(c.len)
            };
            p.acked_bytes.store(bytes, Relaxed);
        }
        if self.up.fd.is_some() {
            self.up.ack = Some(through);
        }
    }

    /// Submits the staging write of chunk `seq` from `slot`.
    pub(super) fn write_chunk(&mut self, seq: u64, slot: SlotId) {
        let c = self.manifest.chunk(seq).expect("machine only writes chunks in range");
        let coding = self.slot_coding(slot);
        if !coding.is_raw() {
            return self.write_decoded(seq, slot, coding);
        }
        let Local::Staging(Some(st)) = &self.here.data else { unreachable!("only replicas write") };
        let entry = match &self.here.own {
            Some(own) => own.map[c.entry].expect("the route stores only this node's entries"),
            None => c.entry,
        };
        let fd = st.fd(entry).expect("files with chunks have a descriptor");
        // The slot stays leased until the machine releases it, which it does only after
        // this write's completion (WriteDone/WriteFailed).
        let buf = Buf::Slot { id: slot, off: HEADER_LEN, len: c.len };
        if let Err(e) = self.pool.submit(&mut self.io, token(T_WRITE, seq), OpKind::Write(c.offset), fd, buf) {
            self.events.push_back(Event::WriteFailed { seq, error: NodeError::io("submitting a write", &e) });
        }
    }

    /// A staging write completed: journal the chunk (so that a failed or interrupted push can
    /// be resumed), or report the failure (forwarding continues).
    pub(super) fn write_done(&mut self, seq: u64, result: std::io::Result<usize>) {
        match result {
            Ok(_) => {
                self.journal_write(seq);
                self.events.push_back(Event::WriteDone { seq });
            }
            Err(e) => {
                let c = self.manifest.chunk(seq).expect("in range");
                let path = &self.manifest.entries()[c.entry].path;
                let error = NodeError::io(format!("cannot write {path} in staging"), &e);
                tracing::warn!(%error, "local write failed; forwarding continues");
                self.events.push_back(Event::WriteFailed { seq, error });
            }
        }
    }

    /// Notes chunk `seq` (verified, and now written to staging) in the journal, so that a
    /// failed or interrupted push can be resumed without it.
    pub(super) fn journal_write(&mut self, seq: u64) {
        let c = self.manifest.chunk(seq).expect("in range");
        let index = seq - self.manifest.entries()[c.entry].first_chunk;
        let entry = match &self.here.own {
            Some(own) => own.map[c.entry].expect("only this node's entries are written"),
            None => c.entry,
        };
        if let Local::Staging(Some(st)) = &mut self.here.data {
            st.record(entry, index, c.digest, c.len);
        }
    }

    /// Primary: submits reads of the next chunks (or copies them from memory), as far ahead as
    /// the pool allows.
    pub(super) fn pump_reads(&mut self) -> std::io::Result<()> {
        // Primary reads: as far ahead as the pool allows.
        while matches!(self.here.data, Local::Source(_))
            && self.end.is_none()
            && self.here.next_read < self.manifest.chunk_count()
        {
            let Some(slot) = self.pool.lease() else { break };
            let seq = self.here.next_read;
            let c = self.manifest.chunk(seq).expect("in range");
            // Routed: only the chunks some node downstream needs.
            self.here.next_read = self.route.next_passing(seq + 1, self.manifest.chunk_count());
            let Local::Source(sources) = &self.here.data else { unreachable!("checked by the loop") };
            match sources[c.entry].as_ref().expect("entries with chunks have a source") {
                SourceData::File(file) => {
                    // The machine releases the slot only after its read and its send completed.
                    let (fd, buf) = (file.as_raw_fd(), Buf::Slot { id: slot, off: HEADER_LEN, len: c.len });
                    let t = token(T_READ, (seq << 16) | u64::from(slot.0));
                    self.pool.submit(&mut self.io, t, OpKind::Read(c.offset), fd, buf)?;
                }
                SourceData::Memory(data) => {
                    let bytes = (**data).as_ref();
                    let start = c.offset as usize;
                    let got = bytes.len().saturating_sub(start).min(c.len as usize);
                    self.pool.slot_mut(slot, HEADER_LEN, got).copy_from_slice(&bytes[start..start + got]);
                    self.read_done(seq, slot, Ok(got));
                }
            }
        }
        Ok(())
    }

    /// A chunk's bytes are in `slot` (read from a file, or copied from memory): hash them, put
    /// the header in front and hand the chunk to the machine.
    pub(super) fn read_done(&mut self, seq: u64, slot: SlotId, result: io::Result<usize>) {
        let chunk = self.manifest.chunk(seq).expect("in range");
        match result {
            Ok(n) if n == chunk.len as usize => {
                let payload = self.pool.slot(slot, HEADER_LEN, n);
                // Hashed as it is read: the source is read once, and the digest travels in the
                // chunk's header.
                let d = digest(payload);
                if self.digests_known && d != chunk.digest {
                    self.pool.release(slot);
                    let path = &self.manifest.entries()[chunk.entry].path;
                    let e = NodeError::new(
                        ErrorKind::Source,
                        format!("source {path} changed after it was hashed (chunk {seq} differs)"),
                    );
                    return self.abort(e);
                }
                self.manifest.set_digest(seq, d);
                self.chunk_read(slot, Header { kind: Kind::Chunk, len: chunk.len, seq, digest: d });
            }
            Ok(_) => {
                self.pool.release(slot);
                let path = &self.manifest.entries()[chunk.entry].path;
                let e = NodeError::new(ErrorKind::Source, format!("source {path} shrank while it was pushed"));
                self.abort(e);
            }
            Err(e) => {
                self.pool.release(slot);
                let path = &self.manifest.entries()[chunk.entry].path;
                let e = NodeError::new(ErrorKind::Source, format!("cannot read source file {path}: {e}"));
                self.abort(e);
            }
        }
    }
}
