//! Global memory of the simulated device: allocations at 256-byte aligned addresses with
//! unmapped gaps between them (so an overrun lands in no allocation and is reported),
//! never reused after a free (so a use after free is recognised), and a per-byte record
//! of which bytes were ever written (initcheck).
//!
//! Blocks run on several host threads at once, so every access to device memory is an
//! atomic of exactly the access's width (relaxed ordering compiles to plain moves on
//! x86-64 and AArch64): threads of different blocks may touch neighbouring bytes of one
//! word without a data race in the Rust sense.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, AtomicU32, AtomicU64, Ordering::Relaxed};

/// First address handed out: where a real driver's heap might sit, far from the generic
/// windows of shared, local and parameter memory.
const HEAP_BASE: u64 = 0x0000_7f00_0000_0000;
/// Unmapped bytes after every allocation.
const GAP: u64 = 1 << 16;
/// Freed allocations remembered for use-after-free reports.
const FREED_KEPT: usize = 4096;

pub struct Alloc {
    pub id: u64,
    pub base: u64,
    pub size: usize,
    data: Box<[AtomicU64]>,
    /// One bit per byte: written since allocation (by a copy, a memset or a kernel).
    init: Box<[AtomicU64]>,
    all_init: AtomicBool,
}

fn zeroed_atomics(n: usize) -> Box<[AtomicU64]> {
    // SAFETY: an all-zero bit pattern is a valid AtomicU64.
    unsafe { Box::<[AtomicU64]>::new_zeroed_slice(n).assume_init() }
}

impl Alloc {
    fn new(id: u64, base: u64, size: usize, zeroed: bool) -> Self {
        let a = Alloc {
            id,
            base,
            size,
            data: zeroed_atomics(size.div_ceil(8)),
            init: zeroed_atomics(size.div_ceil(64)),
            all_init: AtomicBool::new(false),
        };
        if zeroed {
            a.mark_init(0, size);
        }
        a
    }

    fn byte_ptr(&self, off: usize) -> *mut u8 {
        debug_assert!(off < self.data.len() * 8);
        // SAFETY: `off` is within the allocation (checked by callers); atomics allow
        // shared mutation.
        unsafe { (self.data.as_ptr() as *mut u8).add(off) }
    }

    /// Load `size` (1, 2, 4 or 8) bytes at `off`, which is a multiple of `size`.
    #[inline]
    pub fn load(&self, off: usize, size: u32) -> u64 {
        let p = self.byte_ptr(off);
        // SAFETY: in bounds and naturally aligned (the allocation storage is 8-aligned
        // and callers check `off % size == 0`).
        unsafe {
            match size {
                1 => AtomicU8::from_ptr(p).load(Relaxed) as u64,
                2 => AtomicU16::from_ptr(p as *mut u16).load(Relaxed) as u64,
                4 => AtomicU32::from_ptr(p as *mut u32).load(Relaxed) as u64,
                _ => AtomicU64::from_ptr(p as *mut u64).load(Relaxed),
            }
        }
    }

    #[inline]
    pub fn store(&self, off: usize, size: u32, v: u64) {
        let p = self.byte_ptr(off);
        // SAFETY: as `load`.
        unsafe {
            match size {
                1 => AtomicU8::from_ptr(p).store(v as u8, Relaxed),
                2 => AtomicU16::from_ptr(p as *mut u16).store(v as u16, Relaxed),
                4 => AtomicU32::from_ptr(p as *mut u32).store(v as u32, Relaxed),
                _ => AtomicU64::from_ptr(p as *mut u64).store(v, Relaxed),
            }
        }
        if !self.all_init.load(Relaxed) {
            self.mark_init(off, size as usize);
        }
    }

    /// The 32-bit word at `off` as an atomic (atom/red on global memory).
    pub fn atomic32(&self, off: usize) -> &AtomicU32 {
        // SAFETY: in bounds and 4-aligned (checked by callers).
        unsafe { AtomicU32::from_ptr(self.byte_ptr(off) as *mut u32) }
    }

    pub fn atomic64(&self, off: usize) -> &AtomicU64 {
        // SAFETY: in bounds and 8-aligned (checked by callers).
        unsafe { AtomicU64::from_ptr(self.byte_ptr(off) as *mut u64) }
    }

