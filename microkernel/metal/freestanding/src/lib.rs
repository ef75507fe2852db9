//! The C runtime's memory functions for freestanding ELF images built with the host target
//! (the metal kernel and its tasks).
//!
//! The host target's `core` calls `memcpy`, `memmove`, `memset`, `memcmp` and `bcmp` and
//! expects the C library to provide them; a `-nostdlib` image has none, and the
//! `compiler_builtins` copies are only built for targets without a C library. These use the
//! string instructions (`rep movsb`/`rep stosb`), which every x86-64 part runs fast and which
//! use no SSE register (ring-0 SSE fails on KVM-on-PVM, and tasks are built without SSE).
//! The loops of `memcmp` are plain Rust; the compiler does not turn them into calls of
//! themselves because the crate is `no_builtins`.
//!
//! `rust_eh_personality` and `_Unwind_Resume` are here too: the host target's prebuilt `core`
//! and `alloc` refer to them, and with `panic = "abort"` nothing ever calls them.
#![no_std]
#![no_builtins]

#[cfg(feature = "export")]
mod export {
    use core::arch::asm;

    /// As C's memcpy.
    ///
    /// # Safety
    /// `dest` and `src` are valid for `n` bytes and do not overlap.
    #[no_mangle]
    pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
        // SAFETY: the caller's contract; `rep movsb` copies exactly `n` bytes forwards.
        unsafe {
            asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _,
                 inout("rsi") src => _, options(nostack, preserves_flags));
        }
        dest
    }

    /// As C's memmove.
    ///
    /// # Safety
    /// `dest` and `src` are valid for `n` bytes.
    #[no_mangle]
    pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
        if (dest as usize).wrapping_sub(src as usize) >= n {
            // SAFETY: `dest` starts before `src` or after its end: a forward copy reads
            // every byte before it is overwritten.
            return unsafe { memcpy(dest, src, n) };
        }
        // SAFETY: `dest` is inside `src..src + n`: copy backwards (direction flag set for
        // the copy and cleared again, as the ABI requires), from the last byte.
        unsafe {
            asm!("std", "rep movsb", "cld", inout("rcx") n => _,
                 inout("rdi") dest.add(n).wrapping_sub(1) => _,
                 inout("rsi") src.add(n).wrapping_sub(1) => _, options(nostack));
        }
        dest
    }

    /// As C's memset.
    ///
    /// # Safety
    /// `dest` is valid for `n` bytes.
    #[no_mangle]
    pub unsafe extern "C" fn memset(dest: *mut u8, value: i32, n: usize) -> *mut u8 {
        // SAFETY: the caller's contract; `rep stosb` writes exactly `n` bytes.
        unsafe {
            asm!("rep stosb", inout("rcx") n => _, inout("rdi") dest => _,
                 in("al") value as u8, options(nostack, preserves_flags));
        }
        dest
    }

    /// As C's memcmp.
    ///
    /// # Safety
    /// `a` and `b` are valid for `n` bytes.
    #[no_mangle]
    pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
        for i in 0..n {
            // SAFETY: `i < n`, inside both buffers.
            let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
            if x != y {
                return i32::from(x) - i32::from(y);
            }
        }
        0
    }

    /// As C's bcmp (zero if equal).
    ///
    /// # Safety
    /// `a` and `b` are valid for `n` bytes.
    #[no_mangle]
    pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
        // SAFETY: the caller's contract.
        unsafe { memcmp(a, b, n) }
    }

    /// Referred to by the host target's `core`; never called with `panic = "abort"`.
    #[no_mangle]
    pub extern "C" fn rust_eh_personality() {}

    /// Referred to by the host target's prebuilt `alloc` (its landing pads); nothing unwinds
    /// with `panic = "abort"`. Were it ever reached, `ud2` stops the image (a task is
    /// stopped by the kernel; the kernel ends the run), never resuming into garbage.
    #[no_mangle]
    pub extern "C" fn _Unwind_Resume() -> ! {
        // SAFETY: `ud2` only raises #UD.
        unsafe { asm!("ud2", options(noreturn)) }
    }
}
