//! The one place shardcast calls libibverbs.
//!
//! libibverbs is loaded at run time (`dlopen("libibverbs.so.1")` on first use), not linked: the
//! binary and the Python wheel's library have no DT_NEEDED on it, so they start on nodes without
//! rdma-core and run TCP there. `rdma-sys` still provides the types (struct layouts, enums) and
//! its Rust versions of the verbs that are `static inline` in the C headers (`ibv_post_send`,
//! `ibv_post_recv`, `ibv_poll_cq`, `ibv_req_notify_cq`: calls through the provider's ops table
//! inside the context, no libibverbs symbol). Every exported libibverbs function is called
//! through the [`Api`] table of function pointers resolved with `dlsym`; none is referenced by
//! name, so the linker (`--as-needed`) drops the library that rdma-sys's build script asks for.
//!
//! Everything else sees [`Endpoint`]: one side of a reliable-connected (RC) queue pair with its
//! device context, protection domain, the buffer pool registered once as a memory region (with
//! remote write access only on the receiving end: [`Access`]), and a completion queue whose event
//! channel is a pollable descriptor. Resources are freed in `Drop`
//! in the reverse order of creation (the struct's field order), and every failure names the verb
//! and the step, e.g. `ibv_modify_qp INIT->RTR on rxe_v0: Invalid argument (gid index 1)`.
//!
//! Safety rule for the whole module: every raw pointer kept in a wrapper was returned non-null
//! by the verb that creates it and is freed exactly once by the wrapper's `Drop`; the wrappers
//! are owned by one `Endpoint`, which is used from one thread at a time.

use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::sync::OnceLock;

use rdma_sys as ffi;

pub use super::types::{Access, PeerInfo, WcError, WorkCompletion};
pub use crate::sys::mem::Mapping;

/// The library loaded at run time, by its SONAME (the ABI shardcast was built against).
const LIBIBVERBS: &str = "libibverbs.so.1";

/// Where the library comes from, for the message when it is missing.
const PACKAGES: &str = "install libibverbs1 and ibverbs-providers (Debian/Ubuntu: apt-get install libibverbs1 \
                        ibverbs-providers) or libibverbs (RHEL/Fedora: dnf install libibverbs), or your NIC \
                        vendor's OFED";

/// Declares the exported libibverbs functions shardcast calls: one function-pointer field each,
/// resolved by name from the loaded library. The types are rdma-sys's bindgen signatures.
macro_rules! verbs_api {
    ($($name:ident: fn($($arg:ty),*) $(-> $ret:ty)?;)*) => {
        /// The exported libibverbs functions, resolved with `dlsym` from `libibverbs.so.1`.
        struct Api {
            $($name: unsafe extern "C" fn($($arg),*) $(-> $ret)?,)*
        }

        impl Api {
            /// Resolves every function in `handle`.
            ///
            /// # Safety
            /// `handle` is a live `dlopen` handle of libibverbs.so.1 that is never closed.
            unsafe fn resolve(handle: *mut c_void) -> Result<Self, String> {
                Ok(Self {
                    $($name: {
                        let sym = concat!(stringify!($name), "\0");
                        // SAFETY: handle is live; the name is NUL-terminated.
                        let p = unsafe { libc::dlsym(handle, sym.as_ptr().cast::<c_char>()) };
                        if p.is_null() {
                            return Err(format!(
                                "{LIBIBVERBS} has no {} (rdma-core too old?): {}", stringify!($name), dl_error()
                            ));
                        }
                        // SAFETY: the symbol is the libibverbs function of that name, whose C
                        // signature is the one rdma-sys generated from the same headers; the
                        // library stays loaded for the life of the process.
                        unsafe {
                            std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($arg),*) $(-> $ret)?>(p)
                        }
                    },)*
                })
            }
        }
    };
}

verbs_api! {
    ibv_get_device_list: fn(*mut c_int) -> *mut *mut ffi::ibv_device;
    ibv_free_device_list: fn(*mut *mut ffi::ibv_device);
    ibv_get_device_name: fn(*mut ffi::ibv_device) -> *const c_char;
    ibv_open_device: fn(*mut ffi::ibv_device) -> *mut ffi::ibv_context;
    ibv_close_device: fn(*mut ffi::ibv_context) -> c_int;
    ibv_alloc_pd: fn(*mut ffi::ibv_context) -> *mut ffi::ibv_pd;
    ibv_dealloc_pd: fn(*mut ffi::ibv_pd) -> c_int;
    // `ibv_reg_mr` is a macro in the C header (it picks ibv_reg_mr_iova2 for optional access
    // flags); without those flags it calls the exported ibv_reg_mr, as here.
    ibv_reg_mr: fn(*mut ffi::ibv_pd, *mut c_void, usize, c_int) -> *mut ffi::ibv_mr;
    ibv_dereg_mr: fn(*mut ffi::ibv_mr) -> c_int;
    ibv_create_comp_channel: fn(*mut ffi::ibv_context) -> *mut ffi::ibv_comp_channel;
    ibv_destroy_comp_channel: fn(*mut ffi::ibv_comp_channel) -> c_int;
    ibv_create_cq: fn(*mut ffi::ibv_context, c_int, *mut c_void, *mut ffi::ibv_comp_channel, c_int) -> *mut ffi::ibv_cq;
    ibv_destroy_cq: fn(*mut ffi::ibv_cq) -> c_int;
    ibv_ack_cq_events: fn(*mut ffi::ibv_cq, c_uint);
    ibv_create_qp: fn(*mut ffi::ibv_pd, *mut ffi::ibv_qp_init_attr) -> *mut ffi::ibv_qp;
    ibv_destroy_qp: fn(*mut ffi::ibv_qp) -> c_int;
    ibv_modify_qp: fn(*mut ffi::ibv_qp, *mut ffi::ibv_qp_attr, c_int) -> c_int;
    // `ibv_query_port` is a macro in the C header too; the exported symbol takes the older,
    // shorter `_compat_ibv_port_attr` and fills that prefix of `ibv_port_attr`.
    ibv_query_port: fn(*mut ffi::ibv_context, u8, *mut ffi::_compat_ibv_port_attr) -> c_int;
    ibv_query_gid: fn(*mut ffi::ibv_context, u8, c_int, *mut ffi::ibv_gid) -> c_int;
    ibv_query_device: fn(*mut ffi::ibv_context, *mut ffi::ibv_device_attr) -> c_int;
    ibv_get_cq_event: fn(*mut ffi::ibv_comp_channel, *mut *mut ffi::ibv_cq, *mut *mut c_void) -> c_int;
    ibv_wc_status_str: fn(ffi::ibv_wc_status::Type) -> *const c_char;
}

