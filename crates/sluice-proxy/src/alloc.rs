//! The binary's global allocator: mimalloc, called the way its C API is fastest.
//!
//! glibc's allocator showed as ~14% of Sluice's CPU under load (perf, cpu-clock); requests
//! allocate and free many small buffers across threads, which mimalloc handles better. Built
//! with `no_thp`: transparent huge pages on its arenas added ~10 MB to the resident size at a
//! thousand open streams (67 MB against 57 MB), for no throughput measurable on the load bench.
//!
//! Why not the `mimalloc` crate's `MiMalloc`: it passes every request to `mi_malloc_aligned`,
//! whose fast path covers blocks up to 1 KiB only; larger ones (Pingora's request buffer, the
//! request body, the shaped body, the upstream head: ~11 per request) take mimalloc's generic
//! aligned path, and growing a buffer takes `mi_realloc_aligned`. Callgrind over 5,000
//! requests put `mi_malloc_aligned` at 6.5 % of Sluice's user-space instructions. A layout
//! that asks for no more than a machine word of alignment needs none of that: every mimalloc
//! block is a whole number of words from a page start aligned to at least 16 bytes, so plain
//! `mi_malloc`, `mi_zalloc` and `mi_realloc` return word-aligned memory. Larger alignments
//! keep the aligned calls. (Not 16: mimalloc's 24- and 40-byte size classes are only
//! 8-aligned, so `Layout { size: 24, align: 16 }` must not take the plain path.)

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment every mimalloc block has, whatever its size.
const WORD: usize = std::mem::size_of::<usize>();

/// mimalloc as the global allocator.
pub struct Mimalloc;

// SAFETY: each method forwards to the mimalloc call with the same contract as `GlobalAlloc`'s
// (null on failure, memory valid for `size` bytes, `mi_free`/`mi_realloc*` accept any block
// from this allocator). Alignment: the plain calls are used only when `layout.align() <= WORD`,
// which every mimalloc block satisfies (see the module docs); otherwise the `_aligned` calls,
// which honour any power-of-two alignment (`Layout` guarantees a power of two).
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: plain FFI calls; see the impl's safety comment.
        unsafe {
            if layout.align() <= WORD {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: plain FFI calls; see the impl's safety comment.
        unsafe {
            if layout.align() <= WORD {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator (the caller's contract).
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout` (the caller's contract); the
        // block keeps `layout`'s alignment either way.
        unsafe {
            if layout.align() <= WORD {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size class up to 64 KiB, at alignments 1 to 4,096: the memory is aligned,
    /// writable over its whole length, keeps its bytes through a realloc, and is zeroed
    /// when asked.
    #[test]
    #[allow(unsafe_code)]
    fn blocks_are_aligned_writable_and_keep_their_bytes() {
        let a = Mimalloc;
        let mut sizes: Vec<usize> = (1..=256).collect();
        sizes.extend((9..=16).map(|p| 1usize << p));
        sizes.extend([1_000, 1_025, 1_500, 4_097, 10_000, 65_537]);
        for &size in &sizes {
            for align in [1, 2, 4, 8, 16, 32, 64, 4_096] {
                let Ok(layout) = Layout::from_size_align(size, align) else {
                    continue;
                };
                // SAFETY: non-zero size; each pointer is checked, used within its size and
                // freed once with the layout it was allocated with.
                unsafe {
                    let p = a.alloc_zeroed(layout);
                    assert!(!p.is_null(), "{size} bytes at {align}");
                    assert_eq!(p as usize % align, 0, "{size} bytes at {align}");
                    assert!(std::slice::from_raw_parts(p, size).iter().all(|&b| b == 0));
                    std::ptr::write_bytes(p, 0xa5, size);
                    let grown = size * 3 + 7;
                    let q = a.realloc(p, layout, grown);
                    assert!(!q.is_null());
                    assert_eq!(q as usize % align, 0, "realloc {size} → {grown} at {align}");
                    assert!(std::slice::from_raw_parts(q, size)
                        .iter()
                        .all(|&b| b == 0xa5));
                    a.dealloc(q, Layout::from_size_align_unchecked(grown, align));
                    let r = a.alloc(layout);
                    assert_eq!(r as usize % align, 0, "{size} bytes at {align}");
                    a.dealloc(r, layout);
                }
            }
        }
    }
}
