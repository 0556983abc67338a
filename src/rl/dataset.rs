//! Prompt/answer data sets (`{"prompt": ..., "answer": ..., ...}` JSON lines;
//! other fields are kept) and a resumable sampler over them.
use crate::policy::Rng;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub prompt: String,
    pub answer: String,
    /// The row's other fields (a worked `solution`, a `test`, ...), as they are.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Row {
    /// A row from a JSON object with string (or number) `prompt` and `answer`.
    pub fn from_json(v: &serde_json::Value) -> Result<Row> {
        let Some(obj) = v.as_object() else {
            bail!(
                "a row must be a JSON object, got {}",
                crate::model::text::describe(v)
            );
        };
        let field = |k: &str| -> Result<String> {
            match obj.get(k) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
                Some(v) => bail!(
                    "field {k:?} must be a string, got {}",
                    crate::model::text::describe(v)
                ),
                None => bail!("missing field {k:?} (rows need \"prompt\" and \"answer\")"),
            }
        };
        let mut extra = obj.clone();
        extra.remove("prompt");
        extra.remove("answer");
        Ok(Row {
            prompt: field("prompt")?,
            answer: field("answer")?,
            extra,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Dataset {
    pub rows: Vec<Row>,
}

impl Dataset {
    /// Reads a JSONL file; a bad line is an error naming the file and line.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let bytes = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(&bytes);
        let mut rows = Vec::new();
        for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let line = std::str::from_utf8(line).map_err(|e| {
                anyhow!(
                    "{}:{}: invalid UTF-8 at byte {} of the line",
                    path.display(),
                    i + 1,
                    e.valid_up_to()
                )
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| anyhow!("{}:{}: malformed JSON: {e}", path.display(), i + 1))?;
            let row =
                Row::from_json(&v).map_err(|e| anyhow!("{}:{}: {e}", path.display(), i + 1))?;
            rows.push(row);
        }
        if rows.is_empty() {
            bail!("{}: no rows", path.display());
        }
        Ok(Dataset { rows })
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// Walks a data set in a fresh shuffled order each epoch. Its whole state is
/// (seed, epoch, cursor), so a run resumes at the same next prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sampler {
    pub seed: u64,
    pub epoch: u64,
    pub cursor: usize,
}

impl Sampler {
    pub fn new(seed: u64) -> Self {
        Sampler {
            seed,
            epoch: 0,
            cursor: 0,
        }
    }

    fn order(&self, n: usize) -> Vec<usize> {
        let mut rng = Rng::new(self.seed ^ self.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        order
    }

    /// The next `k` row indices of a data set of `n` rows.
    pub fn next(&mut self, n: usize, k: usize) -> Result<Vec<usize>> {
        if n == 0 {
            bail!("cannot sample from an empty data set");
        }
        let mut out = Vec::with_capacity(k);
        let mut order = self.order(n);
        while out.len() < k {
            if self.cursor == n {
                self.epoch += 1;
                self.cursor = 0;
                order = self.order(n);
            }
            out.push(order[self.cursor]);
            self.cursor += 1;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_covers_each_epoch_and_resumes() {
        let mut s = Sampler::new(3);
        let first: Vec<usize> = s.next(5, 5).unwrap();
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2, 3, 4]);
        let saved = s;
        let a = s.next(5, 7).unwrap();
        let mut t = saved;
        assert_eq!(t.next(5, 7).unwrap(), a);
        assert_eq!((s.epoch, s.cursor), (2, 2));
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let dir = std::env::temp_dir().join(format!("tarpo-ds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("d.jsonl");
        std::fs::write(
            &p,
            "{\"prompt\": \"a\", \"answer\": 1}\n{\"prompt\": \"b\"}\n",
        )
        .unwrap();
        let e = format!("{:#}", Dataset::load(&p).unwrap_err());
        assert!(
            e.contains("d.jsonl:2") && e.contains("missing field \"answer\""),
            "{e}"
        );
        std::fs::write(&p, "{\"prompt\": \"a\", \"answer\": 12}\n\n").unwrap();
        assert_eq!(Dataset::load(&p).unwrap().rows[0].answer, "12");
        std::fs::write(&p, "{oops\n").unwrap();
        assert!(
            format!("{:#}", Dataset::load(&p).unwrap_err()).contains("d.jsonl:1: malformed JSON")
        );
    }
}
