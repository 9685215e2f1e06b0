# Sourced by the demo scripts. `stage NAME CMD...` runs CMD with its stdout kept in
# $D/NAME.json and its stderr in $D/NAME.log, appends {"stage", "ms"} to $D/times.jsonl,
# and on failure stops the script naming the log (with its last lines).
stage() {
    local name=$1; shift
    local start=$(date +%s%N)
    echo "== $name" >&2
    "$@" > "$D/$name.json" 2> "$D/$name.log" || { echo "$(basename "$0"): $name failed, see $D/$name.log" >&2; tail -3 "$D/$name.log" >&2; exit 1; }
    echo "{\"stage\": \"$name\", \"ms\": $(( ($(date +%s%N) - start) / 1000000 ))}" >> "$D/times.jsonl"
}
