#!/usr/bin/env python3
"""An independent reader and forward pass for Hugging Face checkpoints, numpy only.

Written from the published specifications, not from this repository's C++:
  * the safetensors format (huggingface/safetensors README): an 8-byte little-endian
    header length N, N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin,
    end]}, "__metadata__": {str: str}}, then the byte buffer, which the tensors must
    index entirely, without holes or overlaps; sharded checkpoints add
    model.safetensors.index.json {"metadata": {"total_size"}, "weight_map": {name: file}};
  * transformers' LlamaForCausalLM, MixtralForCausalLM and Qwen2MoeForCausalLM (the
    modeling_*.py files): RMSNorm x * rsqrt(mean(x^2) + eps) * w; rotary embedding with
    inv_freq = theta^(-arange(0, Dh, 2) / Dh), cos/sin of cat(freqs, freqs) and
    rotate_half(x) = cat(-x2, x1); causal softmax attention scaled by Dh^-0.5 with
    grouped k/v heads (repeat_kv); SwiGLU down(act(gate(x)) * up(x)); Mixtral's router
    softmax over all experts -> top-k -> always renormalised; Qwen2-MoE's softmax ->
    top-k -> renormalised only if norm_topk_prob, plus shared_expert(x) *
    sigmoid(shared_expert_gate(x)), q/k/v biases (qkv_bias, default true), and the layer
    rule "(i not in mlp_only_layers) and num_experts > 0 and (i + 1) %
    decoder_sparse_step == 0" for sparse layers; a final RMSNorm; lm_head, or the
    embedding when tie_word_embeddings. Keys missing from config.json take transformers'
    defaults for that model type.

All arithmetic is float64. Usage:
  hf_reference.py MODEL_DIR TOKENS_FILE [--seq-len S]
      TOKENS_FILE: raw little-endian int32 rows of S + 1 tokens (S defaults to the
      config's max_position_embeddings); prints `loss X`, the mean next-token
      cross-entropy of predicting row[1:] from row[:-1] over all rows.
  hf_reference.py --describe MODEL_DIR
      reads and checks the directory; prints model_type, class, tensors, files.
  hf_reference.py --self-test
Errors print one line `hf_reference: error: ...` and exit 1.
"""

import json
import math
import os
import struct
import sys
import tempfile

import numpy as np


class ReferenceError(Exception):
    pass


# ---------------------------------------------------------------------------------------
# safetensors

# The dtype strings of the safetensors specification and their little-endian numpy types
# (BF16 has no numpy type; it is widened on read).
DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": None,
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
MAX_HEADER = 100 * 1000 * 1000  # the specification's limit on the JSON header


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ReferenceError("duplicate key %r in JSON" % key)
        out[key] = value
    return out


def read_safetensors(path, dtypes=("F32",)):
    """Returns ({name: numpy array}, metadata dict). Checks the header against the file:
    offsets in range, tensors contiguous and covering the whole buffer, sizes matching
    their shapes, dtypes among `dtypes` (None accepts any)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ReferenceError("%s: cannot read: %s" % (path, e.strerror))
    if len(data) < 8:
        raise ReferenceError("%s: %d bytes, shorter than the 8-byte header length" % (path, len(data)))
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER:
        raise ReferenceError("%s: header length %d exceeds the 100 MB limit" % (path, n))
    if 8 + n > len(data):
        raise ReferenceError("%s: truncated: header of %d bytes, file of %d" % (path, n, len(data)))
    raw = data[8:8 + n]
    if not raw.startswith(b"{"):
        raise ReferenceError("%s: the header does not start with '{'" % path)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise ReferenceError("%s: header is not JSON: %s" % (path, e))
    if not isinstance(header, dict):
        raise ReferenceError("%s: header is not a JSON object" % path)
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in metadata.items()):
        raise ReferenceError("%s: __metadata__ must map strings to strings" % path)
    buf_size = len(data) - 8 - n
    spans = []
    for name, entry in header.items():
        where = "%s: tensor %s" % (path, name)
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ReferenceError("%s: entry must have exactly dtype, shape, data_offsets" % where)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise ReferenceError("%s: unknown dtype %r" % (where, dtype))
        if dtypes is not None and dtype not in dtypes:
            raise ReferenceError("%s: dtype %s, expected %s" % (where, dtype, "/".join(dtypes)))
        if (not isinstance(shape, list) or
                not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise ReferenceError("%s: bad shape %r" % (where, shape))
        if (not isinstance(offsets, list) or len(offsets) != 2 or
                not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise ReferenceError("%s: bad data_offsets %r" % (where, offsets))
        begin, end = offsets
        if not 0 <= begin <= end:
            raise ReferenceError("%s: data_offsets %r out of order" % (where, offsets))
        if end > buf_size:
            raise ReferenceError("%s: truncated: data_offsets end at %d, the buffer holds %d bytes"
                                 % (where, end, buf_size))
        nbytes = int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype]
        if end - begin != nbytes:
            raise ReferenceError("%s: %d bytes for shape %r %s, needs %d" % (where, end - begin, shape, dtype, nbytes))
        spans.append((begin, end, name))
    # Contiguous: sorted by begin, each tensor starts where the previous ended, the first
    # at 0, the last at the end of the buffer (zero-sized tensors may share an offset).
    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin != position:
            raise ReferenceError("%s: tensor %s starts at %d, expected %d (%s)" % (
                path, name, begin, position, "a hole" if begin > position else "overlap"))
        position = end
    if position != buf_size:
        raise ReferenceError("%s: the tensors cover %d of %d buffer bytes" % (path, position, buf_size))
    tensors = {}
    base = 8 + n
    for begin, end, name in spans:
        dtype, shape = header[name]["dtype"], header[name]["shape"]
        count = int(np.prod(shape, dtype=np.int64))
        if dtype == "BF16":
            bits = np.frombuffer(data, dtype="<u2", count=count, offset=base + begin).astype(np.uint32) << 16
            array = bits.view(np.float32)
        else:
            array = np.frombuffer(data, dtype=DTYPES[dtype], count=count, offset=base + begin)
        tensors[name] = array.reshape(shape).copy()
    return tensors, metadata


NUMPY_TO_ST = {np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<f2"): "F16",
               np.dtype("<i8"): "I64", np.dtype("<i4"): "I32", np.dtype("<i2"): "I16", np.dtype("i1"): "I8",
               np.dtype("<u8"): "U64", np.dtype("<u4"): "U32", np.dtype("<u2"): "U16", np.dtype("u1"): "U8",
               np.dtype("?"): "BOOL"}


def write_safetensors(path, tensors, metadata=None):
    """Writes {name: array} in the safetensors layout (header padded with spaces to a
    multiple of 8 bytes, tensors in the given order)."""
    header, chunks, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = dict(metadata)
    for name, array in tensors.items():
        array = np.asarray(array)  # (np.ascontiguousarray would turn a 0-d array into 1-d)
        little = array.dtype.newbyteorder("<")
        dtype = NUMPY_TO_ST[little]
        raw = array.astype(little).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in chunks:
            f.write(raw)


def write_model_dir(directory, config, tensors, shard_bytes=None):
    """config.json and model.safetensors, or shards of at most shard_bytes (a tensor
    larger than that gets a shard of its own) with model.safetensors.index.json."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if shard_bytes is None:
        write_safetensors(os.path.join(directory, "model.safetensors"), tensors, {"format": "pt"})
        return
    shards, current, size = [], {}, 0
    for name, array in tensors.items():
        if current and size + array.nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = array
        size += array.nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = "model-%05d-of-%05d.safetensors" % (i + 1, len(shards))
        write_safetensors(os.path.join(directory, file), shard, {"format": "pt"})
        weight_map.update({name: file for name in shard})
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)


