//! Records as Polars frames: the routing frame (one row per generated token,
//! DESIGN.md "Records"), frames from loosely typed metric rows, SQL over a
//! frame, parquet/CSV files, and column access for charts.
pub use super::files::{read_csv, read_parquet, write_csv, write_parquet};
pub(crate) use super::files::{temp_sibling, write_atomic};
pub use super::rows::frame_from_rows;
use super::token_class::token_class;
use crate::model::Tokenizer;
use crate::policy::{Rollout, TokenRecord};
use crate::policy::{HARD, LATENT, SOFT};
use anyhow::{anyhow, bail, Context, Result};
use polars::prelude::*;
use polars::sql::SQLContext;
use std::collections::HashMap;

/// What a rollout does not know about itself: where it comes from and how it
/// was scored. `rewards` and `advantages` hold one value per sequence.
pub struct RecordMeta<'a> {
    pub run: &'a str,
    pub step: i64,
    /// Samples per prompt: sequence i is sample i % group of prompt i / group.
    pub group: usize,
    pub rewards: Option<&'a [f64]>,
    pub advantages: Option<&'a [f64]>,
}

/// The routing frame's columns, in order (DESIGN.md "Records").
pub const ROUTING_COLUMNS: [&str; 16] = [
    "run",
    "step",
    "prompt_id",
    "sample_id",
    "position",
    "token_id",
    "token",
    "token_class",
    "mode",
    "forced",
    "p_soft",
    "logp",
    "entropy",
    "topk_entropy",
    "reward",
    "advantage",
];

/// One row per generated step of `ro`, columns `ROUTING_COLUMNS` (a Coconut
/// thought has mode "latent", token_id -1, token "" and class "other"). `token` is
/// the token decoded alone (special tokens kept; a byte-level piece of a
/// multi-byte character decodes to U+FFFD). `reward`/`advantage` repeat the
/// sequence's value on each of its tokens, null when not given.
pub fn routing_frame(ro: &Rollout, tok: &Tokenizer, meta: &RecordMeta) -> Result<DataFrame> {
    check_meta(meta, ro.records.len())?;
    let mut cols = RoutingColumns::default();
    let mut texts = TokenTexts::new(tok);
    for (i, seq) in ro.records.iter().enumerate() {
        for (j, rec) in seq.iter().enumerate() {
            let text = if rec.has_token() {
                texts.get(rec.token)?
            } else {
                ""
            };
            cols.push(i, j, rec, text, meta)
                .with_context(|| format!("sequence {i}, token {j}"))?;
        }
    }
    cols.into_frame(meta.run, meta.step)
}

fn check_meta(meta: &RecordMeta, sequences: usize) -> Result<()> {
    if meta.group == 0 {
        bail!("routing frame: group must be > 0 (samples per prompt)");
    }
    for (name, values) in [("rewards", meta.rewards), ("advantages", meta.advantages)] {
        if let Some(v) = values {
            if v.len() != sequences {
                bail!(
                    "routing frame: {} {name} for {sequences} sequences (one per sequence expected)",
                    v.len()
                );
            }
        }
    }
    Ok(())
}

/// Decodes each distinct token id once: a rollout repeats few ids many times.
struct TokenTexts<'a> {
    tok: &'a Tokenizer,
    cache: HashMap<i64, String>,
}

impl<'a> TokenTexts<'a> {
    fn new(tok: &'a Tokenizer) -> Self {
        TokenTexts {
            tok,
            cache: HashMap::new(),
        }
    }

    fn get(&mut self, id: i64) -> Result<&str> {
        if !self.cache.contains_key(&id) {
            if id < 0 || id > u32::MAX as i64 {
                bail!("token id {id} cannot be a vocabulary id");
            }
            let text = self
                .tok
                .decode(&[id], false)
                .with_context(|| format!("decoding token id {id}"))?;
            self.cache.insert(id, text);
        }
        Ok(self.cache[&id].as_str())
    }
}

