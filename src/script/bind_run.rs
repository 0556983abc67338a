//! Runs, frames and charts in scripts: `new_run`/`load_run` (metrics rows and
//! token records under `runs/NAME/`), `routing_frame` and the Frame type
//! (a polars DataFrame), `plot_*`, plus `pass_at_k` and `check_options`.
use super::run_checkpoint::{resume, save_checkpoint};
use super::types::*;
use crate::analysis::{frame, samples, tensorboard};
use crate::model::text::one_line;
use anyhow::{bail, Context, Result};
use polars::prelude::DataFrame;
use rhai::{Array, Dynamic, Engine, EvalAltResult, Map};
use serde_json::Value;
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

type Res<T> = Result<T, Box<EvalAltResult>>;

#[derive(Clone)]
pub struct RunHandle(pub Rc<RefCell<RunState>>);

pub struct RunState {
    pub dir: PathBuf,
    pub rows: Vec<serde_json::Map<String, Value>>,
    last: Instant,
    /// `quiet: true` in the run's config: `log` writes rows without printing them.
    quiet: bool,
    /// This handle's TensorBoard events file, opened by the first `log`.
    pub(super) events: Option<tensorboard::EventWriter>,
    /// Whether this process writes the run's files (rank 0 of a job); the
    /// other ranks keep the rows in memory only.
    pub(super) writer: bool,
}

#[derive(Clone)]
pub struct FrameHandle(pub Rc<DataFrame>);

pub fn register(engine: &mut Engine) {
    engine
        .register_type_with_name::<RunHandle>("Run")
        .register_type_with_name::<FrameHandle>("Frame");
    engine.register_fn("new_run", |d: &str| rt(new_run(d, Map::new())));
    engine.register_fn("new_run", |d: &str, c: Map| rt(new_run(d, c)));
    engine.register_fn("load_run", |d: &str| rt(load_run(d)));
    engine.register_fn("open_run", |d: &str, c: Map| {
        rt(if Path::new(d).join("metrics.jsonl").exists() {
            load_run(d).inspect(|r| r.0.borrow_mut().quiet = is_quiet(&c))
        } else {
            new_run(d, c)
        })
    });
    engine.register_fn("log", |r: &mut RunHandle, m: Map| rt(log(r, m)));
    engine.register_fn(
        "log_tokens",
        |r: &mut RunHandle, ro: RolloutHandle, rw: Array, adv: Array| {
            rt(log_tokens(r, &ro, Some(rw), Some(adv)))
        },
    );
    engine.register_fn("log_tokens", |r: &mut RunHandle, ro: RolloutHandle| {
        rt(log_tokens(r, &ro, None, None))
    });
    engine.register_fn("metrics", |r: &mut RunHandle| rt(metrics_frame(r)));
    engine.register_fn("tokens", |r: &mut RunHandle| rt(step_frames(r, "tokens")));
    engine.register_fn("samples", |r: &mut RunHandle| rt(step_frames(r, "samples")));
    engine.register_get("dir", |r: &mut RunHandle| {
        r.0.borrow().dir.display().to_string()
    });
    engine.register_get("step", |r: &mut RunHandle| r.0.borrow().rows.len() as i64);
    engine.register_fn("to_string", |r: &mut RunHandle| {
        let st = r.0.borrow();
        format!("Run({}, {} steps)", st.dir.display(), st.rows.len())
    });

    engine.register_fn("step_summary", |m: Map| -> Res<String> {
        Ok(summary(&rt(map_to_json(&m, "metrics"))?))
    });
    engine.register_fn(
        "save_checkpoint",
        |r: RunHandle, m: Backbone, o: OptimizerHandle| rt(save_checkpoint(&r, &m, &o, None)),
    );
    engine.register_fn(
        "save_checkpoint",
        |r: RunHandle, m: Backbone, o: OptimizerHandle, d: DatasetHandle| {
            rt(save_checkpoint(&r, &m, &o, Some(&d)))
        },
    );
    engine.register_fn("resume", |r: RunHandle, m: Backbone, o: OptimizerHandle| {
        rt(resume(&r, &m, &o, None))
    });
    engine.register_fn(
        "resume",
        |r: RunHandle, m: Backbone, o: OptimizerHandle, d: DatasetHandle| {
            rt(resume(&r, &m, &o, Some(&d)))
        },
    );
    engine.register_fn("pass_at_k", |n: i64, c: i64, k: i64| rt(pass_at_k(n, c, k)));
    engine.register_fn("check_options", |name: &str, o: Map, d: Map| {
        rt(check_options(name, o, d))
    });
}

