//! Shared test helpers: where the Python oracle and models live, and fixtures
//! produced once by transformers and cached under the target directory.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use tch::Tensor;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The project virtualenv's Python (TARPO_VENV, else ./.venv).
pub fn python() -> PathBuf {
    let venv = std::env::var_os("TARPO_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv"));
    let py = venv.join("bin/python");
    assert!(
        py.exists(),
        "{} not found: run ./dev.sh setup (or set TARPO_VENV)",
        py.display()
    );
    py
}

/// Directory of prepared models (TARPO_MODELS, else ./models).
pub fn models() -> PathBuf {
    std::env::var_os("TARPO_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("models"))
}

pub fn smollm2() -> PathBuf {
    let d = models().join("SmolLM2-135M-Instruct");
    assert!(
        d.join("model.safetensors").exists(),
        "{} missing: run ./dev.sh setup",
        d.display()
    );
    d
}

/// Scratch space inside the target directory.
pub fn scratch(name: &str) -> PathBuf {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let d = base.join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `scratch(name)` emptied: scratch directories outlive a test run.
pub fn empty_scratch(name: &str) -> PathBuf {
    let d = scratch(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `python tests/oracle/SCRIPT args...`, panicking with its stderr on failure.
pub fn run_python(script: &str, args: &[&str]) -> String {
    let out = Command::new(python())
        .arg(root().join("tests/oracle").join(script))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Output of an oracle script, computed once per script version and cached:
/// written to a temporary directory and renamed into place, so concurrent
/// test binaries never see half a fixture.
pub fn cached_oracle(script: &str, extra: &[&str]) -> PathBuf {
    use std::hash::{Hash, Hasher};
    let src = std::fs::read(root().join("tests/oracle").join(script)).unwrap();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    src.hash(&mut h);
    extra.hash(&mut h);
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("oracle").join(format!(
        "{}-{:016x}",
        script.trim_end_matches(".py"),
        h.finish()
    ));
    if dir.join(".done").exists() {
        return dir;
    }
    let tmp = PathBuf::from(format!("{}.tmp{}", dir.display(), std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let mut args = vec![tmp.to_str().unwrap()];
    args.extend_from_slice(extra);
    run_python(script, &args);
    std::fs::write(tmp.join(".done"), "").unwrap();
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another process got there first; its copy is identical.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    dir
}

static TINY: OnceLock<PathBuf> = OnceLock::new();

/// Tiny random-weight models and transformers' outputs on them.
pub fn tiny_models() -> &'static Path {
    TINY.get_or_init(|| cached_oracle("tiny_models.py", &[]))
}

pub const TINY_NAMES: [&str; 4] = [
    "llama_mha_tied",
    "llama_gqa_llama3_bias",
    "qwen2_mqa_tied_legacy_theta",
    "qwen2_gqa_untied_linear",
];

/// Named tensors of a safetensors file.
pub fn read_tensors(path: &Path) -> std::collections::HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect()
}

/// The `tarpo` binary.
pub fn tarpo() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tarpo"))
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// `tarpo --threads 2 run scripts/SCRIPT --set KEY=VALUE...` from the
/// repository root; panics with both streams unless it succeeds, and
/// returns its standard output.
pub fn shipped_script(script: &str, sets: &[String]) -> String {
    let mut cmd = tarpo();
    cmd.current_dir(root())
        .args(["--threads", "2", "run", &format!("scripts/{script}")]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{script}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The replay without prompt sharing: one forward over the whole padded rows,
/// every loop's states at the positions that predict each token.
pub fn one_forward_states(
    net: &tarpo::model::Llama,
    batch: &tarpo::policy::replay::ReplayBatch,
) -> Vec<Tensor> {
    let step = tarpo::model::Step::full(&batch.valid).unwrap();
    let states = net.forward_loops(&batch.inputs, &step, None).unwrap();
    let (p, t) = (batch.prompt_width, batch.tokens.size()[1]);
    let at = Tensor::arange_start(p - 1, p - 1 + t, (tch::Kind::Int64, tch::Device::Cpu));
    states.iter().map(|h| h.index_select(1, &at)).collect()
}

/// The shared-prompt replay (`replay::hidden_states_loops`) equals one forward
/// over the rows: every loop's states at real steps, and the gradients of
/// `params` under a fixed random linear loss of those states. Returns the
/// largest gradient, so callers can check the loss reached the parameters.
pub fn assert_shared_replay_is_one_forward(
    net: &tarpo::model::Llama,
    batch: &tarpo::policy::replay::ReplayBatch,
    params: &[Tensor],
) -> f64 {
    use tch::Kind;
    let steps = batch.steps.to_kind(Kind::Float).unsqueeze(-1);
    let run = |states: Vec<Tensor>| -> (Vec<Tensor>, Vec<Tensor>) {
        for p in params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        tch::manual_seed(7);
        let mut loss = Tensor::zeros([], (Kind::Float, tch::Device::Cpu));
        for h in &states {
            loss += (h * &steps * h.randn_like()).sum(Kind::Float);
        }
        loss.backward();
        let masked = states.iter().map(|h| (h * &steps).detach()).collect();
        (masked, params.iter().map(|p| p.grad().copy()).collect())
    };
    let (shared, g_shared) = run(tarpo::policy::replay::hidden_states_loops(net, batch).unwrap());
    let (full, g_full) = run(one_forward_states(net, batch));
    assert_eq!(shared.len(), full.len(), "loops");
    for (i, (a, b)) in shared.iter().zip(&full).enumerate() {
        assert_eq!(a.size(), b.size(), "loop {i}: shapes");
        let (d, scale) = (max_abs_diff(a, b), b.abs().max().double_value(&[]));
        assert!(
            d < 2e-5 * scale.max(1.0),
            "loop {i}: states differ by {d} (scale {scale})"
        );
    }
    let mut largest: f64 = 0.0;
    for (i, (a, b)) in g_shared.iter().zip(&g_full).enumerate() {
        let scale = b.abs().max().double_value(&[]);
        let d = max_abs_diff(a, b);
        assert!(
            d <= 1e-4 * scale.max(1e-6),
            "parameter {i}: gradient differs by {d} (scale {scale})"
        );
        largest = largest.max(scale);
    }
    largest
}

/// Attaches LoRA r 4 / alpha 8 and moves every adapter weight by `scale`
/// standard normals (B starts at zero: moved, the adapters matter).
pub fn attach_moved_lora(net: &mut tarpo::model::Llama, scale: f64) {
    net.attach_lora(&tarpo::model::LoraConfig::new(4, 8.0))
        .unwrap();
    tch::no_grad(|| {
        for p in net.lora_parameters() {
            let _ = p.shallow_clone().f_add_(&(p.randn_like() * scale));
        }
    });
}

/// Deterministic word prompts: `n` rows of 2-4 short words.
pub fn write_prompts(path: &Path, n: usize, seed: u64) {
    let mut rng = tarpo::policy::Rng::new(seed);
    let words = [
        "the", "a", "cat", "sum", "of", "is", "to", "one", "and", "we",
    ];
    let mut s = String::new();
    for _ in 0..n {
        let k = 2 + rng.next_u64() % 3;
        let p: Vec<&str> = (0..k)
            .map(|_| words[(rng.next_u64() % words.len() as u64) as usize])
            .collect();
        s += &format!("{{\"prompt\": \"{}\", \"answer\": \"\"}}\n", p.join(" "));
    }
    std::fs::write(path, s).unwrap();
}
