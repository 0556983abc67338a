//! The helpers GSM-Symbolic's templates call (`range`, `sample`, `is_int`,
//! `divides`, `Fraction`, ...), with the package's two meanings of the
//! sampling ones: all the values a line can take (to enumerate the
//! constrained variables) or one drawn value (for derived lines).

use super::pyexpr::{arith, frac, gcd, py_eq, Op, Scope, Value};
use crate::rng::Rng;
use anyhow::{anyhow, bail, Result};
use std::collections::HashMap;

pub enum Mode<'r> {
    /// `range`, `sample`, ... return every possible value.
    Enumerate,
    /// `range`, `sample`, ... draw one value.
    Draw(&'r mut Rng),
    /// No sampling helpers (conditions and answers).
    Plain,
}

/// Variables over the replacement lists (names, colours, ...) and helpers.
pub struct Env<'a, 'r> {
    pub vars: &'a HashMap<String, Value>,
    pub lists: Option<&'a HashMap<String, Value>>,
    pub mode: Mode<'r>,
}

impl Scope for Env<'_, '_> {
    fn var(&self, name: &str) -> Option<Value> {
        self.vars
            .get(name)
            .or_else(|| self.lists.and_then(|l| l.get(name)))
            .cloned()
    }

    fn call(&mut self, f: &str, a: Vec<Value>) -> Result<Value> {
        call(&mut self.mode, f, &a).map_err(|e| anyhow!("{f}(): {e}"))
    }
}

/// The package's `parse_value`: whole floats become ints, numeric strings
/// numbers, and "a/b" strings Fractions.
pub fn parse_value(v: Value) -> Value {
    match v {
        Value::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Value::Int(f as i64),
        Value::Str(s) => {
            if !s.is_empty() && s.chars().all(|c| c.is_numeric()) {
                if let Ok(i) = s.parse::<i64>() {
                    return Value::Int(i);
                }
            }
            if let Ok(f) = s.trim().parse::<f64>() {
                return Value::Float(f);
            }
            match s.split_once('/') {
                Some((n, d)) if !d.contains('/') && int_text(n) && int_text(d) => {
                    match (n.parse::<i128>(), d.parse::<i128>()) {
                        (Ok(n), Ok(d)) if d != 0 => frac(n, d).unwrap_or(Value::Str(s)),
                        _ => Value::Str(s),
                    }
                }
                _ => Value::Str(s),
            }
        }
        v => v,
    }
}

fn int_text(s: &str) -> bool {
    let d = s.strip_prefix('-').unwrap_or(s);
    !d.is_empty() && d.chars().all(|c| c.is_ascii_digit())
}

pub fn is_int(v: &Value) -> bool {
    match v {
        Value::Int(_) => true,
        Value::Float(f) => f.fract() == 0.0 || (f - f.round()).abs() < 1e-6,
        Value::Frac(_, d) => *d == 1,
        _ => false,
    }
}

fn arity(a: &[Value], lo: usize, hi: usize) -> Result<()> {
    if a.len() < lo || a.len() > hi {
        bail!("takes {lo} to {hi} arguments, got {}", a.len());
    }
    Ok(())
}

fn items(v: &Value) -> Result<&[Value]> {
    match v {
        Value::List(xs) | Value::Tuple(xs) => Ok(xs),
        v => bail!("{} is not a list", v.py_repr()),
    }
}

