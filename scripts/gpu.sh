#!/usr/bin/env bash
# Builds the CUDA test binaries (cuda_* of fathom-kernels, cuda_model_* of fathom-worker: the
# GPU model forward against the CPU reference on the golden fixtures) and the GPU bench here, copies them
# (stripped) with a runner script into the lead checkout's git-ignored .device/ folder, and
# prints the device-tool call that runs them on the GPU machine.
#
#   scripts/gpu.sh            # build + stage into /work/main/.device/cuda
#   FATHOM_DEVICE_DIR=/path/dir scripts/gpu.sh   # stage elsewhere
#
# On the GPU machine, .device/cuda/run.sh [tests|cli|bench|all] [bench flags...] sets LD_LIBRARY_PATH
# (the CUDA wheels' nvidia/cu13/lib, plus a temp dir with a libnccl.so symlink), runs every test
# binary with --nocapture, and FAILS if a test failed or printed "SKIP:" on a machine that has a
# GPU (except "needs N GPUs" skips). Logs and bench tables go to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${FATHOM_DEVICE_DIR:-/work/main/.device/cuda}"

echo "gpu.sh: building test binaries (debug) and fathom-gpu-bench (release)" >&2
json=$(cargo test -p fathom-kernels --test 'cuda_*' --no-run --message-format=json 2>/dev/null)
json+=$'\n'$(cargo test -p fathom-kernels --test 'comm_nccl*' --no-run --message-format=json 2>/dev/null)
json+=$'\n'$(cargo test -p fathom-worker --test 'cuda_model_*' --no-run --message-format=json 2>/dev/null)
# FATHOM_GPU_NO_OPS_BENCH=1 skips the (slow) release build of the op/GEMM bench: bench mode then
# runs only the full-width layer bench and the HF peer.
if [ -z "${FATHOM_GPU_NO_OPS_BENCH:-}" ]; then
  cargo build --release -p fathom-kernels --bin fathom-gpu-bench >&2
fi
cargo build -p fathom --bin fathom >&2

rm -rf "$dest/bin"
mkdir -p "$dest/bin"
printf '%s\n' "$json" | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do
  strip --strip-debug -o "$dest/bin/$name" "$exe"
  echo "gpu.sh: staged $name" >&2
done
if [ -z "${FATHOM_GPU_NO_OPS_BENCH:-}" ]; then
  strip --strip-debug -o "$dest/bin/fathom-gpu-bench" target/release/fathom-gpu-bench
fi
strip --strip-all -o "$dest/bin/fathom" target/debug/fathom
cp /work/shared/tools/hf_peer_layer.py "$dest/hf_peer_layer.py" 2>/dev/null \
  || echo "gpu.sh: no /work/shared/tools/hf_peer_layer.py: the bench runs without the HF peer" >&2

cat > "$dest/run.sh" <<'RUNNER'
#!/usr/bin/env bash
# Runner for the GPU machine (written by scripts/gpu.sh). Usage: run.sh [tests|cli|bench|all] [bench flags]
# tests: every cuda_* and comm_* test binary; cli: `fathom generate --device cuda` vs `--device cpu`
# (and the golden greedy ids) on every golden case; bench: fathom-gpu-bench.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
what="${1:-all}"; shift || true
OUT="${OUT:-/tmp/fathom-out}"; mkdir -p "$OUT"
site=$(python3 -c 'import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))' 2>/dev/null) \
  || site=/opt/torch/.venv/lib/python3.12/site-packages
