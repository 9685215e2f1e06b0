//! What the C++ shims in `shim/` share: the message of this thread's last failure
//! (`guarded.hpp`), and the buffers they hand out.

#![allow(unsafe_code)] // FFI to the shims

use std::ffi::{c_char, CStr};

unsafe extern "C" {
    fn rlhf_shim_error() -> *const c_char;
    fn rlhf_shim_free(buffer: *mut u8);
}

/// The message of this thread's last shim failure, without the C++ backtrace c10's
/// errors carry after it.
pub fn last_error() -> String {
    // SAFETY: the shims return a pointer to a thread-local, NUL-terminated string that
    // lives until the next failure on this thread; it is copied at once.
    let text = unsafe { CStr::from_ptr(rlhf_shim_error()) }.to_string_lossy();
    let message = text
        .split("\nException raised from")
        .next()
        .unwrap_or_default();
    message.trim_end().to_string()
}

/// Copies out and frees a buffer a shim allocated (`malloc`) and filled with `len` bytes.
///
/// # Safety
/// `buffer` must come from a shim that reported success and wrote `len` bytes to it.
pub unsafe fn take_buffer(buffer: *mut u8, len: usize) -> Vec<u8> {
    // SAFETY: per the contract above.
    unsafe {
        let value = std::slice::from_raw_parts(buffer, len).to_vec();
        rlhf_shim_free(buffer);
        value
    }
}
