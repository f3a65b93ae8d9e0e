#!/usr/bin/env bash
# reap-vlm launcher: runs the REAP pipeline in the Docker container when a Docker engine answers, natively
# (in .venv beside this file) otherwise. `./run.sh help` says more.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

# Read by run.sh and docker-compose.yml themselves; never passed into the container.
LAUNCHER_VARS=" REAP_RUNTIME REAP_PYTHON REAP_ENV_FILE REAP_DATA_DIR REAP_GPU_COUNT REAP_UID REAP_GID"
LAUNCHER_VARS+=" REAP_BASE_IMAGE REAP_DEVEL_IMAGE REAP_TORCH_INDEX_URL REAP_INSTALL_FLASH_ATTN REAP_INSTALL_VLLM"
LAUNCHER_VARS+=" REAP_SOURCE_HASH "
# docker-compose.yml's own ${...} settings that run.sh reads (REAP_UID/REAP_GID, REAP_ENV_FILE, REAP_SOURCE_HASH
# are handled apart).
COMPOSE_VARS=(REAP_DATA_DIR REAP_GPU_COUNT REAP_BASE_IMAGE REAP_DEVEL_IMAGE REAP_TORCH_INDEX_URL
    REAP_INSTALL_FLASH_ATTN REAP_INSTALL_VLLM)
# Passed into the container when set, besides every other REAP_* variable.
PASSED_VARS=" HF_TOKEN HF_ENDPOINT HF_HUB_OFFLINE TRANSFORMERS_OFFLINE "
COMPOSE_MIN_MINOR=24  # Compose 2.24: env_file entries with `required: false`
STAMP=.venv/.reap-requirements.sha256
IMAGE=reap-vlm                           # docker-compose.yml's image
SOURCE_LABEL=org.reap-vlm.source-sha256  # the Dockerfile's label: source_hash of the checkout it was built from

