//! Choosing the variables of one instance and rendering its texts.

use super::{Instance, Kind, Template, CURLY, MAX_COMBINATIONS, TEMPLATE_VAR};
use crate::data::gsm_helpers::{is_int, parse_value, Env, Mode};
use crate::data::pyexpr::Value;
use crate::rng::Rng;
use anyhow::{anyhow, bail, Result};
use regex::{Captures, Regex};
use std::collections::HashMap;
use std::sync::LazyLock;

type Domains = [Option<Vec<Vec<Value>>>];

/// Walks the constrained lines' product depth first, checking each condition
/// as soon as its variables are set, and keeps a uniform sample of `keep`
/// valid combinations (reservoir sampling) in random order.
struct Search<'a> {
    t: &'a Template,
    doms: Vec<(&'a [String], &'a [Vec<Value>])>,
    vars: HashMap<String, Value>,
    pick: Vec<usize>,
    kept: Vec<Vec<usize>>,
    keep: usize,
    valid: u64,
}

impl Search<'_> {
    fn walk(&mut self, depth: usize, rng: &mut Rng) {
        if depth == self.doms.len() {
            self.valid += 1;
            if self.kept.len() < self.keep {
                self.kept.push(self.pick.clone());
            } else {
                let j = rng.below(self.valid as usize);
                if j < self.keep {
                    self.kept[j] = self.pick.clone();
                }
            }
            return;
        }
        let (names, options) = self.doms[depth];
        for (i, vals) in options.iter().enumerate() {
            for (n, v) in names.iter().zip(vals) {
                self.vars.insert(n.clone(), v.clone());
            }
            if self.holds(depth) {
                self.pick.push(i);
                self.walk(depth + 1, rng);
                self.pick.pop();
            }
        }
    }

    /// The conditions that become checkable at `depth`; one that fails to
    /// evaluate (a division by zero, say) rules the combination out.
    fn holds(&self, depth: usize) -> bool {
        let mut env = Env {
            vars: &self.vars,
            lists: None,
            mode: Mode::Plain,
        };
        (self.t.conditions.iter())
            .filter(|c| c.ready_at == depth)
            .all(|c| c.expr.eval(&mut env).is_ok_and(|v| v.truthy()))
    }
}

impl Template {
    pub(super) fn valid_combinations(
        &self,
        doms: &Domains,
        rng: &mut Rng,
        keep: usize,
    ) -> Result<(Vec<Vec<usize>>, u64)> {
        let cons: Vec<_> = (self.lines.iter().zip(doms))
            .filter(|(l, _)| l.kind == Kind::Constrained)
            .map(|(l, d)| (l.vars.as_slice(), d.as_deref().unwrap_or(&[])))
            .collect();
        if cons.is_empty() {
            return Ok((vec![], 0));
        }
        let total: u128 = cons.iter().map(|(_, d)| d.len() as u128).product();
        if total > MAX_COMBINATIONS {
            bail!("{total} combinations of the constrained variables (the package's limit is {MAX_COMBINATIONS})");
        }
        let mut s = Search {
            t: self,
            doms: cons,
            vars: HashMap::new(),
            pick: vec![],
            kept: vec![],
            keep,
            valid: 0,
        };
        s.walk(0, rng);
        if s.valid == 0 {
            bail!("no values satisfy the conditions");
        }
        let mut kept = s.kept;
        for i in (1..kept.len()).rev() {
            kept.swap(i, rng.below(i + 1));
        }
        Ok((kept, s.valid))
    }

