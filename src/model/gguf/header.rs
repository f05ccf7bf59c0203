//! The GGUF header: metadata key-values and the tensor directory, checked against the file
//! before anything is allocated from them (counts, sizes, offsets, alignment, overlap).

use std::collections::HashMap;

use super::super::quant::GgmlType;

#[derive(Debug, Clone)]
pub enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Int(i) if *i >= 0 => Some(*i as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

pub struct TensorInfo {
    /// Fastest-varying first, as GGUF lists them.
    pub dims: Vec<usize>,
    pub ty: u32,
    /// From the start of the data section.
    pub offset: usize,
    /// `None` for a type this crate cannot read (refused when the tensor is used).
    pub bytes: Option<usize>,
}

pub struct Header {
    pub metadata: HashMap<String, Value>,
    pub tensors: HashMap<String, TensorInfo>,
    pub data_start: usize,
}

/// Limits on what a header may declare: far above real files (a 256k-token vocabulary
/// plus its merges), far below what would exhaust memory or the stack.
const MAX_ARRAY_LEN: usize = 1 << 24;
const MAX_NESTING: usize = 4;
const MAX_DIMS: usize = 4;

type Parse<T> = std::result::Result<T, String>;

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Parse<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| format!("truncated header (needed {n} bytes at offset {})", self.pos))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Parse<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u32(&mut self) -> Parse<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Parse<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// A count or size: must fit in memory terms before it is used for anything.
    fn len(&mut self, what: &str) -> Parse<usize> {
        let n = self.u64()?;
        usize::try_from(n).map_err(|_| format!("{what} {n} is out of range"))
    }
    fn string(&mut self) -> Parse<String> {
        let n = self.len("string length")?;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("invalid UTF-8 string at {}", self.pos))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Parse<Value> {
        Ok(match ty {
            0 => Value::Int(self.array::<1>()?[0] as i64),
            1 => Value::Int(self.array::<1>()?[0] as i8 as i64),
            2 => Value::Int(u16::from_le_bytes(self.array()?) as i64),
            3 => Value::Int(i16::from_le_bytes(self.array()?) as i64),
            4 => Value::Int(self.u32()? as i64),
            5 => Value::Int(self.u32()? as i32 as i64),
            6 => Value::Float(f32::from_bits(self.u32()?) as f64),
            7 => Value::Bool(self.array::<1>()?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth >= MAX_NESTING {
                    return Err(format!("arrays nested deeper than {MAX_NESTING}"));
                }
                let elem = self.u32()?;
                let n = self.len("array length")?;
                // Every element takes at least one byte.
                if n > MAX_ARRAY_LEN || n > self.buf.len() - self.pos {
                    return Err(format!("array of {n} elements is too long for the file"));
                }
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(elem, depth + 1)?);
                }
                Value::Array(v)
            }
            // A u64 above i64::MAX is kept as a negative Int: `as_u64` then refuses it.
            10 | 11 => Value::Int(self.u64()? as i64),
            12 => Value::Float(f64::from_bits(self.u64()?)),
            t => return Err(format!("unknown metadata value type {t}")),
        })
    }
}

/// Parse and check the header of a whole GGUF file `buf`.
pub fn parse(buf: &[u8]) -> Parse<Header> {
    let mut r = Reader { buf, pos: 0 };
    if r.take(4).map_err(|_| "not a GGUF file (too short)")? != b"GGUF" {
        return Err("not a GGUF file (bad magic)".into());
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(format!("unsupported GGUF version {version}"));
    }
    // Counts are only loop bounds: every entry reads bytes, so a corrupt count runs into
    // the end of the file instead of allocating.
    let n_tensors = r.u64()?;
    let n_kv = r.u64()?;
    let mut metadata = HashMap::new();
    for _ in 0..n_kv {
        let key = r.string()?;
        let ty = r.u32()?;
        let v = r
            .value(ty, 0)
            .map_err(|e| format!("metadata `{key}`: {e}"))?;
        if metadata.insert(key.clone(), v).is_some() {
            return Err(format!("metadata key `{key}` appears twice"));
        }
    }
    let mut tensors = HashMap::new();
    for _ in 0..n_tensors {
        let name = r.string()?;
        let info = tensor_info(&mut r).map_err(|e| format!("tensor `{name}`: {e}"))?;
        if tensors.insert(name.clone(), info).is_some() {
            return Err(format!("tensor `{name}` is listed twice"));
        }
    }
    let align = match metadata.get("general.alignment") {
        None => 32,
        Some(v) => v
            .as_u64()
            .filter(|a| a.is_power_of_two() && *a <= 1 << 30)
            .ok_or_else(|| format!("general.alignment {v:?} must be a power of two"))?
            as usize,
    };
    let data_start = r.pos.next_multiple_of(align);
    check_layout(&tensors, align, buf.len().saturating_sub(data_start))?;
    Ok(Header {
        metadata,
        tensors,
        data_start,
    })
}

fn tensor_info(r: &mut Reader) -> Parse<TensorInfo> {
    let nd = r.u32()? as usize;
    if nd > MAX_DIMS {
        return Err(format!("{nd} dimensions"));
    }
    let mut dims = Vec::with_capacity(nd);
    for _ in 0..nd {
        dims.push(r.len("dimension")?);
    }
    let ty = r.u32()?;
    let offset = r.len("offset")?;
    let n = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("dimensions {dims:?} overflow"))?;
    let bytes = match GgmlType::from_id(ty) {
        None => None,
        Some(t) => Some(t.byte_size(n)?),
    };
    Ok(TensorInfo {
        dims,
        ty,
        offset,
        bytes,
    })
}

/// Every tensor aligned, inside the `data_len` bytes of the data section, and disjoint
/// from the others (as llama.cpp's loader requires).
fn check_layout(tensors: &HashMap<String, TensorInfo>, align: usize, data_len: usize) -> Parse<()> {
    let mut spans: Vec<(usize, usize, &str)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        if !t.offset.is_multiple_of(align) {
            return Err(format!(
                "tensor `{name}` at data offset {} is not aligned to {align} bytes",
                t.offset
            ));
        }
        let end = t.offset.saturating_add(t.bytes.unwrap_or(0));
        if end > data_len {
            return Err(format!(
                "truncated: tensor `{name}` ends at data byte {end}, the data section has {data_len}"
            ));
        }
        spans.push((t.offset, end, name));
    }
    spans.sort();
    for w in spans.windows(2) {
        let ((_, end, a), (start, _, b)) = (w[0], w[1]);
        if start < end {
            return Err(format!("tensors `{a}` and `{b}` overlap"));
        }
    }
    Ok(())
}