cu13="$site/nvidia/cu13/lib"
nccl="$site/nvidia/nccl/lib/libnccl.so.2"
[ -d "$cu13" ] || { echo "FAIL: no CUDA wheel libraries at $cu13"; exit 2; }
links=$(mktemp -d)
# The worker's GPU tests read the golden fixtures relative to the workspace they were built in;
# on this machine they come with the checkout (tests/fixtures/golden, next to .device/).
export FATHOM_GOLDEN_DIR="${FATHOM_GOLDEN_DIR:-$(cd "$here/../.." && pwd)/tests/fixtures/golden}"
[ -e "$nccl" ] && ln -s "$nccl" "$links/libnccl.so"
export LD_LIBRARY_PATH="$links:$cu13:${LD_LIBRARY_PATH:-}"
export NCCL_NVLS_ENABLE=0   # NVLink multicast stays off on these machines
export CUBLASLT_LOG_LEVEL=1 # cuBLASLt prints why it rejects a configuration
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
{ date -u; nvidia-smi --query-gpu=index,name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv; \
  echo "libs: $cu13 $nccl"; ls "$cu13"; } > "$OUT/machine.txt" 2>&1
echo "GPUs: $gpus"
fail=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  : > "$OUT/tests.log"
  for t in "$here"/bin/cuda_* "$here"/bin/comm_*; do
    name=$(basename "$t")
    log=$(mktemp)
    # A hung binary (an NCCL peer that never comes) must not eat the whole call.
    timeout 180 "$t" --nocapture --test-threads=1 > "$log" 2>&1; rc=$?
    { echo "===== $name (rc=$rc)"; cat "$log"; } >> "$OUT/tests.log"
    summary=$(grep -E '^test result:' "$log" | tail -1)
    echo "$name: rc=$rc $summary"
    [ "$rc" = 0 ] || fail=1
    if [ "$gpus" -gt 0 ]; then
      bad=$(grep '^SKIP:' "$log" | grep -v -E 'needs [0-9]+ GPUs, found [0-9]+' || true)
      if [ -n "$bad" ]; then echo "FAIL: $name printed SKIP on a GPU machine:"; echo "$bad"; fail=1; fi
    fi
    grep -E 'FAILED|panicked|rel err' "$log" | head -20
  done
