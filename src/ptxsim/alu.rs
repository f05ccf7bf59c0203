//! Per-lane semantics of the arithmetic, logic, comparison and conversion instructions,
//! as pure functions on register bits (PTX ISA chapter 9.7: integer, floating-point,
//! half-precision, comparison, logic and shift, data-movement conversion instructions).

use super::float::{self, Arith, f32b, f64b, to_f64};
use super::ir::*;

#[inline]
pub fn mask(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

#[inline]
pub fn sext(v: u64, bits: u32) -> i64 {
    if bits >= 64 {
        v as i64
    } else {
        let s = 64 - bits;
        ((v << s) as i64) >> s
    }
}

/// The integer value of `v` as type `ty` (sign- or zero-extended to 128 bits).
#[inline]
fn val(v: u64, ty: Ty) -> i128 {
    if ty.signed() {
        sext(v, ty.bits()) as i128
    } else {
        (v & mask(ty.bits())) as i128
    }
}

fn clamp_to(v: i128, ty: Ty) -> u64 {
    let bits = ty.bits();
    let (lo, hi) = if ty.signed() {
        (-(1i128 << (bits - 1)), (1i128 << (bits - 1)) - 1)
    } else {
        (0, (1i128 << bits) - 1)
    };
    (v.clamp(lo, hi) as u64) & mask(bits)
}

pub fn int(op: IntOp, ty: Ty, a: u64, b: u64, c: u64, sat: bool) -> u64 {
    let bits = ty.bits();
    let m = mask(bits);
    let (x, y) = (val(a, ty), val(b, ty));
    let r: i128 = match op {
        IntOp::Add if sat => return clamp_to(x + y, ty),
        IntOp::Sub if sat => return clamp_to(x - y, ty),
        IntOp::Add => x + y,
        IntOp::Sub => x - y,
        IntOp::MulLo => x.wrapping_mul(y),
        IntOp::MulHi => x.wrapping_mul(y) >> bits,
        IntOp::MulWide => return (x.wrapping_mul(y) as u64) & mask(2 * bits),
        IntOp::MadLo => x.wrapping_mul(y) + val(c, ty),
        IntOp::MadHi if sat => return clamp_to((x.wrapping_mul(y) >> bits) + val(c, ty), ty),
        IntOp::MadHi => (x.wrapping_mul(y) >> bits) + val(c, ty),
        IntOp::MadWide => {
            let w = 2 * bits;
            return (x.wrapping_mul(y) as u64).wrapping_add(c) & mask(w);
        }
        // Division by zero is unspecified in PTX; NVIDIA GPUs give all bits set.
        IntOp::Div if y == 0 => return m,
        IntOp::Rem if y == 0 => return m,
        IntOp::Div => x.wrapping_div(y),
        IntOp::Rem => x.wrapping_rem(y),
        IntOp::Min => x.min(y),
        IntOp::Max => x.max(y),
        IntOp::And => return a & b & m,
        IntOp::Or => return (a | b) & m,
        IntOp::Xor => return (a ^ b) & m,
        IntOp::Shl => {
            let n = (b as u32).min(bits);
            return if n >= bits { 0 } else { (a << n) & m };
        }
        IntOp::Shr => {
            let n = (b as u32).min(bits);
            if ty.signed() {
                let s = sext(a, bits);
                return ((if n >= bits { s >> 63 } else { s >> n }) as u64) & m;
            }
            return if n >= bits { 0 } else { (a & m) >> n };
        }
        IntOp::Sad => {
            let d = if x < y { y - x } else { x - y };
            d + val(c, ty)
        }
        IntOp::Mul24Lo | IntOp::Mad24Lo => {
            let (p, q) = if ty.signed() {
                (sext(a, 24) as i128, sext(b, 24) as i128)
            } else {
                ((a & 0xff_ffff) as i128, (b & 0xff_ffff) as i128)
            };
            let mut r = p * q;
            if op == IntOp::Mad24Lo {
                r += val(c, ty);
            }
            r
        }
    };
    (r as u64) & m
}

pub fn int_un(op: IntUn, ty: Ty, a: u64) -> u64 {
    let bits = ty.bits();
    let m = mask(bits);
    let a = a & m;
    match op {
        IntUn::Neg => a.wrapping_neg() & m,
        IntUn::Abs => (sext(a, bits).wrapping_abs() as u64) & m,
        IntUn::Not => !a & m,
        IntUn::Cnot => u64::from(a == 0),
        IntUn::Popc => a.count_ones() as u64,
        IntUn::Clz => (a.leading_zeros() - (64 - bits)) as u64,
        IntUn::Brev => a.reverse_bits() >> (64 - bits),
        IntUn::Bfind | IntUn::BfindShift => {
            let v = if ty.signed() && sext(a, bits) < 0 {
                !a & m
            } else {
                a
            };
            if v == 0 {
                0xffff_ffff
            } else {
                let msb = 63 - v.leading_zeros() as u64;
                if op == IntUn::BfindShift {
                    (bits as u64 - 1) - msb
                } else {
                    msb
                }
            }
        }
    }
}

pub fn bfe(ty: Ty, a: u64, pos: u64, len: u64) -> u64 {
    let bits = ty.bits() as u64;
    let msb = bits - 1;
    let (pos, len) = (pos & 0xff, len & 0xff);
    let bit = |i: u64| (a >> i) & 1;
    let sbit = if !ty.signed() || len == 0 {
        0
    } else {
        bit((pos + len - 1).min(msb))
    };
    let mut d = 0u64;
    for i in 0..bits {
        let v = if i < len && pos + i <= msb {
            bit(pos + i)
        } else {
            sbit
        };
        d |= v << i;
    }
    d
}

pub fn bfi(ty: Ty, f: u64, a: u64, pos: u64, len: u64) -> u64 {
    let msb = ty.bits() as u64 - 1;
    let (pos, len) = (pos & 0xff, len & 0xff);
    let mut d = a & mask(ty.bits());
    let mut i = 0;
    while i < len && pos + i <= msb {
        d = (d & !(1 << (pos + i))) | (((f >> i) & 1) << (pos + i));
        i += 1;
    }
    d
}

pub fn prmt(a: u64, b: u64, c: u64) -> u64 {
    let t = ((b & 0xffff_ffff) << 32) | (a & 0xffff_ffff);
    let mut d = 0u64;
    for i in 0..4 {
        let sel = (c >> (4 * i)) & 0xf;
        let mut byte = (t >> (8 * (sel & 7))) & 0xff;
        if sel & 8 != 0 {
            byte = if byte & 0x80 != 0 { 0xff } else { 0 };
        }
        d |= byte << (8 * i);
    }
    d
}

pub fn lop3(a: u64, b: u64, c: u64, lut: u8) -> u64 {
    let mut r = 0u64;
    for i in 0..8 {
        if lut >> i & 1 == 1 {
            let ta = if i & 4 != 0 { a } else { !a };
            let tb = if i & 2 != 0 { b } else { !b };
            let tc = if i & 1 != 0 { c } else { !c };
            r |= ta & tb & tc;
        }
    }
    r & 0xffff_ffff
}

pub fn shf(left: bool, wrap: bool, a: u64, b: u64, c: u64) -> u64 {
    let n = if wrap { c & 31 } else { c.min(32) };
    let v = ((b & 0xffff_ffff) << 32) | (a & 0xffff_ffff);
    if left {
        ((v << n) >> 32) & 0xffff_ffff
    } else {
        (v >> n) & 0xffff_ffff
    }
}

fn arith_of(op: FloatOp) -> Option<Arith> {
    Some(match op {
        FloatOp::Add => Arith::Add,
        FloatOp::Sub => Arith::Sub,
        FloatOp::Mul => Arith::Mul,
        FloatOp::Fma => Arith::Fma,
        FloatOp::Div => Arith::Div,
        _ => return None,
    })
}

/// One f32 operation (the hot path of most kernels).
#[inline]
pub fn float32(op: FloatOp, rnd: Rnd, ftz: bool, sat: bool, a: u64, b: u64, c: u64) -> u64 {
    let (x, y, z) = (f32b(a), f32b(b), f32b(c));
    let r = match op {
        FloatOp::Min | FloatOp::Max | FloatOp::MinNan | FloatOp::MaxNan => {
            let (x, y) = if ftz {
                (float::ftz32(x), float::ftz32(y))
            } else {
                (x, y)
            };
            let max = matches!(op, FloatOp::Max | FloatOp::MaxNan);
            let nan = matches!(op, FloatOp::MinNan | FloatOp::MaxNan);
            let r = float::minmax(x as f64, y as f64, max, nan) as f32;
            if r.is_nan() {
                return float::NAN32 as u64;
            }
            r
        }
        FloatOp::Copysign => return ((b as u32 & 0x7fff_ffff) | (a as u32 & 0x8000_0000)) as u64,
        FloatOp::DivApprox => {
            let (x, y) = if ftz {
                (float::ftz32(x), float::ftz32(y))
            } else {
                (x, y)
            };
            let r = float::ftz32(1.0 / y);
            let q = x * r;
            let q = if ftz { float::ftz32(q) } else { q };
            if q.is_nan() {
                f32::from_bits(float::NAN32)
            } else {
                q
            }
        }
        _ => float::arith32(arith_of(op).unwrap_or(Arith::Add), x, y, z, rnd, ftz),
    };
    let r = if sat { float::sat(r as f64) as f32 } else { r };
    r.to_bits() as u64
}

pub fn float64(op: FloatOp, rnd: Rnd, a: u64, b: u64, c: u64) -> u64 {
    let (x, y, z) = (f64b(a), f64b(b), f64b(c));
    match op {
        FloatOp::Min | FloatOp::Max | FloatOp::MinNan | FloatOp::MaxNan => {
            let max = matches!(op, FloatOp::Max | FloatOp::MaxNan);
            let nan = matches!(op, FloatOp::MinNan | FloatOp::MaxNan);
            let r = float::minmax(x, y, max, nan);
            if r.is_nan() {
                float::NAN64
            } else {
                r.to_bits()
            }
        }
        FloatOp::Copysign => (b & !(1 << 63)) | (a & (1 << 63)),
        FloatOp::DivApprox => (x / y).to_bits(),
        _ => float::arith64(arith_of(op).unwrap_or(Arith::Add), x, y, z, rnd).to_bits(),
    }
}

/// f16 / bf16 arithmetic on one 16-bit value: exact in f64, then rounded once.
#[allow(clippy::too_many_arguments)]
fn float16(op: FloatOp, ty: Ty, rnd: Rnd, ftz: bool, sat: bool, a: u64, b: u64, c: u64) -> u64 {
    let get = |v: u64| {
        let x = to_f64(v & 0xffff, ty);
        if ftz { float::flush(x, ty) } else { x }
    };
    let (x, y, z) = (get(a), get(b), get(c));
    let (s, e) = match op {
        FloatOp::Add => float::two_sum(x, y),
        FloatOp::Sub => float::two_sum(x, -y),
        FloatOp::Mul => (x * y, 0.0),
        FloatOp::Fma => float::two_sum(x * y, z),
        FloatOp::Min | FloatOp::Max | FloatOp::MinNan | FloatOp::MaxNan => {
            let max = matches!(op, FloatOp::Max | FloatOp::MaxNan);
            let nan = matches!(op, FloatOp::MinNan | FloatOp::MaxNan);
            (float::minmax(x, y, max, nan), 0.0)
        }
        FloatOp::Copysign => return (b & 0x7fff) | (a & 0x8000),
        FloatOp::Div | FloatOp::DivApprox => (x / y, 0.0),
    };
    let mut v = f64_of(float::from_exact(s, e, ty, rnd), ty);
    if ftz {
        v = float::flush(v, ty);
    }
    if sat {
        v = float::sat(v);
    }
    float::from_exact(v, 0.0, ty, Rnd::Near)
}

fn f64_of(bits: u64, ty: Ty) -> f64 {
    to_f64(bits, ty)
}

#[allow(clippy::too_many_arguments)]
pub fn float(op: FloatOp, ty: Ty, rnd: Rnd, ftz: bool, sat: bool, a: u64, b: u64, c: u64) -> u64 {
    match ty {
        Ty::F32 => float32(op, rnd, ftz, sat, a, b, c),
        Ty::F64 => float64(op, rnd, a, b, c),
        Ty::F16 | Ty::Bf16 => float16(op, ty, rnd, ftz, sat, a, b, c),
        Ty::F16x2 | Ty::Bf16x2 => {
            let h = if ty == Ty::F16x2 { Ty::F16 } else { Ty::Bf16 };
            let lo = float16(op, h, rnd, ftz, sat, a, b, c);
            let hi = float16(op, h, rnd, ftz, sat, a >> 16, b >> 16, c >> 16);
            lo | (hi << 16)
        }
        _ => 0,
    }
}

fn float_un16(op: FloatUn, ty: Ty, rnd: Rnd, ftz: bool, a: u64) -> u64 {
    let x = to_f64(a & 0xffff, ty);
    let x = if ftz { float::flush(x, ty) } else { x };
    let v = match op {
        FloatUn::Neg => return (a ^ 0x8000) & 0xffff,
        FloatUn::Abs => return a & 0x7fff,
        FloatUn::Sqrt => x.sqrt(),
        FloatUn::Rsqrt => 1.0 / x.sqrt(),
        FloatUn::Rcp => 1.0 / x,
        FloatUn::Ex2 => x.exp2(),
        FloatUn::Lg2 => x.log2(),
        FloatUn::Sin => x.sin(),
        FloatUn::Cos => x.cos(),
        FloatUn::Tanh => x.tanh(),
    };
    let r = f64_of(float::from_exact(v, 0.0, ty, rnd), ty);
    let r = if ftz { float::flush(r, ty) } else { r };
    float::from_exact(r, 0.0, ty, Rnd::Near)
}

pub fn float_un(op: FloatUn, ty: Ty, rnd: Rnd, approx: bool, ftz: bool, a: u64) -> u64 {
    match ty {
        Ty::F32 => {
            let x = f32b(a);
            let r = match op {
                FloatUn::Neg => {
                    let x = if ftz { float::ftz32(x) } else { x };
                    return ((x.to_bits() ^ 0x8000_0000) as u64) & 0xffff_ffff;
                }
                FloatUn::Abs => {
                    let x = if ftz { float::ftz32(x) } else { x };
                    return (x.to_bits() & 0x7fff_ffff) as u64;
                }
                FloatUn::Sqrt if !approx => float::arith32(Arith::Sqrt, x, 0.0, 0.0, rnd, ftz),
                FloatUn::Rcp if !approx => float::arith32(Arith::Div, 1.0, x, 0.0, rnd, ftz),
                _ => float::approx32(op, x, ftz),
            };
            r.to_bits() as u64
        }
        Ty::F64 => {
            let x = f64b(a);
            match op {
                FloatUn::Neg => a ^ (1 << 63),
                FloatUn::Abs => a & !(1 << 63),
                FloatUn::Sqrt if !approx => float::arith64(Arith::Sqrt, x, 0.0, 0.0, rnd).to_bits(),
                FloatUn::Rcp if !approx => float::arith64(Arith::Div, 1.0, x, 0.0, rnd).to_bits(),
                // The f64 `.approx.ftz` forms read only the upper 32 bits of the input and
                // clear the lower 32 bits of the result (PTX ISA, rcp/rsqrt.approx.ftz.f64).
                FloatUn::Rcp | FloatUn::Rsqrt if ftz => {
                    let hi = f64::from_bits(a & 0xffff_ffff_0000_0000);
                    let r = float::approx64(op, hi, true);
                    if r.is_nan() {
                        0x7fff_ffff_0000_0000
                    } else {
                        r.to_bits() & 0xffff_ffff_0000_0000
                    }
                }
                _ => float::approx64(op, x, ftz).to_bits(),
            }
        }
        Ty::F16 | Ty::Bf16 => float_un16(op, ty, rnd, ftz, a),
        Ty::F16x2 | Ty::Bf16x2 => {
            let h = if ty == Ty::F16x2 { Ty::F16 } else { Ty::Bf16 };
            float_un16(op, h, rnd, ftz, a) | (float_un16(op, h, rnd, ftz, a >> 16) << 16)
        }
        _ => 0,
    }
}

pub fn testp(kind: TestKind, ty: Ty, a: u64) -> bool {
    let x = to_f64(a, ty);
    let sub = match ty {
        Ty::F64 => f64b(a).is_subnormal(),
        _ => f32b(a).is_subnormal(),
    };
    match kind {
        TestKind::Finite => x.is_finite(),
        TestKind::Infinite => x.is_infinite(),
        TestKind::Number => !x.is_nan(),
        TestKind::NotANumber => x.is_nan(),
        // the manual counts zeros as normal
        TestKind::Normal => x.is_finite() && !sub,
        TestKind::Subnormal => sub,
    }
}

pub fn compare(cmp: Cmp, ty: Ty, ftz: bool, a: u64, b: u64) -> bool {
    if ty.float() {
        let (mut x, mut y) = (to_f64(a, ty), to_f64(b, ty));
        if ftz {
            x = float::flush(x, ty);
            y = float::flush(y, ty);
        }
        let unordered = x.is_nan() || y.is_nan();
        return match cmp {
            Cmp::Eq => !unordered && x == y,
            Cmp::Ne => !unordered && x != y,
            Cmp::Lt | Cmp::Lo => !unordered && x < y,
            Cmp::Le | Cmp::Ls => !unordered && x <= y,
            Cmp::Gt | Cmp::Hi => !unordered && x > y,
            Cmp::Ge | Cmp::Hs => !unordered && x >= y,
            Cmp::Equ => unordered || x == y,
            Cmp::Neu => unordered || x != y,
            Cmp::Ltu => unordered || x < y,
            Cmp::Leu => unordered || x <= y,
            Cmp::Gtu => unordered || x > y,
            Cmp::Geu => unordered || x >= y,
            Cmp::Num => !unordered,
            Cmp::Nan => unordered,
        };
    }
    let (x, y) = (val(a, ty), val(b, ty));
    let (ux, uy) = (a & mask(ty.bits()), b & mask(ty.bits()));
    match cmp {
        Cmp::Eq => ux == uy,
        Cmp::Ne => ux != uy,
        Cmp::Lt => x < y,
        Cmp::Le => x <= y,
        Cmp::Gt => x > y,
        Cmp::Ge => x >= y,
        Cmp::Lo => ux < uy,
        Cmp::Ls => ux <= uy,
        Cmp::Hi => ux > uy,
        Cmp::Hs => ux >= uy,
        _ => false,
    }
}

pub fn boolop(op: BoolOp, a: bool, b: bool) -> bool {
    match op {
        BoolOp::And => a && b,
        BoolOp::Or => a || b,
        BoolOp::Xor => a ^ b,
    }
}

/// An exact integer as an f64 pair `s + e`.
fn int_pair(v: i128) -> (f64, f64) {
    let s = v as f64;
    let e = (v - s as i128) as f64;
    (s, e)
}

/// Round an exact pair to f64 under a directed mode (`s` is already the nearest).
fn pair_to_f64(s: f64, e: f64, mode: Rnd) -> f64 {
    if e == 0.0 {
        return s;
    }
    match mode {
        Rnd::Up if e > 0.0 => s.next_up(),
        Rnd::Down if e < 0.0 => s.next_down(),
        Rnd::Zero if s > 0.0 && e < 0.0 => s.next_down(),
        Rnd::Zero if s < 0.0 && e > 0.0 => s.next_up(),
        _ => s,
    }
}

/// `cvt` for one lane; `dbits` is the destination register's width (sign extension of
/// narrow signed results into wider registers).
#[allow(clippy::too_many_arguments)]
pub fn cvt(
    dty: Ty,
    sty: Ty,
    rnd: Option<Rnd>,
    int_rnd: bool,
    ftz: bool,
    sat: bool,
    relu: bool,
    satfinite: bool,
    a: u64,
    dbits: u32,
) -> u64 {
    let widen = |v: u64| -> u64 {
        if dty.signed() {
            (sext(v, dty.bits()) as u64) & mask(dbits)
        } else {
            v & mask(dbits)
        }
    };
    match (dty.float(), sty.float()) {
        (false, false) => {
            let v = val(a, sty);
            if sat {
                widen(clamp_to(v, dty))
            } else {
                widen((v as u64) & mask(dty.bits()))
            }
        }
        (false, true) => {
            let mut x = to_f64(a, sty);
            if ftz && sty == Ty::F32 {
                x = float::flush(x, sty);
            }
            if x.is_nan() {
                return if sty == Ty::F64 || dty.bits() == 64 {
                    widen(1u64 << (dty.bits() - 1))
                } else {
                    0
                };
            }
            let r = float::round_integral(x, rnd.unwrap_or(Rnd::Zero));
            let v = if r.is_infinite() {
                if r > 0.0 { i128::MAX } else { i128::MIN }
            } else {
                r as i128
            };
            widen(clamp_to(v, dty))
        }
        (true, false) => {
            let (s, e) = int_pair(val(a, sty));
            let mode = rnd.unwrap_or(Rnd::Near);
            let bits = if dty == Ty::F64 {
                pair_to_f64(s, e, mode).to_bits()
            } else {
                float::from_exact(s, e, dty, mode)
            };
            finish_float(bits, dty, ftz, sat, relu, satfinite)
        }
        (true, true) => {
            let mut x = to_f64(a, sty);
            if ftz && sty == Ty::F32 {
                x = float::flush(x, sty);
            }
            if int_rnd {
                x = float::round_integral(x, rnd.unwrap_or(Rnd::Near));
            }
            let bits = if dty == Ty::F64 {
                if x.is_nan() {
                    float::NAN64
                } else {
                    x.to_bits()
                }
            } else if x.is_nan() {
                float::from_exact(f64::NAN, 0.0, dty, Rnd::Near)
            } else {
                float::from_exact(x, 0.0, dty, rnd.unwrap_or(Rnd::Near))
            };
            finish_float(bits, dty, ftz, sat, relu, satfinite)
        }
    }
}

fn finish_float(bits: u64, dty: Ty, ftz: bool, sat: bool, relu: bool, satfinite: bool) -> u64 {
    let mut v = to_f64(bits, dty);
    if v.is_nan() {
        return if sat { 0 } else { bits };
    }
    let max = match dty {
        Ty::F16 => 65504.0,
        Ty::Bf16 => half::bf16::MAX.to_f64(),
        Ty::Tf32 | Ty::F32 => f32::MAX as f64,
        _ => f64::MAX,
    };
    if ftz && dty == Ty::F32 {
        v = float::flush(v, dty);
    }
    if satfinite && v.is_infinite() {
        v = max.copysign(v);
    }
    if relu && v < 0.0 {
        v = 0.0;
    }
    if sat {
        v = float::sat(v);
    }
    if dty == Ty::F64 {
        v.to_bits()
    } else {
        float::from_exact(v, 0.0, dty, Rnd::Near)
    }
}

#[cfg(test)]
mod tests;