/// Column buffers of the routing frame (the constant run/step are added last).
#[derive(Default)]
struct RoutingColumns {
    prompt_id: Vec<i64>,
    sample_id: Vec<i64>,
    position: Vec<i64>,
    token_id: Vec<i64>,
    token: Vec<String>,
    token_class: Vec<&'static str>,
    mode: Vec<&'static str>,
    forced: Vec<bool>,
    p_soft: Vec<f64>,
    logp: Vec<f64>,
    entropy: Vec<f64>,
    topk_entropy: Vec<f64>,
    reward: Vec<Option<f64>>,
    advantage: Vec<Option<f64>>,
}

impl RoutingColumns {
    /// Token `j` of sequence `i`.
    fn push(
        &mut self,
        i: usize,
        j: usize,
        rec: &TokenRecord,
        text: &str,
        meta: &RecordMeta,
    ) -> Result<()> {
        self.mode.push(match rec.mode {
            HARD => "hard",
            SOFT => "soft",
            LATENT => "latent",
            m => bail!(
                "unknown mode {m} (expected HARD = {HARD}, SOFT = {SOFT} or LATENT = {LATENT})"
            ),
        });
        self.prompt_id.push((i / meta.group) as i64);
        self.sample_id.push((i % meta.group) as i64);
        self.position.push(j as i64);
        self.token_id.push(rec.token);
        self.token.push(text.to_string());
        self.token_class.push(if rec.has_token() {
            token_class(text)
        } else {
            "other"
        });
        self.forced.push(rec.forced);
        self.p_soft.push(rec.p_soft as f64);
        self.logp.push(rec.logp as f64);
        self.entropy.push(rec.entropy as f64);
        self.topk_entropy.push(rec.topk_entropy as f64);
        self.reward.push(meta.rewards.map(|r| r[i]));
        self.advantage.push(meta.advantages.map(|a| a[i]));
        Ok(())
    }

    fn into_frame(self, run: &str, step: i64) -> Result<DataFrame> {
        let n = self.position.len();
        let columns = vec![
            Column::new("run".into(), vec![run; n]),
            Column::new("step".into(), vec![step; n]),
            Column::new("prompt_id".into(), self.prompt_id),
            Column::new("sample_id".into(), self.sample_id),
            Column::new("position".into(), self.position),
            Column::new("token_id".into(), self.token_id),
            Column::new("token".into(), self.token),
            Column::new("token_class".into(), self.token_class),
            Column::new("mode".into(), self.mode),
            Column::new("forced".into(), self.forced),
            Column::new("p_soft".into(), self.p_soft),
            Column::new("logp".into(), self.logp),
            Column::new("entropy".into(), self.entropy),
            Column::new("topk_entropy".into(), self.topk_entropy),
            Column::new("reward".into(), self.reward),
            Column::new("advantage".into(), self.advantage),
        ];
        DataFrame::new(n, columns).map_err(|e| anyhow!("routing frame: {e}"))
    }
}

/// Runs a SQL query over `df`, registered as the table `frame`.
pub fn sql(df: &DataFrame, query: &str) -> Result<DataFrame> {
    let mut ctx = SQLContext::new();
    // A DataFrame clone shares its buffers: this copies no data.
    ctx.register("frame", df.clone().lazy());
    ctx.execute(query)
        .and_then(LazyFrame::collect)
        .map_err(|e| anyhow!("sql: {e}"))
}

/// The column `name`, or an error listing the frame's columns.
fn get_column<'a>(df: &'a DataFrame, name: &str) -> Result<&'a Column> {
    df.column(name).map_err(|_| {
        let have: Vec<&str> = df.get_column_names().iter().map(|c| c.as_str()).collect();
        anyhow!(
            "no column {name:?} in the frame (its columns: {})",
            have.join(", ")
        )
    })
}

