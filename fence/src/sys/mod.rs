//! The kernel interfaces tandem-fence calls, and the crate's only unsafe code:
//! - `SG_IO` (`scsi/sg.h`): one SCSI command with a timeout, on `/dev/sdX` or `/dev/sgN`;
//! - the block layer's persistent-reservation ioctls (`linux/pr.h`): `IOC_PR_REGISTER` ...
//!   `IOC_PR_CLEAR`, which answer with the SCSI status as a *positive* return value
//!   (24 = RESERVATION CONFLICT) and number the types their own way;
//! - NVMe passthrough (`linux/nvme_ioctl.h`): `NVME_IOCTL_IO_CMD`, `NVME_IOCTL_ADMIN_CMD`
//!   and `NVME_IOCTL_ID`.
//!
//! Each struct is `#[repr(C)]` with its size asserted at compile time against the kernel's
//! layout on 64-bit Linux. Each ioctl is synchronous: the kernel uses the pointers only until
//! the call returns, which is what every `// SAFETY:` note below relies on.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

// ---- SG_IO --------------------------------------------------------------------------

/// `SG_IO` ioctl number.
const SG_IO: libc::Ioctl = 0x2285;
const SG_DXFER_NONE: i32 = -1;
const SG_DXFER_TO_DEV: i32 = -2;
const SG_DXFER_FROM_DEV: i32 = -3;
/// Sense buffer size we offer (SPC allows up to 252).
const SENSE_LEN: usize = 252;

/// `struct sg_io_hdr` from `scsi/sg.h`.
#[repr(C)]
#[derive(Debug)]
struct SgIoHdr {
    interface_id: i32,
    dxfer_direction: i32,
    cmd_len: u8,
    mx_sb_len: u8,
    iovec_count: u16,
    dxfer_len: u32,
    dxferp: *mut libc::c_void,
    cmdp: *const u8,
    sbp: *mut u8,
    timeout: u32,
    flags: u32,
    pack_id: i32,
    usr_ptr: *mut libc::c_void,
    status: u8,
    masked_status: u8,
    msg_status: u8,
    sb_len_wr: u8,
    host_status: u16,
    driver_status: u16,
    resid: i32,
    duration: u32,
    info: u32,
}

#[cfg(target_pointer_width = "64")]
const _: () = assert!(std::mem::size_of::<SgIoHdr>() == 88);

/// Which way data moves.
#[derive(Debug)]
pub enum DataDirection<'a> {
    None,
    ToDevice(&'a [u8]),
    FromDevice(&'a mut [u8]),
}

/// The outcome fields of an `SG_IO` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SgIoResult {
    /// SCSI status byte.
    pub status: u8,
    pub host_status: u16,
    pub driver_status: u16,
    /// The sense bytes the device returned (`sb_len_wr` of them).
    pub sense: Vec<u8>,
    /// Bytes not transferred.
    pub resid: i32,
    pub duration_ms: u32,
}

/// Sends one SCSI command through `SG_IO`, with the kernel-side `timeout_ms`.
pub fn sg_io(
    fd: BorrowedFd<'_>,
    cdb: &[u8],
    data: DataDirection<'_>,
    timeout_ms: u32,
) -> io::Result<SgIoResult> {
    let cmd_len = u8::try_from(cdb.len())
        .ok()
        .filter(|&l| (6..=16).contains(&l))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "CDB must be 6 to 16 bytes"))?;
    let mut sense = [0u8; SENSE_LEN];
    let (direction, ptr, len): (i32, *mut libc::c_void, usize) = match data {
        DataDirection::None => (SG_DXFER_NONE, std::ptr::null_mut(), 0),
        // The kernel only reads from a to-device buffer; the field is `void *` for both ways.
        DataDirection::ToDevice(buf) => {
            (SG_DXFER_TO_DEV, buf.as_ptr().cast_mut().cast(), buf.len())
        }
        DataDirection::FromDevice(buf) => (SG_DXFER_FROM_DEV, buf.as_mut_ptr().cast(), buf.len()),
    };
    let dxfer_len = u32::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "data buffer over 4 GiB"))?;
    let mut hdr = SgIoHdr {
        interface_id: i32::from(b'S'),
        dxfer_direction: direction,
        cmd_len,
        mx_sb_len: u8::try_from(SENSE_LEN).unwrap_or(u8::MAX),
        iovec_count: 0,
        dxfer_len,
        dxferp: ptr,
        cmdp: cdb.as_ptr(),
        sbp: sense.as_mut_ptr(),
        timeout: timeout_ms,
        flags: 0,
        pack_id: 0,
        usr_ptr: std::ptr::null_mut(),
        status: 0,
        masked_status: 0,
        msg_status: 0,
        sb_len_wr: 0,
        host_status: 0,
        driver_status: 0,
        resid: 0,
        duration: 0,
        info: 0,
    };
    // SAFETY: `hdr` is a valid `struct sg_io_hdr`; `cmdp` points to `cmd_len` readable bytes
    // (`cdb`), `dxferp` to `dxfer_len` bytes that are writable for FROM_DEV (a `&mut [u8]`)
    // and only read for TO_DEV, `sbp` to `mx_sb_len` writable bytes (`sense`). All of them
    // outlive the call, and SG_IO is synchronous: the kernel does not keep the pointers after
    // returning. `fd` is an open descriptor borrowed for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), SG_IO, &mut hdr as *mut SgIoHdr) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let sense_len = usize::from(hdr.sb_len_wr).min(SENSE_LEN);
    Ok(SgIoResult {
        status: hdr.status,
        host_status: hdr.host_status,
        driver_status: hdr.driver_status,
        sense: sense[..sense_len].to_vec(),
        resid: hdr.resid,
        duration_ms: hdr.duration,
    })
}

