//! Option maps (`#{group: 8, temperature: 0.5}`), checked against each
//! primitive's table of options: an unknown key or a wrong type is an error
//! that names the key and lists the valid ones, never silently ignored. The
//! same table gives `help(name)` its options and defaults, so the two cannot
//! drift apart.
use crate::model::text::one_line;
use anyhow::{anyhow, bail, Result};
use rhai::{Dynamic, Map};

/// An option's type and default.
#[derive(Debug, Clone, Copy)]
pub enum Def {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(&'static str),
    /// Required: no default.
    Required(Ty),
    /// Optional without a default (unset means "off" or "derived").
    Unset(Ty),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    Int,
    Float,
    Bool,
    Str,
    Map,
    Array,
    Any,
}

impl Ty {
    fn name(self) -> &'static str {
        match self {
            Ty::Int => "int",
            Ty::Float => "float",
            Ty::Bool => "bool",
            Ty::Str => "string",
            Ty::Map => "map",
            Ty::Array => "array",
            Ty::Any => "any",
        }
    }
}

impl Def {
    fn ty(self) -> Ty {
        match self {
            Def::Int(_) => Ty::Int,
            Def::Float(_) => Ty::Float,
            Def::Bool(_) => Ty::Bool,
            Def::Str(_) => Ty::Str,
            Def::Required(t) | Def::Unset(t) => t,
        }
    }

    /// How `help` shows the default.
    pub fn show(self) -> String {
        match self {
            Def::Int(i) => i.to_string(),
            Def::Float(f) if f != 0.0 && f.abs() < 1e-3 => format!("{f:e}"),
            Def::Float(f) => format!("{f:?}"),
            Def::Bool(b) => b.to_string(),
            Def::Str(s) => format!("{s:?}"),
            Def::Required(t) => format!("required {}", t.name()),
            Def::Unset(t) => format!("unset ({})", t.name()),
        }
    }
}

/// One option: name, type/default, and a line of help.
#[derive(Debug, Clone, Copy)]
pub struct Opt {
    pub name: &'static str,
    pub def: Def,
    pub doc: &'static str,
}

pub const fn opt(name: &'static str, def: Def, doc: &'static str) -> Opt {
    Opt { name, def, doc }
}

/// A checked option map of one primitive.
pub struct Opts {
    func: &'static str,
    spec: &'static [Opt],
    map: Map,
}

fn type_ok(ty: Ty, v: &Dynamic) -> bool {
    match ty {
        Ty::Int => v.is_int(),
        Ty::Float => v.is_float() || v.is_int(),
        Ty::Bool => v.is_bool(),
        Ty::Str => v.is_string(),
        Ty::Map => v.is_map(),
        Ty::Array => v.is_array(),
        Ty::Any => true,
    }
}

impl Opts {
    /// Checks every key of `map` against `spec` and every required key's presence.
    pub fn check(func: &'static str, spec: &'static [Opt], map: Map) -> Result<Opts> {
        for (k, v) in &map {
            let Some(o) = spec.iter().find(|o| o.name == k.as_str()) else {
                let valid: Vec<&str> = spec.iter().map(|o| o.name).collect();
                let hint = closest(k, &valid)
                    .map(|c| format!(" (did you mean `{c}`?)"))
                    .unwrap_or_default();
                bail!(
                    "{func}: unknown option `{}`{hint}; valid options: {}",
                    one_line(k),
                    valid.join(", ")
                );
            };
            let ty = o.def.ty();
            if !v.is_unit() && !type_ok(ty, v) {
                bail!(
                    "{func}: option `{k}` must be {} {}, got {} ({})",
                    article(ty),
                    ty.name(),
                    v.type_name(),
                    one_line(&v.to_string())
                );
            }
        }
        for o in spec {
            if let Def::Required(_) = o.def {
                if !map.contains_key(o.name) {
                    bail!("{func}: option `{}` is required ({})", o.name, o.doc);
                }
            }
        }
        Ok(Opts { func, spec, map })
    }

    fn spec(&self, name: &str) -> Result<Opt> {
        match self.spec.iter().find(|o| o.name == name) {
            Some(o) => Ok(*o),
            None => bail!("internal: {} has no option `{name}`", self.func),
        }
    }

    fn given(&self, name: &str) -> Option<&Dynamic> {
        self.map.get(name).filter(|v| !v.is_unit())
    }

    /// The given value (type-checked by `check`), else the spec's default.
    fn get<T>(
        &self,
        name: &str,
        value: fn(&Dynamic) -> Option<T>,
        default: fn(Def) -> Option<T>,
    ) -> Result<T> {
        let def = self.spec(name)?.def;
        match self.given(name) {
            Some(v) => value(v),
            None => default(def),
        }
        .ok_or_else(|| anyhow!("{}: option `{name}` has no value", self.func))
    }

    /// The given value, or None when unset (options without a default).
    fn get_opt<T>(&self, name: &str, value: fn(&Dynamic) -> Option<T>) -> Result<Option<T>> {
        self.spec(name)?;
        Ok(self.given(name).and_then(value))
    }

    pub fn int(&self, name: &str) -> Result<i64> {
        self.get(
            name,
            |v| v.as_int().ok(),
            |d| match d {
                Def::Int(i) => Some(i),
                _ => None,
            },
        )
    }

    /// A non-negative integer (sizes and counts).
    pub fn usize(&self, name: &str) -> Result<usize> {
        let v = self.int(name)?;
        if v < 0 {
            bail!("{}: option `{name}` must be >= 0, got {v}", self.func);
        }
        Ok(v as usize)
    }