    pub fn mark_init(&self, off: usize, len: usize) {
        let mut i = off;
        let end = off + len;
        while i < end {
            let word = i / 64;
            let lo = i % 64;
            let hi = (end - word * 64).min(64);
            let bits = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            if self.init[word].load(Relaxed) & bits != bits {
                self.init[word].fetch_or(bits, Relaxed);
            }
            i = word * 64 + hi;
        }
        if off == 0 && len >= self.size {
            self.all_init.store(true, Relaxed);
        }
    }

    /// The first never-written byte in `[off, off + len)`, if any.
    pub fn first_uninit(&self, off: usize, len: usize) -> Option<usize> {
        if self.all_init.load(Relaxed) {
            return None;
        }
        (off..off + len).find(|&i| self.init[i / 64].load(Relaxed) & (1 << (i % 64)) == 0)
    }

    /// After a kernel: remember when every byte has been written, so that later reads
    /// skip the per-byte check.
    pub fn refresh_all_init(&self) {
        if self.all_init.load(Relaxed) {
            return;
        }
        let full = self.size / 64;
        let rest = self.size % 64;
        let done = self.init[..full]
            .iter()
            .all(|w| w.load(Relaxed) == u64::MAX)
            && (rest == 0 || self.init[full].load(Relaxed) == (1u64 << rest) - 1);
        if done {
            self.all_init.store(true, Relaxed);
        }
    }

    pub fn read(&self, off: usize, out: &mut [u8]) {
        // 8 bytes at a time where aligned: operands of the cuBLAS twin and host copies.
        let mut i = 0;
        while i < out.len() {
            let a = off + i;
            if a.is_multiple_of(8) && out.len() - i >= 8 {
                out[i..i + 8].copy_from_slice(&self.load(a, 8).to_le_bytes());
                i += 8;
            } else {
                out[i] = self.load(a, 1) as u8;
                i += 1;
            }
        }
    }

    pub fn write(&self, off: usize, src: &[u8]) {
        // 8 bytes at a time where aligned: host copies of model weights are large.
        let mut i = 0;
        while i < src.len() {
            let a = off + i;
            if a.is_multiple_of(8) && src.len() - i >= 8 {
                let mut w = [0u8; 8];
                w.copy_from_slice(&src[i..i + 8]);
                self.store(a, 8, u64::from_le_bytes(w));
                i += 8;
            } else {
                self.store(a, 1, src[i] as u64);
                i += 1;
            }
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "allocation #{} ({} bytes at {:#x})",
            self.id, self.size, self.base
        )
    }
}

/// Why an address range is not accessible.
#[derive(Debug, Clone)]
pub enum Miss {
    /// Inside an allocation that was freed.
    Freed { id: u64, base: u64, size: usize },
    /// In no allocation; the nearest one below, if any (`id`, `base`, `size`).
    Unmapped { below: Option<(u64, u64, usize)> },
}

impl Miss {
    pub fn describe(&self, addr: u64, len: u64) -> String {
        match self {
            Miss::Freed { id, base, size } => format!(
                "{len} bytes at {addr:#x} lie in allocation #{id} ({size} bytes at {base:#x}), which was freed (use after free)"
            ),
            Miss::Unmapped {
                below: Some((id, base, size)),
            } if addr - base < *size as u64 + GAP => {
                let end = base + *size as u64;
                if addr >= end {
                    format!(
                        "{len} bytes at {addr:#x} are {} bytes past the end of allocation #{id} ({size} bytes at {base:#x})",
                        addr - end
                    )
                } else {
                    format!(
                        "{len} bytes at {addr:#x} run {} bytes past the end of allocation #{id} ({size} bytes at {base:#x})",
                        addr + len - end
                    )
                }
            }
            Miss::Unmapped { .. } => {
                format!("{len} bytes at {addr:#x} are in no allocation")
            }
        }
    }
}

pub struct Heap {
    /// Live allocations, sorted by base address (addresses only grow).
    live: Vec<Arc<Alloc>>,
    freed: std::collections::VecDeque<(u64, u64, usize)>,
    next: u64,
    next_id: u64,
    bytes: usize,
    limit: usize,
}

impl Heap {
    pub fn new(limit: usize) -> Self {
        Heap {
            live: Vec::new(),
            freed: Default::default(),
            next: HEAP_BASE,
            next_id: 1,
            bytes: 0,
            limit,
        }
    }

    pub fn bytes_in_use(&self) -> usize {
        self.bytes
    }