fi
if [ "$what" = cli ] || [ "$what" = all ]; then
  # fathom generate on the GPU must give the CPU's tokens (greedy: also the golden ids; seeded
  # sampling: the same draws) on every golden case.
  : > "$OUT/cli.log"
  for c in "$FATHOM_GOLDEN_DIR"/*/; do
    name=$(basename "$c")
    ids=$(python3 -c 'import json,sys; g=json.load(open(sys.argv[1])); print(",".join(map(str,g["prompt_ids"]))+" "+",".join(map(str,g["greedy_ids"])))' "$c/golden.json")
    prompt=${ids% *}; want=${ids#* }
    for mode in "--temperature 0" "--temperature 0.8 --seed 7"; do
      # shellcheck disable=SC2086
      cpu=$("$here/bin/fathom" generate --model "$c" --prompt-ids "$prompt" --max-new-tokens 32 --ignore-eos $mode --device cpu 2>>"$OUT/cli.log")
      # shellcheck disable=SC2086
      gpu=$("$here/bin/fathom" generate --model "$c" --prompt-ids "$prompt" --max-new-tokens 32 --ignore-eos $mode --device cuda 2>>"$OUT/cli.log"); rc=$?
      echo "$name [$mode]: rc=$rc cpu=$cpu gpu=$gpu" >> "$OUT/cli.log"
      if [ "$rc" != 0 ] || [ -z "$gpu" ] || [ "$cpu" != "$gpu" ]; then echo "FAIL: generate $name [$mode]: cuda differs from cpu"; fail=1
      else echo "generate $name [$mode]: cuda == cpu (32 tokens)"; fi
      if [ "$mode" = "--temperature 0" ] && [ "$gpu" != "$want" ]; then echo "FAIL: generate $name: cuda greedy ids differ from golden"; fail=1; fi
    done
  done
  # RL rollout output: routed experts of every fed row, GPU == CPU (greedy, JSON).
  for c in "$FATHOM_GOLDEN_DIR"/*/; do
    name=$(basename "$c")
    prompt=$(python3 -c 'import json,sys; print(",".join(map(str,json.load(open(sys.argv[1]))["prompt_ids"])))' "$c/golden.json")
    cpu=$("$here/bin/fathom" generate --model "$c" --prompt-ids "$prompt" --max-new-tokens 8 --ignore-eos --json --return-routed-experts --device cpu 2>>"$OUT/cli.log")
    gpu=$("$here/bin/fathom" generate --model "$c" --prompt-ids "$prompt" --max-new-tokens 8 --ignore-eos --json --return-routed-experts --device cuda 2>>"$OUT/cli.log"); rc=$?
    if [ "$rc" != 0 ] || [ -z "$gpu" ] || [ "$cpu" != "$gpu" ] || ! grep -q routed_experts <<<"$gpu"; then
      echo "FAIL: generate $name --return-routed-experts: cuda differs from cpu"; echo "cpu=$cpu gpu=$gpu" >> "$OUT/cli.log"; fail=1
    else echo "generate $name --return-routed-experts: cuda == cpu"; fi
  done
  # A served cluster on GPUs: fathom up with 2 workers (worker i on cuda:i), W=2 with T=1 and
  # T=2, must stream the tokens of the same cluster on CPUs.
  if [ "$gpus" -ge 2 ]; then
    model="$FATHOM_GOLDEN_DIR/short_prompt"
    for tp in 1 2; do
      for dev in cpu cuda; do
        r=$(timeout 120 "$here/bin/fathom" up --model "$model" --workers 2 --tp $tp --device $dev \
            --prompt-ids 5,17,42,99 --max-new-tokens 8 --ignore-eos --json 2>>"$OUT/cli.log" | grep '^{')
        eval "up_$dev=\"\$r\""
      done
      if [ -z "$up_cuda" ] || [ "$up_cuda" != "$up_cpu" ]; then echo "FAIL: fathom up W=2 T=$tp: cuda differs from cpu ($up_cuda vs $up_cpu)"; fail=1
      else echo "fathom up W=2 T=$tp --device cuda == cpu: $up_cuda"; fi
    done
  else
    echo "SKIP: fathom up W=2 on GPUs needs 2 GPUs, found $gpus"
  fi
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  if [ -x "$here/bin/fathom-gpu-bench" ]; then
    "$here/bin/fathom-gpu-bench" --cache-dir /tmp/fathom-kernels --out-dir "$OUT" "$@" > "$OUT/bench.log" 2>&1
    rc=$?; echo "fathom-gpu-bench: rc=$rc"; [ "$rc" = 0 ] || fail=1
    cat "$OUT/bench.log"
  else
    echo "fathom-gpu-bench: not staged (FATHOM_GPU_NO_OPS_BENCH): op/GEMM bench skipped"
  fi
  # Full-width layers (ours), then the HF transformers peer on the same GPU in the same run.
  timeout 300 "$here/bin/cuda_model_bench" --ignored --nocapture --test-threads=1 > "$OUT/layer.log" 2>&1
  rc=$?; echo "cuda_model_bench: rc=$rc"; [ "$rc" = 0 ] || fail=1
  grep -v '^BENCH' "$OUT/layer.log"
  if [ -f "$here/hf_peer_layer.py" ]; then
    PYTHONUNBUFFERED=1 timeout 200 python3 "$here/hf_peer_layer.py" --cases 1x4096,64x512,256x128 --json "$OUT/hf_peer.json" 2>&1 | tail -5
  fi
fi
[ "$fail" = 0 ] && echo "RESULT: PASS" || echo "RESULT: FAIL"
exit "$fail"
RUNNER
chmod +x "$dest/run.sh"
du -sh "$dest" >&2
cat <<EOF2
Staged in $dest. Run on the GPU machine with the device tool (one call, from the lead checkout):
  run(command="bash .device/cuda/run.sh all", carry=[".device"], kind="nvidia-h200-x2", timeout_s=600)
  (kind "nvidia-h200" also works; the two-GPU NCCL test then prints 'SKIP: ... needs 2 GPUs'.)
EOF2
