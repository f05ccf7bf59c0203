//! Warp collectives (`shfl.sync`, `vote.sync`, `bar.warp.sync`) and the `.sync.aligned`
//! matrix instructions (`mma`, `ldmatrix`, `stmatrix`): arriving, waiting for the member
//! lanes, and performing them for the whole group at once.

use super::super::fault::Check;
use super::super::ir::*;
use super::super::matrix;
use super::mem::Mem;
use super::{Block, R, Step, rd, set};

/// The `.sync.aligned` matrix instructions: one instruction the whole warp executes.
fn is_aligned(op: &Op) -> bool {
    matches!(
        op,
        Op::Mma { .. } | Op::Ldmatrix { .. } | Op::Stmatrix { .. }
    )
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

impl Block<'_> {
    /// The lanes a collective waits for, as seen from `lane`.
    pub(super) fn required(&self, inst: &Inst, regs: &[u64], lane: usize, exists: u32) -> u32 {
        match &inst.op {
            Op::Shfl { mask, .. } | Op::Vote { mask, .. } | Op::BarWarp { mask } => {
                rd(regs, *mask, lane) as u32
            }
            _ => exists,
        }
    }

    /// The waiting lanes of warp `w` that take part in the same collective as `inst`
    /// (at `pc`, with member mask `need`).
    pub(super) fn partners(&self, w: usize, pc: u32, inst: &Inst, need: u32) -> u32 {
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
    pub(super) fn collective(
        &mut self,
        w: usize,
        pc: u32,
        inst: &Inst,
        exec: u32,
    ) -> R<Option<u32>> {
        let base = w * self.nregs * 32;
        let wp = &self.warps[w];
        let first = exec.trailing_zeros() as usize;
        let need = self.required(
            inst,
            &self.regs[base..base + self.nregs * 32],
            first,
            wp.exists,
        );
        if exec & !need != 0 {
            let l = (exec & !need).trailing_zeros() as usize;
            return Err(self.m.fault(
                Check::Synccheck,
                w * 32 + l,
                inst.line,
                format!(
                    "lane {l} executes a warp collective whose member mask {need:#010x} excludes it"
                ),
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
    pub(super) fn release_collectives(&mut self) -> R<bool> {
        let code = &self.m.ctx.kernel.code;
        let mut progress = false;
        for w in 0..self.warps.len() {
            let mut pending = self.warps[w].coll_wait;
            while pending != 0 {
                let l0 = pending.trailing_zeros() as usize;
                let pc = self.warps[w].pc[l0];
                let inst = &code[pc as usize];
                let base = w * self.nregs * 32;
                let need = self.required(
                    inst,
                    &self.regs[base..base + self.nregs * 32],
                    l0,
                    self.warps[w].exists,
                );
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
    pub(super) fn perform(&mut self, w: usize, lanes: u32) -> R<()> {
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

    /// Arrive at a collective and, once every member has, perform it.
    pub(super) fn run_collective(
        &mut self,
        w: usize,
        pc: u32,
        inst: &Inst,
        mask: u32,
        exec: u32,
    ) -> R<Step> {
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
    pub(super) fn shfl(&mut self, w: usize, lanes: u32) -> R<()> {
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
    pub(super) fn vote(&mut self, w: usize, lanes: u32) -> R<()> {
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
    pub(super) fn matrix(&mut self, w: usize, inst: &Inst) -> R<()> {
        let nregs = self.nregs;
        let base = w * nregs * 32;
        let tid0 = w * 32;
        let line = inst.line;
        let wep = self.warps[w].sync_epoch;
        match &inst.op {
            Op::Mma {
                shape,
                ab,
                acc,
                d,
                a,
                b,
                c,
            } => {
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
            Op::Ldmatrix {
                count,
                trans,
                d,
                addr,
                space,
            } => {
                let mut m = vec![[[0u16; 8]; 8]; *count as usize];
                for (j, mat) in m.iter_mut().enumerate() {
                    for (row, vals) in mat.iter_mut().enumerate() {
                        let l = 8 * j + row;
                        let a0 = self.lane_addr(base, addr, l);
                        let (sp, off) = self.shared_row(*space, a0, tid0 + l, line)?;
                        for (col, v) in vals.iter_mut().enumerate() {
                            *v = self
                                .m
                                .load(sp, off + 2 * col as u64, 2, tid0 + l, wep, line)?
                                as u16;
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
            Op::Stmatrix {
                count,
                trans,
                a,
                addr,
                space,
            } => {
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
                            self.m.store(
                                sp,
                                off + 2 * col as u64,
                                2,
                                (v >> (16 * h)) & 0xffff,
                                tid0 + l,
                                wep,
                                line,
                            )?;
                        }
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    pub(super) fn lane_addr(&self, base: usize, addr: &Addr, l: usize) -> u64 {
        addr.base
            .map_or(0, |b| self.regs[base + b as usize * 32 + l])
            .wrapping_add(addr.off as u64)
    }

    /// A 16-byte matrix row in shared memory (ldmatrix/stmatrix).
    pub(super) fn shared_row(
        &self,
        space: MemSpace,
        a: u64,
        tid: usize,
        line: u32,
    ) -> R<(MemSpace, u64)> {
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