// ---- linux/pr.h -------------------------------------------------------------------------

/// `PR_FL_IGNORE_KEY`.
pub const PR_FL_IGNORE_KEY: u32 = 1;

/// `struct pr_registration`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct PrRegistration {
    pub old_key: u64,
    pub new_key: u64,
    pub flags: u32,
    pub pad: u32,
}

/// `struct pr_reservation`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct PrReservation {
    pub key: u64,
    pub pr_type: u32,
    pub flags: u32,
}

/// `struct pr_preempt`: `old_key` is the caller's key, `new_key` the victim's.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct PrPreempt {
    pub old_key: u64,
    pub new_key: u64,
    pub pr_type: u32,
    pub flags: u32,
}

/// `struct pr_clear`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct PrClear {
    pub key: u64,
    pub flags: u32,
    pub pad: u32,
}

const _: () = assert!(std::mem::size_of::<PrRegistration>() == 24);
const _: () = assert!(std::mem::size_of::<PrReservation>() == 16);
const _: () = assert!(std::mem::size_of::<PrPreempt>() == 24);
const _: () = assert!(std::mem::size_of::<PrClear>() == 16);

/// One block-layer PR request.
#[derive(Debug, Clone, Copy)]
pub enum PrIoctl {
    Register(PrRegistration),
    Reserve(PrReservation),
    Release(PrReservation),
    Preempt(PrPreempt),
    PreemptAbort(PrPreempt),
    Clear(PrClear),
}

/// `_IOW('p', nr, size)`: direction write (1) in bits 30-31, size in 16-29, type, number.
const fn ioc_pr(nr: libc::Ioctl, size: usize) -> libc::Ioctl {
    (1 << 30) | ((size as libc::Ioctl) << 16) | ((b'p' as libc::Ioctl) << 8) | nr
}
pub const IOC_PR_REGISTER: libc::Ioctl = ioc_pr(200, std::mem::size_of::<PrRegistration>());
pub const IOC_PR_RESERVE: libc::Ioctl = ioc_pr(201, std::mem::size_of::<PrReservation>());
pub const IOC_PR_RELEASE: libc::Ioctl = ioc_pr(202, std::mem::size_of::<PrReservation>());
pub const IOC_PR_PREEMPT: libc::Ioctl = ioc_pr(203, std::mem::size_of::<PrPreempt>());
pub const IOC_PR_PREEMPT_ABORT: libc::Ioctl = ioc_pr(204, std::mem::size_of::<PrPreempt>());
pub const IOC_PR_CLEAR: libc::Ioctl = ioc_pr(205, std::mem::size_of::<PrClear>());

/// Issues a block-layer PR ioctl. Returns the ioctl's non-negative return value: 0 for
/// success, otherwise a SCSI status or `PR_STS_*` code (24 = RESERVATION CONFLICT).
pub fn pr_ioctl(fd: BorrowedFd<'_>, mut request: PrIoctl) -> io::Result<i32> {
    let (number, arg): (libc::Ioctl, *mut libc::c_void) = match &mut request {
        PrIoctl::Register(a) => (IOC_PR_REGISTER, (a as *mut PrRegistration).cast()),
        PrIoctl::Reserve(a) => (IOC_PR_RESERVE, (a as *mut PrReservation).cast()),
        PrIoctl::Release(a) => (IOC_PR_RELEASE, (a as *mut PrReservation).cast()),
        PrIoctl::Preempt(a) => (IOC_PR_PREEMPT, (a as *mut PrPreempt).cast()),
        PrIoctl::PreemptAbort(a) => (IOC_PR_PREEMPT_ABORT, (a as *mut PrPreempt).cast()),
        PrIoctl::Clear(a) => (IOC_PR_CLEAR, (a as *mut PrClear).cast()),
    };
    // SAFETY: `arg` points into `request`, which lives until the end of this function, at a
    // `#[repr(C)]` struct whose size is the one encoded in `number` (each pair above is fixed
    // by the match). The kernel copies the struct in during the synchronous call and keeps no
    // reference. `fd` is an open descriptor borrowed for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), number, arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

// ---- NVMe passthrough -------------------------------------------------------------------

/// `struct nvme_passthru_cmd` (also `struct nvme_admin_cmd`).
#[repr(C)]
#[derive(Debug, Default)]
struct NvmePassthruCmd {
    opcode: u8,
    flags: u8,
    rsvd1: u16,
    nsid: u32,
    cdw2: u32,
    cdw3: u32,
    metadata: u64,
    addr: u64,
    metadata_len: u32,
    data_len: u32,
    cdw10: u32,
    cdw11: u32,
    cdw12: u32,
    cdw13: u32,
    cdw14: u32,
    cdw15: u32,
    timeout_ms: u32,
    result: u32,
}

const _: () = assert!(std::mem::size_of::<NvmePassthruCmd>() == 72);

/// `_IOWR('N', nr, struct nvme_passthru_cmd)`.
const fn ioc_nvme_rw(nr: libc::Ioctl) -> libc::Ioctl {
    (3 << 30)
        | ((std::mem::size_of::<NvmePassthruCmd>() as libc::Ioctl) << 16)
        | ((b'N' as libc::Ioctl) << 8)
        | nr
}
const NVME_IOCTL_ID: libc::Ioctl = ((b'N' as libc::Ioctl) << 8) | 0x40;
const NVME_IOCTL_ADMIN_CMD: libc::Ioctl = ioc_nvme_rw(0x41);
const NVME_IOCTL_IO_CMD: libc::Ioctl = ioc_nvme_rw(0x43);

/// An NVMe command for passthrough.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NvmeCommand {
    pub admin: bool,
    pub opcode: u8,
    pub nsid: u32,
    pub cdw10: u32,
    pub cdw11: u32,
    pub timeout_ms: u32,
}

