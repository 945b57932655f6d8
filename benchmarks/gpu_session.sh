#!/usr/bin/env bash
# One entry point for the GPU machine (torch/transformers preinstalled there; trl, datasets, gguf travel as
# wheels in .whl/). Usage: bash benchmarks/gpu_session.sh STEP...   Results go to $OUT (default ./gpu_out).
# Long steps also write their whole output to $OUT/*.log: a call cut off by its time limit still brings that back,
# while the short summary on stdout (a pipe into tail) is lost with it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT" "$HOME/stage" "$HOME/work"
export PYTHONPATH="$HOME/site:$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TOKENIZERS_PARALLELISM=false
GGUF=$HOME/stage/SmolLM2-135M-Instruct.Q4_1.gguf
PY=python3
log() { echo "=== $* ($(date +%T))"; }

for step in "$@"; do case $step in
  setup)  # wheels for what the machine lacks
    [ -d "$HOME/site/trl" ] || $PY -m pip install -q --no-index --no-deps --no-compile --target "$HOME/site" .whl/*.whl
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; $PY -c "import torch, transformers, trl, peft; print(torch.__version__, transformers.__version__, trl.__version__, peft.__version__)" ;;
  stage*)  # copy a chunk of the SmolLM2 GGUF; assemble once all are there
    for d in .stage*/; do [ -d "$d" ] && cp "$d"/part_* "$HOME/stage/"; done
    # only once every part is there (a machine that went cold between the calls has only the later one)
    if [ -f "$HOME/stage/part_00" ] && [ -f "$HOME/stage/part_01" ] && [ ! -f "$GGUF" ]; then cat "$HOME"/stage/part_0* > "$GGUF"; fi
    [ -f "$GGUF" ] && sha256sum "$GGUF" ;;
  tests-fp32)
    log tests fp32; HF_BLOCKDIFF_TEST_DEVICE=cuda HF_BLOCKDIFF_TEST_DTYPE=float32 $PY -m pytest -q -p no:cacheprovider \
      tests/test_conformance.py tests/test_masks.py tests/test_generate.py tests/test_attention.py 2>&1 | tee "$OUT/tests_cuda_fp32.log" | tail -15 ;;  # whole log even if cut short
  tests-engine)  # the engine's CUDA paths (graphs, key windows, split keys, causal prefill) against the reference;
    # all 209 take far longer than one call (38 ran in 170 s): TESTS_K selects (pytest -k)
    log tests engine fp32; HF_BLOCKDIFF_TEST_DEVICE=cuda HF_BLOCKDIFF_TEST_DTYPE=float32 timeout "${TESTS_TIMEOUT:-300}" \
      $PY -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_attention.py ${TESTS_K:+-k "$TESTS_K"} 2>&1 \
      | tee "$OUT/tests_cuda_engine_fp32.log" | tail -15 ;;
  tests-flex)
    log tests flex fp32; HF_BLOCKDIFF_TEST_DEVICE=cuda HF_BLOCKDIFF_TEST_DTYPE=float32 $PY -m pytest -q -p no:cacheprovider --tb=short -x \
      tests/test_conformance.py tests/test_generate.py -k flex_attention 2>&1 | tail -40 | tee "$OUT/tests_cuda_flex_fp32.txt" ;;
  tests-bf16)
    log tests bf16; HF_BLOCKDIFF_TEST_DEVICE=cuda HF_BLOCKDIFF_TEST_DTYPE=bfloat16 $PY -m pytest -q -p no:cacheprovider \
      tests/test_conformance.py -k "perturbation or clean_copy or noisy_blocks or block_size_1" 2>&1 | tail -15 | tee "$OUT/tests_cuda_bf16.txt" ;;
  bench-train)
    log bench train step; $PY benchmarks/bench_train_step.py 2>&1 | grep -v "^{" | tail -20; cp benchmarks/results/train_step.* "$OUT/" ;;
  bench-gen)
    log bench generate smollm2; $PY benchmarks/bench_generate.py --model "$GGUF" --out generate_smollm2 2>&1 | grep -v "^{" | tail -45
    log bench generate 1.5b; $PY benchmarks/bench_generate.py --shape qwen2-1.5b --thresholds 0.0 1.0 --out generate_qwen2-1.5b 2>&1 | grep -v "^{" | tail -25
    cp benchmarks/results/generate_* "$OUT/" ;;
  bench-engine)  # BATCHES, SETTINGS, NAME, REPEATS, EXTRA (e.g. "--dtype float32 --no-hf"), ADAPTER from the environment.
    # HF eager is left out (HF_EAGER=1 keeps it): it is no baseline, and at batch 1 over 40 prompts it alone takes
    # about 2 minutes per repeat.
    log bench engine $NAME; $PY benchmarks/bench_engine.py --model "$GGUF" --adapter "${ADAPTER:-smollm2-bd16}" --batches ${BATCHES:-1 16 64} \
      --settings ${SETTINGS:-1:1.0 16:0.9 16:verify:0 16:verify 8:verify} --contexts --repeats "${REPEATS:-1}" \
      $([ "${HF_EAGER:-0}" = 1 ] || echo --no-hf-eager) ${EXTRA:-} --out "${NAME:-engine_verify}" 2>&1 \
      | tee "$OUT/${NAME:-engine_verify}.log" | grep -v "^{" | tail -40; cp benchmarks/results/"${NAME:-engine_verify}".* "$OUT/" ;;
  bench-grid)  # issue 20: batch x context, HF static vs ours b=1 (valid-prefix keys, then all keys) vs the default
    # decoding, with memory. One process per model and batch (each under GRID_TIMEOUT s), merged into one table per
    # model. MODELS (smollm2 and/or shapes of benchmarks/common.py), BATCHES, CONTEXTS, CONTEXT_SETTINGS, REPEATS,
    # ADAPTER (smollm2's; empty: none), GRID_EXTRA (e.g. --masked-prefill) from the environment
    for m in ${MODELS:-smollm2 qwen2-1.5b}; do
      if [ "$m" = smollm2 ]; then src=(--model "$GGUF"); [ -n "${ADAPTER-smollm2-bd16}" ] && src+=(--adapter "${ADAPTER-smollm2-bd16}")
      else src=(--shape "$m"); fi
      parts=(); batches=${BATCHES:-1 16 64}; name=engine_grid_$m${BATCHES:+_b${BATCHES// /_}}
      for b in $batches; do
        log bench grid $m batch $b; rm -f benchmarks/results/grid_"${m}_b${b}"_contexts.* benchmarks/results/"$name".*
        timeout -k 10 "${GRID_TIMEOUT:-300}" $PY benchmarks/bench_engine.py "${src[@]}" --no-chat --batches "$b" \
          --contexts ${CONTEXTS:-128 1024 4096} --context-settings ${CONTEXT_SETTINGS:-1:1.0 all:1:1.0 default} \
          --repeats "${REPEATS:-3}" ${GRID_EXTRA:-} --out "grid_${m}_b$b" 2>&1 \
          | grep -v "^{\|^|\|^$\|^# \|^Device: \|^Prompts: " | tail -8
        rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || echo "grid $m batch $b: exit $rc (124: past GRID_TIMEOUT; its rows so far are kept)"
        parts+=("grid_${m}_b${b}_contexts")  # in $OUT at once (a call cut short keeps it; --merge it there later)
        cp benchmarks/results/"grid_${m}_b${b}_contexts.json" "$OUT/" 2>/dev/null
      done
      log merge $name; $PY benchmarks/bench_engine.py --merge "${parts[@]}" --out "$name" 2>&1 | grep "^|\|Error"
      [ -f benchmarks/results/"$name".json ] && cp benchmarks/results/"$name".* "$OUT/" \
        && for part in "${parts[@]}"; do rm -f "$OUT/$part.json"; done  # (at most 8 files come back from $OUT)
    done ;;
  bench-attention)  # issue 20: one layer's decode attention by kernel (sdpa over all slots / the valid window, flex)
    log bench attention; timeout "${ATTN_TIMEOUT:-500}" $PY benchmarks/bench_attention.py ${ATTN_ARGS:-} 2>&1 | grep -v "^{" | tail -60
    cp benchmarks/results/attention_kernels.* "$OUT/" ;;
  bench-serve)  # CONCURRENCY from the environment
    log bench serve; timeout 540 $PY benchmarks/bench_serve.py --model "$GGUF" --adapter smollm2-bd16 --concurrency ${CONCURRENCY:-1 8 32} \
      2>&1 | grep -v "^{" | tail -20; cp benchmarks/results/serve_smollm2.* "$OUT/" ;;
  profile-verify)  # where a verifying step's time goes: BATCH, BLOCK, CANDIDATES from the environment
    log profile verify; timeout 300 $PY benchmarks/profile_engine.py --model "$GGUF" --adapter smollm2-bd16 --batch ${BATCH:-16} \
      --block-size ${BLOCK:-4} --candidates ${CANDIDATES:-1} 2>&1 | grep "^|" | tail -30; cp benchmarks/results/profile_engine_* "$OUT/" ;;
  bench-trainer)
    log trainer throughput; $PY benchmarks/bench_trainer.py --source "$GGUF" --data .carry/wiki_train.jsonl 2>&1 | grep -v "^{\|it/s" | tail -12; cp benchmarks/results/trainer_throughput.* "$OUT/" ;;
  multigpu)
    log multigpu; $PY benchmarks/bench_multigpu.py --data .carry/wiki_train.jsonl --work "$HOME/work/multigpu" 2>&1 | grep -v "it/s" | tail -30
    cp benchmarks/results/multigpu.* "$HOME/work/multigpu/multigpu_curves.png" "$HOME/work/multigpu/curves.json" "$OUT/" 2>/dev/null ;;
  proof-targets)  # issue 6: self-distillation targets from the source's own AR decoding
    log proof targets; $PY benchmarks/proof_smollm2.py targets --work "$HOME/work/proof" --source "$GGUF" \
      --prompts .carry/prompts_train.jsonl --max-new-tokens 192 --samples 1 --batch-size 512 2>&1 | grep -v "batch/s\|examples/s" | tail -5
    cp "$HOME/work/proof/targets.json" "$OUT/" ;;
  proof-train)
    log proof train; $PY benchmarks/proof_smollm2.py train --work "$HOME/work/proof" --source "$GGUF" --mode lora \
      --minutes "${PROOF_MINUTES:-7.5}" --max-steps "${PROOF_STEPS:-1500}" --batch-size 32 --block-size 16 --growth-fraction 0.4 \
      --certainty "${PROOF_CERTAINTY:-0.3}" --attn "${PROOF_ATTN:-sdpa}" 2>&1 | grep -v "it/s\|s/it" | tail -25
    cp "$HOME/work/proof/lora/"{adapter_model.safetensors,adapter_config.json,train_info.json,log_history.json} "$OUT/" ;;
  proof-eval)
    log proof evaluate; $PY benchmarks/proof_smollm2.py evaluate --work "$HOME/work/proof" --source "$GGUF" \
      --eval-prompts .carry/prompts_eval.jsonl --wiki .carry/wiki_eval.jsonl --speed --out "$OUT" 2>&1 | grep -v "^{" | tail -40 ;;
  drafter-targets)  # issue 19: the source's greedy continuations of .carry_gpu/drafter_prompts.jsonl.gz (MAX_PROMPTS,
    # FIRST_PROMPT, DECODE_BATCH: rows decoded together, default 256 = 18.7k new tokens/s on the H200)
    log drafter targets; D=$HOME/work/drafter; mkdir -p "$D"; cp .carry_gpu/drafter_prompts.jsonl.gz "$D/" 2>/dev/null
    $PY benchmarks/train_drafter.py targets --source "$GGUF" --prompts "$D/drafter_prompts.jsonl.gz" --out "$D/targets" \
      ${MAX_PROMPTS:+--max-prompts $MAX_PROMPTS} ${FIRST_PROMPT:+--first-prompt $FIRST_PROMPT} \
      ${DECODE_BATCH:+--decode-batch $DECODE_BATCH} 2>&1 | tr '\r' '\n' \
      | tee "$OUT/drafter_targets.log" | grep -v "^$" | tail -6
    cp "$D"/targets/*_"$(printf %06d "${FIRST_PROMPT:-0}")"*.* "$OUT/" ;;  # this chunk; keep them in .carry_gpu/targets/
  drafter-profile)  # issue 19: where a drafter training step's time goes; PAD (batch length multiple, 0: none)
    log drafter profile; timeout 300 $PY benchmarks/train_drafter.py profile --source "$GGUF" --targets .carry_gpu/targets \
      --growth-start 16 --pad-to-multiple-of "${PAD:-64}" --work "$HOME/work/profile" --out "drafter_step_profile_pad${PAD:-64}" \
      2>&1 | tee "$OUT/drafter_profile.log" | grep "^|" | head -14; cp benchmarks/results/drafter_step_profile_pad* "$OUT/" ;;
  bench-trainer-drafter)  # issue 19: trainer rows on the drafter's rows with its noisy-scope adapter; PAD as above,
    # TRAIN_BATCHES (per-device batch sizes), TRAIN_ROWS (bench_trainer row names, one per line), TRAIN_EXTRA (e.g.
    # --no-cudnn-attention), TRAIN_TIMEOUT (s; a run cut short still gets the table of the rows it finished)
    log trainer throughput drafter; rm -f benchmarks/results/trainer_drafter.*  # the tracked copy is not this run's
    rows=${TRAIN_ROWS:-"AR SFTTrainer (sdpa)
AR compiled step (sdpa)
block diffusion (dense sdpa, liger)
block diffusion (dense sdpa, liger, compiled layers)"}
    mapfile -t rows <<< "$rows"
    bench=(benchmarks/bench_trainer.py --source "$GGUF" --targets .carry_gpu/targets --noisy --max-length 1024 --warmup 6
      --steps 8 --pad-to-multiple-of "${PAD:-64}" --batch ${TRAIN_BATCHES:-32} ${TRAIN_EXTRA:-} --out trainer_drafter)
    timeout "${TRAIN_TIMEOUT:-400}" $PY "${bench[@]}" --rows "${rows[@]}" 2>&1 | tee "$OUT/trainer_drafter.log" \
      | grep "^|\|^{"
    [ -f benchmarks/results/trainer_drafter.md ] || $PY "${bench[@]}" --from-log "$OUT/trainer_drafter.log" | grep "^|"
    cp benchmarks/results/trainer_drafter.* "$OUT/" ;;
  drafter-sweep)  # issue 19: drafter recipes side by side on one GPU, each a fresh run of STEPS steps (MINUTES caps it),
    # evaluated at its end (EVAL_AFTER prompts). SWEEP: the recipes' train_drafter.py train arguments, separated by
    # ';'. They share the GPU: three at batch 96 trained at 29.5k tokens/s each (88k together, about one run's
    # 108k alone at batch 128) and took 42 GiB each, so a fourth ran out of memory. So a sweep saves calls and
    # start-ups, not GPU time. Back in $OUT: sweep_<i>.tar.gz per recipe (recipe, eval.json, log, training output,
    # and the adapter where it fits).
    log drafter sweep; S=$HOME/work/sweep; rm -rf "$S"; mkdir -p "$S"
    IFS=';' read -ra recipes <<< "${SWEEP:?SWEEP: recipes separated by ;}"
    for i in "${!recipes[@]}"; do
      mkdir -p "$S/$i"; echo "${recipes[$i]}" > "$S/$i/recipe.txt"
      # shellcheck disable=SC2086  # a recipe is a list of arguments
      $PY benchmarks/train_drafter.py train --source "$GGUF" --targets .carry_gpu/targets --out "$S/$i/out" \
        --work "$S/$i/work" --minutes "${MINUTES:-5}" --total-steps "${STEPS:-200}" --eval-after "${EVAL_AFTER:-16}" \
        ${recipes[$i]} 2>&1 | tr '\r' '\n' | grep -v "it/s\|s/it\|^$" > "$S/$i/train.log" &
    done; wait
    for i in "${!recipes[@]}"; do
      files=(recipe.txt train.log); [ -f "$S/$i/out/eval.json" ] && files+=(out/eval.json out/drafter_log.jsonl)
      [ -d "$S/$i/work/adapter" ] && [ "$(du -sm "$S/$i/work/adapter" | cut -f1)" -lt 15 ] && files+=(work/adapter)
      tar -C "$S/$i" -czf "$OUT/sweep_$i.tar.gz" "${files[@]}"
      echo "recipe $i: ${recipes[$i]}"; tail -n 3 "$S/$i/train.log" | cut -c1-400
    done ;;
  drafter-eval)  # issue 19: acceptance of several adapters in one call (EVAL_ADAPTERS: folders, e.g. a sweep's
    # $HOME/work/sweep/<i>/work/adapter, or shipped names; EVAL_ARGS: more train_drafter.py evaluate arguments)
    i=0; for a in ${EVAL_ADAPTERS:?EVAL_ADAPTERS: adapter folders or shipped names}; do
      log drafter evaluate "$a"; name="eval_${i}_$(basename "$a")"; i=$((i + 1))
      # shellcheck disable=SC2086
      timeout "${EVAL_TIMEOUT:-240}" $PY benchmarks/train_drafter.py evaluate --source "$GGUF" --adapter "$a" \
        --out "$OUT/$name.json" ${EVAL_ARGS:-} 2>&1 | tee "$OUT/$name.log" | grep "^{" | cut -c1-330
      # chain against tree, fp32 (benchmarks/draft_ranks.py), into the same log
      timeout 120 $PY benchmarks/draft_ranks.py --source "$GGUF" --adapter "$a" --num-prompts 16 --new-tokens 96 \
        --sizes 16 32 64 128 256 512 --out "draft_ranks_$name" 2>&1 | grep "^|\|blocks" | tee -a "$OUT/$name.log"
    done ;;
  drafter-stage-state)  # a state is too big to travel with the targets: carry .carry_gpu/state (+ drafter_log.jsonl)
    # in one call, this step keeps it on the machine; drafter-train in the next call resumes from it
    D=$HOME/work/drafter; mkdir -p "$D" && rm -rf "$D/state" && cp -r .carry_gpu/state "$D/state" \
      && cp .carry_gpu/drafter_log.jsonl "$D/" && rm -rf .carry_gpu/state && ls "$D/state" ;;
  drafter-train)  # one piece of the drafter run (MINUTES, TOTAL_STEPS); resumes from .carry_gpu/state if there.
    # Targets: .carry_gpu/targets, else this machine's from drafter-targets. The adapter stays in $HOME/work/drafter.
    log drafter train; D=$HOME/work/drafter; mkdir -p "$D"
    if [ -d .carry_gpu/targets ]; then rm -rf "$D/targets"; cp -r .carry_gpu/targets "$D/targets"; fi
    state=(); [ -f .carry_gpu/state/manifest.json ] && state=(--state .carry_gpu/state --log .carry_gpu/drafter_log.jsonl)
    [ -f "$D/state/manifest.json" ] && [ ${#state[@]} = 0 ] && state=(--state "$D/state" --log "$D/drafter_log.jsonl")
    $PY benchmarks/train_drafter.py train --source "$GGUF" --targets "$D/targets" "${state[@]}" --out "$D/next" \
      --work "$D/work" --minutes "${MINUTES:-6}" --total-steps "${TOTAL_STEPS:-6000}" --eval-after "${EVAL_AFTER:-16}" \
      ${TRAIN_ARGS:-} 2>&1 | tee "$OUT/drafter_train.log" \
      | grep -v "it/s\|s/it" | tail -8
    if [ -f "$D/next/state/manifest.json" ]; then  # a failed piece leaves the last good state in place
      rm -rf "$D/state" && cp -r "$D/next/state" "$D/state" && cp "$D/next/drafter_log.jsonl" "$D/"
      cp "$D/next/eval.json" "$OUT/" 2>/dev/null  # --eval-after's acceptance (also in the log)
      mkdir -p "$OUT/state" && cp "$D"/state/* "$OUT/state/" && cp "$D/drafter_log.jsonl" "$OUT/" && rm -rf "$D/next"
      rm -rf "$D/adapter" && cp -r "$D/work/adapter" "$D/adapter"  # ADAPTER=$D/adapter for bench-engine
    fi ;;
  *) echo "unknown step $step"; exit 2 ;;
esac; done
