//! The arithmetic, conversion and `mma` instructions lowered to their typed operations.

use super::opcode::Opc;
use super::{Lower, arity};
use crate::ptxsim::ir::*;
use crate::ptxsim::parse::Operand;

pub(super) fn lower_arith(l: &Lower, o: &Opc, ops: &[Operand]) -> Result<Op, String> {
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

pub(super) fn lower_cvt(l: &Lower, o: &Opc, ops: &[Operand]) -> Result<Op, String> {
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

pub(super) fn lower_mma(l: &Lower, o: &Opc, ops: &[Operand]) -> Result<Op, String> {
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
