//! The only unsafe module of the vTPM: a safe wrapper around libtpms, the TPM 2.0 engine
//! behind swtpm and QEMU (Debian's `libtpms0`).
//!
//! libtpms is one TPM per process, with global state, and reaches its NVRAM through
//! callbacks. [`Engine`] owns that global instance (at most one exists; see
//! [`Engine::take`]) and routes the callbacks to the [`NvStore`] it was given: the permanent
//! state ("permall") and the volatile state ("volatilestate") go wherever the service says
//! (VMGS and the checkpoint region).

#![allow(unsafe_code)]

use std::ffi::c_char;
use std::ffi::c_int;
use std::ffi::c_uchar;
use std::ffi::CStr;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

type TpmResult = u32;
type TpmBool = c_uchar;

const TPM_SUCCESS: TpmResult = 0;
const TPM_FAIL: TpmResult = 9;
/// What libtpms' own file backend returns for "no such state blob".
const TPM_RETRY: TpmResult = 0x800;
const TPMLIB_TPM_VERSION_2: c_int = 1;

#[repr(C)]
struct Callbacks {
    size_of_struct: c_int,
    nvram_init: Option<unsafe extern "C" fn() -> TpmResult>,
    nvram_loaddata:
        Option<unsafe extern "C" fn(*mut *mut c_uchar, *mut u32, u32, *const c_char) -> TpmResult>,
    nvram_storedata:
        Option<unsafe extern "C" fn(*const c_uchar, u32, u32, *const c_char) -> TpmResult>,
    nvram_deletename: Option<unsafe extern "C" fn(u32, *const c_char, TpmBool) -> TpmResult>,
    io_init: Option<unsafe extern "C" fn() -> TpmResult>,
    io_getlocality: Option<unsafe extern "C" fn(*mut u32, u32) -> TpmResult>,
    io_getphysicalpresence: Option<unsafe extern "C" fn(*mut TpmBool, u32) -> TpmResult>,
}

#[link(name = "tpms")]
extern "C" {
    fn TPMLIB_ChooseTPMVersion(ver: c_int) -> TpmResult;
    fn TPMLIB_RegisterCallbacks(cbs: *mut Callbacks) -> TpmResult;
    fn TPMLIB_MainInit() -> TpmResult;
    fn TPMLIB_Terminate();
    fn TPMLIB_Process(
        respbuffer: *mut *mut c_uchar,
        resp_size: *mut u32,
        respbufsize: *mut u32,
        command: *mut c_uchar,
        command_size: u32,
    ) -> TpmResult;
    fn TPMLIB_CancelCommand() -> TpmResult;
    fn TPMLIB_VolatileAll_Store(buffer: *mut *mut c_uchar, buflen: *mut u32) -> TpmResult;
    fn TPM_IO_TpmEstablished_Get(established: *mut TpmBool) -> TpmResult;
    fn TPM_IO_TpmEstablished_Reset() -> TpmResult;
    fn TPM_Free(buffer: *mut c_uchar);
}

#[link(name = "crypto")]
extern "C" {
    fn OPENSSL_init_crypto(opts: u64, settings: *const std::ffi::c_void) -> c_int;
}

/// `OPENSSL_INIT_LOAD_CONFIG`.
const OPENSSL_INIT_LOAD_CONFIG: u64 = 0x40;

/// Makes OpenSSL (libtpms' crypto) read its configuration now. It would otherwise open
/// `openssl.cnf` at its first use, inside the service's seccomp profile, which allows no
/// `openat`: call this before entering the sandbox.
pub fn preload_crypto_config() {
    // SAFETY: plain call; a null settings pointer means the default configuration.
    unsafe { OPENSSL_init_crypto(OPENSSL_INIT_LOAD_CONFIG, std::ptr::null()) };
}

