//! Floating-point semantics of PTX: IEEE results under each rounding modifier, `.ftz`,
//! `.sat`, NaN rules of min/max, conversions between f64/f32/tf32/bf16/f16 and integers,
//! and the `.approx` functions.
//!
//! Directed rounding is exact: every operation first forms its result as an unevaluated
//! f64 pair `s + e` equal to the exact value (error-free transformations: TwoSum, the
//! exact f64 product of two narrower numbers, the fma remainder of a quotient or square
//! root), then `round_to` rounds that exact value to the target format.

use super::ir::{Rnd, Ty};

/// A binary floating-point format narrower than f64.
#[derive(Debug, Clone, Copy)]
pub struct Fmt {
    /// Stored fraction bits.
    pub frac: i32,
    /// Exponent of the smallest normal number.
    pub emin: i32,
    /// Exponent of the largest finite number.
    pub emax: i32,
}

pub const F32: Fmt = Fmt {
    frac: 23,
    emin: -126,
    emax: 127,
};
pub const TF32: Fmt = Fmt {
    frac: 10,
    emin: -126,
    emax: 127,
};
pub const BF16: Fmt = Fmt {
    frac: 7,
    emin: -126,
    emax: 127,
};
pub const F16: Fmt = Fmt {
    frac: 10,
    emin: -14,
    emax: 15,
};

impl Fmt {
    fn max(self) -> f64 {
        (2.0 - pow2(-self.frac)) * pow2(self.emax)
    }
    pub fn min_normal(self) -> f64 {
        pow2(self.emin)
    }
}

/// 2^q for the exponents of the formats above (normal f64 range).
fn pow2(q: i32) -> f64 {
    f64::from_bits(((q + 1023) as u64) << 52)
}

/// Exact binary exponent of a finite non-zero f64 (`floor(log2 |x|)`).
fn exponent(x: f64) -> i32 {
    let bits = x.to_bits();
    let e = ((bits >> 52) & 0x7ff) as i32;
    if e == 0 {
        // subnormal f64
        -1074 + (63 - (bits & ((1 << 52) - 1)).leading_zeros() as i32)
    } else {
        e - 1023
    }
}

/// Round the exact value `s + e` (with `|e| <= ulp64(s)/2`, `s` its f64 rounding) to
/// `fmt` under `mode`. Returns an f64 holding a value representable in `fmt` (or an
/// infinity).
pub fn round_to(s: f64, e: f64, fmt: Fmt, mode: Rnd) -> f64 {
    if s.is_nan() || s.is_infinite() {
        return s;
    }
    if s == 0.0 {
        // `s` is the nearest f64 of the exact value, so the exact value is this (signed) zero
        return s;
    }
    let neg = s < 0.0;
    let (m, me) = if neg { (-s, -e) } else { (s, e) };
    // ulp of the format at the exact magnitude (subnormals share the ulp of the smallest
    // normal binade); an exact value just below a power of two `m` lies in the binade
    // below m, whose ulp is half m's
    let mut q = exponent(m).max(fmt.emin) - fmt.frac;
    if me < 0.0 && m.to_bits() & ((1 << 52) - 1) == 0 && exponent(m) > fmt.emin {
        q -= 1;
    }
    let ulp = pow2(q);
    let t = m / ulp;
    let fl = t.floor();
    let frac = t - fl;
    // Directed modes round the exact magnitude down (toward zero) or up (away); nearest
    // compares the fraction with one half, the residual breaking exact ties.
    let on_grid = frac == 0.0 && me == 0.0;
    let floor_exact = if frac == 0.0 && me < 0.0 {
        fl - 1.0
    } else {
        fl
    };
    let n = match mode {
        Rnd::Near | Rnd::NearAway => {
            if frac > 0.5 || (frac == 0.5 && me > 0.0) {
                fl + 1.0
            } else if frac < 0.5 || me < 0.0 {
                fl
            } else if mode == Rnd::NearAway || fl % 2.0 != 0.0 {
                fl + 1.0
            } else {
                fl
            }
        }
        _ => {
            let away = match mode {
                Rnd::Down => neg,
                Rnd::Up => !neg,
                _ => false,
            };
            if on_grid {
                fl
            } else if away {
                floor_exact + 1.0
            } else {
                floor_exact
            }
        }
    };
    let mag = n * ulp;
    let r = if mag > fmt.max() {
        let to_inf = match mode {
            Rnd::Near | Rnd::NearAway => true,
            Rnd::Zero => false,
            Rnd::Down => neg,
            Rnd::Up => !neg,
        };
        if to_inf { f64::INFINITY } else { fmt.max() }
    } else {
        mag
    };
    if neg { -r } else { r }
}