    /// A positive integer (sizes that cannot be 0: group, micro_batch, max_new).
    pub fn positive(&self, name: &str) -> Result<usize> {
        let v = self.int(name)?;
        if v < 1 {
            bail!("{}: option `{name}` must be >= 1, got {v}", self.func);
        }
        Ok(v as usize)
    }

    /// A finite float (weights of loss terms).
    pub fn finite(&self, name: &str) -> Result<f64> {
        let v = self.float(name)?;
        if !v.is_finite() {
            bail!(
                "{}: option `{name}` must be a finite number, got {v}",
                self.func
            );
        }
        Ok(v)
    }

    pub fn float(&self, name: &str) -> Result<f64> {
        self.get(name, as_f64, |d| match d {
            Def::Float(f) => Some(f),
            _ => None,
        })
    }

    pub fn bool(&self, name: &str) -> Result<bool> {
        self.get(
            name,
            |v| v.as_bool().ok(),
            |d| match d {
                Def::Bool(b) => Some(b),
                _ => None,
            },
        )
    }

    pub fn str(&self, name: &str) -> Result<String> {
        self.get(
            name,
            |v| v.clone().into_string().ok(),
            |d| match d {
                Def::Str(s) => Some(s.to_string()),
                _ => None,
            },
        )
    }

    pub fn opt_int(&self, name: &str) -> Result<Option<i64>> {
        self.get_opt(name, |v| v.as_int().ok())
    }

    pub fn opt_float(&self, name: &str) -> Result<Option<f64>> {
        self.get_opt(name, as_f64)
    }

    pub fn opt_bool(&self, name: &str) -> Result<Option<bool>> {
        self.get_opt(name, |v| v.as_bool().ok())
    }

    pub fn opt_str(&self, name: &str) -> Result<Option<String>> {
        self.get_opt(name, |v| v.clone().into_string().ok())
    }

    pub fn map(&self, name: &str) -> Option<Map> {
        self.given(name).and_then(|v| v.clone().try_cast::<Map>())
    }

    pub fn raw(&self, name: &str) -> Option<Dynamic> {
        self.given(name).cloned()
    }

    /// `name` must be one of `choices`.
    pub fn choice(&self, name: &str, choices: &[&str]) -> Result<String> {
        let v = self.str(name)?;
        if !choices.contains(&v.as_str()) {
            bail!(
                "{}: option `{name}` must be one of {}, got {}",
                self.func,
                choices
                    .iter()
                    .map(|c| format!("{c:?}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                one_line(&format!("{v:?}"))
            );
        }
        Ok(v)
    }
}

/// A number as f64 (ints widen).
pub fn as_f64(v: &Dynamic) -> Option<f64> {
    if let Ok(f) = v.as_float() {
        Some(f)
    } else {
        v.as_int().ok().map(|i| i as f64)
    }
}

fn article(ty: Ty) -> &'static str {
    match ty {
        Ty::Int | Ty::Array | Ty::Any => "an",
        _ => "a",
    }
}

/// The valid name nearest to a misspelling (edit distance <= 2).
pub(crate) fn closest<'a>(word: &str, valid: &[&'a str]) -> Option<&'a str> {
    // The distance is at least the difference in length: long words skip
    // the quadratic comparison.
    let n = word.chars().count();
    valid
        .iter()
        .filter(|v| n.abs_diff(v.chars().count()) <= 2)
        .map(|v| (edit_distance(word, v), *v))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, v)| v)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &[Opt] = &[
        opt("lambda", Def::Float(0.1), "router weight"),
        opt("group", Def::Required(Ty::Int), "completions per prompt"),
        opt("kl", Def::Str("k3"), "KL estimator"),
    ];

    fn map(pairs: &[(&str, Dynamic)]) -> Map {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), v.clone()))
            .collect()
    }

    #[test]
    fn unknown_key_names_it_and_lists_valid_ones() {
        let m = map(&[
            ("lamda", Dynamic::from(0.2)),
            ("group", Dynamic::from(8_i64)),
        ]);
        let e = Opts::check("tarpo_loss", SPEC, m)
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            e,
            "tarpo_loss: unknown option `lamda` (did you mean `lambda`?); valid options: lambda, group, kl"
        );
    }

    #[test]
    fn wrong_type_and_missing_required() {
        let m = map(&[("group", Dynamic::from("eight"))]);
        let e = Opts::check("f", SPEC, m).err().unwrap().to_string();
        assert!(
            e.contains("option `group` must be an int, got string"),
            "{e}"
        );
        let e = Opts::check("f", SPEC, Map::new())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("option `group` is required"), "{e}");
    }

    #[test]
    fn values_and_defaults() {
        let m = map(&[
            ("group", Dynamic::from(4_i64)),
            ("lambda", Dynamic::from(1_i64)),
        ]);
        let o = Opts::check("f", SPEC, m).unwrap();
        assert_eq!(o.int("group").unwrap(), 4);
        assert_eq!(o.float("lambda").unwrap(), 1.0); // ints widen to floats
        assert_eq!(o.str("kl").unwrap(), "k3");
        assert!(o.choice("kl", &["k1", "k2"]).is_err());
        assert_eq!(Def::Float(5e-6).show(), "5e-6");
        assert_eq!(Def::Float(0.1).show(), "0.1");
        assert_eq!(Def::Float(1.0).show(), "1.0");
    }
}
