//! Opcodes: `ld.global.nc.v4.f32` decoded into its base and modifiers ([`Opc`]), and each
//! instruction lowered to its typed operation ([`lower_op`]); the arithmetic, conversion and
//! mma families go on in `arith`.

use super::arith::{lower_arith, lower_cvt, lower_mma};
use super::{Lower, arity, cmp_of};
use crate::ptxsim::ir::*;
use crate::ptxsim::parse::Operand;

/// Decoded opcode: `ld.global.nc.v4.f32` -> base `ld`, modifiers `[global, nc, v4, f32]`.
pub(super) struct Opc<'a> {
    pub(super) text: &'a str,
    pub(super) base: &'a str,
    pub(super) mods: Vec<&'a str>,
}

impl<'a> Opc<'a> {
    pub(super) fn new(text: &'a str) -> Self {
        let mut it = text.split('.');
        let base = it.next().unwrap_or("");
        Opc {
            text,
            base,
            mods: it.collect(),
        }
    }
    pub(super) fn has(&self, m: &str) -> bool {
        self.mods.contains(&m)
    }
    /// Type modifiers in order (`cvt.rn.f32.s32` -> [f32, s32]).
    pub(super) fn types(&self) -> Vec<Ty> {
        self.mods.iter().filter_map(|m| Ty::parse(m)).collect()
    }
    pub(super) fn ty(&self) -> Result<Ty, String> {
        self.types()
            .last()
            .copied()
            .ok_or_else(|| format!("`{}` has no type", self.text))
    }
    pub(super) fn rnd(&self) -> Option<Rnd> {
        self.mods.iter().find_map(|m| match *m {
            "rn" | "rni" => Some(Rnd::Near),
            "rz" | "rzi" => Some(Rnd::Zero),
            "rm" | "rmi" => Some(Rnd::Down),
            "rp" | "rpi" => Some(Rnd::Up),
            "rna" => Some(Rnd::NearAway),
            _ => None,
        })
    }
    pub(super) fn space(&self) -> MemSpace {
        for m in &self.mods {
            let m = m.split("::").next().unwrap_or(m);
            match m {
                "global" => return MemSpace::Global,
                "shared" => return MemSpace::Shared,
                "local" => return MemSpace::Local,
                "param" => return MemSpace::Param,
                "const" => return MemSpace::Const,
                _ => {}
            }
        }
        MemSpace::Generic
    }
    pub(super) fn vec(&self) -> usize {
        self.mods
            .iter()
            .find_map(|m| match *m {
                "v2" => Some(2),
                "v4" => Some(4),
                "v8" => Some(8),
                _ => None,
            })
            .unwrap_or(1)
    }
}

