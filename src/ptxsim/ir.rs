//! The compact, register-indexed form a PTX entry is lowered to once, at module load:
//! operands are register indices or immediates, branch targets are instruction indices,
//! symbols are resolved to state-space offsets, and each instruction carries the PTX line
//! it came from (for reports).

/// A register index into a warp's register file.
pub type Reg = u32;

/// A source operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Src {
    R(Reg),
    /// Immediate bits, already in the instruction's type.
    I(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    B8,
    B16,
    B32,
    B64,
    B128,
    U8,
    U16,
    U32,
    U64,
    S8,
    S16,
    S32,
    S64,
    F16,
    F16x2,
    Bf16,
    Bf16x2,
    Tf32,
    F32,
    F64,
    Pred,
}

impl Ty {
    pub fn parse(s: &str) -> Option<Ty> {
        Some(match s {
            "b8" => Ty::B8,
            "b16" => Ty::B16,
            "b32" => Ty::B32,
            "b64" => Ty::B64,
            "b128" => Ty::B128,
            "u8" => Ty::U8,
            "u16" => Ty::U16,
            "u32" => Ty::U32,
            "u64" => Ty::U64,
            "s8" => Ty::S8,
            "s16" => Ty::S16,
            "s32" => Ty::S32,
            "s64" => Ty::S64,
            "f16" => Ty::F16,
            "f16x2" => Ty::F16x2,
            "bf16" => Ty::Bf16,
            "bf16x2" => Ty::Bf16x2,
            "tf32" => Ty::Tf32,
            "f32" => Ty::F32,
            "f64" => Ty::F64,
            "pred" => Ty::Pred,
            _ => return None,
        })
    }

    pub fn bits(self) -> u32 {
        match self {
            Ty::Pred => 1,
            Ty::B8 | Ty::U8 | Ty::S8 => 8,
            Ty::B16 | Ty::U16 | Ty::S16 | Ty::F16 | Ty::Bf16 => 16,
            Ty::B32 | Ty::U32 | Ty::S32 | Ty::F32 | Ty::F16x2 | Ty::Bf16x2 | Ty::Tf32 => 32,
            Ty::B64 | Ty::U64 | Ty::S64 | Ty::F64 => 64,
            Ty::B128 => 128,
        }
    }

    pub fn bytes(self) -> u32 {
        self.bits().div_ceil(8)
    }

    pub fn signed(self) -> bool {
        matches!(self, Ty::S8 | Ty::S16 | Ty::S32 | Ty::S64)
    }

    pub fn float(self) -> bool {
        matches!(
            self,
            Ty::F16 | Ty::F16x2 | Ty::Bf16 | Ty::Bf16x2 | Ty::Tf32 | Ty::F32 | Ty::F64
        )
    }
}

/// IEEE rounding of a floating-point result (`.rn .rz .rm .rp`, and `.rna` for tf32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rnd {
    Near,
    Zero,
    Down,
    Up,
    NearAway,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemSpace {
    Global,
    Shared,
    Local,
    Param,
    Const,
    Generic,
}

