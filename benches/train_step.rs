//! One full GRPO training step, side by side with TRL's `GRPOTrainer` in one run.
//!
//! SmolLM2-135M-Instruct, CPU f32, LoRA r 32 / alpha 64 (dropout 0) on all seven
//! linear layers; 4 chat-formatted GSM8K questions x a group of 8 = 32
//! completions of exactly 64 new tokens, sampled at T 1.0 (no top-k, no top-p);
//! reward = fraction of digit characters; GRPO loss (sequence mean of token
//! means, group-std-scaled advantages) with a k3 KL to the adapter-off base at
//! beta 0.04; one AdamW step (lr 1e-5) per generation batch. A step is
//! rollout + rewards + reference forward + policy forward + backward + AdamW.
//!
//! The TRL side (benches/trl_grpo_step.py) is one long-lived Python process
//! driven one step at a time over a pipe, so the two sides alternate step by
//! step and see the same machine conditions. Prints per side the median
//! after one warm-up step of: wall seconds per step, the part spent generating,
//! CPU seconds per step (user + system, all threads: less sensitive than wall
//! time to other load on the machine), and the process's peak RSS (VmHWM /
//! ru_maxrss); then the ratio TRL / tarpo. After each step, untimed, each
//! process hands its freed heap back to the OS (malloc_trim) so that the
//! other side's step has the memory.
//!
//! TARPO_BENCH_MODEL=default runs the same step on the embedded default model
//! instead: full fine-tuning on both sides, TARPO (router, lambda 0.1) on
//! ours against TRL's GRPO, the first four held-out arithmetic problems as
//! the prompts (a tiny model shows the per-step overhead).
//!
//! Run: ./dev.sh bench   (or `cargo bench --bench train_step` with the env of ./dev.sh)
//! Env: TARPO_BENCH_THREADS (default 2), TARPO_BENCH_RUNS (default 3),
//!      TARPO_BENCH_MICRO (our replay micro-batch, default 8 as in `tarpo_loss`),
//!      TARPO_BENCH_PEER=0 (tarpo alone, to profile: `perf record` the bench binary).
mod common;
use anyhow::{bail, Context, Result};
use common::{env_or, median};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;
use tarpo::model::lora::LoraConfig;
use tarpo::model::{Message, Model};
use tarpo::policy::{rollout, Rng, Rollout, RolloutOptions, Router, Sampling};
use tarpo::rl::advantage;
use tarpo::rl::loss::{LossConfig, LossMetrics};
use tarpo::rl::optim::{AdamW, AdamWConfig, StepReport};
use tarpo::rl::policy::{param_groups, Policy};
use tarpo::rl::update::{accumulate_gradients, ReplayConfig};
use tch::{Device, Kind};

const GROUP: usize = 8;
const NEW: usize = 64;
const RANK: i64 = 32;
const ALPHA: f64 = 64.0;
const BETA: f64 = 0.04;
const LR: f64 = 1e-5;
const SEED: u64 = 0;
/// The first four questions of the GSM8K training split.
const QUESTIONS: [&str; 4] = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs. Her parents decided to give her $15 for that purpose, and her grandparents twice as much as her parents. How much more money does Betty need to buy the wallet?",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?",
];

/// The reward of both sides: the fraction of non-whitespace characters that are digits.
fn digits(text: &str, _answer: &str) -> f64 {
    let chars: Vec<char> = text.chars().filter(|c| !c.is_whitespace()).collect();
    if chars.is_empty() {
        return 0.0;
    }
    chars.iter().filter(|c| c.is_ascii_digit()).count() as f64 / chars.len() as f64
}

/// Peak resident set size of this process in MB (VmHWM).
fn vm_hwm_mb() -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmHWM in /proc/self/status")?;
    Ok(kb / 1024.0)
}

extern "C" {
    /// glibc: returns the free parts of the heap to the OS.
    fn malloc_trim(pad: usize) -> i32;
    fn sysconf(name: i32) -> i64;
}

/// User + system CPU seconds of this process, all threads (/proc/self/stat).
fn cpu_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the ")" of the command name: state is the 1st, utime the 12th.
    let rest = stat.rsplit_once(')').context("/proc/self/stat")?.1;
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|v| v.parse().unwrap_or(f64::NAN))
        .collect();
    // SAFETY: sysconf only reads a system constant; 2 is _SC_CLK_TCK on Linux.
    let ticks = unsafe { sysconf(2) } as f64;
    Ok((f[0] + f[1]) / ticks)
}