/// The last `dlerror` message.
fn dl_error() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string valid until the next dl* call on
    // this thread; it is copied at once.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        return "unknown error".into();
    }
    // SAFETY: as above.
    unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
}

/// libibverbs, loaded on first use, or why it cannot be (said once, at debug level: under
/// `--transport auto` a node without rdma-core is not an error; `--transport rdma` reports the
/// same reason as an error where it refuses to run).
fn api() -> Result<&'static Api, &'static str> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| {
        let name = format!("{LIBIBVERBS}\0");
        // SAFETY: the name is NUL-terminated. The handle is never closed, so the resolved
        // function pointers stay valid for the life of the process.
        let handle = unsafe { libc::dlopen(name.as_ptr().cast::<c_char>(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        let r = if handle.is_null() {
            Err(format!("cannot load {LIBIBVERBS} ({}); to use RDMA, {PACKAGES}", dl_error()))
        } else {
            // SAFETY: a live handle of libibverbs.so.1, never closed.
            unsafe { Api::resolve(handle) }.map_err(|e| format!("{e}; {PACKAGES}"))
        };
        if let Err(why) = &r {
            tracing::debug!("{why}");
        }
        r
    })
    .as_ref()
    .map_err(String::as_str)
}

/// A verb failed: which one, at which step, and why.
#[derive(Debug, thiserror::Error)]
#[error("{verb} {step}: {source}{}", detail.as_ref().map(|d| format!(" ({d})")).unwrap_or_default())]
pub struct VerbsError {
    /// The libibverbs function.
    pub verb: &'static str,
    /// What it was doing, with the device name.
    pub step: String,
    /// Extra context (GID index, sizes).
    pub detail: Option<String>,
    /// The OS error the verb reported.
    #[source]
    pub source: io::Error,
}

impl VerbsError {
    fn new(verb: &'static str, step: impl Into<String>, source: io::Error) -> Self {
        Self { verb, step: step.into(), detail: None, source }
    }

    fn last(verb: &'static str, step: impl Into<String>) -> Self {
        Self::new(verb, step, io::Error::last_os_error())
    }

    /// For verbs that return an errno value instead of setting `errno`.
    fn code(verb: &'static str, step: impl Into<String>, rc: c_int) -> Self {
        Self::new(verb, step, io::Error::from_raw_os_error(rc.abs()))
    }

    fn detail(mut self, d: impl Into<String>) -> Self {
        self.detail = Some(d.into());
        self
    }
}

/// The names of the RDMA devices libibverbs sees. `Err` carries why there is no RDMA here
/// (a kernel without RDMA gives ENOSYS, a host without rdma-core's providers none): "no RDMA" is
/// not an error for `--transport auto`.
pub fn device_names() -> Result<Vec<String>, String> {
    let v = api()?;
    let mut n: c_int = 0;
    // SAFETY: ibv_get_device_list writes the count and returns a NULL-terminated array (or NULL).
    let list = unsafe { (v.ibv_get_device_list)(&mut n) };
    if list.is_null() {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ENOSYS) => format!("this kernel has no RDMA support (ibv_get_device_list: {e})"),
            _ => format!("no RDMA devices (ibv_get_device_list: {e})"),
        });
    }
    let mut names = Vec::new();
    for i in 0..n.max(0) as usize {
        // SAFETY: the list holds `n` valid device pointers until it is freed below.
        let dev = unsafe { *list.add(i) };
        // SAFETY: the name is a NUL-terminated string owned by the device.
        let name = unsafe { CStr::from_ptr((v.ibv_get_device_name)(dev)) };
        names.push(name.to_string_lossy().into_owned());
    }
    // SAFETY: the list came from ibv_get_device_list and is freed once.
    unsafe { (v.ibv_free_device_list)(list) };
    if names.is_empty() {
        return Err("no RDMA devices (libibverbs found none)".into());
    }
    Ok(names)
}