def read_model_dir(directory, dtypes=("F32",)):
    """Returns (config, {name: array}, files) from a directory in the Hugging Face layout:
    model.safetensors, or the shards named by model.safetensors.index.json."""
    config_path = os.path.join(directory, "config.json")
    try:
        with open(config_path) as f:
            config = json.load(f, object_pairs_hook=_no_duplicates)
    except OSError as e:
        raise ReferenceError("%s: cannot read: %s" % (config_path, e.strerror))
    except ValueError as e:
        raise ReferenceError("%s: not JSON: %s" % (config_path, e))
    if not isinstance(config, dict):
        raise ReferenceError("%s: not a JSON object" % config_path)
    single = os.path.join(directory, "model.safetensors")
    index_path = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(single) and os.path.exists(index_path):
        raise ReferenceError("%s: both model.safetensors and model.safetensors.index.json" % directory)
    if os.path.exists(single):
        tensors, _ = read_safetensors(single, dtypes)
        return config, tensors, ["model.safetensors"]
    if not os.path.exists(index_path):
        raise ReferenceError("%s: neither model.safetensors nor model.safetensors.index.json" % directory)
    try:
        with open(index_path) as f:
            index = json.load(f, object_pairs_hook=_no_duplicates)
    except ValueError as e:
        raise ReferenceError("%s: not JSON: %s" % (index_path, e))
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ReferenceError("%s: no weight_map" % index_path)
    total = index.get("metadata", {}).get("total_size") if isinstance(index.get("metadata"), dict) else None
    if not isinstance(total, int) or isinstance(total, bool):
        raise ReferenceError("%s: metadata.total_size missing or not an integer" % index_path)
    files = sorted(set(weight_map.values()))
    tensors = {}
    for file in files:
        if not isinstance(file, str) or os.path.basename(file) != file or not file.endswith(".safetensors"):
            raise ReferenceError("%s: bad shard name %r" % (index_path, file))
        shard, _ = read_safetensors(os.path.join(directory, file), dtypes)
        listed = {name for name, f in weight_map.items() if f == file}
        if set(shard) != listed:
            extra, missing = sorted(set(shard) - listed), sorted(listed - set(shard))
            raise ReferenceError("%s: %s holds %s; the index lists %s there" % (
                index_path, file, ("unlisted " + ", ".join(extra[:3])) if extra else "all it lists",
                ("missing " + ", ".join(missing[:3])) if missing else "nothing more"))
        tensors.update(shard)
    nbytes = sum(a.nbytes for a in tensors.values())
    if total != nbytes:
        raise ReferenceError("%s: total_size %d, the tensors hold %d bytes" % (index_path, total, nbytes))
    return config, tensors, files


# ---------------------------------------------------------------------------------------
# The models

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
# transformers' defaults (configuration_*.py) for the keys the forward pass reads.
DEFAULTS = {
    "llama": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
              "attention_bias": False, "mlp_bias": False, "max_position_embeddings": 2048},
    "mixtral": {"rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": False, "hidden_act": "silu",
                "num_experts_per_tok": 2, "num_local_experts": 8, "sliding_window": None,
                "max_position_embeddings": 4096 * 32},
    "qwen2_moe": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
                  "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": False, "qkv_bias": True,
                  "num_experts_per_tok": 4, "num_experts": 60, "moe_intermediate_size": 1408,
                  "shared_expert_intermediate_size": 5632, "use_sliding_window": False,
                  "max_position_embeddings": 32768},
}


def silu(x):
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softmax(x, axis=-1):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rotary_tables(positions, head_dim, theta):
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    freqs = np.outer(np.asarray(positions, dtype=np.float64), inv_freq)  # [S, Dh/2]
    emb = np.concatenate([freqs, freqs], axis=-1)                         # [S, Dh]
    return np.cos(emb), np.sin(emb)


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x, cos, sin):  # x [..., S, Dh]
    return x * cos + rotate_half(x) * sin


def swiglu(x, gate, up, down, biases=None):
    if biases is None:
        return (silu(x @ gate.T) * (x @ up.T)) @ down.T
    bg, bu, bd = biases
    return (silu(x @ gate.T + bg) * (x @ up.T + bu)) @ down.T + bd


def top_k(p, k):
    """Indices of the k largest entries per row, largest first, ties to the lower index."""
    return np.argsort(-p, axis=-1, kind="stable")[..., :k]