/// One training step as measured on either side.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Wall seconds of the whole step.
    wall: f64,
    /// Wall seconds of its generation (ours: until the first reward call).
    generate: f64,
    /// CPU seconds (user + system, all threads) the process used in the step.
    cpu: f64,
}

/// The TRL process, which runs one training step per "step" line it is sent.
struct Peer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    log: PathBuf,
}

impl Peer {
    fn spawn(args: &[String], log: &Path) -> Result<Peer> {
        let venv = std::env::var("TARPO_VENV").unwrap_or_else(|_| ".venv".into());
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/trl_grpo_step.py");
        let mut child = Command::new(PathBuf::from(venv).join("bin/python"))
            .arg(&script)
            .args(args)
            .env("HF_HUB_OFFLINE", "1")
            .env("TOKENIZERS_PARALLELISM", "false")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .context("starting benches/trl_grpo_step.py")?;
        let stdin = child.stdin.take().context("peer stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("peer stdout")?);
        Ok(Peer {
            child,
            stdin,
            stdout,
            log: log.to_path_buf(),
        })
    }

    /// The next JSON line from the peer; its stderr's tail if it died.
    fn recv(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            let _ = self.child.wait();
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "trl_grpo_step.py exited early ({}):\n{}",
                self.log.display(),
                tail.join("\n")
            );
        }
        serde_json::from_str(&line).with_context(|| format!("peer output {line:?}"))
    }

    /// Runs one TRL training step; returns its report.
    fn step(&mut self) -> Result<Sample> {
        writeln!(self.stdin, "step")?;
        self.stdin.flush()?;
        let v = self.recv()?;
        let (lo, hi) = (v["min_length"].as_f64(), v["max_length"].as_f64());
        if lo != Some(NEW as f64) || hi != Some(NEW as f64) {
            bail!("TRL completions were not all {NEW} tokens: {v}");
        }
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        Ok(Sample {
            wall: f("seconds"),
            generate: f("generate_seconds"),
            cpu: f("cpu_seconds"),
        })
    }
}

/// Our side: the policy, its optimizer and the step's settings.
struct Ours {
    policy: Policy,
    opt: AdamW,
    rollout: RolloutOptions,
    replay: ReplayConfig,
    rng: Rng,
}

impl Ours {
    /// LoRA r RANK on the real backbone; on the tiny default model full
    /// fine-tuning and TARPO's router (`tiny`).
    fn new(dir: &Path, micro_batch: usize, tiny: bool) -> Result<Ours> {
        let mut model = Model::load(dir, Device::Cpu, Kind::Float)?;
        if tiny {
            model.net.set_trainable(&["*".into()])?;
        } else {
            model.net.attach_lora(&LoraConfig {
                seed: SEED,
                ..LoraConfig::new(RANK, ALPHA)
            })?;
        }
        let mut policy = Policy::new(model);
        policy.freeze_reference()?;
        if tiny {
            let h = policy.model.net.cfg.hidden_size;
            let router = Router::new(h, 0.1, 1.0, SEED, Device::Cpu)?;
            policy.router_ref = Some(router.frozen_copy()?);
            policy.router = Some(router);
        }
        // torch's AdamW defaults, as the transformers Trainer runs them.
        let opt = AdamW::new(
            param_groups(&policy, LR, LR, 0.0),
            AdamWConfig {
                betas: (0.9, 0.999),
                eps: 1e-8,
                max_grad_norm: Some(1.0),
                ..AdamWConfig::default()
            },
        )?;
        let sampling = Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        };
        let mut replay = ReplayConfig::new(LossConfig {
            lambda: if tiny { 0.1 } else { 0.0 },
            beta: BETA,
            ..LossConfig::default()
        });
        replay.micro_batch = micro_batch;
        Ok(Ours {
            policy,
            opt,
            // eos = []: exactly NEW tokens per completion.
            rollout: RolloutOptions::new(NEW, sampling, 0, vec![]),
            replay,
            rng: Rng::new(SEED),
        })
    }

    /// One GRPO step over the primitives (what the stdlib loop calls):
    /// rollout, rewards, advantages, replay with the KL reference, backward,
    /// AdamW (one optimizer step per generation batch, TRL num_iterations 1).
    fn step(
        &mut self,
        prompts: &[Vec<i64>],
        reward: &dyn Fn(&str) -> f64,
    ) -> Result<(Rollout, LossMetrics, StepReport)> {
        let expanded: Vec<Vec<i64>> = prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.clone(), GROUP))
            .collect();
        let mut opts = self.rollout.clone();
        opts.seed = self.rng.next_u64();
        let net = &self.policy.model.net;
        let ro = rollout(net, self.policy.router.as_ref(), None, &expanded, &opts)?;
        let tok = &self.policy.model.tok;
        let rewards = ro
            .tokens()
            .iter()
            .map(|t| Ok(reward(&tok.decode(t, true)?)))
            .collect::<Result<Vec<f64>>>()?;
        let adv = advantage::compute(&rewards, GROUP, "grpo")?;
        let loss = accumulate_gradients(&self.policy, &ro, &adv, &self.replay)?;
        let report = self.opt.step()?;
        self.opt.zero_grad()?;
        Ok((ro, loss, report))
    }
}