/// The state blobs libtpms stores and loads by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NvName {
    /// "permall": the permanent state (seeds, NV indices, persistent objects).
    Permanent,
    /// "volatilestate": PCRs, loaded objects, sessions.
    Volatile,
    /// "savestate": the state TPM2_Shutdown(STATE) saves.
    SaveState,
}

impl NvName {
    fn from_c(name: &CStr) -> Option<NvName> {
        match name.to_bytes() {
            b"permall" => Some(NvName::Permanent),
            b"volatilestate" => Some(NvName::Volatile),
            b"savestate" => Some(NvName::SaveState),
            _ => None,
        }
    }
}

/// A state blob could not be loaded or stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NvError;

/// Where the engine's state blobs live.
pub trait NvStore: Send {
    /// The blob, `None` if there is none yet, `Err` if it cannot be read.
    fn load(&mut self, name: NvName) -> Result<Option<Vec<u8>>, NvError>;
    /// Stores the blob durably before returning.
    fn store(&mut self, name: NvName, data: &[u8]) -> Result<(), NvError>;
    fn delete(&mut self, name: NvName) -> Result<(), NvError>;
}

/// The store the callbacks use (set by the one [`Engine`]).
static STORE: Mutex<Option<Box<dyn NvStore>>> = Mutex::new(None);
/// The locality of the command being processed.
static LOCALITY: AtomicU32 = AtomicU32::new(0);
/// Whether the process-wide engine has been handed out.
static TAKEN: AtomicBool = AtomicBool::new(false);

fn with_store<T>(f: impl FnOnce(&mut dyn NvStore) -> T) -> Option<T> {
    let mut guard = STORE.lock().unwrap_or_else(|p| p.into_inner());
    guard.as_mut().map(|s| f(s.as_mut()))
}

extern "C" fn cb_nvram_init() -> TpmResult {
    TPM_SUCCESS
}

/// # Safety
/// Called by libtpms with valid out-pointers and a NUL-terminated name.
unsafe extern "C" fn cb_nvram_loaddata(
    data: *mut *mut c_uchar,
    length: *mut u32,
    _tpm_number: u32,
    name: *const c_char,
) -> TpmResult {
    // SAFETY: libtpms passes a valid NUL-terminated name for the duration of the call.
    let Some(name) = NvName::from_c(unsafe { CStr::from_ptr(name) }) else {
        return TPM_FAIL;
    };
    let blob = match with_store(|s| s.load(name)) {
        Some(Ok(Some(blob))) => blob,
        Some(Ok(None)) => return TPM_RETRY,
        _ => return TPM_FAIL,
    };
    let Ok(len) = u32::try_from(blob.len()) else {
        return TPM_FAIL;
    };
    // Plain malloc, not TPM_Malloc (which refuses more than 128 KiB, less than a full NV
    // can need); libtpms releases the blob with TPM_Free, which is free().
    // SAFETY: malloc of a non-zero size; checked for null below.
    let buf = unsafe { libc::malloc(len.max(1) as usize) }.cast::<c_uchar>();
    if buf.is_null() {
        return TPM_FAIL;
    }
    // SAFETY: `buf` holds at least `len` bytes; `blob` is a distinct allocation; the
    // out-pointers are valid per libtpms' callback contract.
    unsafe {
        std::ptr::copy_nonoverlapping(blob.as_ptr(), buf, blob.len());
        *data = buf;
        *length = len;
    }
    TPM_SUCCESS
}

/// # Safety
/// Called by libtpms with `length` readable bytes at `data` and a NUL-terminated name.
unsafe extern "C" fn cb_nvram_storedata(
    data: *const c_uchar,
    length: u32,
    _tpm_number: u32,
    name: *const c_char,
) -> TpmResult {
    // SAFETY: as above, the name is valid for the call.
    let Some(name) = NvName::from_c(unsafe { CStr::from_ptr(name) }) else {
        return TPM_FAIL;
    };
    let bytes = if length == 0 {
        &[][..]
    } else {
        // SAFETY: libtpms passes `length` readable bytes at `data` for the call.
        unsafe { std::slice::from_raw_parts(data, length as usize) }
    };
    match with_store(|s| s.store(name, bytes)) {
        Some(Ok(())) => TPM_SUCCESS,
        _ => TPM_FAIL,
    }
}

