//! Syntax tree to the compact form of `ir`: registers numbered, labels and symbols
//! resolved, opcodes and their modifiers decoded into typed operations. Anything the
//! interpreter would not execute exactly as the PTX ISA defines it is refused here, with
//! the PTX line, so that a kernel either runs faithfully or not at all.

use std::collections::HashMap;

use super::ir::*;
use super::parse::{Function, Module, Operand, Space, Stmt, VarDecl};

pub type LowerError = (u32, String);

/// Generic-address windows of the per-block and per-thread state spaces. Global memory
/// lives at its own (heap) addresses; `cvta` adds or removes these bases.
pub const SHARED_WINDOW: u64 = 0x0000_1000_0000_0000;
pub const LOCAL_WINDOW: u64 = 0x0000_2000_0000_0000;
pub const PARAM_WINDOW: u64 = 0x0000_3000_0000_0000;
pub const WINDOW_SIZE: u64 = 0x0000_0001_0000_0000;

fn align_up(x: usize, a: usize) -> usize {
    x.div_ceil(a.max(1)) * a.max(1)
}

fn type_bytes(ty: &str) -> Result<usize, String> {
    Ty::parse(ty)
        .map(|t| t.bytes() as usize)
        .ok_or_else(|| format!("unknown type `.{ty}`"))
}

fn var_size(v: &VarDecl) -> Result<usize, String> {
    let elem = type_bytes(&v.ty)? * v.vec as usize;
    Ok(match v.array {
        None => elem,
        Some(Some(n)) => elem * n as usize,
        Some(None) => 0,
    })
}

fn var_align(v: &VarDecl) -> Result<usize, String> {
    Ok(if v.align > 0 {
        v.align as usize
    } else {
        type_bytes(&v.ty)? * v.vec as usize
    })
}

#[derive(Clone, Copy)]
enum Sym {
    Param(usize),
    Shared(usize),
    Local(usize),
    /// Module-level `.global` / `.const`: an absolute device address.
    Global(u64),
}

/// Decoded opcode: `ld.global.nc.v4.f32` -> base `ld`, modifiers `[global, nc, v4, f32]`.
struct Opc<'a> {
    text: &'a str,
    base: &'a str,
    mods: Vec<&'a str>,
}