fn main() -> Result<()> {
    let threads = env_or("TARPO_BENCH_THREADS", 2);
    let runs = env_or("TARPO_BENCH_RUNS", 3).max(1);
    let batch = QUESTIONS.len() * GROUP;
    let micro = env_or("TARPO_BENCH_MICRO", 8).clamp(1, batch);
    // TARPO_BENCH_MODEL=default: the embedded default model (full fine-tuning,
    // TARPO on our side) on the first held-out problems of the shipped task.
    let tiny = std::env::var("TARPO_BENCH_MODEL").is_ok_and(|v| v == "default");
    let (dir, questions) = if tiny {
        let rows = tarpo::rl::dataset::Dataset::load(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/datasets/arith_test.jsonl"
        )))?;
        let qs: Vec<String> = rows.rows.iter().take(4).map(|r| r.prompt.clone()).collect();
        (tarpo::model::default_dir(), qs)
    } else {
        let models = std::env::var("TARPO_MODELS").unwrap_or_else(|_| "models".into());
        let qs = QUESTIONS.iter().map(|q| q.to_string()).collect();
        (PathBuf::from(models).join("SmolLM2-135M-Instruct"), qs)
    };
    if !dir.join("model.safetensors").exists() {
        bail!("{} missing: run ./dev.sh setup", dir.display());
    }
    tch::set_num_threads(threads as i32);
    let mut ours = Ours::new(&dir, micro, tiny)?;
    let tok = &ours.policy.model.tok;
    let prompts: Vec<Vec<i64>> = questions
        .iter()
        .map(|q| {
            if tok.has_chat_template() {
                tok.encode(
                    &tok.apply_chat_template(&[Message::new("user", q)], true)?,
                    false,
                )
            } else {
                tok.encode(q, true)
            }
        })
        .collect::<Result<_>>()?;

    let mut our_step = || -> Result<Sample> {
        // The first reward call marks the end of the rollout.
        let rollout_end = std::cell::Cell::new(None);
        let reward = |text: &str| {
            if rollout_end.get().is_none() {
                rollout_end.set(Some(Instant::now()));
            }
            digits(text, "")
        };
        let cpu = cpu_seconds()?;
        let start = Instant::now();
        let (ro, loss, report) = ours.step(&prompts, &reward)?;
        let wall = start.elapsed().as_secs_f64();
        let cpu = cpu_seconds()? - cpu;
        // Untimed: hand the freed heap back to the OS so TRL's step has the
        // memory (the peer does the same after each of its steps).
        // SAFETY: glibc's malloc_trim only releases free heap memory.
        unsafe { malloc_trim(0) };
        if ro.lengths().iter().any(|&n| n != NEW) || !loss.loss.is_finite() || report.skipped {
            bail!("tarpo step went wrong: {loss:?} {report:?}");
        }
        let generate = rollout_end
            .get()
            .map_or(f64::NAN, |t| t.duration_since(start).as_secs_f64());
        Ok(Sample {
            wall,
            generate,
            cpu,
        })
    };
    let show = |s: &Sample| {
        format!(
            "{:.1} s (generate {:.1} s, cpu {:.0} s)",
            s.wall, s.generate, s.cpu
        )
    };

    if std::env::var("TARPO_BENCH_PEER").as_deref() == Ok("0") {
        // tarpo alone, for a profiler: no peer, no ratio.
        for r in 0..=runs {
            eprintln!("step {r}: tarpo {}", show(&our_step()?));
        }
        return Ok(());
    }
    let mut trl = spawn_trl(&dir, &questions, threads, runs, tiny, &prompts)?;
    // Warm-up, then alternate which side goes first so both see the same conditions.
    let w = trl.step()?;
    let wo = our_step()?;
    eprintln!("warm-up: tarpo {}, TRL {}", show(&wo), show(&w));
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for r in 0..runs {
        if r % 2 == 0 {
            b.push(trl.step()?);
            a.push(our_step()?);
        } else {
            a.push(our_step()?);
            b.push(trl.step()?);
        }
        eprintln!("run {}: tarpo {}, TRL {}", r + 1, show(&a[r]), show(&b[r]));
    }
    let done = trl.recv()?;
    trl.child.wait()?;
    let our_peak = vm_hwm_mb()?;
    let trl_peak = done["peak_rss_mb"].as_f64().unwrap_or(f64::NAN);

    let col = |v: &[Sample], f: fn(&Sample) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    let walls = |v: &[Sample]| {
        v.iter()
            .map(|s| (s.wall * 10.0).round() / 10.0)
            .collect::<Vec<_>>()
    };
    let setup = if tiny {
        "the default model (full fine-tuning; TARPO with its router on our side, GRPO on TRL's)"
            .to_string()
    } else {
        format!("SmolLM2-135M, LoRA r{RANK} all linear, GRPO")
    };
    println!(
        "train step: {setup}, f32 CPU, beta {BETA}, {} prompts x {GROUP} x {NEW} tokens, {threads} threads, median of {runs} (after 1 warm-up)",
        questions.len()
    );
    println!("            s/step  generate  cpu s/step  peak RSS MB  runs (s)");
    for (name, v, peak) in [("tarpo", &a, our_peak), ("TRL 1.16", &b, trl_peak)] {
        println!(
            "  {name:<8} {:7.1}  {:8.1}  {:10.0}  {peak:11.0}  {:?}",
            col(v, |s| s.wall),
            col(v, |s| s.generate),
            col(v, |s| s.cpu),
            walls(v)
        );
    }
    println!(
        "  ratio     {:6.2}x  (TRL time / tarpo time; CPU time {:.2}x)",
        col(&b, |s| s.wall) / col(&a, |s| s.wall),
        col(&b, |s| s.cpu) / col(&a, |s| s.cpu)
    );
    println!(
        "  tarpo: replay micro-batch {micro}; TRL peak RSS includes the Python interpreter and the torch/transformers/trl imports"
    );
    Ok(())
}

