//! Simulated power cuts (issue #17): a FUSE filesystem, in memory, that keeps two copies of
//! everything — what the programs see, and what a disk would still hold after the power went
//! off — and can cut the power at the N-th write-like operation.
//!
//! # The model
//! - **File data** becomes durable only by an `fsync`/`fdatasync` of that file: the byte ranges
//!   written since its last sync (and its length) are copied to the durable copy. Unsynced data
//!   of every other file is lost at a cut.
//! - **Names** (create, mkdir, rename, unlink, rmdir) become durable at the next `fsync` of any
//!   file or directory, all of them together and in order, as ext4's ordered-mode journal commits
//!   every metadata change before the one it was asked to commit (the Pi's root filesystem is
//!   ext4). A stricter filesystem that needs the directory itself synced is not modelled.
//! - **A cut** at operation N: operation N and everything after it fail with EIO, and
//!   [`PowerCut::cut_happened`] says so; the test then SIGKILLs the program and mounts a fresh
//!   filesystem from what the disk holds ([`Snapshot`]): either only what was synced
//!   ([`PowerCut::durable`]), or that plus a random part of the unsynced writes, as the kernel's
//!   background writeback may have got out before the power went ([`PowerCut::durable_with_writeback`]:
//!   any subset of 4 KiB pages, in no order, and maybe the names).
//! - **Not modelled:** a disk that tears a sector mid-write or loses synced data (a lying write
//!   cache), a filesystem that needs the directory synced for a new name, the page cache of reads
//!   (each mount starts cold), xattrs, links, `mmap` (sled does not map its files).
//!
//! Operations counted toward a cut: `write`, `fsync`, `fsyncdir`, `create`, `mkdir`, `rename`,
//! `unlink`, `rmdir`, `setattr` with a size, `fallocate`.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, OpenFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, WriteFlags,
};

const ROOT: u64 = 1;
const TTL: Duration = Duration::ZERO;

#[derive(Debug, Clone)]
enum Node {
    File { data: Vec<u8>, mode: u32 },
    Dir { entries: BTreeMap<OsString, u64>, mode: u32 },
}

/// The durable copy of a filesystem: what a disk would hold after a cut.
#[derive(Debug, Clone)]
pub struct Snapshot {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
}

impl Default for Snapshot {
    fn default() -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(ROOT, Node::Dir { entries: BTreeMap::new(), mode: 0o755 });
        Self { nodes, next_ino: ROOT + 1 }
    }
}

impl Snapshot {
    /// Writes the snapshot's tree under `dir` (which must exist), to open it with the real
    /// filesystem: what a program finds on the disk after the cut.
    pub fn materialize(&self, dir: &Path) -> Result<()> {
        self.write_dir(ROOT, dir)
    }

    fn write_dir(&self, ino: u64, dir: &Path) -> Result<()> {
        let Some(Node::Dir { entries, .. }) = self.nodes.get(&ino) else { anyhow::bail!("inode {ino} is no dir") };
        for (name, child) in entries {
            let path = dir.join(name);
            match self.nodes.get(child) {
                Some(Node::Dir { .. }) => {
                    std::fs::create_dir_all(&path)?;
                    self.write_dir(*child, &path)?;
                }
                Some(Node::File { data, .. }) => {
                    std::fs::write(&path, data).with_context(|| format!("writing {}", path.display()))?
                }
                None => anyhow::bail!("dangling entry {}", path.display()),
            }
        }
        Ok(())
    }

    /// Bytes of file data in the snapshot.
    pub fn bytes(&self) -> u64 {
        self.nodes.values().map(|n| if let Node::File { data, .. } = n { data.len() as u64 } else { 0 }).sum()
    }
}

#[derive(Debug, Default)]
struct State {
    /// What programs see.
    live: Snapshot,
    /// What a disk would hold.
    durable: Snapshot,
    /// Per file: the byte ranges written since its last sync.
    dirty: HashMap<u64, Vec<(usize, usize)>>,
}

