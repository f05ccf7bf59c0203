//! A small seeded mutation generator: JSON values replaced, removed or duplicated at a
//! random place, bytes flipped, integers and floats drawn from the edge cases that break
//! parsers (zero, one-off, sign, powers of two, the type limits, NaN, infinities).

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

pub struct Mutator {
    rng: ChaCha8Rng,
}

const INTS: [i128; 22] = [
    0,
    1,
    2,
    3,
    -1,
    -100,
    7,
    31,
    64,
    128,
    255,
    511,
    512,
    513,
    65_535,
    1 << 31,
    1 << 32,
    (1 << 32) + 1,
    1 << 53,
    i64::MAX as i128,
    i64::MIN as i128,
    u64::MAX as i128,
];

const FLOATS: [f64; 12] = [
    0.0, -0.0, 0.5, -1.0, 1e-30, 1e-50, 1e30, 1e39, 1e308, -1e308, 1.5, 10000.0,
];

impl Mutator {
    pub fn new(seed: u64) -> Self {
        Mutator {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    pub fn below(&mut self, n: usize) -> usize {
        self.rng.random_range(0..n.max(1))
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.rng.random::<f64>() < p
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    pub fn int(&mut self) -> i128 {
        let base = *self.pick(&INTS);
        base + [-1, 0, 0, 1][self.below(4)]
    }

    /// A u64 edge case (negative edge cases wrap, as a corrupted header would hold them).
    pub fn u64(&mut self) -> u64 {
        self.int() as u64
    }

    pub fn float(&mut self) -> f64 {
        match self.below(8) {
            0 => f64::NAN,
            1 => f64::INFINITY,
            2 => f64::NEG_INFINITY,
            _ => *self.pick(&FLOATS),
        }
    }

    /// A JSON value of any type, biased towards what the fields being fuzzed expect;
    /// `domain` adds values that mean something to the file at hand.
    pub fn json_value(&mut self, domain: &[Value]) -> Value {
        match self.below(10) {
            0 | 1 => {
                let i = self.int();
                i64::try_from(i)
                    .map(Value::from)
                    .or_else(|_| u64::try_from(i).map(Value::from))
                    .unwrap_or(json!(1e20))
            }
            2 => {
                let f = self.float();
                serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
            }
            3 => json!(*self.pick(&["", "x", "silu", "llama3", "default", "all", "(", "LORA"])),
            4 => json!(*self.pick(&[Value::Null, json!(true), json!(false), json!([]), json!({})])),
            5 => json!([self.json_value(&[]), self.json_value(&[])]),
            _ if !domain.is_empty() => self.pick(domain).clone(),
            _ => Value::Null,
        }
    }

    /// Change `v` at one random place: replace a value, remove or duplicate an entry,
    /// nudge a number. Returns what was done, for failure messages.
    pub fn mutate_json(&mut self, v: &mut Value, domain: &[Value]) -> String {
        let mut paths = Vec::new();
        collect_paths(v, &mut Vec::new(), &mut paths);
        let path = self.pick(&paths).clone();
        let (parent, last) = path.split_at(path.len().saturating_sub(1));
        let op = self.below(10);
        let new = self.json_value(domain);
        let Some(container) = at(v, parent) else {
            return "nothing".into();
        };
        let desc = format!("{path:?}");
        match (container, last.first()) {
            (Value::Object(o), Some(Step::Key(k))) if op == 0 => {
                o.remove(k);
                format!("removed {desc}")
            }
            (Value::Array(a), Some(Step::Index(i))) if op == 0 => {
                a.remove(*i);
                format!("removed {desc}")
            }
            (Value::Array(a), Some(Step::Index(i))) if op == 1 => {
                let x = a[*i].clone();
                a.insert(*i, x);
                format!("duplicated {desc}")
            }
            (c, Some(step)) => {
                let slot = match (c, step) {
                    (Value::Object(o), Step::Key(k)) => o.get_mut(k),
                    (Value::Array(a), Step::Index(i)) => a.get_mut(*i),
                    _ => None,
                };
                let Some(slot) = slot else {
                    return "nothing".into();
                };
                *slot = match (op, slot.as_f64()) {
                    (2, Some(x)) => json!(-x),
                    (3, Some(x)) => {
                        serde_json::Number::from_f64(x * 1e6).map_or(Value::Null, Value::Number)
                    }
                    _ => new,
                };
                format!("{desc} = {slot}")
            }
            (c, None) => {
                *c = new;
                format!("root = {c}")
            }
        }
    }

    /// Flip `n` random bytes of `b[range]`.
    pub fn flip_bytes(&mut self, b: &mut [u8], range: std::ops::Range<usize>, n: usize) -> String {
        let mut at = Vec::new();
        for _ in 0..n {
            let i = range.start + self.below(range.len());
            b[i] = self.rng.random();
            at.push(i);
        }
        format!("bytes at {at:?} replaced")
    }
}

#[derive(Clone, Debug)]
enum Step {
    Key(String),
    Index(usize),
}

fn collect_paths(v: &Value, prefix: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    out.push(prefix.clone());
    let children: Vec<(Step, &Value)> = match v {
        Value::Object(o) => o.iter().map(|(k, x)| (Step::Key(k.clone()), x)).collect(),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, x)| (Step::Index(i), x))
            .collect(),
        _ => Vec::new(),
    };
    for (step, child) in children {
        prefix.push(step);
        collect_paths(child, prefix, out);
        prefix.pop();
    }
}

fn at<'a>(v: &'a mut Value, path: &[Step]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |v, step| match (v, step) {
        (Value::Object(o), Step::Key(k)) => o.get_mut(k),
        (Value::Array(a), Step::Index(i)) => a.get_mut(*i),
        _ => None,
    })
}
