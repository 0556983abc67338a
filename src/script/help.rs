//! The primitives scripts call: one table of signature, help line and
//! options (with defaults), read by `help()`, by completion, and by every
//! binding that checks an option map. Defaults are the reference
//! hyperparameters of ALGORITHMS.md section 2.
pub use super::help_analysis::*;
use super::opts::{opt, Def, Opt, Ty};

pub struct Prim {
    pub name: &'static str,
    pub sig: &'static str,
    pub doc: &'static str,
    pub opts: &'static [Opt],
}

pub const LOAD_BACKBONE: &[Opt] = &[
    opt("device", Def::Str("cpu"), "\"cpu\", \"cuda\" or \"cuda:N\""),
    opt("dtype", Def::Str("f32"), "\"f32\", \"bf16\" or \"f16\""),
    opt(
        "lora",
        Def::Unset(Ty::Map),
        "attach LoRA: #{rank, alpha, targets, seed}",
    ),
    opt(
        "adapter",
        Def::Unset(Ty::Str),
        "warm start from a saved PEFT adapter (also the KL reference)",
    ),
    opt(
        "train",
        Def::Unset(Ty::Any),
        "base weights that train: \"all\" (default without lora), \"none\", or name patterns [\"layers.*\", \"norm\"]",
    ),
    opt(
        "seed",
        Def::Int(42),
        "seed of the rollout seeds drawn by rollout_group",
    ),
];

pub const LORA: &[Opt] = &[
    opt("rank", Def::Int(32), "r"),
    opt(
        "alpha",
        Def::Float(64.0),
        "lora_alpha (the update is scaled by alpha / r)",
    ),
    opt(
        "targets",
        Def::Unset(Ty::Array),
        "module names (default all seven: q,k,v,o,gate,up,down)",
    ),
    opt("seed", Def::Int(0), "seed of A's initialisation"),
];

pub const ATTACH_ROUTER: &[Opt] = &[
    opt(
        "init_soft",
        Def::Float(0.01),
        "initial soft probability (bias derived from it)",
    ),
    opt("temperature", Def::Float(1.0), "action temperature T_act"),
    opt("seed", Def::Int(42), "seed of W ~ N(0, 1e-3^2)"),
];

pub const ATTACH_HRPO_GATE: &[Opt] = &[opt("seed", Def::Int(42), "seed of the gate's init")];

pub const ATTACH_VALUE_HEAD: &[Opt] = &[
    opt("width", Def::Int(512), "hidden width of the MLP"),
    opt("seed", Def::Int(42), "seed of its init"),
];

pub const ATTACH_LOOP_WEIGHTS: &[Opt] = &[
    opt(
        "init",
        Def::Str("uniform"),
        "starting logits: \"uniform\" (zeros) or \"progressive\" (log t^alpha / sum)",
    ),
    opt("alpha", Def::Float(1.0), "progressive start's exponent"),
];

pub const LOAD_DATASET: &[Opt] = &[opt("seed", Def::Int(42), "seed of ds.sample's order")];

pub const ROLLOUT_GROUP: &[Opt] = &[
    opt("group", Def::Int(8), "completions per prompt"),
    opt("max_new", Def::Int(1024), "new tokens per completion at most"),
    opt("temperature", Def::Float(0.5), "sampling temperature (0: greedy)"),
    opt("top_k", Def::Int(50), "sampling top-k (0: off)"),
    opt("top_p", Def::Float(1.0), "sampling top-p"),
    opt("soft", Def::Str("auto"), "\"auto\" (router if attached), \"topk\", \"none\", \"full\" (Soft Thinking), \"hidden\" (Coconut), \"hrpo\""),
    opt("topk", Def::Int(10), "size of the soft top-k mixture"),
    opt("answer_marker", Def::Str("####"), "steps after this text are hard (\"\": none)"),
    opt("cold_stop", Def::Unset(Ty::Float), "Soft Thinking: entropy threshold of the cold stop"),
    opt("patience", Def::Int(2), "Soft Thinking: low-entropy steps before the cold stop"),
    opt("latent_steps", Def::Unset(Ty::Int), "Coconut: continuous thoughts before the text (no tokens)"),
    opt("max_prompt", Def::Int(1024), "prompts keep their last max_prompt tokens (left-truncation)"),
    opt("chat", Def::Unset(Ty::Bool), "chat template around prompts (default: when the tokenizer has one)"),
    opt("system", Def::Unset(Ty::Str), "system message (with chat)"),
    opt("seed", Def::Unset(Ty::Int), "rollout seed (default: drawn from the backbone's seed)"),
    opt("from", Def::Str("policy"), "\"policy\", or \"reference\": the frozen reference samples (token-only; AAPO's paired completions)"),
];