class Model:
    """A causal LM from a config.json dict and {tensor name: array}, in float64."""

    def __init__(self, config, tensors):
        self.model_type = config.get("model_type")
        if self.model_type not in ARCHITECTURES:
            raise ReferenceError("model_type %r is not one of %s" % (self.model_type, ", ".join(ARCHITECTURES)))
        archs = config.get("architectures")
        if archs is not None and archs != [ARCHITECTURES[self.model_type]]:
            raise ReferenceError("architectures %r for model_type %s, expected [%s]" % (
                archs, self.model_type, ARCHITECTURES[self.model_type]))
        c = dict(DEFAULTS[self.model_type])
        c.update({k: v for k, v in config.items() if v is not None or k == "sliding_window"})
        self.c = c
        get = self._get
        self.vocab = get("vocab_size", int)
        self.hidden = get("hidden_size", int)
        self.layers = get("num_hidden_layers", int)
        self.heads = get("num_attention_heads", int)
        self.kv_heads = c.get("num_key_value_heads")
        self.kv_heads = self.heads if self.kv_heads is None else get("num_key_value_heads", int)
        self.head_dim = c.get("head_dim")
        self.head_dim = self.hidden // self.heads if self.head_dim is None else get("head_dim", int)
        if self.heads % self.kv_heads or self.head_dim % 2:
            raise ReferenceError("heads %d, key/value heads %d, head_dim %d" % (self.heads, self.kv_heads, self.head_dim))
        self.eps = float(get("rms_norm_eps", (int, float)))
        self.theta = self._rope_theta()
        self.tied = get("tie_word_embeddings", bool)
        if c.get("hidden_act") != "silu":
            raise ReferenceError("hidden_act %r; only silu is implemented" % c.get("hidden_act"))
        self.sliding_window = None
        if self.model_type == "mixtral" and c.get("sliding_window") is not None:
            self.sliding_window = get("sliding_window", int)
        if self.model_type == "qwen2_moe" and c.get("use_sliding_window"):
            raise ReferenceError("use_sliding_window true is not implemented")
        self.attn_bias = self.model_type == "llama" and get("attention_bias", bool)
        self.qkv_bias = (self.model_type == "qwen2_moe" and get("qkv_bias", bool)) or self.attn_bias
        self.mlp_bias = self.model_type == "llama" and get("mlp_bias", bool)
        if self.model_type == "llama":
            self.intermediate = get("intermediate_size", int)
            self.sparse = [False] * self.layers
        elif self.model_type == "mixtral":
            self.experts = get("num_local_experts", int)
            self.k = get("num_experts_per_tok", int)
            self.expert_width = get("intermediate_size", int)
            self.normalize = True
            self.sparse = [True] * self.layers
        else:
            self.experts = get("num_experts", int)
            self.k = get("num_experts_per_tok", int)
            self.intermediate = get("intermediate_size", int)
            self.expert_width = get("moe_intermediate_size", int)
            self.shared_width = get("shared_expert_intermediate_size", int)
            self.normalize = get("norm_topk_prob", bool)
            step = get("decoder_sparse_step", int)
            mlp_only = c.get("mlp_only_layers")
            if not isinstance(mlp_only, list) or not all(isinstance(i, int) for i in mlp_only):
                raise ReferenceError("config mlp_only_layers %r is not a list of integers" % (mlp_only,))
            self.sparse = [(i not in mlp_only) and self.experts > 0 and (i + 1) % step == 0
                           for i in range(self.layers)]
        if any(self.sparse) and not 0 < self.k <= self.experts:
            raise ReferenceError("num_experts_per_tok %d with %d experts" % (self.k, self.experts))
        self._take(tensors)

    def _get(self, key, types):
        if key not in self.c:
            raise ReferenceError("config.json has no %s" % key)
        value = self.c[key]
        if types is bool:
            ok = isinstance(value, bool)
        else:
            ok = isinstance(value, types) and not isinstance(value, bool)
        if not ok:
            raise ReferenceError("config %s = %r has the wrong type" % (key, value))
        return value

    def _rope_theta(self):
        params = self.c.get("rope_parameters")  # transformers v5
        scaling = self.c.get("rope_scaling")
        for p in (params, scaling):
            if isinstance(p, dict) and p.get("rope_type", p.get("type", "default")) != "default":
                raise ReferenceError("rope type %r is not implemented" % p.get("rope_type", p.get("type")))
        if isinstance(params, dict) and "rope_theta" in params:
            return float(params["rope_theta"])
        return float(self._get("rope_theta", (int, float)))

    def _take(self, tensors):
        """Converts the expected tensors to float64, checking names and shapes; any tensor
        the model does not use is an error."""
        left = dict(tensors)
        H, Dh, D = self.heads, self.head_dim, self.hidden

        def take(name, shape):
            if name not in left:
                raise ReferenceError("missing tensor %s" % name)
            a = left.pop(name)
            if list(a.shape) != list(shape):
                raise ReferenceError("tensor %s has shape %s, expected %s" % (name, list(a.shape), list(shape)))
            return a.astype(np.float64)

        def mlp(prefix, width, names=("gate_proj", "up_proj", "down_proj"), bias=False):
            w = (take("%s.%s.weight" % (prefix, names[0]), [width, D]),
                 take("%s.%s.weight" % (prefix, names[1]), [width, D]),
                 take("%s.%s.weight" % (prefix, names[2]), [D, width]))
            b = None
            if bias:
                b = (take("%s.%s.bias" % (prefix, names[0]), [width]), take("%s.%s.bias" % (prefix, names[1]), [width]),
                     take("%s.%s.bias" % (prefix, names[2]), [D]))
            return w, b

        self.embed = take("model.embed_tokens.weight", [self.vocab, D])
        self.blocks = []
        for i in range(self.layers):
            p = "model.layers.%d." % i
            b = {"in_norm": take(p + "input_layernorm.weight", [D]),
                 "post_norm": take(p + "post_attention_layernorm.weight", [D]),
                 "q": take(p + "self_attn.q_proj.weight", [H * Dh, D]),
                 "k": take(p + "self_attn.k_proj.weight", [self.kv_heads * Dh, D]),
                 "v": take(p + "self_attn.v_proj.weight", [self.kv_heads * Dh, D]),
                 "o": take(p + "self_attn.o_proj.weight", [D, H * Dh])}
            if self.qkv_bias:
                b["bq"] = take(p + "self_attn.q_proj.bias", [H * Dh])
                b["bk"] = take(p + "self_attn.k_proj.bias", [self.kv_heads * Dh])
                b["bv"] = take(p + "self_attn.v_proj.bias", [self.kv_heads * Dh])
            if self.attn_bias:
                b["bo"] = take(p + "self_attn.o_proj.bias", [D])
            if not self.sparse[i]:
                b["mlp"], b["mlp_bias"] = mlp(p + "mlp", self.intermediate, bias=self.mlp_bias)
            elif self.model_type == "mixtral":
                b["router"] = take(p + "block_sparse_moe.gate.weight", [self.experts, D])
                b["experts"] = [mlp(p + "block_sparse_moe.experts.%d" % e, self.expert_width, ("w1", "w3", "w2"))[0]
                                for e in range(self.experts)]
            else:
                b["router"] = take(p + "mlp.gate.weight", [self.experts, D])
                b["experts"] = [mlp(p + "mlp.experts.%d" % e, self.expert_width)[0] for e in range(self.experts)]
                b["shared"] = mlp(p + "mlp.shared_expert", self.shared_width)[0]
                b["shared_gate"] = take(p + "mlp.shared_expert_gate.weight", [1, D])
            self.blocks.append(b)
        self.norm = take("model.norm.weight", [D])
        self.head = self.embed if self.tied else take("lm_head.weight", [self.vocab, D])
        if left:
            names = sorted(left)
            raise ReferenceError("%d tensors the model does not use, e.g. %s" % (len(names), ", ".join(names[:3])))

    # -- forward -------------------------------------------------------------------------
    def attention(self, x, b):  # x [B, S, D] normalised
        B, S, _ = x.shape
        H, KV, Dh = self.heads, self.kv_heads, self.head_dim
        q, k, v = x @ b["q"].T, x @ b["k"].T, x @ b["v"].T
        if self.qkv_bias:
            q, k, v = q + b["bq"], k + b["bk"], v + b["bv"]
        q = q.reshape(B, S, H, Dh).transpose(0, 2, 1, 3)
        k = k.reshape(B, S, KV, Dh).transpose(0, 2, 1, 3)
        v = v.reshape(B, S, KV, Dh).transpose(0, 2, 1, 3)
        cos, sin = rotary_tables(np.arange(S), Dh, self.theta)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k, v = np.repeat(k, H // KV, axis=1), np.repeat(v, H // KV, axis=1)  # repeat_kv
        scores = (q @ k.transpose(0, 1, 3, 2)) * Dh ** -0.5
        i, j = np.arange(S)[:, None], np.arange(S)[None, :]
        allowed = j <= i
        if self.sliding_window is not None:
            allowed &= j > i - self.sliding_window
        probs = softmax(np.where(allowed, scores, -np.inf), axis=-1)
        out = (probs @ v).transpose(0, 2, 1, 3).reshape(B, S, H * Dh) @ b["o"].T
        return out + b["bo"] if self.attn_bias else out

    def moe(self, u, b):  # u [T, D]
        p = softmax(u @ b["router"].T, axis=-1)  # routing weights over all experts
        chosen = top_k(p, self.k)
        w = np.take_along_axis(p, chosen, axis=-1)
        if self.normalize:
            w = w / np.sum(w, axis=-1, keepdims=True)
        out = np.zeros_like(u)
        for e, (gate, up, down) in enumerate(b["experts"]):
            rows, slot = np.nonzero(chosen == e)
            if rows.size:
                out[rows] += w[rows, slot, None] * swiglu(u[rows], gate, up, down)
        if "shared" in b:
            out += sigmoid(u @ b["shared_gate"].T) * swiglu(u, *b["shared"])
        return out

    def hidden_states(self, ids):  # ids [B, S] -> final-normed hidden [B, S, D]
        ids = np.asarray(ids)
        if ids.min() < 0 or ids.max() >= self.vocab:
            raise ReferenceError("token ids outside [0, %d)" % self.vocab)
        x = self.embed[ids]
        for i, b in enumerate(self.blocks):
            x = x + self.attention(rms_norm(x, b["in_norm"], self.eps), b)
            u = rms_norm(x, b["post_norm"], self.eps)
            if self.sparse[i]:
                x = x + self.moe(u.reshape(-1, self.hidden), b).reshape(u.shape)
            else:
                x = x + swiglu(u, *b["mlp"], biases=b["mlp_bias"])
        return rms_norm(x, self.norm, self.eps)

    def logits(self, ids):
        return self.hidden_states(ids) @ self.head.T

    def token_losses(self, rows, chunk=128):
        """rows [N, S + 1] -> cross-entropy of each prediction [N, S]."""
        rows = np.asarray(rows)
        h = self.hidden_states(rows[:, :-1]).reshape(-1, self.hidden)
        targets = rows[:, 1:].reshape(-1)
        out = np.empty(len(targets))
        for s in range(0, len(targets), chunk):
            z = h[s:s + chunk] @ self.head.T
            m = z.max(axis=-1)
            lse = m + np.log(np.sum(np.exp(z - m[:, None]), axis=-1))
            out[s:s + chunk] = lse - z[np.arange(len(z)), targets[s:s + chunk]]
        return out.reshape(rows.shape[0], -1)


def load(directory):
    config, tensors, files = read_model_dir(directory)
    return Model(config, tensors), config, tensors, files


def read_tokens(path, row):
    data = np.fromfile(path, dtype="<i4")
    if data.size == 0 or data.size % row:
        raise ReferenceError("%s: %d int32 values, not a positive multiple of rows of %d" % (path, data.size, row))
    return data.reshape(-1, row).astype(np.int64)


# ---------------------------------------------------------------------------------------
# Self-test


def _random_model(arch, rng, tie=False, **over):
    """A tiny random config and tensors of the given architecture."""
    V, D, L, H, S = 61, 16, 3, 4, 10
    c = {"model_type": arch, "architectures": [ARCHITECTURES[arch]], "vocab_size": V, "hidden_size": D,
         "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": H, "max_position_embeddings": S,
         "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": tie, "hidden_act": "silu",
         "torch_dtype": "float32", "intermediate_size": 24}
    if arch == "mixtral":
        c.update(num_local_experts=4, num_experts_per_tok=2, intermediate_size=12, output_router_logits=False)
    if arch == "qwen2_moe":
        c.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=12, shared_expert_intermediate_size=8,
                 norm_topk_prob=False, mlp_only_layers=[1], decoder_sparse_step=1, output_router_logits=False)
    c.update(over)
    D, H, KV = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    Dh = D // H

    def w(*shape):
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    t = {"model.embed_tokens.weight": w(c["vocab_size"], D)}
    for i in range(c["num_hidden_layers"]):
        p = "model.layers.%d." % i
        t[p + "input_layernorm.weight"] = (1 + w(D)).astype(np.float32)
        t[p + "self_attn.q_proj.weight"] = w(H * Dh, D)
        t[p + "self_attn.k_proj.weight"] = w(KV * Dh, D)
        t[p + "self_attn.v_proj.weight"] = w(KV * Dh, D)
        t[p + "self_attn.o_proj.weight"] = w(D, H * Dh)
        if arch == "qwen2_moe" and c.get("qkv_bias", True):
            t[p + "self_attn.q_proj.bias"] = w(H * Dh)
            t[p + "self_attn.k_proj.bias"] = w(KV * Dh)
            t[p + "self_attn.v_proj.bias"] = w(KV * Dh)
        t[p + "post_attention_layernorm.weight"] = (1 + w(D)).astype(np.float32)
        sparse = (arch == "mixtral" or
                  (arch == "qwen2_moe" and i not in c["mlp_only_layers"] and c["num_experts"] > 0
                   and (i + 1) % c["decoder_sparse_step"] == 0))
        if not sparse:
            F = c["intermediate_size"]
            t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"], t[p + "mlp.down_proj.weight"] = \
                w(F, D), w(F, D), w(D, F)
        elif arch == "mixtral":
            E, F = c["num_local_experts"], c["intermediate_size"]
            t[p + "block_sparse_moe.gate.weight"] = w(E, D)
            for e in range(E):
                q = p + "block_sparse_moe.experts.%d." % e
                t[q + "w1.weight"], t[q + "w2.weight"], t[q + "w3.weight"] = w(F, D), w(D, F), w(F, D)
        else:
            E, F, Fs = c["num_experts"], c["moe_intermediate_size"], c["shared_expert_intermediate_size"]
            t[p + "mlp.gate.weight"] = w(E, D)
            for e in range(E):
                q = p + "mlp.experts.%d." % e
                t[q + "gate_proj.weight"], t[q + "up_proj.weight"], t[q + "down_proj.weight"] = w(F, D), w(F, D), w(D, F)
            q = p + "mlp.shared_expert."
            t[q + "gate_proj.weight"], t[q + "up_proj.weight"], t[q + "down_proj.weight"] = w(Fs, D), w(Fs, D), w(D, Fs)
            t[p + "mlp.shared_expert_gate.weight"] = w(1, D)
    t["model.norm.weight"] = (1 + w(D)).astype(np.float32)
    if not tie:
        t["lm_head.weight"] = w(c["vocab_size"], D)
    return c, t


