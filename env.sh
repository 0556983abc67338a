# Source this in a shell to build by hand with the same environment as ./dev.sh.
export TARPO_VENV=${TARPO_VENV:-$PWD/.venv}
export PATH="$TARPO_VENV/bin:$PATH" LIBTORCH_USE_PYTORCH=1
