//! Syntax tree to the compact form of `ir`: registers numbered, labels and symbols
//! resolved, opcodes and their modifiers decoded into typed operations. Anything the
//! interpreter would not execute exactly as the PTX ISA defines it is refused here, with
//! the PTX line, so that a kernel either runs faithfully or not at all.

use std::collections::HashMap;

use super::ir::*;
use super::parse::{Function, Module, Operand, Space, Stmt, VarDecl};

mod arith;
mod opcode;

use opcode::lower_op;

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