def _naive_logits(m, ids):
    """The forward of one sequence written as transformers' eager code loops: per head,
    per token, per chosen expert. Slow, and a second implementation to check against."""
    S = len(ids)
    x = np.array([m.embed[t] for t in ids])
    Dh = m.head_dim
    group = m.heads // m.kv_heads
    for li, b in enumerate(m.blocks):
        a = np.array([xr / math.sqrt(np.mean(xr ** 2) + m.eps) * b["in_norm"] for xr in x])
        q, k, v = a @ b["q"].T, a @ b["k"].T, a @ b["v"].T
        if m.qkv_bias:
            q, k, v = q + b["bq"], k + b["bk"], v + b["bv"]
        ctx = np.zeros((S, m.heads * Dh))
        for h in range(m.heads):
            g = h // group
            qh, kh, vh = q[:, h * Dh:(h + 1) * Dh], k[:, g * Dh:(g + 1) * Dh], v[:, g * Dh:(g + 1) * Dh]

            def rope(y, pos):
                out = np.empty(Dh)
                for i in range(Dh // 2):
                    ang = pos * m.theta ** (-2.0 * i / Dh)
                    out[i] = y[i] * math.cos(ang) - y[i + Dh // 2] * math.sin(ang)
                    out[i + Dh // 2] = y[i] * math.sin(ang) + y[i + Dh // 2] * math.cos(ang)
                return out
            qr = [rope(qh[p], p) for p in range(S)]
            kr = [rope(kh[p], p) for p in range(S)]
            for p in range(S):
                keys = [j for j in range(p + 1) if m.sliding_window is None or j > p - m.sliding_window]
                s = np.array([qr[p] @ kr[j] / math.sqrt(Dh) for j in keys])
                e = np.exp(s - s.max())
                ctx[p, h * Dh:(h + 1) * Dh] = sum(e[n] / e.sum() * vh[j] for n, j in enumerate(keys))
        x = x + ctx @ b["o"].T
        u = np.array([xr / math.sqrt(np.mean(xr ** 2) + m.eps) * b["post_norm"] for xr in x])
        out = np.zeros_like(u)
        for p in range(S):
            if not m.sparse[li]:
                gate, up, down = b["mlp"]
                out[p] = (silu(gate @ u[p]) * (up @ u[p])) @ down.T
                continue
            z = b["router"] @ u[p]
            probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            order = sorted(range(m.experts), key=lambda e: (-probs[e], e))[:m.k]
            total = sum(probs[e] for e in order) if m.normalize else 1.0
            for e in order:
                gate, up, down = b["experts"][e]
                out[p] += probs[e] / total * ((silu(gate @ u[p]) * (up @ u[p])) @ down.T)
            if "shared" in b:
                gate, up, down = b["shared"]
                out[p] += sigmoid(b["shared_gate"][0] @ u[p]) * ((silu(gate @ u[p]) * (up @ u[p])) @ down.T)
        x = x + out
    h = np.array([xr / math.sqrt(np.mean(xr ** 2) + m.eps) * m.norm for xr in x])
    return h @ m.head.T


def _expect_error(what, fn, pattern):
    try:
        fn()
    except ReferenceError as e:
        if pattern not in str(e):
            raise AssertionError("%s: error %r does not mention %r" % (what, str(e), pattern))
        return str(e)
    raise AssertionError("%s: no error" % what)


def self_test():
    rng = np.random.default_rng(20240601)
    checks = []

    def ok(text):
        checks.append(text)
        print("  ok  %s" % text)

    with tempfile.TemporaryDirectory() as tmp:
        # (1) safetensors: round trip, bit for bit, single file and sharded, in every dtype
        # the writer knows; then the reader's refusals.
        arrays = {"a.f32": rng.standard_normal((3, 5)).astype(np.float32),
                  "b.f64": rng.standard_normal((7,)),
                  "c.i32": rng.integers(-9, 9, size=(2, 2, 2)).astype(np.int32),
                  "d.empty": np.zeros((0, 4), np.float32),
                  "e.scalar": np.array(1.5, np.float32)}
        path = os.path.join(tmp, "x.safetensors")
        write_safetensors(path, arrays, {"format": "pt"})
        back, meta = read_safetensors(path, dtypes=None)
        assert meta == {"format": "pt"} and set(back) == set(arrays)
        for name, a in arrays.items():
            assert back[name].dtype == a.dtype and back[name].shape == a.shape and back[name].tobytes() == a.tobytes(), name
        (n,) = struct.unpack("<Q", open(path, "rb").read(8))
        assert (8 + n) % 8 == 0
        ok("safetensors round trip of F32/F64/I32, empty and 0-d tensors, bit for bit")
        _expect_error("F64 where F32 is required", lambda: read_safetensors(path), "dtype F64")
        raw = open(path, "rb").read()

        def variant(name, data):
            p = os.path.join(tmp, name)
            with open(p, "wb") as f:
                f.write(data)
            return p

        def with_header(header, body):
            text = json.dumps(header).encode()
            return struct.pack("<Q", len(text)) + text + body

        small = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "v": np.ones(2, np.float32)}
        write_safetensors(os.path.join(tmp, "s.safetensors"), small)
        good = open(os.path.join(tmp, "s.safetensors"), "rb").read()
        (hn,) = struct.unpack("<Q", good[:8])
        body = good[8 + hn:]
        hdr = json.loads(good[8:8 + hn])
        refusals = [
            ("truncated data", good[:-5], "truncated"),
            ("truncated header", good[:20], "truncated"),
            ("shorter than 8 bytes", good[:5], "shorter than"),
            ("trailing bytes", good + b"\0" * 4, "cover"),
            ("hole", with_header(dict(hdr, w=dict(hdr["w"], data_offsets=[0, 24]),
                                      v=dict(hdr["v"], data_offsets=[28, 36])), body + b"\0" * 4), "hole"),
            ("overlap", with_header(dict(hdr, v=dict(hdr["v"], data_offsets=[20, 28])), body[:28]), "overlap"),
            ("size not matching the shape", with_header(dict(hdr, w=dict(hdr["w"], shape=[2, 2])), body), "needs"),
            ("not JSON", struct.pack("<Q", 4) + b"{abc" + body, "not JSON"),
            ("huge header length", struct.pack("<Q", 1 << 40) + good[8:], "exceeds"),
            ("unknown dtype", with_header(dict(hdr, w=dict(hdr["w"], dtype="F31")), body), "unknown dtype"),
        ]
        for what, data, pattern in refusals:
            _expect_error(what, lambda: read_safetensors(variant("bad.safetensors", data)), pattern)
        ok("reader refuses: %s" % ", ".join(r[0] for r in refusals))

        # (2) Each architecture: written (single and sharded), read back bit for bit, built,
        # and checked against the loop implementation and the invariants.
        S = 10
        cases = [("llama", False, {}), ("llama", True, {"num_key_value_heads": 2}),
                 ("mixtral", False, {}), ("mixtral", True, {"sliding_window": 4}),
                 ("qwen2_moe", False, {}), ("qwen2_moe", True, {"norm_topk_prob": True, "decoder_sparse_step": 2,
                                                                "mlp_only_layers": []})]
        for arch, tie, over in cases:
            label = "%s%s%s" % (arch, " tied" if tie else "", "".join(" %s=%s" % kv for kv in over.items()))
            config, tensors = _random_model(arch, rng, tie=tie, **over)
            for sharded in (None, 3000):
                d = os.path.join(tmp, "%s_%s_%s" % (arch, tie, sharded))
                write_model_dir(d, config, tensors, shard_bytes=sharded)
                c2, t2, files = read_model_dir(d)
                assert c2 == config and set(t2) == set(tensors), label
                assert all(t2[k].tobytes() == tensors[k].tobytes() and t2[k].shape == tensors[k].shape for k in tensors)
                assert (len(files) > 1) == (sharded is not None), files
            m = Model(c2, t2)
            ids = rng.integers(0, config["vocab_size"], size=(2, S))
            fast = m.logits(ids)
            for r in range(2):
                slow = _naive_logits(m, ids[r])
                err = np.abs(fast[r] - slow).max()
                assert err < 1e-10, (label, err)
            # Causality: the outputs at positions <= p do not change when later tokens do.
            p = 4
            other = ids.copy()
            other[:, p + 1:] = (other[:, p + 1:] + 7) % config["vocab_size"]
            changed = m.logits(other)
            assert np.abs(changed[:, :p + 1] - fast[:, :p + 1]).max() < 1e-12, label
            assert np.abs(changed[:, p + 1:] - fast[:, p + 1:]).max() > 1e-6, label
            # The loss is the mean of logsumexp - target logit.
            rows = rng.integers(0, config["vocab_size"], size=(3, S + 1))
            lg = m.logits(rows[:, :-1])
            want = np.mean(np.log(np.exp(lg).sum(-1)) - np.take_along_axis(lg, rows[:, 1:, None], -1)[..., 0])
            got = m.token_losses(rows, chunk=7).mean()
            assert abs(got - want) < 1e-12, (label, got, want)
            ok("%s: single file and %d shards read back bit for bit; vectorised forward = loop forward "
               "(max diff %.1e); causal; loss = mean(logsumexp - target)" % (label, len(files), err))
        # The CLI on the last directory (sharded) and a token file.
        tokens = os.path.join(tmp, "tokens.bin")
        rows.astype("<i4").tofile(tokens)
        import io
        import contextlib
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = main([d, tokens])
        line = [x for x in out.getvalue().splitlines() if x.startswith("loss ")]
        assert rc == 0 and line and abs(float(line[0].split()[1]) - got) < 1e-8, out.getvalue()
        ok("CLI: `loss X` from a sharded directory and an int32 token file equals the in-memory loss")

        # (3) Routing invariants. With k = E (and normalisation, or Qwen2-MoE without it,
        # since softmax sums to 1) the MoE equals the dense mixture sum_e softmax_e * f_e.
        for arch, over in (("mixtral", {"num_experts_per_tok": 4}),
                           ("qwen2_moe", {"num_experts_per_tok": 4, "norm_topk_prob": True}),
                           ("qwen2_moe", {"num_experts_per_tok": 4, "norm_topk_prob": False})):
            config, tensors = _random_model(arch, rng, **over)
            m = Model(config, tensors)
            b = next(b for b, s in zip(m.blocks, m.sparse) if s)
            u = rng.standard_normal((9, m.hidden))
            p = softmax(u @ b["router"].T)
            dense = sum(p[:, e:e + 1] * swiglu(u, *f) for e, f in enumerate(b["experts"]))
            if "shared" in b:
                dense = dense + sigmoid(u @ b["shared_gate"].T) * swiglu(u, *b["shared"])
            assert np.abs(m.moe(u, b) - dense).max() < 1e-12, (arch, over)
        ok("top-k with k = num_experts equals the dense softmax mixture (mixtral; qwen2_moe with and "
           "without norm_topk_prob)")
        # Top-1 with normalisation: the output is exactly the argmax expert's; without it,
        # that expert scaled by its probability.
        config, tensors = _random_model("qwen2_moe", rng, num_experts_per_tok=1, norm_topk_prob=True,
                                        shared_expert_intermediate_size=0)
        m = Model(config, tensors)
        b = next(b for b, s in zip(m.blocks, m.sparse) if s)
        u = rng.standard_normal((9, m.hidden))
        p = softmax(u @ b["router"].T)
        best = p.argmax(-1)
        want = np.array([swiglu(u[t:t + 1], *b["experts"][best[t]])[0] for t in range(len(u))])
        assert np.abs(m.moe(u, b) - want).max() < 1e-12
        m.normalize = False
        assert np.abs(m.moe(u, b) - p[np.arange(len(u)), best][:, None] * want).max() < 1e-12
        ok("top-1: the argmax expert alone (normalised), scaled by its probability (not normalised); "
           "a zero-width shared expert adds nothing")
        # Qwen2-MoE with norm_topk_prob, zero q/k/v biases and a shared expert whose down
        # projection is zero computes what Mixtral computes with the same weights; and with
        # every layer in mlp_only_layers, what Llama computes.
        mc, mt = _random_model("mixtral", rng)
        qc = dict(mc, model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], num_experts=4,
                  moe_intermediate_size=12, shared_expert_intermediate_size=5, norm_topk_prob=True,
                  mlp_only_layers=[], decoder_sparse_step=1)
        del qc["num_local_experts"]
        qt = {}
        for name, a in mt.items():
            name = name.replace("block_sparse_moe.gate", "mlp.gate").replace("block_sparse_moe.experts", "mlp.experts")
            qt[name.replace(".w1.", ".gate_proj.").replace(".w3.", ".up_proj.").replace(".w2.", ".down_proj.")] = a
        for i in range(qc["num_hidden_layers"]):
            p = "model.layers.%d." % i
            for x in "qkv":
                qt[p + "self_attn.%s_proj.bias" % x] = np.zeros(qc["hidden_size"], np.float32)
            qt[p + "mlp.shared_expert.gate_proj.weight"] = rng.standard_normal((5, 16)).astype(np.float32)
            qt[p + "mlp.shared_expert.up_proj.weight"] = rng.standard_normal((5, 16)).astype(np.float32)
            qt[p + "mlp.shared_expert.down_proj.weight"] = np.zeros((16, 5), np.float32)
            qt[p + "mlp.shared_expert_gate.weight"] = rng.standard_normal((1, 16)).astype(np.float32)
        ids = rng.integers(0, mc["vocab_size"], size=(2, S))
        assert np.abs(Model(qc, qt).logits(ids) - Model(mc, mt).logits(ids)).max() < 1e-10
        lc, lt = _random_model("llama", rng)
        qc2 = dict(lc, model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], num_experts=4,
                   num_experts_per_tok=2, mlp_only_layers=[0, 1, 2], moe_intermediate_size=3,
                   shared_expert_intermediate_size=3, qkv_bias=False)
        assert np.abs(Model(qc2, lt).logits(ids) - Model(lc, lt).logits(ids)).max() == 0
        ok("qwen2_moe (normalised, zero biases, zero shared down) = mixtral; qwen2_moe with every layer "
           "in mlp_only_layers and qkv_bias false = llama")
        # The shared expert's gate: sigmoid(0) = 1/2, so a zero gate with the down projection
        # doubled adds the shared expert with weight 1.
        config, tensors = _random_model("qwen2_moe", rng)
        m = Model(config, tensors)
        b = next(b for b, s in zip(m.blocks, m.sparse) if s)
        gate, up, down = b["shared"]
        u = rng.standard_normal((5, m.hidden))
        b["shared_gate"] = np.zeros_like(b["shared_gate"])
        base = m.moe(u, b)
        b["shared"] = (gate, up, 2 * down)
        assert np.abs(m.moe(u, b) - base - swiglu(u, gate, up, down) * 0.5).max() < 1e-12
        ok("shared_expert_gate zero and down x 2 adds the shared expert with weight exactly 1")

        # (4) Components. RoPE: scores depend on the relative position only, rotation by
        # position 0 is the identity, norms are kept. RMSNorm is scale invariant.
        cos, sin = rotary_tables(np.arange(40), 8, 10000.0)
        qv, kv = rng.standard_normal(8), rng.standard_normal(8)
        s1 = apply_rotary(qv, cos[5], sin[5]) @ apply_rotary(kv, cos[2], sin[2])
        s2 = apply_rotary(qv, cos[33], sin[33]) @ apply_rotary(kv, cos[30], sin[30])
        assert abs(s1 - s2) < 1e-12 and np.abs(apply_rotary(qv, cos[0], sin[0]) - qv).max() == 0
        assert abs(np.linalg.norm(apply_rotary(qv, cos[17], sin[17])) - np.linalg.norm(qv)) < 1e-12
        # rotate_half pairs i with i + Dh/2 (not 2i with 2i + 1): position 1 of e_0 lands on e_4.
        e0 = np.eye(8)[0]
        r = apply_rotary(e0, cos[1], sin[1])
        assert abs(r[0] - math.cos(1.0)) < 1e-15 and abs(r[4] - math.sin(1.0)) < 1e-15 and r[1] == 0
        xv = rng.standard_normal((3, 8))
        assert np.abs(rms_norm(7.5 * xv, 1.0, 0.0) - rms_norm(xv, 1.0, 0.0)).max() < 1e-12
        ok("rotary: relative, identity at 0, norm-preserving, rotate_half pairing; RMSNorm scale invariant")
        # A model whose head is zero predicts uniformly: loss = ln V exactly.
        config, tensors = _random_model("llama", rng)
        tensors["lm_head.weight"][:] = 0
        m = Model(config, tensors)
        assert abs(m.token_losses(rng.integers(0, 61, size=(2, S + 1))).mean() - math.log(61)) < 1e-12
        # Untied with lm_head = embedding gives the tied model.
        config, tensors = _random_model("llama", rng)
        tied_t = dict(tensors)
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
        del tied_t["lm_head.weight"]
        ids = rng.integers(0, 61, size=(2, S))
        assert np.abs(Model(dict(config, tie_word_embeddings=True), tied_t).logits(ids) -
                      Model(config, tensors).logits(ids)).max() == 0
        ok("zero head gives loss ln V; tied embeddings = untied head equal to the embedding")

        # (5) Model-level refusals.
        config, tensors = _random_model("qwen2_moe", rng)
        t = dict(tensors)
        del t["model.layers.0.self_attn.q_proj.bias"]
        _expect_error("missing bias", lambda: Model(config, t), "missing tensor model.layers.0.self_attn.q_proj.bias")
        t = dict(tensors, extra=np.zeros(1, np.float32))
        _expect_error("unused tensor", lambda: Model(config, t), "does not use")
        t = dict(tensors)
        t["model.norm.weight"] = np.zeros(3, np.float32)
        _expect_error("wrong shape", lambda: Model(config, t), "has shape [3]")
        _expect_error("unknown model_type", lambda: Model(dict(config, model_type="gpt_neox"), tensors), "gpt_neox")
        _expect_error("architectures", lambda: Model(dict(config, architectures=["LlamaForCausalLM"]), tensors),
                      "architectures")
        _expect_error("int field as float", lambda: Model(dict(config, hidden_size=16.0), tensors), "wrong type")
        d = os.path.join(tmp, "idx")
        write_model_dir(d, config, tensors, shard_bytes=2000)
        index_path = os.path.join(d, "model.safetensors.index.json")
        index = json.load(open(index_path))
        json.dump(dict(index, metadata={"total_size": 5}), open(index_path, "w"))
        _expect_error("total_size", lambda: read_model_dir(d), "total_size")
        wm = dict(index["weight_map"])
        wm.pop("model.norm.weight")
        json.dump(dict(index, weight_map=wm), open(index_path, "w"))
        _expect_error("unlisted tensor", lambda: read_model_dir(d), "unlisted")
        ok("refused: a missing q/k/v bias, an unused tensor, a wrong shape, model_type gpt_neox, a wrong "
           "architectures entry, a float where an integer belongs, a wrong total_size, a tensor the index omits")
    print("self-test passed: %d groups of checks" % len(checks))
    return 0