usage() {
    cat <<'EOF'
usage: ./run.sh COMMAND [ARGS...]

Pipeline (ARGS go to the script; `./run.sh reap --help` lists its flags):
  reap       score the experts             python reap.py ARGS
  prune      write the pruned checkpoint   python prune_model.py ARGS
  test       check the pruned model        python test_pruned_model.py ARGS
  full       reap, prune and test in turn on the configured model; stops at the first failure
  demo       reap -> prune -> test on the trained reference model in reference/ (CPU, a few minutes):
             task accuracy before and after pruning half the experts, by REAP and by frequency;
             outputs in demo/output/
  selftest   the test suite                python -m pytest -q ARGS

Container:
  build      build the image               docker compose build ARGS (again after a git pull: the image
                                           holds the code; run.sh warns when it differs from this checkout)
  shell      a shell in the container      docker compose run --rm reap bash
  gpu        nvidia-smi (in the container with Docker, on the host otherwise)

  clean      remove output/, demo/output/, __pycache__/, .pytest_cache/, .ruff_cache/
             (clean --all: also demo/ and .venv/; data/ is never touched)
  help       this text

Where it runs: in the container (docker compose, service `reap`) when a Docker engine answers
`docker info`, natively otherwise. Natively, the first run creates .venv (python3 -m venv) and
installs requirements-dev.txt and the project; later runs reinstall only when requirements*.txt or
pyproject.toml change. Paths are relative to this folder in both modes (the container's /app).
  REAP_RUNTIME=docker|native   force one (auto: the default)
  REAP_PYTHON=/path/python     natively, use this interpreter as it is instead of .venv
  REAP_DATA_DIR=DIR            host folder mounted at /app/data (default ./data); ./output is /app/output
  REAP_GPU_COUNT=N|all         GPUs given to the container (default all; 0: the CPU-only service)
These may also be set in .env (or REAP_ENV_FILE; Compose gets what run.sh read there).
Build args (see Dockerfile): REAP_BASE_IMAGE, REAP_TORCH_INDEX_URL (older drivers), REAP_INSTALL_FLASH_ATTN=1
(built in REAP_DEVEL_IMAGE),
REAP_INSTALL_VLLM=1.

Settings: flag > environment > .env (REAP_ENV_FILE names another file) > default, e.g.
  REAP_MODEL_PATH  REAP_CALIBRATION_PATH  REAP_OUTPUT_PATH  REAP_PRUNED_OUTPUT_PATH
  REAP_TEST_OUTPUT_PATH  REAP_PRUNE_RATIO  REAP_SCORING_MODE  REAP_MAX_SAMPLES  REAP_BATCH_SIZE
  REAP_DEVICE  REAP_ENGINE        (all of them: .env.example)
In the container every REAP_* variable set in your shell is passed in, and .env (REAP_ENV_FILE) is read whole.
EOF
}

die() {
    echo "run.sh: $*" >&2
    exit 1
}

usage_error() {
    echo "run.sh: $*" >&2
    echo "Run ./run.sh help for the commands." >&2
    exit 2
}

is_launcher_var() {
    [[ $LAUNCHER_VARS == *" $1 "* ]]
}

# launcher_setting NAME: from the environment, else from the .env file (the last NAME=... line), else empty.
# Only run.sh's own variables are read this way; the Python code reads .env itself. Read as Compose and
# python-dotenv read it: 'single' or "double" quotes, a ` # comment` after the value, ${VAR} and ${VAR:-default}
# from the environment (not inside single quotes).
launcher_setting() {
    local name=$1 file=${REAP_ENV_FILE:-.env} line value="" quote="" out="" ref
    if [[ -n ${!name+set} ]]; then
        printf '%s' "${!name}"
        return 0
    fi
    [[ -f $file ]] || return 0
    while IFS= read -r line || [[ -n $line ]]; do
        line=${line%$'\r'}
        line=${line#export }
        if [[ $line == "$name="* ]]; then
            value=${line#*=}
        fi
    done <"$file"
    value=${value#"${value%%[![:space:]]*}"}
    if [[ $value == \"*\"* || $value == \'*\'* ]]; then
        quote=${value:0:1}
        value=${value:1}
        value=${value%%"$quote"*}
    else
        value=${value%%[[:space:]]#*}
        value=${value%"${value##*[![:space:]]}"}
    fi
    if [[ $quote != "'" ]]; then
        while [[ $value =~ \$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\} ]]; do
            ref=${BASH_REMATCH[1]}
            out+=${value%%"${BASH_REMATCH[0]}"*}${!ref:-${BASH_REMATCH[3]}}
            value=${value#*"${BASH_REMATCH[0]}"}
        done
        value=$out$value
    fi
    printf '%s' "$value"
}

# ------------------------------------------------------------------------------------------------ mode

engine_up() {
    command -v docker >/dev/null 2>&1 || return 1
    if command -v timeout >/dev/null 2>&1; then
        timeout 10 docker info >/dev/null 2>&1
    else
        docker info >/dev/null 2>&1
    fi
}

MODE=""
NATIVE_WHY=""
resolve_mode() {
    local runtime
    runtime=$(launcher_setting REAP_RUNTIME)
    case "$runtime" in
        docker)
            engine_up || die "REAP_RUNTIME=docker but no Docker engine answers ('docker info' failed): start Docker, or set REAP_RUNTIME=native"
            MODE=docker
            ;;
        native)
            MODE=native
            NATIVE_WHY="REAP_RUNTIME=native"
            ;;
        "" | auto)
            if engine_up; then
                MODE=docker
            else
                MODE=native
                NATIVE_WHY="no Docker engine answers 'docker info'"
            fi
            ;;
        *) die "REAP_RUNTIME=$runtime: expected docker, native or auto" ;;
    esac
}

# ------------------------------------------------------------------------------------------------ container

SERVICE=reap
check_compose() {
    local version major minor rest
    version=$(docker compose version --short 2>/dev/null) \
        || die "Docker answers but its Compose plugin does not ('docker compose version' failed): install docker-compose-plugin 2.$COMPOSE_MIN_MINOR+, or set REAP_RUNTIME=native"
    version=${version#v}
    major=${version%%.*}
    rest=${version#*.}
    minor=${rest%%.*}
    if [[ $major =~ ^[0-9]+$ && $minor =~ ^[0-9]+$ ]] && ((major < 2 || (major == 2 && minor < COMPOSE_MIN_MINOR))); then
        die "Docker Compose $version is too old: 2.$COMPOSE_MIN_MINOR or newer is needed; upgrade docker-compose-plugin, or set REAP_RUNTIME=native"
    fi
}

# compose ARGS...: docker compose ARGS. Compose fills docker-compose.yml's ${...} from the environment, else from
# ./.env; with REAP_ENV_FILE set it reads that file instead (--env-file), as launcher_setting does.
compose() {
    local global=()
    [[ -z ${REAP_ENV_FILE:-} ]] || global=(--env-file "$REAP_ENV_FILE")
    docker compose ${global[@]+"${global[@]}"} "$@"
}

# export_compose_settings: Compose's settings exported as run.sh reads them, so that the folder run.sh makes and
# the GPUs it counts are the ones Compose mounts and reserves (also for the demo, which changes REAP_ENV_FILE);
# REAP_SOURCE_HASH labels any image Compose builds (`./run.sh build`, or `compose run` when there is none).
export_compose_settings() {
    local name value
    for name in "${COMPOSE_VARS[@]}"; do
        value=$(launcher_setting "$name")
        [[ -z $value ]] || export "$name=$value"
    done
    REAP_SOURCE_HASH=$(source_hash)
    export REAP_SOURCE_HASH
}

# source_hash: a hash of the files `docker compose build` copies into the image: this folder less what
# .dockerignore leaves out, its patterns read as find -path patterns (close enough to tell changed code or
# requirements; a folder it leaves out is never read).
source_hash() {
    local pattern rest skip=(-path ./.git) keep=(-false) match file files=()
    if [[ -f .dockerignore ]]; then
        while IFS= read -r pattern || [[ -n $pattern ]]; do
            pattern=${pattern%$'\r'}
            pattern=${pattern#"${pattern%%[![:space:]]*}"}
            pattern=${pattern%"${pattern##*[![:space:]]}"}
            [[ -n $pattern && $pattern != "#"* ]] || continue
            rest=${pattern#!}
            rest=${rest#/}
            rest=${rest#./}
            rest=${rest%/}
            [[ -n $rest ]] || continue
            match=(-o -path "./${rest#"**/"}")
            [[ $rest != "**/"* ]] || match+=(-o -path "*/${rest#"**/"}")
            if [[ $pattern == "!"* ]]; then
                keep+=("${match[@]}")
            else
                skip+=("${match[@]}")
            fi
        done <.dockerignore
    fi
    while IFS= read -r -d '' file; do
        files+=("$file")
    done < <(find . \( "${skip[@]}" \) ! \( "${keep[@]}" \) -prune -o -type f -print0 2>/dev/null | LC_ALL=C sort -z)
    if ((${#files[@]})); then
        sha256 "${files[@]}" 2>/dev/null || true
    fi | file_hash
}

# check_image: one line on stderr when the image (which holds the code: COPY . /app) was built from another
# checkout than this one. No image yet: Compose builds it, labelled, before it runs.
check_image() {
    local built
    built=$(docker image inspect --format "{{ index .Config.Labels \"$SOURCE_LABEL\" }}" "$IMAGE" 2>/dev/null) \
        || return 0
    if [[ -z $built || $built == "<no value>" ]]; then
        echo "run.sh: warning: the image $IMAGE has no $SOURCE_LABEL label (built without ./run.sh build), so it may hold older code than this checkout: run ./run.sh build" >&2
    elif [[ $built != "$REAP_SOURCE_HASH" ]]; then
        echo "run.sh: warning: the image $IMAGE holds other code than this checkout (code or requirements changed since it was built): run ./run.sh build" >&2
    fi
}

prepare_container() {
    local dir
    check_compose
    export_compose_settings
    # The container runs as the calling user, so what it writes to ./output is yours.
    REAP_UID=$(launcher_setting REAP_UID)
    REAP_GID=$(launcher_setting REAP_GID)
    export REAP_UID="${REAP_UID:-$(id -u)}" REAP_GID="${REAP_GID:-$(id -g)}"
    # Bind-mount sources made here, not by the Docker daemon (which would make them root's).
    for dir in output demo "${REAP_DATA_DIR:-data}"; do
        [[ -d $dir ]] || mkdir -p "$dir"
    done
}

# choose_service: `reap` (GPUs), or `reap-cpu` on a host without an NVIDIA driver or with REAP_GPU_COUNT=0.
choose_service() {
    local gpu_count
    gpu_count=$(launcher_setting REAP_GPU_COUNT)
    if [[ $gpu_count == 0 ]]; then
        SERVICE=reap-cpu
    elif [[ -z $gpu_count ]] && ! command -v nvidia-smi >/dev/null 2>&1; then
        SERVICE=reap-cpu
        echo "run.sh: no NVIDIA driver on this host (no nvidia-smi): using the CPU-only container (reap-cpu)" >&2
    fi
}

# in_container CMD...: docker compose run --rm [-e VAR ...] SERVICE CMD...
in_container() {
    local name forward=()
    while IFS= read -r name; do
        is_launcher_var "$name" && continue
        if [[ $name == REAP_* || $PASSED_VARS == *" $name "* ]]; then
            forward+=(-e "$name")
        fi
    done < <(compgen -e | LC_ALL=C sort)
    compose run --rm ${forward[@]+"${forward[@]}"} "$SERVICE" "$@"
}

# ------------------------------------------------------------------------------------------------ native

# sha256 [FILE...]: sha256sum's lines for the FILEs (for stdin without any); shasum or cksum where it is missing.
sha256() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$@"
    elif command -v shasum >/dev/null 2>&1; then
        shasum -a 256 "$@"
    else
        cksum "$@"
    fi
}

file_hash() {
    sha256 | cut -d' ' -f1
}

requirements_hash() {
    local file
    for file in requirements*.txt pyproject.toml; do
        [[ -f $file ]] || continue
        printf '== %s\n' "$file"
        cat "$file"
    done | file_hash
}

SETUP_LOG=.venv/setup.log
SETUP_LOG_FALLBACK=.reap-setup.log

# step N/M WHAT LOG COMMAND...: one line for a set-up step, a progress indication while it runs (on a terminal:
# elapsed time and packages seen so far), its output in LOG; on failure the log's last lines and its name.
step() {
    local number=$1 what=$2 log=$3 pid rc=0 seen start=$SECONDS
    shift 3
    mkdir -p "$(dirname "$log")"
    printf 'run.sh: [%s] %s ...' "$number" "$what" >&2
    "$@" >"$log" 2>&1 &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        if [[ -t 2 ]]; then
            seen=$(grep -c -E '^(Collecting|Requirement already satisfied)' "$log" 2>/dev/null || true)
            printf '\rrun.sh: [%s] %s ... %ds, %s packages' "$number" "$what" $((SECONDS - start)) "${seen:-0}" >&2
        fi
        read -r -t 1 <> <(:) || true  # a one-second pause with bash alone
    done
    wait "$pid" || rc=$?
    if ((rc == 0)); then
        if [[ -t 2 ]]; then
            printf '\rrun.sh: [%s] %s ... done (%ds)\n' "$number" "$what" $((SECONDS - start)) >&2
        else
            printf ' done\n' >&2
        fi
        if [[ $log == "$SETUP_LOG_FALLBACK" ]]; then rm -f "$log"; fi
        return 0
    fi
    printf ' failed\n' >&2
    local lines=() line
    while IFS= read -r line || [[ -n $line ]]; do  # the log's last lines (bash 3 has no mapfile)
        lines+=("$line")
        if ((${#lines[@]} > 12)); then lines=("${lines[@]:1}"); fi
    done <"$log"
    if ((${#lines[@]})); then printf '    %s\n' "${lines[@]}" >&2; fi
    return "$rc"
}

PY=""
ensure_python() {
    local custom base want
    custom=$(launcher_setting REAP_PYTHON)
    if [[ -n $custom ]]; then
        command -v "$custom" >/dev/null 2>&1 || die "REAP_PYTHON=$custom: no such interpreter"
        PY=$custom
        return 0
    fi
    if [[ ! -x .venv/bin/python ]]; then
        [[ ! -e .venv ]] || die ".venv exists but has no bin/python: remove it (rm -rf .venv) and rerun"
        base=$(command -v python3) || die "python3 not found: install Python 3.10 or newer (or set REAP_PYTHON, or use Docker)"
        "$base" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
            || die "$base is $("$base" --version 2>&1): Python 3.10 or newer is needed (or set REAP_PYTHON)"
        step "1/2" "creating .venv with $("$base" --version 2>&1) ($base)" "${SETUP_LOG_FALLBACK}" "$base" -m venv .venv \
            || { rm -rf .venv; die "could not create .venv with $base (the full log: $SETUP_LOG_FALLBACK; Debian/Ubuntu: apt install python3-venv)"; }
    fi
    want=$(requirements_hash)
    if [[ ! -f $STAMP || "$(cat "$STAMP")" != "$want" ]]; then
        rm -f "$STAMP"
        step "2/2" "installing requirements-dev.txt and the project into .venv (the first time downloads PyTorch, several GB)" \
            "$SETUP_LOG" .venv/bin/python -m pip install --disable-pip-version-check -r requirements-dev.txt -e . \
            || die "installing into .venv failed (the full log: $SETUP_LOG); fix it and rerun: the install is repeated until it succeeds"
        printf '%s\n' "$want" >"$STAMP"
    fi
    PY=.venv/bin/python
}

# ------------------------------------------------------------------------------------------------ commands

# py ARGS...: python ARGS in the chosen mode.
py() {
    if [[ $MODE == docker ]]; then
        in_container python "$@"
    else
        "$PY" "$@"
    fi
}

need_script() {
    [[ -f $1 ]] || die "$1 is missing from $ROOT"
}

script_of() {
    case "$1" in
        reap) echo reap.py ;;
        prune) echo prune_model.py ;;
        test) echo test_pruned_model.py ;;
    esac
}

cmd_full() {
    [[ $# -eq 0 ]] || usage_error "full takes no arguments: configure it with REAP_* variables or .env"
    need_script reap.py
    need_script prune_model.py
    need_script test_pruned_model.py
    echo "== full 1/3: reap.py" >&2
    py reap.py
    echo "== full 2/3: prune_model.py" >&2
    py prune_model.py
    echo "== full 3/3: test_pruned_model.py" >&2
    py test_pruned_model.py
}

# The task-accuracy table of a test report, under a title.
demo_accuracy() {
    [[ -f $1 ]] || return 0
    echo
    echo "pruned by $2 (0.5 of the experts removed):"
    sed -n '/^| task |/,/^$/p' "$1"
}

cmd_demo() {
    [[ $# -eq 0 ]] || usage_error "demo takes no arguments: its settings are in demo/demo.env"
    need_script reap.py
    local name settings skipped=() outputs=()
    # The demo is self-contained: REAP_* settings of the shell and of ./.env do not apply to it.
    while IFS= read -r name; do
        if [[ $name == REAP_* ]] && ! is_launcher_var "$name"; then
            unset "$name"
        fi
    done < <(compgen -e)
    settings=(
        REAP_MODEL_PATH=reference/model
        REAP_CALIBRATION_PATH=reference/calibration/mixed.json
        REAP_OUTPUT_PATH=demo/output/reap
        REAP_PRUNED_OUTPUT_PATH=demo/output/pruned-model
        REAP_REFERENCE_PATH=reference/model
        REAP_TEST_OUTPUT_PATH=demo/output/test-report
        REAP_EVAL_PATH=reference/eval_small.jsonl
        REAP_PRUNE_RATIO=0.5
        REAP_MAX_SAMPLES=128
        REAP_BATCH_SIZE=16
        REAP_DEVICE=cpu
        REAP_NUM_PROMPTS=4
        REAP_MAX_NEW_TOKENS=48
    )
    mkdir -p demo
    {
        echo "# Settings of ./run.sh demo, rewritten by every demo run (the demo does not read ./.env)."
        printf '%s\n' "${settings[@]}"
    } >demo/demo.env
    export REAP_ENV_FILE=demo/demo.env HF_HUB_OFFLINE=1
    # The test's own prompts: held-out items, never scored (the scored ones are reference/calibration/mixed.json).
    local heldout=(--calibration reference/calibration/heldout.json)

    echo "== demo 1/4: reap.py on the trained reference model (32 experts per layer, mixed calibration)" >&2
    py reap.py
    outputs+=("REAP scores    demo/output/reap/reap_metadata.json")
    if [[ -f prune_model.py ]]; then
        echo "== demo 2/4: prune_model.py --force --verify (prune ratio 0.5 by REAP: keep 16 of 32)" >&2
        py prune_model.py --force --verify
        outputs+=("pruned model   demo/output/pruned-model/")
        if [[ -f test_pruned_model.py ]]; then
            echo "== demo 3/4: test_pruned_model.py (task accuracy before and after, on reference/eval_small.jsonl)" >&2
            py test_pruned_model.py "${heldout[@]}"
            outputs+=("test report    demo/output/test-report/test_report.md")
            echo "== demo 4/4: the same ratio by router frequency, for contrast" >&2
            py prune_model.py --force --criterion frequency --output demo/output/pruned-frequency
            py test_pruned_model.py "${heldout[@]}" --model demo/output/pruned-frequency \
                --output demo/output/test-report-frequency
            outputs+=("by frequency   demo/output/test-report-frequency/test_report.md")
            demo_accuracy demo/output/test-report/test_report.md "REAP"
            demo_accuracy demo/output/test-report-frequency/test_report.md "frequency"
        else
            skipped+=("test (test_pruned_model.py not found)")
        fi
    else
        skipped+=("prune (prune_model.py not found)")
        skipped+=("test (needs the pruned model)")
    fi

    echo
    echo "demo done; settings in demo/demo.env, outputs:"
    printf '  %s\n' "${outputs[@]}"
    if ((${#skipped[@]})); then
        echo "skipped:"
        printf '  %s\n' "${skipped[@]}"
    fi
}

cmd_clean() {
    local all=0 target
    case "${1:-}" in
        --all) all=1 ;;
        "") ;;
        *) usage_error "clean takes only --all" ;;
    esac
    [[ $# -le 1 ]] || usage_error "clean takes only --all"
    local targets=(output demo/output .pytest_cache .ruff_cache)
    if ((all)); then
        targets+=(demo .venv)
    fi
    for target in "${targets[@]}"; do
        if [[ -e $target || -L $target ]]; then
            rm -rf -- "$target"
            echo "removed $target/"
        fi
    done
    find . \( -path ./.venv -o -path ./.git -o -path ./data \) -prune \
        -o -type d -name __pycache__ -prune -exec rm -rf -- {} +
    echo "removed __pycache__/ folders"
}

main() {
    local cmd=${1:-}
    [[ $# -eq 0 ]] || shift
    case "$cmd" in
        help | -h | --help)
            usage
            return 0
            ;;
        "")
            usage >&2
            return 2
            ;;
        clean)
            cmd_clean "$@"
            return 0
            ;;
        reap | prune | test | full | demo | selftest | shell | build | gpu) ;;
        *)
            echo "run.sh: unknown command '$cmd'" >&2
            usage >&2
            return 2
            ;;
    esac

    if [[ -n ${REAP_ENV_FILE:-} && ! -f $REAP_ENV_FILE ]]; then
        die "REAP_ENV_FILE=$REAP_ENV_FILE: no such file"
    fi
    resolve_mode

    if [[ $MODE == docker ]]; then
        case "$cmd" in
            build)
                check_compose
                export_compose_settings
                compose build "$@"
                return
                ;;
            gpu)
                prepare_container
                in_container nvidia-smi "$@"
                return
                ;;
        esac
        prepare_container
        choose_service
        check_image
        echo "run.sh: running in the container (docker compose run --rm $SERVICE)" >&2
        case "$cmd" in
            shell)
                in_container bash "$@"
                return
                ;;
            selftest)
                in_container python -m pytest -q -p no:cacheprovider "$@"
                return
                ;;
        esac
    else
        case "$cmd" in
            build | shell) die "$cmd needs a Docker engine ($NATIVE_WHY)" ;;
            gpu)
                command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found: no NVIDIA driver on this host"
                exec nvidia-smi "$@"
                ;;
        esac
        ensure_python
        echo "run.sh: running natively with $PY ($NATIVE_WHY)" >&2
        if [[ $cmd == selftest ]]; then
            exec "$PY" -m pytest -q "$@"
        fi
    fi

    case "$cmd" in
        reap | prune | test)
            local script
            script=$(script_of "$cmd")
            need_script "$script"
            py "$script" "$@"
            ;;
        full) cmd_full "$@" ;;
        demo) cmd_demo "$@" ;;
    esac
}

main "$@"
