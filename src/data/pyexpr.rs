//! The Python expressions of GSM-Symbolic's templates (init lines,
//! conditions, answers), parsed and evaluated with Python's rules: ints stay
//! exact, `/` gives a float, `//` and `%` floor, Fractions stay exact, and
//! `str` prints what Python prints. Only what the templates use: literals,
//! names, lists, tuples, arithmetic, comparisons, `and`/`or`/`not`,
//! `x if c else y`, subscripts and calls of named helpers.

use anyhow::{anyhow, bail, Result};

#[derive(Debug, Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// An exact fraction, always reduced, denominator > 0.
    Frac(i64, i64),
    Str(String),
    List(Vec<Value>),
    Tuple(Vec<Value>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    Add,
    Sub,
    Mul,
    Div,
    FloorDiv,
    Mod,
    Pow,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cmp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

#[derive(Debug, Clone)]
pub enum Expr {
    Const(Value),
    Name(String),
    List(Vec<Expr>),
    Tuple(Vec<Expr>),
    Neg(Box<Expr>),
    Not(Box<Expr>),
    Bin(Op, Box<Expr>, Box<Expr>),
    Cmp(Box<Expr>, Vec<(Cmp, Expr)>),
    And(Vec<Expr>),
    Or(Vec<Expr>),
    /// `body if test else orelse`
    If(Box<Expr>, Box<Expr>, Box<Expr>),
    Index(Box<Expr>, Box<Expr>),
    Call(String, Vec<Expr>),
}

/// What an expression can see: variables, and the helpers it may call.
pub trait Scope {
    fn var(&self, name: &str) -> Option<Value>;
    fn call(&mut self, name: &str, args: Vec<Value>) -> Result<Value>;
}

impl Expr {
    /// Every name the expression mentions, called functions included (as
    /// Python's `ast.walk` sees them).
    pub fn names(&self, out: &mut Vec<String>) {
        match self {
            Expr::Const(_) => {}
            Expr::Name(n) => out.push(n.clone()),
            Expr::List(xs) | Expr::Tuple(xs) | Expr::And(xs) | Expr::Or(xs) => {
                xs.iter().for_each(|x| x.names(out))
            }
            Expr::Neg(x) | Expr::Not(x) => x.names(out),
            Expr::Bin(_, a, b) | Expr::Index(a, b) => {
                a.names(out);
                b.names(out)
            }
            Expr::Cmp(a, rest) => {
                a.names(out);
                rest.iter().for_each(|(_, x)| x.names(out))
            }
            Expr::If(a, b, c) => [a, b, c].iter().for_each(|x| x.names(out)),
            Expr::Call(f, args) => {
                out.push(f.clone());
                args.iter().for_each(|x| x.names(out))
            }
        }
    }

    pub fn eval(&self, s: &mut dyn Scope) -> Result<Value> {
        Ok(match self {
            Expr::Const(v) => v.clone(),
            Expr::Name(n) => s
                .var(n)
                .ok_or_else(|| anyhow!("name `{n}` is not defined"))?,
            Expr::List(xs) => Value::List(xs.iter().map(|x| x.eval(s)).collect::<Result<_>>()?),
            Expr::Tuple(xs) => Value::Tuple(xs.iter().map(|x| x.eval(s)).collect::<Result<_>>()?),
            Expr::Neg(x) => arith(Op::Sub, &Value::Int(0), &x.eval(s)?)?,
            Expr::Not(x) => Value::Bool(!x.eval(s)?.truthy()),
            Expr::Bin(op, a, b) => arith(*op, &a.eval(s)?, &b.eval(s)?)?,
            Expr::Cmp(first, rest) => {
                let mut left = first.eval(s)?;
                for (op, e) in rest {
                    let right = e.eval(s)?;
                    if !compare(*op, &left, &right)? {
                        return Ok(Value::Bool(false));
                    }
                    left = right;
                }
                Value::Bool(true)
            }
            // Python's `and`/`or` give back the deciding operand.
            Expr::And(xs) | Expr::Or(xs) => {
                let want = matches!(self, Expr::Or(_));
                let mut last = Value::Bool(!want);
                for x in xs {
                    last = x.eval(s)?;
                    if last.truthy() == want {
                        break;
                    }
                }
                last
            }
            Expr::If(body, test, orelse) => match test.eval(s)?.truthy() {
                true => body.eval(s)?,
                false => orelse.eval(s)?,
            },
            Expr::Index(seq, i) => index(&seq.eval(s)?, &i.eval(s)?)?,
            Expr::Call(f, args) => {
                let args = args.iter().map(|x| x.eval(s)).collect::<Result<_>>()?;
                s.call(f, args)?
            }
        })
    }
}

impl Value {
    pub fn truthy(&self) -> bool {
        match self {
            Value::None => false,
            Value::Bool(b) => *b,
            Value::Int(i) => *i != 0,
            Value::Float(f) => *f != 0.0,
            Value::Frac(n, _) => *n != 0,
            Value::Str(x) => !x.is_empty(),
            Value::List(x) | Value::Tuple(x) => !x.is_empty(),
        }
    }

    /// Python's `str()`.
    pub fn py_str(&self) -> String {
        match self {
            Value::Str(x) => x.clone(),
            v => v.py_repr(),
        }
    }

    /// Python's `repr()`.
    pub fn py_repr(&self) -> String {
        let join = |xs: &[Value]| xs.iter().map(Value::py_repr).collect::<Vec<_>>().join(", ");
        match self {
            Value::None => "None".into(),
            Value::Bool(b) => if *b { "True" } else { "False" }.into(),
            Value::Int(i) => i.to_string(),
            Value::Float(f) => float_repr(*f),
            Value::Frac(n, 1) => n.to_string(),
            Value::Frac(n, d) => format!("{n}/{d}"),
            Value::Str(x) if x.contains('\'') && !x.contains('"') => format!("\"{x}\""),
            Value::Str(x) => format!("'{}'", x.replace('\\', "\\\\").replace('\'', "\\'")),
            Value::List(xs) => format!("[{}]", join(xs)),
            Value::Tuple(xs) if xs.len() == 1 => format!("({},)", xs[0].py_repr()),
            Value::Tuple(xs) => format!("({})", join(xs)),
        }
    }

    /// As a float, for `float()`, `round()` and mixed arithmetic.
    pub fn as_f64(&self) -> Result<f64> {
        match num(self)? {
            Num::I(i) => Ok(i as f64),
            Num::Q(n, d) => Ok(n as f64 / d as f64),
            Num::F(f) => Ok(f),
        }
    }

    pub fn as_int(&self) -> Result<i64> {
        match self {
            Value::Int(i) => Ok(*i),
            Value::Bool(b) => Ok(*b as i64),
            v => bail!("expected an integer, got {}", v.py_repr()),
        }
    }
}

/// Python's float repr: the shortest digits that read back the same, `.0` on
/// whole numbers, and an exponent below 1e-4 or from 1e16 on.
pub fn float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    let a = x.abs();
    if a != 0.0 && !(1e-4..1e16).contains(&a) {
        let s = format!("{x:e}");
        let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
        let e: i32 = e.parse().unwrap_or(0);
        return format!("{m}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs());
    }
    let s = format!("{x}");
    if s.contains('.') {
        s
    } else {
        s + ".0"
    }
}

/// A number, with bools as ints.
#[derive(Clone, Copy)]
enum Num {
    I(i64),
    Q(i64, i64),
    F(f64),
}

fn num(v: &Value) -> Result<Num> {
    Ok(match v {
        Value::Bool(b) => Num::I(*b as i64),
        Value::Int(i) => Num::I(*i),
        Value::Frac(n, d) => Num::Q(*n, *d),
        Value::Float(f) => Num::F(*f),
        v => bail!("{} is not a number", v.py_repr()),
    })
}

pub fn gcd(a: i128, b: i128) -> i128 {
    if b == 0 {
        a.abs()
    } else {
        gcd(b, a % b)
    }
}

/// The reduced fraction n/d (an int when d divides n).
pub fn frac(n: i128, d: i128) -> Result<Value> {
    if d == 0 {
        bail!("division by zero");
    }
    let g = gcd(n, d) * d.signum();
    let (n, d) = (n / g, d / g);
    let fit = |x: i128| i64::try_from(x).map_err(|_| anyhow!("integer overflow"));
    Ok(Value::Frac(fit(n)?, fit(d)?))
}

fn floor_div(a: i128, b: i128) -> i128 {
    let q = a / b;
    if a % b != 0 && (a < 0) != (b < 0) {
        q - 1
    } else {
        q
    }
}

fn int(x: i128) -> Result<Value> {
    i64::try_from(x)
        .map(Value::Int)
        .map_err(|_| anyhow!("integer overflow"))
}

pub fn arith(op: Op, a: &Value, b: &Value) -> Result<Value> {
    use Value::{Int, List, Str};
    match (op, a, b) {
        (Op::Add, Str(x), Str(y)) => return Ok(Str(format!("{x}{y}"))),
        (Op::Add, List(x), List(y)) => return Ok(List([x.clone(), y.clone()].concat())),
        (Op::Mul, Str(x), Int(n)) | (Op::Mul, Int(n), Str(x)) => {
            return Ok(Str(x.repeat((*n).max(0) as usize)))
        }
        _ => {}
    }
    let (x, y) = (num(a)?, num(b)?);
    match (x, y) {
        (Num::I(x), Num::I(y)) => int_op(op, x as i128, y as i128),
        (Num::F(_), _) | (_, Num::F(_)) => float_op(op, a.as_f64()?, b.as_f64()?),
        _ => {
            let q = |n: Num| match n {
                Num::Q(n, d) => (n as i128, d as i128),
                Num::I(i) => (i as i128, 1),
                Num::F(_) => unreachable!("floats handled above"),
            };
            frac_op(op, q(x), q(y))
        }
    }
}

fn int_op(op: Op, x: i128, y: i128) -> Result<Value> {
    let zero = || anyhow!("division by zero");
    match op {
        Op::Add => int(x + y),
        Op::Sub => int(x - y),
        Op::Mul => int(x * y),
        Op::Div if y == 0 => Err(zero()),
        Op::Div => Ok(Value::Float(x as f64 / y as f64)),
        Op::FloorDiv | Op::Mod if y == 0 => Err(zero()),
        Op::FloorDiv => int(floor_div(x, y)),
        Op::Mod => int(x - y * floor_div(x, y)),
        Op::Pow if y < 0 => float_op(op, x as f64, y as f64),
        Op::Pow => {
            let e = u32::try_from(y).map_err(|_| anyhow!("integer overflow"))?;
            int(x
                .checked_pow(e)
                .ok_or_else(|| anyhow!("integer overflow"))?)
        }
    }
}

fn float_op(op: Op, x: f64, y: f64) -> Result<Value> {
    if y == 0.0 && matches!(op, Op::Div | Op::FloorDiv | Op::Mod) {
        bail!("float division by zero");
    }
    let r = match op {
        Op::Add => x + y,
        Op::Sub => x - y,
        Op::Mul => x * y,
        Op::Div => x / y,
        Op::FloorDiv => (x / y).floor(),
        Op::Mod => {
            let r = x % y;
            if r != 0.0 && (r < 0.0) != (y < 0.0) {
                r + y
            } else {
                r
            }
        }
        Op::Pow => x.powf(y),
    };
    if r.is_nan() {
        bail!("math domain error");
    }
    Ok(Value::Float(r))
}

fn frac_op(op: Op, (an, ad): (i128, i128), (bn, bd): (i128, i128)) -> Result<Value> {
    let big = |x: Option<i128>| x.ok_or_else(|| anyhow!("integer overflow"));
    match op {
        Op::Add => frac(an * bd + bn * ad, ad * bd),
        Op::Sub => frac(an * bd - bn * ad, ad * bd),
        Op::Mul => frac(an * bn, ad * bd),
        Op::Div => frac(an * bd, ad * bn),
        Op::FloorDiv | Op::Mod if bn == 0 => bail!("division by zero"),
        Op::FloorDiv => int(floor_div(an * bd, ad * bn)),
        Op::Mod => {
            let q = floor_div(an * bd, ad * bn);
            frac(an * bd - q * bn * ad, ad * bd)
        }
        Op::Pow if bd == 1 => {
            let e = u32::try_from(bn.unsigned_abs()).map_err(|_| anyhow!("integer overflow"))?;
            let (n, d) = (big(an.checked_pow(e))?, big(ad.checked_pow(e))?);
            if bn < 0 {
                frac(d, n)
            } else {
                frac(n, d)
            }
        }
        Op::Pow => float_op(op, an as f64 / ad as f64, bn as f64 / bd as f64),
    }
}

pub fn py_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::None, Value::None) => true,
        (Value::Str(x), Value::Str(y)) => x == y,
        (Value::List(x), Value::List(y)) | (Value::Tuple(x), Value::Tuple(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| py_eq(a, b))
        }
        _ => matches!(order(a, b), Ok(Some(std::cmp::Ordering::Equal))),
    }
}