    /// A new allocation of `size` bytes (zero-filled and counted as written when `zeroed`).
    pub fn alloc(&mut self, size: usize, zeroed: bool) -> Option<u64> {
        if self.bytes + size > self.limit {
            return None;
        }
        let base = self.next;
        self.next = (base + size as u64 + GAP).div_ceil(256) * 256;
        let id = self.next_id;
        self.next_id += 1;
        self.bytes += size;
        self.live.push(Arc::new(Alloc::new(id, base, size, zeroed)));
        Some(base)
    }

    /// Free the allocation starting at `base`; false when there is none.
    pub fn free(&mut self, base: u64) -> bool {
        match self.live.binary_search_by_key(&base, |a| a.base) {
            Ok(i) => {
                let a = self.live.remove(i);
                self.bytes -= a.size;
                if self.freed.len() == FREED_KEPT {
                    self.freed.pop_front();
                }
                self.freed.push_back((a.id, a.base, a.size));
                true
            }
            Err(_) => false,
        }
    }

    /// The index of the live allocation holding `[addr, addr + len)`.
    #[inline]
    pub fn find(&self, addr: u64, len: u64) -> Result<usize, Miss> {
        let i = self.live.partition_point(|a| a.base <= addr);
        if i > 0 {
            let a = &self.live[i - 1];
            // `addr >= a.base` here; compare offsets, so an address near the top of the
            // 64-bit space cannot wrap around into the allocation.
            if (addr - a.base)
                .checked_add(len)
                .is_some_and(|end| end <= a.size as u64)
            {
                return Ok(i - 1);
            }
        }
        Err(self.miss(addr, i))
    }

    fn miss(&self, addr: u64, i: usize) -> Miss {
        if let Some(&(id, base, size)) = self
            .freed
            .iter()
            .find(|(_, b, s)| addr >= *b && addr - b < *s as u64)
        {
            return Miss::Freed { id, base, size };
        }
        // the nearest allocation below, live or freed
        let live = (i > 0).then(|| {
            let a = &self.live[i - 1];
            (a.id, a.base, a.size)
        });
        let freed = self
            .freed
            .iter()
            .filter(|(_, b, _)| *b <= addr)
            .max_by_key(|(_, b, _)| *b)
            .copied();
        let below = match (live, freed) {
            (Some(l), Some(f)) => Some(if l.1 >= f.1 { l } else { f }),
            (l, f) => l.or(f),
        };
        Miss::Unmapped { below }
    }

    #[inline]
    pub fn get(&self, i: usize) -> &Alloc {
        &self.live[i]
    }

    pub fn live(&self) -> &[Arc<Alloc>] {
        &self.live
    }

    /// The allocation and offset of a host copy's device range, or why not.
    pub fn range(&self, addr: u64, len: usize) -> Result<(&Alloc, usize), String> {
        match self.find(addr, len.max(1) as u64) {
            Ok(i) => {
                let a = &self.live[i];
                Ok((a, (addr - a.base) as usize))
            }
            Err(m) => Err(m.describe(addr, len as u64)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overruns_and_use_after_free_are_told_apart() {
        let mut h = Heap::new(1 << 20);
        let a = h.alloc(100, true).unwrap();
        let b = h.alloc(64, false).unwrap();
        assert!(b >= a + 100 + GAP);
        assert!(h.find(a + 96, 4).is_ok());
        let m = h.find(a + 98, 4).unwrap_err();
        assert!(
            m.describe(a + 98, 4)
                .contains("run 2 bytes past the end of allocation #1")
        );
        let m = h.find(a + 100, 4).unwrap_err();
        assert!(m.describe(a + 100, 4).contains("0 bytes past the end"));
        assert!(h.free(a));
        let m = h.find(a + 8, 4).unwrap_err();
        assert!(m.describe(a + 8, 4).contains("freed"));
        // initcheck bookkeeping
        let i = h.find(b, 64).unwrap();
        let al = h.get(i);
        assert_eq!(al.first_uninit(0, 64), Some(0));
        al.store(8, 4, 7);
        assert_eq!(al.first_uninit(8, 4), None);
        assert_eq!(al.first_uninit(8, 5), Some(12));
        al.write(0, &[1u8; 64]);
        al.refresh_all_init();
        assert_eq!(al.first_uninit(0, 64), None);
        assert_eq!(al.load(8, 4), 0x0101_0101);
        assert!(h.alloc(1 << 21, true).is_none());
    }
}