struct Context {
    v: &'static Api,
    ptr: *mut ffi::ibv_context,
}

impl Context {
    fn open(name: &str) -> Result<Self, VerbsError> {
        let v = api().map_err(|why| {
            VerbsError::new("dlopen", format!("looking for {name}"), io::Error::new(io::ErrorKind::NotFound, why))
        })?;
        let mut n: c_int = 0;
        // SAFETY: as in device_names.
        let list = unsafe { (v.ibv_get_device_list)(&mut n) };
        if list.is_null() {
            return Err(VerbsError::last("ibv_get_device_list", format!("looking for {name}")));
        }
        let mut ctx = std::ptr::null_mut();
        let mut found = false;
        for i in 0..n.max(0) as usize {
            // SAFETY: as in device_names.
            let dev = unsafe { *list.add(i) };
            // SAFETY: as in device_names.
            let dn = unsafe { CStr::from_ptr((v.ibv_get_device_name)(dev)) };
            if dn.to_bytes() == name.as_bytes() {
                found = true;
                // SAFETY: dev is a valid device from the list, which is still alive.
                ctx = unsafe { (v.ibv_open_device)(dev) };
                break;
            }
        }
        let err = io::Error::last_os_error();
        // SAFETY: freed once; an opened context stays valid after the list is freed.
        unsafe { (v.ibv_free_device_list)(list) };
        if !found {
            return Err(VerbsError::new(
                "ibv_get_device_list",
                format!("looking for {name}"),
                io::Error::new(io::ErrorKind::NotFound, "no such RDMA device"),
            ));
        }
        if ctx.is_null() {
            return Err(VerbsError::new("ibv_open_device", name.to_owned(), err));
        }
        Ok(Self { v, ptr: ctx })
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: opened by ibv_open_device, closed once, after every child resource (field order
        // of Endpoint).
        unsafe { (self.v.ibv_close_device)(self.ptr) };
    }
}

struct Pd(&'static Api, *mut ffi::ibv_pd);
impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: allocated by ibv_alloc_pd, freed once after the MR and QP that use it.
        unsafe { (self.0.ibv_dealloc_pd)(self.1) };
    }
}

struct Mr(&'static Api, *mut ffi::ibv_mr);
impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: registered by ibv_reg_mr, deregistered once after the QP is destroyed.
        unsafe { (self.0.ibv_dereg_mr)(self.1) };
    }
}

struct Channel(&'static Api, *mut ffi::ibv_comp_channel);
impl Drop for Channel {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_comp_channel, destroyed once after its CQ.
        unsafe { (self.0.ibv_destroy_comp_channel)(self.1) };
    }
}

struct Cq {
    v: &'static Api,
    ptr: *mut ffi::ibv_cq,
    /// Events taken from the channel and not yet acknowledged (acknowledged before destroy).
    unacked: u32,
}
impl Drop for Cq {
    fn drop(&mut self) {
        // SAFETY: the CQ came from ibv_create_cq; every event taken is acknowledged before it is
        // destroyed, once, after the QP that used it.
        unsafe {
            if self.unacked > 0 {
                (self.v.ibv_ack_cq_events)(self.ptr, self.unacked);
            }
            (self.v.ibv_destroy_cq)(self.ptr);
        }
    }
}

struct Qp(&'static Api, *mut ffi::ibv_qp);
impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_qp, destroyed once, after the windows bound through it
        // and before the CQ (field order of Endpoint).
        unsafe { (self.0.ibv_destroy_qp)(self.1) };
    }
}

impl fmt::Display for WcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A work completion exists only once libibverbs is loaded.
        let Ok(v) = api() else { return write!(f, "status {}", self.0) };
        // SAFETY: ibv_wc_status_str returns a static string for any value.
        let s = unsafe { CStr::from_ptr((v.ibv_wc_status_str)(self.0)) };
        write!(f, "{} (status {})", s.to_string_lossy(), self.0)
    }
}

/// A type-2 memory window over one receiver slot, bound per grant (see [`Endpoint::grant`]).
struct Window {
    ptr: *mut ffi::ibv_mw,
    /// Bound now (the peer holds its key); a type-2 window is bound again only once invalidated.
    bound: bool,
}
impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: allocated by ibv_alloc_mw, freed once (a bound window is invalidated by the
        // free), first of the endpoint's resources: before the QP it was bound through and the
        // region under it (field order of Endpoint).
        unsafe { ffi::ibv_dealloc_mw(self.ptr) };
    }
}

/// The wr_id of a window's bind or invalidate (its slot in the low bits): receives use small
/// ids and writes the session's tokens, neither with this bit.
const WINDOW_WR: u64 = 1 << 63;