pub const COMPUTE_ADVANTAGES: &[Opt] = &[
    opt("estimator", Def::Str("grpo"), "grpo, drgrpo, rloo or aapo"),
    opt("group", Def::Required(Ty::Int), "completions per prompt"),
    opt(
        "ref_rewards",
        Def::Unset(Ty::Array),
        "aapo: the reference's rewards on the same prompts, paired by index",
    ),
    opt(
        "scale_rewards",
        Def::Unset(Ty::Bool),
        "aapo: divide by the group's std (default true)",
    ),
];

pub const OPTIMIZER: &[Opt] = &[
    opt(
        "lr",
        Def::Float(5e-6),
        "backbone (LoRA or full) learning rate",
    ),
    opt(
        "router_lr",
        Def::Float(1e-4),
        "router / HRPO gate learning rate",
    ),
    opt(
        "weight_decay",
        Def::Float(0.1),
        "decoupled weight decay (not on norms, biases, the router bias or the HRPO gate)",
    ),
    opt(
        "clip",
        Def::Float(0.1),
        "global gradient-norm clip (0: off)",
    ),
    opt(
        "warmup",
        Def::Float(0.1),
        "warm-up as a fraction of `steps`",
    ),
    opt(
        "schedule",
        Def::Str("cosine"),
        "\"cosine\", \"linear\" or \"constant\"",
    ),
    opt(
        "steps",
        Def::Unset(Ty::Int),
        "total optimizer steps (needed by cosine/linear)",
    ),
    opt(
        "min_lr_ratio",
        Def::Float(0.0),
        "final learning-rate factor of the decay",
    ),
    opt("beta1", Def::Float(0.9), "Adam beta1"),
    opt("beta2", Def::Float(0.99), "Adam beta2"),
    opt("eps", Def::Float(1e-8), "Adam epsilon"),
    opt(
        "max_skips",
        Def::Int(3),
        "non-finite steps (loss or gradients) in a row before opt.step fails (0: never)",
    ),
];

pub const TARPO_LOSS: &[Opt] = &[
    opt(
        "lambda",
        Def::Float(0.1),
        "weight of the router term (0: token-only, GRPO)",
    ),
    opt(
        "beta",
        Def::Float(0.005),
        "weight of the KL terms (0: no reference)",
    ),
    opt("kl", Def::Str("k3"), "KL estimator: k1, k2 or k3"),
    opt(
        "norm",
        Def::Str("seq-mean-token-mean"),
        "seq-mean-token-mean, token-mean (DAPO), seq-mean-token-sum-norm (Dr. GRPO)",
    ),
    opt(
        "max_len",
        Def::Unset(Ty::Int),
        "Dr. GRPO's constant normaliser (default: the rollout's max_new)",
    ),
    opt(
        "clip_low",
        Def::Unset(Ty::Float),
        "PPO clip eps_low (unset: plain REINFORCE)",
    ),
    opt(
        "clip_high",
        Def::Unset(Ty::Float),
        "PPO clip eps_high (default: clip_low)",
    ),
    opt(
        "micro_batch",
        Def::Int(8),
        "completions per replay forward (bounds memory)",
    ),
    opt(
        "loops",
        Def::Str("final"),
        "looped models: \"final\" (the last loop, GRPO's) or RLTT's weighting of every loop: uniform, progressive, exit_pdf, learned",
    ),
    opt("alpha", Def::Float(1.0), "progressive loop weights t^alpha"),
    opt(
        "ref_inputs",
        Def::Str("same"),
        "\"same\" inputs as the policy, or \"hard\" (the paper's code)",
    ),
    opt(
        "score_temperature",
        Def::Unset(Ty::Float),
        "score at this temperature (default: the sampling one)",
    ),
];

