//! A client disk in Ceph RBD, through librbd/librados (cargo feature `rbd`; Debian packages
//! librbd-dev and librados-dev). First slice of issue 13's shared persistent disks: open an
//! image, take its **exclusive lock** before writing, and fence a previous owner that did not
//! let go (a node killed or paused) by **breaking its lock, which blocklists its RADOS
//! client** (`rbd_blocklist_on_break`, default true): from then on every write of the old
//! owner fails with `ESHUTDOWN` (EBLOCKLISTED) at the OSDs, so two nodes never write one disk.
//!
//! [`RbdClientDisks`] puts persistent and install client disks there (`rbd:` and
//! `images[].rbd`, docs/scale-out.md): one RBD clone per client of the image's protected
//! snapshot, opened and locked at login by the client's owner node.

use super::{BlockStore, StorageError};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[allow(non_camel_case_types)]
type rados_t = *mut c_void;
#[allow(non_camel_case_types)]
type rados_ioctx_t = *mut c_void;
#[allow(non_camel_case_types)]
type rbd_image_t = *mut c_void;

/// `RBD_LOCK_MODE_EXCLUSIVE` (librbd.h).
const RBD_LOCK_MODE_EXCLUSIVE: c_int = 0;
/// `RBD_FEATURE_LAYERING | RBD_FEATURE_EXCLUSIVE_LOCK` (librbd/features.h): a clone needs
/// layering; the exclusive lock is what fencing breaks.
const CLONE_FEATURES: u64 = 1 | 4;

/// How to reach the cluster: `client.<id>` with a configuration file and, optionally, a
/// keyring (cephx).
#[derive(Debug, Clone)]
pub struct RbdConnect {
    pub conf: std::path::PathBuf,
    pub id: String,
    pub keyring: Option<std::path::PathBuf>,
    pub pool: String,
}

#[link(name = "rados")]
extern "C" {
    fn rados_create(cluster: *mut rados_t, id: *const c_char) -> c_int;
    fn rados_conf_read_file(cluster: rados_t, path: *const c_char) -> c_int;
    fn rados_conf_set(cluster: rados_t, option: *const c_char, value: *const c_char) -> c_int;
    fn rados_connect(cluster: rados_t) -> c_int;
    fn rados_shutdown(cluster: rados_t);
    fn rados_ioctx_create(
        cluster: rados_t,
        pool: *const c_char,
        ioctx: *mut rados_ioctx_t,
    ) -> c_int;
    fn rados_ioctx_destroy(io: rados_ioctx_t);
    fn rados_getaddrs(cluster: rados_t, addrs: *mut *mut c_char) -> c_int;
    fn rados_get_instance_id(cluster: rados_t) -> u64;
    fn rados_buffer_free(buf: *mut c_char);
}

#[link(name = "rbd")]
extern "C" {
    fn rbd_open(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap: *const c_char,
    ) -> c_int;
    fn rbd_close(image: rbd_image_t) -> c_int;
    fn rbd_snap_create(image: rbd_image_t, snapname: *const c_char) -> c_int;
    fn rbd_snap_remove(image: rbd_image_t, snapname: *const c_char) -> c_int;
    fn rbd_clone(
        p_ioctx: rados_ioctx_t,
        p_name: *const c_char,
        p_snapname: *const c_char,
        c_ioctx: rados_ioctx_t,
        c_name: *const c_char,
        features: u64,
        c_order: *mut c_int,
    ) -> c_int;
    fn rbd_get_size(image: rbd_image_t, size: *mut u64) -> c_int;
    fn rbd_read(image: rbd_image_t, ofs: u64, len: usize, buf: *mut c_char) -> isize;
    fn rbd_write(image: rbd_image_t, ofs: u64, len: usize, buf: *const c_char) -> isize;
    fn rbd_flush(image: rbd_image_t) -> c_int;
    fn rbd_discard(image: rbd_image_t, ofs: u64, len: u64) -> c_int;
    fn rbd_lock_acquire(image: rbd_image_t, mode: c_int) -> c_int;
    fn rbd_lock_release(image: rbd_image_t) -> c_int;
    fn rbd_is_exclusive_lock_owner(image: rbd_image_t, is_owner: *mut c_int) -> c_int;
    fn rbd_lock_get_owners(
        image: rbd_image_t,
        mode: *mut c_int,
        owners: *mut *mut c_char,
        max: *mut usize,
    ) -> c_int;
    fn rbd_lock_get_owners_cleanup(owners: *mut *mut c_char, count: usize);
    fn rbd_lock_break(image: rbd_image_t, mode: c_int, owner: *const c_char) -> c_int;
    fn rbd_remove(io: rados_ioctx_t, name: *const c_char) -> c_int;
    fn rbd_get_parent(
        image: rbd_image_t,
        parent_image: *mut LinkedImageSpec,
        parent_snap: *mut SnapSpec,
    ) -> c_int;
    fn rbd_linked_image_spec_cleanup(image: *mut LinkedImageSpec);
    fn rbd_snap_spec_cleanup(snap: *mut SnapSpec);
}

