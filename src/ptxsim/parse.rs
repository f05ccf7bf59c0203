//! PTX text to a syntax tree: module directives, variables, entry points with their
//! parameters and bodies (register declarations, labels, instructions). Meaning is given
//! to opcodes and operands later, by `lower`.

use super::lex::{Tok, Token, lex};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    Global,
    Const,
    Shared,
    Local,
    Param,
}

/// A variable: `.shared .align 4 .b8 name[128];`, `.extern .shared .b8 dyn[];`, ...
#[derive(Debug, Clone)]
pub struct VarDecl {
    pub space: Space,
    pub align: u32,
    /// Element type as written (`.b8`, `.f32`, ...), without the dot.
    pub ty: String,
    /// `.v2` / `.v4` vector variables.
    pub vec: u32,
    pub name: String,
    /// Array length: `None` for a scalar, `Some(None)` for `name[]`.
    pub array: Option<Option<u64>>,
    pub is_extern: bool,
    /// Initialiser values (integers or float bits), if any.
    pub init: Vec<u64>,
    pub line: u32,
}

#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub ty: String,
    pub align: Option<u32>,
    pub array: Option<u64>,
    pub line: u32,
}

#[derive(Debug, Clone)]
pub struct Function {
    pub name: String,
    pub is_entry: bool,
    pub params: Vec<Param>,
    pub maxntid: Option<[u32; 3]>,
    pub reqntid: Option<[u32; 3]>,
    pub body: Vec<Stmt>,
    pub line: u32,
}

#[derive(Debug, Clone)]
pub enum Stmt {
    /// `.reg .f32 %f<10>;` (`Some(10)`: `%f0..%f9`) or `.reg .b32 %r1, %r2;`.
    Reg {
        ty: String,
        names: Vec<(String, Option<u32>)>,
        line: u32,
    },
    Var(VarDecl),
    Label(String, u32),
    Inst(Inst),
    /// `{` and `}`: a nested scope (registers declared inside are local to it).
    Open,
    Close,
}

#[derive(Debug, Clone)]
pub struct Inst {
    /// `@%p` / `@!%p`: (negated, register).
    pub guard: Option<(bool, String)>,
    pub opcode: String,
    pub ops: Vec<Operand>,
    pub line: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    /// A register, special register, symbol or label name.
    Name(String),
    /// `!%p`.
    Not(String),
    /// A symbol plus a byte offset: `name+4`.
    NameOff(String, i64),
    Int(i64),
    /// Float literal as f32 bits (`0f...`).
    F32(u32),
    /// Float literal as f64 bits (`0d...` or decimal).
    F64(u64),
    /// `[base+off]` (base a register or symbol) or `[imm]`.
    Mem(Option<String>, i64),
    /// `{a, b, ...}`.
    Vec(Vec<Operand>),
    /// `%p|%q`: a predicate and its complement (setp) or the lane predicate (shfl).
    Pair(String, String),
    /// `_`: a discarded result.
    Sink,
}

#[derive(Debug, Default)]
pub struct Module {
    pub version: String,
    pub target: String,
    pub vars: Vec<VarDecl>,
    pub functions: Vec<Function>,
}

pub type ParseError = (u32, String);

struct P {
    toks: Vec<Token>,
    i: usize,
}

/// Parse an integer or float literal as written in PTX.
pub fn number(w: &str) -> Option<Operand> {
    let w = w.strip_suffix('U').unwrap_or(w);
    let hex = |s: &str| u64::from_str_radix(s, 16).ok();
    if let Some(h) = w.strip_prefix("0f").or_else(|| w.strip_prefix("0F")) {
        return (h.len() == 8).then(|| hex(h).map(|v| Operand::F32(v as u32)))?;
    }
    if let Some(h) = w.strip_prefix("0d").or_else(|| w.strip_prefix("0D")) {
        return (h.len() == 16).then(|| hex(h).map(Operand::F64))?;
    }
    if let Some(h) = w.strip_prefix("0x").or_else(|| w.strip_prefix("0X")) {
        return hex(h).map(|v| Operand::Int(v as i64));
    }
    if let Some(b) = w.strip_prefix("0b").or_else(|| w.strip_prefix("0B")) {
        return u64::from_str_radix(b, 2)
            .ok()
            .map(|v| Operand::Int(v as i64));
    }
    if !w.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    if w.contains(['.', 'e', 'E']) {
        return w.parse::<f64>().ok().map(|v| Operand::F64(v.to_bits()));
    }
    if w.len() > 1 && w.starts_with('0') {
        return u64::from_str_radix(&w[1..], 8)
            .ok()
            .map(|v| Operand::Int(v as i64));
    }
    w.parse::<u64>().ok().map(|v| Operand::Int(v as i64))
}

