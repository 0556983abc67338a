//! GSM-Symbolic templates made into new problems: the constrained variables
//! enumerated and filtered by the template's conditions, the free ones
//! drawn, the derived ones computed, then question and worked answer
//! rendered as the package renders them. Each instance is kept only if the
//! template's `#answer:` expression, computed here, equals the number after
//! `####` in its rendered worked answer.

use super::gsm_helpers::{parse_value, Env, Mode};
use super::pyexpr::{parse, Expr, Value};
use crate::rng::Rng;
use anyhow::{anyhow, bail, Result};
use regex::Regex;
use std::collections::HashMap;
use std::sync::LazyLock;

/// The package's limit on the constrained variables' combinations.
const MAX_COMBINATIONS: u128 = 10_000_000;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Constrained,
    Free,
    Derived,
}

struct Line {
    vars: Vec<String>,
    rhs: Expr,
    kind: Kind,
}

struct Condition {
    expr: Expr,
    /// The constrained line after which all its variables are known.
    ready_at: usize,
}

/// One template: what `question_annotated` and `answer_annotated` say.
pub struct Template {
    question: String,
    solution: String,
    lines: Vec<Line>,
    conditions: Vec<Condition>,
    answer: Expr,
    curly: HashMap<String, Expr>,
}

/// One made problem, with the variables it was made from.
pub struct Instance {
    pub question: String,
    pub solution: String,
    pub answer: String,
    pub vars: Vec<(String, Value)>,
}

static TEMPLATE_VAR: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\{(\w+),\s*([^}]+)\}").unwrap());
static CURLY: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\{([^}]+)\}").unwrap());

impl Template {
    /// From the two annotated fields; `line_of` gives a text's file line.
    pub fn new(q_ann: &str, a_ann: &str, line_of: &dyn Fn(&str) -> usize) -> Result<Template> {
        let parsed =
            |text: &str| parse(text).map_err(|e| anyhow!("{}: `{text}`: {e}", line_of(text)));
        let after = |tag: &str| q_ann.split_once(tag).map(|(_, rest)| rest);
        let init = after("#init:")
            .ok_or_else(|| anyhow!("{}: no `#init:` block", line_of("question_annotated")))?;
        let init = init.split("#answer:").next().unwrap_or("");
        let init = init.split("#conditions:").next().unwrap_or("");
        let cond_text =
            after("#conditions:").map_or("", |c| c.split("#answer:").next().unwrap_or(""));
        let answer = after("#answer:")
            .ok_or_else(|| anyhow!("{}: no `#answer:`", line_of("question_annotated")))?;

        let mut lines = Vec::new();
        for l in init.trim().lines().map(|l| l.trim_matches(['-', ' '])) {
            let Some((lhs, rhs)) = l.split_once('=') else {
                continue;
            };
            let vars: Vec<String> = lhs
                .replace(['(', ')', '$'], "")
                .split(',')
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .collect();
            lines.push((vars, parsed(rhs.trim())?, l.to_string()));
        }
        let conds: Vec<&str> = cond_text
            .trim()
            .lines()
            .map(|l| l.trim_matches(['-', ' ']))
            .filter(|l| !l.is_empty())
            .collect();
        let all_vars: Vec<String> = lines.iter().flat_map(|(v, _, _)| v.clone()).collect();
        let mentioned = |v: &str| {
            let re = Regex::new(&format!(r"(?i)\b{}\b", regex::escape(v))).unwrap();
            conds.iter().any(|c| re.is_match(c))
        };
        let mut built: Vec<Line> = Vec::new();
        for (vars, rhs, text) in lines {
            let mut names = Vec::new();
            rhs.names(&mut names);
            let kind = if names.iter().any(|n| all_vars.contains(n)) {
                if let Some(v) = vars.iter().find(|v| mentioned(v)) {
                    bail!(
                        "{}: derived variable `{v}` is used in #conditions",
                        line_of(&text)
                    );
                }
                Kind::Derived
            } else if vars.iter().any(|v| mentioned(v)) {
                Kind::Constrained
            } else {
                Kind::Free
            };
            built.push(Line { vars, rhs, kind });
        }
        let constrained: Vec<&Line> = built
            .iter()
            .filter(|l| l.kind == Kind::Constrained)
            .collect();
        let mut conditions = Vec::new();
        for c in conds.into_iter().filter(|c| *c != "True") {
            let expr = parsed(c)?;
            let mut names = Vec::new();
            expr.names(&mut names);
            let ready_at = (constrained.iter())
                .rposition(|l| l.vars.iter().any(|v| names.contains(v)))
                .unwrap_or(0);
            conditions.push(Condition { expr, ready_at });
        }
        let mut curly = HashMap::new();
        for m in CURLY.captures_iter(a_ann) {
            let text = m[1].trim().to_string();
            if !curly.contains_key(&text) {
                curly.insert(text.clone(), parsed(&text)?);
            }
        }
        let question = q_ann.lines().next().unwrap_or("").trim().to_string();
        Ok(Template {
            question,
            solution: a_ann.to_string(),
            lines: built,
            conditions,
            answer: parsed(answer.trim())?,
            curly,
        })
    }