/// How long a bind or an invalidate may take before the endpoint gives up on its device (they
/// are local operations: microseconds on hardware, tens of them on soft-RoCE).
const WINDOW_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// One side of an RC queue pair over a registered pool.
pub struct Endpoint {
    // Field order is drop order: the windows first (a bound type-2 window holds a reference on
    // the QP it was bound through: rxe waits ~50 s for it in ibv_destroy_qp, then warns, when
    // the QP goes first), the QP before the CQ, the CQ before its channel, the regions and the
    // PD before the device context, and the mapping last, once nothing registered points into
    // it. The windows are also created after the QP: a killed process's resources are freed by
    // the kernel newest first, so the same order holds there.
    windows: Vec<Window>,
    qp: Qp,
    cq: Cq,
    channel: Channel,
    slot_mrs: Vec<Mr>,
    mr: Option<Mr>,
    // Held only so that they are freed last.
    _pd: Pd,
    _ctx: Context,
    mem: Mapping,
    device: String,
    port: u8,
    gid_index: u8,
    access: Access,
    local: PeerInfo,
    /// Completions taken from the CQ while waiting for a bind or an invalidate, handed out by
    /// the next [`Endpoint::poll`].
    stash: Vec<WorkCompletion>,
}

impl Access {
    /// The queue pair's access flags. The sending end needs none: its NIC reads the frames it
    /// writes out, and nothing is ever written into its pool by the NIC (no receive buffers, no
    /// RDMA READ). The receiving end's QP accepts RDMA WRITEs; where they may land is up to
    /// the windows.
    fn qp_flags(self) -> u32 {
        match self {
            Access::SendOnly => 0,
            Access::Grants { .. } => {
                ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0 | ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0
            }
        }
    }
}

// SAFETY: the endpoint's verbs objects are used from one thread at a time (it moves between
// threads only while idle: set up on the connection thread, then driven by the session).
unsafe impl Send for Endpoint {}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("device", &self.device)
            .field("port", &self.port)
            .field("gid_index", &self.gid_index)
            .field("access", &self.access)
            .field("local", &self.local)
            .finish()
    }
}

/// What an endpoint registers: the whole mapping (the sending end, for its writes' local key),
/// or one region per slot (the receiving end, which also gets a window per slot: [`windows`]).
type Regions = (Option<Mr>, Vec<Mr>);

/// Whether `device` can bind type-2 memory windows; the reason when not.
fn check_windows(v: &'static Api, ctx: &Context, device: &str) -> Result<(), VerbsError> {
    // SAFETY: zeroed is valid output space.
    let mut attr: ffi::ibv_device_attr = unsafe { std::mem::zeroed() };
    // SAFETY: ctx is live; attr is valid output space.
    let rc = unsafe { (v.ibv_query_device)(ctx.ptr, &mut attr) };
    if rc != 0 {
        return Err(VerbsError::code("ibv_query_device", device.to_owned(), rc));
    }
    use ffi::ibv_device_cap_flags as c;
    let type2 = c::IBV_DEVICE_MEM_WINDOW_TYPE_2A.0 | c::IBV_DEVICE_MEM_WINDOW_TYPE_2B.0;
    if attr.max_mw <= 0 || attr.device_cap_flags & type2 == 0 {
        return Err(VerbsError::new(
            "ibv_query_device",
            format!("{device} cannot receive RDMA writes: it has no type-2 memory windows"),
            io::Error::new(io::ErrorKind::Unsupported, "a receiver grants its peer one slot at a time through them"),
        )
        .detail(format!("max_mw {}, device_cap_flags {:#x}", attr.max_mw, attr.device_cap_flags)));
    }
    Ok(())
}

/// Registers `mem` for `access` in `pd` (see [`Regions`]).
fn register(
    v: &'static Api,
    ctx: &Context,
    pd: &Pd,
    mem: &Mapping,
    access: Access,
    device: &str,
) -> Result<Regions, VerbsError> {
    let Access::Grants { slot_size, slots } = access else {
        // SAFETY: `mem` stays mapped while the endpoint holds its clone (dropped after the MR);
        // pd is live. No access flags: local read only.
        let mr = unsafe { (v.ibv_reg_mr)(pd.1, mem.base().cast::<c_void>(), mem.len(), 0) };
        if mr.is_null() {
            let what = format!("registering the {} MiB pool on {device}", mem.len() >> 20);
            return Err(VerbsError::last("ibv_reg_mr", what));
        }
        return Ok((Some(Mr(v, mr)), Vec::new()));
    };
    assert!(slot_size * slots <= mem.len(), "the slots lie in the mapping");
    check_windows(v, ctx, device)?;
    use ffi::ibv_access_flags as a;
    let flags = (a::IBV_ACCESS_LOCAL_WRITE.0 | a::IBV_ACCESS_MW_BIND.0) as c_int;
    let mut mrs = Vec::with_capacity(slots);
    for i in 0..slots {
        // SAFETY: the slot lies in the mapping (asserted above), which stays mapped while the
        // endpoint holds its clone; pd is live. No remote access of its own: only a window bound
        // over it lets the peer write.
        let mr = unsafe { (v.ibv_reg_mr)(pd.1, mem.base().add(i * slot_size).cast::<c_void>(), slot_size, flags) };
        if mr.is_null() {
            return Err(VerbsError::last("ibv_reg_mr", format!("registering slot {i} on {device}"))
                .detail(format!("{slot_size} bytes, local write + MW bind")));
        }
        mrs.push(Mr(v, mr));
    }
    Ok((None, mrs))
}