impl P {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.i).map(|t| &t.tok)
    }
    fn line(&self) -> u32 {
        self.toks
            .get(self.i)
            .or(self.toks.last())
            .map_or(0, |t| t.line)
    }
    fn err<T>(&self, msg: impl Into<String>) -> Result<T, ParseError> {
        Err((self.line(), msg.into()))
    }
    fn next(&mut self) -> Result<Tok, ParseError> {
        let t = self.toks.get(self.i).map(|t| t.tok.clone());
        self.i += 1;
        t.ok_or((self.line(), "unexpected end of text".into()))
    }
    fn is_punct(&self, c: char) -> bool {
        self.peek() == Some(&Tok::Punct(c))
    }
    fn eat(&mut self, c: char) -> bool {
        let yes = self.is_punct(c);
        if yes {
            self.i += 1;
        }
        yes
    }
    fn expect(&mut self, c: char) -> Result<(), ParseError> {
        if self.eat(c) {
            Ok(())
        } else {
            self.err(format!("expected `{c}`"))
        }
    }
    fn word(&mut self) -> Result<String, ParseError> {
        match self.next()? {
            Tok::Word(w) => Ok(w),
            t => {
                self.i -= 1;
                self.err(format!("expected a name, found {t:?}"))
            }
        }
    }
    fn uint(&mut self) -> Result<u64, ParseError> {
        let w = self.word()?;
        match number(&w) {
            Some(Operand::Int(v)) if v >= 0 => Ok(v as u64),
            _ => self.err(format!("expected a non-negative integer, found `{w}`")),
        }
    }
    /// Skip the rest of the current source line (`.loc`, `.file`).
    fn skip_line(&mut self) {
        let line = self.toks[self.i - 1].line;
        while self.i < self.toks.len() && self.toks[self.i].line == line {
            self.i += 1;
        }
    }
    /// Skip a balanced `{ ... }` (a `.section` or a `.func` body we do not run).
    fn skip_braces(&mut self) -> Result<(), ParseError> {
        self.expect('{')?;
        let mut depth = 1;
        while depth > 0 {
            match self.next()? {
                Tok::Punct('{') => depth += 1,
                Tok::Punct('}') => depth -= 1,
                _ => {}
            }
        }
        Ok(())
    }
}

/// Parse a whole PTX module.
pub fn parse(text: &str) -> Result<Module, ParseError> {
    let mut p = P {
        toks: lex(text)?,
        i: 0,
    };
    let mut m = Module::default();
    while p.i < p.toks.len() {
        let w = p.word()?;
        match w.as_str() {
            ".version" => m.version = p.word()?,
            ".target" => {
                m.target = p.word()?;
                while p.eat(',') {
                    p.word()?;
                }
            }
            ".address_size" => {
                let bits = p.uint()?;
                if bits != 64 {
                    return p.err(format!(
                        ".address_size {bits}: only 64-bit PTX is supported"
                    ));
                }
            }
            ".file" | ".loc" => p.skip_line(),
            ".section" => {
                p.word()?;
                p.skip_braces()?;
            }
            ".visible" | ".weak" | ".extern" | ".entry" | ".func" | ".global" | ".const"
            | ".shared" | ".local" => {
                let mut is_extern = w == ".extern";
                let mut kw = w;
                while matches!(kw.as_str(), ".visible" | ".weak" | ".extern") {
                    kw = p.word()?;
                    is_extern |= kw == ".extern";
                }
                match kw.as_str() {
                    ".entry" => m.functions.push(function(&mut p, true)?),
                    ".func" => {
                        let f = function(&mut p, false)?;
                        m.functions.push(f);
                    }
                    _ => {
                        let v = var_decl(&mut p, &kw, is_extern)?;
                        p.expect(';')?;
                        m.vars.push(v);
                    }
                }
            }
            other => return p.err(format!("unexpected `{other}` at module level")),
        }
    }
    Ok(m)
}

fn space(kw: &str) -> Option<Space> {
    Some(match kw {
        ".global" => Space::Global,
        ".const" => Space::Const,
        ".shared" => Space::Shared,
        ".local" => Space::Local,
        ".param" => Space::Param,
        _ => return None,
    })
}