    /// One instance from a constrained combination: free lines drawn,
    /// derived lines computed, texts rendered, the answer checked.
    pub(super) fn make(
        &self,
        doms: &Domains,
        combo: &[usize],
        lists: &HashMap<String, Value>,
        rng: &mut Rng,
    ) -> Result<Instance> {
        let mut raw: Vec<(String, Value)> = Vec::new();
        let mut combo = combo.iter();
        for (l, d) in self.lines.iter().zip(doms) {
            let Some(options) = d else { continue };
            let i = match l.kind {
                Kind::Constrained => *combo
                    .next()
                    .ok_or_else(|| anyhow!("combination too short"))?,
                _ => rng.below(options.len()),
            };
            raw.extend(l.vars.iter().cloned().zip(options[i].iter().cloned()));
        }
        let mut parsed: HashMap<String, Value> = raw
            .iter()
            .map(|(k, v)| (k.clone(), parse_value(v.clone())))
            .collect();
        for l in self.lines.iter().filter(|l| l.kind == Kind::Derived) {
            let mut env = Env {
                vars: &parsed,
                lists: Some(lists),
                mode: Mode::Draw(rng),
            };
            let v = l
                .rhs
                .eval(&mut env)
                .map_err(|e| anyhow!("derived `{}`: {e}", l.vars.join(", ")))?;
            let vals = if l.vars.len() == 1 {
                vec![v]
            } else {
                super::align(l.vars.len(), v)
            };
            for (k, v) in l.vars.iter().zip(vals) {
                parsed.insert(k.clone(), parse_value(v.clone()));
                raw.push((k.clone(), v));
            }
        }
        let by_name: HashMap<&str, &Value> = raw.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let question = TEMPLATE_VAR.replace_all(&self.question, |c: &Captures| {
            by_name.get(&c[1]).map_or(c[0].to_string(), |v| v.py_str())
        });
        let question = capitalize(&english_numbers(&question));
        let mut env = Env {
            vars: &parsed,
            lists: None,
            mode: Mode::Plain,
        };
        let mut failed = None;
        let solution = CURLY.replace_all(&self.solution, |c: &Captures| {
            let e = &self.curly[c[1].trim()];
            match e.eval(&mut env) {
                Ok(v) => whole(v).py_str(),
                Err(err) => {
                    failed.get_or_insert(format!("`{}`: {err}", c[1].trim()));
                    String::new()
                }
            }
        });
        if let Some(e) = failed {
            bail!("worked answer: {e}");
        }
        let solution = capitalize(&english_numbers(&solution));
        let answer = whole(
            self.answer
                .eval(&mut env)
                .map_err(|e| anyhow!("#answer: {e}"))?,
        );
        if !is_int(&answer) {
            bail!("#answer gives {}, not a whole number", answer.py_repr());
        }
        let answer = crate::data::gsm_helpers::round_int(&answer)?;
        let written = solution
            .rsplit_once("####")
            .map(|(_, a)| a.trim().replace(',', ""));
        if written.as_deref() != Some(answer.to_string().as_str()) {
            bail!("#answer gives {answer} but the worked answer ends in {written:?}");
        }
        Ok(Instance {
            question,
            solution,
            answer: answer.to_string(),
            vars: raw,
        })
    }
}

/// Whole floats print as ints in worked answers (the package's rule).
fn whole(v: Value) -> Value {
    match v {
        Value::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Value::Int(f as i64),
        v => v,
    }
}

/// English number formatting: thousands separators from 10,000 on, outside
/// `<<...>>` calculations and the `####` line.
fn english_numbers(text: &str) -> String {
    static SKIP: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"<<[^>]*>>|####\s*-?\d[\d.,]*").unwrap());
    static NUM: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"\b\d+(?:\.\d+)\b|\b\d{5,}\b").unwrap());
    let group = |c: &Captures| {
        let (int, frac) = c[0]
            .split_once('.')
            .map_or((&c[0], None), |(i, f)| (i, Some(f)));
        let mut out = thousands(int);
        if let Some(f) = frac {
            out = format!("{out}.{f}");
        }
        out
    };
    let (mut out, mut at) = (String::new(), 0);
    for m in SKIP.find_iter(text) {
        out += NUM.replace_all(&text[at..m.start()], group).as_ref();
        out += m.as_str();
        at = m.end();
    }
    out + NUM.replace_all(&text[at..], group).as_ref()
}

fn thousands(digits: &str) -> String {
    let digits = digits.trim_start_matches('0');
    let digits = if digits.is_empty() { "0" } else { digits };
    if digits.len() < 5 {
        return digits.to_string();
    }
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The package's `capitalize_sentences`.
fn capitalize(text: &str) -> String {
    static START: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"([.!?]+\s*)([a-z])").unwrap());
    let mut cs = text.chars();
    let first: String = cs
        .next()
        .map_or(String::new(), |c| c.to_uppercase().chain(cs).collect());
    START
        .replace_all(&first, |c: &Captures| {
            format!("{}{}", &c[1], c[2].to_uppercase())
        })
        .into_owned()
}
