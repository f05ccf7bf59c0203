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

use super::alu::mask;
use super::fault::{Check, Checks, Fault};
use super::ir::*;
use super::memory::Heap;

use self::mem::{CpAsync, Mem, Meta};

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

// After the helpers above: the macro is visible in these modules.
mod collective;
mod exec;
mod mem;

/// Backward branches a group of lanes takes, while other lanes of its warp are ready to
/// run, before it lets them run.
const SPIN_LIMIT: u32 = 1 << 8;
/// Instructions a warp runs, while other warps are ready to run, before it lets them.
const WARP_SLICE: u32 = 1 << 16;

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
                let need =
                    self.required(inst, &self.regs[base..base + self.nregs * 32], l, wp.exists)
                        & wp.live;
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
        let want = self.expected[id].map_or_else(
            || format!("all {live} live threads"),
            |n| format!("{n} threads"),
        );
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
}