/// Column `name` as f64 values (integers and bools cast; nulls kept).
pub fn column_f64(df: &DataFrame, name: &str) -> Result<Vec<Option<f64>>> {
    let col = get_column(df, name)?;
    let dtype = col.dtype();
    if !(dtype.is_primitive_numeric() || dtype.is_bool() || dtype.is_null()) {
        bail!("column {name:?} is {dtype}, not numeric");
    }
    let cast = col
        .cast(&DataType::Float64)
        .map_err(|e| anyhow!("column {name:?}: {e}"))?;
    let values = cast.f64().map_err(|e| anyhow!("column {name:?}: {e}"))?;
    Ok(values.iter().collect())
}

/// Column `name` as strings (other types are formatted by Polars' cast).
pub fn column_strings(df: &DataFrame, name: &str) -> Result<Vec<Option<String>>> {
    let col = get_column(df, name)?;
    let cast = col
        .cast(&DataType::String)
        .map_err(|e| anyhow!("column {name:?} as strings: {e}"))?;
    let values = cast.str().map_err(|e| anyhow!("column {name:?}: {e}"))?;
    Ok(values.iter().map(|s| s.map(String::from)).collect())
}

/// Stacks frames vertically; all must have the first frame's column names and
/// types, in the same order.
pub fn concat(frames: &[DataFrame]) -> Result<DataFrame> {
    let Some((first, rest)) = frames.split_first() else {
        bail!("concat: no frames given");
    };
    let mut out = first.clone();
    for (k, f) in rest.iter().enumerate() {
        if f.schema() != first.schema() {
            bail!(
                "concat: frame {} has columns [{}] but frame 0 has [{}]",
                k + 1,
                describe_schema(f),
                describe_schema(first)
            );
        }
        out.vstack_mut(f).map_err(|e| anyhow!("concat: {e}"))?;
    }
    // vstack appends chunks; one contiguous chunk keeps later scans fast.
    out.rechunk_mut();
    Ok(out)
}

