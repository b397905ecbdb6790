#!/usr/bin/env bash
# The project's whole check, as the README and CI run it: static checks, the
# doc examples, every test file under Deno and under Bun, then a short torture
# run per backend (each counts as one test). Ends with one
# line "N passed, N failed" (tests of both runtimes, plus each failed check).
set -uo pipefail
cd "$(dirname "$0")/.."
bin=$PWD/node_modules/.bin
for tool in deno bun; do
  if [ ! -x "$bin/$tool" ]; then
    echo "error: $bin/$tool is missing: run 'npm ci' first (package.json pins deno and bun)" >&2
    exit 2
  fi
done
export NO_COLOR=1

passed=0
failed=0
log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT

check() { # check NAME COMMAND...: a static check counts as one failure if it fails
  local name=$1
  shift
  echo "== $name: $*"
  if "$@" >"$log/out" 2>&1; then
    echo "ok"
  else
    cat "$log/out"
    echo "FAILED: $name"
    failed=$((failed + 1))
  fi
}

entrypoints=(mod.ts connector.ts backends/memory.ts backends/etcd.ts backends/redis.ts cli.ts)
check "deno fmt" "$bin/deno" fmt --check
check "deno lint" "$bin/deno" lint
check "deno check" "$bin/deno" check .
check "deno doc --lint" "$bin/deno" doc --lint "${entrypoints[@]}" errors.ts
check "README code blocks" "$bin/deno" check --doc-only README.md
check "deno publish --dry-run" "$bin/deno" publish --dry-run --allow-dirty

sanitized=(--allow-all --sanitize-ops --sanitize-resources)

deno_test() { # deno_test LABEL UNIT ARGS...: UNIT is "tests" or "steps", what to count
  local label=$1 unit=$2
  shift 2
  echo "== deno test ($label)"
  "$bin/deno" test "${sanitized[@]}" "$@" 2>&1 | tee "$log/deno"
  local summary ok bad
  # "ok | 5 passed (40 steps) | 0 failed": each describe() is a test, each it() a step.
  summary=$(grep -E '^(ok|FAILED) \|' "$log/deno" | tail -n 1)
  if [ -z "$summary" ]; then
    echo "FAILED: deno test ($label) printed no summary"
    failed=$((failed + 1))
    return
  fi
  if [ "$unit" = steps ]; then
    ok=$(sed -nE 's/.*passed \(([0-9]+) steps?\).*/\1/p' <<<"$summary")
    bad=$(sed -nE 's/.*failed \(([0-9]+) steps?\).*/\1/p' <<<"$summary")
  fi
  ok=${ok:-$(sed -nE 's/.*\| ([0-9]+) passed.*/\1/p' <<<"$summary")}
  # A describe() can fail with no failed step (a hook or a sanitizer): count it too.
  local top
  top=$(sed -nE 's/.*\| ([0-9]+) failed.*/\1/p' <<<"$summary")
  bad=$(( ${bad:-0} > ${top:-0} ? ${bad:-0} : ${top:-0} ))
  passed=$((passed + ${ok:-0}))
  failed=$((failed + bad))
  summaries+=("deno $label: $summary")
}

summaries=()
deno_test "doc examples" tests --doc "${entrypoints[@]}" errors.ts _locker.ts _options.ts
deno_test "tests/" steps --v8-flags=--expose-gc tests/

echo "== bun test (tests/)"
"$bin/bun" test --timeout 60000 ./tests/ 2>&1 | tee "$log/bun"
bun_ok=$(sed -nE 's/^ *([0-9]+) pass$/\1/p' "$log/bun" | tail -n 1)
bun_bad=$(sed -nE 's/^ *([0-9]+) fail$/\1/p' "$log/bun" | tail -n 1)
if [ -z "$bun_ok" ] && [ -z "$bun_bad" ]; then
  echo "FAILED: bun test printed no summary"
  failed=$((failed + 1))
fi
passed=$((passed + ${bun_ok:-0}))
failed=$((failed + ${bun_bad:-0}))

# The torture run, short, on each backend: workers in Deno and Bun processes
# under injected faults; it exits non-zero on any violation (see torture/main.ts).
for backend in etcd redis redlock; do
  echo "== torture ($backend, 0.5 min)"
  if "$bin/deno" run --allow-all torture/main.ts --backend "$backend" --minutes 0.5 2>&1 |
    tee "$log/torture"; then
    passed=$((passed + 1))
  else
    echo "FAILED: torture ($backend)"
    failed=$((failed + 1))
  fi
  summaries+=("torture $backend: $(tail -n 1 "$log/torture")")
done

echo
printf '%s\n' "${summaries[@]}"
echo "bun tests/: ${bun_ok:-0} pass, ${bun_bad:-0} fail"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