/// The namespace id of an NVMe namespace block device (`NVME_IOCTL_ID`).
pub fn nvme_namespace_id(fd: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: NVME_IOCTL_ID takes no argument and returns the namespace id; `fd` is an open
    // descriptor borrowed for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), NVME_IOCTL_ID) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(rc).map_err(|_| io::Error::other("negative namespace id"))
}

/// Sends an NVMe command. Returns the ioctl's return value (0, or the NVMe status field as a
/// positive number) and the completion's `result` dword.
pub fn nvme_passthru(
    fd: BorrowedFd<'_>,
    command: &NvmeCommand,
    data: DataDirection<'_>,
) -> io::Result<(u32, u32)> {
    let (addr, len) = match data {
        DataDirection::None => (0u64, 0usize),
        DataDirection::ToDevice(buf) => (buf.as_ptr() as u64, buf.len()),
        DataDirection::FromDevice(buf) => (buf.as_mut_ptr() as u64, buf.len()),
    };
    let mut cmd = NvmePassthruCmd {
        opcode: command.opcode,
        nsid: command.nsid,
        addr,
        data_len: u32::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "data buffer over 4 GiB"))?,
        cdw10: command.cdw10,
        cdw11: command.cdw11,
        timeout_ms: command.timeout_ms,
        ..Default::default()
    };
    let request = if command.admin {
        NVME_IOCTL_ADMIN_CMD
    } else {
        NVME_IOCTL_IO_CMD
    };
    // SAFETY: `cmd` is a valid `struct nvme_passthru_cmd`; `addr`/`data_len` describe a
    // buffer that lives until the call returns and is writable when the controller writes to
    // it (`FromDevice` is a `&mut [u8]`). The ioctl is synchronous and maps the buffer only
    // for the duration of the call. `fd` is an open descriptor borrowed for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, &mut cmd as *mut NvmePassthruCmd) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((u32::try_from(rc).unwrap_or(0), cmd.result))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // Values from <linux/pr.h> and <linux/nvme_ioctl.h> on x86_64.
        assert_eq!(IOC_PR_REGISTER, 0x4018_70c8);
        assert_eq!(IOC_PR_RESERVE, 0x4010_70c9);
        assert_eq!(IOC_PR_RELEASE, 0x4010_70ca);
        assert_eq!(IOC_PR_PREEMPT, 0x4018_70cb);
        assert_eq!(IOC_PR_PREEMPT_ABORT, 0x4018_70cc);
        assert_eq!(IOC_PR_CLEAR, 0x4010_70cd);
        assert_eq!(NVME_IOCTL_ID, 0x4e40);
        assert_eq!(NVME_IOCTL_ADMIN_CMD, 0xc048_4e41);
        assert_eq!(NVME_IOCTL_IO_CMD, 0xc048_4e43);
    }

    #[test]
    fn sg_io_on_a_regular_file_is_an_error_not_a_crash() {
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let mut buf = [0u8; 8];
        let fd = std::os::fd::AsFd::as_fd(&file);
        let err = sg_io(
            fd,
            &[0x12, 0, 0, 0, 8, 0],
            DataDirection::FromDevice(&mut buf),
            1000,
        )
        .unwrap_err();
        assert!(
            matches!(err.raw_os_error(), Some(libc::ENOTTY | libc::EINVAL)),
            "{err}"
        );
        assert!(sg_io(fd, &[0; 3], DataDirection::None, 1000).is_err());
        assert!(pr_ioctl(fd, PrIoctl::Clear(PrClear::default())).is_err());
        assert!(nvme_namespace_id(fd).is_err());
    }
}