    /// Up to `n` distinct problems (none equal to `skip`, the original
    /// question), with the number of valid constrained combinations and the
    /// reasons draws were dropped.
    pub fn instantiate(
        &self,
        lists: &HashMap<String, Value>,
        n: usize,
        rng: &mut Rng,
        skip: &str,
    ) -> Result<(Vec<Instance>, u64, Vec<String>)> {
        let domains = self.domains(lists)?;
        let (combos, valid) = self.valid_combinations(&domains, rng, 4 * n.max(1))?;
        let (mut out, mut dropped) = (Vec::new(), Vec::new());
        let mut seen = std::collections::HashSet::from([skip.to_string()]);
        let draws = if self.lines.iter().any(|l| l.kind == Kind::Constrained) {
            combos
        } else {
            vec![vec![]; 20 * n]
        };
        for combo in draws {
            if out.len() == n {
                break;
            }
            match self.make(&domains, &combo, lists, rng) {
                Ok(inst) if seen.insert(inst.question.clone()) => out.push(inst),
                Ok(_) => {}
                Err(e) => dropped.push(e.to_string()),
            }
        }
        Ok((out, valid, dropped))
    }

    /// Every value each non-derived line can take (`None` for derived ones);
    /// constrained values already through `parse_value`, as in the package.
    fn domains(&self, lists: &HashMap<String, Value>) -> Result<Vec<Option<Vec<Vec<Value>>>>> {
        let none = HashMap::new();
        let mut env = Env {
            vars: &none,
            lists: Some(lists),
            mode: Mode::Enumerate,
        };
        let mut out = Vec::new();
        for l in &self.lines {
            if l.kind == Kind::Derived {
                out.push(None);
                continue;
            }
            let v = l
                .rhs
                .eval(&mut env)
                .map_err(|e| anyhow!("init `{}`: {e}", l.vars.join(", ")))?;
            let options = match v {
                Value::List(xs) => xs,
                Value::Tuple(xs) if l.vars.len() > 1 && xs.len() == l.vars.len() => {
                    vec![Value::Tuple(xs)]
                }
                v => vec![v],
            };
            let mut cands = Vec::new();
            for o in options {
                let vals = if l.vars.len() == 1 {
                    vec![o]
                } else {
                    align(l.vars.len(), o)
                };
                if vals.len() != l.vars.len() {
                    bail!(
                        "init `{}`: {} variables but values {:?}",
                        l.vars.join(", "),
                        l.vars.len(),
                        vals
                    );
                }
                let parse = l.kind == Kind::Constrained;
                cands.push(
                    vals.into_iter()
                        .map(|v| if parse { parse_value(v) } else { v })
                        .collect(),
                );
            }
            if cands.is_empty() {
                bail!("init `{}`: no values", l.vars.join(", "));
            }
            out.push(Some(cands));
        }
        Ok(out)
    }
}

/// The package's `align_values_to_variables`: a sequence of pairs for
/// `(a, b), (c, d)` is flattened one level.
fn align(n: usize, v: Value) -> Vec<Value> {
    match v {
        Value::List(xs) | Value::Tuple(xs) if xs.len() == n => xs,
        Value::List(xs) | Value::Tuple(xs) => xs
            .into_iter()
            .flat_map(|x| match x {
                Value::List(ys) | Value::Tuple(ys) => ys,
                x => vec![x],
            })
            .collect(),
        v => vec![v],
    }
}

mod make;