impl State {
    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let node = self.live.nodes.get(&ino)?;
        let (kind, size, perm, nlink) = match node {
            Node::File { data, mode } => (FileType::RegularFile, data.len() as u64, *mode, 1),
            Node::Dir { mode, .. } => (FileType::Directory, 0, *mode, 2),
        };
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind,
            perm: perm as u16,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn entries(&mut self, dir: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match self.live.nodes.get_mut(&dir) {
            Some(Node::Dir { entries, .. }) => Ok(entries),
            Some(_) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    /// Names are durable as a whole (the journal commit): every directory's entries, and the
    /// nodes they name (a new file arrives empty, or with what was synced of it).
    fn commit_names(&mut self) {
        let (live, durable) = (&self.live.nodes, &mut self.durable.nodes);
        durable.retain(|ino, _| live.contains_key(ino));
        for (ino, node) in live {
            match node {
                Node::Dir { .. } => {
                    durable.insert(*ino, node.clone());
                }
                // The data stays what was synced of it; a new file arrives empty.
                Node::File { mode, .. } => match durable.get_mut(ino) {
                    Some(Node::File { mode: m, .. }) => *m = *mode,
                    _ => {
                        durable.insert(*ino, Node::File { data: Vec::new(), mode: *mode });
                    }
                },
            }
        }
        self.durable.next_ino = self.live.next_ino;
    }

    fn sync_data(&mut self, ino: u64) {
        let Some(Node::File { data: live, .. }) = self.live.nodes.get(&ino) else { return };
        let ranges = self.dirty.remove(&ino).unwrap_or_default();
        if let Some(Node::File { data, .. }) = self.durable.nodes.get_mut(&ino) {
            data.resize(live.len(), 0);
            for (start, end) in ranges {
                let end = end.min(live.len());
                if start < end {
                    data[start..end].copy_from_slice(&live[start..end]);
                }
            }
        }
    }

    fn new_node(&mut self, parent: u64, name: &OsStr, node: Node) -> Result<u64, Errno> {
        let ino = self.live.next_ino;
        let entries = self.entries(parent)?;
        if entries.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        entries.insert(name.to_owned(), ino);
        self.live.next_ino += 1;
        self.live.nodes.insert(ino, node);
        Ok(ino)
    }

    /// Removes `name` from `parent`; the node goes with its last name (no hard links here).
    fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let ino = *self.entries(parent)?.get(name).ok_or(Errno::ENOENT)?;
        match (self.live.nodes.get(&ino), dir) {
            (Some(Node::Dir { entries, .. }), true) if !entries.is_empty() => return Err(Errno::ENOTEMPTY),
            (Some(Node::Dir { .. }), false) => return Err(Errno::EISDIR),
            (Some(Node::File { .. }), true) => return Err(Errno::ENOTDIR),
            _ => {}
        }
        self.entries(parent)?.remove(name);
        self.live.nodes.remove(&ino);
        self.dirty.remove(&ino);
        Ok(())
    }
}

/// The filesystem; clone the handle ([`PowerCut`]) before mounting to steer it.
#[derive(Debug)]
pub struct PowerCutFs {
    state: Arc<Mutex<State>>,
    ops: Arc<AtomicU64>,
    cut_at: Arc<AtomicU64>,
    cut: Arc<AtomicBool>,
}

/// The test's handle on a mounted [`PowerCutFs`].
#[derive(Debug, Clone)]
pub struct PowerCut {
    state: Arc<Mutex<State>>,
    ops: Arc<AtomicU64>,
    cut_at: Arc<AtomicU64>,
    cut: Arc<AtomicBool>,
}

impl PowerCut {
    /// Write-like operations so far.
    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::SeqCst)
    }

    /// Whether the power was cut.
    pub fn cut_happened(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }

    /// Cut the power at operation `n` (1-based, counted from the mount).
    pub fn cut_at(&self, n: u64) {
        self.cut_at.store(n, Ordering::SeqCst);
    }

    /// Cut the power now.
    pub fn cut_now(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    /// What a disk would hold now, if nothing unsynced had reached it.
    pub fn durable(&self) -> Snapshot {
        self.state.lock().unwrap().durable.clone()
    }

    /// What a disk could hold now if the kernel's background writeback had got some of the unsynced
    /// writes out before the cut: with `chance(2) == 0` the names were committed (a journal commit
    /// of its own), and each 4 KiB page of unsynced data of a file on the disk made it, or not, by
    /// `chance(2)`, in no particular order. A file grows to the end of its last page that made it
    /// (never past what programs saw); a page that did not make it keeps its old content, or
    /// zeros past the old end: torn tails, half-written logs.
    pub fn durable_with_writeback(&self, chance: &mut dyn FnMut(u64) -> u64) -> Snapshot {
        const PAGE: usize = 4096;
        let st = self.state.lock().unwrap();
        let mut disk = if chance(2) == 0 {
            let mut copy = State { live: st.live.clone(), durable: st.durable.clone(), dirty: HashMap::new() };
            copy.commit_names();
            copy.durable
        } else {
            st.durable.clone()
        };
        for (ino, ranges) in &st.dirty {
            let (Some(Node::File { data: live, .. }), Some(Node::File { data, .. })) =
                (st.live.nodes.get(ino), disk.nodes.get_mut(ino))
            else {
                continue;
            };
            let mut pages: Vec<usize> =
                ranges.iter().flat_map(|&(start, end)| (start / PAGE)..end.min(live.len()).div_ceil(PAGE)).collect();
            pages.sort_unstable();
            pages.dedup();
            for page in pages {
                if chance(2) == 0 {
                    let start = page * PAGE;
                    let end = ((page + 1) * PAGE).min(live.len());
                    if data.len() < end {
                        data.resize(end, 0);
                    }
                    data[start..end].copy_from_slice(&live[start..end]);
                }
            }
        }
        disk
    }
}

