//! Reading a whole hash map in a few system calls (`BPF_MAP_LOOKUP_BATCH`, Linux 5.6+), which aya
//! does not offer: the flow table walk reads every entry every few seconds, and one `get_next_key`
//! plus one lookup per entry cost the daemon more than judging the flows did. Kernels without
//! batch operations make the caller fall back to the per-entry walk.

use std::io;
use std::os::fd::{AsRawFd as _, BorrowedFd};

/// `BPF_MAP_LOOKUP_BATCH` from `enum bpf_cmd` (uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` member of `union bpf_attr` (uapi/linux/bpf.h), all the command reads.
#[repr(C, align(8))]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Why a batch read stopped early.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The kernel has no batch operations for this map type (older than 5.6).
    #[error("batch lookups unsupported: {0}")]
    Unsupported(#[source] io::Error),
    #[error("batch lookup: {0}")]
    Failed(#[source] io::Error),
}

/// Entries per system call: 4096 flow table entries are ~450 KiB of buffers.
const CHUNK: usize = 4096;

/// Calls `each` for every entry of the hash map `fd` (keys `K`, values `V`, both plain data
/// matching the map's sizes), reading `CHUNK` entries per system call. Entries inserted or
/// deleted during the read may or may not be seen, as with any walk of a live map. Returns the
/// number of entries read.
///
/// # Errors
/// [`BatchError::Unsupported`] before any entry was read on kernels without batch operations;
/// otherwise the failing call's error.
pub fn for_each<K: aya::Pod, V: aya::Pod>(
    fd: BorrowedFd<'_>,
    mut each: impl FnMut(&K, &V),
) -> Result<usize, BatchError> {
    let mut keys: Vec<K> = Vec::with_capacity(CHUNK);
    let mut values: Vec<V> = Vec::with_capacity(CHUNK);
    let mut chunk = CHUNK;
    // Hash maps resume from a bucket index: a u32 (8 bytes given, to be safe).
    let mut position = 0u64;
    let mut started = false;
    let mut total = 0;
    loop {
        let mut next = 0u64;
        let mut attr = BatchAttr {
            in_batch: if started {
                std::ptr::from_mut(&mut position) as u64
            } else {
                0
            },
            out_batch: std::ptr::from_mut(&mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: u32::try_from(chunk).unwrap_or(u32::MAX),
            map_fd: u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX),
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `attr` is a valid `bpf_attr` prefix for this command; the key and value
        // buffers have room for `count` entries of the map's sizes (K and V are those sizes),
        // and the batch positions point at live u64s. The kernel writes only within them.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                std::ptr::from_mut(&mut attr),
                size_of::<BatchAttr>(),
            )
        };
        let error = (rc < 0).then(io::Error::last_os_error);
        let errno = error.as_ref().and_then(io::Error::raw_os_error);
        match errno {
            // A bucket holds more entries than the buffers: make them bigger and read it again.
            Some(libc::ENOSPC) if chunk < 16 * CHUNK => {
                chunk *= 2;
                keys.reserve(chunk);
                values.reserve(chunk);
                continue;
            }
            Some(libc::EINVAL | libc::ENOTSUP | libc::EOPNOTSUPP) if !started => {
                return Err(BatchError::Unsupported(
                    error.unwrap_or_else(io::Error::last_os_error),
                ));
            }
            None | Some(libc::ENOENT) => {}
            Some(_) => {
                return Err(BatchError::Failed(
                    error.unwrap_or_else(io::Error::last_os_error),
                ));
            }
        }
        // The kernel filled `count` entries (also on ENOENT, which ends the map).
        let filled = (attr.count as usize).min(chunk);
        // SAFETY: the kernel initialised the first `filled` keys and values, which are plain
        // data valid for any bytes.
        unsafe {
            keys.set_len(filled);
            values.set_len(filled);
        }
        for (key, value) in keys.iter().zip(values.iter()) {
            each(key, value);
        }
        total += filled;
        keys.clear();
        values.clear();
        if errno == Some(libc::ENOENT) {
            return Ok(total);
        }
        position = next;
        started = true;
    }
}