/// The options that say how a row's prompt and completion are tokenised.
macro_rules! pair_opts {
    ($field:expr) => {
        [
            opt(
                "field",
                Def::Str($field),
                "the row's completion text (after its prompt)",
            ),
            opt(
                "prefix",
                Def::Unset(Ty::Str),
                "text between prompt and completion (default: \"\\n\", \"\" with chat)",
            ),
            opt(
                "eos",
                Def::Bool(true),
                "end the completion with the end token (counted in l)",
            ),
            opt(
                "micro_batch",
                Def::Int(8),
                "rows per replay forward (bounds memory)",
            ),
            opt(
                "max_prompt",
                Def::Int(1024),
                "prompts keep their last max_prompt tokens",
            ),
            opt(
                "chat",
                Def::Unset(Ty::Bool),
                "chat template around prompts (default: when the tokenizer has one)",
            ),
            opt("system", Def::Unset(Ty::Str), "system message (with chat)"),
        ]
    };
}

pub const SEQ_LOGPS: &[Opt] = &{
    let p = pair_opts!("completion");
    [
        p[0],
        p[1],
        p[2],
        p[3],
        p[4],
        p[5],
        p[6],
        opt(
            "from",
            Def::Str("policy"),
            "\"policy\" or \"reference\" (the frozen starting weights)",
        ),
    ]
};

pub const OFFLINE_LOSS: &[Opt] = &{
    let p = pair_opts!("completion");
    [
        p[0],
        p[1],
        p[2],
        p[3],
        p[4],
        p[5],
        p[6],
        opt(
            "method",
            Def::Str("rpo"),
            "\"rpo\" (rows need reward, l_ref, v_hat), \"kto\" or \"dro\" (reward, l_ref; dro: attach_value_head first)",
        ),
        opt("tau", Def::Float(5.0), "RPO's temperature (DRO's reference value: 1)"),
        opt("beta", Def::Float(1.0), "KTO's beta"),
        opt("lambda", Def::Float(1.0), "KTO's lambda_D = lambda_U"),
        opt(
            "threshold",
            Def::Float(0.0),
            "KTO: rewards above it are desirable (the training mean; 0 for z-scores)",
        ),
    ]
};

pub const SFT_LOSS: &[Opt] = &{
    let p = pair_opts!("solution");
    [
        p[0],
        p[1],
        p[2],
        opt(
            "norm",
            Def::Str("token-mean"),
            "token-mean (mean NLL per token) or seq-mean-token-mean",
        ),
        p[3],
        p[4],
        p[5],
        p[6],
    ]
};

pub const SCORE_CODE: &[Opt] = &[
    opt("cpu_seconds", Def::Int(5), "CPU-time limit of the program"),
    opt("wall", Def::Float(10.0), "wall-clock limit, seconds"),
    opt("memory_mb", Def::Int(1024), "address-space limit"),
    opt(
        "output_kb",
        Def::Int(64),
        "captured output per stream; more fails the run",
    ),
];

