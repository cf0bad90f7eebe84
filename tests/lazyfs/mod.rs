//! `lazyfs`: a small FUSE filesystem, mounted through the kernel, that remembers what is durable
//! and can "cut the power": drop everything that was not made durable (the approach of LazyFS,
//! which Jepsen uses against etcd and PostgreSQL).
//!
//! The live tree is kept in memory (the backing store is this process: a power cut rebuilds the
//! live tree from the durable one, which a backing directory would need just the same). Beside it
//! the layer keeps a second, *durable* image of every inode. The model of what survives a power
//! loss is the one POSIX promises and that ext4 with default options can be caught at:
//!
//! - **File data and size**: durable as of the last `fsync`/`fdatasync` of that file. Writes,
//!   truncates/extensions and `fallocate` after it are lost. A file never synced comes back empty.
//! - **A file's fsync makes its data and its inode durable, not its name**: a new file whose
//!   directory was not fsynced after the create is lost with its name (its data is kept only in
//!   the unreachable inode, which is dropped).
//! - **Directory entries** (create, mknod, mkdir, symlink, unlink, rmdir, rename): durable once the
//!   directory that holds them is fsynced (`fsyncdir`). An fsync of directory D makes D's whole
//!   entry table durable as it is at that moment; a new child that had no durable image gets one
//!   (an empty file, an empty directory, or the symlink with its target: a symlink's target is
//!   written with its inode).
//! - **rename is atomic**: a rename between two directories becomes durable as a whole when either
//!   directory is fsynced (the name leaves the source and appears in the target together), as a
//!   journaling filesystem commits it in one transaction. A rename that no fsync covered is lost:
//!   the name stays where it was.
//! - **Attributes** (mode, times) are not modelled as losable: what is chmod-ed is kept on every
//!   inode that survives. (ext4 journals them in order with the directory operations that follow,
//!   and the store always fsyncs a directory after its chmods.)
//!
//! Power cut: at the `k`-th mutating operation the layer sees (write, setattr of size or mode,
//! create, mknod, mkdir, symlink, unlink, rmdir, rename, fsync, fsyncdir, fallocate) the power
//! goes off: that operation and every later request fail with EIO, until the test has killed the
//! process under test and calls [`Handle::power_on`], which replaces the live tree with the
//! durable image (inodes no durable name reaches are dropped).
//!
//! Data is never cached by the kernel (direct I/O, zero entry and attribute timeouts), so what a
//! reader sees after a power cut is the layer's image, not a stale page.

// Two test binaries include this module (crash: power cuts; resume: a stalled disk), each
// using its own part of the handle.
#![allow(dead_code)]
#![allow(unreachable_pub)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, MountOption, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, TimeOrNow, WriteFlags,
};

const ROOT: u64 = 1;
const TTL: Duration = Duration::ZERO;

#[derive(Clone, Debug)]
enum Body {
    File(Vec<u8>),
    Dir(BTreeMap<OsString, u64>),
    Symlink(PathBuf),
}

#[derive(Clone, Debug)]
struct Node {
    body: Body,
    mode: u32,
    mtime: SystemTime,
}

impl Node {
    /// The image a node gets when its name becomes durable before its content was ever synced.
    fn fresh(&self) -> Node {
        let body = match &self.body {
            Body::File(_) => Body::File(Vec::new()),
            Body::Dir(_) => Body::Dir(BTreeMap::new()),
            Body::Symlink(t) => Body::Symlink(t.clone()),
        };
        Node { body, mode: self.mode, mtime: self.mtime }
    }

    fn entries(&self) -> Option<&BTreeMap<OsString, u64>> {
        match &self.body {
            Body::Dir(e) => Some(e),
            _ => None,
        }
    }

