//! The kernel DLM through `libdlm_lt.so.3` (Debian `libdlm3`), loaded at run time so the
//! build needs no C headers: one lock space, lock+unlock of one resource in a loop.
//!
//! The only unsafe code of the benchmark: `dlopen`/`dlsym` and calls through the
//! resulting pointers, with the C prototypes from `libdlm.h`.

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::time::Instant;

use anyhow::{Context, bail};

/// `struct dlm_lksb` from libdlm.h.
#[repr(C)]
struct Lksb {
    sb_status: c_int,
    sb_lkid: u32,
    sb_flags: c_char,
    sb_lvbptr: *mut c_char,
}

const _: () = assert!(std::mem::size_of::<Lksb>() == 24);

const LKM_EXMODE: u32 = 5;

type CreateLs = unsafe extern "C" fn(*const c_char, libc::mode_t) -> *mut c_void;
type ReleaseLs = unsafe extern "C" fn(*const c_char, *mut c_void, c_int) -> c_int;
type LockWait = unsafe extern "C" fn(
    *mut c_void,
    u32,
    *mut Lksb,
    u32,
    *const c_void,
    c_uint,
    u32,
    *mut c_void,
    Option<unsafe extern "C" fn(*mut c_void)>,
    *mut c_void,
) -> c_int;
type UnlockWait = unsafe extern "C" fn(*mut c_void, u32, u32, *mut Lksb) -> c_int;

fn dlerror() -> String {
    // SAFETY: dlerror returns NULL or a pointer to a NUL-terminated string owned by the
    // loader, valid until the next dl* call on this thread; it is copied at once.
    let p = unsafe { libc::dlerror() };
    if p.is_null() {
        return "unknown error".into();
    }
    // SAFETY: non-null, NUL-terminated (see above).
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn symbol(lib: *mut c_void, name: &CStr) -> anyhow::Result<*mut c_void> {
    // SAFETY: `lib` is a live handle from dlopen and `name` a NUL-terminated string.
    let p = unsafe { libc::dlsym(lib, name.as_ptr()) };
    if p.is_null() {
        bail!("libdlm_lt has no {name:?}: {}", dlerror());
    }
    Ok(p)
}

/// Runs `ops` EX lock+unlock pairs on one resource; returns pairs per second.
pub fn bench(ops: u64) -> anyhow::Result<f64> {
    let libname = c"libdlm_lt.so.3";
    // SAFETY: dlopen with a NUL-terminated name; libdlm_lt has no constructors with
    // requirements on the caller.
    let lib = unsafe { libc::dlopen(libname.as_ptr(), libc::RTLD_NOW) };
    if lib.is_null() {
        bail!(
            "cannot load libdlm_lt.so.3 (Debian package libdlm3): {}",
            dlerror()
        );
    }
    let create = symbol(lib, c"dlm_create_lockspace")?;
    let release = symbol(lib, c"dlm_release_lockspace")?;
    let lock = symbol(lib, c"dlm_ls_lock_wait")?;
    let unlock = symbol(lib, c"dlm_ls_unlock_wait")?;
    // SAFETY: the pointers are these functions' addresses in libdlm_lt; the types are
    // the prototypes from libdlm.h (dlm_lshandle_t is void *).
    let (create, release, lock, unlock) = unsafe {
        (
            std::mem::transmute::<*mut c_void, CreateLs>(create),
            std::mem::transmute::<*mut c_void, ReleaseLs>(release),
            std::mem::transmute::<*mut c_void, LockWait>(lock),
            std::mem::transmute::<*mut c_void, UnlockWait>(unlock),
        )
    };
    let ls_name = CString::new("tandembench").context("lock space name")?;
    // SAFETY: valid NUL-terminated name; the mode is a plain permission mask.
    let ls = unsafe { create(ls_name.as_ptr(), 0o600) };
    if ls.is_null() {
        bail!(
            "dlm_create_lockspace failed: {} (needs root, dlm_controld and corosync)",
            std::io::Error::last_os_error()
        );
    }
    let name = b"r";
    let mut lksb = Lksb {
        sb_status: 0,
        sb_lkid: 0,
        sb_flags: 0,
        sb_lvbptr: std::ptr::null_mut(),
    };
    let name_len = c_uint::try_from(name.len()).context("name length")?;
    let t0 = Instant::now();
    let mut failure = None;
    for _ in 0..ops {
        // SAFETY: `ls` is a live lock space handle, `lksb` outlives the synchronous call,
        // the name buffer is valid for `name_len` bytes, no blocking callback or range.
        let rc = unsafe {
            lock(
                ls,
                LKM_EXMODE,
                &mut lksb,
                0,
                name.as_ptr().cast(),
                name_len,
                0,
                std::ptr::null_mut(),
                None,
                std::ptr::null_mut(),
            )
        };
        if rc != 0 || lksb.sb_status != 0 {
            failure = Some(format!(
                "dlm_ls_lock_wait: rc {rc}, status {}",
                lksb.sb_status
            ));
            break;
        }
        // SAFETY: as above; `sb_lkid` is the granted lock.
        let rc = unsafe { unlock(ls, lksb.sb_lkid, 0, &mut lksb) };
        if rc != 0 {
            failure = Some(format!("dlm_ls_unlock_wait: rc {rc}"));
            break;
        }
    }
    let took = t0.elapsed();
    // SAFETY: releases the lock space created above (force: no locks should remain).
    unsafe { release(ls_name.as_ptr(), ls, 1) };
    if let Some(f) = failure {
        bail!("{f}");
    }
    Ok(ops as f64 / took.as_secs_f64())
}
