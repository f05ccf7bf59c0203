//! One thread block (CTA) of a launch: its warps, shared memory, per-thread local memory
//! and barriers, and the checks that watch them.
//!
//! Scheduling. A warp runs its lanes in lock step (one decoded instruction, a loop over
//! the active lanes). Each lane has its own program counter, as with independent thread
//! scheduling: after a divergent branch the group of lanes with the lowest program
//! counter runs first, and groups merge again when they reach the same instruction, so
//! structured code reconverges where the compiler expects. A lane waits at `bar.sync`
//! until every non-exited thread of the block is there, and at a warp collective
//! (`shfl.sync`, `vote.sync`, `bar.warp.sync`) until every lane of its member mask is;
//! `mma`/`ldmatrix`/`stmatrix` (`.aligned`) need the whole warp. Warps of a block run
//! one after another until each waits; when all wait, a barrier completes or the block
//! has deadlocked (reported).
//!
//! Racecheck: every 4-byte word of shared memory remembers its last writer and readers
//! since the last barrier; an access by another thread in the same barrier interval (and,
//! within a warp, the same `bar.warp.sync` interval) that conflicts is a hazard.

use super::alu::{self, mask, sext};
use super::fault::{Check, Checks, Fault};
use super::float;
use super::ir::*;
use super::lower::{LOCAL_WINDOW, PARAM_WINDOW, SHARED_WINDOW, WINDOW_SIZE};
use super::matrix;
use super::memory::Heap;

/// What a launch shares with all its blocks.
pub struct LaunchCtx<'a> {
    pub kernel: &'a Kernel,
    pub heap: &'a Heap,
    pub params: &'a [u8],
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub dyn_shared: usize,
    pub checks: Checks,
}

type R<T> = Result<T, Fault>;

const NONE: u32 = u32::MAX;
const MANY: u32 = u32::MAX - 1;

/// Racecheck and initcheck state of one byte of shared memory. Bytes, not words: threads
/// that write neighbouring 16-bit or 8-bit elements of one word do not race.
#[derive(Clone, Copy, Default)]
struct Meta {
    /// Block run this entry belongs to (older entries are stale: never touched).
    stamp: u32,
    /// Written in this block run.
    init: bool,
    w_tid: u32,
    w_epoch: u32,
    w_wep: u32,
    w_line: u32,
    /// The reader since the last write, or MANY (then `r_warp` is their warp, or MANY
    /// when they are in several warps, and `r_wep` the latest read's warp interval).
    r_tid: u32,
    r_warp: u32,
    r_epoch: u32,
    r_wep: u32,
    r_line: u32,
}

struct Warp {
    /// Lanes that exist (the last warp of a block may be partial).
    exists: u32,
    /// Lanes that have not exited.
    live: u32,
    /// Lanes waiting at a block barrier, and which one.
    bar_wait: u32,
    bar_id: [u8; 32],
    bar_line: [u32; 32],
    /// Lanes waiting at a warp collective (each at the instruction its `pc` names).
    coll_wait: u32,
    pc: [u32; 32],
    exit_line: [u32; 32],
    /// Incremented by `bar.warp.sync` (orders shared accesses within the warp).
    sync_epoch: u32,
    /// Lanes that executed `bar.arrive` at each barrier, until the whole warp has.
    arrive: [u32; 16],
    /// After a group yielded at this pc (spinning), the next group to run is the first
    /// one past it instead of the lowest.
    yielded: Option<u32>,
}

#[derive(Clone)]
struct PendingCopy {
    dst: usize,
    len: usize,
    data: [u8; 16],
}

#[derive(Default, Clone)]
struct CpAsync {
    open: Vec<PendingCopy>,
    groups: std::collections::VecDeque<Vec<PendingCopy>>,
}

/// What instructions touch besides registers: the block's identity, its shared and local
/// memory, pending asynchronous copies, and the launch's global memory.
struct Mem<'a> {
    ctx: &'a LaunchCtx<'a>,
    ctaid: [u32; 3],
    nthreads: usize,
    shared: Vec<u8>,
    meta: Vec<Meta>,
    stamp: u32,
    /// Barrier interval (racecheck).
    epoch: u32,
    local: Vec<u8>,
    cp: Vec<CpAsync>,
    /// Whether this block issued any cp.async (their queues need clearing).
    cp_used: bool,
    /// Index of the allocation the last global access hit.
    alloc_hint: usize,
    clock: u64,
}

pub struct Block<'a> {
    m: Mem<'a>,
    nregs: usize,
    reg_mask: Vec<u64>,
    regs: Vec<u64>,
    warps: Vec<Warp>,
    /// Threads arrived (`bar.arrive`) at each barrier with an explicit count.
    arrived: [u32; 16],
    /// Thread count each barrier waits for (`bar.sync id, count`); None: the block.
    expected: [Option<u32>; 16],
}

macro_rules! lanes {
    ($m:expr, $l:ident => $body:block) => {{
        let mut mm: u32 = $m;
        while mm != 0 {
            let $l = mm.trailing_zeros() as usize;
            mm &= mm - 1;
            $body
        }
    }};
}

#[inline(always)]
fn rd(r: &[u64], s: Src, l: usize) -> u64 {
    match s {
        Src::R(i) => r[i as usize * 32 + l],
        Src::I(v) => v,
    }
}

#[inline(always)]
fn set(r: &mut [u64], masks: &[u64], d: Reg, l: usize, v: u64) {
    r[d as usize * 32 + l] = v & masks[d as usize];
}

/// Backward branches a group of lanes takes, while other lanes of its warp are ready to
/// run, before it lets them run.
const SPIN_LIMIT: u32 = 1 << 8;
/// Instructions a warp runs, while other warps are ready to run, before it lets them.
const WARP_SLICE: u32 = 1 << 16;

/// The `.sync.aligned` matrix instructions: one instruction the whole warp executes.
fn is_aligned(op: &Op) -> bool {
    matches!(op, Op::Mma { .. } | Op::Ldmatrix { .. } | Op::Stmatrix { .. })
}

/// Whether threads at collectives `a` and `b` wait for each other: on sm_70+ a
/// `shfl.sync` (`vote.sync`, `bar.warp.sync`) waits for the members to execute *a*
/// `shfl.sync` with the same qualifiers and member mask, not the same instruction
/// (9.7.9.6, 9.7.13.9, 9.7.13.2; only sm_6x requires the same instruction).
fn same_collective(a: &Op, b: &Op) -> bool {
    match (a, b) {
        (Op::Shfl { mode: x, .. }, Op::Shfl { mode: y, .. }) => x == y,
        (Op::Vote { mode: x, .. }, Op::Vote { mode: y, .. }) => x == y,
        (Op::BarWarp { .. }, Op::BarWarp { .. }) => true,
        _ => false,
    }
}

/// Whether `len` bytes at `off` lie within a space of `size` bytes (no wrap-around).
fn fits(off: u64, len: u64, size: usize) -> bool {
    off.checked_add(len).is_some_and(|end| end <= size as u64)
}

fn lane_mask_bits(n: usize) -> u32 {
    if n >= 32 { u32::MAX } else { (1u32 << n) - 1 }
}