/// Starts the TRL side and checks it tokenises the prompts as we do.
fn spawn_trl(
    dir: &Path,
    questions: &[String],
    threads: usize,
    runs: usize,
    tiny: bool,
    prompts: &[Vec<i64>],
) -> Result<Peer> {
    let tmp = std::env::temp_dir();
    let questions_json = tmp.join("tarpo-bench-train-questions.json");
    std::fs::write(&questions_json, serde_json::to_string(&questions)?)?;
    let mut args = vec![
        dir.display().to_string(),
        questions_json.display().to_string(),
    ];
    args.extend(
        [threads, runs + 1, SEED as usize, NEW, GROUP]
            .iter()
            .map(|v| v.to_string()),
    );
    let rank = if tiny { 0.0 } else { RANK as f64 };
    args.extend([BETA, LR, rank, ALPHA].iter().map(|v| v.to_string()));
    let mut trl = Peer::spawn(&args, &tmp.join("tarpo-bench-trl.log"))?;
    let ready = trl.recv()?;
    let trl_ids: Vec<Vec<i64>> = serde_json::from_value(ready["prompt_ids"].clone())?;
    if trl_ids != prompts {
        bail!("the two chat templates give different prompt ids:\n tarpo {prompts:?}\n TRL   {trl_ids:?}");
    }
    eprintln!(
        "TRL ready ({} trainable parameters, {} threads; its default beta is {}, set to {BETA})",
        ready["trainable"], ready["threads"], ready["beta_default"]
    );
    Ok(trl)
}