/// The canonical NaN PTX arithmetic produces.
pub const NAN32: u32 = 0x7fff_ffff;
pub const NAN64: u64 = 0x7fff_ffff_ffff_ffff;

#[inline]
pub fn f32b(x: u64) -> f32 {
    f32::from_bits(x as u32)
}

#[inline]
pub fn f64b(x: u64) -> f64 {
    f64::from_bits(x)
}

/// Sign-preserving flush of an f32 subnormal to zero (`.ftz`).
#[inline]
pub fn ftz32(x: f32) -> f32 {
    if x.is_subnormal() {
        f32::from_bits(x.to_bits() & 0x8000_0000)
    } else {
        x
    }
}

#[inline]
pub fn ftz64(x: f64) -> f64 {
    if x.is_subnormal() {
        f64::from_bits(x.to_bits() & 0x8000_0000_0000_0000)
    } else {
        x
    }
}

/// `.sat`: clamp to [0, 1], NaN to 0.
#[inline]
pub fn sat(x: f64) -> f64 {
    if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) }
}

/// Exact sum as an f64 pair (Knuth's TwoSum).
pub fn two_sum(a: f64, b: f64) -> (f64, f64) {
    let s = a + b;
    let bb = s - a;
    let e = (a - (s - bb)) + (b - bb);
    (s, if s.is_finite() { e } else { 0.0 })
}