/// A type-2 window per slot of a receiving endpoint (none for a sending one), allocated after
/// its QP (see the field order of [`Endpoint`]).
fn windows(pd: &Pd, access: Access, device: &str) -> Result<Vec<Window>, VerbsError> {
    let Access::Grants { slots, .. } = access else { return Ok(Vec::new()) };
    let mut windows = Vec::with_capacity(slots);
    for i in 0..slots {
        // SAFETY: pd is live.
        let mw = unsafe { ffi::ibv_alloc_mw(pd.1, ffi::ibv_mw_type::IBV_MW_TYPE_2) }.unwrap_or(std::ptr::null_mut());
        if mw.is_null() {
            return Err(VerbsError::last("ibv_alloc_mw", format!("a type-2 window for slot {i} on {device}")));
        }
        windows.push(Window { ptr: mw, bound: false });
    }
    Ok(windows)
}

impl Endpoint {
    /// Opens `device`, registers `mem` for `access` and creates an RC queue pair with room for
    /// `depth` outstanding sends and receives, moved to INIT with the access the side needs.
    ///
    /// - [`Access::SendOnly`]: the whole mapping, local access only (the writes' source).
    /// - [`Access::Grants`]: each slot as its own region (local write and MW bind, no remote
    ///   access) and a type-2 memory window per slot, which [`Endpoint::grant`] binds over the
    ///   granted slot alone; refused, naming the device, where it has no type-2 windows.
    ///
    /// The endpoint keeps a clone of `mem`: the memory stays mapped while it is registered.
    pub fn open(
        device: &str,
        port: u8,
        gid_index: u8,
        mem: &Mapping,
        depth: u32,
        access: Access,
    ) -> Result<Self, VerbsError> {
        let ctx = Context::open(device)?;
        let v = ctx.v;
        // SAFETY: ctx is a live context.
        let pd = unsafe { (v.ibv_alloc_pd)(ctx.ptr) };
        if pd.is_null() {
            return Err(VerbsError::last("ibv_alloc_pd", device.to_owned()));
        }
        let pd = Pd(v, pd);
        let (mr, slot_mrs) = register(v, &ctx, &pd, mem, access, device)?;
        // SAFETY: ctx is live.
        let ch = unsafe { (v.ibv_create_comp_channel)(ctx.ptr) };
        if ch.is_null() {
            return Err(VerbsError::last("ibv_create_comp_channel", device.to_owned()));
        }
        let channel = Channel(v, ch);
        // SAFETY: the channel's fd is a descriptor libibverbs owns; making it non-blocking lets
        // the session drain events without waiting.
        unsafe {
            let fd = (*channel.1).fd;
            let fl = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        let cqe = (2 * depth + 16) as c_int;
        // SAFETY: ctx and channel are live.
        let cq = unsafe { (v.ibv_create_cq)(ctx.ptr, cqe, std::ptr::null_mut(), channel.1, 0) };
        if cq.is_null() {
            return Err(VerbsError::last("ibv_create_cq", device.to_owned()).detail(format!("{cqe} entries")));
        }
        let cq = Cq { v, ptr: cq, unacked: 0 };
        // SAFETY: zeroed is a valid init attr; the fields that matter are set below.
        let mut init: ffi::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = cq.ptr;
        init.recv_cq = cq.ptr;
        init.qp_type = ffi::ibv_qp_type::IBV_QPT_RC;
        init.sq_sig_all = 0;
        init.cap.max_send_wr = depth;
        init.cap.max_recv_wr = depth;
        init.cap.max_send_sge = 1;
        init.cap.max_recv_sge = 1;
        // SAFETY: pd is live and init is a valid attr.
        let qp = unsafe { (v.ibv_create_qp)(pd.1, &mut init) };
        if qp.is_null() {
            return Err(VerbsError::last("ibv_create_qp", format!("RC on {device}")).detail(format!("depth {depth}")));
        }
        let qp = Qp(v, qp);
        let windows = windows(&pd, access, device)?;

        // SAFETY: zeroed port_attr is valid output space; ctx is live.
        let mut pattr: ffi::ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: ctx is live; the exported ibv_query_port fills the `_compat_ibv_port_attr`
        // prefix of the (larger, zeroed) ibv_port_attr, which holds every field read here.
        let rc = unsafe { (v.ibv_query_port)(ctx.ptr, port, (&raw mut pattr).cast::<ffi::_compat_ibv_port_attr>()) };
        if rc != 0 {
            return Err(VerbsError::code("ibv_query_port", format!("{device} port {port}"), rc));
        }
        // SAFETY: zeroed gid is valid output space.
        let mut gid: ffi::ibv_gid = unsafe { std::mem::zeroed() };
        // SAFETY: ctx is live; gid is valid output space.
        let rc = unsafe { (v.ibv_query_gid)(ctx.ptr, port, c_int::from(gid_index), &mut gid) };
        if rc != 0 {
            return Err(VerbsError::last("ibv_query_gid", format!("{device} port {port}"))
                .detail(format!("gid index {gid_index}")));
        }
        // SAFETY: the union's raw view covers all 16 bytes.
        let gid = unsafe { gid.raw };
        // SAFETY: qp is live.
        let qpn = unsafe { (*qp.1).qp_num };
        let psn = psn_for(qpn);
        // No key grants the whole pool: the sending end's region has no remote access, and the
        // receiving end's keys are its windows', one per grant. Only a receiver's pool address
        // is advertised (a slot's writes go to address + slot × slot size).
        let addr = match access {
            Access::SendOnly => 0,
            Access::Grants { .. } => mem.base() as u64,
        };
        let local = PeerInfo { qpn, psn, gid, mtu: pattr.active_mtu as u8, addr };
        let ep = Self {
            windows,
            qp,
            cq,
            channel,
            slot_mrs,
            mr,
            _pd: pd,
            _ctx: ctx,
            mem: mem.clone(),
            device: device.to_owned(),
            port,
            gid_index,
            access,
            local,
            stash: Vec::new(),
        };
        ep.to_init()?;
        ep.arm()?;
        Ok(ep)
    }

    /// What the peer needs to connect to this side.
    pub fn local(&self) -> PeerInfo {
        self.local
    }

    /// The device's name.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// The whole mapping's local key (the sending end's; a receiving end registers no such region).
    fn lkey(&self) -> Result<u32, VerbsError> {
        match &self.mr {
            // SAFETY: the MR is live.
            Some(mr) => Ok(unsafe { (*mr.1).lkey }),
            None => Err(VerbsError::new(
                "ibv_post_send",
                format!("RDMA WRITE on {}", self.device),
                io::Error::new(io::ErrorKind::InvalidInput, "a receiving endpoint posts no writes"),
            )),
        }
    }

    fn modify(&self, attr: &mut ffi::ibv_qp_attr, mask: u32, step: &str) -> Result<(), VerbsError> {
        // SAFETY: the QP is live; attr is a valid attribute struct for the mask.
        let rc = unsafe { (self.qp.0.ibv_modify_qp)(self.qp.1, attr, mask as c_int) };
        if rc != 0 {
            return Err(VerbsError::code("ibv_modify_qp", format!("{step} on {}", self.device), rc)
                .detail(format!("gid index {}", self.gid_index)));
        }
        Ok(())
    }

    fn to_init(&self) -> Result<(), VerbsError> {
        use ffi::ibv_qp_attr_mask as m;
        // SAFETY: zeroed attr is valid; fields set below.
        let mut a: ffi::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ffi::ibv_qp_state::IBV_QPS_INIT;
        a.pkey_index = 0;
        a.port_num = self.port;
        a.qp_access_flags = self.access.qp_flags();
        let mask = m::IBV_QP_STATE.0 | m::IBV_QP_PKEY_INDEX.0 | m::IBV_QP_PORT.0 | m::IBV_QP_ACCESS_FLAGS.0;
        self.modify(&mut a, mask, "RESET->INIT")
    }

    /// Connects to the peer: INIT → RTR → RTS.
    pub fn connect(&mut self, remote: &PeerInfo) -> Result<(), VerbsError> {
        use ffi::ibv_qp_attr_mask as m;
        // SAFETY: zeroed attr is valid; fields set below.
        let mut a: ffi::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ffi::ibv_qp_state::IBV_QPS_RTR;
        a.path_mtu = u32::from(self.local.mtu.min(remote.mtu));
        a.dest_qp_num = remote.qpn;
        a.rq_psn = remote.psn;
        a.max_dest_rd_atomic = 1;
        a.min_rnr_timer = 12;
        a.ah_attr.is_global = 1;
        a.ah_attr.port_num = self.port;
        a.ah_attr.grh.dgid = ffi::ibv_gid { raw: remote.gid };
        a.ah_attr.grh.sgid_index = self.gid_index;
        a.ah_attr.grh.hop_limit = 64;
        let mask = m::IBV_QP_STATE.0
            | m::IBV_QP_AV.0
            | m::IBV_QP_PATH_MTU.0
            | m::IBV_QP_DEST_QPN.0
            | m::IBV_QP_RQ_PSN.0
            | m::IBV_QP_MAX_DEST_RD_ATOMIC.0
            | m::IBV_QP_MIN_RNR_TIMER.0;
        self.modify(&mut a, mask, "INIT->RTR")?;

        // SAFETY: as above.
        let mut a: ffi::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ffi::ibv_qp_state::IBV_QPS_RTS;
        a.sq_psn = self.local.psn;
        // 4.096 µs × 2^14 ≈ 67 ms per try, 7 tries: a dead peer surfaces in about half a second.
        a.timeout = 14;
        a.retry_cnt = 7;
        a.rnr_retry = 7;
        a.max_rd_atomic = 1;
        let mask = m::IBV_QP_STATE.0
            | m::IBV_QP_SQ_PSN.0
            | m::IBV_QP_TIMEOUT.0
            | m::IBV_QP_RETRY_CNT.0
            | m::IBV_QP_RNR_RETRY.0
            | m::IBV_QP_MAX_QP_RD_ATOMIC.0;
        self.modify(&mut a, mask, "RTR->RTS")
    }

    /// Moves the queue pair to the error state: every request still outstanding completes at
    /// once with a flush error, instead of after the transport's retries (a peer that is gone
    /// may never answer them).
    pub fn flush(&self) -> Result<(), VerbsError> {
        use ffi::ibv_qp_attr_mask as m;
        // SAFETY: zeroed attr is valid; only the state is set.
        let mut a: ffi::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ffi::ibv_qp_state::IBV_QPS_ERR;
        self.modify(&mut a, m::IBV_QP_STATE.0, "->ERR")
    }

    /// Posts an RDMA WRITE of `len` bytes at `local` (inside the registered pool) to
    /// `remote_addr` with `rkey`, WITH IMM `imm` when given (that consumes a receive on the peer;
    /// a plain WRITE does not). shardcast's hops use the IMM form; the plain one is what a peer
    /// that writes where it was not granted would use (tests/rdma.rs).
    ///
    /// # Safety
    /// `local..local+len` lies in the registered pool and is not written until this request
    /// completes; the remote range was granted by the peer (a credit) and fits in its slot.
    pub unsafe fn post_write(
        &self,
        wr_id: u64,
        local: *const u8,
        len: u32,
        remote_addr: u64,
        rkey: u32,
        imm: Option<u32>,
    ) -> Result<(), VerbsError> {
        let mut sge = ffi::ibv_sge { addr: local as u64, length: len, lkey: self.lkey()? };
        // SAFETY: zeroed is a valid send WR; the fields used are set below.
        let mut wr: ffi::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.opcode = match imm {
            Some(_) => ffi::ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM,
            None => ffi::ibv_wr_opcode::IBV_WR_RDMA_WRITE,
        };
        wr.send_flags = ffi::ibv_send_flags::IBV_SEND_SIGNALED.0;
        wr.imm_data_invalidated_rkey_union.imm_data = imm.unwrap_or(0).to_be();
        wr.wr.rdma = ffi::rdma_t { remote_addr, rkey };
        let mut bad = std::ptr::null_mut();
        // SAFETY: the QP is live; wr and sge live across the call (the provider copies them).
        let rc = unsafe { ffi::ibv_post_send(self.qp.1, &mut wr, &mut bad) };
        if rc != 0 {
            let op = if imm.is_some() { "RDMA WRITE WITH IMM" } else { "RDMA WRITE" };
            return Err(VerbsError::code("ibv_post_send", format!("{op} on {}", self.device), rc)
                .detail(format!("{len} bytes")));
        }
        Ok(())
    }

    /// Posts a receive with no buffer: it is consumed by one incoming WRITE WITH IMM.
    pub fn post_recv(&self, wr_id: u64) -> Result<(), VerbsError> {
        // SAFETY: zeroed is a valid receive WR: no scatter entries.
        let mut wr: ffi::ibv_recv_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        let mut bad = std::ptr::null_mut();
        // SAFETY: the QP is live; wr lives across the call.
        let rc = unsafe { ffi::ibv_post_recv(self.qp.1, &mut wr, &mut bad) };
        if rc != 0 {
            return Err(VerbsError::code("ibv_post_recv", self.device.clone(), rc));
        }
        Ok(())
    }

    /// The completion channel's descriptor: readable when the CQ has new completions (after
    /// [`Endpoint::arm`]).
    pub fn event_fd(&self) -> RawFd {
        // SAFETY: the channel is live.
        unsafe { (*self.channel.1).fd }
    }

    fn arm(&self) -> Result<(), VerbsError> {
        // SAFETY: the CQ is live.
        let rc = unsafe { ffi::ibv_req_notify_cq(self.cq.ptr, 0) };
        if rc != 0 {
            return Err(VerbsError::code("ibv_req_notify_cq", self.device.clone(), rc));
        }
        Ok(())
    }

    /// Takes the pending channel events, re-arms the CQ and appends every completion to `out`.
    /// Call it when [`Endpoint::event_fd`] is readable (or at any time: it never blocks).
    pub fn poll(&mut self, out: &mut Vec<WorkCompletion>) -> Result<(), VerbsError> {
        loop {
            let mut cq = std::ptr::null_mut();
            let mut cq_ctx = std::ptr::null_mut();
            // SAFETY: the channel is live and non-blocking; outputs are valid pointers.
            let rc = unsafe { (self.channel.0.ibv_get_cq_event)(self.channel.1, &mut cq, &mut cq_ctx) };
            if rc != 0 {
                break;
            }
            self.cq.unacked += 1;
        }
        if self.cq.unacked >= 64 {
            // SAFETY: the events were taken from this CQ's channel.
            unsafe { (self.cq.v.ibv_ack_cq_events)(self.cq.ptr, self.cq.unacked) };
            self.cq.unacked = 0;
        }
        self.arm()?;
        // Completions taken while a bind or an invalidate was waited for come first.
        out.append(&mut self.stash);
        // Poll after arming: a completion that raced the arm is seen here.
        while self.drain_cq(out)? == 32 {}
        Ok(())
    }

    /// Takes up to 32 completions from the CQ into `out`; how many.
    fn drain_cq(&mut self, out: &mut Vec<WorkCompletion>) -> Result<usize, VerbsError> {
        // SAFETY: zeroed work completions are valid output space.
        let mut wcs: [ffi::ibv_wc; 32] = unsafe { std::mem::zeroed() };
        // SAFETY: the CQ is live; wcs has room for 32 entries.
        let n = unsafe { ffi::ibv_poll_cq(self.cq.ptr, 32, wcs.as_mut_ptr()) };
        if n < 0 {
            return Err(VerbsError::code("ibv_poll_cq", self.device.clone(), n));
        }
        for wc in &wcs[..n as usize] {
            let status = if wc.status == ffi::ibv_wc_status::IBV_WC_SUCCESS { Ok(()) } else { Err(WcError(wc.status)) };
            // SAFETY: for receives with immediate data the union holds imm_data.
            let imm = u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data });
            out.push(WorkCompletion { wr_id: wc.wr_id, status, imm });
        }
        Ok(n as usize)
    }

    /// Posts `wr` (a bind or an invalidate of slot `slot`'s window, signaled) and waits for its
    /// completion. Other completions met meanwhile are kept for the next [`Endpoint::poll`]:
    /// each arrived while the CQ was armed (its event wakes the session) or while an event was
    /// already pending, so none waits unseen.
    fn post_and_wait(&mut self, wr: &mut ffi::ibv_send_wr, what: &str, slot: u16) -> Result<(), VerbsError> {
        let device = self.device.clone();
        let step = || format!("{what} for slot {slot} on {device}");
        let mut bad = std::ptr::null_mut();
        // SAFETY: the QP is live; wr lives across the call (the provider copies it).
        let rc = unsafe { ffi::ibv_post_send(self.qp.1, wr, &mut bad) };
        if rc != 0 {
            return Err(VerbsError::code("ibv_post_send", step(), rc));
        }
        let deadline = std::time::Instant::now() + WINDOW_WAIT;
        let mut seen = Vec::new();
        loop {
            let from = seen.len();
            self.drain_cq(&mut seen)?;
            if let Some(i) = seen[from..].iter().position(|wc| wc.wr_id == wr.wr_id) {
                let wc = seen.remove(from + i);
                self.stash.append(&mut seen);
                return wc.status.map_err(|e| {
                    VerbsError::new("ibv_poll_cq", step(), io::Error::other(format!("work completion: {e}")))
                });
            }
            if std::time::Instant::now() > deadline {
                self.stash.append(&mut seen);
                return Err(VerbsError::new("ibv_poll_cq", step(), io::ErrorKind::TimedOut.into())
                    .detail(format!("no completion within {WINDOW_WAIT:?}")));
            }
            std::thread::yield_now();
        }
    }

    /// Grants the peer slot `slot` (a receiving endpoint): binds the slot's window over the
    /// slot's region alone, with remote write access, under a new key, and returns that key.
    /// Writes with it land only inside the slot, and only until [`Endpoint::revoke`].
    ///
    /// # Panics
    /// On a sending endpoint, or when the slot is already granted (a bug in the caller).
    pub fn grant(&mut self, slot: u16) -> Result<u32, VerbsError> {
        let Access::Grants { slot_size, .. } = self.access else { panic!("a sending endpoint grants nothing") };
        let i = usize::from(slot);
        assert!(!self.windows[i].bound, "slot {slot} is granted already");
        let mw = self.windows[i].ptr;
        // SAFETY: the window is live; a type-2 window's key is the one its last bind gave it.
        let rkey = unsafe { ffi::ibv_inc_rkey((*mw).rkey) };
        // SAFETY: zeroed is a valid send WR; the fields used are set below.
        let mut wr: ffi::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = WINDOW_WR | u64::from(slot);
        wr.opcode = ffi::ibv_wr_opcode::IBV_WR_BIND_MW;
        wr.send_flags = ffi::ibv_send_flags::IBV_SEND_SIGNALED.0;
        wr.bind_mw_tso_union.bind_mw = ffi::bind_mw_t {
            mw,
            rkey,
            bind_info: ffi::ibv_mw_bind_info {
                mr: self.slot_mrs[i].1,
                addr: self.mem.base() as u64 + (i * slot_size) as u64,
                length: slot_size as u64,
                mw_access_flags: ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0,
            },
        };
        self.post_and_wait(&mut wr, "binding the memory window", slot)?;
        // SAFETY: the window is live. libibverbs tracks a window's key only for type-1 binds;
        // the provider checks the next bind or invalidate against this one.
        unsafe { (*mw).rkey = rkey };
        self.windows[i].bound = true;
        Ok(rkey)
    }

    /// Ends the grant of slot `slot` (no-op when it is not granted): invalidates its window, so
    /// that no write with its key lands any more. Returns once the invalidation completed.
    pub fn revoke(&mut self, slot: u16) -> Result<(), VerbsError> {
        let i = usize::from(slot);
        if !self.windows.get(i).is_some_and(|w| w.bound) {
            return Ok(());
        }
        // SAFETY: the window is live.
        let rkey = unsafe { (*self.windows[i].ptr).rkey };
        // SAFETY: zeroed is a valid send WR; the fields used are set below.
        let mut wr: ffi::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = WINDOW_WR | u64::from(slot);
        wr.opcode = ffi::ibv_wr_opcode::IBV_WR_LOCAL_INV;
        wr.send_flags = ffi::ibv_send_flags::IBV_SEND_SIGNALED.0;
        wr.imm_data_invalidated_rkey_union.invalidated_rkey = rkey;
        // Whatever the outcome, the window is not rebound before a successful invalidate.
        self.post_and_wait(&mut wr, "invalidating the memory window", slot)?;
        self.windows[i].bound = false;
        Ok(())
    }
}

/// A starting PSN that differs between queue pairs (24 bits).
fn psn_for(qpn: u32) -> u32 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    (qpn.wrapping_mul(2_654_435_761) ^ t) & 0x00ff_ffff
}