    fn entries_mut(&mut self) -> Option<&mut BTreeMap<OsString, u64>> {
        match &mut self.body {
            Body::Dir(e) => Some(e),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
struct Rename {
    from_dir: u64,
    from_name: OsString,
    to_dir: u64,
    to_name: OsString,
    ino: u64,
}

#[derive(Clone, Debug, Default)]
struct Image {
    live: HashMap<u64, Node>,
    durable: HashMap<u64, Node>,
    renames: Vec<Rename>,
}

#[derive(Debug, Default)]
struct State {
    img: Image,
    next_ino: u64,
    /// Mutating operations seen since the last [`Handle::arm`].
    ops: u64,
    cut_at: Option<u64>,
    off: bool,
    /// The operation the power went off at.
    cut_op: Option<String>,
    recent: VecDeque<String>,
    /// Writes of at least [`HELD_WRITE`] bytes wait while this is set ([`Handle::hold_writes`]).
    held: bool,
    /// File fsyncs wait while this is set ([`Handle::hold_fsyncs`]).
    fsyncs_held: bool,
    /// Fsyncs that waited (or wait) because of that.
    fsyncs_waited: u64,
    /// Fsyncs of the directory of this name in the root wait while set
    /// ([`Handle::hold_fsyncs_of_dir`]).
    dir_held: Option<OsString>,
}

/// The smallest write [`Handle::hold_writes`] holds: chunk data, not journal records or headers.
const HELD_WRITE: usize = 64 << 10;

type R<T> = Result<T, Errno>;

impl State {
    fn new() -> State {
        let root = Node { body: Body::Dir(BTreeMap::new()), mode: 0o755, mtime: SystemTime::now() };
        let mut img = Image::default();
        img.live.insert(ROOT, root.clone());
        img.durable.insert(ROOT, root);
        State { img, next_ino: ROOT + 1, ..State::default() }
    }

    fn powered(&self) -> R<()> {
        if self.off { Err(Errno::EIO) } else { Ok(()) }
    }

    /// Counts a mutating operation; the one the power is cut at fails.
    fn mutating(&mut self, what: impl FnOnce() -> String) -> R<()> {
        self.powered()?;
        self.ops += 1;
        let what = what();
        if self.recent.len() == 8 {
            self.recent.pop_front();
        }
        self.recent.push_back(what.clone());
        if self.cut_at == Some(self.ops) {
            self.off = true;
            self.cut_op = Some(what);
            return Err(Errno::EIO);
        }
        Ok(())
    }

    fn node(&self, ino: u64) -> R<&Node> {
        self.img.live.get(&ino).ok_or(Errno::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> R<&mut Node> {
        self.img.live.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    fn dir(&self, ino: u64) -> R<&BTreeMap<OsString, u64>> {
        self.node(ino)?.entries().ok_or(Errno::ENOTDIR)
    }

    fn child(&self, parent: u64, name: &OsStr) -> R<u64> {
        self.dir(parent)?.get(name).copied().ok_or(Errno::ENOENT)
    }

    fn attr(&self, ino: u64) -> R<FileAttr> {
        let n = self.node(ino)?;
        let (kind, size, nlink) = match &n.body {
            Body::File(d) => (FileType::RegularFile, d.len() as u64, 1),
            Body::Dir(_) => (FileType::Directory, 4096, 2),
            Body::Symlink(t) => (FileType::Symlink, t.as_os_str().len() as u64, 1),
        };
        // SAFETY: geteuid/getegid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: n.mtime,
            mtime: n.mtime,
            ctime: n.mtime,
            crtime: n.mtime,
            kind,
            perm: (n.mode & 0o7777) as u16,
            nlink,
            uid,
            gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    /// Adds a new inode under `parent/name`.
    fn add(&mut self, parent: u64, name: &OsStr, body: Body, mode: u32) -> R<u64> {
        if name.len() > 255 {
            return Err(Errno::ENAMETOOLONG);
        }
        if self.dir(parent)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.img.live.insert(ino, Node { body, mode: mode & 0o7777, mtime: SystemTime::now() });
        self.node_mut(parent)?.entries_mut().expect("a directory").insert(name.to_owned(), ino);
        Ok(ino)
    }

    fn fsync_file(&mut self, ino: u64) -> R<()> {
        let n = self.node(ino)?.clone();
        self.img.durable.insert(ino, n);
        Ok(())
    }

    /// Makes sure `ino` has a durable image (the fresh one when it never had any).
    fn ensure_durable(&mut self, ino: u64) {
        if !self.img.durable.contains_key(&ino)
            && let Some(n) = self.img.live.get(&ino)
        {
            let f = n.fresh();
            self.img.durable.insert(ino, f);
        }
    }

    fn fsync_dir(&mut self, dir: u64) -> R<()> {
        let entries = self.dir(dir)?.clone();
        for &child in entries.values() {
            self.ensure_durable(child);
        }
        self.ensure_durable(dir);
        let mode = self.node(dir)?.mode;
        let d = self.img.durable.get_mut(&dir).expect("ensured");
        d.body = Body::Dir(entries);
        d.mode = mode;
        // Renames into or out of `dir` commit as a whole.
        let (hit, rest): (Vec<Rename>, Vec<Rename>) =
            std::mem::take(&mut self.img.renames).into_iter().partition(|r| r.from_dir == dir || r.to_dir == dir);
        self.img.renames = rest;
        for r in hit {
            if r.to_dir != dir {
                self.ensure_durable(r.to_dir);
                self.ensure_durable(r.ino);
                if let Some(e) = self.img.durable.get_mut(&r.to_dir).and_then(Node::entries_mut) {
                    e.insert(r.to_name.clone(), r.ino);
                }
            }
            if r.from_dir != dir
                && let Some(e) = self.img.durable.get_mut(&r.from_dir).and_then(Node::entries_mut)
                && e.get(&r.from_name) == Some(&r.ino)
            {
                e.remove(&r.from_name);
            }
        }
        Ok(())
    }

    /// The power comes back: the live tree becomes what was durable (reachable from the root).
    fn power_on(&mut self) {
        let mut keep = HashMap::new();
        let mut stack = vec![ROOT];
        while let Some(ino) = stack.pop() {
            if keep.contains_key(&ino) {
                continue;
            }
            let Some(n) = self.img.durable.get(&ino) else { continue };
            if let Some(e) = n.entries() {
                stack.extend(e.values().copied());
            }
            keep.insert(ino, n.clone());
        }
        // A durable entry whose inode has no image cannot happen (ensure_durable), but an entry
        // pointing nowhere would be a dangling name: drop such names.
        let present: std::collections::HashSet<u64> = keep.keys().copied().collect();
        for n in keep.values_mut() {
            if let Some(e) = n.entries_mut() {
                e.retain(|_, ino| present.contains(ino));
            }
        }
        self.img = Image { live: keep.clone(), durable: keep, renames: Vec::new() };
        self.off = false;
        self.cut_at = None;
    }
}

/// The test's handle on a mounted lazyfs.
#[derive(Clone)]
pub struct Handle(Arc<Mutex<State>>);

/// A saved image (live and durable state) to go back to.
#[derive(Clone)]
pub struct Snapshot(Image);

impl Handle {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resets the operation count; the power goes off at the `cut_at`-th mutating operation from
    /// now (None: never).
    pub fn arm(&self, cut_at: Option<u64>) {
        let mut s = self.lock();
        s.ops = 0;
        s.cut_at = cut_at;
        s.cut_op = None;
        s.recent.clear();
    }

    /// No cut from now on (the count goes on).
    pub fn disarm(&self) {
        self.lock().cut_at = None;
    }

    /// Mutating operations since [`Handle::arm`].
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// Whether the power is off.
    pub fn is_off(&self) -> bool {
        self.lock().off
    }

    /// Cuts the power now (every later request fails until [`Handle::power_on`]).
    pub fn cut_now(&self) {
        let mut s = self.lock();
        s.off = true;
        s.cut_op = Some("(cut after the push returned)".into());
    }

    /// The operation the power went off at, with the few before it.
    pub fn cut_op(&self) -> String {
        let s = self.lock();
        let recent: Vec<&str> = s.recent.iter().map(String::as_str).collect();
        format!("{} (recent: {})", s.cut_op.as_deref().unwrap_or("-"), recent.join(" | "))
    }

    /// Power back on: drops everything that was not durable.
    pub fn power_on(&self) {
        self.lock().power_on();
    }

    /// While `on`, writes of chunk data (64 KiB or more) wait: a disk that stalls, so that a
    /// replica's staging writes stay in flight for as long as a test needs.
    pub fn hold_writes(&self, on: bool) {
        self.lock().held = on;
    }

    /// While `on`, fsyncs of files wait: a disk slow to flush what was written (a large dirty
    /// page cache), so that a replica's final sync lasts as long as a test needs.
    pub fn hold_fsyncs(&self, on: bool) {
        self.lock().fsyncs_held = on;
    }

    /// While `Some(name)`, fsyncs of the directory `name` in the root wait (and count in
    /// [`Handle::fsyncs_waited`]): a publish held between moving its data into place and writing
    /// its manifest, for as long as a test needs.
    pub fn hold_fsyncs_of_dir(&self, name: Option<&str>) {
        self.lock().dir_held = name.map(OsString::from);
    }

    /// File fsyncs that waited (or wait now) while [`Handle::hold_fsyncs`] was on.
    pub fn fsyncs_waited(&self) -> u64 {
        self.lock().fsyncs_waited
    }

    /// Makes everything durable (a clean `sync` and shutdown).
    pub fn commit_all(&self) {
        let mut s = self.lock();
        s.img.durable = s.img.live.clone();
        s.img.renames.clear();
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot(self.lock().img.clone())
    }

    /// Goes back to a snapshot (power on, no cut armed).
    pub fn restore(&self, snap: &Snapshot) {
        let mut s = self.lock();
        s.img = snap.0.clone();
        s.off = false;
        s.cut_at = None;
    }
}

struct LazyFs(Handle);

/// Mounts a fresh, empty lazyfs at `mountpoint`. The filesystem is unmounted when the session
/// is dropped.
pub fn mount(mountpoint: &Path) -> std::io::Result<(fuser::BackgroundSession, Handle)> {
    let handle = Handle(Arc::new(Mutex::new(State::new())));
    let mut config = Config::default();
    config.mount_options = vec![MountOption::FSName("lazyfs".into()), MountOption::Subtype("lazyfs".into())];
    config.n_threads = Some(1);
    let session = fuser::spawn_mount(LazyFs(handle.clone()), mountpoint, &config)?;
    Ok((session, handle))
}

fn name_of(n: &OsStr) -> String {
    n.to_string_lossy().into_owned()
}

fn empty(reply: ReplyEmpty, r: R<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl LazyFs {
    fn st(&self) -> MutexGuard<'_, State> {
        self.0.lock()
    }
}

impl Filesystem for LazyFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let s = self.st();
        let r = s.powered().and_then(|()| s.child(parent.0, name)).and_then(|ino| s.attr(ino));
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let s = self.st();
        match s.powered().and_then(|()| s.attr(ino.0)) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut s = self.st();
        let r = (|| {
            s.powered()?;
            s.node(ino.0)?;
            if size.is_some() || mode.is_some() {
                s.mutating(|| format!("setattr(ino {}, size {size:?}, mode {mode:?})", ino.0))?;
            }
            // Attributes are not modelled as losable (see the top of this file): a chmod reaches
            // the durable image too.
            if let Some(m) = mode
                && let Some(d) = s.img.durable.get_mut(&ino.0)
            {
                d.mode = m & 0o7777;
            }
            let n = s.node_mut(ino.0)?;
            if let Some(m) = mode {
                n.mode = m & 0o7777;
            }
            if let Some(sz) = size {
                match &mut n.body {
                    Body::File(d) => d.resize(sz as usize, 0),
                    _ => return Err(Errno::EISDIR),
                }
            }
            match mtime {
                Some(TimeOrNow::SpecificTime(t)) => n.mtime = t,
                Some(TimeOrNow::Now) => n.mtime = SystemTime::now(),
                None if size.is_some() => n.mtime = SystemTime::now(),
                None => {}
            }
            s.attr(ino.0)
        })();
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let s = self.st();
        let r = s.powered().and_then(|()| match &s.node(ino.0)?.body {
            Body::Symlink(t) => Ok(t.as_os_str().as_encoded_bytes().to_vec()),
            _ => Err(Errno::EINVAL),
        });
        match r {
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let mut s = self.st();
        let r = (|| {
            if mode & libc::S_IFMT != libc::S_IFREG {
                return Err(Errno::EPERM);
            }
            s.mutating(|| format!("mknod({}/{})", parent.0, name_of(name)))?;
            let ino = s.add(parent.0, name, Body::File(Vec::new()), mode & !umask)?;
            s.attr(ino)
        })();
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let mut s = self.st();
        let r = (|| {
            s.mutating(|| format!("mkdir({}/{})", parent.0, name_of(name)))?;
            let ino = s.add(parent.0, name, Body::Dir(BTreeMap::new()), mode & !umask)?;
            s.attr(ino)
        })();
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.st();
        let r = (|| {
            s.mutating(|| format!("unlink({}/{})", parent.0, name_of(name)))?;
            let ino = s.child(parent.0, name)?;
            if matches!(s.node(ino)?.body, Body::Dir(_)) {
                return Err(Errno::EISDIR);
            }
            s.node_mut(parent.0)?.entries_mut().expect("a directory").remove(name);
            Ok(())
        })();
        empty(reply, r);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.st();
        let r = (|| {
            s.mutating(|| format!("rmdir({}/{})", parent.0, name_of(name)))?;
            let ino = s.child(parent.0, name)?;
            if !s.dir(ino)?.is_empty() {
                return Err(Errno::ENOTEMPTY);
            }
            s.node_mut(parent.0)?.entries_mut().expect("a directory").remove(name);
            Ok(())
        })();
        empty(reply, r);
    }

    fn symlink(&self, _req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let mut s = self.st();
        let r = (|| {
            s.mutating(|| format!("symlink({}/{} -> {})", parent.0, name_of(link_name), target.display()))?;
            let ino = s.add(parent.0, link_name, Body::Symlink(target.to_owned()), 0o777)?;
            s.attr(ino)
        })();
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut s = self.st();
        let r = (|| {
            s.mutating(|| format!("rename({}/{} -> {}/{})", parent.0, name_of(name), newparent.0, name_of(newname)))?;
            if flags.contains(RenameFlags::RENAME_EXCHANGE) || flags.contains(RenameFlags::RENAME_WHITEOUT) {
                return Err(Errno::EINVAL);
            }
            let ino = s.child(parent.0, name)?;
            s.dir(newparent.0)?;
            if let Some(&old) = s.dir(newparent.0)?.get(newname) {
                if old == ino {
                    return Ok(());
                }
                if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                    return Err(Errno::EEXIST);
                }
                let src_dir = matches!(s.node(ino)?.body, Body::Dir(_));
                match s.node(old)?.entries() {
                    Some(e) if !e.is_empty() => return Err(Errno::ENOTEMPTY),
                    Some(_) if !src_dir => return Err(Errno::EISDIR),
                    None if src_dir => return Err(Errno::ENOTDIR),
                    _ => {}
                }
            }
            s.node_mut(parent.0)?.entries_mut().expect("a directory").remove(name);
            s.node_mut(newparent.0)?.entries_mut().expect("a directory").insert(newname.to_owned(), ino);
            s.img.renames.push(Rename {
                from_dir: parent.0,
                from_name: name.to_owned(),
                to_dir: newparent.0,
                to_name: newname.to_owned(),
                ino,
            });
            Ok(())
        })();
        empty(reply, r);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let s = self.st();
        match s.powered().and_then(|()| s.node(ino.0).map(|_| ())) {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut s = self.st();
        let r = (|| {
            s.mutating(|| format!("create({}/{})", parent.0, name_of(name)))?;
            match s.child(parent.0, name) {
                Ok(_) if flags & libc::O_EXCL != 0 => Err(Errno::EEXIST),
                Ok(ino) => {
                    if flags & libc::O_TRUNC != 0
                        && let Body::File(d) = &mut s.node_mut(ino)?.body
                    {
                        d.clear();
                    }
                    s.attr(ino)
                }
                Err(_) => {
                    let ino = s.add(parent.0, name, Body::File(Vec::new()), mode & !umask)?;
                    s.attr(ino)
                }
            }
        })();
        match r {
            Ok(a) => reply.created(&TTL, &a, Generation(0), FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let s = self.st();
        let r = s.powered().and_then(|()| match &s.node(ino.0)?.body {
            Body::File(d) => {
                let start = (offset as usize).min(d.len());
                let end = (start + size as usize).min(d.len());
                Ok(d[start..end].to_vec())
            }
            _ => Err(Errno::EISDIR),
        });
        match r {
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        while data.len() >= HELD_WRITE && self.st().held {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let mut s = self.st();
        let r = (|| {
            s.mutating(|| format!("write(ino {}, {} bytes at {offset})", ino.0, data.len()))?;
            let n = s.node_mut(ino.0)?;
            n.mtime = SystemTime::now();
            match &mut n.body {
                Body::File(d) => {
                    let end = offset as usize + data.len();
                    if d.len() < end {
                        d.resize(end, 0);
                    }
                    d[offset as usize..end].copy_from_slice(data);
                    Ok(data.len() as u32)
                }
                _ => Err(Errno::EISDIR),
            }
        })();
        match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lo: fuser::LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        if self.st().fsyncs_held {
            self.st().fsyncs_waited += 1;
            while self.st().fsyncs_held {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        let mut s = self.st();
        let r = (|| {
            s.mutating(|| format!("fsync(ino {}, datasync {datasync})", ino.0))?;
            s.fsync_file(ino.0)
        })();
        empty(reply, r);
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let s = self.st();
        let r = s.powered().and_then(|()| {
            let mut all =
                vec![(ino.0, FileType::Directory, OsString::from(".")), (ROOT, FileType::Directory, "..".into())];
            for (name, &child) in s.dir(ino.0)? {
                let kind = match s.node(child).map(|n| &n.body) {
                    Ok(Body::Dir(_)) => FileType::Directory,
                    Ok(Body::Symlink(_)) => FileType::Symlink,
                    _ => FileType::RegularFile,
                };
                all.push((child, kind, name.clone()));
            }
            Ok(all)
        });
        match r {
            Ok(all) => {
                for (i, (child, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(child), i as u64 + 1, kind, &name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        let held = |s: &State| s.dir_held.as_ref().is_some_and(|n| s.child(ROOT, n).ok() == Some(ino.0));
        if held(&self.st()) {
            self.st().fsyncs_waited += 1;
            while held(&self.st()) {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        let mut s = self.st();
        let r = (|| {
            s.mutating(|| format!("fsyncdir(ino {}, datasync {datasync})", ino.0))?;
            s.fsync_dir(ino.0)
        })();
        empty(reply, r);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // 64 GiB free: the store checks free space before staging.
        reply.statfs(1 << 24, 1 << 24, 1 << 24, 1 << 20, 1 << 20, 4096, 255, 4096);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let mut s = self.st();
        let r = (|| {
            if mode != 0 {
                return Err(Errno::EOPNOTSUPP);
            }
            s.mutating(|| format!("fallocate(ino {}, {length} at {offset})", ino.0))?;
            match &mut s.node_mut(ino.0)?.body {
                Body::File(d) => {
                    let end = (offset + length) as usize;
                    if d.len() < end {
                        d.resize(end, 0);
                    }
                    Ok(())
                }
                _ => Err(Errno::EISDIR),
            }
        })();
        empty(reply, r);
    }
}