pub const ARITH: &[Opt] = &[
    opt("min_steps", Def::Int(2), "operations per problem, at least"),
    opt("max_steps", Def::Int(4), "operations per problem, at most"),
    opt(
        "max_operand",
        Def::Int(10),
        "largest starting count and added or removed amount",
    ),
    opt(
        "max_value",
        Def::Int(50),
        "largest value any step may reach",
    ),
    opt(
        "distractors",
        Def::Int(1),
        "irrelevant sentences per problem, at most",
    ),
    opt(
        "slips",
        Def::Float(0.0),
        "probability that a worked step is 1-2 off (noisy demonstrations; the answer stays right)",
    ),
    opt("seed", Def::Int(0), "the same seed gives the same problems"),
];

pub const TRAIN_TOKENIZER: &[Opt] = &[opt(
    "vocab",
    Def::Int(512),
    "tokens, the 256 bytes and <|endoftext|> included",
)];

pub const NEW_MODEL: &[Opt] = &[
    opt(
        "tokenizer",
        Def::Required(Ty::Str),
        "the tokenizer.json to build the model around",
    ),
    opt("hidden", Def::Int(192), "hidden size"),
    opt("layers", Def::Int(4), "decoder blocks"),
    opt("heads", Def::Int(6), "attention heads"),
    opt(
        "kv_heads",
        Def::Int(2),
        "key/value heads (grouped-query attention)",
    ),
    opt("intermediate", Def::Int(512), "MLP width"),
    opt(
        "loops",
        Def::Int(1),
        "passes through the stack (> 1: an Ouro looped model with sandwich norms and an exit gate)",
    ),
    opt("max_positions", Def::Int(1024), "max_position_embeddings"),
    opt("seed", Def::Int(0), "seed of the initial weights"),
];

pub const GENERATE: &[Opt] = &[
    opt("max_new", Def::Int(256), "new tokens at most"),
    opt("temperature", Def::Float(0.0), "0: greedy"),
    opt("top_k", Def::Int(0), "sampling top-k (0: off)"),
    opt("top_p", Def::Float(1.0), "sampling top-p"),
    opt("seed", Def::Int(0), "sampling seed"),
    opt(
        "chat",
        Def::Unset(Ty::Bool),
        "chat template around the prompt (default: when the tokenizer has one)",
    ),
    opt("system", Def::Unset(Ty::Str), "system message (with chat)"),
];

const NONE: &[Opt] = &[];

