//! Tokens and a recursive-descent parser for Python's expression grammar
//! (the subset the templates use), with Python's precedence: `if`-`else`,
//! `or`, `and`, `not`, comparisons, `+ -`, `* / // %`, unary `-`, `**`,
//! calls and subscripts.

use super::{Cmp, Expr, Op, Value};
use anyhow::{anyhow, bail, Result};

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(f64, bool), // value, written as an int
    Str(String),
    Name(String),
    Sym(&'static str),
}

const SYMS: [&str; 19] = [
    "**", "//", "==", "!=", "<=", ">=", "<", ">", "+", "-", "*", "/", "%", "(", ")", "[", "]", ",",
    "=",
];

fn lex(src: &str) -> Result<Vec<Tok>> {
    let cs: Vec<char> = src.chars().collect();
    let (mut out, mut i) = (Vec::new(), 0);
    while i < cs.len() {
        let c = cs[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit()
            || (c == '.' && cs.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            let start = i;
            while i < cs.len() && (cs[i].is_ascii_alphanumeric() || cs[i] == '.') {
                let exp_sign =
                    matches!(cs[i], 'e' | 'E') && matches!(cs.get(i + 1), Some('+' | '-'));
                i += 1 + exp_sign as usize;
            }
            let text: String = cs[start..i].iter().collect();
            let whole = text.chars().all(|c| c.is_ascii_digit());
            let v = text
                .parse::<f64>()
                .map_err(|_| anyhow!("bad number `{text}`"))?;
            out.push(Tok::Num(v, whole));
        } else if c == '\'' || c == '"' {
            let mut s = String::new();
            i += 1;
            loop {
                match cs.get(i) {
                    None => bail!("unterminated string"),
                    Some(&q) if q == c => break,
                    Some('\\') => {
                        let e = *cs
                            .get(i + 1)
                            .ok_or_else(|| anyhow!("unterminated string"))?;
                        s.push(match e {
                            'n' => '\n',
                            't' => '\t',
                            e => e,
                        });
                        i += 2;
                        continue;
                    }
                    Some(&ch) => s.push(ch),
                }
                i += 1;
            }
            i += 1;
            out.push(Tok::Str(s));
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < cs.len() && (cs[i].is_alphanumeric() || cs[i] == '_') {
                i += 1;
            }
            out.push(Tok::Name(cs[start..i].iter().collect()));
        } else {
            let rest: String = cs[i..cs.len().min(i + 2)].iter().collect();
            let sym = SYMS
                .iter()
                .find(|s| rest.starts_with(**s))
                .ok_or_else(|| anyhow!("unexpected `{c}`"))?;
            out.push(Tok::Sym(sym));
            i += sym.len();
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    at: usize,
}

/// Parses one Python expression (a bare `a, b` is a tuple, as in Python).
pub fn parse(src: &str) -> Result<Expr> {
    let mut p = Parser {
        toks: lex(src)?,
        at: 0,
    };
    let e = p.tuple_or(Parser::expr, None)?;
    match p.toks.get(p.at) {
        None => Ok(e),
        Some(t) => bail!("unexpected {t:?} after the expression"),
    }
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.at)
    }

    fn eat_sym(&mut self, s: &str) -> bool {
        let hit = matches!(self.peek(), Some(Tok::Sym(x)) if *x == s);
        self.at += hit as usize;
        hit
    }

    fn eat_word(&mut self, w: &str) -> bool {
        let hit = matches!(self.peek(), Some(Tok::Name(x)) if x == w);
        self.at += hit as usize;
        hit
    }

    fn expect(&mut self, s: &str) -> Result<()> {
        match self.eat_sym(s) {
            true => Ok(()),
            false => bail!("expected `{s}`, found {:?}", self.peek()),
        }
    }

    /// `item (, item)* [,]`, a tuple when there is a comma; `close` ends it
    /// early (for `()` and trailing commas).
    fn tuple_or(
        &mut self,
        item: fn(&mut Self) -> Result<Expr>,
        close: Option<&str>,
    ) -> Result<Expr> {
        let first = item(self)?;
        if !matches!(self.peek(), Some(Tok::Sym(","))) {
            return Ok(first);
        }
        let mut xs = vec![first];
        while self.eat_sym(",") {
            let closing = matches!(self.peek(), Some(Tok::Sym(x)) if Some(*x) == close);
            if self.peek().is_none() || closing {
                break;
            }
            xs.push(item(self)?);
        }
        Ok(Expr::Tuple(xs))
    }

    fn expr(&mut self) -> Result<Expr> {
        let body = self.or()?;
        if !self.eat_word("if") {
            return Ok(body);
        }
        let test = self.or()?;
        if !self.eat_word("else") {
            bail!("`if` without `else`");
        }
        Ok(Expr::If(
            Box::new(body),
            Box::new(test),
            Box::new(self.expr()?),
        ))
    }

    /// `next (word next)*`, wrapped when there is more than one.
    fn chain(
        &mut self,
        word: &str,
        next: fn(&mut Self) -> Result<Expr>,
        wrap: fn(Vec<Expr>) -> Expr,
    ) -> Result<Expr> {
        let mut xs = vec![next(self)?];
        while self.eat_word(word) {
            xs.push(next(self)?);
        }
        Ok(if xs.len() == 1 {
            xs.remove(0)
        } else {
            wrap(xs)
        })
    }

    fn or(&mut self) -> Result<Expr> {
        self.chain("or", Self::and, Expr::Or)
    }

    fn and(&mut self) -> Result<Expr> {
        self.chain("and", Self::not, Expr::And)
    }

    fn not(&mut self) -> Result<Expr> {
        if self.eat_word("not") {
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        self.comparison()
    }

    fn comparison(&mut self) -> Result<Expr> {
        let first = self.sum()?;
        let mut rest = Vec::new();
        loop {
            let op = match self.peek() {
                Some(Tok::Sym("<")) => Cmp::Lt,
                Some(Tok::Sym("<=")) => Cmp::Le,
                Some(Tok::Sym(">")) => Cmp::Gt,
                Some(Tok::Sym(">=")) => Cmp::Ge,
                Some(Tok::Sym("==")) => Cmp::Eq,
                Some(Tok::Sym("!=")) => Cmp::Ne,
                _ => break,
            };
            self.at += 1;
            rest.push((op, self.sum()?));
        }
        Ok(if rest.is_empty() {
            first
        } else {
            Expr::Cmp(Box::new(first), rest)
        })
    }

    fn binary(&mut self, ops: &[(&str, Op)], next: fn(&mut Self) -> Result<Expr>) -> Result<Expr> {
        let mut e = next(self)?;
        'outer: loop {
            for (s, op) in ops {
                if self.eat_sym(s) {
                    e = Expr::Bin(*op, Box::new(e), Box::new(next(self)?));
                    continue 'outer;
                }
            }
            return Ok(e);
        }
    }

    fn sum(&mut self) -> Result<Expr> {
        self.binary(&[("+", Op::Add), ("-", Op::Sub)], Self::term)
    }

    fn term(&mut self) -> Result<Expr> {
        let ops = [
            ("*", Op::Mul),
            ("//", Op::FloorDiv),
            ("/", Op::Div),
            ("%", Op::Mod),
        ];
        self.binary(&ops, Self::factor)
    }

    fn factor(&mut self) -> Result<Expr> {
        if self.eat_sym("-") {
            return Ok(Expr::Neg(Box::new(self.factor()?)));
        }
        if self.eat_sym("+") {
            return self.factor();
        }
        let base = self.primary()?;
        if self.eat_sym("**") {
            return Ok(Expr::Bin(Op::Pow, Box::new(base), Box::new(self.factor()?)));
        }
        Ok(base)
    }

    fn primary(&mut self) -> Result<Expr> {
        let mut e = self.atom()?;
        loop {
            if self.eat_sym("(") {
                let Expr::Name(f) = e else {
                    bail!("only named functions can be called")
                };
                let mut args = Vec::new();
                while !self.eat_sym(")") {
                    args.push(self.expr()?);
                    if !self.eat_sym(",") {
                        self.expect(")")?;
                        break;
                    }
                }
                e = Expr::Call(f, args);
            } else if self.eat_sym("[") {
                let i = self.expr()?;
                self.expect("]")?;
                e = Expr::Index(Box::new(e), Box::new(i));
            } else {
                return Ok(e);
            }
        }
    }

    fn atom(&mut self) -> Result<Expr> {
        let t = self
            .toks
            .get(self.at)
            .cloned()
            .ok_or_else(|| anyhow!("unexpected end of the expression"))?;
        self.at += 1;
        Ok(match t {
            Tok::Num(v, true) if v.abs() < 9.0e15 => Expr::Const(Value::Int(v as i64)),
            Tok::Num(v, true) => bail!("integer literal {v} is too large"),
            Tok::Num(v, false) => Expr::Const(Value::Float(v)),
            Tok::Str(s) => Expr::Const(Value::Str(s)),
            Tok::Name(n) => match n.as_str() {
                "True" => Expr::Const(Value::Bool(true)),
                "False" => Expr::Const(Value::Bool(false)),
                "None" => Expr::Const(Value::None),
                "and" | "or" | "not" | "if" | "else" => bail!("unexpected `{n}`"),
                _ => Expr::Name(n),
            },
            Tok::Sym("(") => {
                if self.eat_sym(")") {
                    return Ok(Expr::Tuple(vec![]));
                }
                let e = self.tuple_or(Self::expr, Some(")"))?;
                self.expect(")")?;
                e
            }
            Tok::Sym("[") => {
                let mut xs = Vec::new();
                while !self.eat_sym("]") {
                    xs.push(self.expr()?);
                    if !self.eat_sym(",") {
                        self.expect("]")?;
                        break;
                    }
                }
                Expr::List(xs)
            }
            t => bail!("unexpected {t:?}"),
        })
    }
}
