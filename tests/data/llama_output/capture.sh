#!/usr/bin/env bash
# Regenerates the captured llama.cpp output that tests/test_llama_parse.py reads.
# Usage: tests/data/llama_output/capture.sh BIN_DIR SMOLLM2_GGUF CORPUS
# Model-determined figures (PPL, KLD, token text) are bit-reproducible on the CPU;
# timings are not, so the parser tests read those from whatever this run printed.
set -euo pipefail
bin=$1 model=$2 text=$3
out=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$bin/llama-perplexity" --version 2>"$out/version.stderr" >/dev/null || true
"$bin/llama-perplexity" -m "$model" -f "$text" -c 512 -b 512 -t 2 --chunks 2 \
  --kl-divergence-base "$tmp/base.kld" >"$out/perplexity_smollm2.stdout" 2>"$out/perplexity_smollm2.stderr"
"$bin/llama-perplexity" -m "$model" -f "$text" -c 512 -b 512 -t 2 --chunks 2 \
  --kl-divergence-base "$tmp/base.kld" --kl-divergence >"$out/kld_smollm2.stdout" 2>"$out/kld_smollm2.stderr"
"$bin/llama-completion" -m "$model" -p "Hello" -n 16 --temp 0 --seed 1 -no-cnv --ignore-eos \
  --no-display-prompt -t 2 </dev/null >"$out/completion_smollm2.stdout" 2>"$out/completion_smollm2.stderr"
# a file llama.cpp cannot run: SmolLM2's ffn_norm stored as BF16 (ggml aborts in the graph)
"${FQ:-fq}" quantize "$model" "$tmp/bf16-norms.gguf" --format bf16 --real >/dev/null
"$bin/llama-perplexity" -m "$tmp/bf16-norms.gguf" -f "$text" -c 512 -b 512 -t 2 --chunks 1 \
  >/dev/null 2>"$out/unsupported_bf16_norm.stderr" || true
# llama-quantize's plan for SmolLM2's float twin as Q4_K_M (--dry-run: no file written)
"${FQ:-fq}" twin "$model" "$tmp/twin.gguf" >/dev/null
"$bin/llama-quantize" --dry-run "$tmp/twin.gguf" "$tmp/none.gguf" q4_k_m 2 \
  >/dev/null 2>"$out/quantize_dry_run.stderr"