pub const PRIMITIVES: &[Prim] = &[
    Prim { name: "load_backbone", sig: "load_backbone(path?, opts?) -> Backbone", doc: "Load a Hugging Face model directory (Llama, Qwen2, SmolLM2; default: the embedded default model), optionally with LoRA.", opts: LOAD_BACKBONE },
    Prim { name: "default_model", sig: "default_model() -> path", doc: "The embedded default model's directory (TARPO_DEFAULT_MODEL overrides).", opts: NONE },
    Prim { name: "attach_router", sig: "attach_router(m, opts?) -> Router", doc: "Give the backbone TARPO's router head (hard/soft per token).", opts: ATTACH_ROUTER },
    Prim { name: "looped_model", sig: "looped_model() -> path", doc: "The embedded looped (Ouro) default model's directory (2 layers applied twice).", opts: NONE },
    Prim { name: "attach_loop_weights", sig: "attach_loop_weights(m, opts?)", doc: "RLTT's learned loop weighting on a looped model: T logits trained at 10x lr without decay (tarpo_loss loops: \"learned\").", opts: ATTACH_LOOP_WEIGHTS },
    Prim { name: "attach_hrpo_gate", sig: "attach_hrpo_gate(m, opts?)", doc: "Give the backbone HRPO's trainable gate (rollouts with soft: \"hrpo\").", opts: ATTACH_HRPO_GATE },
    Prim { name: "load_dataset", sig: "load_dataset(path, opts?) -> Dataset", doc: "A JSONL file of {\"prompt\", \"answer\"} rows; ds.sample(n), ds.len(), ds[i].", opts: LOAD_DATASET },
    Prim { name: "to_dataset", sig: "to_dataset(rows, opts?) -> Dataset", doc: "A Dataset of in-memory #{prompt, answer, ...} rows (e.g. from arith_problems).", opts: LOAD_DATASET },
    Prim { name: "rollout_group", sig: "rollout_group(m, prompts, opts?) -> Rollout", doc: "Sample `group` completions per prompt (strings or #{prompt, answer} maps), recording every token.", opts: ROLLOUT_GROUP },
    Prim { name: "reward", sig: "reward(ro, name | fn(text, answer)) -> [float]", doc: "Score each completion with a built-in reward (gsm8k, math, format_gsm8k, format_math) or a Rhai function.", opts: NONE },
    Prim { name: "compute_advantages", sig: "compute_advantages(rewards, opts) -> [float]", doc: "Group-relative advantages of an array of rewards (grpo, drgrpo, rloo; aapo with ref_rewards).", opts: COMPUTE_ADVANTAGES },
    Prim { name: "aapo_revived_frac", sig: "aapo_revived_frac(rewards, ref_rewards, group) -> float", doc: "Fraction of groups where GRPO's advantage is zero but AAPO's is not (equal policy rewards, some margin over the reference).", opts: NONE },
    Prim { name: "zero_adv_frac", sig: "zero_adv_frac(rewards, group) -> float", doc: "Fraction of groups whose rewards are all equal (no learning signal).", opts: NONE },
    Prim { name: "overlong_penalty", sig: "overlong_penalty(ro, max_len, cache) -> [float]", doc: "DAPO's soft overlong punishment per completion (add it to the rewards).", opts: NONE },
    Prim { name: "optimizer", sig: "optimizer(m, opts?) -> Optimizer", doc: "AdamW over the trainable weights (LoRA or the backbone), the router and the HRPO gate, with warm-up and decay; opt.step(loss).", opts: OPTIMIZER },
    Prim { name: "tarpo_loss", sig: "tarpo_loss(m, ro, adv, opts?) -> Loss", doc: "Replay the rollout and add the gradient of TARPO's joint token+router loss (lambda 0: GRPO); several accumulate into one opt.step([l1, l2]).", opts: TARPO_LOSS },
    Prim { name: "seq_logps", sig: "seq_logps(m, rows, opts?) -> [float]", doc: "Mean per-token log-prob (EOS included) of each row's completion after its prompt, under the policy or the frozen reference; no gradient.", opts: SEQ_LOGPS },
    Prim { name: "offline_loss", sig: "offline_loss(m, rows, opts) -> Loss", doc: "RPO's loss 1/2 mean[(l - l_ref) - (r - v_hat)/tau]^2, or KTO's or DRO's, on #{prompt, completion, reward, l_ref, v_hat} rows; a Loss for opt.step.", opts: OFFLINE_LOSS },
    Prim { name: "offline_eval", sig: "offline_eval(m, rows, opts) -> float", doc: "offline_loss's value on rows (held-out), without gradient.", opts: OFFLINE_LOSS },
    Prim { name: "attach_value_head", sig: "attach_value_head(m, opts?)", doc: "DRO's value head V_phi (hidden -> width -> tanh -> 1 on the mean prompt state), trained with the policy.", opts: ATTACH_VALUE_HEAD },
    Prim { name: "rpo_v_hat", sig: "rpo_v_hat(l_ref, rewards, tau) -> float", doc: "RPO's partition value tau * logsumexp(l_ref + r/tau) over one prompt's completions.", opts: NONE },
    Prim { name: "reward_stats", sig: "reward_stats(rewards) -> #{mean, std}", doc: "Mean and population std (1 when all equal) for z-scoring offline rewards.", opts: NONE },
    Prim { name: "load_offline", sig: "load_offline(path) -> [map]", doc: "Offline rows {prompt, completion, reward} from JSONL, each checked (bad rows named by file:line).", opts: NONE },
    Prim { name: "sft_loss", sig: "sft_loss(m, rows, opts?) -> Loss", doc: "Supervised fine-tuning: the NLL of each row's completion after its prompt, a Loss for opt.step like tarpo_loss's.", opts: SFT_LOSS },
    Prim { name: "score_code", sig: "score_code(completion, #{prompt, test, entry_point}, opts?) -> float", doc: "1.0 when prompt + completion passes the row's HumanEval check in the sandbox (own process and directory, CPU/memory/time/output limits, no network, no writes outside, no processes or signals), else 0.0. reward(ro, \"humaneval\") scores a rollout's completions this way, in parallel.", opts: SCORE_CODE },
    Prim { name: "arith_problems", sig: "arith_problems(n, opts?) -> [map]", doc: "Seeded multi-step arithmetic word problems with worked solutions (#{prompt, answer, solution, steps}).", opts: ARITH },
    Prim { name: "write_jsonl", sig: "write_jsonl(rows, path)", doc: "Write an array of maps as JSONL (a data set load_dataset reads).", opts: NONE },
    Prim { name: "train_tokenizer", sig: "train_tokenizer(texts, path, opts?)", doc: "Train a byte-level BPE tokenizer (digits split, <|endoftext|> = 0) and write tokenizer.json.", opts: TRAIN_TOKENIZER },
    Prim { name: "new_model", sig: "new_model(dir, opts) -> params", doc: "Write a Qwen2 model directory with fresh weights (transformers' init) around a tokenizer.", opts: NEW_MODEL },
    Prim { name: "extract_answer", sig: "extract_answer(text, \"gsm8k\" | \"math\") -> string | ()", doc: "The final answer a reward reads (the number after ####, the last \\boxed{} normalised).", opts: NONE },
    Prim { name: "to_frame", sig: "to_frame(rows) -> Frame", doc: "An array of maps as a Frame (columns by key).", opts: NONE },
    Prim { name: "plot_pass_at_k", sig: "plot_pass_at_k(result | #{name: result}, path)", doc: "Pass@k against k from evaluate::evaluate results, one line per method.", opts: NONE },
    Prim { name: "step_metrics", sig: "step_metrics(m, ro, rewards, adv) -> map", doc: "The per-step metrics of ALGORITHMS.md (reward, soft_ratio, entropies, ...).", opts: NONE },
    Prim { name: "new_run", sig: "new_run(dir, config?) -> Run", doc: "A run directory: config.json, run.log(metrics) rows (metrics.parquet; each printed unless config has quiet: true), run.log_tokens(ro, rw, adv).", opts: NONE },
    Prim { name: "load_run", sig: "load_run(dir) -> Run", doc: "Open an existing run directory for analysis.", opts: NONE },
    Prim { name: "open_run", sig: "open_run(dir, config) -> Run", doc: "The run in `dir` to continue (load_run), or a new one there (new_run).", opts: NONE },
    Prim { name: "save_checkpoint", sig: "save_checkpoint(run, m, opt, ds?) -> path", doc: "RUN/checkpoints/step-N (N: optimizer steps taken): adapter, router, HRPO gate, optimizer, seed generator, data cursor, the run's step, and manifest.json (sizes, SHA-256); atomic and synced.", opts: NONE },
    Prim { name: "resume", sig: "resume(run, m, opt, ds?) -> step", doc: "Restore the run's newest intact checkpoint (damaged ones are reported and skipped) and rewind the run's files to it; returns its run step (0 when none). Continuing gives exactly the straight run.", opts: NONE },
    Prim { name: "routing_frame", sig: "routing_frame(ro, rewards?, adv?) -> Frame", doc: "One row per generated token: mode, p_soft, logp, entropy, ... (a polars DataFrame).", opts: NONE },
    Prim { name: "read_parquet", sig: "read_parquet(path) -> Frame", doc: "Load a parquet file as a Frame.", opts: NONE },
    Prim { name: "plot_soft_ratio", sig: "plot_soft_ratio(run | [runs], path)", doc: "Soft ratio and reward over training steps, one line per run (.png or .svg).", opts: NONE },
    Prim { name: "write_html", sig: "write_html(ro, rewards?, path) | write_html(tokens_frame, path, opts?)", doc: "The completions as an HTML page under their prompts and reference answers, soft tokens highlighted, p_soft/log p/entropy per token on hover.", opts: PLOT_TEXT },
    Prim { name: "plot_metric", sig: "plot_metric(run | [runs], column, path)", doc: "Any logged metric over steps, one line per run (completion_length, kl_token, ...).", opts: NONE },
    Prim { name: "plot_histogram", sig: "plot_histogram(values | frame, path, opts?)", doc: "Histogram of an array (e.g. the router's p_soft), or of a frame's column overlaid per value of `by` (frame options: column, by, bins, lo, hi, title, x_label).", opts: PLOT },
    Prim { name: "plot_soft_by_position", sig: "plot_soft_by_position(frame, path, opts?)", doc: "Soft fraction by position bucket, from a routing frame.", opts: PLOT },
    Prim { name: "load_runs", sig: "load_runs(dir | [dirs]) -> Frame", doc: "The per-step metrics of several run directories in one frame, with a `run` column (the directory).", opts: NONE },
    Prim { name: "plot_lines", sig: "plot_lines(frame, path, opts)", doc: "y against x, one line per value of `by`; series of 30+ points draw as faint points under their running mean.", opts: PLOT_LINES },
    Prim { name: "plot_bars", sig: "plot_bars(frame, path, opts)", doc: "Horizontal bars in row order (e.g. tokens by soft rate, with their counts as notes).", opts: PLOT_BARS },
    Prim { name: "plot_text", sig: "plot_text(ro | tokens_frame, path, opts?)", doc: "Completions as a picture (.png or .svg): soft tokens on orange, p_soft as a bar under each token, prompt and reference answer above.", opts: PLOT_TEXT },
    Prim { name: "write_report", sig: "write_report(path, opts)", doc: "An HTML page: configuration, tables, the charts embedded, highlighted completions.", opts: WRITE_REPORT },
    Prim { name: "stream", sig: "m.stream(prompt, opts?) -> Rollout", doc: "One completion printed as it is generated, soft tokens coloured (ANSI; `color: false` marks them [[so]]); rollout_group's options; Ctrl-C stops and keeps what was written.", opts: ROLLOUT_GROUP },
    Prim { name: "counterfactual", sig: "counterfactual(ro, opts?) -> Frame", doc: "Each free routing decision of a router rollout changed in turn (flip, or set hard/soft) and the rest re-sampled from the same seed stream: one row per change with the token, its class, the answer and reward before and after.", opts: COUNTERFACTUAL },
    Prim { name: "pass_at_k", sig: "pass_at_k(n, c, k) -> float", doc: "Unbiased Pass@k from n samples with c correct.", opts: NONE },
    Prim { name: "check_options", sig: "check_options(name, opts, defaults) -> map", doc: "For script methods: `defaults` overlaid by `opts`; an unknown key is an error listing the valid ones.", opts: NONE },
    Prim { name: "world", sig: "world() -> #{rank, size, local_rank}", doc: "This process's place in a data-parallel job (torchrun or tarpo run --nproc N); #{rank: 0, size: 1, local_rank: 0} without a launcher. The stdlib loops split each step's chunks across ranks; opt.step all-reduces the gradients.", opts: NONE },
    Prim { name: "all_reduce", sig: "all_reduce(x, \"sum\" | \"mean\" | \"max\" | \"min\") -> float | [float]", doc: "A number or an array of numbers reduced over the job's ranks (an error outside a launch).", opts: NONE },
    Prim { name: "all_gather", sig: "all_gather(x) -> [x of rank 0, x of rank 1, ...]", doc: "Every rank's value: numbers, strings, arrays, maps, rollouts (they arrive bound to this rank's backbone).", opts: NONE },
    Prim { name: "barrier", sig: "barrier()", doc: "Wait until every rank of the job gets here (bounded by TARPO_DIST_TIMEOUT).", opts: NONE },
    Prim { name: "draw_seed", sig: "draw_seed(m) -> int", doc: "The next rollout seed of m's generator (what rollout_group draws without `seed`); the same on every rank.", opts: NONE },
    Prim { name: "bytes_reduced", sig: "bytes_reduced() -> int", doc: "Bytes this process has sent into all-reduces so far (gradients, loss sums).", opts: NONE },
    Prim { name: "env", sig: "env(name) -> string | ()", doc: "An environment variable, or () when unset.", opts: NONE },
    Prim { name: "help", sig: "help() / help(name)", doc: "List the primitives, or show one with its options and defaults.", opts: NONE },
];

