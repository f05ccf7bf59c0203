//! A block's memory as its instructions see it: shared memory with racecheck and
//! initcheck state per byte, per-thread local memory, pending `cp.async` copies, and the
//! launch's global memory and parameters; plus atomics.

use super::super::alu::{mask, sext};
use super::super::fault::{Check, Fault};
use super::super::float;
use super::super::ir::*;
use super::super::lower::{LOCAL_WINDOW, PARAM_WINDOW, SHARED_WINDOW, WINDOW_SIZE};
use super::{LaunchCtx, R, fits};

pub(super) const NONE: u32 = u32::MAX;
pub(super) const MANY: u32 = u32::MAX - 1;

/// Racecheck and initcheck state of one byte of shared memory. Bytes, not words: threads
/// that write neighbouring 16-bit or 8-bit elements of one word do not race.
#[derive(Clone, Copy, Default)]
pub(super) struct Meta {
    /// Block run this entry belongs to (older entries are stale: never touched).
    pub(super) stamp: u32,
    /// Written in this block run.
    pub(super) init: bool,
    pub(super) w_tid: u32,
    pub(super) w_epoch: u32,
    pub(super) w_wep: u32,
    pub(super) w_line: u32,
    /// The reader since the last write, or MANY (then `r_warp` is their warp, or MANY
    /// when they are in several warps, and `r_wep` the latest read's warp interval).
    pub(super) r_tid: u32,
    pub(super) r_warp: u32,
    pub(super) r_epoch: u32,
    pub(super) r_wep: u32,
    pub(super) r_line: u32,
}

#[derive(Clone)]
pub(super) struct PendingCopy {
    pub(super) dst: usize,
    pub(super) len: usize,
    pub(super) data: [u8; 16],
}

#[derive(Default, Clone)]
pub(super) struct CpAsync {
    pub(super) open: Vec<PendingCopy>,
    pub(super) groups: std::collections::VecDeque<Vec<PendingCopy>>,
}

/// What instructions touch besides registers: the block's identity, its shared and local
/// memory, pending asynchronous copies, and the launch's global memory.
pub(super) struct Mem<'a> {
    pub(super) ctx: &'a LaunchCtx<'a>,
    pub(super) ctaid: [u32; 3],
    pub(super) nthreads: usize,
    pub(super) shared: Vec<u8>,
    pub(super) meta: Vec<Meta>,
    pub(super) stamp: u32,
    /// Barrier interval (racecheck).
    pub(super) epoch: u32,
    pub(super) local: Vec<u8>,
    pub(super) cp: Vec<CpAsync>,
    /// Whether this block issued any cp.async (their queues need clearing).
    pub(super) cp_used: bool,
    /// Index of the allocation the last global access hit.
    pub(super) alloc_hint: usize,
    pub(super) clock: u64,
}

impl<'a> Mem<'a> {
    pub(super) fn thread_xyz(&self, tid: usize) -> [u32; 3] {
        let [bx, by, _] = self.ctx.block;
        let (bx, by) = (bx as usize, by as usize);
        [
            (tid % bx) as u32,
            ((tid / bx) % by) as u32,
            (tid / (bx * by)) as u32,
        ]
    }

    pub(super) fn fault(&self, check: Check, tid: usize, line: u32, detail: String) -> Fault {
        Fault {
            check,
            kernel: self.ctx.kernel.name.clone(),
            block: self.ctaid,
            thread: self.thread_xyz(tid),
            line,
            text: String::new(),
            detail,
        }
    }

    /// The state space and offset of an address (generic addresses by window).
    pub(super) fn resolve(space: MemSpace, a: u64) -> (MemSpace, u64) {
        match space {
            MemSpace::Generic => {
                for (base, s) in [
                    (SHARED_WINDOW, MemSpace::Shared),
                    (LOCAL_WINDOW, MemSpace::Local),
                    (PARAM_WINDOW, MemSpace::Param),
                ] {
                    if a >= base && a < base + WINDOW_SIZE {
                        return (s, a - base);
                    }
                }
                (MemSpace::Global, a)
            }
            MemSpace::Const => (MemSpace::Global, a),
            s => (s, a),
        }
    }

    pub(super) fn shared_name(&self, off: u64) -> String {
        let k = self.ctx.kernel;
        for v in &k.shared_vars {
            if off >= v.offset as u64 && off < (v.offset + v.size) as u64 {
                return format!("`{}`+{}", v.name, off - v.offset as u64);
            }
        }
        if off >= k.shared_static as u64 {
            return format!("dynamic shared memory +{}", off - k.shared_static as u64);
        }
        format!("offset {off}")
    }