fn call(mode: &mut Mode, f: &str, a: &[Value]) -> Result<Value> {
    Ok(match f {
        "is_int" => Value::Bool(arity(a, 1, 1).map(|_| is_int(&a[0]))?),
        "divides" => {
            arity(a, 2, 2)?;
            let zero = py_eq(&a[1], &Value::Int(0));
            Value::Bool(!zero && py_eq(&arith(Op::Mod, &a[0], &a[1])?, &Value::Int(0)))
        }
        "int" => arity(a, 1, 1).and_then(|_| to_int(&a[0]))?,
        "float" => {
            arity(a, 1, 1)?;
            match &a[0] {
                Value::Str(s) => Value::Float(
                    s.trim()
                        .parse()
                        .map_err(|_| anyhow!("not a number: {s:?}"))?,
                ),
                v => Value::Float(v.as_f64()?),
            }
        }
        "round" => arity(a, 1, 2).and_then(|_| round(a))?,
        "ensure_int" => {
            arity(a, 1, 1)?;
            if !is_int(&a[0]) {
                bail!("value {} cannot be converted to int", a[0].py_repr());
            }
            round(&a[..1])?
        }
        "str" => Value::Str(arity(a, 1, 1).map(|_| a[0].py_str())?),
        "len" => {
            arity(a, 1, 1)?;
            let n = match &a[0] {
                Value::Str(s) => s.chars().count(),
                v => items(v)?.len(),
            };
            Value::Int(n as i64)
        }
        "list" => {
            arity(a, 1, 1)?;
            match &a[0] {
                Value::Str(s) => Value::List(s.chars().map(|c| Value::Str(c.into())).collect()),
                v => Value::List(items(v)?.to_vec()),
            }
        }
        "Fraction" => arity(a, 1, 1).and_then(|_| fraction_text(&a[0]))?,
        "plural" => plural(a)?,
        "to_title" => {
            arity(a, 1, 1)?;
            let s = a[0].py_str();
            let mut cs = s.chars();
            Value::Str(
                cs.next()
                    .map_or(String::new(), |c| c.to_uppercase().chain(cs).collect()),
            )
        }
        _ => return sampling(mode, f, a),
    })
}

fn to_int(v: &Value) -> Result<Value> {
    Ok(match v {
        Value::Int(_) => v.clone(),
        Value::Bool(b) => Value::Int(*b as i64),
        Value::Float(f) if f.is_finite() && f.abs() < 9.0e18 => Value::Int(f.trunc() as i64),
        Value::Frac(n, d) => Value::Int(n / d),
        Value::Str(s) => Value::Int(
            s.trim()
                .parse()
                .map_err(|_| anyhow!("not an integer: {s:?}"))?,
        ),
        v => bail!("cannot convert {} to int", v.py_repr()),
    })
}

/// A whole-number value (within `is_int`'s tolerance) as an i64.
pub fn round_int(v: &Value) -> Result<i64> {
    round(std::slice::from_ref(v))?.as_int()
}

/// Python's `round`: half to even; with digits, a float rounded in decimal.
fn round(a: &[Value]) -> Result<Value> {
    let digits = a.get(1).map(Value::as_int).transpose()?;
    Ok(match (&a[0], digits) {
        (Value::Int(_) | Value::Bool(_), _) => to_int(&a[0])?,
        (v, None) => to_int(&Value::Float(v.as_f64()?.round_ties_even()))?,
        (v, Some(d)) if (0..=15).contains(&d) => {
            let text = format!("{:.*}", d as usize, v.as_f64()?);
            Value::Float(text.parse()?)
        }
        (_, Some(d)) => bail!("round to {d} digits is not supported"),
    })
}

/// The package's `Fraction` helper: a float as its nearest fraction with a
/// denominator up to 10^6 ("3/4"), anything else as `str`.
fn fraction_text(v: &Value) -> Result<Value> {
    let Value::Float(f) = v else {
        return Ok(Value::Str(v.py_str()));
    };
    let (n, d) = exact_ratio(*f)?;
    let (n, d) = limit_denominator(n, d, 1_000_000);
    Ok(Value::Str(if d == 1 {
        n.to_string()
    } else {
        format!("{n}/{d}")
    }))
}