def describe(directory):
    m, config, tensors, files = load(directory)
    print("model_type %s" % m.model_type)
    print("class %s" % ARCHITECTURES[m.model_type])
    print("tensors %d" % len(tensors))
    print("bytes %d" % sum(a.nbytes for a in tensors.values()))
    print("files %s" % " ".join(files))
    print("sparse_layers %s" % ",".join(str(i) for i, s in enumerate(m.sparse) if s))
    return 0


def main(argv):
    try:
        if argv == ["--self-test"]:
            return self_test()
        if len(argv) == 2 and argv[0] == "--describe":
            return describe(argv[1])
        seq_len = None
        if len(argv) == 4 and argv[2] == "--seq-len":
            seq_len = int(argv[3])
            argv = argv[:2]
        if len(argv) != 2 or argv[0].startswith("-"):
            print(__doc__.split("Usage:")[1].split("Errors")[0], file=sys.stderr)
            return 2
        m, config, _, files = load(argv[0])
        if seq_len is None:
            seq_len = m._get("max_position_embeddings", int)
        rows = read_tokens(argv[1], seq_len + 1)
        losses = m.token_losses(rows)
        print("%s (%s), %d rows of %d tokens, %d predictions, from %s" % (
            ARCHITECTURES[m.model_type], m.model_type, rows.shape[0], rows.shape[1], losses.size, " ".join(files)))
        print("loss %.9f" % losses.mean())
        return 0
    except ReferenceError as e:
        print("hf_reference: error: %s" % e)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