impl PowerCutFs {
    /// A filesystem whose content (live and durable) is `from`.
    pub fn new(from: Snapshot) -> (Self, PowerCut) {
        let state = Arc::new(Mutex::new(State { live: from.clone(), durable: from, dirty: HashMap::new() }));
        let handle = PowerCut {
            state: state.clone(),
            ops: Arc::new(AtomicU64::new(0)),
            cut_at: Arc::new(AtomicU64::new(u64::MAX)),
            cut: Arc::new(AtomicBool::new(false)),
        };
        let fs = Self { state, ops: handle.ops.clone(), cut_at: handle.cut_at.clone(), cut: handle.cut.clone() };
        (fs, handle)
    }

    /// Counts a write-like operation; `Err(EIO)` once the power is cut.
    fn op(&self) -> Result<(), Errno> {
        if self.cut.load(Ordering::SeqCst) {
            return Err(Errno::EIO);
        }
        let n = self.ops.fetch_add(1, Ordering::SeqCst) + 1;
        if n >= self.cut_at.load(Ordering::SeqCst) {
            self.cut.store(true, Ordering::SeqCst);
            return Err(Errno::EIO);
        }
        Ok(())
    }
}

/// Mounts `fs` at `mountpoint` (an empty directory), served by a background thread until the
/// returned session is dropped.
///
/// # Errors
/// No FUSE here (no `/dev/fuse`, no `fusermount3`, not permitted).
pub fn mount(fs: PowerCutFs, mountpoint: &Path) -> Result<fuser::BackgroundSession> {
    let mut config = fuser::Config::default();
    config.mount_options = vec![fuser::MountOption::FSName("backhaul-powercut".into())];
    fuser::spawn_mount(fs, mountpoint, &config)
        .with_context(|| format!("mounting the power-cut FUSE filesystem at {}", mountpoint.display()))
}