/// `[base + off]`; symbols are folded into `off` (their offset in the state space, or
/// their absolute address for module-level globals).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addr {
    pub base: Option<Reg>,
    pub off: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntOp {
    Add,
    Sub,
    MulLo,
    MulHi,
    MulWide,
    MadLo,
    MadHi,
    MadWide,
    Div,
    Rem,
    Min,
    Max,
    And,
    Or,
    Xor,
    Shl,
    Shr,
    Sad,
    Mul24Lo,
    Mad24Lo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntUn {
    Neg,
    Abs,
    Not,
    Cnot,
    Popc,
    Clz,
    Brev,
    Bfind,
    BfindShift,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatOp {
    Add,
    Sub,
    Mul,
    Div,
    /// `div.approx.f32`: `a * (1/b)` with the reciprocal flushed when subnormal (so
    /// `|b|` in [2^126, 2^128] gives 0, as the manual documents).
    DivApprox,
    Min,
    Max,
    /// `min.NaN` / `max.NaN`: a NaN operand gives NaN.
    MinNan,
    MaxNan,
    Fma,
    Copysign,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatUn {
    Neg,
    Abs,
    Sqrt,
    Rsqrt,
    Rcp,
    Ex2,
    Lg2,
    Sin,
    Cos,
    Tanh,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Lo,
    Ls,
    Hi,
    Hs,
    Equ,
    Neu,
    Ltu,
    Leu,
    Gtu,
    Geu,
    Num,
    Nan,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BoolOp {
    And,
    Or,
    Xor,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestKind {
    Finite,
    Infinite,
    Number,
    NotANumber,
    Normal,
    Subnormal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtomOp {
    Add,
    Min,
    Max,
    Inc,
    Dec,
    And,
    Or,
    Xor,
    Exch,
    Cas,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShflMode {
    Up,
    Down,
    Bfly,
    Idx,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VoteMode {
    All,
    Any,
    Uni,
    Ballot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    X,
    Y,
    Z,
}

/// Special registers whose value changes while a thread runs (the constant ones, such as
/// `%tid.x`, are hidden registers set when the warp starts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clock {
    Clock32,
    Clock64,
    GlobalTimer,
}

/// Matrix shapes of `mma.sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmaShape {
    M16n8k16,
    M16n8k8,
    M16n8k4,
}

/// How many bytes a `cp.async` reads from its source; the rest of cp-size is zero-filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpFill {
    /// All cp-size bytes.
    All,
    /// The `src-size` operand.
    SrcSize(Src),
    /// The `ignore-src` predicate (negated when the bool is set): true reads nothing.
    IgnoreSrc(Src, bool),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Nop,
    /// Copy bits (masked to the destination register's width on write).
    Mov {
        d: Reg,
        a: Src,
    },
    Clock {
        d: Reg,
        which: Clock,
    },
    /// `mov.b64 d, {a, b}`: parts from the least significant, each `bits` wide.
    Pack {
        d: Reg,
        parts: Vec<Src>,
        bits: u32,
    },
    /// `mov.b64 {a, b}, s`: `None` for `_`.
    Unpack {
        ds: Vec<Option<Reg>>,
        a: Src,
        bits: u32,
    },
    /// `cvta[.to].space`: generic <-> state-space address.
    Cvta {
        d: Reg,
        a: Src,
        space: MemSpace,
        to: bool,
    },
    Int {
        op: IntOp,
        ty: Ty,
        d: Reg,
        a: Src,
        b: Src,
        c: Src,
        sat: bool,
    },
    IntUn {
        op: IntUn,
        ty: Ty,
        d: Reg,
        a: Src,
    },
    Bfe {
        ty: Ty,
        d: Reg,
        a: Src,
        b: Src,
        c: Src,
    },
    Bfi {
        ty: Ty,
        d: Reg,
        f: Src,
        a: Src,
        b: Src,
        c: Src,
    },
    Prmt {
        d: Reg,
        a: Src,
        b: Src,
        c: Src,
    },
    Lop3 {
        d: Reg,
        a: Src,
        b: Src,
        c: Src,
        lut: u8,
    },
    /// Funnel shift (`shf.l` / `shf.r`, `.wrap` or `.clamp`).
    Shf {
        left: bool,
        wrap: bool,
        d: Reg,
        a: Src,
        b: Src,
        c: Src,
    },
    Float {
        op: FloatOp,
        ty: Ty,
        rnd: Rnd,
        ftz: bool,
        sat: bool,
        d: Reg,
        a: Src,
        b: Src,
        c: Src,
    },
    FloatUn {
        op: FloatUn,
        ty: Ty,
        rnd: Rnd,
        approx: bool,
        ftz: bool,
        d: Reg,
        a: Src,
    },
    Testp {
        kind: TestKind,
        ty: Ty,
        d: Reg,
        a: Src,
    },
    Setp {
        cmp: Cmp,
        ty: Ty,
        ftz: bool,
        d: Reg,
        q: Option<Reg>,
        a: Src,
        b: Src,
        combine: Option<(BoolOp, Src, bool)>,
    },
    /// `selp d, a, b, p`: `d = p ? a : b`.
    Selp {
        d: Reg,
        a: Src,
        b: Src,
        p: Src,
    },
    Cvt {
        dty: Ty,
        sty: Ty,
        rnd: Option<Rnd>,
        /// `.rni .rzi .rmi .rpi`: round a float to an integral value.
        int_rnd: bool,
        ftz: bool,
        sat: bool,
        relu: bool,
        satfinite: bool,
        d: Reg,
        a: Src,
    },
    /// `cvt.rn.{bf16x2,f16x2}.f32 d, a, b`: `a` goes to the upper half.
    CvtPack {
        dty: Ty,
        rnd: Rnd,
        relu: bool,
        satfinite: bool,
        d: Reg,
        a: Src,
        b: Src,
    },
    Ld {
        space: MemSpace,
        ty: Ty,
        d: Vec<Option<Reg>>,
        addr: Addr,
    },
    St {
        space: MemSpace,
        ty: Ty,
        a: Vec<Src>,
        addr: Addr,
    },
    /// `atom` (with `d`) or `red` (without).
    Atom {
        space: MemSpace,
        op: AtomOp,
        ty: Ty,
        d: Option<Reg>,
        addr: Addr,
        b: Src,
        c: Src,
    },
    Bra {
        target: u32,
    },
    Exit,
    /// `bar.sync` / `barrier.sync` (`arrive` for `bar.arrive`): barrier `id`, optional
    /// thread count.
    Bar {
        id: Src,
        count: Option<Src>,
        arrive: bool,
    },
    BarWarp {
        mask: Src,
    },
    Shfl {
        mode: ShflMode,
        d: Reg,
        p: Option<Reg>,
        a: Src,
        b: Src,
        c: Src,
        mask: Src,
    },
    Vote {
        mode: VoteMode,
        d: Reg,
        a: Src,
        neg: bool,
        mask: Src,
    },
    Activemask {
        d: Reg,
    },
    Mma {
        shape: MmaShape,
        /// Input element type (bf16, f16 or tf32) and accumulator type (f32 or f16).
        ab: Ty,
        acc: Ty,
        d: Vec<Reg>,
        a: Vec<Src>,
        b: Vec<Src>,
        c: Vec<Src>,
    },
    Ldmatrix {
        count: u32,
        trans: bool,
        d: Vec<Reg>,
        addr: Addr,
        space: MemSpace,
    },
    Stmatrix {
        count: u32,
        trans: bool,
        a: Vec<Src>,
        addr: Addr,
        space: MemSpace,
    },
    /// `cp.async.{ca,cg}.shared.global [dst], [src], size{, src_size | ignore_src}`.
    CpAsync {
        size: u32,
        fill: CpFill,
        dst: Addr,
        src: Addr,
    },
    CpAsyncCommit,
    /// `cp.async.wait_group n` (`all`: `wait_all`, which also covers uncommitted copies).
    CpAsyncWait {
        pending: u32,
        all: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Inst {
    pub op: Op,
    /// `@p` / `@!p`.
    pub guard: Option<(Reg, bool)>,
    pub line: u32,
}

/// A kernel parameter's place in the parameter buffer.
#[derive(Debug, Clone)]
pub struct ParamSlot {
    pub name: String,
    /// PTX type as written (`u64`, `f32`, `b8` for byte arrays).
    pub ty: String,
    pub offset: usize,
    pub size: usize,
}

/// A named region of the block's shared memory (for reports).
#[derive(Debug, Clone)]
pub struct SharedVar {
    pub name: String,
    pub offset: usize,
    pub size: usize,
}

/// One lowered `.entry`.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub name: String,
    pub code: Vec<Inst>,
    /// Register widths in bits (1 for predicates); writes are masked to them.
    pub reg_bits: Vec<u8>,
    pub params: Vec<ParamSlot>,
    pub param_bytes: usize,
    pub shared_static: usize,
    pub shared_vars: Vec<SharedVar>,
    /// Alignment at which dynamic shared memory (`.extern .shared x[]`) starts.
    pub dyn_shared_align: usize,
    pub local_bytes: usize,
    pub maxntid: Option<[u32; 3]>,
    pub reqntid: Option<[u32; 3]>,
}

/// The hidden registers 0.. : per-thread constants (set when a warp starts) and the sink.
pub const HIDDEN: &[&str] = &[
    "%tid.x",
    "%tid.y",
    "%tid.z",
    "%ntid.x",
    "%ntid.y",
    "%ntid.z",
    "%ctaid.x",
    "%ctaid.y",
    "%ctaid.z",
    "%nctaid.x",
    "%nctaid.y",
    "%nctaid.z",
    "%laneid",
    "%warpid",
    "%nwarpid",
    "%smid",
    "%nsmid",
    "%gridid",
    "%lanemask_eq",
    "%lanemask_lt",
    "%lanemask_le",
    "%lanemask_gt",
    "%lanemask_ge",
    "%dynamic_smem_size",
    "%total_smem_size",
    // the destination of `_`
    "_",
];