/// `rbd_linked_image_spec_t` (librbd.h): an image a clone is linked to (its parent).
#[repr(C)]
struct LinkedImageSpec {
    pool_id: i64,
    pool_name: *mut c_char,
    pool_namespace: *mut c_char,
    image_id: *mut c_char,
    image_name: *mut c_char,
    trash: bool,
}

/// `rbd_snap_spec_t` (librbd.h): a snapshot (of a clone's parent).
#[repr(C)]
struct SnapSpec {
    id: u64,
    namespace_type: c_int,
    name: *mut c_char,
}

/// How long [`RbdDisk::remove`] retries while the image still has watchers: a client whose
/// lock was just broken (blocklisted) loses its watch once the OSDs have the new OSD map;
/// a handle of this node being closed (the blocking pool) lets go within moments.
const REMOVE_WAIT: Duration = Duration::from_secs(15);

/// What librados/librbd answered (a negative errno), with the call.
#[derive(Debug, thiserror::Error)]
pub enum RbdError {
    #[error("{call}: {}", std::io::Error::from_raw_os_error(*errno))]
    Call { call: &'static str, errno: i32 },
    #[error("{0} contains a NUL byte")]
    Nul(&'static str),
    #[error("the exclusive lock is held by another client ({0})")]
    Locked(String),
    /// `rbd_remove` answered EBUSY until [`REMOVE_WAIT`] ran out.
    #[error("rbd_remove: the image still has watchers (a client has it open: `rbd status`)")]
    Watched,
    /// `rbd_remove` answered ENOTEMPTY.
    #[error("rbd_remove: the image has snapshots (`rbd snap ls`): not removed")]
    HasSnapshots,
    /// The image is not a clone (flattened, or not made by diskless): never removed here.
    #[error("{0} has no parent (not a clone, or flattened): not removed")]
    NotAClone(String),
}

impl RbdError {
    /// The errno (positive), for callers that tell a fenced client from other failures.
    pub fn errno(&self) -> Option<i32> {
        match self {
            RbdError::Call { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

fn check(call: &'static str, r: c_int) -> Result<c_int, RbdError> {
    if r < 0 {
        Err(RbdError::Call { call, errno: -r })
    } else {
        Ok(r)
    }
}

fn cstr(what: &'static str, s: &str) -> Result<CString, RbdError> {
    CString::new(s).map_err(|_| RbdError::Nul(what))
}

/// One open RBD image on its own RADOS client (its own address, so that it can be fenced
/// alone). Closed, and the client shut down, when dropped.
pub struct RbdDisk {
    cluster: rados_t,
    io: rados_ioctx_t,
    image: rbd_image_t,
    size: u64,
    block_size: u32,
    /// `pool/name`, for the log.
    name: String,
    /// How it was opened (a snapshot view opens the same image again).
    connect: RbdConnect,
    image_name: String,
    /// Set for a read-only view of a snapshot ([`BlockStore::snapshot`]): the snapshot's
    /// name, removed when the view is dropped.
    snap: Option<String>,
    /// I/O failures not logged yet, and when the last line was (at most one per
    /// [`ERROR_LOG_EVERY`]: a fenced node's OS may retry its writes many times a second).
    unlogged: AtomicU64,
    logged_at: Mutex<Option<Instant>>,
}

/// At most one log line per disk for its I/O failures in this time.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

// SAFETY: librados handles and librbd image handles are thread-safe for concurrent I/O
// (librbd serialises internally); the handles are only closed in Drop, with &mut self.
unsafe impl Send for RbdDisk {}
// SAFETY: as above.
unsafe impl Sync for RbdDisk {}

impl RbdDisk {
    /// Connect as `client.<id>` with the configuration file `conf` and open `pool/name`.
    pub fn open(conf: &Path, id: &str, pool: &str, name: &str) -> Result<RbdDisk, RbdError> {
        let c = RbdConnect {
            conf: conf.to_path_buf(),
            id: id.to_string(),
            keyring: None,
            pool: pool.to_string(),
        };
        RbdDisk::open_or_clone(&c, name, None).map(|(d, _)| d)
    }

    /// Open `pool/name` if it exists, or create it as a clone of `parent`: see
    /// [`RbdDisk::connect_open`].
    pub fn open_or_clone(
        c: &RbdConnect,
        name: &str,
        parent: Option<(&str, &str)>,
    ) -> Result<(RbdDisk, bool), RbdError> {
        RbdDisk::connect_open(c, name, parent, None)
    }

    /// Open `pool/name` (at snapshot `snap`, read-only, when given); if it does not exist and
    /// `parent` (image, snapshot) is given, create it first as a clone of that protected
    /// snapshot in the same pool. Returns the disk and whether it was created now.
    fn connect_open(
        c: &RbdConnect,
        name: &str,
        parent: Option<(&str, &str)>,
        snap: Option<&str>,
    ) -> Result<(RbdDisk, bool), RbdError> {
        let snap_c = snap.map(|s| cstr("snapshot", s)).transpose()?;
        let snap_ptr = snap_c.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        let conf_c = cstr("configuration path", &c.conf.to_string_lossy())?;
        let (id_c, pool_c, name_c) = (
            cstr("client id", &c.id)?,
            cstr("pool", &c.pool)?,
            cstr("image", name)?,
        );
        let mut d = RbdDisk {
            cluster: std::ptr::null_mut(),
            io: std::ptr::null_mut(),
            image: std::ptr::null_mut(),
            size: 0,
            block_size: 512,
            name: format!("{}/{name}", c.pool),
            connect: c.clone(),
            image_name: name.to_string(),
            snap: snap.map(str::to_string),
            unlogged: AtomicU64::new(0),
            logged_at: Mutex::new(None),
        };
        let mut options = vec![
            // A fenced client must fail its I/O, not wait forever for the OSDs.
            ("rados_osd_op_timeout", "10".to_string()),
            // Nor wait for unreachable monitors (connecting: 300 s by default; the
            // blocklist command of a fencing): a login is refused instead.
            ("client_mount_timeout", "10".to_string()),
            ("rados_mon_op_timeout", "10".to_string()),
            // No write-back cache in librbd: a write is acknowledged only once the OSDs
            // have it, so a fenced node's write fails at once (CHECK CONDITION) instead of
            // being accepted into a cache whose write-back then fails.
            ("rbd_cache", "false".to_string()),
        ];
        if let Some(k) = &c.keyring {
            options.push(("keyring", k.to_string_lossy().into_owned()));
        }
        let mut created = false;
        // SAFETY: each call gets valid NUL-terminated strings and out-pointers to our own
        // fields; Drop releases whatever was created, in reverse order, if a later step fails.
        unsafe {
            check("rados_create", rados_create(&mut d.cluster, id_c.as_ptr()))?;
            check(
                "rados_conf_read_file",
                rados_conf_read_file(d.cluster, conf_c.as_ptr()),
            )?;
            for (k, v) in &options {
                let (k, v) = (cstr("option", k)?, cstr("value", v)?);
                check(
                    "rados_conf_set",
                    rados_conf_set(d.cluster, k.as_ptr(), v.as_ptr()),
                )?;
            }
            check("rados_connect", rados_connect(d.cluster))?;
            check(
                "rados_ioctx_create",
                rados_ioctx_create(d.cluster, pool_c.as_ptr(), &mut d.io),
            )?;
            let mut r = rbd_open(d.io, name_c.as_ptr(), &mut d.image, snap_ptr);
            if r == -libc::ENOENT {
                if let Some((pimg, psnap)) = parent {
                    let (p_c, s_c) = (cstr("parent image", pimg)?, cstr("parent snapshot", psnap)?);
                    let mut order: c_int = 0;
                    let rc = rbd_clone(
                        d.io,
                        p_c.as_ptr(),
                        s_c.as_ptr(),
                        d.io,
                        name_c.as_ptr(),
                        CLONE_FEATURES,
                        &mut order,
                    );
                    // EEXIST: another node's clone won the race; open that one.
                    if rc != -libc::EEXIST {
                        check("rbd_clone", rc)?;
                        created = true;
                    }
                    r = rbd_open(d.io, name_c.as_ptr(), &mut d.image, snap_ptr);
                }
            }
            check("rbd_open", r)?;
            check("rbd_get_size", rbd_get_size(d.image, &mut d.size))?;
        }
        Ok((d, created))
    }

    /// The name the monitors and `rbd lock ls` give this RADOS client (`client.<id>`).
    pub fn client_name(&self) -> String {
        // SAFETY: the cluster handle is connected.
        format!("client.{}", unsafe { rados_get_instance_id(self.cluster) })
    }

    /// Take the image's exclusive lock (needed before the first write is acknowledged).
    /// Fails with [`RbdError::Locked`] while another live client holds it.
    pub fn lock(&self) -> Result<(), RbdError> {
        // SAFETY: the image handle is open.
        let r = unsafe { rbd_lock_acquire(self.image, RBD_LOCK_MODE_EXCLUSIVE) };
        match r {
            0 => Ok(()),
            r if -r == libc::EROFS || -r == libc::EBUSY => {
                Err(RbdError::Locked(self.owners()?.join(", ")))
            }
            r => Err(RbdError::Call {
                call: "rbd_lock_acquire",
                errno: -r,
            }),
        }
    }

    /// Give the lock back (a clean stop or a hand-over at the client's next boot).
    pub fn unlock(&self) -> Result<(), RbdError> {
        // SAFETY: the image handle is open.
        check("rbd_lock_release", unsafe { rbd_lock_release(self.image) }).map(drop)
    }

    pub fn is_owner(&self) -> Result<bool, RbdError> {
        let mut owner: c_int = 0;
        // SAFETY: the image handle is open; `owner` is a valid out-pointer.
        check("rbd_is_exclusive_lock_owner", unsafe {
            rbd_is_exclusive_lock_owner(self.image, &mut owner)
        })?;
        Ok(owner != 0)
    }

    /// The clients holding the lock (librbd's owner strings, e.g. `client.4123`).
    pub fn owners(&self) -> Result<Vec<String>, RbdError> {
        let mut mode: c_int = 0;
        let mut ptrs: [*mut c_char; 8] = [std::ptr::null_mut(); 8];
        let mut n: usize = ptrs.len();
        // SAFETY: `ptrs` has room for `n` pointers; librbd fills `n` of them, freed below.
        let r = unsafe { rbd_lock_get_owners(self.image, &mut mode, ptrs.as_mut_ptr(), &mut n) };
        if r == -libc::ENOENT {
            return Ok(Vec::new());
        }
        check("rbd_lock_get_owners", r)?;
        let n = n.min(ptrs.len());
        let out = ptrs[..n]
            .iter()
            .filter(|p| !p.is_null())
            // SAFETY: librbd returned NUL-terminated strings.
            .map(|&p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
            .collect();
        // SAFETY: the `n` strings librbd allocated, freed once.
        unsafe { rbd_lock_get_owners_cleanup(ptrs.as_mut_ptr(), n) };
        Ok(out)
    }

    /// Fence the current owner(s) and take the lock: break each owner's lock, which
    /// blocklists its RADOS client at the monitors (its writes fail from then on), then
    /// acquire. For a node that is dead or has lost its etcd lease; never for a live owner.
    pub fn fence_and_lock(&self) -> Result<Vec<String>, RbdError> {
        let owners = self.owners()?;
        for o in &owners {
            let oc = cstr("lock owner", o)?;
            // SAFETY: the image handle is open; `oc` is NUL-terminated.
            check("rbd_lock_break", unsafe {
                rbd_lock_break(self.image, RBD_LOCK_MODE_EXCLUSIVE, oc.as_ptr())
            })?;
        }
        self.lock()?;
        Ok(owners)
    }

    /// The RADOS client's addresses (what a blocklist entry names).
    pub fn addrs(&self) -> Result<String, RbdError> {
        let mut p: *mut c_char = std::ptr::null_mut();
        // SAFETY: the cluster handle is connected; `p` is freed with rados_buffer_free.
        check("rados_getaddrs", unsafe {
            rados_getaddrs(self.cluster, &mut p)
        })?;
        if p.is_null() {
            return Ok(String::new());
        }
        // SAFETY: librados returned a NUL-terminated string.
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        // SAFETY: allocated by librados, freed once.
        unsafe { rados_buffer_free(p) };
        Ok(s)
    }

    /// The parent of this image when it is a clone: (pool, image, snapshot).
    pub fn parent(&self) -> Result<Option<(String, String, String)>, RbdError> {
        let mut img = LinkedImageSpec {
            pool_id: 0,
            pool_name: std::ptr::null_mut(),
            pool_namespace: std::ptr::null_mut(),
            image_id: std::ptr::null_mut(),
            image_name: std::ptr::null_mut(),
            trash: false,
        };
        let mut snap = SnapSpec {
            id: 0,
            namespace_type: 0,
            name: std::ptr::null_mut(),
        };
        // SAFETY: the image handle is open; both out-structs are ours, filled by librbd on
        // success and then released once with their cleanup functions.
        let r = unsafe { rbd_get_parent(self.image, &mut img, &mut snap) };
        if r == -libc::ENOENT {
            return Ok(None);
        }
        check("rbd_get_parent", r)?;
        let text = |p: *mut c_char| {
            if p.is_null() {
                String::new()
            } else {
                // SAFETY: librbd returned a NUL-terminated string, alive until cleanup.
                unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
            }
        };
        let out = (text(img.pool_name), text(img.image_name), text(snap.name));
        // SAFETY: filled by a successful rbd_get_parent, released once.
        unsafe {
            rbd_linked_image_spec_cleanup(&mut img);
            rbd_snap_spec_cleanup(&mut snap);
        }
        Ok(Some(out))
    }

    /// Close the image and remove it (`image`, in this disk's pool): the operator's reset
    /// of a client disk. Retries while the image still has watchers (EBUSY), up to
    /// [`REMOVE_WAIT`]. On error the image is left as it was. A clone's removal never
    /// touches its parent snapshot.
    pub fn remove(mut self, image: &str) -> Result<(), RbdError> {
        let name_c = cstr("image", image)?;
        let handle = std::mem::replace(&mut self.image, std::ptr::null_mut());
        if !handle.is_null() {
            // SAFETY: the handle is open and closed once here (Drop skips a null one). Our
            // own watch and lock go with it: rbd_remove counts this handle as a watcher.
            check("rbd_close", unsafe { rbd_close(handle) })?;
        }
        let until = Instant::now() + REMOVE_WAIT;
        loop {
            // SAFETY: the pool context is open; `name_c` is NUL-terminated.
            let r = unsafe { rbd_remove(self.io, name_c.as_ptr()) };
            match -r {
                0 => return Ok(()),
                libc::EBUSY if Instant::now() < until => {
                    std::thread::sleep(Duration::from_millis(250))
                }
                libc::EBUSY => return Err(RbdError::Watched),
                libc::ENOTEMPTY => return Err(RbdError::HasSnapshots),
                errno => {
                    return Err(RbdError::Call {
                        call: "rbd_remove",
                        errno,
                    })
                }
            }
        }
    }

    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), RbdError> {
        // SAFETY: `buf` is valid for `buf.len()` bytes.
        let r = unsafe { rbd_read(self.image, offset, buf.len(), buf.as_mut_ptr().cast()) };
        if r < 0 {
            return Err(RbdError::Call {
                call: "rbd_read",
                errno: -(r as i32),
            });
        }
        // A short read only past the end, which BlockStore callers never ask for.
        buf[r as usize..].fill(0);
        Ok(())
    }

    pub fn write(&self, data: &[u8], offset: u64) -> Result<(), RbdError> {
        // SAFETY: `data` is valid for `data.len()` bytes.
        let r = unsafe { rbd_write(self.image, offset, data.len(), data.as_ptr().cast()) };
        if r < 0 {
            return Err(RbdError::Call {
                call: "rbd_write",
                errno: -(r as i32),
            });
        }
        Ok(())
    }

    pub fn flush_disk(&self) -> Result<(), RbdError> {
        // SAFETY: the image handle is open.
        check("rbd_flush", unsafe { rbd_flush(self.image) }).map(drop)
    }
}

/// The handles of an [`RbdDisk`], released together.
struct Handles {
    cluster: rados_t,
    io: rados_ioctx_t,
    image: rbd_image_t,
    /// A snapshot view's (image, snapshot) names: the snapshot is removed once its handle
    /// is closed.
    remove_snap: Option<(String, String)>,
}

// SAFETY: as for RbdDisk: librados/librbd handles may be released from any thread.
unsafe impl Send for Handles {}

impl Handles {
    fn release(self) {
        // SAFETY: each handle is released once, image before pool context before client;
        // the head handle opened to remove a snapshot is closed before the pool context.
        unsafe {
            if !self.image.is_null() {
                rbd_close(self.image);
            }
            if let (Some((image, snap)), false) = (&self.remove_snap, self.io.is_null()) {
                let removed = (|| -> Result<(), RbdError> {
                    let (i, s) = (cstr("image", image)?, cstr("snapshot", snap)?);
                    let mut head: rbd_image_t = std::ptr::null_mut();
                    check(
                        "rbd_open",
                        rbd_open(self.io, i.as_ptr(), &mut head, std::ptr::null()),
                    )?;
                    let r = rbd_snap_remove(head, s.as_ptr());
                    rbd_close(head);
                    check("rbd_snap_remove", r).map(drop)
                })();
                if let Err(e) = removed {
                    tracing::warn!(image = %image, snapshot = %snap,
                        "cannot remove the snapshot a copy of the disk was read from (remove it with `rbd snap rm`): {e}");
                }
            }
            if !self.io.is_null() {
                rados_ioctx_destroy(self.io);
            }
            if !self.cluster.is_null() {
                rados_shutdown(self.cluster);
            }
        }
    }
}

impl Drop for RbdDisk {
    fn drop(&mut self) {
        let h = Handles {
            cluster: std::mem::replace(&mut self.cluster, std::ptr::null_mut()),
            io: std::mem::replace(&mut self.io, std::ptr::null_mut()),
            image: std::mem::replace(&mut self.image, std::ptr::null_mut()),
            remove_snap: self.snap.take().map(|s| (self.image_name.clone(), s)),
        };
        // Closing a fenced (blocklisted) disk waits for the OSDs up to rados_osd_op_timeout;
        // the last session of a client often ends on a runtime worker, which must not stall
        // for that long: the release then goes to the blocking pool.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(move || h.release())),
            Err(_) => h.release(),
        }
    }
}

fn io(e: RbdError) -> StorageError {
    StorageError::Io(std::io::Error::other(e))
}

impl RbdDisk {
    /// A failed read, write or flush: the initiator gets CHECK CONDITION; the operator gets a
    /// WARN line (Ceph unreachable, this node fenced), at most one per `ERROR_LOG_EVERY`.
    fn failed(&self, op: &'static str, e: RbdError) -> StorageError {
        let before = self.unlogged.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut at = self.logged_at.lock().unwrap_or_else(|p| p.into_inner());
        if at.is_none_or(|t| now.duration_since(t) >= ERROR_LOG_EVERY) {
            *at = Some(now);
            self.unlogged.store(0, Ordering::Relaxed);
            tracing::warn!(disk = %self.name, op, error = %e, failures_not_logged = before,
                "I/O on the client disk in RBD failed (Ceph unreachable or this node fenced): answered CHECK CONDITION");
        }
        io(e)
    }
}

impl BlockStore for RbdDisk {
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.snap.is_some()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError> {
        if offset.saturating_add(buf.len() as u64) > self.size {
            return Err(StorageError::OutOfRange {
                offset,
                len: buf.len() as u64,
            });
        }
        self.read(buf, offset).map_err(|e| self.failed("read", e))
    }
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), StorageError> {
        if self.snap.is_some() {
            return Err(StorageError::ReadOnly);
        }
        if offset.saturating_add(data.len() as u64) > self.size {
            return Err(StorageError::OutOfRange {
                offset,
                len: data.len() as u64,
            });
        }
        self.write(data, offset)
            .map_err(|e| self.failed("write", e))?;
        if fua {
            self.flush_disk().map_err(|e| self.failed("flush", e))?;
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), StorageError> {
        self.flush_disk().map_err(|e| self.failed("flush", e))
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        if self.snap.is_some() {
            return Err(StorageError::ReadOnly);
        }
        // SAFETY: the image handle is open. RBD discards read back as zeroes.
        check("rbd_discard", unsafe {
            rbd_discard(self.image, offset, len)
        })
        .map(drop)
        .map_err(io)
    }
    fn thin_provisioned(&self) -> bool {
        true
    }
    fn allocation(&self, offset: u64) -> Result<(bool, u64), StorageError> {
        Ok((true, self.size.saturating_sub(offset)))
    }
    fn fenced(&self) -> bool {
        // Not the owner any more (lock broken by another node) or blocklisted (an error).
        self.snap.is_none() && !matches!(self.is_owner(), Ok(true))
    }
    /// An RBD snapshot of the disk as of now (librbd quiesces the image's writes for it, so
    /// every write acknowledged before is in it), opened read-only on a RADOS client of its
    /// own and removed when the view is dropped. The client keeps writing meanwhile.
    fn snapshot(&self) -> Result<Option<Box<dyn BlockStore>>, StorageError> {
        if self.snap.is_some() {
            return Ok(None);
        }
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let snap = format!(
            "diskless-copy-{stamp}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let snap_c = cstr("snapshot", &snap).map_err(io)?;
        // SAFETY: the image handle is open; the name is NUL-terminated.
        check("rbd_snap_create", unsafe {
            rbd_snap_create(self.image, snap_c.as_ptr())
        })
        .map_err(|e| self.failed("snapshot", e))?;
        match RbdDisk::connect_open(&self.connect, &self.image_name, None, Some(&snap)) {
            Ok((mut view, _)) => {
                view.block_size = self.block_size;
                Ok(Some(Box::new(view)))
            }
            Err(e) => {
                // SAFETY: as above.
                let _ = unsafe { rbd_snap_remove(self.image, snap_c.as_ptr()) };
                Err(io(e))
            }
        }
    }
}

/// Persistent and install client disks in one RBD pool: per client, a clone of its image's
/// protected snapshot (created at the client's first login on any node), opened and locked
/// by the node that serves the client, which fences a previous holder only once the
/// cluster confirms it owns the client (docs/scale-out.md).
pub struct RbdClientDisks {
    connect: RbdConnect,
    /// Prefix of the clients' image names.
    prefix: String,
    /// Image entry name → (parent RBD image, snapshot) in the pool.
    parents: std::collections::BTreeMap<String, (String, String)>,
}

impl RbdClientDisks {
    pub fn new(
        connect: RbdConnect,
        prefix: &str,
        parents: std::collections::BTreeMap<String, (String, String)>,
    ) -> RbdClientDisks {
        RbdClientDisks {
            connect,
            prefix: prefix.to_string(),
            parents,
        }
    }
}

/// Fence whoever holds `d`'s exclusive lock and take it (this node owns the client): the
/// lock is broken and the holder's RADOS client blocklisted. `when` completes the log line; `failed`
/// words any other error.
fn fence_holder(
    d: &RbdDisk,
    disk: &str,
    initiator: &str,
    lun: u16,
    when: &str,
    failed: impl Fn(RbdError) -> super::SharedDiskError,
) -> Result<(), super::SharedDiskError> {
    match d.fence_and_lock() {
        Ok(fenced) => {
            tracing::warn!(%disk, initiator, lun, fenced = ?fenced,
                "fenced the previous holder of the client disk{when} (lock broken, its RADOS client blocklisted)");
            Ok(())
        }
        Err(RbdError::Locked(holder)) => Err(super::SharedDiskError::Held {
            disk: disk.to_string(),
            holder,
            why: "the lock was taken again while fencing".into(),
        }),
        Err(e) => Err(failed(e)),
    }
}

/// The RBD image name of a client's disk: `<prefix>.<initiator>.<hash>`, the initiator
/// lowercased with anything but letters, digits, '.', '-' as '_', and a hash of target and
/// initiator (FNV-1a, 32 bits) that keeps distinct what the mapping merges.
pub fn client_image_name(prefix: &str, target: &str, initiator: &str) -> String {
    let clean: String = initiator
        .chars()
        .take(128)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '.') {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let mut h: u32 = 0x811c_9dc5;
    for b in target
        .bytes()
        .chain(std::iter::once(0))
        .chain(initiator.to_ascii_lowercase().bytes())
    {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{prefix}.{clean}.{h:08x}")
}

/// The RBD image name of a client's disk on `lun`: LUN 0 is [`client_image_name`] (the
/// name disks had before data disks lived in RBD), LUN N its name with `.lunN` appended.
pub fn client_disk_name(prefix: &str, target: &str, initiator: &str, lun: u16) -> String {
    let base = client_image_name(prefix, target, initiator);
    if lun == 0 {
        base
    } else {
        format!("{base}.lun{lun}")
    }
}

impl super::SharedDisks for RbdClientDisks {
    fn holds(&self, image: &str) -> bool {
        self.parents.contains_key(image)
    }

    fn disk_name(&self, target: &str, initiator: &str, lun: u16) -> Option<String> {
        Some(format!(
            "{}/{}",
            self.connect.pool,
            client_disk_name(&self.prefix, target, initiator, lun)
        ))
    }

    fn recreate(
        &self,
        target: &str,
        initiator: &str,
        lun: u16,
        image: &str,
        may_lock: super::LockGuard<'_>,
    ) -> Result<bool, super::SharedDiskError> {
        let name = client_disk_name(&self.prefix, target, initiator, lun);
        let disk = format!("{}/{name}", self.connect.pool);
        if let Err(why) = may_lock() {
            return Err(super::SharedDiskError::NotOwner { disk, why });
        }
        let failed = |e: RbdError| super::SharedDiskError::Failed {
            disk: disk.clone(),
            reason: format!("not recreated: {e}"),
        };
        let Some((pimg, psnap)) = self.parents.get(image) else {
            return Err(super::SharedDiskError::Failed {
                disk: disk.clone(),
                reason: format!("not recreated: image {image} has no RBD parent"),
            });
        };
        let d = match RbdDisk::open_or_clone(&self.connect, &name, None) {
            Ok((d, _)) => d,
            // Removed already (a remove whose clone then failed): the open clones it.
            Err(e) if e.errno() == Some(libc::ENOENT) => return Ok(false),
            Err(e) => return Err(failed(e)),
        };
        // Only a clone is removed: its parent snapshot (the golden image) stays untouched.
        let old_parent = d
            .parent()
            .map_err(failed)?
            .ok_or_else(|| failed(RbdError::NotAClone(disk.clone())))?;
        // The lock's holder is fenced as at a take-over (this node owns the client): a node
        // that served it before, or this node's own handle of the disk before the reset.
        let holders = d.owners().map_err(failed)?;
        if !holders.is_empty() {
            fence_holder(&d, &disk, initiator, lun, " before recreating it", failed)?;
        }
        d.remove(&name).map_err(failed)?;
        tracing::info!(%disk, initiator, lun,
            old_parent = %format!("{}/{}@{}", old_parent.0, old_parent.1, old_parent.2),
            parent = %format!("{}/{pimg}@{psnap}", self.connect.pool),
            "client disk in RBD removed (an operator's reset): cloned again from the image's snapshot");
        Ok(true)
    }

    fn open(
        &self,
        target: &str,
        initiator: &str,
        lun: u16,
        image: &str,
        size: u64,
        block_size: u32,
        may_lock: super::LockGuard<'_>,
    ) -> Result<(std::sync::Arc<dyn BlockStore>, bool), super::SharedDiskError> {
        let name = client_disk_name(&self.prefix, target, initiator, lun);
        let disk = format!("{}/{name}", self.connect.pool);
        // Only the client's owner opens (and creates, and locks) its disk; etcd is asked
        // now, not at the login's placement: the lease may have run out since.
        if let Err(why) = may_lock() {
            return Err(super::SharedDiskError::NotOwner { disk, why });
        }
        let failed = |e: RbdError| super::SharedDiskError::Failed {
            disk: disk.clone(),
            reason: e.to_string(),
        };
        let parent = self
            .parents
            .get(image)
            .map(|(i, s)| (i.as_str(), s.as_str()));
        let (mut d, created) =
            RbdDisk::open_or_clone(&self.connect, &name, parent).map_err(failed)?;
        d.block_size = block_size;
        if created {
            tracing::info!(%disk, parent = ?parent, initiator, lun, "client disk created in RBD (a clone of the image's snapshot)");
        }
        if d.size != size {
            return Err(super::SharedDiskError::Failed {
                disk,
                reason: format!(
                    "it is {} bytes, the image {image} {size}: the RBD snapshot must hold \
                     the image's bytes",
                    d.size
                ),
            });
        }
        // A holder is asked first, not left to rbd_lock_acquire: against a holder that died
        // or is paused, librbd waits for its watch to time out (30 s) and then breaks the
        // lock on its own. Here the break is ours, at once (the owner check passed above).
        let holders = d.owners().map_err(failed)?;
        let attempt = if holders.is_empty() {
            d.lock()
        } else {
            Err(RbdError::Locked(holders.join(", ")))
        };
        match attempt {
            Ok(()) => {}
            Err(RbdError::Locked(_)) => {
                // Another RADOS client holds the lock: a node that served the client
                // before, which the cluster says lost it (the client is ours): fence it.
                fence_holder(&d, &disk, initiator, lun, "", failed)?;
            }
            Err(e) => return Err(failed(e)),
        }
        tracing::info!(%disk, initiator, lun, rados_client = %d.client_name(),
            "client disk in RBD opened and locked by this node");
        Ok((std::sync::Arc::new(d), created))
    }
}