/// A finite float as the exact ratio n/d (d a power of two).
fn exact_ratio(f: f64) -> Result<(i128, i128)> {
    if !f.is_finite() {
        bail!("cannot convert {f} to a fraction");
    }
    let (mut n, mut d) = (f, 1i128);
    while n.fract() != 0.0 {
        n *= 2.0;
        d = d
            .checked_mul(2)
            .ok_or_else(|| anyhow!("{f} is too fine for a fraction"))?;
    }
    if n.abs() >= 1.0e36 {
        bail!("{f} is too large for a fraction");
    }
    let g = gcd(n as i128, d);
    Ok((n as i128 / g, d / g))
}

/// Python's `Fraction.limit_denominator`: the closest fraction with a
/// denominator at most `max_d` (continued fractions).
fn limit_denominator(n: i128, d: i128, max_d: i128) -> (i128, i128) {
    if d <= max_d {
        return (n, d);
    }
    let (mut p0, mut q0, mut p1, mut q1) = (0i128, 1i128, 1i128, 0i128);
    let (mut a_n, mut a_d) = (n, d);
    loop {
        let a = a_n.div_euclid(a_d);
        let q2 = q0 + a * q1;
        if q2 > max_d {
            break;
        }
        (p0, q0, p1, q1) = (p1, q1, p0 + a * p1, q2);
        (a_n, a_d) = (a_d, a_n - a * a_d);
    }
    let k = (max_d - q0) / q1;
    // The nearer of the two bounds; ties go to p1/q1, as in Python.
    if 2 * a_d * (q0 + k * q1) <= d {
        (p1, q1)
    } else {
        (p0 + k * p1, q0 + k * q1)
    }
}

fn plural(a: &[Value]) -> Result<Value> {
    let forms: Vec<String> = a.iter().skip(1).map(Value::py_str).collect();
    let n = a.first().ok_or_else(|| anyhow!("needs a number"))?;
    let pick = match forms.len() {
        2 => (n.as_f64()?.abs() != 1.0) as usize,
        3 => {
            let m = to_int(n)?.as_int()?.abs();
            match (m % 10, m % 100) {
                (1, r) if r != 11 => 0,
                (2..=4, r) if !(12..=14).contains(&r) => 1,
                _ => 2,
            }
        }
        k => bail!("expects 2 or 3 forms, got {k}"),
    };
    Ok(Value::Str(forms[pick].clone()))
}

/// `range`, `sample`, ...: every value (enumerating) or one drawn value.
fn sampling(mode: &mut Mode, f: &str, a: &[Value]) -> Result<Value> {
    let all = match f {
        "range" | "range_list" => {
            arity(a, 2, 3)?;
            let (lo, hi) = (a[0].as_int()?, a[1].as_int()?);
            let step = a.get(2).map_or(Ok(1), Value::as_int)?;
            // Drawing, `range` includes its end; enumerating it does not.
            let inclusive = matches!(mode, Mode::Draw(_)) && f == "range";
            let xs = ints(lo, hi + inclusive as i64, step)?
                .into_iter()
                .map(Value::Int);
            if f == "range_list" {
                return Ok(Value::List(xs.collect()));
            }
            xs.collect()
        }
        "range_str" => {
            arity(a, 4, 4)?;
            let (lo, hi, step) = (a[0].as_int()?, a[1].as_int()?, a[2].as_int()?);
            let words = items(&a[3])?;
            let drawing = matches!(mode, Mode::Draw(_));
            let mut out = Vec::new();
            for i in ints(lo, hi + drawing as i64, step)? {
                if drawing && !(1..=words.len() as i64).contains(&i) {
                    continue;
                }
                // Python's words[i - 1], so i = 0 is the last word.
                let at = if i > 0 {
                    i - 1
                } else {
                    i - 1 + words.len() as i64
                };
                let w = words
                    .get(at as usize)
                    .ok_or_else(|| anyhow!("index {i} is out of range"))?;
                out.push(Value::Tuple(vec![w.clone(), Value::Int(i)]));
            }
            out
        }
        "arange" => arange(a)?,
        "sample" => {
            arity(a, 1, 2)?;
            let xs = items(&a[0])?;
            match a.get(1).map_or(Ok(1), Value::as_int)? {
                1 => xs.to_vec(),
                k if matches!(mode, Mode::Draw(_)) => return draw_k(mode, xs, k),
                k => combinations(xs, k as usize),
            }
        }
        "sample_sequential" => {
            arity(a, 2, 2)?;
            let (xs, k) = (items(&a[0])?, a[1].as_int()? as usize);
            (0..xs.len())
                .map(|i| Value::List((0..k).map(|j| xs[(i + j) % xs.len()].clone()).collect()))
                .collect()
        }
        _ => bail!("unknown helper"),
    };
    match mode {
        Mode::Enumerate => Ok(Value::List(all)),
        Mode::Draw(rng) if !all.is_empty() => Ok(all[rng.below(all.len())].clone()),
        Mode::Draw(_) if f == "range_str" => Ok(Value::Tuple(vec![])),
        Mode::Draw(_) => bail!("nothing to draw from"),
        Mode::Plain => bail!("name `{f}` is not defined here"),
    }
}