impl<'a> Opc<'a> {
    fn new(text: &'a str) -> Self {
        let mut it = text.split('.');
        let base = it.next().unwrap_or("");
        Opc {
            text,
            base,
            mods: it.collect(),
        }
    }
    fn has(&self, m: &str) -> bool {
        self.mods.contains(&m)
    }
    /// Type modifiers in order (`cvt.rn.f32.s32` -> [f32, s32]).
    fn types(&self) -> Vec<Ty> {
        self.mods.iter().filter_map(|m| Ty::parse(m)).collect()
    }
    fn ty(&self) -> Result<Ty, String> {
        self.types()
            .last()
            .copied()
            .ok_or_else(|| format!("`{}` has no type", self.text))
    }
    fn rnd(&self) -> Option<Rnd> {
        self.mods.iter().find_map(|m| match *m {
            "rn" | "rni" => Some(Rnd::Near),
            "rz" | "rzi" => Some(Rnd::Zero),
            "rm" | "rmi" => Some(Rnd::Down),
            "rp" | "rpi" => Some(Rnd::Up),
            "rna" => Some(Rnd::NearAway),
            _ => None,
        })
    }
    fn space(&self) -> MemSpace {
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
    fn vec(&self) -> usize {
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

struct Lower<'a> {
    scopes: Vec<HashMap<String, Reg>>,
    reg_bits: Vec<u8>,
    labels: HashMap<String, u32>,
    syms: HashMap<String, Sym>,
    hidden: HashMap<&'static str, Reg>,
    globals: &'a HashMap<String, u64>,
}

fn float_bits(v: f64, ty: Ty) -> Result<u64, String> {
    Ok(match ty {
        Ty::F64 => v.to_bits(),
        Ty::F32 | Ty::Tf32 => (v as f32).to_bits() as u64,
        Ty::F16 => half::f16::from_f64(v).to_bits() as u64,
        Ty::Bf16 => half::bf16::from_f64(v).to_bits() as u64,
        _ => return Err(format!("a float literal cannot be a `.{ty:?}` operand")),
    })
}

fn mask_bits(v: u64, bits: u32) -> u64 {
    if bits >= 64 {
        v
    } else {
        v & ((1u64 << bits) - 1)
    }
}

impl Lower<'_> {
    fn reg(&self, name: &str) -> Option<Reg> {
        self.scopes
            .iter()
            .rev()
            .find_map(|s| s.get(name).copied())
            .or_else(|| self.hidden.get(name).copied())
    }

    fn dst(&self, o: &Operand) -> Result<Reg, String> {
        match o {
            Operand::Name(n) => self
                .reg(n)
                .ok_or_else(|| format!("`{n}` is not a declared register")),
            Operand::Sink => Ok(self.hidden["_"]),
            other => Err(format!("expected a destination register, found {other:?}")),
        }
    }

    fn sym_value(&self, name: &str, generic: bool) -> Option<u64> {
        Some(match self.syms.get(name)? {
            Sym::Param(o) => *o as u64 + if generic { PARAM_WINDOW } else { 0 },
            Sym::Shared(o) => *o as u64 + if generic { SHARED_WINDOW } else { 0 },
            Sym::Local(o) => *o as u64 + if generic { LOCAL_WINDOW } else { 0 },
            Sym::Global(a) => *a,
        })
    }

    /// A source operand typed as `ty` (immediates converted to that type's bits).
    fn src(&self, o: &Operand, ty: Ty) -> Result<Src, String> {
        let bits = ty.bits();
        Ok(match o {
            Operand::Name(n) => match self.reg(n) {
                Some(r) => Src::R(r),
                None => Src::I(
                    self.sym_value(n, false)
                        .ok_or_else(|| format!("`{n}` is not a register or symbol"))?,
                ),
            },
            Operand::NameOff(n, off) => Src::I(
                self.sym_value(n, false)
                    .ok_or_else(|| format!("`{n}` is not a symbol"))?
                    .wrapping_add(*off as u64),
            ),
            Operand::Int(v) if ty.float() => Src::I(float_bits(*v as f64, ty)?),
            Operand::Int(v) => Src::I(mask_bits(*v as u64, bits)),
            // In a 32-bit (64-bit) integer or bit-size operand, a 0f (0d) literal is the
            // f32 (f64) bit pattern it spells (LLVM writes `mov.b32 %r, 0f3F800000`).
            Operand::F32(b) if !ty.float() && bits == 32 => Src::I(*b as u64),
            Operand::F64(b) if !ty.float() && bits == 64 => Src::I(*b),
            Operand::F32(b) => Src::I(float_bits(f32::from_bits(*b) as f64, ty)?),
            Operand::F64(b) => Src::I(float_bits(f64::from_bits(*b), ty)?),
            other => return Err(format!("unexpected operand {other:?}")),
        })
    }

    fn pred_src(&self, o: &Operand) -> Result<(Src, bool), String> {
        match o {
            Operand::Not(n) => Ok((self.src(&Operand::Name(n.clone()), Ty::Pred)?, true)),
            o => Ok((self.src(o, Ty::Pred)?, false)),
        }
    }

    fn addr(&self, o: &Operand, space: MemSpace) -> Result<Addr, String> {
        match o {
            Operand::Mem(None, off) => Ok(Addr {
                base: None,
                off: *off,
            }),
            Operand::Mem(Some(b), off) => {
                if let Some(r) = self.reg(b) {
                    return Ok(Addr {
                        base: Some(r),
                        off: *off,
                    });
                }
                let v = self
                    .sym_value(b, space == MemSpace::Generic)
                    .ok_or_else(|| format!("`{b}` is not a register or symbol"))?;
                Ok(Addr {
                    base: None,
                    off: v as i64 + off,
                })
            }
            other => Err(format!("expected an address `[...]`, found {other:?}")),
        }
    }

    fn regs_of(&self, o: &Operand) -> Result<Vec<Option<Reg>>, String> {
        match o {
            Operand::Vec(v) => v
                .iter()
                .map(|x| match x {
                    Operand::Sink => Ok(None),
                    x => self.dst(x).map(Some),
                })
                .collect(),
            x => Ok(vec![Some(self.dst(x)?)]),
        }
    }

    fn srcs_of(&self, o: &Operand, ty: Ty) -> Result<Vec<Src>, String> {
        match o {
            Operand::Vec(v) => v.iter().map(|x| self.src(x, ty)).collect(),
            x => Ok(vec![self.src(x, ty)?]),
        }
    }
}

fn arity(ops: &[Operand], n: usize, opcode: &str) -> Result<(), String> {
    if ops.len() == n {
        Ok(())
    } else {
        Err(format!(
            "`{opcode}` takes {n} operands, found {}",
            ops.len()
        ))
    }
}

fn cmp_of(s: &str) -> Option<Cmp> {
    Some(match s {
        "eq" => Cmp::Eq,
        "ne" => Cmp::Ne,
        "lt" => Cmp::Lt,
        "le" => Cmp::Le,
        "gt" => Cmp::Gt,
        "ge" => Cmp::Ge,
        "lo" => Cmp::Lo,
        "ls" => Cmp::Ls,
        "hi" => Cmp::Hi,
        "hs" => Cmp::Hs,
        "equ" => Cmp::Equ,
        "neu" => Cmp::Neu,
        "ltu" => Cmp::Ltu,
        "leu" => Cmp::Leu,
        "gtu" => Cmp::Gtu,
        "geu" => Cmp::Geu,
        "num" => Cmp::Num,
        "nan" => Cmp::Nan,
        _ => return None,
    })
}

/// Lower one `.entry` of `m`. `globals` maps module-level `.global`/`.const` variables to
/// the device addresses they were given at load.
pub fn lower(
    m: &Module,
    f: &Function,
    globals: &HashMap<String, u64>,
) -> Result<Kernel, LowerError> {
    let mut l = Lower {
        scopes: vec![HashMap::new()],
        reg_bits: Vec::new(),
        labels: HashMap::new(),
        syms: HashMap::new(),
        hidden: HashMap::new(),
        globals,
    };
    // The per-thread constants (`%tid.x` ...) and the sink `_` are registers 0.. .
    for name in HIDDEN {
        l.hidden.insert(name, l.reg_bits.len() as Reg);
        l.reg_bits.push(if *name == "_" { 64 } else { 32 });
    }
    for (name, addr) in l.globals.iter() {
        l.syms.insert(name.clone(), Sym::Global(*addr));
    }
    let (params, cursor) = param_slots(&f.params)?;
    for p in &params {
        l.syms.insert(p.name.clone(), Sym::Param(p.offset));
    }
    // Shared and local variables: module-level shared ones first (those this entry
    // names), then the entry's own, in declaration order; dynamic shared memory after.
    let mut referenced = std::collections::HashSet::new();
    for s in &f.body {
        if let Stmt::Inst(i) = s {
            for o in &i.ops {
                collect_names(o, &mut referenced);
            }
        }
    }
    let mut shared_vars = Vec::new();
    let (mut shared, mut local) = (0usize, 0usize);
    let mut dyn_names = Vec::new();
    let mut dyn_align = 16usize;
    let decls = m
        .vars
        .iter()
        .filter(|v| v.space == Space::Shared && referenced.contains(&v.name))
        .chain(f.body.iter().filter_map(|s| match s {
            Stmt::Var(v) => Some(v),
            _ => None,
        }));
    for v in decls {
        let size = var_size(v).map_err(|e| (v.line, e))?;
        let align = var_align(v).map_err(|e| (v.line, e))?;
        match v.space {
            Space::Shared if v.array == Some(None) || v.is_extern => {
                dyn_names.push(v.name.clone());
                dyn_align = dyn_align.max(align);
            }
            Space::Shared => {
                let off = align_up(shared, align);
                shared = off + size;
                l.syms.insert(v.name.clone(), Sym::Shared(off));
                shared_vars.push(SharedVar {
                    name: v.name.clone(),
                    offset: off,
                    size,
                });
            }
            Space::Local => {
                let off = align_up(local, align);
                local = off + size;
                l.syms.insert(v.name.clone(), Sym::Local(off));
            }
            _ => {
                return Err((
                    v.line,
                    format!(
                        "`{}`: only .shared and .local variables may be declared in a kernel body",
                        v.name
                    ),
                ));
            }
        }
    }
    let dyn_start = align_up(shared, dyn_align);
    for n in dyn_names {
        l.syms.insert(n, Sym::Shared(dyn_start));
    }
    // Labels: instruction index of the next instruction.
    let mut n = 0u32;
    for s in &f.body {
        match s {
            Stmt::Label(name, _) => {
                l.labels.insert(name.clone(), n);
            }
            Stmt::Inst(_) => n += 1,
            _ => {}
        }
    }
    // Registers and instructions.
    let mut code = Vec::new();
    let mut pending_regs: Vec<(String, u8)> = Vec::new();
    for s in &f.body {
        match s {
            Stmt::Reg { ty, names, line } => {
                let bits = Ty::parse(ty)
                    .ok_or((*line, format!("unknown register type `.{ty}`")))?
                    .bits()
                    .min(64) as u8;
                for (name, count) in names {
                    match count {
                        Some(c) => {
                            for i in 0..*c {
                                pending_regs.push((format!("{name}{i}"), bits));
                            }
                        }
                        None => pending_regs.push((name.clone(), bits)),
                    }
                }
                for (name, bits) in pending_regs.drain(..) {
                    let idx = l.reg_bits.len() as Reg;
                    l.reg_bits.push(bits);
                    l.scopes.last_mut().expect("a scope").insert(name, idx);
                }
            }
            Stmt::Open => l.scopes.push(HashMap::new()),
            Stmt::Close => {
                l.scopes.pop();
            }
            Stmt::Inst(i) => {
                let op = lower_op(&l, &i.opcode, &i.ops).map_err(|e| (i.line, e))?;
                let guard = match &i.guard {
                    None => None,
                    Some((neg, p)) => Some((
                        l.reg(p)
                            .ok_or((i.line, format!("`{p}` is not a declared predicate")))?,
                        *neg,
                    )),
                };
                code.push(Inst {
                    op,
                    guard,
                    line: i.line,
                });
            }
            _ => {}
        }
    }
    Ok(Kernel {
        name: f.name.clone(),
        code,
        reg_bits: l.reg_bits,
        params,
        param_bytes: cursor,
        shared_static: shared,
        shared_vars,
        dyn_shared_align: dyn_align,
        local_bytes: local,
        maxntid: f.maxntid,
        reqntid: f.reqntid,
    })
}

/// Where each parameter of an entry sits in the parameter buffer (natural alignment or
/// the declared `.align`), and the buffer's size.
pub fn param_slots(params: &[super::parse::Param]) -> Result<(Vec<ParamSlot>, usize), LowerError> {
    let mut out = Vec::new();
    let mut cursor = 0usize;
    for p in params {
        let elem = type_bytes(&p.ty).map_err(|e| (p.line, e))?;
        let size = elem * p.array.unwrap_or(1) as usize;
        let align = p.align.map_or(elem, |a| a as usize);
        let offset = align_up(cursor, align);
        cursor = offset + size;
        out.push(ParamSlot {
            name: p.name.clone(),
            ty: p.ty.clone(),
            offset,
            size,
        });
    }
    Ok((out, cursor))
}

fn collect_names(o: &Operand, out: &mut std::collections::HashSet<String>) {
    match o {
        Operand::Name(n) | Operand::NameOff(n, _) | Operand::Mem(Some(n), _) => {
            out.insert(n.clone());
        }
        Operand::Vec(v) => v.iter().for_each(|x| collect_names(x, out)),
        _ => {}
    }
}

fn lower_op(l: &Lower, opcode: &str, ops: &[Operand]) -> Result<Op, String> {
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

fn lower_arith(l: &Lower, o: &Opc, ops: &[Operand]) -> Result<Op, String> {
    let ty = o.ty()?;
    let three = matches!(o.base, "mad" | "fma" | "mad24" | "sad");
    arity(ops, if three { 4 } else { 3 }, o.text)?;
    if o.has("cc") || o.base == "addc" || o.base == "subc" {
        return Err(format!(
            "`{}`: carry chains are not supported by the simulator",
            o.text
        ));
    }
    let d = l.dst(&ops[0])?;
    if ty.float() {
        let op = match o.base {
            "add" => FloatOp::Add,
            "sub" => FloatOp::Sub,
            "mul" => FloatOp::Mul,
            "div" if o.has("approx") => FloatOp::DivApprox,
            "div" => FloatOp::Div,
            "min" if o.has("NaN") => FloatOp::MinNan,
            "max" if o.has("NaN") => FloatOp::MaxNan,
            "min" => FloatOp::Min,
            "max" => FloatOp::Max,
            "fma" | "mad" => FloatOp::Fma,
            "copysign" => FloatOp::Copysign,
            _ => return Err(format!("`{}` is not supported by the simulator", o.text)),
        };
        if op == FloatOp::Fma && o.rnd().is_none() {
            return Err(format!("`{}` needs a rounding modifier", o.text));
        }
        if op == FloatOp::Fma && ty == Ty::F64 && o.rnd() != Some(Rnd::Near) {
            return Err(format!(
                "`{}`: f64 fma rounds only to nearest in the simulator",
                o.text
            ));
        }
        if op == FloatOp::Div && ty == Ty::F64 && o.rnd().is_none() {
            return Err(format!("`{}` needs a rounding modifier", o.text));
        }
        if o.has("xorsign") || o.has("abs") || o.has("oob") || o.has("relu") {
            return Err(format!("`{}` is not supported by the simulator", o.text));
        }
        return Ok(Op::Float {
            op,
            ty,
            rnd: o.rnd().unwrap_or(Rnd::Near),
            ftz: o.has("ftz"),
            sat: o.has("sat"),
            d,
            a: l.src(&ops[1], ty)?,
            b: l.src(&ops[2], ty)?,
            c: if three {
                l.src(&ops[3], ty)?
            } else {
                Src::I(0)
            },
        });
    }
    let wide = o.has("wide");
    let hi = o.has("hi");
    let op = match o.base {
        "add" => IntOp::Add,
        "sub" => IntOp::Sub,
        "mul" if wide => IntOp::MulWide,
        "mul" if hi => IntOp::MulHi,
        "mul" => IntOp::MulLo,
        "mad" if wide => IntOp::MadWide,
        "mad" if hi => IntOp::MadHi,
        "mad" => IntOp::MadLo,
        "mul24" if !hi => IntOp::Mul24Lo,
        "mad24" if !hi => IntOp::Mad24Lo,
        "div" => IntOp::Div,
        "rem" => IntOp::Rem,
        "min" => IntOp::Min,
        "max" => IntOp::Max,
        "sad" => IntOp::Sad,
        _ => return Err(format!("`{}` is not supported by the simulator", o.text)),
    };
    if o.mods
        .iter()
        .any(|m| matches!(*m, "relu" | "s16x2" | "u16x2"))
    {
        return Err(format!("`{}` is not supported by the simulator", o.text));
    }
    // The addend of mad.wide is twice as wide as the inputs.
    let cty = match (op, ty) {
        (IntOp::MadWide, Ty::S32) => Ty::S64,
        (IntOp::MadWide, Ty::U32) => Ty::U64,
        (IntOp::MadWide, Ty::S16) => Ty::S32,
        (IntOp::MadWide, Ty::U16) => Ty::U32,
        _ => ty,
    };
    Ok(Op::Int {
        op,
        ty,
        d,
        a: l.src(&ops[1], ty)?,
        b: l.src(&ops[2], ty)?,
        c: if three {
            l.src(&ops[3], cty)?
        } else {
            Src::I(0)
        },
        sat: o.has("sat"),
    })
}

fn lower_cvt(l: &Lower, o: &Opc, ops: &[Operand]) -> Result<Op, String> {
    let tys = o.types();
    if tys.len() != 2 {
        return Err(format!(
            "`{}`: expected a destination and a source type",
            o.text
        ));
    }
    let (dty, sty) = (tys[0], tys[1]);
    let int_rnd = o
        .mods
        .iter()
        .any(|m| matches!(*m, "rni" | "rzi" | "rmi" | "rpi"));
    if matches!(dty, Ty::Bf16x2 | Ty::F16x2) {
        arity(ops, 3, o.text)?;
        return Ok(Op::CvtPack {
            dty,
            rnd: o.rnd().ok_or("packed cvt needs .rn/.rz")?,
            relu: o.has("relu"),
            satfinite: o.has("satfinite"),
            d: l.dst(&ops[0])?,
            a: l.src(&ops[1], sty)?,
            b: l.src(&ops[2], sty)?,
        });
    }
    arity(ops, 2, o.text)?;
    if dty.float() && sty.float() && dty.bits() < sty.bits() && o.rnd().is_none() {
        return Err(format!(
            "`{}`: a narrowing float conversion needs a rounding modifier",
            o.text
        ));
    }
    if !dty.float() && sty.float() && !int_rnd {
        return Err(format!(
            "`{}`: float to integer needs .rni/.rzi/.rmi/.rpi",
            o.text
        ));
    }
    Ok(Op::Cvt {
        dty,
        sty,
        rnd: o.rnd(),
        int_rnd,
        ftz: o.has("ftz"),
        sat: o.has("sat"),
        relu: o.has("relu"),
        satfinite: o.has("satfinite"),
        d: l.dst(&ops[0])?,
        a: l.src(&ops[1], sty)?,
    })
}

fn lower_mma(l: &Lower, o: &Opc, ops: &[Operand]) -> Result<Op, String> {
    arity(ops, 4, o.text)?;
    let unsupported = || format!("`{}` is not supported by the simulator", o.text);
    let shape = if o.has("m16n8k16") {
        MmaShape::M16n8k16
    } else if o.has("m16n8k8") {
        MmaShape::M16n8k8
    } else if o.has("m16n8k4") {
        MmaShape::M16n8k4
    } else {
        return Err(unsupported());
    };
    if !o.has("row")
        || !o.has("col")
        || o.mods.iter().position(|m| *m == "row") > o.mods.iter().position(|m| *m == "col")
    {
        return Err(format!(
            "`{}`: only .row.col layouts exist for this shape",
            o.text
        ));
    }
    let tys = o.types();
    if tys.len() != 4 {
        return Err(format!("`{}`: expected .dtype.atype.btype.ctype", o.text));
    }
    let (dty, aty, bty, cty) = (tys[0], tys[1], tys[2], tys[3]);
    if aty != bty || dty != cty {
        return Err(unsupported());
    }
    let ok = matches!(
        (shape, aty, dty),
        (MmaShape::M16n8k16 | MmaShape::M16n8k8, Ty::Bf16, Ty::F32)
            | (
                MmaShape::M16n8k16 | MmaShape::M16n8k8,
                Ty::F16,
                Ty::F32 | Ty::F16
            )
            | (MmaShape::M16n8k8 | MmaShape::M16n8k4, Ty::Tf32, Ty::F32)
    );
    if !ok {
        return Err(unsupported());
    }
    let regs = |o: &Operand| -> Result<Vec<Src>, String> { l.srcs_of(o, Ty::B32) };
    let d: Vec<Reg> = l
        .regs_of(&ops[0])?
        .into_iter()
        .map(|r| r.ok_or("mma: `_` destination"))
        .collect::<Result<_, _>>()?;
    let (a, b, c) = (regs(&ops[1])?, regs(&ops[2])?, regs(&ops[3])?);
    // Registers per thread for each fragment (PTX ISA, warp-level matrix fragments).
    let (na, nb) = match (shape, aty) {
        (MmaShape::M16n8k16, _) => (4, 2),
        (MmaShape::M16n8k8, Ty::Tf32) => (4, 2),
        (MmaShape::M16n8k8, _) => (2, 1),
        (MmaShape::M16n8k4, _) => (2, 1),
    };
    let nc = if dty == Ty::F32 { 4 } else { 2 };
    if a.len() != na || b.len() != nb || c.len() != nc || d.len() != nc {
        return Err(format!(
            "`{}`: fragments need {na} A, {nb} B, {nc} C/D registers",
            o.text
        ));
    }
    Ok(Op::Mma {
        shape,
        ab: aty,
        acc: dty,
        d,
        a,
        b,
        c,
    })
}