pub(super) fn lower_op(l: &Lower, opcode: &str, ops: &[Operand]) -> Result<Op, String> {
    let o = Opc::new(opcode);
    let unsupported = || format!("`{opcode}` is not supported by the simulator");
    Ok(match o.base {
        "mov" => {
            arity(ops, 2, opcode)?;
            let ty = o.ty()?;
            match (&ops[0], &ops[1]) {
                (Operand::Vec(_), a) => {
                    let ds = l.regs_of(&ops[0])?;
                    let bits = ty.bits() / ds.len() as u32;
                    Op::Unpack {
                        ds,
                        a: l.src(a, ty)?,
                        bits,
                    }
                }
                (d, Operand::Vec(v)) => {
                    let bits = ty.bits() / v.len() as u32;
                    let part_ty = match bits {
                        16 => Ty::B16,
                        32 => Ty::B32,
                        8 => Ty::B8,
                        _ => Ty::B64,
                    };
                    Op::Pack {
                        d: l.dst(d)?,
                        parts: l.srcs_of(&ops[1], part_ty)?,
                        bits,
                    }
                }
                (d, Operand::Name(n)) if n.starts_with("%clock") || n == "%globaltimer" => {
                    Op::Clock {
                        d: l.dst(d)?,
                        which: match n.as_str() {
                            "%clock" => Clock::Clock32,
                            "%clock64" => Clock::Clock64,
                            _ => Clock::GlobalTimer,
                        },
                    }
                }
                (d, a) => Op::Mov {
                    d: l.dst(d)?,
                    a: l.src(a, ty)?,
                },
            }
        }
        "ld" | "ldu" => {
            arity(ops, 2, opcode)?;
            let space = if o.base == "ldu" {
                MemSpace::Global
            } else {
                o.space()
            };
            let d = l.regs_of(&ops[0])?;
            if o.ty()?.bits() > 64 {
                return Err(format!(
                    "`{opcode}`: 128-bit loads are not supported by the simulator"
                ));
            }
            if d.len() != o.vec() {
                return Err(format!("`{opcode}`: {} destination registers", d.len()));
            }
            Op::Ld {
                space,
                ty: o.ty()?,
                d,
                addr: l.addr(&ops[1], space)?,
            }
        }
        "st" => {
            arity(ops, 2, opcode)?;
            let (space, ty) = (o.space(), o.ty()?);
            if ty.bits() > 64 {
                return Err(format!(
                    "`{opcode}`: 128-bit stores are not supported by the simulator"
                ));
            }
            let a = l.srcs_of(&ops[1], ty)?;
            if a.len() != o.vec() {
                return Err(format!("`{opcode}`: {} source operands", a.len()));
            }
            Op::St {
                space,
                ty,
                a,
                addr: l.addr(&ops[0], space)?,
            }
        }
        "cvta" => {
            arity(ops, 2, opcode)?;
            let ty = o.ty()?;
            Op::Cvta {
                d: l.dst(&ops[0])?,
                a: l.src(&ops[1], ty)?,
                space: o.space(),
                to: o.has("to"),
            }
        }
        "add" | "sub" | "mul" | "mad" | "div" | "rem" | "min" | "max" | "fma" | "copysign"
        | "mul24" | "mad24" | "sad" => lower_arith(l, &o, ops)?,
        "and" | "or" | "xor" | "shl" | "shr" => {
            arity(ops, 3, opcode)?;
            let ty = o.ty()?;
            let bty = if matches!(o.base, "shl" | "shr") {
                Ty::U32
            } else {
                ty
            };
            Op::Int {
                op: match o.base {
                    "and" => IntOp::And,
                    "or" => IntOp::Or,
                    "xor" => IntOp::Xor,
                    "shl" => IntOp::Shl,
                    _ => IntOp::Shr,
                },
                ty,
                d: l.dst(&ops[0])?,
                a: l.src(&ops[1], ty)?,
                b: l.src(&ops[2], bty)?,
                c: Src::I(0),
                sat: false,
            }
        }
        "neg" | "abs" | "not" | "cnot" | "popc" | "clz" | "brev" | "bfind" | "sqrt" | "rsqrt"
        | "rcp" | "ex2" | "lg2" | "sin" | "cos" | "tanh" => {
            arity(ops, 2, opcode)?;
            let ty = o.ty()?;
            let d = l.dst(&ops[0])?;
            let a = l.src(&ops[1], ty)?;
            if ty.float() {
                let op = match o.base {
                    "neg" => FloatUn::Neg,
                    "abs" => FloatUn::Abs,
                    "sqrt" => FloatUn::Sqrt,
                    "rsqrt" => FloatUn::Rsqrt,
                    "rcp" => FloatUn::Rcp,
                    "ex2" => FloatUn::Ex2,
                    "lg2" => FloatUn::Lg2,
                    "sin" => FloatUn::Sin,
                    "cos" => FloatUn::Cos,
                    "tanh" => FloatUn::Tanh,
                    _ => return Err(unsupported()),
                };
                let approx = o.has("approx");
                if matches!(op, FloatUn::Sqrt | FloatUn::Rcp) && !approx && o.rnd().is_none() {
                    return Err(format!("`{opcode}` needs a rounding modifier or .approx"));
                }
                Op::FloatUn {
                    op,
                    ty,
                    rnd: o.rnd().unwrap_or(Rnd::Near),
                    approx,
                    ftz: o.has("ftz"),
                    d,
                    a,
                }
            } else {
                let op = match o.base {
                    "neg" => IntUn::Neg,
                    "abs" => IntUn::Abs,
                    "not" => IntUn::Not,
                    "cnot" => IntUn::Cnot,
                    "popc" => IntUn::Popc,
                    "clz" => IntUn::Clz,
                    "brev" => IntUn::Brev,
                    "bfind" if o.has("shiftamt") => IntUn::BfindShift,
                    "bfind" => IntUn::Bfind,
                    _ => return Err(unsupported()),
                };
                Op::IntUn { op, ty, d, a }
            }
        }
        "bfe" => {
            arity(ops, 4, opcode)?;
            let ty = o.ty()?;
            Op::Bfe {
                ty,
                d: l.dst(&ops[0])?,
                a: l.src(&ops[1], ty)?,
                b: l.src(&ops[2], Ty::U32)?,
                c: l.src(&ops[3], Ty::U32)?,
            }
        }
        "bfi" => {
            arity(ops, 5, opcode)?;
            let ty = o.ty()?;
            Op::Bfi {
                ty,
                d: l.dst(&ops[0])?,
                f: l.src(&ops[1], ty)?,
                a: l.src(&ops[2], ty)?,
                b: l.src(&ops[3], Ty::U32)?,
                c: l.src(&ops[4], Ty::U32)?,
            }
        }
        "prmt" => {
            arity(ops, 4, opcode)?;
            if o.mods
                .iter()
                .any(|m| matches!(*m, "f4e" | "b4e" | "rc8" | "ecl" | "ecr" | "rc16"))
            {
                return Err(unsupported());
            }
            Op::Prmt {
                d: l.dst(&ops[0])?,
                a: l.src(&ops[1], Ty::B32)?,
                b: l.src(&ops[2], Ty::B32)?,
                c: l.src(&ops[3], Ty::B32)?,
            }
        }
        "lop3" => {
            arity(ops, 5, opcode)?;
            let lut = match ops[4] {
                Operand::Int(v) if (0..256).contains(&v) => v as u8,
                _ => return Err("lop3: the lookup table must be an immediate 0..255".into()),
            };
            Op::Lop3 {
                d: l.dst(&ops[0])?,
                a: l.src(&ops[1], Ty::B32)?,
                b: l.src(&ops[2], Ty::B32)?,
                c: l.src(&ops[3], Ty::B32)?,
                lut,
            }
        }
        "shf" => {
            arity(ops, 4, opcode)?;
            Op::Shf {
                left: o.has("l"),
                wrap: o.has("wrap"),
                d: l.dst(&ops[0])?,
                a: l.src(&ops[1], Ty::B32)?,
                b: l.src(&ops[2], Ty::B32)?,
                c: l.src(&ops[3], Ty::U32)?,
            }
        }
        "testp" => {
            arity(ops, 2, opcode)?;
            let ty = o.ty()?;
            let kind = match o.mods.first().copied() {
                Some("finite") => TestKind::Finite,
                Some("infinite") => TestKind::Infinite,
                Some("number") => TestKind::Number,
                Some("notanumber") => TestKind::NotANumber,
                Some("normal") => TestKind::Normal,
                Some("subnormal") => TestKind::Subnormal,
                _ => return Err(unsupported()),
            };
            Op::Testp {
                kind,
                ty,
                d: l.dst(&ops[0])?,
                a: l.src(&ops[1], ty)?,
            }
        }
        "setp" => {
            let ty = o.ty()?;
            let cmp = o
                .mods
                .first()
                .and_then(|m| cmp_of(m))
                .ok_or_else(unsupported)?;
            let combine_op = o.mods.iter().find_map(|m| match *m {
                "and" => Some(BoolOp::And),
                "or" => Some(BoolOp::Or),
                "xor" => Some(BoolOp::Xor),
                _ => None,
            });
            arity(ops, if combine_op.is_some() { 4 } else { 3 }, opcode)?;
            let (d, q) = match &ops[0] {
                Operand::Pair(p, q) => (
                    l.dst(&Operand::Name(p.clone()))?,
                    Some(l.dst(&Operand::Name(q.clone()))?),
                ),
                x => (l.dst(x)?, None),
            };
            let combine = match combine_op {
                Some(b) => {
                    let (s, neg) = l.pred_src(&ops[3])?;
                    Some((b, s, neg))
                }
                None => None,
            };
            Op::Setp {
                cmp,
                ty,
                ftz: o.has("ftz"),
                d,
                q,
                a: l.src(&ops[1], ty)?,
                b: l.src(&ops[2], ty)?,
                combine,
            }
        }
        "selp" => {
            arity(ops, 4, opcode)?;
            let ty = o.ty()?;
            Op::Selp {
                d: l.dst(&ops[0])?,
                a: l.src(&ops[1], ty)?,
                b: l.src(&ops[2], ty)?,
                p: l.src(&ops[3], Ty::Pred)?,
            }
        }
        "cvt" => lower_cvt(l, &o, ops)?,
        "bra" => {
            arity(ops, 1, opcode)?;
            match &ops[0] {
                Operand::Name(n) => Op::Bra {
                    target: *l.labels.get(n).ok_or_else(|| format!("no label `{n}`"))?,
                },
                _ => return Err("bra: expected a label".into()),
            }
        }
        "ret" | "exit" => Op::Exit,
        "trap" => return Err("`trap` is not supported by the simulator".into()),
        "bar" | "barrier" if o.has("warp") => {
            arity(ops, 1, opcode)?;
            Op::BarWarp {
                mask: l.src(&ops[0], Ty::B32)?,
            }
        }
        "bar" | "barrier" => {
            if o.has("red") {
                return Err(unsupported());
            }
            let arrive = o.has("arrive");
            if ops.is_empty() || ops.len() > 2 {
                return Err(format!("`{opcode}` takes 1 or 2 operands"));
            }
            Op::Bar {
                id: l.src(&ops[0], Ty::U32)?,
                count: ops.get(1).map(|c| l.src(c, Ty::U32)).transpose()?,
                arrive,
            }
        }
        "membar" | "fence" | "prefetch" | "prefetchu" | "nanosleep" | "discard" | "pmevent" => {
            Op::Nop
        }
        "shfl" => {
            arity(ops, 5, opcode)?;
            if !o.has("sync") {
                return Err("shfl without .sync (removed on sm_70+) is not supported".into());
            }
            let mode = match o.mods.get(1).copied() {
                Some("up") => ShflMode::Up,
                Some("down") => ShflMode::Down,
                Some("bfly") => ShflMode::Bfly,
                Some("idx") => ShflMode::Idx,
                _ => return Err(unsupported()),
            };
            let (d, p) = match &ops[0] {
                Operand::Pair(d, p) => (
                    l.dst(&Operand::Name(d.clone()))?,
                    Some(l.dst(&Operand::Name(p.clone()))?),
                ),
                x => (l.dst(x)?, None),
            };
            Op::Shfl {
                mode,
                d,
                p,
                a: l.src(&ops[1], Ty::B32)?,
                b: l.src(&ops[2], Ty::U32)?,
                c: l.src(&ops[3], Ty::U32)?,
                mask: l.src(&ops[4], Ty::B32)?,
            }
        }
        "vote" => {
            arity(ops, 3, opcode)?;
            if !o.has("sync") {
                return Err("vote without .sync (removed on sm_70+) is not supported".into());
            }
            let mode = match o.mods.get(1).copied() {
                Some("all") => VoteMode::All,
                Some("any") => VoteMode::Any,
                Some("uni") => VoteMode::Uni,
                Some("ballot") => VoteMode::Ballot,
                _ => return Err(unsupported()),
            };
            let (a, neg) = l.pred_src(&ops[1])?;
            Op::Vote {
                mode,
                d: l.dst(&ops[0])?,
                a,
                neg,
                mask: l.src(&ops[2], Ty::B32)?,
            }
        }
        "activemask" => {
            arity(ops, 1, opcode)?;
            Op::Activemask { d: l.dst(&ops[0])? }
        }
        "atom" | "red" => {
            let is_atom = o.base == "atom";
            let space = o.space();
            if !matches!(
                space,
                MemSpace::Global | MemSpace::Shared | MemSpace::Generic
            ) {
                return Err(format!(
                    "`{opcode}`: atomics need global, shared or generic memory"
                ));
            }
            let op = o
                .mods
                .iter()
                .find_map(|m| {
                    Some(match *m {
                        "add" => AtomOp::Add,
                        "min" => AtomOp::Min,
                        "max" => AtomOp::Max,
                        "inc" => AtomOp::Inc,
                        "dec" => AtomOp::Dec,
                        "and" => AtomOp::And,
                        "or" => AtomOp::Or,
                        "xor" => AtomOp::Xor,
                        "exch" => AtomOp::Exch,
                        "cas" => AtomOp::Cas,
                        _ => return None,
                    })
                })
                .ok_or_else(unsupported)?;
            let ty = o.ty()?;
            if o.vec() > 1 || matches!(ty, Ty::F16x2 | Ty::Bf16x2 | Ty::F16 | Ty::Bf16) {
                return Err(unsupported());
            }
            // The only floating-point atomic operation is .add (9.7.13.5 atom: min, max,
            // inc, dec are integer operations; and, or, xor, cas, exch bit operations).
            if ty.float() && op != AtomOp::Add {
                return Err(format!("`{opcode}`: only .add takes a floating-point type"));
            }
            let n = if is_atom { 1 } else { 0 } + 2 + usize::from(op == AtomOp::Cas);
            arity(ops, n, opcode)?;
            let k = usize::from(is_atom);
            Op::Atom {
                space,
                op,
                ty,
                d: if is_atom { Some(l.dst(&ops[0])?) } else { None },
                addr: l.addr(&ops[k], space)?,
                b: l.src(&ops[k + 1], ty)?,
                c: if op == AtomOp::Cas {
                    l.src(&ops[k + 2], ty)?
                } else {
                    Src::I(0)
                },
            }
        }
        "mma" => lower_mma(l, &o, ops)?,
        "ldmatrix" | "stmatrix" => {
            arity(ops, 2, opcode)?;
            if !o.has("m8n8") || !o.has("b16") {
                return Err(unsupported());
            }
            let count = if o.has("x4") {
                4
            } else if o.has("x2") {
                2
            } else if o.has("x1") {
                1
            } else {
                return Err(format!("`{opcode}`: missing .x1/.x2/.x4"));
            };
            let space = match o.space() {
                MemSpace::Generic | MemSpace::Shared => o.space(),
                _ => return Err(format!("`{opcode}`: only shared memory")),
            };
            let trans = o.has("trans");
            if o.base == "ldmatrix" {
                let d: Vec<Reg> = l
                    .regs_of(&ops[0])?
                    .into_iter()
                    .map(|r| r.ok_or("ldmatrix: `_` destination"))
                    .collect::<Result<_, _>>()?;
                if d.len() != count as usize {
                    return Err(format!("`{opcode}` needs {count} destination registers"));
                }
                Op::Ldmatrix {
                    count,
                    trans,
                    d,
                    addr: l.addr(&ops[1], space)?,
                    space,
                }
            } else {
                let a = l.srcs_of(&ops[1], Ty::B32)?;
                if a.len() != count as usize {
                    return Err(format!("`{opcode}` needs {count} source registers"));
                }
                Op::Stmatrix {
                    count,
                    trans,
                    a,
                    addr: l.addr(&ops[0], space)?,
                    space,
                }
            }
        }
        "cp" if o.has("async") => {
            if o.has("commit_group") {
                Op::CpAsyncCommit
            } else if o.has("wait_group") {
                arity(ops, 1, opcode)?;
                match ops[0] {
                    Operand::Int(n) if n >= 0 => Op::CpAsyncWait {
                        pending: n as u32,
                        all: false,
                    },
                    _ => return Err("cp.async.wait_group needs an immediate count".into()),
                }
            } else if o.has("wait_all") {
                Op::CpAsyncWait {
                    pending: 0,
                    all: true,
                }
            } else if o.has("bulk") || o.has("mbarrier") {
                return Err(unsupported());
            } else {
                if !(3..=4).contains(&ops.len()) {
                    return Err(format!("`{opcode}` takes 3 or 4 operands"));
                }
                let size = match ops[2] {
                    Operand::Int(n) if [4, 8, 16].contains(&n) => n as u32,
                    _ => return Err("cp.async: cp-size must be 4, 8 or 16".into()),
                };
                if o.has("cg") && size != 16 {
                    return Err("cp.async.cg: cp-size must be 16".into());
                }
                // The fourth operand is src-size (an integer) or ignore-src (a predicate).
                let fill = match ops.get(3) {
                    None => CpFill::All,
                    Some(o @ Operand::Not(_)) => {
                        let (p, neg) = l.pred_src(o)?;
                        CpFill::IgnoreSrc(p, neg)
                    }
                    Some(o) => match l.src(o, Ty::U32)? {
                        Src::R(r) if l.reg_bits[r as usize] == 1 => {
                            CpFill::IgnoreSrc(Src::R(r), false)
                        }
                        s => CpFill::SrcSize(s),
                    },
                };
                Op::CpAsync {
                    size,
                    fill,
                    dst: l.addr(&ops[0], MemSpace::Shared)?,
                    src: l.addr(&ops[1], MemSpace::Global)?,
                }
            }
        }
        _ => return Err(unsupported()),
    })
}