    pub(super) fn misaligned(
        &self,
        space: MemSpace,
        a: u64,
        align: u64,
        tid: usize,
        line: u32,
    ) -> R<()> {
        if !a.is_multiple_of(align) {
            return Err(self.fault(
                Check::Memcheck,
                tid,
                line,
                format!("misaligned {align}-byte {space:?} access at {a:#x}"),
            ));
        }
        Ok(())
    }

    pub(super) fn global(
        &mut self,
        a: u64,
        size: u32,
        tid: usize,
        line: u32,
        what: &str,
    ) -> R<(usize, usize)> {
        let heap = self.ctx.heap;
        let live = heap.live();
        if let Some(al) = live.get(self.alloc_hint)
            && a >= al.base
            && fits(a - al.base, size as u64, al.size)
        {
            return Ok((self.alloc_hint, (a - al.base) as usize));
        }
        match heap.find(a, size as u64) {
            Ok(i) => {
                self.alloc_hint = i;
                Ok((i, (a - heap.get(i).base) as usize))
            }
            Err(m) => Err(self.fault(
                Check::Memcheck,
                tid,
                line,
                format!("global {what}: {}", m.describe(a, size as u64)),
            )),
        }
    }

    /// Bounds, racecheck and initcheck of a shared access; the byte offset.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn shared_access(
        &mut self,
        off: u64,
        size: u32,
        write: bool,
        tid: usize,
        wep: u32,
        line: u32,
    ) -> R<usize> {
        if !fits(off, size as u64, self.shared.len()) {
            return Err(self.fault(
                Check::Memcheck,
                tid,
                line,
                format!(
                    "out-of-bounds shared {}: {size} bytes at shared offset {off:#x}; the block has {} bytes of shared memory",
                    if write { "write" } else { "read" },
                    self.shared.len()
                ),
            ));
        }
        let checks = self.ctx.checks;
        if !checks.racecheck && !checks.initcheck {
            return Ok(off as usize);
        }
        let (stamp, epoch, me) = (self.stamp, self.epoch, tid as u32);
        for b in off as usize..off as usize + size as usize {
            let m = &mut self.meta[b];
            if m.stamp != stamp {
                *m = Meta {
                    stamp,
                    w_tid: NONE,
                    r_tid: NONE,
                    ..Meta::default()
                };
            }
            let ordered = |otid: u32, oepoch: u32, owep: u32| {
                otid == me || oepoch != epoch || (otid / 32 == me / 32 && owep != wep)
            };
            let hazard = if !checks.racecheck {
                None
            } else if write {
                if m.w_tid != NONE && !ordered(m.w_tid, m.w_epoch, m.w_wep) {
                    Some(("write-after-write", m.w_tid, "writes", m.w_line))
                } else if m.r_tid == MANY
                    && m.r_epoch == epoch
                    && !(m.r_warp == me / 32 && m.r_wep != wep)
                {
                    Some(("write-after-read", NONE, "read", m.r_line))
                } else if m.r_tid != NONE
                    && m.r_tid != MANY
                    && !ordered(m.r_tid, m.r_epoch, m.r_wep)
                {
                    Some(("write-after-read", m.r_tid, "reads", m.r_line))
                } else {
                    None
                }
            } else if m.w_tid != NONE && !ordered(m.w_tid, m.w_epoch, m.w_wep) {
                Some(("read-after-write", m.w_tid, "writes", m.w_line))
            } else {
                None
            };
            if let Some((kind, other, verb, oline)) = hazard {
                let who = if other == NONE {
                    "other threads".to_string()
                } else {
                    let [x, y, z] = self.thread_xyz(other as usize);
                    format!("thread ({x},{y},{z})")
                };
                let name = self.shared_name(b as u64);
                return Err(self.fault(
                    Check::Racecheck,
                    tid,
                    line,
                    format!(
                        "shared-memory {kind} hazard on {name}: this thread {} it after {who} {verb} it at PTX line {oline}, with no barrier between them",
                        if write { "writes" } else { "reads" }
                    ),
                ));
            }
            if write {
                m.init = true;
                (m.w_tid, m.w_epoch, m.w_wep, m.w_line) = (me, epoch, wep, line);
                m.r_tid = NONE;
            } else {
                if checks.initcheck && !m.init {
                    let name = self.shared_name(b as u64);
                    return Err(self.fault(
                        Check::Initcheck,
                        tid,
                        line,
                        format!(
                            "read of never-written shared memory: {name} (shared offset {b:#x})"
                        ),
                    ));
                }
                // Earlier reads in another barrier interval, or by this warp before its last
                // bar.warp.sync, conflict with no write this read does not conflict with.
                let earlier = m.r_epoch != epoch || (m.r_warp == me / 32 && m.r_wep != wep);
                if m.r_tid == NONE || earlier {
                    (m.r_tid, m.r_warp, m.r_epoch, m.r_wep, m.r_line) =
                        (me, me / 32, epoch, wep, line);
                } else if m.r_tid != me {
                    m.r_tid = MANY;
                    if m.r_warp != me / 32 {
                        m.r_warp = MANY;
                    }
                    m.r_line = line;
                }
            }
        }
        Ok(off as usize)
    }

    /// Load `size` (<= 8) bytes; `a` is already resolved to `space`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn load(
        &mut self,
        space: MemSpace,
        a: u64,
        size: u32,
        tid: usize,
        wep: u32,
        line: u32,
    ) -> R<u64> {
        match space {
            MemSpace::Global | MemSpace::Const | MemSpace::Generic => {
                let (i, off) = self.global(a, size, tid, line, "read")?;
                let al = self.ctx.heap.get(i);
                if self.ctx.checks.initcheck
                    && let Some(b) = al.first_uninit(off, size as usize)
                {
                    return Err(self.fault(
                        Check::Initcheck,
                        tid,
                        line,
                        format!(
                            "read of never-written global memory: byte {b} of {}",
                            al.describe()
                        ),
                    ));
                }
                Ok(al.load(off, size))
            }
            MemSpace::Shared => {
                let off = self.shared_access(a, size, false, tid, wep, line)?;
                let mut b = [0u8; 8];
                b[..size as usize].copy_from_slice(&self.shared[off..off + size as usize]);
                Ok(u64::from_le_bytes(b))
            }
            MemSpace::Local => {
                let lb = self.ctx.kernel.local_bytes as u64;
                if !fits(a, size as u64, lb as usize) {
                    return Err(self.fault(
                        Check::Memcheck,
                        tid,
                        line,
                        format!(
                            "out-of-bounds local read: {size} bytes at local offset {a:#x} of {lb}"
                        ),
                    ));
                }
                let o = tid * lb as usize + a as usize;
                let mut b = [0u8; 8];
                b[..size as usize].copy_from_slice(&self.local[o..o + size as usize]);
                Ok(u64::from_le_bytes(b))
            }
            MemSpace::Param => {
                let p = self.ctx.params;
                if !fits(a, size as u64, p.len()) {
                    return Err(self.fault(
                        Check::Memcheck,
                        tid,
                        line,
                        format!(
                            "out-of-bounds parameter read: {size} bytes at offset {a} of {}",
                            p.len()
                        ),
                    ));
                }
                let mut b = [0u8; 8];
                b[..size as usize].copy_from_slice(&p[a as usize..a as usize + size as usize]);
                Ok(u64::from_le_bytes(b))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn store(
        &mut self,
        space: MemSpace,
        a: u64,
        size: u32,
        v: u64,
        tid: usize,
        wep: u32,
        line: u32,
    ) -> R<()> {
        match space {
            MemSpace::Global | MemSpace::Const | MemSpace::Generic => {
                let (i, off) = self.global(a, size, tid, line, "write")?;
                self.ctx.heap.get(i).store(off, size, v);
                Ok(())
            }
            MemSpace::Shared => {
                let off = self.shared_access(a, size, true, tid, wep, line)?;
                self.shared[off..off + size as usize]
                    .copy_from_slice(&v.to_le_bytes()[..size as usize]);
                Ok(())
            }
            MemSpace::Local => {
                let lb = self.ctx.kernel.local_bytes as u64;
                if !fits(a, size as u64, lb as usize) {
                    return Err(self.fault(
                        Check::Memcheck,
                        tid,
                        line,
                        format!(
                            "out-of-bounds local write: {size} bytes at local offset {a:#x} of {lb}"
                        ),
                    ));
                }
                let o = tid * lb as usize + a as usize;
                self.local[o..o + size as usize].copy_from_slice(&v.to_le_bytes()[..size as usize]);
                Ok(())
            }
            MemSpace::Param => Err(self.fault(
                Check::Memcheck,
                tid,
                line,
                "write to kernel parameter memory".into(),
            )),
        }
    }

    /// `atom`/`red`: the old value.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn atomic(
        &mut self,
        space: MemSpace,
        a: u64,
        op: AtomOp,
        ty: Ty,
        b: u64,
        c: u64,
        tid: usize,
        line: u32,
    ) -> R<u64> {
        let size = ty.bytes();
        let (space, a) = Self::resolve(space, a);
        self.misaligned(space, a, size as u64, tid, line)?;
        // atom.add.f32 on global memory flushes subnormals (PTX ISA, atom)
        let ftz = space == MemSpace::Global;
        let f = move |old: u64| atom_apply(op, ty, old, b, c, ftz);
        match space {
            MemSpace::Global => {
                let (i, off) = self.global(a, size, tid, line, "atomic")?;
                let al = self.ctx.heap.get(i);
                if self.ctx.checks.initcheck && al.first_uninit(off, size as usize).is_some() {
                    return Err(self.fault(
                        Check::Initcheck,
                        tid,
                        line,
                        format!("atomic on never-written global memory in {}", al.describe()),
                    ));
                }
                let old = if size == 4 {
                    al.atomic32(off)
                        .fetch_update(
                            std::sync::atomic::Ordering::Relaxed,
                            std::sync::atomic::Ordering::Relaxed,
                            |o| Some(f(o as u64) as u32),
                        )
                        .unwrap_or(0) as u64
                } else {
                    al.atomic64(off)
                        .fetch_update(
                            std::sync::atomic::Ordering::Relaxed,
                            std::sync::atomic::Ordering::Relaxed,
                            |o| Some(f(o)),
                        )
                        .unwrap_or(0)
                };
                Ok(old)
            }
            MemSpace::Shared => {
                if !fits(a, size as u64, self.shared.len()) {
                    return Err(self.fault(
                        Check::Memcheck,
                        tid,
                        line,
                        format!(
                            "out-of-bounds shared atomic: {size} bytes at shared offset {a:#x}; the block has {} bytes of shared memory",
                            self.shared.len()
                        ),
                    ));
                }
                let o = a as usize;
                let stamp = self.stamp;
                if self.ctx.checks.initcheck
                    && let Some(b) = (o..o + size as usize)
                        .find(|&b| self.meta[b].stamp != stamp || !self.meta[b].init)
                {
                    let name = self.shared_name(b as u64);
                    return Err(self.fault(
                        Check::Initcheck,
                        tid,
                        line,
                        format!(
                            "atomic on never-written shared memory: {name} (shared offset {b:#x})"
                        ),
                    ));
                }
                let mut bytes = [0u8; 8];
                bytes[..size as usize].copy_from_slice(&self.shared[o..o + size as usize]);
                let old = u64::from_le_bytes(bytes);
                let new = atom_apply(op, ty, old, b, c, false);
                self.shared[o..o + size as usize]
                    .copy_from_slice(&new.to_le_bytes()[..size as usize]);
                // Written (initcheck); racecheck does not track atomics, which never race
                // with one another.
                for m in &mut self.meta[o..o + size as usize] {
                    if m.stamp != stamp {
                        *m = Meta {
                            stamp,
                            w_tid: NONE,
                            r_tid: NONE,
                            ..Meta::default()
                        };
                    }
                    m.init = true;
                }
                Ok(old)
            }
            _ => Err(self.fault(
                Check::Memcheck,
                tid,
                line,
                format!("atomic on {space:?} memory at {a:#x}"),
            )),
        }
    }
}

fn atom_apply(op: AtomOp, ty: Ty, old: u64, b: u64, c: u64, ftz: bool) -> u64 {
    let bits = ty.bits();
    let m = mask(bits);
    let signed = ty.signed();
    let cmp = |x: u64, y: u64| -> std::cmp::Ordering {
        if signed {
            sext(x, bits).cmp(&sext(y, bits))
        } else {
            (x & m).cmp(&(y & m))
        }
    };
    match op {
        AtomOp::Add => match ty {
            Ty::F32 => {
                let (x, y) = (f32::from_bits(old as u32), f32::from_bits(b as u32));
                let r = if ftz {
                    float::ftz32(float::ftz32(x) + float::ftz32(y))
                } else {
                    x + y
                };
                r.to_bits() as u64
            }
            Ty::F64 => (f64::from_bits(old) + f64::from_bits(b)).to_bits(),
            _ => old.wrapping_add(b) & m,
        },
        AtomOp::Min => {
            if cmp(old, b).is_le() {
                old
            } else {
                b & m
            }
        }
        AtomOp::Max => {
            if cmp(old, b).is_ge() {
                old
            } else {
                b & m
            }
        }
        AtomOp::Inc => {
            if (old & m) >= (b & m) {
                0
            } else {
                (old + 1) & m
            }
        }
        AtomOp::Dec => {
            if old & m == 0 || (old & m) > (b & m) {
                b & m
            } else {
                (old - 1) & m
            }
        }
        AtomOp::And => old & b & m,
        AtomOp::Or => (old | b) & m,
        AtomOp::Xor => (old ^ b) & m,
        AtomOp::Exch => b & m,
        AtomOp::Cas => {
            if old & m == b & m {
                c & m
            } else {
                old
            }
        }
    }
}
