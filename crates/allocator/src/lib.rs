//! The gateway's global allocator: mimalloc, asked the way its fast path wants to be asked.
//!
//! The `mimalloc` crate's `MiMalloc` passes every allocation to `mi_malloc_aligned`, whatever
//! the alignment. In mimalloc v3 that call is fast only while the size class's current page has
//! a free block; when the page runs out, it does not take a fresh page of the same class but
//! falls back to over-allocation: `size + align - 1` bytes from a larger class, then aligned by
//! hand. On the gateway's cached path that was about seven calls per request through
//! `mi_theap_malloc_zero_aligned_at_overalloc` (~1,100 instructions per request under
//! callgrind), and blocks one class larger than needed.
//!
//! Every block of a size class mimalloc hands out from `mi_malloc` is aligned to 16 bytes
//! (`MI_MAX_ALIGN_SIZE`) once the size is a multiple of 16, and to 8 bytes always: the classes
//! up to 64 bytes are exact multiples of 8, the larger ones multiples of 16, and a page's first
//! block is 16-aligned. So a layout whose alignment is at most 16 and divides its non-zero size
//! (every sized Rust type's layout: a type's size is a multiple of its alignment) is served by the plain
//! `mi_malloc` family, as std's `System` serves such layouts with plain `malloc`; anything else
//! (over-aligned types, hand-made layouts) keeps the aligned calls. Debug builds check the
//! alignment of every block handed out, so the test suite checks the rule.

#![no_std]

use core::alloc::{GlobalAlloc, Layout};
use core::ffi::c_void;

use libmimalloc_sys as ffi;

/// mimalloc's guaranteed alignment for blocks from the plain calls (`MI_MAX_ALIGN_SIZE`).
const PLAIN_ALIGN: usize = 16;

/// mimalloc as the `#[global_allocator]`.
pub struct MiMalloc;

/// Whether `mi_malloc(size)` already returns a block aligned as `layout` asks.
#[inline]
fn plain(align: usize, size: usize) -> bool {
    align <= PLAIN_ALIGN && size >= align && size.is_multiple_of(align)
}

#[inline]
fn checked(ptr: *mut c_void, align: usize) -> *mut u8 {
    debug_assert!(
        (ptr as usize).is_multiple_of(align),
        "mimalloc block not aligned to {align}"
    );
    ptr.cast()
}

// SAFETY: every block comes from mimalloc and goes back to it (`mi_free` takes blocks from the
// plain and the aligned calls alike); the plain calls are used only where their alignment
// guarantee (above) covers the layout, the aligned calls otherwise.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        // SAFETY: plain C calls; mimalloc returns null on failure, as `GlobalAlloc` requires.
        let ptr = unsafe {
            if plain(align, size) {
                ffi::mi_malloc(size)
            } else {
                ffi::mi_malloc_aligned(size, align)
            }
        };
        checked(ptr, align)
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        // SAFETY: as in `alloc`.
        let ptr = unsafe {
            if plain(align, size) {
                ffi::mi_zalloc(size)
            } else {
                ffi::mi_zalloc_aligned(size, align)
            }
        };
        checked(ptr, align)
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator, so from mimalloc.
        unsafe { ffi::mi_free(ptr.cast()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let align = layout.align();
        // SAFETY: `ptr` came from this allocator with `layout`; a block from the aligned calls
        // may be grown by the plain `mi_realloc` when the new size keeps the plain guarantee,
        // since the guarantee is about the new block, not the old one.
        let ptr = unsafe {
            if plain(align, new_size) {
                ffi::mi_realloc(ptr.cast(), new_size)
            } else {
                ffi::mi_realloc_aligned(ptr.cast(), new_size, align)
            }
        };
        checked(ptr, align)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    /// Blocks of every size up to 4 KiB, at every alignment up to 4 KiB, come back aligned and
    /// writable, and grow and shrink keeping their contents, many at a time (so that pages run
    /// out and fresh ones are taken).
    #[test]
    fn every_layout_comes_back_aligned() {
        let allocator = MiMalloc;
        for align in (0..=12).map(|shift| 1usize << shift) {
            let mut held = Vec::new();
            for size in (1..=4096).step_by(7) {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: non-zero size; freed below with the same layout.
                let ptr = unsafe { allocator.alloc(layout) };
                assert!(!ptr.is_null());
                assert_eq!(ptr as usize % align, 0, "size {size}, align {align}");
                // SAFETY: `size` bytes were allocated.
                unsafe { ptr.write_bytes(0xa5, size) };
                held.push((ptr, layout));
            }
            for (ptr, layout) in held {
                let grown = layout.size() * 3 + 1;
                // SAFETY: `ptr` is live with `layout`.
                let ptr = unsafe { allocator.realloc(ptr, layout, grown) };
                assert_eq!(ptr as usize % align, 0);
                // SAFETY: the first `layout.size()` bytes were kept.
                let kept = unsafe { core::slice::from_raw_parts(ptr, layout.size()) };
                assert!(kept.iter().all(|&b| b == 0xa5));
                let layout = Layout::from_size_align(grown, align).unwrap();
                // SAFETY: `ptr` is live with the grown layout.
                unsafe { allocator.dealloc(ptr, layout) };
            }
        }
    }

    #[test]
    fn zeroed_blocks_are_zero() {
        let allocator = MiMalloc;
        for (size, align) in [(24, 8), (48, 16), (1500, 8), (4096, 64), (10_000, 16)] {
            let layout = Layout::from_size_align(size, align).unwrap();
            // SAFETY: non-zero size; freed below.
            let ptr = unsafe { allocator.alloc_zeroed(layout) };
            assert_eq!(ptr as usize % align, 0);
            // SAFETY: `size` bytes were allocated.
            let bytes = unsafe { core::slice::from_raw_parts(ptr, size) };
            assert!(bytes.iter().all(|&b| b == 0));
            // SAFETY: live with `layout`.
            unsafe { allocator.dealloc(ptr, layout) };
        }
    }
}
