# Sourced by the bootstrap scripts: refuse to create an environment that cannot fit, before pip leaves a half-built
# environment behind ("No space left on device" midway). Sizes measured on a complete set-up: .venv 3.8 GiB,
# .venv-vllm030 3.6 GiB; pip needs room beside them for the wheels it unpacks.
require_free_space() {  # require_free_space GIB WHAT
    local need_gib=$1 what=$2 free_kib mount
    read -r free_kib mount < <(df -Pk . | awk 'NR == 2 {print $4, $6}') || true  # no reading: no check
    if [ -n "$free_kib" ] && [ "$free_kib" -lt $((need_gib * 1024 * 1024)) ]; then
        echo "[bootstrap] $what needs about $need_gib GiB free;" \
             "$(awk -v k="$free_kib" 'BEGIN {printf "%.1f", k / 1048576}') GiB free on $mount ($PWD):" \
             "free some space, then run the command again" >&2
        exit 1
    fi
}