fn ints(lo: i64, hi: i64, step: i64) -> Result<Vec<i64>> {
    if step <= 0 {
        bail!("step must be positive");
    }
    if (hi - lo) / step > 50_000_000 {
        bail!("range of {} values is too large", (hi - lo) / step);
    }
    Ok((lo..hi).step_by(step as usize).collect())
}

/// `arange(start, end, step)`: numpy's linspace over [start, end] as strings
/// with the step's decimals, as the package writes them.
fn arange(a: &[Value]) -> Result<Vec<Value>> {
    arity(a, 2, 3)?;
    let (lo, hi) = (a[0].as_f64()?, a[1].as_f64()?);
    let step = a.get(2).map_or(Ok(1.0), Value::as_f64)?;
    if lo > hi {
        return Ok(vec![]);
    }
    let count = ((hi - lo) / step).round_ties_even() as usize + 1;
    let decimals = match a.get(2).map(|s| s.py_str()) {
        Some(s) if !s.contains('e') => s.split_once('.').map_or(0, |(_, f)| f.len()),
        _ => 0,
    };
    let delta = if count > 1 {
        (hi - lo) / (count - 1) as f64
    } else {
        0.0
    };
    (0..count)
        .map(|i| {
            let x = if i + 1 == count && count > 1 {
                hi
            } else {
                lo + i as f64 * delta
            };
            let r = round(&[Value::Float(x), Value::Int(decimals as i64)])?;
            Ok(Value::Str(Value::Float(r.as_f64()?).py_str()))
        })
        .collect()
}

/// itertools.combinations(xs, k) as tuples, in its order.
fn combinations(xs: &[Value], k: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let mut idx: Vec<usize> = (0..k).collect();
    if k == 0 || k > xs.len() {
        return if k == 0 {
            vec![Value::Tuple(vec![])]
        } else {
            out
        };
    }
    loop {
        out.push(Value::Tuple(idx.iter().map(|&i| xs[i].clone()).collect()));
        let Some(i) = (0..k).rev().find(|&i| idx[i] != i + xs.len() - k) else {
            return out;
        };
        idx[i] += 1;
        for j in i + 1..k {
            idx[j] = idx[j - 1] + 1;
        }
    }
}

/// `random.sample(xs, k)`: k distinct items in random order.
fn draw_k(mode: &mut Mode, xs: &[Value], k: i64) -> Result<Value> {
    let Mode::Draw(rng) = mode else {
        unreachable!("only called while drawing")
    };
    if k < 0 || k as usize > xs.len() {
        bail!("cannot take {k} of {} items", xs.len());
    }
    let mut pool = xs.to_vec();
    for i in 0..k as usize {
        let j = i + rng.below(pool.len() - i);
        pool.swap(i, j);
    }
    pool.truncate(k as usize);
    Ok(Value::List(pool))
}