/// # Safety
/// Called by libtpms with a NUL-terminated name.
unsafe extern "C" fn cb_nvram_deletename(
    _tpm_number: u32,
    name: *const c_char,
    _must_exist: TpmBool,
) -> TpmResult {
    // SAFETY: as above.
    let Some(name) = NvName::from_c(unsafe { CStr::from_ptr(name) }) else {
        return TPM_FAIL;
    };
    match with_store(|s| s.delete(name)) {
        Some(Ok(())) => TPM_SUCCESS,
        _ => TPM_FAIL,
    }
}

extern "C" fn cb_io_init() -> TpmResult {
    TPM_SUCCESS
}

/// # Safety
/// Called by libtpms with a valid out-pointer.
unsafe extern "C" fn cb_io_getlocality(locality: *mut u32, _tpm_number: u32) -> TpmResult {
    // SAFETY: libtpms passes a valid pointer for the answer.
    unsafe { *locality = LOCALITY.load(Ordering::Relaxed) };
    TPM_SUCCESS
}

/// # Safety
/// Called by libtpms with a valid out-pointer.
unsafe extern "C" fn cb_io_getphysicalpresence(
    present: *mut TpmBool,
    _tpm_number: u32,
) -> TpmResult {
    // SAFETY: libtpms passes a valid pointer for the answer.
    unsafe { *present = 0 };
    TPM_SUCCESS
}

/// A buffer libtpms allocated; freed with `TPM_Free`.
struct TpmBuffer {
    ptr: *mut c_uchar,
    len: u32,
}

impl TpmBuffer {
    fn to_vec(&self) -> Vec<u8> {
        if self.ptr.is_null() || self.len == 0 {
            return Vec::new();
        }
        // SAFETY: libtpms returned `len` valid bytes at `ptr`, alive until `drop`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len as usize) }.to_vec()
    }
}

impl Drop for TpmBuffer {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: `ptr` came from libtpms' allocator and is freed once, here.
            unsafe { TPM_Free(self.ptr) };
        }
    }
}

/// The process's TPM engine.
pub struct Engine {
    powered: bool,
}

impl Engine {
    /// The engine, the first time (libtpms is one TPM per process); `None` afterwards.
    pub fn take(store: Box<dyn NvStore>) -> Option<Result<Engine, u32>> {
        if TAKEN.swap(true, Ordering::SeqCst) {
            return None;
        }
        *STORE.lock().unwrap_or_else(|p| p.into_inner()) = Some(store);
        let mut callbacks = Callbacks {
            size_of_struct: std::mem::size_of::<Callbacks>() as c_int,
            nvram_init: Some(cb_nvram_init),
            nvram_loaddata: Some(cb_nvram_loaddata),
            nvram_storedata: Some(cb_nvram_storedata),
            nvram_deletename: Some(cb_nvram_deletename),
            io_init: Some(cb_io_init),
            io_getlocality: Some(cb_io_getlocality),
            io_getphysicalpresence: Some(cb_io_getphysicalpresence),
        };
        // SAFETY: plain calls into libtpms; the callbacks struct is read during the call
        // (libtpms copies the pointers), and every callback is a valid `extern "C"` fn.
        let rc = unsafe {
            let rc = TPMLIB_ChooseTPMVersion(TPMLIB_TPM_VERSION_2);
            if rc != TPM_SUCCESS {
                rc
            } else {
                TPMLIB_RegisterCallbacks(&mut callbacks)
            }
        };
        Some(if rc == TPM_SUCCESS {
            Ok(Engine { powered: false })
        } else {
            Err(rc)
        })
    }