/// After the state-space keyword: `[.align N] [.vN] .type name[[N]] [= init]`.
fn var_decl(p: &mut P, kw: &str, is_extern: bool) -> Result<VarDecl, ParseError> {
    let line = p.line();
    let sp = space(kw).ok_or((line, format!("`{kw}` is not a state space")))?;
    let (mut align, mut vec, mut ty) = (0u32, 1u32, String::new());
    loop {
        let w = p.word()?;
        match w.as_str() {
            ".align" => align = p.uint()? as u32,
            ".v2" => vec = 2,
            ".v4" => vec = 4,
            ".ptr" | ".global" | ".shared" | ".const" | ".local" => {}
            t if t.starts_with('.') => ty = t[1..].to_string(),
            name => {
                if ty.is_empty() {
                    return p.err(format!("variable `{name}` has no type"));
                }
                let mut array = None;
                if p.eat('[') {
                    if p.eat(']') {
                        array = Some(None);
                    } else {
                        array = Some(Some(p.uint()?));
                        p.expect(']')?;
                    }
                    while p.eat('[') {
                        let n = p.uint()?;
                        p.expect(']')?;
                        if let Some(Some(a)) = array.as_mut() {
                            *a *= n;
                        }
                    }
                }
                let mut init = Vec::new();
                if p.eat('=') {
                    let braced = p.eat('{');
                    loop {
                        let neg = p.eat('-');
                        let w = p.word()?;
                        let v = match number(&w) {
                            Some(n) => init_bits(n, neg, &ty),
                            None => return p.err(format!("unsupported initialiser `{w}`")),
                        };
                        init.push(v);
                        if !p.eat(',') {
                            break;
                        }
                    }
                    if braced {
                        p.expect('}')?;
                    }
                }
                return Ok(VarDecl {
                    space: sp,
                    align,
                    ty,
                    vec,
                    name: name.to_string(),
                    array,
                    is_extern,
                    init,
                    line,
                });
            }
        }
    }
}

/// The bits an initialiser literal stores in a variable of type `ty`: numbers are
/// converted to a floating-point variable's format (so `2.5`, `0f40200000` and `2` all
/// initialise an `.f32` to 2.5, 2.5 and 2.0); other variables take the literal's bits.
fn init_bits(n: Operand, neg: bool, ty: &str) -> u64 {
    let sign = if neg { -1.0 } else { 1.0 };
    let int = |v: i64| if neg { v.wrapping_neg() } else { v };
    let value = match n {
        Operand::Int(v) => int(v) as f64,
        Operand::F32(b) => f32::from_bits(b) as f64 * sign,
        Operand::F64(b) => f64::from_bits(b) * sign,
        _ => 0.0,
    };
    match (ty, n) {
        ("f64", _) => value.to_bits(),
        ("f32", _) => (value as f32).to_bits() as u64,
        ("f16", _) => half::f16::from_f64(value).to_bits() as u64,
        (_, Operand::Int(v)) => int(v) as u64,
        (_, Operand::F32(b)) => (b ^ if neg { 1 << 31 } else { 0 }) as u64,
        (_, Operand::F64(b)) => b ^ if neg { 1 << 63 } else { 0 },
        _ => 0,
    }
}

fn param(p: &mut P) -> Result<Param, ParseError> {
    let line = p.line();
    if p.word()? != ".param" {
        return p.err("expected `.param`");
    }
    let (mut ty, mut align) = (String::new(), None);
    loop {
        let w = p.word()?;
        match w.as_str() {
            ".align" => align = Some(p.uint()? as u32),
            ".ptr" | ".global" | ".shared" | ".const" | ".local" => {}
            t if t.starts_with('.') => ty = t[1..].to_string(),
            name => {
                let mut array = None;
                if p.eat('[') {
                    array = Some(p.uint()?);
                    p.expect(']')?;
                }
                if ty.is_empty() {
                    return p.err(format!("parameter `{name}` has no type"));
                }
                return Ok(Param {
                    name: name.to_string(),
                    ty,
                    align,
                    array,
                    line,
                });
            }
        }
    }
}

fn dims(p: &mut P) -> Result<[u32; 3], ParseError> {
    let mut d = [1u32; 3];
    d[0] = p.uint()? as u32;
    for slot in d.iter_mut().skip(1) {
        if !p.eat(',') {
            break;
        }
        *slot = p.uint()? as u32;
    }
    Ok(d)
}