/// A fresh run directory; an existing one with metrics gets a numbered
/// sibling instead of being overwritten (nothing is lost).
fn new_run(dir: &str, config: Map) -> Result<RunHandle> {
    let w = crate::dist::world();
    let mut run = if w.is_main() {
        create_run(dir, &config)?
    } else {
        RunState::new(PathBuf::new(), Vec::new(), false)
    };
    run.quiet = is_quiet(&config);
    if w.launched() {
        // Every rank names the directory rank 0 made (it may be numbered).
        let name = run.dir.display().to_string();
        let all = w.all_gather_bytes("new_run", name.as_bytes())?;
        run.dir = PathBuf::from(String::from_utf8_lossy(&all[0]).into_owned());
    }
    Ok(RunHandle(Rc::new(RefCell::new(run))))
}

impl RunState {
    /// The step of the last metrics row (0 before the first).
    pub(super) fn last_step(&self) -> u64 {
        self.rows.last().map_or(0, |r| {
            r.get("step")
                .and_then(Value::as_u64)
                .unwrap_or(self.rows.len() as u64)
        })
    }

    fn new(dir: PathBuf, rows: Vec<serde_json::Map<String, Value>>, writer: bool) -> RunState {
        RunState {
            dir,
            rows,
            last: Instant::now(),
            quiet: false,
            events: None,
            writer,
        }
    }
}

fn create_run(dir: &str, config: &Map) -> Result<RunState> {
    let mut path = PathBuf::from(dir);
    let mut n = 2;
    while path.join("metrics.jsonl").exists() {
        path = PathBuf::from(format!("{dir}-{n}"));
        n += 1;
    }
    if path.as_path() != Path::new(dir) {
        eprintln!(
            "note: {dir} already holds a run; writing to {}",
            path.display()
        );
    }
    std::fs::create_dir_all(&path).with_context(|| format!("{}: cannot create", path.display()))?;
    let cfg = Value::Object(map_to_json(config, "config")?);
    std::fs::write(
        path.join("config.json"),
        serde_json::to_string_pretty(&cfg)?,
    )
    .with_context(|| format!("{}: cannot write config.json", path.display()))?;
    Ok(RunState::new(path, Vec::new(), true))
}

fn is_quiet(config: &Map) -> bool {
    config
        .get("quiet")
        .and_then(|v| v.as_bool().ok())
        .unwrap_or(false)
}

pub(super) fn load_run(dir: &str) -> Result<RunHandle> {
    let path = PathBuf::from(dir);
    let file = path.join("metrics.jsonl");
    let text = std::fs::read_to_string(&file).with_context(|| {
        format!(
            "{}: cannot read (is {dir} a run directory?)",
            file.display()
        )
    })?;
    let rows = parse_rows(&file, &text)?;
    let writer = crate::dist::world().is_main();
    Ok(RunHandle(Rc::new(RefCell::new(RunState::new(
        path, rows, writer,
    )))))
}

/// The rows of metrics.jsonl. A last line without its newline that is not
/// JSON was cut by a crash mid-append: it is dropped with a note (resume
/// rewrites the file without it); any other bad line is an error.
fn parse_rows(file: &Path, text: &str) -> Result<Vec<serde_json::Map<String, Value>>> {
    let lines: Vec<&str> = text.split('\n').collect();
    let mut rows = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(m)) => rows.push(m),
            _ if i + 1 == lines.len() => eprintln!(
                "note: {}:{}: dropped a half-written last line (a crash during its append)",
                file.display(),
                i + 1
            ),
            _ => bail!("{}:{}: not a JSON object", file.display(), i + 1),
        }
    }
    Ok(rows)
}

/// Appends a metrics row (metrics.jsonl, the handle's TensorBoard events
/// file, and metrics.parquet rewritten) and prints the step's one-line summary.
fn log(r: &RunHandle, m: Map) -> Result<()> {
    let mut st = r.0.borrow_mut();
    let mut row = map_to_json(&m, "metrics")?;
    let step = st.rows.len() as i64 + 1;
    row.entry("step").or_insert(Value::from(step));
    let secs = st.last.elapsed().as_secs_f64();
    row.entry("time_s").or_insert(Value::from(secs));
    st.last = Instant::now();
    if !st.writer {
        st.rows.push(row);
        return Ok(());
    }
    let line = serde_json::to_string(&row)?;
    crate::fsio::append_line(&st.dir.join("metrics.jsonl"), &line)?;
    if st.events.is_none() {
        st.events = Some(tensorboard::EventWriter::create(&st.dir)?);
    }
    if let Some(w) = &mut st.events {
        let tb_step = row.get("step").and_then(Value::as_i64).unwrap_or(step);
        w.scalars(tb_step, &scalars(&row, &m))?;
    }
    if !st.quiet {
        println!("{}", summary(&row));
    }
    st.rows.push(row);
    let mut df = frame::frame_from_rows(&st.rows)?;
    frame::write_parquet(&mut df, &st.dir.join("metrics.parquet"))
}