    pub fn is_powered(&self) -> bool {
        self.powered
    }

    /// Powers on: libtpms loads its permanent state (and a volatile state, if the store has
    /// one: a resumed TPM) through the store. A TPM with no permanent state is manufactured
    /// (fresh seeds) and its state stored.
    pub fn power_on(&mut self) -> Result<(), u32> {
        if self.powered {
            return Ok(());
        }
        // SAFETY: plain call; callbacks are registered.
        let rc = unsafe { TPMLIB_MainInit() };
        if rc != TPM_SUCCESS {
            return Err(rc);
        }
        self.powered = true;
        Ok(())
    }

    pub fn power_off(&mut self) {
        if self.powered {
            // SAFETY: plain call on an initialised engine.
            unsafe { TPMLIB_Terminate() };
            self.powered = false;
        }
    }

    /// Runs one command at `locality`; returns the response.
    pub fn process(&mut self, locality: u8, command: &[u8]) -> Result<Vec<u8>, u32> {
        if !self.powered {
            return Err(TPM_FAIL);
        }
        LOCALITY.store(u32::from(locality), Ordering::Relaxed);
        // libtpms takes a mutable pointer but does not keep it; give it a copy.
        let mut cmd = command.to_vec();
        let mut resp = TpmBuffer {
            ptr: std::ptr::null_mut(),
            len: 0,
        };
        let mut bufsize: u32 = 0;
        // SAFETY: `cmd` is valid for `len` bytes; libtpms allocates the response into
        // `resp.ptr` (freed by TpmBuffer's drop) and writes its length.
        let rc = unsafe {
            TPMLIB_Process(
                &mut resp.ptr,
                &mut resp.len,
                &mut bufsize,
                cmd.as_mut_ptr(),
                cmd.len() as u32,
            )
        };
        if rc != TPM_SUCCESS {
            return Err(rc);
        }
        Ok(resp.to_vec())
    }

    /// The volatile state (PCRs, loaded objects, sessions) as a blob that a later
    /// [`NvName::Volatile`] load restores.
    pub fn volatile_state(&mut self) -> Result<Vec<u8>, u32> {
        if !self.powered {
            return Err(TPM_FAIL);
        }
        let mut buf = TpmBuffer {
            ptr: std::ptr::null_mut(),
            len: 0,
        };
        // SAFETY: libtpms allocates the blob into `buf.ptr` (freed by its drop).
        let rc = unsafe { TPMLIB_VolatileAll_Store(&mut buf.ptr, &mut buf.len) };
        if rc != TPM_SUCCESS {
            return Err(rc);
        }
        Ok(buf.to_vec())
    }

    pub fn cancel(&mut self) {
        // SAFETY: plain call.
        unsafe { TPMLIB_CancelCommand() };
    }

    pub fn established(&mut self) -> bool {
        let mut flag: TpmBool = 0;
        // SAFETY: plain call with a valid out-pointer.
        unsafe { TPM_IO_TpmEstablished_Get(&mut flag) };
        flag != 0
    }

    /// Resets the established flag as requested from `locality` (libtpms reads the locality
    /// through its callback and refuses below 3).
    pub fn reset_established_flag(&mut self, locality: u8) -> Result<(), u32> {
        LOCALITY.store(u32::from(locality), Ordering::Relaxed);
        // SAFETY: plain call.
        let rc = unsafe { TPM_IO_TpmEstablished_Reset() };
        if rc == TPM_SUCCESS {
            Ok(())
        } else {
            Err(rc)
        }
    }
}

impl Drop for Engine {
    /// Powers the engine off and gives the process's one TPM back (tests take it in turn).
    fn drop(&mut self) {
        self.power_off();
        *STORE.lock().unwrap_or_else(|p| p.into_inner()) = None;
        TAKEN.store(false, Ordering::SeqCst);
    }
}