fn function(p: &mut P, is_entry: bool) -> Result<Function, ParseError> {
    let line = p.line();
    // `.func (.param .b32 ret) name (...)`: the return parameter list comes first.
    if !is_entry && p.is_punct('(') {
        p.expect('(')?;
        while !p.eat(')') {
            param(p)?;
            p.eat(',');
        }
    }
    let name = p.word()?;
    let mut params = Vec::new();
    if p.eat('(') {
        while !p.eat(')') {
            params.push(param(p)?);
            p.eat(',');
        }
    }
    let mut f = Function {
        name,
        is_entry,
        params,
        maxntid: None,
        reqntid: None,
        body: Vec::new(),
        line,
    };
    loop {
        match p.peek() {
            Some(Tok::Punct(';')) => {
                p.i += 1;
                return Ok(f); // a prototype
            }
            Some(Tok::Punct('{')) => break,
            _ => {}
        }
        let w = p.word()?;
        match w.as_str() {
            ".maxntid" => f.maxntid = Some(dims(p)?),
            ".reqntid" => f.reqntid = Some(dims(p)?),
            ".minnctapersm" | ".maxnreg" | ".maxnctapersm" | ".maxclusterrank" => {
                p.uint()?;
            }
            ".reqnctapercluster" | ".explicitcluster" => {
                if w == ".reqnctapercluster" {
                    dims(p)?;
                }
            }
            ".noreturn" => {}
            other => {
                return p.err(format!(
                    "unexpected `{other}` in the header of `{}`",
                    f.name
                ));
            }
        }
    }
    if !is_entry {
        p.skip_braces()?;
        return Ok(f);
    }
    p.expect('{')?;
    let mut depth = 1;
    while depth > 0 {
        let line = p.line();
        match p.peek() {
            Some(Tok::Punct('{')) => {
                p.i += 1;
                depth += 1;
                f.body.push(Stmt::Open);
                continue;
            }
            Some(Tok::Punct('}')) => {
                p.i += 1;
                depth -= 1;
                if depth > 0 {
                    f.body.push(Stmt::Close);
                }
                continue;
            }
            Some(Tok::Punct('@')) => {
                f.body.push(Stmt::Inst(instruction(p)?));
                continue;
            }
            _ => {}
        }
        let w = p.word()?;
        if p.is_punct(':') && !w.starts_with('.') {
            p.i += 1;
            f.body.push(Stmt::Label(w, line));
            continue;
        }
        match w.as_str() {
            ".reg" => {
                let mut ty = p.word()?;
                if ty == ".v2" || ty == ".v4" {
                    return p.err("vector registers are not supported");
                }
                ty.remove(0);
                let mut names = Vec::new();
                loop {
                    let n = p.word()?;
                    let count = if p.eat('<') {
                        let c = p.uint()? as u32;
                        p.expect('>')?;
                        Some(c)
                    } else {
                        None
                    };
                    names.push((n, count));
                    if !p.eat(',') {
                        break;
                    }
                }
                p.expect(';')?;
                f.body.push(Stmt::Reg { ty, names, line });
            }
            ".shared" | ".local" | ".global" | ".const" => {
                let v = var_decl(p, &w, false)?;
                p.expect(';')?;
                f.body.push(Stmt::Var(v));
            }
            ".param" => {
                return p.err("`.param` inside a body (device-function calls) is not supported");
            }
            ".pragma" => {
                while !p.eat(';') {
                    p.next()?;
                }
            }
            ".loc" | ".file" => p.skip_line(),
            _ => {
                p.i -= 1;
                f.body.push(Stmt::Inst(instruction(p)?));
            }
        }
    }
    Ok(f)
}

fn instruction(p: &mut P) -> Result<Inst, ParseError> {
    let line = p.line();
    let guard = if p.eat('@') {
        let neg = p.eat('!');
        Some((neg, p.word()?))
    } else {
        None
    };
    let opcode = p.word()?;
    let mut ops = Vec::new();
    if !p.eat(';') {
        loop {
            ops.push(operand(p)?);
            if p.eat(';') {
                break;
            }
            p.expect(',')?;
        }
    }
    Ok(Inst {
        guard,
        opcode,
        ops,
        line,
    })
}

fn signed(p: &mut P) -> Result<i64, ParseError> {
    let neg = p.eat('-');
    let w = p.word()?;
    match number(&w) {
        Some(Operand::Int(v)) => Ok(if neg { v.wrapping_neg() } else { v }),
        _ => p.err(format!("expected an integer offset, found `{w}`")),
    }
}

