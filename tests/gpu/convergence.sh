#!/usr/bin/env bash
# The convergence comparison (recipes/convergence.py, docs/recipes.md) on a device machine, one or
# more variants per call: the code corpus of this machine's own site-packages is made first
# (python -m falcon_h1.data.code_corpus, into /tmp/code_corpus, kept for the next call while the
# machine stays warm), then `python -m recipes.convergence` trains the variants given.
# Usage (repo root, .whl carried): bash tests/gpu/convergence.sh OUT VARIANT... (hybrid attention mamba)
# OUT receives: corpus.log and corpus.json (made in this call) or corpus_reused.txt, convergence.log,
# VARIANT.tgz for each variant (loss.csv, result.json, loss.png, config.yaml, the run's log) and
# triton_autotune.tgz (carry it in .triton_cache/ to spare the next machine the autotuning).
set -uo pipefail
OUT=$1
shift
CORPUS=/tmp/code_corpus
RUNS=/tmp/convergence
source tests/gpu/env.sh > "$OUT/env.log" 2>&1 || { cat "$OUT/env.log"; exit 1; }
head -2 "$OUT/env.log"
SITE=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -f "$CORPUS/corpus.json" ]; then
  echo "corpus made by an earlier call on this machine: $CORPUS" | tee "$OUT/corpus_reused.txt"
else
  timeout 300 python3 -m falcon_h1.data.code_corpus --root "$SITE" --output "$CORPUS" --workers "$(nproc)" \
    2>&1 | tee "$OUT/corpus.log" || exit 1
  cp "$CORPUS/corpus.json" "$OUT/"
fi
sha256sum "$CORPUS/train.bin" "$CORPUS/validation.bin" | tee -a "$OUT/corpus.log"
NEMORUN_HOME=/tmp/nemorun python3 -m recipes.convergence --corpus "$CORPUS" --dir "$RUNS" --variants "$@" \
  2>&1 | tee "$OUT/convergence.log"
STATUS=${PIPESTATUS[0]}
for variant in "$@"; do
  log=$(find /tmp/nemorun -path "*/$variant/0/combined.log" | tail -1)
  [ -n "$log" ] && cp "$log" "$RUNS/$variant/run.log"
  tar czf "$OUT/$variant.tgz" -C "$RUNS" --exclude=checkpoints --exclude=tensorboard "$variant"
  [ -n "$log" ] && grep -E "^\[default0\]:(step|validation|trained|Falcon|  )" "$log" | tail -8
done
save_triton_cache "$OUT" > /dev/null
exit "$STATUS"