/// Numeric order (exact between ints and fractions), or strings'.
fn order(a: &Value, b: &Value) -> Result<Option<std::cmp::Ordering>> {
    if let (Value::Str(x), Value::Str(y)) = (a, b) {
        return Ok(Some(x.cmp(y)));
    }
    let q = |n: Num| match n {
        Num::I(i) => Some((i as i128, 1i128)),
        Num::Q(n, d) => Some((n as i128, d as i128)),
        Num::F(_) => None,
    };
    let (x, y) = (num(a)?, num(b)?);
    Ok(match (q(x), q(y)) {
        (Some((an, ad)), Some((bn, bd))) => Some((an * bd).cmp(&(bn * ad))),
        _ => a.as_f64()?.partial_cmp(&b.as_f64()?),
    })
}

pub fn compare(op: Cmp, a: &Value, b: &Value) -> Result<bool> {
    use std::cmp::Ordering::*;
    match op {
        Cmp::Eq => return Ok(py_eq(a, b)),
        Cmp::Ne => return Ok(!py_eq(a, b)),
        _ => {}
    }
    let o = order(a, b).map_err(|_| anyhow!("cannot order {} and {}", a.py_repr(), b.py_repr()))?;
    Ok(match (op, o) {
        (_, None) => false,
        (Cmp::Lt, Some(o)) => o == Less,
        (Cmp::Le, Some(o)) => o != Greater,
        (Cmp::Gt, Some(o)) => o == Greater,
        _ => o != Some(Less),
    })
}

/// `seq[i]`, negative indices counting from the end.
pub fn index(seq: &Value, i: &Value) -> Result<Value> {
    let i = i.as_int()?;
    let item = |n: usize| {
        let at = if i < 0 { n as i64 + i } else { i };
        (0..n as i64)
            .contains(&at)
            .then_some(at as usize)
            .ok_or_else(|| anyhow!("index {i} out of range"))
    };
    match seq {
        Value::List(xs) | Value::Tuple(xs) => Ok(xs[item(xs.len())?].clone()),
        Value::Str(s) => {
            let cs: Vec<char> = s.chars().collect();
            Ok(Value::Str(cs[item(cs.len())?].to_string()))
        }
        v => bail!("{} cannot be indexed", v.py_repr()),
    }
}

mod parse;
pub use parse::parse;