impl Filesystem for PowerCutFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut s = self.state.lock().unwrap();
        let ino = match s.entries(parent.0) {
            Ok(e) => e.get(name).copied(),
            Err(e) => return reply.error(e),
        };
        match ino.and_then(|i| s.attr(i)) {
            Some(a) => reply.entry(&TTL, &a, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.state.lock().unwrap().attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
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
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if size.is_some() {
            if let Err(e) = self.op() {
                return reply.error(e);
            }
        }
        let mut s = self.state.lock().unwrap();
        match s.live.nodes.get_mut(&ino.0) {
            Some(Node::File { data, mode: m }) => {
                if let Some(size) = size {
                    data.resize(size as usize, 0);
                }
                if let Some(mode) = mode {
                    *m = mode & 0o7777;
                }
            }
            Some(Node::Dir { mode: m, .. }) => {
                if let Some(mode) = mode {
                    *m = mode & 0o7777;
                }
            }
            None => return reply.error(Errno::ENOENT),
        }
        if let Some(size) = size {
            // A shrink or growth is a data change of the range past the smaller length.
            s.dirty.entry(ino.0).or_default().push((size as usize, usize::MAX));
        }
        let a = s.attr(ino.0).expect("exists");
        reply.attr(&TTL, &a);
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        if let Err(e) = self.op() {
            return reply.error(e);
        }
        let mut s = self.state.lock().unwrap();
        match s.new_node(parent.0, name, Node::Dir { entries: BTreeMap::new(), mode: mode & !umask & 0o7777 }) {
            Ok(ino) => reply.entry(&TTL, &s.attr(ino).expect("new"), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if let Err(e) = self.op() {
            return reply.error(e);
        }
        match self.state.lock().unwrap().remove(parent.0, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if let Err(e) = self.op() {
            return reply.error(e);
        }
        match self.state.lock().unwrap().remove(parent.0, name, true) {
            Ok(()) => reply.ok(),
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
        flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        // RENAME_NOREPLACE and RENAME_EXCHANGE are not modelled: refused, never done wrong.
        if !flags.is_empty() {
            return reply.error(Errno::EINVAL);
        }
        if let Err(e) = self.op() {
            return reply.error(e);
        }
        let mut s = self.state.lock().unwrap();
        let result = (|| {
            let ino = *s.entries(parent.0)?.get(name).ok_or(Errno::ENOENT)?;
            if let Some(old) = s.entries(newparent.0)?.get(newname).copied() {
                if old != ino {
                    if let Some(Node::Dir { entries, .. }) = s.live.nodes.get(&old) {
                        if !entries.is_empty() {
                            return Err(Errno::ENOTEMPTY);
                        }
                    }
                    s.live.nodes.remove(&old);
                    s.dirty.remove(&old);
                }
            }
            s.entries(parent.0)?.remove(name);
            s.entries(newparent.0)?.insert(newname.to_owned(), ino);
            Ok(())
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.state.lock().unwrap().live.nodes.get(&ino.0) {
            Some(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            None => reply.error(Errno::ENOENT),
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
        let s = self.state.lock().unwrap();
        match s.live.nodes.get(&ino.0) {
            Some(Node::File { data, .. }) => {
                let start = (offset as usize).min(data.len());
                let end = (start + size as usize).min(data.len());
                reply.data(&data[start..end]);
            }
            Some(Node::Dir { .. }) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        bytes: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        if let Err(e) = self.op() {
            return reply.error(e);
        }
        let mut s = self.state.lock().unwrap();
        let start = offset as usize;
        let end = start + bytes.len();
        match s.live.nodes.get_mut(&ino.0) {
            Some(Node::File { data, .. }) => {
                if data.len() < end {
                    data.resize(end, 0);
                }
                data[start..end].copy_from_slice(bytes);
            }
            Some(Node::Dir { .. }) => return reply.error(Errno::EISDIR),
            None => return reply.error(Errno::ENOENT),
        }
        s.dirty.entry(ino.0).or_default().push((start, end));
        reply.written(bytes.len() as u32);
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: fuser::LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        if let Err(e) = self.op() {
            return reply.error(e);
        }
        let mut s = self.state.lock().unwrap();
        s.commit_names();
        s.sync_data(ino.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.state.lock().unwrap().live.nodes.get(&ino.0) {
            Some(Node::Dir { .. }) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Some(_) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let mut s = self.state.lock().unwrap();
        let entries: Vec<(OsString, u64)> = match s.entries(ino.0) {
            Ok(e) => e.iter().map(|(n, i)| (n.clone(), *i)).collect(),
            Err(e) => return reply.error(e),
        };
        let mut all =
            vec![(OsString::from("."), ino.0, FileType::Directory), (OsString::from(".."), ROOT, FileType::Directory)];
        for (name, child) in entries {
            let kind = match s.live.nodes.get(&child) {
                Some(Node::Dir { .. }) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            all.push((name, child, kind));
        }
        for (i, (name, child, kind)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        if let Err(e) = self.op() {
            return reply.error(e);
        }
        self.state.lock().unwrap().commit_names();
        reply.ok();
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        if let Err(e) = self.op() {
            return reply.error(e);
        }
        let mut s = self.state.lock().unwrap();
        match s.new_node(parent.0, name, Node::File { data: Vec::new(), mode: mode & !umask & 0o7777 }) {
            Ok(ino) => {
                reply.created(&TTL, &s.attr(ino).expect("new"), Generation(0), FileHandle(0), FopenFlags::empty())
            }
            Err(e) => reply.error(e),
        }
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
        if let Err(e) = self.op() {
            return reply.error(e);
        }
        // Only plain allocation (mode 0, or KEEP_SIZE = 1): it may grow the file with zeros.
        if mode & !1 != 0 {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let mut s = self.state.lock().unwrap();
        if let Some(Node::File { data, .. }) = s.live.nodes.get_mut(&ino.0) {
            let end = (offset + length) as usize;
            if mode & 1 == 0 && data.len() < end {
                let old = data.len();
                data.resize(end, 0);
                s.dirty.entry(ino.0).or_default().push((old, end));
            }
            reply.ok();
        } else {
            reply.error(Errno::ENOENT);
        }
    }
}