fn operand(p: &mut P) -> Result<Operand, ParseError> {
    if p.eat('[') {
        let mut base = None;
        let mut off = 0i64;
        match p.peek() {
            Some(Tok::Punct('-')) => off = signed(p)?,
            _ => {
                let w = p.word()?;
                match number(&w) {
                    Some(Operand::Int(v)) => off = v,
                    _ => base = Some(w),
                }
            }
        }
        while p.eat('+') {
            off = off.wrapping_add(signed(p)?);
        }
        if p.is_punct('-') {
            off = off.wrapping_add(signed(p)?);
        }
        p.expect(']')?;
        return Ok(Operand::Mem(base, off));
    }
    if p.eat('{') {
        let mut v = Vec::new();
        loop {
            v.push(operand(p)?);
            if p.eat('}') {
                break;
            }
            p.expect(',')?;
        }
        return Ok(Operand::Vec(v));
    }
    if p.eat('!') {
        return Ok(Operand::Not(p.word()?));
    }
    if p.eat('-') {
        let w = p.word()?;
        return match number(&w) {
            Some(Operand::Int(v)) => Ok(Operand::Int(v.wrapping_neg())),
            Some(Operand::F64(b)) => Ok(Operand::F64(b ^ (1 << 63))),
            Some(Operand::F32(b)) => Ok(Operand::F32(b ^ (1 << 31))),
            _ => p.err(format!("cannot negate `{w}`")),
        };
    }
    let w = p.word()?;
    if w == "_" {
        return Ok(Operand::Sink);
    }
    if let Some(n) = number(&w) {
        return Ok(n);
    }
    if p.eat('|') {
        return Ok(Operand::Pair(w, p.word()?));
    }
    if p.is_punct('+') {
        p.i += 1;
        return Ok(Operand::NameOff(w, signed(p)?));
    }
    Ok(Operand::Name(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PTX: &str = r#"
.version 9.0
.target sm_80
.address_size 64
.extern .shared .align 16 .b8 dyn[];
.visible .entry k(
	.param .u64 k_param_0,
	.param .f32 k_param_1
)
.maxntid 256, 1, 1
{
	.reg .pred 	%p<3>;
	.reg .b32 	%r<5>;
	.shared .align 4 .b8 scratch[128];
	ld.param.u64 	%rd1, [k_param_0];
	setp.lt.s32 	%p1|%p2, %r1, -4;
	@!%p1 bra 	$L__BB0_2;
	{
	.reg .b32 %temp;
	mov.b64 	{%r1, %temp}, %fd1;
	}
$L__BB0_2:
	st.shared.v2.f32 	[scratch+8], {%f1, %f2};
	ld.global.f32 %f1, [%rd2+-8];
	mov.f32 %f2, 0f3F800000;
	ret;
}
"#;

    #[test]
    fn parses_entry_header_registers_and_operands() {
        let m = parse(PTX).unwrap();
        assert_eq!(m.target, "sm_80");
        assert_eq!(m.vars[0].array, Some(None));
        let f = &m.functions[0];
        assert_eq!(f.name, "k");
        assert_eq!(f.params.len(), 2);
        assert_eq!(f.params[1].ty, "f32");
        assert_eq!(f.maxntid, Some([256, 1, 1]));
        let insts: Vec<&Inst> = f
            .body
            .iter()
            .filter_map(|s| match s {
                Stmt::Inst(i) => Some(i),
                _ => None,
            })
            .collect();
        assert_eq!(insts[1].ops[0], Operand::Pair("%p1".into(), "%p2".into()));
        assert_eq!(insts[1].ops[2], Operand::Int(-4));
        assert_eq!(insts[2].guard, Some((true, "%p1".into())));
        assert_eq!(insts[4].ops[0], Operand::Mem(Some("scratch".into()), 8));
        assert_eq!(insts[5].ops[1], Operand::Mem(Some("%rd2".into()), -8));
        assert_eq!(insts[6].ops[1], Operand::F32(0x3F80_0000));
        assert!(
            f.body
                .iter()
                .any(|s| matches!(s, Stmt::Label(l, _) if l == "$L__BB0_2"))
        );
    }

    #[test]
    fn errors_name_the_line() {
        let e = parse(
            ".version 9.0\n.target sm_80\n.visible .entry k()\n{\n  add.s32 %r1, %r2 %r3;\n}\n",
        )
        .unwrap_err();
        assert_eq!(e.0, 5);
    }
}