/// What an instruction did to the running group of lanes.
enum Step {
    /// All lanes go on to the next instruction.
    Advance,
    /// All lanes branch.
    Jump(u32),
    /// Divergence: `taken` lanes branch, the rest advance.
    Split { taken: u32, target: u32 },
    /// Some lanes left the group (exited or now waiting); the rest advance.
    Shrink(u32),
    /// A collective completed: the lanes that waited for it join the group.
    Grow(u32),
}

fn blank_warp() -> Warp {
    Warp {
        exists: 0,
        live: 0,
        bar_wait: 0,
        bar_id: [0; 32],
        bar_line: [0; 32],
        coll_wait: 0,
        pc: [0; 32],
        exit_line: [0; 32],
        sync_epoch: 0,
        arrive: [0; 16],
        yielded: None,
    }
}

impl<'a> Mem<'a> {
    fn thread_xyz(&self, tid: usize) -> [u32; 3] {
        let [bx, by, _] = self.ctx.block;
        let (bx, by) = (bx as usize, by as usize);
        [(tid % bx) as u32, ((tid / bx) % by) as u32, (tid / (bx * by)) as u32]
    }

    fn fault(&self, check: Check, tid: usize, line: u32, detail: String) -> Fault {
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
    fn resolve(space: MemSpace, a: u64) -> (MemSpace, u64) {
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

    fn shared_name(&self, off: u64) -> String {
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

    fn misaligned(&self, space: MemSpace, a: u64, align: u64, tid: usize, line: u32) -> R<()> {
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

    fn global(&mut self, a: u64, size: u32, tid: usize, line: u32, what: &str) -> R<(usize, usize)> {
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
    fn shared_access(&mut self, off: u64, size: u32, write: bool, tid: usize, wep: u32, line: u32) -> R<usize> {
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
                } else if m.r_tid == MANY && m.r_epoch == epoch && !(m.r_warp == me / 32 && m.r_wep != wep) {
                    Some(("write-after-read", NONE, "read", m.r_line))
                } else if m.r_tid != NONE && m.r_tid != MANY && !ordered(m.r_tid, m.r_epoch, m.r_wep) {
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
                        format!("read of never-written shared memory: {name} (shared offset {b:#x})"),
                    ));
                }
                // Earlier reads in another barrier interval, or by this warp before its last
                // bar.warp.sync, conflict with no write this read does not conflict with.
                let earlier = m.r_epoch != epoch || (m.r_warp == me / 32 && m.r_wep != wep);
                if m.r_tid == NONE || earlier {
                    (m.r_tid, m.r_warp, m.r_epoch, m.r_wep, m.r_line) = (me, me / 32, epoch, wep, line);
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
    fn load(&mut self, space: MemSpace, a: u64, size: u32, tid: usize, wep: u32, line: u32) -> R<u64> {
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
                        format!("out-of-bounds local read: {size} bytes at local offset {a:#x} of {lb}"),
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
                        format!("out-of-bounds parameter read: {size} bytes at offset {a} of {}", p.len()),
                    ));
                }
                let mut b = [0u8; 8];
                b[..size as usize].copy_from_slice(&p[a as usize..a as usize + size as usize]);
                Ok(u64::from_le_bytes(b))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn store(&mut self, space: MemSpace, a: u64, size: u32, v: u64, tid: usize, wep: u32, line: u32) -> R<()> {
        match space {
            MemSpace::Global | MemSpace::Const | MemSpace::Generic => {
                let (i, off) = self.global(a, size, tid, line, "write")?;
                self.ctx.heap.get(i).store(off, size, v);
                Ok(())
            }
            MemSpace::Shared => {
                let off = self.shared_access(a, size, true, tid, wep, line)?;
                self.shared[off..off + size as usize].copy_from_slice(&v.to_le_bytes()[..size as usize]);
                Ok(())
            }
            MemSpace::Local => {
                let lb = self.ctx.kernel.local_bytes as u64;
                if !fits(a, size as u64, lb as usize) {
                    return Err(self.fault(
                        Check::Memcheck,
                        tid,
                        line,
                        format!("out-of-bounds local write: {size} bytes at local offset {a:#x} of {lb}"),
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
    fn atomic(&mut self, space: MemSpace, a: u64, op: AtomOp, ty: Ty, b: u64, c: u64, tid: usize, line: u32) -> R<u64> {
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
                        .fetch_update(std::sync::atomic::Ordering::Relaxed, std::sync::atomic::Ordering::Relaxed, |o| {
                            Some(f(o as u64) as u32)
                        })
                        .unwrap_or(0) as u64
                } else {
                    al.atomic64(off)
                        .fetch_update(std::sync::atomic::Ordering::Relaxed, std::sync::atomic::Ordering::Relaxed, |o| Some(f(o)))
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
                    && let Some(b) = (o..o + size as usize).find(|&b| self.meta[b].stamp != stamp || !self.meta[b].init)
                {
                    let name = self.shared_name(b as u64);
                    return Err(self.fault(
                        Check::Initcheck,
                        tid,
                        line,
                        format!("atomic on never-written shared memory: {name} (shared offset {b:#x})"),
                    ));
                }
                let mut bytes = [0u8; 8];
                bytes[..size as usize].copy_from_slice(&self.shared[o..o + size as usize]);
                let old = u64::from_le_bytes(bytes);
                let new = atom_apply(op, ty, old, b, c, false);
                self.shared[o..o + size as usize].copy_from_slice(&new.to_le_bytes()[..size as usize]);
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

impl<'a> Block<'a> {
    pub fn new(ctx: &'a LaunchCtx<'a>) -> Self {
        let k = ctx.kernel;
        let [bx, by, bz] = ctx.block;
        let nthreads = (bx * by * bz) as usize;
        let nwarps = nthreads.div_ceil(32);
        let nregs = k.reg_bits.len();
        let shared_len = if ctx.dyn_shared == 0 {
            k.shared_static
        } else {
            k.shared_static.div_ceil(k.dyn_shared_align) * k.dyn_shared_align + ctx.dyn_shared
        };
        Block {
            m: Mem {
                ctx,
                ctaid: [0; 3],
                nthreads,
                shared: vec![0; shared_len],
                meta: vec![Meta::default(); shared_len],
                stamp: 0,
                epoch: 0,
                local: vec![0; nthreads * k.local_bytes],
                cp: vec![CpAsync::default(); nthreads],
                cp_used: false,
                alloc_hint: 0,
                clock: 0,
            },
            nregs,
            reg_mask: k.reg_bits.iter().map(|&b| mask(b as u32)).collect(),
            regs: vec![0; nwarps * nregs * 32],
            warps: (0..nwarps).map(|_| blank_warp()).collect(),
            arrived: [0; 16],
            expected: [None; 16],
        }
    }

    /// Run block `ctaid` to completion.
    pub fn run(&mut self, ctaid: [u32; 3]) -> R<()> {
        self.m.ctaid = ctaid;
        self.m.stamp = self.m.stamp.wrapping_add(1);
        self.m.epoch = 0;
        self.arrived = [0; 16];
        self.expected = [None; 16];
        self.init_warps();
        loop {
            let mut ran = false;
            for w in 0..self.warps.len() {
                let wp = &self.warps[w];
                if wp.live & !wp.bar_wait & !wp.coll_wait != 0 {
                    self.run_warp(w)?;
                    ran = true;
                }
            }
            if ran {
                continue;
            }
            if self.warps.iter().all(|w| w.live == 0) {
                return Ok(());
            }
            if self.release_collectives()? {
                continue;
            }
            self.complete_barrier()?;
        }
    }

    fn init_warps(&mut self) {
        let ctx = self.m.ctx;
        let nwarps = self.warps.len();
        let nthreads = self.m.nthreads;
        let shared_total = self.m.shared.len() as u64;
        for w in 0..nwarps {
            let exists = lane_mask_bits(nthreads - w * 32);
            let warp = &mut self.warps[w];
            *warp = blank_warp();
            warp.exists = exists;
            warp.live = exists;
            let base = w * self.nregs * 32;
            for lane in 0..32 {
                let tid = (w * 32 + lane).min(nthreads - 1);
                let [tx, ty, tz] = self.m.thread_xyz(tid);
                let lane_bit = 1u64 << lane;
                let vals: [u64; 25] = [
                    tx as u64,
                    ty as u64,
                    tz as u64,
                    ctx.block[0] as u64,
                    ctx.block[1] as u64,
                    ctx.block[2] as u64,
                    self.m.ctaid[0] as u64,
                    self.m.ctaid[1] as u64,
                    self.m.ctaid[2] as u64,
                    ctx.grid[0] as u64,
                    ctx.grid[1] as u64,
                    ctx.grid[2] as u64,
                    lane as u64,
                    w as u64,
                    nwarps as u64,
                    0,
                    1,
                    0,
                    lane_bit,
                    lane_bit - 1,
                    (lane_bit << 1) - 1,
                    0xffff_ffff & !((lane_bit << 1) - 1),
                    0xffff_ffff & !(lane_bit - 1),
                    ctx.dyn_shared as u64,
                    shared_total,
                ];
                for (i, v) in vals.iter().enumerate() {
                    self.regs[base + i * 32 + lane] = *v;
                }
            }
        }
        if self.m.cp_used {
            for c in &mut self.m.cp {
                c.open.clear();
                c.groups.clear();
            }
            self.m.cp_used = false;
        }
    }

    /// Run warp `w`'s lanes until none can run, or until it has run `WARP_SLICE`
    /// instructions while other warps could run.
    fn run_warp(&mut self, w: usize) -> R<()> {
        let ctx = self.m.ctx;
        let code = &ctx.kernel.code;
        let other_warps = self
            .warps
            .iter()
            .enumerate()
            .any(|(i, o)| i != w && o.live & !o.bar_wait & !o.coll_wait != 0);
        let mut executed = 0u32;
        loop {
            let wp = &mut self.warps[w];
            let runnable = wp.live & !wp.bar_wait & !wp.coll_wait;
            if runnable == 0 {
                return Ok(());
            }
            let mut pc = u32::MAX;
            match wp.yielded.take() {
                // the first group past the one that yielded (round robin), else the lowest
                Some(after) => {
                    let mut wrap = u32::MAX;
                    lanes!(runnable, l => {
                        let p = wp.pc[l];
                        if p > after { pc = pc.min(p) } else { wrap = wrap.min(p) }
                    });
                    if pc == u32::MAX {
                        pc = wrap;
                    }
                }
                None => lanes!(runnable, l => { pc = pc.min(wp.pc[l]); }),
            }
            let wp = &self.warps[w];
            let (mut mask, mut others) = (0u32, u32::MAX);
            lanes!(runnable, l => {
                if wp.pc[l] == pc { mask |= 1 << l } else if wp.pc[l] > pc { others = others.min(wp.pc[l]) }
            });
            // Backward branches taken while other lanes of the warp wait to run: a group
            // spinning (on a lock another lane holds) yields to them after SPIN_LIMIT, as
            // independent thread scheduling lets starvation-free code make progress.
            let mut spins = 0u32;
            let mut yield_warp = false;
            loop {
                let Some(inst) = code.get(pc as usize) else {
                    // Falling off the end of the body ends the threads, as `ret` would.
                    let wp = &mut self.warps[w];
                    wp.live &= !mask;
                    mask = 0;
                    break;
                };
                let exec = match inst.guard {
                    None => mask,
                    Some((p, neg)) => {
                        let base = w * self.nregs * 32 + p as usize * 32;
                        let mut e = 0u32;
                        lanes!(mask, l => {
                            if (self.regs[base + l] & 1 != 0) != neg { e |= 1 << l }
                        });
                        e
                    }
                };
                match self.exec(w, pc, inst, mask, exec)? {
                    Step::Advance => pc += 1,
                    Step::Jump(t) => {
                        if t <= pc && runnable != mask {
                            spins += 1;
                        }
                        pc = t;
                        if spins > SPIN_LIMIT {
                            self.warps[w].yielded = Some(pc);
                            break;
                        }
                    }
                    Step::Split { taken, target } => {
                        let wp = &mut self.warps[w];
                        lanes!(mask, l => { wp.pc[l] = if taken & (1 << l) != 0 { target } else { pc + 1 }; });
                        mask = 0;
                        break;
                    }
                    Step::Shrink(rest) => {
                        mask = rest;
                        pc += 1;
                        if mask == 0 {
                            break;
                        }
                    }
                    Step::Grow(extra) => {
                        mask |= extra;
                        pc += 1;
                        // Lanes the collective released at other instructions run again
                        // when the group reaches (or passes) them.
                        let wp = &self.warps[w];
                        let idle = wp.live & !wp.bar_wait & !wp.coll_wait & !mask;
                        others = u32::MAX;
                        lanes!(idle, l => { others = others.min(wp.pc[l]); });
                    }
                }
                if other_warps {
                    executed += 1;
                    if executed >= WARP_SLICE {
                        yield_warp = true;
                        break;
                    }
                }
                if others != u32::MAX {
                    if pc == others {
                        let wp = &self.warps[w];
                        let idle = wp.live & !wp.bar_wait & !wp.coll_wait & !mask;
                        others = u32::MAX;
                        lanes!(idle, l => {
                            if wp.pc[l] == pc { mask |= 1 << l } else { others = others.min(wp.pc[l]) }
                        });
                    } else if pc > others {
                        break;
                    }
                }
            }
            let wp = &mut self.warps[w];
            lanes!(mask, l => { wp.pc[l] = pc; });
            if yield_warp {
                return Ok(());
            }
        }
    }

    /// The lanes a collective waits for, as seen from `lane`.
    fn required(&self, inst: &Inst, regs: &[u64], lane: usize, exists: u32) -> u32 {
        match &inst.op {
            Op::Shfl { mask, .. } | Op::Vote { mask, .. } | Op::BarWarp { mask } => rd(regs, *mask, lane) as u32,
            _ => exists,
        }
    }

    /// All warps wait: complete a barrier every non-exited thread (or its count) reached,
    /// or report why none can complete.
    fn complete_barrier(&mut self) -> R<()> {
        let nthreads = self.m.nthreads;
        let live: u32 = self.warps.iter().map(|w| w.live.count_ones()).sum();
        let mut waiting = [0u32; 16];
        // Warps whose every live thread waits at the barrier: a barrier with a thread
        // count counts arrivals per warp, 32 each (9.7.13.1: a warp's arrival is marked
        // when all its non-exited threads have arrived), a partial last warp included.
        let mut warps_in = [0u32; 16];
        let mut first: [Option<(usize, u32)>; 16] = [None; 16];
        for (w, wp) in self.warps.iter().enumerate() {
            let mut at = [0u32; 16];
            lanes!(wp.bar_wait, l => {
                let id = wp.bar_id[l] as usize;
                waiting[id] += 1;
                at[id] |= 1 << l;
                first[id].get_or_insert((w * 32 + l, wp.bar_line[l]));
            });
            for (id, &lanes) in at.iter().enumerate() {
                if lanes != 0 && wp.live & !lanes == 0 {
                    warps_in[id] += 1;
                }
            }
        }
        for id in 0..16 {
            if waiting[id] == 0 {
                continue;
            }
            let (tid, line) = first[id].unwrap_or((0, 0));
            let done = match self.expected[id] {
                Some(n) => warps_in[id] * 32 + self.arrived[id] >= n,
                None => waiting[id] == live,
            };
            if !done {
                continue;
            }
            if self.expected[id].is_none() && (live as usize) < nthreads {
                let (etid, eline) = self.first_exited();
                let [x, y, z] = self.m.thread_xyz(etid);
                return Err(self.m.fault(
                    Check::Synccheck,
                    tid,
                    line,
                    format!(
                        "barrier {id} is reached by {live} of the block's {nthreads} threads: the others exited without reaching it (thread ({x},{y},{z}) exited at PTX line {eline})"
                    ),
                ));
            }
            self.arrived[id] = 0;
            self.expected[id] = None;
            self.m.epoch += 1;
            for wp in &mut self.warps {
                let mut released = 0u32;
                lanes!(wp.bar_wait, l => {
                    if wp.bar_id[l] as usize == id { released |= 1 << l; }
                });
                wp.bar_wait &= !released;
            }
            return Ok(());
        }
        // Nothing can complete: a deadlock.
        let code = &self.m.ctx.kernel.code;
        for (w, wp) in self.warps.iter().enumerate() {
            if wp.coll_wait != 0 {
                let l = wp.coll_wait.trailing_zeros() as usize;
                let inst = &code[wp.pc[l] as usize];
                let base = w * self.nregs * 32;
                let need = self.required(inst, &self.regs[base..base + self.nregs * 32], l, wp.exists) & wp.live;
                return Err(self.m.fault(
                    Check::Synccheck,
                    w * 32 + l,
                    inst.line,
                    format!(
                        "warp collective waits for lanes {:#010x} of its member mask, which never reach it",
                        need & !wp.coll_wait
                    ),
                ));
            }
        }
        let (tid, line, id) = self
            .warps
            .iter()
            .enumerate()
            .find_map(|(w, wp)| {
                (wp.bar_wait != 0).then(|| {
                    let l = wp.bar_wait.trailing_zeros() as usize;
                    (w * 32 + l, wp.bar_line[l], wp.bar_id[l] as usize)
                })
            })
            .unwrap_or((0, 0, 0));
        let others: Vec<String> = (0..16)
            .filter(|&i| waiting[i] > 0 && i != id)
            .map(|i| format!("{} at barrier {i}", waiting[i]))
            .collect();
        let want = self.expected[id].map_or_else(|| format!("all {live} live threads"), |n| format!("{n} threads"));
        Err(self.m.fault(
            Check::Synccheck,
            tid,
            line,
            format!(
                "deadlock: {} threads wait at barrier {id} for {want}{}",
                waiting[id],
                if others.is_empty() {
                    String::new()
                } else {
                    format!(", while {} wait elsewhere", others.join(", "))
                }
            ),
        ))
    }

    fn first_exited(&self) -> (usize, u32) {
        for (w, wp) in self.warps.iter().enumerate() {
            let gone = wp.exists & !wp.live;
            if gone != 0 {
                let l = gone.trailing_zeros() as usize;
                return (w * 32 + l, wp.exit_line[l]);
            }
        }
        (0, 0)
    }

    /// The waiting lanes of warp `w` that take part in the same collective as `inst`
    /// (at `pc`, with member mask `need`).
    fn partners(&self, w: usize, pc: u32, inst: &Inst, need: u32) -> u32 {
        let code = &self.m.ctx.kernel.code;
        let base = w * self.nregs * 32;
        let regs = &self.regs[base..base + self.nregs * 32];
        let wp = &self.warps[w];
        let mut group = 0u32;
        lanes!(wp.coll_wait, l => {
            let other = &code[wp.pc[l] as usize];
            let same = if is_aligned(&inst.op) {
                wp.pc[l] == pc
            } else {
                same_collective(&other.op, &inst.op) && self.required(other, regs, l, wp.exists) == need
            };
            if same { group |= 1 << l; }
        });
        group
    }

    /// Arrive at a warp collective: `Some(lanes)` (the lanes that perform it: the
    /// executing ones plus those that waited for it) when every live member has arrived,
    /// else the executing lanes wait and `None`.
    fn collective(&mut self, w: usize, pc: u32, inst: &Inst, exec: u32) -> R<Option<u32>> {
        let base = w * self.nregs * 32;
        let wp = &self.warps[w];
        let first = exec.trailing_zeros() as usize;
        let need = self.required(inst, &self.regs[base..base + self.nregs * 32], first, wp.exists);
        if exec & !need != 0 {
            let l = (exec & !need).trailing_zeros() as usize;
            return Err(self.m.fault(
                Check::Synccheck,
                w * 32 + l,
                inst.line,
                format!("lane {l} executes a warp collective whose member mask {need:#010x} excludes it"),
            ));
        }
        let group = exec | self.partners(w, pc, inst, need);
        let wp = &mut self.warps[w];
        if need & wp.live & !group == 0 {
            wp.coll_wait &= !group;
            Ok(Some(group))
        } else {
            wp.coll_wait |= exec;
            Ok(None)
        }
    }

    /// Complete the collectives whose remaining members exited (they wait only for
    /// non-exited threads); whether any did. The `.aligned` matrix instructions are left
    /// waiting: they need the whole warp.
    fn release_collectives(&mut self) -> R<bool> {
        let code = &self.m.ctx.kernel.code;
        let mut progress = false;
        for w in 0..self.warps.len() {
            let mut pending = self.warps[w].coll_wait;
            while pending != 0 {
                let l0 = pending.trailing_zeros() as usize;
                let pc = self.warps[w].pc[l0];
                let inst = &code[pc as usize];
                let base = w * self.nregs * 32;
                let need = self.required(inst, &self.regs[base..base + self.nregs * 32], l0, self.warps[w].exists);
                let group = self.partners(w, pc, inst, need);
                pending &= !group;
                let wp = &self.warps[w];
                if is_aligned(&inst.op) || need & wp.live & !group != 0 {
                    continue;
                }
                self.perform(w, group)?;
                let wp = &mut self.warps[w];
                wp.coll_wait &= !group;
                lanes!(group, l => { wp.pc[l] += 1; });
                progress = true;
            }
        }
        Ok(progress)
    }

    /// Perform the collective the `lanes` of warp `w` wait at (each at its own `pc`).
    fn perform(&mut self, w: usize, lanes: u32) -> R<()> {
        let code = &self.m.ctx.kernel.code;
        let inst = &code[self.warps[w].pc[lanes.trailing_zeros() as usize] as usize];
        match &inst.op {
            Op::BarWarp { .. } => {
                self.warps[w].sync_epoch += 1;
                Ok(())
            }
            Op::Shfl { .. } => self.shfl(w, lanes),
            Op::Vote { .. } => self.vote(w, lanes),
            _ => self.matrix(w, inst),
        }
    }

    /// Execute one instruction for the `exec` lanes of the group `mask` at `pc`.
    fn exec(&mut self, w: usize, pc: u32, inst: &Inst, mask: u32, exec: u32) -> R<Step> {
        let nregs = self.nregs;
        let base = w * nregs * 32;
        let tid0 = w * 32;
        let line = inst.line;
        let wep = self.warps[w].sync_epoch;
        macro_rules! regs {
            () => {
                &mut self.regs[base..base + nregs * 32]
            };
        }
        match &inst.op {
            Op::Nop => {}
            Op::Mov { d, a } => {
                let (r, m) = (regs!(), &self.reg_mask);
                lanes!(exec, l => { let v = rd(r, *a, l); set(r, m, *d, l, v); });
            }
            Op::Clock { d, .. } => {
                self.m.clock += 1000;
                let v = self.m.clock;
                let (r, m) = (regs!(), &self.reg_mask);
                lanes!(exec, l => { set(r, m, *d, l, v); });
            }
            Op::Pack { d, parts, bits } => {
                let (r, m) = (regs!(), &self.reg_mask);
                lanes!(exec, l => {
                    let mut v = 0u64;
                    for (i, p) in parts.iter().enumerate() {
                        v |= (rd(r, *p, l) & alu::mask(*bits)) << (i as u32 * bits);
                    }
                    set(r, m, *d, l, v);
                });
            }
            Op::Unpack { ds, a, bits } => {
                let (r, m) = (regs!(), &self.reg_mask);
                lanes!(exec, l => {
                    let v = rd(r, *a, l);
                    for (i, d) in ds.iter().enumerate() {
                        if let Some(d) = d {
                            set(r, m, *d, l, (v >> (i as u32 * bits)) & alu::mask(*bits));
                        }
                    }
                });
            }
            Op::Cvta { d, a, space, to } => {
                let window = match space {
                    MemSpace::Shared => SHARED_WINDOW,
                    MemSpace::Local => LOCAL_WINDOW,
                    MemSpace::Param => PARAM_WINDOW,
                    _ => 0,
                };
                let (r, m) = (regs!(), &self.reg_mask);
                lanes!(exec, l => {
                    let v = rd(r, *a, l);
                    let v = if *to { v.wrapping_sub(window) } else { v.wrapping_add(window) };
                    set(r, m, *d, l, v);
                });
            }
            Op::Int { op, ty, d, a, b, c, sat } => {
                let (r, m) = (regs!(), &self.reg_mask);
                match (op, ty.bits(), *sat) {
                    (IntOp::Add, 64, false) => lanes!(exec, l => {
                        let v = rd(r, *a, l).wrapping_add(rd(r, *b, l)); set(r, m, *d, l, v);
                    }),
                    (IntOp::Add, 32, false) => lanes!(exec, l => {
                        let v = (rd(r, *a, l) as u32).wrapping_add(rd(r, *b, l) as u32) as u64; set(r, m, *d, l, v);
                    }),
                    (IntOp::MulWide, 32, _) if ty.signed() => lanes!(exec, l => {
                        let v = (rd(r, *a, l) as i32 as i64).wrapping_mul(rd(r, *b, l) as i32 as i64) as u64;
                        set(r, m, *d, l, v);
                    }),
                    (IntOp::MulWide, 32, _) => lanes!(exec, l => {
                        let v = (rd(r, *a, l) as u32 as u64).wrapping_mul(rd(r, *b, l) as u32 as u64);
                        set(r, m, *d, l, v);
                    }),
                    (IntOp::Shl, 64, _) => lanes!(exec, l => {
                        let n = rd(r, *b, l);
                        let v = if n >= 64 { 0 } else { rd(r, *a, l) << n };
                        set(r, m, *d, l, v);
                    }),
                    _ => lanes!(exec, l => {
                        let v = alu::int(*op, *ty, rd(r, *a, l), rd(r, *b, l), rd(r, *c, l), *sat);
                        set(r, m, *d, l, v);
                    }),
                }
            }
            Op::IntUn { op, ty, d, a } => {
                let (r, m) = (regs!(), &self.reg_mask);
                lanes!(exec, l => { let v = alu::int_un(*op, *ty, rd(r, *a, l)); set(r, m, *d, l, v); });
            }
            Op::Bfe { ty, d, a, b, c } => {
                let (r, m) = (regs!(), &self.reg_mask);
                lanes!(exec, l => {
                    let v = alu::bfe(*ty, rd(r, *a, l), rd(r, *b, l), rd(r, *c, l)); set(r, m, *d, l, v);
                });
            }
            Op::Bfi { ty, d, f, a, b, c } => {
                let (r, m) = (regs!(), &self.reg_mask);
                lanes!(exec, l => {
                    let v = alu::bfi(*ty, rd(r, *f, l), rd(r, *a, l), rd(r, *b, l), rd(r, *c, l));
                    set(r, m, *d, l, v);
                });
            }
            Op::Prmt { d, a, b, c } => {
                let (r, m) = (regs!(), &self.reg_mask);
                lanes!(exec, l => { let v = alu::prmt(rd(r, *a, l), rd(r, *b, l), rd(r, *c, l)); set(r, m, *d, l, v); });
            }
            Op::Lop3 { d, a, b, c, lut } => {
                let (r, m) = (regs!(), &self.reg_mask);
                lanes!(exec, l => { let v = alu::lop3(rd(r, *a, l), rd(r, *b, l), rd(r, *c, l), *lut); set(r, m, *d, l, v); });
            }
            Op::Shf { left, wrap, d, a, b, c } => {
                let (r, m) = (regs!(), &self.reg_mask);
                lanes!(exec, l => {
                    let v = alu::shf(*left, *wrap, rd(r, *a, l), rd(r, *b, l), rd(r, *c, l)); set(r, m, *d, l, v);
                });
            }
            Op::Float { op, ty, rnd, ftz, sat, d, a, b, c } => {
                let (r, m) = (regs!(), &self.reg_mask);
                let plain = *ty == Ty::F32 && *rnd == Rnd::Near && !*ftz && !*sat;
                macro_rules! f32op {
                    ($e:expr) => {
                        lanes!(exec, l => {
                            let x = f32::from_bits(rd(r, *a, l) as u32);
                            let y = f32::from_bits(rd(r, *b, l) as u32);
                            let z = f32::from_bits(rd(r, *c, l) as u32);
                            let v: f32 = $e(x, y, z);
                            let v = if v.is_nan() { float::NAN32 } else { v.to_bits() };
                            set(r, m, *d, l, v as u64);
                        })
                    };
                }
                match op {
                    FloatOp::Add if plain => f32op!(|x: f32, y: f32, _: f32| x + y),
                    FloatOp::Sub if plain => f32op!(|x: f32, y: f32, _: f32| x - y),
                    FloatOp::Mul if plain => f32op!(|x: f32, y: f32, _: f32| x * y),
                    FloatOp::Fma if plain => f32op!(|x: f32, y: f32, z: f32| x.mul_add(y, z)),
                    _ => lanes!(exec, l => {
                        let v = alu::float(*op, *ty, *rnd, *ftz, *sat, rd(r, *a, l), rd(r, *b, l), rd(r, *c, l));
                        set(r, m, *d, l, v);
                    }),
                }
            }
            Op::FloatUn { op, ty, rnd, approx, ftz, d, a } => {
                let (r, m) = (regs!(), &self.reg_mask);
                lanes!(exec, l => {
                    let v = alu::float_un(*op, *ty, *rnd, *approx, *ftz, rd(r, *a, l)); set(r, m, *d, l, v);
                });
            }
            Op::Testp { kind, ty, d, a } => {
                let (r, m) = (regs!(), &self.reg_mask);
                lanes!(exec, l => { let v = alu::testp(*kind, *ty, rd(r, *a, l)); set(r, m, *d, l, v as u64); });
            }
            Op::Setp { cmp, ty, ftz, d, q, a, b, combine } => {
                let (r, m) = (regs!(), &self.reg_mask);
                lanes!(exec, l => {
                    let t = alu::compare(*cmp, *ty, *ftz, rd(r, *a, l), rd(r, *b, l));
                    let (p, nq) = match combine {
                        None => (t, !t),
                        Some((op, c, neg)) => {
                            let cv = (rd(r, *c, l) & 1 != 0) != *neg;
                            (alu::boolop(*op, t, cv), alu::boolop(*op, !t, cv))
                        }
                    };
                    set(r, m, *d, l, p as u64);
                    if let Some(q) = q {
                        set(r, m, *q, l, nq as u64);
                    }
                });
            }
            Op::Selp { d, a, b, p } => {
                let (r, m) = (regs!(), &self.reg_mask);
                lanes!(exec, l => {
                    let v = if rd(r, *p, l) & 1 != 0 { rd(r, *a, l) } else { rd(r, *b, l) };
                    set(r, m, *d, l, v);
                });
            }
            Op::Cvt { dty, sty, rnd, int_rnd, ftz, sat, relu, satfinite, d, a } => {
                let (r, m) = (regs!(), &self.reg_mask);
                let dbits = self.m.ctx.kernel.reg_bits[*d as usize] as u32;
                match (dty, sty) {
                    (Ty::S64, Ty::S32) if !*sat => lanes!(exec, l => {
                        let v = rd(r, *a, l) as u32 as i32 as i64 as u64; set(r, m, *d, l, v);
                    }),
                    (Ty::U64, Ty::U32) if !*sat => lanes!(exec, l => {
                        let v = rd(r, *a, l) & 0xffff_ffff; set(r, m, *d, l, v);
                    }),
                    // f32 -> bf16 to nearest even (every bf16 GEMM input goes through it)
                    (Ty::Bf16, Ty::F32) if *rnd == Some(Rnd::Near) && !*ftz && !*sat && !*relu && !*satfinite => {
                        lanes!(exec, l => {
                            let x = f32::from_bits(rd(r, *a, l) as u32);
                            let v = if x.is_nan() { 0x7fff } else { half::bf16::from_f32(x).to_bits() as u64 };
                            set(r, m, *d, l, v);
                        })
                    }
                    _ => lanes!(exec, l => {
                        let v = alu::cvt(*dty, *sty, *rnd, *int_rnd, *ftz, *sat, *relu, *satfinite, rd(r, *a, l), dbits);
                        set(r, m, *d, l, v);
                    }),
                }
            }
            Op::CvtPack { dty, rnd, relu, satfinite, d, a, b } => {
                let (r, m) = (regs!(), &self.reg_mask);
                let h = if *dty == Ty::Bf16x2 { Ty::Bf16 } else { Ty::F16 };
                lanes!(exec, l => {
                    let one = |x: u64| alu::cvt(h, Ty::F32, Some(*rnd), false, false, false, *relu, *satfinite, x, 16);
                    let v = (one(rd(r, *a, l)) << 16) | one(rd(r, *b, l));
                    set(r, m, *d, l, v);
                });
            }
            Op::Ld { space, ty, d, addr } => {
                let size = ty.bytes();
                let total = size as u64 * d.len() as u64;
                lanes!(exec, l => {
                    let tid = tid0 + l;
                    let a0 = addr.base.map_or(0, |b| self.regs[base + b as usize * 32 + l]).wrapping_add(addr.off as u64);
                    let (sp, a0) = Mem::resolve(*space, a0);
                    self.m.misaligned(sp, a0, total, tid, line)?;
                    for (i, dst) in d.iter().enumerate() {
                        let v = self.m.load(sp, a0 + i as u64 * size as u64, size, tid, wep, line)?;
                        let v = if ty.signed() { sext(v, ty.bits()) as u64 } else { v };
                        if let Some(dst) = dst {
                            set(&mut self.regs[base..base + nregs * 32], &self.reg_mask, *dst, l, v);
                        }
                    }
                });
            }
            Op::St { space, ty, a, addr } => {
                let size = ty.bytes();
                let total = size as u64 * a.len() as u64;
                lanes!(exec, l => {
                    let tid = tid0 + l;
                    let r = &self.regs[base..base + nregs * 32];
                    let a0 = addr.base.map_or(0, |b| r[b as usize * 32 + l]).wrapping_add(addr.off as u64);
                    let (sp, a0) = Mem::resolve(*space, a0);
                    self.m.misaligned(sp, a0, total, tid, line)?;
                    for (i, s) in a.iter().enumerate() {
                        let v = rd(&self.regs[base..base + nregs * 32], *s, l) & alu::mask(ty.bits());
                        self.m.store(sp, a0 + i as u64 * size as u64, size, v, tid, wep, line)?;
                    }
                });
            }
            Op::Atom { space, op, ty, d, addr, b, c } => {
                lanes!(exec, l => {
                    let r = &self.regs[base..base + nregs * 32];
                    let a0 = addr.base.map_or(0, |x| r[x as usize * 32 + l]).wrapping_add(addr.off as u64);
                    let (bv, cv) = (rd(r, *b, l), rd(r, *c, l));
                    let old = self.m.atomic(*space, a0, *op, *ty, bv, cv, tid0 + l, line)?;
                    if let Some(d) = d {
                        set(&mut self.regs[base..base + nregs * 32], &self.reg_mask, *d, l, old);
                    }
                });
            }
            Op::Bra { target } => {
                let not = mask & !exec;
                return Ok(if not == 0 {
                    Step::Jump(*target)
                } else if exec == 0 {
                    Step::Advance
                } else {
                    Step::Split {
                        taken: exec,
                        target: *target,
                    }
                });
            }
            Op::Exit => {
                if exec == 0 {
                    return Ok(Step::Advance);
                }
                let wp = &mut self.warps[w];
                wp.live &= !exec;
                lanes!(exec, l => {
                    wp.exit_line[l] = line;
                    if self.m.cp_used {
                        self.m.cp[tid0 + l].open.clear();
                        self.m.cp[tid0 + l].groups.clear();
                    }
                });
                return Ok(Step::Shrink(mask & !exec));
            }
            Op::Bar { id, count, arrive } => {
                if exec == 0 {
                    return Ok(Step::Advance);
                }
                let r = &self.regs[base..base + nregs * 32];
                let l0 = exec.trailing_zeros() as usize;
                let idv = rd(r, *id, l0);
                let n = count.map(|c| rd(r, c, l0) as u32);
                if idv >= 16 || n.is_some_and(|n| n == 0 || n % 32 != 0 || n as usize > self.m.nthreads.div_ceil(32) * 32) {
                    return Err(self.m.fault(
                        Check::Synccheck,
                        tid0 + l0,
                        line,
                        format!("invalid barrier {idv} with thread count {n:?} (ids 0..15, counts multiples of 32 up to the block size)"),
                    ));
                }
                let id = idv as usize;
                if let Some(n) = n {
                    if self.expected[id].is_some_and(|e| e != n) {
                        return Err(self.m.fault(
                            Check::Synccheck,
                            tid0 + l0,
                            line,
                            format!("barrier {id} is used with thread counts {} and {n} at once", self.expected[id].unwrap_or(0)),
                        ));
                    }
                    self.expected[id] = Some(n);
                }
                if *arrive {
                    if n.is_none() {
                        return Err(self.m.fault(Check::Synccheck, tid0 + l0, line, "bar.arrive needs a thread count".into()));
                    }
                    // the warp arrives (32 threads) once all its live threads have
                    let wp = &mut self.warps[w];
                    wp.arrive[id] |= exec;
                    if wp.live & !wp.arrive[id] == 0 {
                        wp.arrive[id] = 0;
                        self.arrived[id] += 32;
                    }
                    return Ok(Step::Advance);
                }
                let wp = &mut self.warps[w];
                wp.bar_wait |= exec;
                lanes!(exec, l => {
                    wp.bar_id[l] = id as u8;
                    wp.bar_line[l] = line;
                    wp.pc[l] = pc + 1;
                });
                return Ok(Step::Shrink(mask & !exec));
            }
            Op::BarWarp { .. } => {
                return self.run_collective(w, pc, inst, mask, exec);
            }
            Op::Activemask { d } => {
                let (r, m) = (regs!(), &self.reg_mask);
                lanes!(exec, l => { set(r, m, *d, l, exec as u64); });
            }
            Op::Shfl { .. } => {
                return self.run_collective(w, pc, inst, mask, exec);
            }
            Op::Vote { .. } => {
                return self.run_collective(w, pc, inst, mask, exec);
            }
            Op::Mma { .. } | Op::Ldmatrix { .. } | Op::Stmatrix { .. } => {
                let wp = &self.warps[w];
                if exec != wp.exists {
                    let l = (wp.exists & !exec).trailing_zeros() as usize;
                    let why = if wp.live & (1 << l) == 0 { "has exited" } else { "is inactive or predicated off" };
                    return Err(self.m.fault(
                        Check::Synccheck,
                        tid0 + l,
                        line,
                        format!("a .sync.aligned matrix instruction runs while lane {l} of the warp {why}"),
                    ));
                }
                return self.run_collective(w, pc, inst, mask, exec);
            }
            Op::CpAsync { size, fill, dst, src } => {
                lanes!(exec, l => {
                    let tid = tid0 + l;
                    let r = &self.regs[base..base + nregs * 32];
                    let da = dst.base.map_or(0, |x| r[x as usize * 32 + l]).wrapping_add(dst.off as u64);
                    let sa = src.base.map_or(0, |x| r[x as usize * 32 + l]).wrapping_add(src.off as u64);
                    let n = match fill {
                        CpFill::All => *size,
                        CpFill::SrcSize(s) => rd(r, *s, l) as u32,
                        CpFill::IgnoreSrc(p, neg) => {
                            if (rd(r, *p, l) & 1 != 0) != *neg { 0 } else { *size }
                        }
                    };
                    if n > *size {
                        return Err(self.m.fault(Check::Memcheck, tid, line, format!("cp.async src-size {n} exceeds cp-size {size}")));
                    }
                    let (ds, da) = Mem::resolve(MemSpace::Shared, da);
                    self.m.misaligned(ds, da, *size as u64, tid, line)?;
                    self.m.misaligned(MemSpace::Global, sa, *size as u64, tid, line)?;
                    if !fits(da, *size as u64, self.m.shared.len()) {
                        return Err(self.m.fault(
                            Check::Memcheck,
                            tid,
                            line,
                            format!("cp.async destination {size} bytes at shared offset {da:#x} beyond the block's {} bytes", self.m.shared.len()),
                        ));
                    }
                    let mut data = [0u8; 16];
                    for (i, byte) in data.iter_mut().enumerate().take(n as usize) {
                        *byte = self.m.load(MemSpace::Global, sa + i as u64, 1, tid, wep, line)? as u8;
                    }
                    self.m.cp[tid].open.push(PendingCopy { dst: da as usize, len: *size as usize, data });
                    self.m.cp_used = true;
                });
            }
            Op::CpAsyncCommit => {
                lanes!(exec, l => {
                    let c = &mut self.m.cp[tid0 + l];
                    let g = std::mem::take(&mut c.open);
                    c.groups.push_back(g);
                });
            }
            Op::CpAsyncWait { pending, all } => {
                lanes!(exec, l => {
                    let tid = tid0 + l;
                    if *all {
                        let g = std::mem::take(&mut self.m.cp[tid].open);
                        self.m.cp[tid].groups.push_back(g);
                    }
                    while self.m.cp[tid].groups.len() > *pending as usize {
                        let g = self.m.cp[tid].groups.pop_front().unwrap_or_default();
                        for c in g {
                            for (i, byte) in c.data[..c.len].iter().enumerate() {
                                self.m.store(MemSpace::Shared, (c.dst + i) as u64, 1, *byte as u64, tid, wep, line)?;
                            }
                        }
                    }
                });
            }
        }
        Ok(Step::Advance)
    }

    /// Arrive at a collective and, once every member has, perform it.
    fn run_collective(&mut self, w: usize, pc: u32, inst: &Inst, mask: u32, exec: u32) -> R<Step> {
        if exec == 0 {
            return Ok(Step::Advance);
        }
        // where the executing lanes are (each member's instruction is found by its pc)
        let wp = &mut self.warps[w];
        lanes!(exec, l => { wp.pc[l] = pc; });
        match self.collective(w, pc, inst, exec)? {
            Some(group) => {
                self.perform(w, group)?;
                // Lanes that waited here join the group; those that waited at another
                // instruction of the same collective go on from there.
                let wp = &mut self.warps[w];
                let mut here = 0u32;
                lanes!(group & !exec, l => {
                    if wp.pc[l] == pc { here |= 1 << l; } else { wp.pc[l] += 1; }
                });
                Ok(Step::Grow(here))
            }
            None => Ok(Step::Shrink(mask & !exec)),
        }
    }

    /// `shfl.sync` for `lanes`, each with the operands of its own instruction (lanes
    /// at different `shfl.sync` instructions of one mode and mask exchange together).
    fn shfl(&mut self, w: usize, lanes: u32) -> R<()> {
        let code = &self.m.ctx.kernel.code;
        let base = w * self.nregs * 32;
        let pcs = self.warps[w].pc;
        let op = |l: usize| &code[pcs[l] as usize].op;
        let r = &mut self.regs[base..base + self.nregs * 32];
        // SourceA: each member's own `a` (a non-member's register is undefined: read
        // through the reader's operand)
        let mut src = [0u64; 32];
        let mut out = [(0u64, false); 32];
        lanes!(lanes, l => {
            if let Op::Shfl { a, .. } = op(l) { src[l] = rd(r, *a, l); }
        });
        lanes!(lanes, l => {
            let Op::Shfl { mode, a, b, c, .. } = op(l) else { continue };
            let bval = (rd(r, *b, l) & 31) as i64;
            let cv = rd(r, *c, l);
            let (cval, seg) = ((cv & 31) as i64, ((cv >> 8) & 31) as i64);
            let li = l as i64;
            let max_lane = (li & seg) | (cval & !seg);
            let min_lane = li & seg;
            let (j, ok) = match mode {
                ShflMode::Up => (li - bval, li - bval >= max_lane),
                ShflMode::Down => (li + bval, li + bval <= max_lane),
                ShflMode::Bfly => (li ^ bval, (li ^ bval) <= max_lane),
                ShflMode::Idx => {
                    let j = min_lane | (bval & !seg);
                    (j, j <= max_lane)
                }
            };
            let j = if ok { j as usize } else { l };
            out[l] = (if lanes & (1 << j) != 0 { src[j] } else { rd(r, *a, j) }, ok);
        });
        lanes!(lanes, l => {
            let Op::Shfl { d, p, .. } = op(l) else { continue };
            set(r, &self.reg_mask, *d, l, out[l].0);
            if let Some(p) = p {
                set(r, &self.reg_mask, *p, l, out[l].1 as u64);
            }
        });
        Ok(())
    }

    /// `vote.sync` for `lanes`, each with the operands of its own instruction.
    fn vote(&mut self, w: usize, lanes: u32) -> R<()> {
        let code = &self.m.ctx.kernel.code;
        let base = w * self.nregs * 32;
        let pcs = self.warps[w].pc;
        let op = |l: usize| &code[pcs[l] as usize].op;
        let r = &mut self.regs[base..base + self.nregs * 32];
        let mut ballot = 0u32;
        lanes!(lanes, l => {
            if let Op::Vote { a, neg, .. } = op(l)
                && (rd(r, *a, l) & 1 != 0) != *neg
            {
                ballot |= 1 << l;
            }
        });
        lanes!(lanes, l => {
            let Op::Vote { mode, d, .. } = op(l) else { continue };
            let v = match mode {
                VoteMode::Ballot => ballot as u64,
                VoteMode::All => (ballot == lanes) as u64,
                VoteMode::Any => (ballot != 0) as u64,
                VoteMode::Uni => (ballot == 0 || ballot == lanes) as u64,
            };
            set(r, &self.reg_mask, *d, l, v);
        });
        Ok(())
    }

    /// `mma`, `ldmatrix`, `stmatrix` for the whole warp.
    fn matrix(&mut self, w: usize, inst: &Inst) -> R<()> {
        let nregs = self.nregs;
        let base = w * nregs * 32;
        let tid0 = w * 32;
        let line = inst.line;
        let wep = self.warps[w].sync_epoch;
        match &inst.op {
            Op::Mma { shape, ab, acc, d, a, b, c } => {
                let r = &self.regs[base..base + nregs * 32];
                let gather = |srcs: &[Src]| -> matrix::Frags {
                    let mut f = [[0u64; 4]; 32];
                    for (l, regs) in f.iter_mut().enumerate() {
                        for (slot, s) in regs.iter_mut().zip(srcs) {
                            *slot = rd(r, *s, l);
                        }
                    }
                    f
                };
                let out = matrix::mma(*shape, *ab, *acc, &gather(a), &gather(b), &gather(c));
                let r = &mut self.regs[base..base + nregs * 32];
                for (l, vals) in out.iter().enumerate() {
                    for (dst, v) in d.iter().zip(vals) {
                        set(r, &self.reg_mask, *dst, l, *v);
                    }
                }
            }
            Op::Ldmatrix { count, trans, d, addr, space } => {
                let mut m = vec![[[0u16; 8]; 8]; *count as usize];
                for (j, mat) in m.iter_mut().enumerate() {
                    for (row, vals) in mat.iter_mut().enumerate() {
                        let l = 8 * j + row;
                        let a0 = self.lane_addr(base, addr, l);
                        let (sp, off) = self.shared_row(*space, a0, tid0 + l, line)?;
                        for (col, v) in vals.iter_mut().enumerate() {
                            *v = self.m.load(sp, off + 2 * col as u64, 2, tid0 + l, wep, line)? as u16;
                        }
                    }
                }
                let r = &mut self.regs[base..base + nregs * 32];
                for l in 0..32 {
                    for (j, dst) in d.iter().enumerate() {
                        let (r0, c0) = matrix::ldmatrix_elem(l, 0, *trans);
                        let (r1, c1) = matrix::ldmatrix_elem(l, 1, *trans);
                        let v = m[j][r0][c0] as u64 | ((m[j][r1][c1] as u64) << 16);
                        set(r, &self.reg_mask, *dst, l, v);
                    }
                }
            }
            Op::Stmatrix { count, trans, a, addr, space } => {
                let mut rows = vec![[(MemSpace::Shared, 0u64); 8]; *count as usize];
                for (j, rs) in rows.iter_mut().enumerate() {
                    for (row, slot) in rs.iter_mut().enumerate() {
                        let l = 8 * j + row;
                        let a0 = self.lane_addr(base, addr, l);
                        *slot = self.shared_row(*space, a0, tid0 + l, line)?;
                    }
                }
                for l in 0..32 {
                    for (j, s) in a.iter().enumerate().take(*count as usize) {
                        let v = rd(&self.regs[base..base + nregs * 32], *s, l);
                        for h in 0..2 {
                            let (row, col) = matrix::ldmatrix_elem(l, h, *trans);
                            let (sp, off) = rows[j][row];
                            self.m.store(sp, off + 2 * col as u64, 2, (v >> (16 * h)) & 0xffff, tid0 + l, wep, line)?;
                        }
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn lane_addr(&self, base: usize, addr: &Addr, l: usize) -> u64 {
        addr.base
            .map_or(0, |b| self.regs[base + b as usize * 32 + l])
            .wrapping_add(addr.off as u64)
    }

    /// A 16-byte matrix row in shared memory (ldmatrix/stmatrix).
    fn shared_row(&self, space: MemSpace, a: u64, tid: usize, line: u32) -> R<(MemSpace, u64)> {
        let (sp, off) = Mem::resolve(space, a);
        if sp != MemSpace::Shared {
            return Err(self.m.fault(
                Check::Memcheck,
                tid,
                line,
                format!("matrix row address {a:#x} is not in shared memory"),
            ));
        }
        self.m.misaligned(sp, off, 16, tid, line)?;
        Ok((sp, off))
    }
}