/// Exact `op` of two f32 values (promoted to f64) as an f64 pair.
pub fn exact32(op: Arith, a: f64, b: f64, c: f64) -> (f64, f64) {
    match op {
        Arith::Add => two_sum(a, b),
        Arith::Sub => two_sum(a, -b),
        // 24 x 24 bits: exact in f64
        Arith::Mul => (a * b, 0.0),
        Arith::Fma => two_sum(a * b, c),
        Arith::Div => {
            let q = a / b;
            if !q.is_finite() || q == 0.0 {
                return (q, 0.0);
            }
            // the remainder a - q b is exact; its sign says on which side the quotient is
            let r = (-q).mul_add(b, a);
            (q, r / b)
        }
        Arith::Sqrt => {
            let s = a.sqrt();
            if !s.is_finite() || s == 0.0 {
                return (s, 0.0);
            }
            let r = (-s).mul_add(s, a);
            (s, r / (2.0 * s))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arith {
    Add,
    Sub,
    Mul,
    Fma,
    Div,
    Sqrt,
}

/// An f32 arithmetic result under `mode`, with `.ftz` on inputs and output.
pub fn arith32(op: Arith, a: f32, b: f32, c: f32, mode: Rnd, ftz: bool) -> f32 {
    let (a, b, c) = if ftz {
        (ftz32(a), ftz32(b), ftz32(c))
    } else {
        (a, b, c)
    };
    let r = if mode == Rnd::Near {
        match op {
            Arith::Add => a + b,
            Arith::Sub => a - b,
            Arith::Mul => a * b,
            Arith::Fma => a.mul_add(b, c),
            Arith::Div => a / b,
            Arith::Sqrt => a.sqrt(),
        }
    } else {
        let (s, e) = exact32(op, a as f64, b as f64, c as f64);
        let r = round_to(s, e, F32, mode);
        let r = match op {
            Arith::Add if r == 0.0 => exact_zero_sum(a as f64, b as f64, r, mode),
            Arith::Sub if r == 0.0 => exact_zero_sum(a as f64, -b as f64, r, mode),
            Arith::Fma if r == 0.0 => exact_zero_sum(a as f64 * b as f64, c as f64, r, mode),
            _ => r,
        };
        r as f32
    };
    let r = if ftz { ftz32(r) } else { r };
    if r.is_nan() { f32::from_bits(NAN32) } else { r }
}

/// The rounded sum `r` of `x + y` when it is zero, with the sign IEEE 754 (6.3) gives
/// an exact zero sum: +0 for operands of opposite signs in every rounding mode but
/// toward -inf, where it is -0; `x + x` keeps the sign of x. (A nonzero sum rounded to
/// zero keeps its own sign, already in `r`.)
fn exact_zero_sum(x: f64, y: f64, r: f64, mode: Rnd) -> f64 {
    if x + y != 0.0 {
        return r;
    }
    let (nx, ny) = (x.is_sign_negative(), y.is_sign_negative());
    if x == 0.0 && y == 0.0 && nx == ny {
        return if nx { -0.0 } else { 0.0 };
    }
    if mode == Rnd::Down { -0.0 } else { 0.0 }
}

/// An f64 arithmetic result under `mode` (fma only with round-to-nearest: refused at
/// load otherwise).
pub fn arith64(op: Arith, a: f64, b: f64, c: f64, mode: Rnd) -> f64 {
    let near = match op {
        Arith::Add => a + b,
        Arith::Sub => a - b,
        Arith::Mul => a * b,
        Arith::Fma => a.mul_add(b, c),
        Arith::Div => a / b,
        Arith::Sqrt => a.sqrt(),
    };
    if near.is_nan() {
        return f64::from_bits(NAN64);
    }
    if mode == Rnd::Near || op == Arith::Fma {
        return near;
    }
    if near.is_infinite() {
        // Overflow of finite operands rounds to the largest finite value toward zero
        // (and toward -inf for a positive result, +inf for a negative one); an infinite
        // operand or a division by zero gives the exact infinity.
        let overflow = a.is_finite() && b.is_finite() && !(op == Arith::Div && b == 0.0);
        let to_max = match mode {
            Rnd::Zero => true,
            Rnd::Down => near > 0.0,
            Rnd::Up => near < 0.0,
            _ => false,
        };
        return if overflow && to_max {
            f64::MAX.copysign(near)
        } else {
            near
        };
    }
    if near == 0.0 && matches!(op, Arith::Add | Arith::Sub) {
        return exact_zero_sum(a, if op == Arith::Sub { -b } else { b }, near, mode);
    }
    // Sign of (exact - near): from an error-free transformation of the operation.
    let err = match op {
        Arith::Add => two_sum(a, b).1,
        Arith::Sub => two_sum(a, -b).1,
        Arith::Mul => a.mul_add(b, -near),
        Arith::Div => (-near).mul_add(b, a) * b.signum(),
        Arith::Sqrt => (-near).mul_add(near, a),
        Arith::Fma => 0.0,
    };
    let neg = near < 0.0 || (near == 0.0 && err < 0.0);
    let adjust_up = match mode {
        Rnd::Up => err > 0.0,
        Rnd::Down => false,
        Rnd::Zero => neg && err > 0.0,
        _ => false,
    };
    let adjust_down = match mode {
        Rnd::Down => err < 0.0,
        Rnd::Zero => !neg && err < 0.0,
        _ => false,
    };
    if adjust_up {
        near.next_up()
    } else if adjust_down {
        near.next_down()
    } else {
        near
    }
}

/// PTX `min`/`max`: a NaN operand yields the other one (both NaN: canonical NaN);
/// -0 orders below +0. With `nan` (`.NaN`), any NaN operand gives NaN.
pub fn minmax(a: f64, b: f64, max: bool, nan: bool) -> f64 {
    if a.is_nan() || b.is_nan() {
        if nan || (a.is_nan() && b.is_nan()) {
            return f64::NAN;
        }
        return if a.is_nan() { b } else { a };
    }
    if a == b {
        // equal values: only the signs of zeros can differ
        let a_neg = a.is_sign_negative();
        return if a_neg != max { a } else { b };
    }
    if (a < b) != max { a } else { b }
}

/// Round an f64 to the nearest integral value under `mode` (`cvt.rni` etc.).
pub fn round_integral(x: f64, mode: Rnd) -> f64 {
    match mode {
        Rnd::Near => x.round_ties_even(),
        Rnd::NearAway => x.round(),
        Rnd::Zero => x.trunc(),
        Rnd::Down => x.floor(),
        Rnd::Up => x.ceil(),
    }
}

/// The value of a float register of type `ty` as f64 (f16/bf16 from the low 16 bits).
pub fn to_f64(bits: u64, ty: Ty) -> f64 {
    match ty {
        Ty::F64 => f64::from_bits(bits),
        Ty::F32 | Ty::Tf32 => f32::from_bits(bits as u32) as f64,
        Ty::F16 => half::f16::from_bits(bits as u16).to_f64(),
        Ty::Bf16 => half::bf16::from_bits(bits as u16).to_f64(),
        _ => f64::NAN,
    }
}

/// Encode `v + e` (exact) as a value of float type `ty` under `mode`. The input is assumed
/// representable already when `ty` is f64.
pub fn from_exact(v: f64, e: f64, ty: Ty, mode: Rnd) -> u64 {
    match ty {
        Ty::F64 => {
            if v.is_nan() {
                NAN64
            } else {
                v.to_bits()
            }
        }
        Ty::F32 => {
            if v.is_nan() {
                return NAN32 as u64;
            }
            (round_to(v, e, F32, mode) as f32).to_bits() as u64
        }
        // tf32 lives in a 32-bit register with the low 13 fraction bits zero
        Ty::Tf32 => {
            if v.is_nan() {
                return NAN32 as u64;
            }
            (round_to(v, e, TF32, mode) as f32).to_bits() as u64
        }
        Ty::F16 => {
            if v.is_nan() {
                return 0x7fff;
            }
            half::f16::from_f64(round_to(v, e, F16, mode)).to_bits() as u64
        }
        Ty::Bf16 => {
            if v.is_nan() {
                return 0x7fff;
            }
            half::bf16::from_f64(round_to(v, e, BF16, mode)).to_bits() as u64
        }
        _ => 0,
    }
}

/// Flush a subnormal value of format `ty` to a signed zero.
pub fn flush(v: f64, ty: Ty) -> f64 {
    let min = match ty {
        Ty::F64 => f64::MIN_POSITIVE,
        Ty::F16 => F16.min_normal(),
        _ => F32.min_normal(),
    };
    if v != 0.0 && v.abs() < min {
        0.0f64.copysign(v)
    } else {
        v
    }
}

/// The `.approx` functions. Each is computed in f64 and rounded to nearest, which is
/// within every error bound the PTX ISA documents; special values follow the manual.
pub fn approx32(op: super::ir::FloatUn, x: f32, ftz: bool) -> f32 {
    use super::ir::FloatUn as U;
    let x = if ftz { ftz32(x) } else { x };
    let v = x as f64;
    let r = match op {
        U::Ex2 => v.exp2(),
        U::Lg2 => v.log2(),
        U::Sin => v.sin(),
        U::Cos => v.cos(),
        U::Tanh => v.tanh(),
        U::Rcp => 1.0 / v,
        U::Sqrt => v.sqrt(),
        U::Rsqrt => 1.0 / v.sqrt(),
        U::Neg => -v,
        U::Abs => v.abs(),
    };
    let r = r as f32;
    let r = if ftz { ftz32(r) } else { r };
    if r.is_nan() { f32::from_bits(NAN32) } else { r }
}

pub fn approx64(op: super::ir::FloatUn, x: f64, ftz: bool) -> f64 {
    use super::ir::FloatUn as U;
    let x = if ftz { ftz64(x) } else { x };
    let r = match op {
        U::Rcp => 1.0 / x,
        U::Rsqrt => 1.0 / x.sqrt(),
        U::Sqrt => x.sqrt(),
        U::Ex2 => x.exp2(),
        U::Lg2 => x.log2(),
        U::Sin => x.sin(),
        U::Cos => x.cos(),
        U::Tanh => x.tanh(),
        U::Neg => -x,
        U::Abs => x.abs(),
    };
    let r = if ftz { ftz64(r) } else { r };
    if r.is_nan() { f64::from_bits(NAN64) } else { r }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits_round(v: f64, mode: Rnd) -> u32 {
        (round_to(v, 0.0, F32, mode) as f32).to_bits()
    }

    #[test]
    fn directed_rounding_of_f32_arithmetic_brackets_the_exact_value() {
        // 1 + 2^-30 is not an f32: down/zero give 1, up gives the next f32.
        let (a, b) = (1.0f32, 2f32.powi(-30));
        assert_eq!(arith32(Arith::Add, a, b, 0.0, Rnd::Down, false), 1.0);
        assert_eq!(arith32(Arith::Add, a, b, 0.0, Rnd::Zero, false), 1.0);
        assert_eq!(
            arith32(Arith::Add, a, b, 0.0, Rnd::Up, false),
            1.0f32.next_up()
        );
        assert_eq!(
            arith32(Arith::Add, -a, -b, 0.0, Rnd::Down, false),
            (-1.0f32).next_down()
        );
        // 1/3 in every mode: down < exact < up, nearest as native division
        let third = arith32(Arith::Div, 1.0, 3.0, 0.0, Rnd::Near, false);
        assert_eq!(third, 1.0f32 / 3.0);
        let (dn, up) = (
            arith32(Arith::Div, 1.0, 3.0, 0.0, Rnd::Down, false),
            arith32(Arith::Div, 1.0, 3.0, 0.0, Rnd::Up, false),
        );
        assert!((dn as f64) < 1.0 / 3.0 && (up as f64) > 1.0 / 3.0);
        assert_eq!(dn.next_up(), up);
        // fma rounds once: (1 + 2^-23)(1 - 2^-23) - 1 = -2^-46 exactly
        let e = 2f32.powi(-23);
        assert_eq!(
            arith32(Arith::Fma, 1.0 + e, 1.0 - e, -1.0, Rnd::Zero, false),
            -2f32.powi(-46)
        );
        // overflow: toward zero stays finite
        assert_eq!(
            arith32(Arith::Mul, f32::MAX, 2.0, 0.0, Rnd::Zero, false),
            f32::MAX
        );
        assert_eq!(
            arith32(Arith::Mul, f32::MAX, 2.0, 0.0, Rnd::Near, false),
            f32::INFINITY
        );
    }

    #[test]
    fn ties_and_subnormals() {
        // halfway between 1 and 1 + 2^-23: even is 1; away is 1 + 2^-23
        let mid = 1.0 + 2f64.powi(-24);
        assert_eq!(bits_round(mid, Rnd::Near), 1.0f32.to_bits());
        assert_eq!(bits_round(mid, Rnd::NearAway), 1.0f32.next_up().to_bits());
        // a tie broken by the residual
        assert_eq!(
            (round_to(mid, 1e-30, F32, Rnd::Near) as f32).to_bits(),
            1.0f32.next_up().to_bits()
        );
        // subnormal results round on the subnormal grid
        let tiny = f32::from_bits(1) as f64 * 1.5;
        assert_eq!(bits_round(tiny, Rnd::Near), 2);
        assert_eq!(bits_round(tiny, Rnd::Down), 1);
        assert_eq!(ftz32(f32::from_bits(0x8000_0001)).to_bits(), 0x8000_0000);
        // bf16 and f16 agree with the `half` crate's round-to-nearest-even
        for v in [1.0f64 / 3.0, 3.25159, -65504.0, 1e-6, 70000.0] {
            assert_eq!(
                from_exact(v, 0.0, Ty::Bf16, Rnd::Near) as u16,
                half::bf16::from_f64(v).to_bits()
            );
            assert_eq!(
                from_exact(v, 0.0, Ty::F16, Rnd::Near) as u16,
                half::f16::from_f64(v).to_bits()
            );
        }
    }

    #[test]
    fn min_max_follow_ptx_nan_and_zero_rules() {
        assert_eq!(minmax(f64::NAN, 2.0, false, false), 2.0);
        assert!(minmax(f64::NAN, 2.0, false, true).is_nan());
        assert!(minmax(-0.0, 0.0, false, false).is_sign_negative());
        assert!(minmax(-0.0, 0.0, true, false).is_sign_positive());
        assert_eq!(minmax(1.0, 2.0, true, false), 2.0);
    }
}
