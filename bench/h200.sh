#!/usr/bin/env bash
# The GPU runs behind bench/RESULTS.md, one step per argument, on the device host from the
# repo root, after `source .gpu-bundle/gpu-env.sh .gpu-bundle [--mamba]`:
#   OUT=/tmp/out bash bench/h200.sh tests profile extract loops pipeline-long cold-start converters codecs
#     (one H200: GPU 0, 16 cores)
#   OUT=/tmp/out bash bench/h200.sh models decode-types disk scaling   (model variants; 2 GPUs, 32 cores)
# Videos: VIDEOS (default .bench-videos: 10 s h264 loops of the sample videos at 360p/720p and
# the original 640x272 bikes clip, made here by `bash bench/make_videos.sh`); VIDEO_SET=low keeps the sources <= 360p
# (Kinetics-like sizes). CLIPS: clips of the extract step (default 2048; pipeline steps 4096, 2 GPUs
# twice that); BENCH_ARGS: extra bench/extract.py flags (e.g. "--compile-scope layers --actor-concurrency 3").
# Every step logs to $OUT/<step>.log.
set -uo pipefail
OUT=${OUT:-/tmp/h200-out}; VIDEOS=${VIDEOS:-.bench-videos}; WORK=${WORK:-/tmp/tokconv-bench-extract}
mkdir -p "$OUT"
if [[ ${VIDEO_SET:-all} == low ]]; then
  mkdir -p /tmp/bench-videos-low && cp "$VIDEOS"/*_360p.mp4 "$VIDEOS"/bikes_orig.mp4 /tmp/bench-videos-low/
  VIDEOS=/tmp/bench-videos-low
fi
CLIPS=${CLIPS:-2048}; PCLIPS=${PCLIPS:-4096}; read -ra extra <<<"${BENCH_ARGS:-}"
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
# one GPU gets 16 cores (its processes, Ray's workers included, inherit the affinity), so a one-GPU
# figure on the 32-core x2 host is the same per-GPU share as the two-GPU run's
one_gpu=(env CUDA_VISIBLE_DEVICES=0)
command -v taskset >/dev/null && one_gpu=(taskset -c 0-15 "${one_gpu[@]}")

step() {  # step NAME CMD...: run, log, never stop the other steps
  local name=$1; shift
  echo "=== $name: $*" | tee -a "$OUT/steps.log"
  local t0=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1; local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t0))s" | tee -a "$OUT/steps.log"
  tail -n 25 "$OUT/$name.log"
}

for what in "$@"; do case $what in
  tests)
    # every test marked gpu; the bundle needs pytest, pluggy, iniconfig and scikit-video wheels
    step gpu-tests "${one_gpu[@]}" python -m pytest -q -rfEs -p no:cacheprovider -o addopts="" \
      tests -m gpu ;;
  extract)  # the four paths of issue 4 on one GPU (default model settings)
    step extract-1gpu "${one_gpu[@]}" python bench/extract.py --videos "$VIDEOS" --clips "$CLIPS" \
      --clips-per-video 4 --batch-size 32 --cpus 16 --model-batches 32 --keep-store --workdir "$WORK" \
      --out "$OUT/extract-1gpu.json" "${extra[@]}" ;;
  loops)  # the plain loops against the pipeline in one run (issue 19): (4) the project's models,
    # (4o) the loop before 2026-12-02 on OCLIPS clips (default 384), (4s) the stock models
    step loops "${one_gpu[@]}" python bench/extract.py --videos "$VIDEOS" --clips "$CLIPS" \
      --clips-per-video 4 --batch-size 32 --cpus 16 --phases loop,loop-old,stock,pipeline \
      --loop-old-clips "${OCLIPS:-384}" --workdir "$WORK-o" --out "$OUT/loops.json" "${extra[@]}" ;;
  converters)  # issue 18 in one GPU call: the footage store (FOOTAGE: `python bench/footage.py --out
    # build/footage` on the dev host, carried), then in parallel one quality process per element of
    # QPRESETS (comma lists of globs) and of QEXTRA (variants `preset[k=v;k=v]`, several joined by
    # '+' share a process), the sweep (SPRESET, split into SGROUPS processes; SGROUPS=none: no
    # sweep) and torch.compile warm-ups of the CCOMPILE presets or variants (inductor's cache), each
    # under QTIME s; then the cost alone on the GPU, eager and compiled: the floor, every QEXTRA
    # variant, then CEXTRA (presets or variants) and the CPRESETS globs (default all; "": none);
    # CCOST=0: no cost step
    local_store=${CSTORE:-/tmp/tokconv-conv-store}; name=${CSTORE_NAME:-features-v1}
    read -ra qpresets <<<"${QPRESETS:-*}"; read -ra qextra <<<"${QEXTRA:-}"
    read -ra sgroups <<<"${SGROUPS:-0,1,2 3,4,5 6,7}"; cc=${CCOMPILE:-}
    [[ ${sgroups[*]} == none ]] && sgroups=()
    cextra=(); for p in "${qextra[@]}"; do IFS=+ read -ra vs <<<"$p"
      for v in "${vs[@]}"; do cextra+=(--extra "$v"); done; done
    read -ra ce <<<"${CEXTRA:-}"; for v in "${ce[@]}"; do cextra+=(--extra "$v"); done
    qargs=(--store "$local_store" --store-name "$name" --steps "${QSTEPS:-2000}")
    [[ -d $local_store/features/$name ]] || step converters-extract python -m pipeline run \
      "${CJOB:-jobs/full.yaml}" --stages extract models.weights="${CWEIGHTS:-random}" \
      sources.manifest="$(realpath "${FOOTAGE:-build/footage}")/manifest.csv" sources.labels=manifest \
      storage.url="$local_store" decode.clips_per_video=1 models.compile=[] \
      extract.compile_cache=null ${CJOB_ARGS:-}
    pids=(); i=0; rm -f /tmp/conv-[qsw]*
    for p in "${qpresets[@]}" "${qextra[@]}"; do
      if [[ $p == *"["* ]]; then IFS=+ read -ra vs <<<"$p"; sel=(--presets "" --no-floor)
        for v in "${vs[@]}"; do sel+=(--extra "$v"); done
      else sel=(--presets "$p"); fi
      [[ $i -gt 0 && $p != *"["* ]] && sel+=(--no-floor)
      timeout "${QTIME:-330}" python bench/converters.py quality "${qargs[@]}" "${sel[@]}" \
        --out "/tmp/conv-q$i.json" >"/tmp/conv-q$i.log" 2>&1 & pids+=($!); i=$((i + 1))
    done
    for g in "${!sgroups[@]}"; do
      timeout "${QTIME:-330}" python bench/converters.py sweep "${qargs[@]}" --steps "${SSTEPS:-400}" \
        --preset "${SPRESET:-convmix_small}" --settings "${sgroups[$g]}" --out "/tmp/conv-s$g.json" \
        >"/tmp/conv-s$g.log" 2>&1 & pids+=($!)
    done
    if [[ -n $cc ]]; then
      IFS=, read -ra ccs <<<"$cc"
      for c in "${ccs[@]}"; do  # warm-ups: timings thrown away, kernels kept in inductor's cache
        if [[ $c == *"["* ]]; then sel=(--presets "" --extra "$c"); else sel=(--presets "$c"); fi
        timeout "${QTIME:-330}" python bench/converters.py cost "${sel[@]}" --compile "$c" \
          --iters 1 --student-iters 1 --device "${CDEVICE:-cuda}" >"/tmp/conv-w-${#pids[@]}.log" 2>&1 &
        pids+=($!)
      done
    fi
    wait "${pids[@]}"
    { tail -n 4 /tmp/conv-q*.log /tmp/conv-s*.log /tmp/conv-w-*.log
      python bench/converters.py merge quality /tmp/conv-q*.json --out "$OUT/converters-quality.json"
      [[ ${#sgroups[@]} -gt 0 ]] && python bench/converters.py merge sweep /tmp/conv-s*.json \
        --out "$OUT/converters-sweep.json"
    } >"$OUT/converters-train.log" 2>&1; tail -n 40 "$OUT/converters-train.log"
    [[ ${CCOST:-1} == 1 ]] && step converters-cost python bench/converters.py cost --presets "${CPRESETS-*}" "${cextra[@]}" \
      --compile "$cc" --device "${CDEVICE:-cuda}" --iters "${CITERS:-20}" ${CCOST_ARGS:-} \
      --out "$OUT/converters-cost.json" ;;
  codecs)  # issue 15: raw fp16 against the codecs (CODECS, default fp8z,fp8,int8) in one run, on a
    # store extracted from held-out-by-source footage (FOOTAGE: `python bench/footage.py --out
    # build/footage` on the dev host, carried) with the full-size random-weight models
    step codecs "${one_gpu[@]}" python bench/codecs.py jobs/full.yaml models.weights=random \
      storage.url="${CODEC_STORE:-/tmp/tokconv-codecs}" sources.labels=manifest sources.uri="$(realpath "${FOOTAGE:-build/footage}")" \
      sources.manifest="$(realpath "${FOOTAGE:-build/footage}")/manifest.csv" decode.clips_per_video=1 \
      models.compile=[] extract.compile_cache=null extract.shard_clips=64 --extract \
      --codecs "${CODECS:-fp8z,fp8,int8}" --device cuda --reencode-device cuda \
      --train-overrides train.num_workers=1 ${CODEC_TRAIN:-} --out "$OUT/codecs.json" ;;
  scaling)  # same per-GPU resources (16 cores each): 1 GPU vs 2 GPUs, pipeline end to end
    step scaling-2gpu python bench/extract.py --videos "$VIDEOS" --clips $((2 * PCLIPS)) --clips-per-video 4 \
      --batch-size 32 --cpus 32 --num-gpus 2 --phases decode,pipeline --workdir "$WORK-2" \
      --out "$OUT/extract-2gpu.json" "${extra[@]}" ;;
  model-ceiling)  # the model-only ceiling alone under BENCH_ARGS (e.g. --compile-scope layers), GPU 0
    step model-ceiling "${one_gpu[@]}" python bench/extract.py --videos "$VIDEOS" --clips 1024 \
      --batch-size 32 --model-batches 32 --phases models --workdir "$WORK-m" --out "$OUT/model-ceiling.json" "${extra[@]}" ;;
  profile)  # kernel time by category per model, and the models.rewrites one by one (bench/profile_models.py)
    step profile "${one_gpu[@]}" python bench/profile_models.py --out "$OUT/profile.json" ;;
  pipeline-long)  # a sustained run: LCLIPS clips (default 16384), shards deleted once committed (the disk holds ~3000)
    step pipeline-long "${one_gpu[@]}" python bench/extract.py --videos "$VIDEOS" --clips "${LCLIPS:-16384}" \
      --clips-per-video 4 --batch-size 32 --cpus 16 --phases pipeline --discard-shards --workdir "$WORK-l" \
      --out "$OUT/pipeline-long.json" "${extra[@]}" ;;
  cold-start)  # start-up of a fresh worker (empty local inductor cache, as a new pod): the compile cache in
    # storage empty (compiles cold, saves), then loaded by the second run; SCLIPS clips each (default 1024)
    rm -rf "$WORK-c"
    for run in cold loaded; do
      step "cold-start-$run" env TORCHINDUCTOR_CACHE_DIR="$WORK-c/inductor-$run" "${one_gpu[@]}" python bench/extract.py \
        --videos "$VIDEOS" --clips "${SCLIPS:-1024}" --clips-per-video 4 --batch-size 32 --cpus 16 --phases pipeline \
        --compile-cache "$WORK-c/compile-cache" --workdir "$WORK-c" --out "$OUT/cold-start-$run.json" "${extra[@]}"
      grep -h "model actor\] ready" "$OUT/cold-start-$run.log"
    done ;;
  models)  # model-side variants (autocast / bf16 / cached RoPE / SDPA backends / compile), GPU 0
    step models "${one_gpu[@]}" python bench/models.py --videos "$VIDEOS" --batch-size 32 --iters 10 \
      --out "$OUT/models.json" ;;
  decode-types)  # decode-only ceiling per source file (16 processes, 256 clips of each)
    for f in "$VIDEOS"/*.mp4; do
      d="$WORK-d/$(basename "$f" .mp4)"; mkdir -p "$d/src"; ln -sf "$(realpath "$f")" "$d/src/"
      step "decode-$(basename "$f" .mp4)" python bench/extract.py --videos "$d/src" --clips 256 \
        --clips-per-video 4 --cpus 16 --phases decode --workdir "$d/w" --out "$d/w/r.json"
    done 2>&1 | grep -h "decode_only" | tee "$OUT/decode-types.log" ;;
  disk)  # sequential write bandwidth of the store's disk (4 GiB, direct I/O)
    mkdir -p "$WORK"; step disk dd if=/dev/zero of="$WORK/dd.bin" bs=16M count=256 oflag=direct
    rm -f "$WORK/dd.bin" ;;
  pipeline-1gpu)  # a longer pipeline-only run (1 GPU, 16 cores), with Ray Data's per-operator stats
    step pipeline-1gpu "${one_gpu[@]}" python bench/extract.py --videos "$VIDEOS" --clips "$PCLIPS" \
      --clips-per-video 4 --batch-size 32 --cpus 16 --phases pipeline --workdir "$WORK-1" \
      --out "$OUT/pipeline-1gpu.json" "${extra[@]}" ;;
  pipeline-2gpu)  # the same on 2 GPUs, 32 cores, twice the clips
    step pipeline-2gpu python bench/extract.py --videos "$VIDEOS" --clips $((2 * PCLIPS)) --clips-per-video 4 \
      --batch-size 32 --cpus 32 --num-gpus 2 --phases pipeline --workdir "$WORK-2" \
      --out "$OUT/pipeline-2gpu.json" "${extra[@]}" ;;
  clean)  # drop the kept feature stores (a 4096-clip store is 45 GB; the single-GPU host has a 64 GB disk)
    rm -rf "$WORK"/store-* "$WORK"-?/store-* ;;
  *) echo "unknown step $what" >&2; exit 2 ;;
esac; done