/// A row's numeric values but `step` (the event's step) for TensorBoard,
/// read from the script's map where it has them: JSON made NaN and
/// infinities null.
fn scalars(row: &serde_json::Map<String, Value>, m: &Map) -> Vec<(String, f64)> {
    row.iter()
        .filter(|(k, _)| k.as_str() != "step")
        .filter_map(|(k, v)| {
            let raw = m.get(k.as_str()).and_then(|d| d.as_float().ok());
            raw.or_else(|| v.as_f64()).map(|x| (k.clone(), x))
        })
        .collect()
}

/// `step 3  reward 0.500±0.200  soft 0.012  kl 1.2e-4  loss -0.0130  grad 0.081  lr 5.0e-6  12.3s`
fn summary(row: &serde_json::Map<String, Value>) -> String {
    let f = |k: &str| row.get(k).and_then(Value::as_f64);
    let mut s = format!(
        "step {}",
        row.get("step").map(|v| v.to_string()).unwrap_or_default()
    );
    if let Some(r) = f("reward") {
        s += &format!("  reward {r:.3}");
        if let Some(sd) = f("reward_std") {
            s += &format!("±{sd:.3}");
        }
    }
    for (k, label, prec) in [
        ("soft_ratio", "soft", 3),
        ("zero_adv_frac", "zero-adv", 2),
        ("completion_length", "len", 1),
        ("loss", "loss", 4),
    ] {
        if let Some(v) = f(k) {
            s += &format!("  {label} {v:.prec$}");
        }
    }
    for (k, label) in [("kl_token", "kl"), ("grad_norm", "grad"), ("lr", "lr")] {
        if let Some(v) = f(k) {
            s += &format!("  {label} {v:.2e}");
        }
    }
    if row.get("skipped").and_then(Value::as_bool) == Some(true) {
        let what = row.get("nonfinite").and_then(Value::as_str);
        s += &format!("  SKIPPED (non-finite {})", what.unwrap_or("gradients"));
    }
    if let Some(t) = f("time_s") {
        s += &format!("  {t:.1}s");
    }
    s
}

fn log_tokens(
    r: &RunHandle,
    ro: &RolloutHandle,
    rw: Option<Array>,
    adv: Option<Array>,
) -> Result<()> {
    let st = r.0.borrow();
    if !st.writer {
        return Ok(());
    }
    let step = st.last_step() as i64;
    let name = st
        .dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let file = format!("step-{step:06}.parquet");
    let mut df = routing_df(ro, rw.clone(), adv.clone(), &name, step)?;
    frame::write_parquet(&mut df, &st.dir.join("tokens").join(&file))?;
    let mut samples = samples_df(ro, rw, adv, &name, step)?;
    frame::write_parquet(&mut samples, &st.dir.join("samples").join(&file))
}

/// A rollout's rewards and advantages as scripts pass them (one per sequence).
struct Scores {
    rewards: Option<Vec<f64>>,
    advantages: Option<Vec<f64>>,
}

impl Scores {
    fn parse(rw: Option<Array>, adv: Option<Array>) -> Result<Scores> {
        Ok(Scores {
            rewards: rw.map(|a| floats(&a, "rewards")).transpose()?,
            advantages: adv.map(|a| floats(&a, "advantages")).transpose()?,
        })
    }

    fn meta<'a>(&'a self, run: &'a str, step: i64, group: usize) -> frame::RecordMeta<'a> {
        frame::RecordMeta {
            run,
            step,
            group,
            rewards: self.rewards.as_deref(),
            advantages: self.advantages.as_deref(),
        }
    }
}

/// One row per completion: prompt, reference answer, text (analysis/samples.rs).
pub(super) fn samples_df(
    ro: &RolloutHandle,
    rw: Option<Array>,
    adv: Option<Array>,
    run: &str,
    step: i64,
) -> Result<DataFrame> {
    let scores = Scores::parse(rw, adv)?;
    let d = &ro.0;
    let meta = scores.meta(run, step, d.group);
    let prompts: Vec<String> = d.items.iter().map(|p| p.prompt.clone()).collect();
    let answers: Vec<String> = d.items.iter().map(|p| p.answer.clone()).collect();
    samples::samples_frame(&d.ro, &prompts, &answers, &d.texts, &meta)
}

pub(super) fn metrics_frame(r: &RunHandle) -> Result<FrameHandle> {
    let st = r.0.borrow();
    if st.rows.is_empty() {
        bail!("{}: no metrics logged yet", st.dir.display());
    }
    Ok(FrameHandle(Rc::new(frame::frame_from_rows(&st.rows)?)))
}

