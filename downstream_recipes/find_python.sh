# Sourced by superb_asr.sh and superb_pr.sh: prints the Python of the environment s3prl-laser is installed
# in, or says in one line how to point the recipes at it (and returns 1).
# Tried in order: $PYTHON when set (then only it); the active virtual or conda environment; python3 and
# python on PATH; a virtual environment inside this repository (.venv*, venv*).
recipe_python() {
    local repo candidate missing
    local check='import importlib.util as u, sys
missing = [m for m in ("s3prl_laser", "s3prl", "soundfile", "yaml") if u.find_spec(m) is None]
print(" ".join(missing)); sys.exit(1 if missing else 0)'
    if [ -n "${PYTHON:-}" ]; then
        if missing="$("$PYTHON" -c "$check" 2>/dev/null)"; then
            echo "$PYTHON"
            return 0
        fi
        echo "$(basename "$0"): PYTHON=$PYTHON lacks ${missing:-a working interpreter}; set PYTHON to the" \
            "python of the environment s3prl-laser is installed in (e.g. PYTHON=.venv/bin/python)" >&2
        return 1
    fi
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    local tried=()
    for candidate in ${VIRTUAL_ENV:+"$VIRTUAL_ENV/bin/python"} ${CONDA_PREFIX:+"$CONDA_PREFIX/bin/python"} \
        python3 python "$repo"/.venv*/bin/python "$repo"/venv*/bin/python; do
        command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" -c "$check" >/dev/null 2>&1; then
            echo "$candidate"
            return 0
        fi
        tried+=("$(command -v "$candidate")")
    done
    echo "$(basename "$0"): no Python with s3prl-laser installed found (tried: ${tried[*]:-none});" \
        "activate its environment, or set PYTHON=/path/to/env/bin/python" >&2
    return 1
}