fn describe_schema(df: &DataFrame) -> String {
    df.schema()
        .iter()
        .map(|(name, dtype)| format!("{name}: {dtype}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::policy::LatentRecord;
    use serde_json::{Map, Value};
    use std::path::{Path, PathBuf};

    fn rec(token: i64, mode: i64, p_soft: f32, forced: bool) -> TokenRecord {
        TokenRecord {
            token,
            mode,
            forced,
            logp: -0.5,
            router_logp: 0.0,
            p_soft,
            entropy: 1.0,
            topk_entropy: 0.5,
            mix_ids: vec![],
            mix_weights: vec![],
            latent: LatentRecord::None,
        }
    }

    /// Two prompts, group 2: sequences of 3, 2, 1 and 2 tokens.
    fn rollout(ids: [i64; 3]) -> Rollout {
        let [a, b, c] = ids;
        Rollout {
            prompts: vec![vec![1], vec![1], vec![2], vec![2]],
            records: vec![
                vec![
                    rec(a, SOFT, 0.9, false),
                    rec(b, HARD, 0.2, false),
                    rec(c, HARD, 0.1, true),
                ],
                vec![rec(a, SOFT, 0.7, false), rec(b, HARD, 0.4, true)],
                vec![rec(b, HARD, 0.3, true)],
                vec![rec(c, SOFT, 0.6, false), rec(a, HARD, 0.0, true)],
            ],
            inputs: vec![],
            temperature: 1.0,
            mix_k: 10,
        }
    }

    /// The SmolLM2 tokenizer, or None (with a note) when TARPO_MODELS is unset.
    fn tokenizer() -> Option<Tokenizer> {
        let Ok(dir) = std::env::var("TARPO_MODELS") else {
            eprintln!("skipped: TARPO_MODELS is unset (no tokenizer)");
            return None;
        };
        let dir = Path::new(&dir).join("SmolLM2-135M-Instruct");
        Some(Tokenizer::load(&dir).expect("SmolLM2 tokenizer"))
    }

    /// A fresh scratch directory for one test.
    pub(crate) fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("tarpo-analysis-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn ints(df: &DataFrame, name: &str) -> Vec<i64> {
        column_f64(df, name)
            .unwrap()
            .into_iter()
            .map(|v| v.unwrap() as i64)
            .collect()
    }

    fn strings(df: &DataFrame, name: &str) -> Vec<String> {
        column_strings(df, name)
            .unwrap()
            .into_iter()
            .map(|v| v.unwrap())
            .collect()
    }

    fn routing(tok: &Tokenizer) -> DataFrame {
        let ids = tok.encode("Hello world!", false).unwrap();
        assert_eq!(ids.len(), 3, "Hello world! as {ids:?}");
        let meta = RecordMeta {
            run: "r1",
            step: 7,
            group: 2,
            rewards: Some(&[1.0, 0.0, 0.5, 0.25]),
            advantages: None,
        };
        routing_frame(&rollout([ids[0], ids[1], ids[2]]), tok, &meta).unwrap()
    }

    #[test]
    fn routing_frame_has_one_row_per_token() {
        let Some(tok) = tokenizer() else { return };
        let df = routing(&tok);
        let names: Vec<&str> = df.get_column_names().iter().map(|c| c.as_str()).collect();
        assert_eq!(names, ROUTING_COLUMNS);
        assert_eq!(df.height(), 8);
        assert_eq!(strings(&df, "run"), vec!["r1"; 8]);
        assert_eq!(ints(&df, "step"), vec![7; 8]);
        assert_eq!(ints(&df, "prompt_id"), [0, 0, 0, 0, 0, 1, 1, 1]);
        assert_eq!(ints(&df, "sample_id"), [0, 0, 0, 1, 1, 0, 1, 1]);
        assert_eq!(ints(&df, "position"), [0, 1, 2, 0, 1, 0, 0, 1]);
        let modes = [
            "soft", "hard", "hard", "soft", "hard", "hard", "soft", "hard",
        ];
        assert_eq!(strings(&df, "mode"), modes);
        let toks = strings(&df, "token");
        assert_eq!(&toks[..3], ["Hello", " world", "!"]);
        assert_eq!(toks[7], "Hello");
        let reward = column_f64(&df, "reward").unwrap();
        let want = [1.0, 1.0, 1.0, 0.0, 0.0, 0.5, 0.25, 0.25];
        assert_eq!(reward, want.map(Some));
        assert_eq!(column_f64(&df, "advantage").unwrap(), vec![None; 8]);
        let forced = column_f64(&df, "forced").unwrap();
        assert_eq!(forced[2], Some(1.0));
        assert_eq!(forced[0], Some(0.0));
    }

    #[test]
    fn sql_groups_routing_rows() {
        let Some(tok) = tokenizer() else { return };
        let df = routing(&tok);
        let q =
            "SELECT mode, avg(p_soft) AS p, count(*) AS n FROM frame GROUP BY mode ORDER BY mode";
        let out = sql(&df, q).unwrap();
        assert_eq!(strings(&out, "mode"), ["hard", "soft"]);
        assert_eq!(ints(&out, "n"), [5, 3]);
        let p = column_f64(&out, "p").unwrap();
        // p_soft is stored as f32 in the records.
        assert!((p[0].unwrap() - (0.2 + 0.1 + 0.4 + 0.3 + 0.0) / 5.0).abs() < 1e-6);
        assert!((p[1].unwrap() - (0.9 + 0.7 + 0.6) / 3.0).abs() < 1e-6);
        let err = sql(&df, "SELECT nope FROM frame").unwrap_err().to_string();
        assert!(err.starts_with("sql: ") && err.contains("nope"), "{err}");
    }

    #[test]
    fn routing_frame_parquet_round_trip() {
        let Some(tok) = tokenizer() else { return };
        let mut df = routing(&tok);
        let dir = scratch("parquet");
        let path = dir.join("runs/r1/routing.parquet");
        write_parquet(&mut df, &path).unwrap();
        let back = read_parquet(&path).unwrap();
        assert!(back.equals_missing(&df), "{back}\n!=\n{df}");
        // Only the file itself is left: the temporary was renamed.
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(left.len(), 1);
        let err = read_parquet(&dir.join("missing.parquet")).unwrap_err();
        assert!(format!("{err:#}").contains("missing.parquet"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn routing_frame_checks_its_meta() {
        let Some(tok) = tokenizer() else { return };
        let ro = rollout([1, 2, 3]);
        let mut meta = RecordMeta {
            run: "r",
            step: 0,
            group: 0,
            rewards: None,
            advantages: None,
        };
        let err = routing_frame(&ro, &tok, &meta).unwrap_err().to_string();
        assert!(err.contains("group must be > 0"), "{err}");
        meta.group = 2;
        meta.advantages = Some(&[0.0; 3]);
        let err = routing_frame(&ro, &tok, &meta).unwrap_err().to_string();
        assert!(err.contains("3 advantages for 4 sequences"), "{err}");
    }

    fn rows(json: &str) -> Vec<Map<String, Value>> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn frame_from_rows_fills_missing_keys_with_null() {
        let df = frame_from_rows(&rows(
            r#"[{"step": 0, "loss": 0.5, "tag": "a"},
                {"step": 1, "tag": "b", "ok": true, "loss": 1}]"#,
        ))
        .unwrap();
        let names: Vec<&str> = df.get_column_names().iter().map(|c| c.as_str()).collect();
        assert_eq!(names, ["loss", "step", "tag", "ok"]);
        assert_eq!(df.column("step").unwrap().dtype(), &DataType::Int64);
        // 0.5 then 1: integers and floats in one column are f64.
        assert_eq!(df.column("loss").unwrap().dtype(), &DataType::Float64);
        assert_eq!(column_f64(&df, "loss").unwrap(), [Some(0.5), Some(1.0)]);
        assert_eq!(column_f64(&df, "ok").unwrap(), [None, Some(1.0)]);
        assert_eq!(
            column_strings(&df, "tag").unwrap(),
            [Some("a".into()), Some("b".into())]
        );
    }

    #[test]
    fn frame_from_rows_refuses_mixed_columns() {
        let err = frame_from_rows(&rows(r#"[{"x": 1}, {"x": null}, {"x": "a"}]"#))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"x\" mixes types: a number at row 0, a string at row 2"),
            "{err}"
        );
        let err = frame_from_rows(&rows(r#"[{"x": [1]}]"#))
            .unwrap_err()
            .to_string();
        assert!(err.contains("column \"x\", row 0: an array"), "{err}");
    }

    #[test]
    fn columns_concat_and_csv() {
        let a = frame_from_rows(&rows(r#"[{"step": 0, "reward": 0.5, "run": "a"}]"#)).unwrap();
        let b = frame_from_rows(&rows(r#"[{"step": 1, "reward": 1.5, "run": "b"}]"#)).unwrap();
        let mut both = concat(&[a.clone(), b]).unwrap();
        assert_eq!(column_f64(&both, "reward").unwrap(), [Some(0.5), Some(1.5)]);
        let err = column_f64(&both, "soft_ratio").unwrap_err().to_string();
        assert!(
            err.contains("\"soft_ratio\"") && err.contains("reward, run, step"),
            "{err}"
        );
        let err = column_f64(&both, "run").unwrap_err().to_string();
        assert!(err.contains("not numeric"), "{err}");
        let other = frame_from_rows(&rows(r#"[{"step": 1.5}]"#)).unwrap();
        let err = concat(&[a, other]).unwrap_err().to_string();
        assert!(err.contains("frame 1 has columns [step: f64]"), "{err}");
        assert!(concat(&[]).is_err());

        let dir = scratch("csv");
        let path = dir.join("m/metrics.csv");
        write_csv(&mut both, &path).unwrap();
        let back = read_csv(&path).unwrap();
        assert!(back.equals_missing(&both), "{back}\n!=\n{both}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