/// Methods and properties of the workbench's types (for completion and help).
pub const METHODS: &[(&str, &str)] = &[
    ("Backbone", "generate(prompt, opts?) stream(prompt, opts?) tokenize(text) decode(ids) save_adapter(dir) export_merged(dir) param_norms() info has_router router"),
    ("Router", "p_soft bias save(path)"),
    ("Dataset", "sample(n) len() get(i) rows(start, n)"),
    ("Rollout", "len() group texts text(i) tokens(i) records(i) prompt_tokens(i) prompts answers lengths soft_ratio marked(i) select(rows)"),
    ("Optimizer", "step(loss | [losses]) zero_grad() lr steps"),
    ("Loss", "value kl_token kl_router metrics()"),
    ("Run", "log(metrics) log_tokens(ro, rewards, adv) metrics() tokens() samples() dir step"),
    ("Frame", "sql(query) head(n) column(name) columns height width with_token_class() write_parquet(path) write_csv(path)"),
];

pub fn find(name: &str) -> Option<&'static Prim> {
    PRIMITIVES.iter().find(|p| p.name == name)
}

/// `help()`: every primitive with its one-line signature.
pub fn overview() -> String {
    let mut s = String::from("primitives (help(\"name\") for options):\n");
    for p in PRIMITIVES {
        s += &format!("  {:<58} {}\n", p.sig, p.doc);
    }
    s += "types:\n";
    for (t, m) in METHODS {
        s += &format!("  {t:<10} {m}\n");
    }
    s +=
        "stdlib: import \"tarpo\" as tarpo; tarpo::train(m, ds, #{steps: 10}); tarpo::defaults()\n";
    s += "        also grpo, drgrpo, dapo, soft_thinking, coconut, hrpo (train), eval (pass_rates)\n";
    s
}

/// `help(name)`: one primitive with its options and defaults.
pub fn one(name: &str) -> Option<String> {
    let p = find(name)?;
    let mut s = format!("{}\n  {}\n", p.sig, p.doc);
    let mut table = |title: &str, opts: &[Opt]| {
        if !opts.is_empty() {
            s += title;
            for o in opts {
                s += &format!("  {:<18} {:<22} {}\n", o.name, o.def.show(), o.doc);
            }
        }
    };
    table("options:\n", p.opts);
    if name == "load_backbone" {
        table("lora options:\n", LORA);
    }
    Some(s)
}

/// Every name completion may offer besides variables.
pub fn completion_words() -> Vec<&'static str> {
    let mut w: Vec<&str> = PRIMITIVES.iter().map(|p| p.name).collect();
    for (_, m) in METHODS {
        for item in m.split_whitespace() {
            w.push(item.split('(').next().unwrap_or(item));
        }
    }
    w.extend([
        "let", "const", "fn", "for", "in", "while", "loop", "if", "else", "return", "break",
        "continue", "import", "export", "print", "debug", "true", "false", "range",
    ]);
    w.sort_unstable();
    w.dedup();
    w
}