/// Every step's records of `kind` ("tokens" or "samples") stacked in step order.
fn step_frames(r: &RunHandle, kind: &str) -> Result<FrameHandle> {
    let dir = r.0.borrow().dir.join(kind);
    Ok(FrameHandle(Rc::new(read_step_frames(&dir)?)))
}

/// The parquet files of a run's `tokens/` or `samples/` directory, stacked.
pub(super) fn read_step_frames(dir: &Path) -> Result<DataFrame> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: no records (run.log_tokens writes them)", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "parquet") && !crate::fsio::is_temp(p))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: holds no step records (.parquet)", dir.display());
    }
    let frames = files
        .iter()
        .map(|p| frame::read_parquet(p))
        .collect::<Result<Vec<_>>>()?;
    frame::concat(&frames).with_context(|| format!("{}", dir.display()))
}

pub(super) fn routing_df(
    ro: &RolloutHandle,
    rw: Option<Array>,
    adv: Option<Array>,
    run: &str,
    step: i64,
) -> Result<DataFrame> {
    let scores = Scores::parse(rw, adv)?;
    let d = &ro.0;
    let st = d.backbone.0.borrow();
    let meta = scores.meta(run, step, d.group);
    frame::routing_frame(&d.ro, &st.policy.model.tok, &meta)
}

/// Unbiased Pass@k (Chen et al. 2021): 1 - C(n - c, k) / C(n, k).
pub fn pass_at_k(n: i64, c: i64, k: i64) -> Result<f64> {
    if n < 1 || c < 0 || c > n || k < 1 || k > n {
        bail!(
            "pass_at_k(n, c, k) needs 0 <= c <= n and 1 <= k <= n, got n = {n}, c = {c}, k = {k}"
        );
    }
    if n - c < k {
        return Ok(1.0);
    }
    let miss: f64 = ((n - c + 1)..=n)
        .map(|i| 1.0 - k as f64 / i as f64)
        .product();
    Ok(1.0 - miss)
}

/// `defaults` overlaid by `opts`; unknown keys and type changes are errors
/// (keys and values shown on one line, shortened).
fn check_options(name: &str, opts: Map, defaults: Map) -> Result<Map> {
    let mut out = defaults.clone();
    for (k, v) in opts {
        let Some(d) = defaults.get(&k) else {
            let mut valid: Vec<&str> = defaults.keys().map(|k| k.as_str()).collect();
            valid.sort_unstable();
            let hint = super::opts::closest(&k, &valid)
                .map(|c| format!(" (did you mean `{c}`?)"))
                .unwrap_or_default();
            bail!(
                "{}: unknown option `{}`{hint}; valid options: {}",
                one_line(name),
                one_line(&k),
                one_line(&valid.join(", "))
            );
        };
        // A reward may be a name or a function.
        let ok = d.is_unit()
            || v.is_unit()
            || (d.is_string() && v.is::<rhai::FnPtr>())
            || d.type_name() == v.type_name()
            || (d.is_float() && v.is_int());
        if !ok {
            bail!(
                "{}: option `{}` must be {} (like its default {}), got {} ({})",
                one_line(name),
                one_line(&k),
                d.type_name(),
                one_line(&d.to_string()),
                v.type_name(),
                one_line(&v.to_string())
            );
        }
        let v = if d.is_float() && v.is_int() {
            Dynamic::from_float(v.as_int().unwrap_or_default() as f64)
        } else {
            v
        };
        out.insert(k, v);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_at_k_matches_the_closed_form() {
        // n = 5, c = 2, k = 2: 1 - C(3,2)/C(5,2) = 1 - 3/10.
        assert!((pass_at_k(5, 2, 2).unwrap() - 0.7).abs() < 1e-12);
        assert_eq!(pass_at_k(5, 0, 3).unwrap(), 0.0);
        assert_eq!(pass_at_k(5, 4, 2).unwrap(), 1.0);
        assert!((pass_at_k(10, 3, 1).unwrap() - 0.3).abs() < 1e-12);
        // 1 - C(5,4)/C(8,4) = 1 - 5/70; 1 - C(2,2)/C(4,2) = 5/6; 1 - C(15,8)/C(16,8) = 1/2.
        assert!((pass_at_k(8, 3, 4).unwrap() - 13.0 / 14.0).abs() < 1e-12);
        assert!((pass_at_k(4, 2, 2).unwrap() - 5.0 / 6.0).abs() < 1e-12);
        assert!((pass_at_k(16, 1, 8).unwrap() - 0.5).abs() < 1e-12);
        assert_eq!(pass_at_k(4, 4, 4).unwrap(), 1.0);
        assert!(pass_at_k(3, 4, 1).is_err());
    }
}
