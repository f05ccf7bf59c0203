//! One instruction for the active lanes of a group: arithmetic, conversions, memory,
//! branches, barriers; warp collectives are handed to `collective`.

use super::super::alu;
use super::super::alu::sext;
use super::super::fault::Check;
use super::super::float;
use super::super::ir::*;
use super::super::lower::{LOCAL_WINDOW, PARAM_WINDOW, SHARED_WINDOW};
use super::mem::{Mem, PendingCopy};
use super::{Block, R, Step, fits, rd, set};

impl Block<'_> {
    /// Execute one instruction for the `exec` lanes of the group `mask` at `pc`.
    pub(super) fn exec(&mut self, w: usize, pc: u32, inst: &Inst, mask: u32, exec: u32) -> R<Step> {
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
            Op::Int {
                op,
                ty,
                d,
                a,
                b,
                c,
                sat,
            } => {
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
            Op::Shf {
                left,
                wrap,
                d,
                a,
                b,
                c,
            } => {
                let (r, m) = (regs!(), &self.reg_mask);
                lanes!(exec, l => {
                    let v = alu::shf(*left, *wrap, rd(r, *a, l), rd(r, *b, l), rd(r, *c, l)); set(r, m, *d, l, v);
                });
            }
            Op::Float {
                op,
                ty,
                rnd,
                ftz,
                sat,
                d,
                a,
                b,
                c,
            } => {
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
            Op::FloatUn {
                op,
                ty,
                rnd,
                approx,
                ftz,
                d,
                a,
            } => {
                let (r, m) = (regs!(), &self.reg_mask);
                lanes!(exec, l => {
                    let v = alu::float_un(*op, *ty, *rnd, *approx, *ftz, rd(r, *a, l)); set(r, m, *d, l, v);
                });
            }
            Op::Testp { kind, ty, d, a } => {
                let (r, m) = (regs!(), &self.reg_mask);
                lanes!(exec, l => { let v = alu::testp(*kind, *ty, rd(r, *a, l)); set(r, m, *d, l, v as u64); });
            }
            Op::Setp {
                cmp,
                ty,
                ftz,
                d,
                q,
                a,
                b,
                combine,
            } => {
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
            Op::Cvt {
                dty,
                sty,
                rnd,
                int_rnd,
                ftz,
                sat,
                relu,
                satfinite,
                d,
                a,
            } => {
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
                    (Ty::Bf16, Ty::F32)
                        if *rnd == Some(Rnd::Near) && !*ftz && !*sat && !*relu && !*satfinite =>
                    {
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
            Op::CvtPack {
                dty,
                rnd,
                relu,
                satfinite,
                d,
                a,
                b,
            } => {
                let (r, m) = (regs!(), &self.reg_mask);
                let h = if *dty == Ty::Bf16x2 {
                    Ty::Bf16
                } else {
                    Ty::F16
                };
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
            Op::Atom {
                space,
                op,
                ty,
                d,
                addr,
                b,
                c,
            } => {
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
                if idv >= 16
                    || n.is_some_and(|n| {
                        n == 0 || n % 32 != 0 || n as usize > self.m.nthreads.div_ceil(32) * 32
                    })
                {
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
                            format!(
                                "barrier {id} is used with thread counts {} and {n} at once",
                                self.expected[id].unwrap_or(0)
                            ),
                        ));
                    }
                    self.expected[id] = Some(n);
                }
                if *arrive {
                    if n.is_none() {
                        return Err(self.m.fault(
                            Check::Synccheck,
                            tid0 + l0,
                            line,
                            "bar.arrive needs a thread count".into(),
                        ));
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
                    let why = if wp.live & (1 << l) == 0 {
                        "has exited"
                    } else {
                        "is inactive or predicated off"
                    };
                    return Err(self.m.fault(
                        Check::Synccheck,
                        tid0 + l,
                        line,
                        format!("a .sync.aligned matrix instruction runs while lane {l} of the warp {why}"),
                    ));
                }
                return self.run_collective(w, pc, inst, mask, exec);
            }
            Op::CpAsync {
                size,
                fill,
                dst,
                src,
            } => {
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
}
