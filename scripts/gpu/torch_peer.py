#!/usr/bin/env python3
"""The model of an sdmoe config written in plain PyTorch, for training throughput side by
side with `sdmoe_bench` on the same GPU: what a user would get by picking PyTorch instead.

It follows the C++ model (model/gpt.cc, model/attention.cc, model/feed_forward.cc,
model/model_spec.cc) and launcher/config.proto:
  - token embedding (no position embedding), `layers` pre-norm blocks
    x + attn(rmsnorm(x)), then x + ffn(rmsnorm(x)), a final RMSNorm and the output
    projection, tied to the embedding when tie_embeddings is set; no biases anywhere;
  - RMSNorm y = x / sqrt(mean(x^2) + eps) * w, with w initialised to 1;
  - attention: one [3D, D] qkv matrix (q rows, then k, then v), RoPE on q and k rotating
    the pairs (i, i + Dh/2) by position * theta^(-2i/Dh), causal softmax(q k^T / sqrt(Dh)),
    an output projection [D, D];
  - SwiGLU MLPs: one [2F, D] matrix (gate rows, then up rows), silu(gate) * up, a [D, F]
    down projection;
  - MoE layers where model.moe says (layer l is MoE when num_experts > 0,
    l >= first_dense_layers and (l - first_dense_layers) % layer_freq == 0): a router
    [E, D], SOFTMAX or SIGMOID scores, the top-k by score, their weights renormalised to
    sum to 1 when normalize_topk, an optional always-on shared expert; dropless (no
    capacity factor, no token dropped), rows sorted by expert with a stable sort and run
    as one grouped GEMM per matrix, so only the k chosen experts' FLOPs are done; the
    Switch load-balancing loss E * sum_e f_e P_e and the router z-loss mean(lse^2) are
    added to the cross-entropy, as ours are;
  - initialisation N(0, init_std), the output projections of each block (attention proj,
    MLP and expert down) N(0, init_std / sqrt(2 layers));
  - AdamW with the config's lr, betas, eps and weight decay (matrices decay; embedding and
    norms do not), the global gradient norm clipped to grad_clip.
BF16 is autocast to bf16 with fp32 master weights, gradients and optimizer state, as the
BF16 precision of sdmoe keeps them. Attention is F.scaled_dot_product_attention with
is_causal=True (FlashAttention on Hopper).

One step is what sdmoe_bench times: one micro-batch of micro_batch_size x seq_len tokens,
forward, backward, gradient clipping and the AdamW update, on the same random tokens every
step (throughput only; the loss means nothing). Model FLOPs are counted as sdmoe counts
them (ModelSpec::train_flops_per_token in model/model_spec.cc):
    6 x active matmul parameters + 12 x layers x seq_len x dim   per token,
where the active matmul parameters are the output projection (V x D; the embedding lookup
is no matmul) and per layer 4 D^2 (qkv, proj) plus either 3 D F (dense MLP) or
D E (router) + k x 3 D Fe (the chosen experts) + 3 D Fs (shared expert). The second term
is attention's scores and context, forward and backward, without the causal half.

Prints, for each arm measured (with --compile an eager one first, then the compiled one):
  torch_peer: <arm> tokens/s <x> model TFLOP/s <y> params <p> active <a>
with p all parameters (a tied embedding once) and a those one token uses (p less the
experts it is not routed to).
"""
import argparse
import math
import os
import re
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---- configuration: the textproto over config.proto's defaults ---------------------------

def proto_defaults(proto_text, message):
    """{field: (type, default)} of a message of config.proto, for fields with a default."""
    start = re.search(r"\bmessage %s \{" % message, proto_text)
    if not start:
        raise SystemExit("torch_peer: message %s not in config.proto" % message)
    depth, i = 0, start.end() - 1
    while True:
        depth += {"{": 1, "}": -1}.get(proto_text[i], 0)
        if depth == 0:
            break
        i += 1
    body = proto_text[start.end():i]
    fields = {}
    for m in re.finditer(r"optional (\w+) (\w+) = \d+ \[default = ([^,\]]+)", body):
        fields[m.group(2)] = (m.group(1), m.group(3).strip())
    return fields


def parse_textproto(text):
    """Nested dicts of a protobuf text file (scalars as strings; enough for configs/)."""
    tokens = [t for t in re.findall(r'"(?:[^"\\]|\\.)*"|#[^\n]*|[{}:]|[^\s{}:#]+', text) if not t.startswith("#")]
    pos = 0

    def block():
        nonlocal pos
        out = {}
        while pos < len(tokens) and tokens[pos] != "}":
            name = tokens[pos]
            pos += 1
            if tokens[pos] == ":":
                pos += 1
            if tokens[pos] == "{":
                pos += 1
                out[name] = block()
                pos += 1  # "}"
            else:
                out[name] = tokens[pos].strip('"')
                pos += 1
        return out

    return block()


class Config:
    """Typed access to model, moe, optimizer and training fields, defaults from config.proto."""

    MESSAGES = {"model": "Model", "model.moe": "Moe", "optimizer": "Optimizer", "training": "Training"}

    def __init__(self, path, overrides):
        with open(os.path.join(REPO, "launcher", "config.proto")) as f:
            proto = f.read()
        self.defaults = {prefix: proto_defaults(proto, msg) for prefix, msg in self.MESSAGES.items()}
        with open(path) as f:
            self.values = parse_textproto(f.read())
        for item in overrides:
            key, _, value = item.partition("=")
            *parents, leaf = key.split(".")
            node = self.values
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value

    def get(self, key):
        prefix, _, field = key.rpartition(".")
        kind, default = self.defaults[prefix][field]
        node = self.values
        for p in prefix.split("."):
            node = node.get(p, {})
        raw = node.get(field, default)
        if kind in ("int32", "int64", "uint32", "uint64"):
            return int(raw)
        if kind in ("double", "float"):
            return float(raw)
        if kind == "bool":
            return str(raw).lower() == "true"
        return str(raw)


# ---- model ---------------------------------------------------------------------------------

def rms_norm(x, weight, eps):
    if hasattr(F, "rms_norm"):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight).to(x.dtype)


def causal_attention(q, k, v):
    if hasattr(F, "scaled_dot_product_attention"):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    s = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    mask = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(mask, float("-inf")).softmax(-1) @ v


class Rope(nn.Module):
    def __init__(self, seq_len, head_dim, theta):
        super().__init__()
        half = head_dim // 2
        inv = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / head_dim)
        angle = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv[None, :]
        self.register_buffer("cos", angle.cos().float(), persistent=False)
        self.register_buffer("sin", angle.sin().float(), persistent=False)

    def forward(self, x):  # [B, H, S, Dh]
        half = x.shape[-1] // 2
        c, s = self.cos.to(x.dtype), self.sin.to(x.dtype)
        a, b = x[..., :half], x[..., half:]
        return torch.cat([a * c - b * s, a * s + b * c], dim=-1)


class Attention(nn.Module):
    def __init__(self, spec, rope):
        super().__init__()
        d = spec["dim"]
        self.heads = spec["heads"]
        self.norm = nn.Parameter(torch.ones(d))
        self.qkv = nn.Parameter(torch.randn(3 * d, d) * spec["init_std"])
        self.proj = nn.Parameter(torch.randn(d, d) * spec["out_std"])
        self.eps = spec["norm_eps"]
        self.rope = rope

    def forward(self, x):
        b, s, d = x.shape
        qkv = F.linear(rms_norm(x, self.norm, self.eps), self.qkv).view(b, s, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, S, Dh] each
        o = causal_attention(self.rope(q), self.rope(k), v)
        return x + F.linear(o.transpose(1, 2).reshape(b, s, d), self.proj)


class SwigluMlp(nn.Module):
    def __init__(self, d, f, std, out_std):
        super().__init__()
        self.gate_up = nn.Parameter(torch.randn(2 * f, d) * std)
        self.down = nn.Parameter(torch.randn(d, f) * out_std)

    def forward(self, h):
        gate, up = F.linear(h, self.gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down)


# Runs a function eagerly under torch.compile (a no-op where torch has no compiler).
eager = getattr(getattr(torch, "compiler", None), "disable", lambda f: f)


def grouped_mm_op():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class Experts(nn.Module):
    """E SwiGLU experts over rows sorted by expert: one grouped GEMM per matrix where the
    build has one for the dtype (bf16 on Hopper), else one GEMM per expert."""

    def __init__(self, e, d, f, std, out_std, grouped):
        super().__init__()
        self.gate_up = nn.Parameter(torch.randn(e, 2 * f, d) * std)  # [E, 2Fe, D] as sdmoe's
        self.down = nn.Parameter(torch.randn(e, d, f) * out_std)  # [E, D, Fe]
        self.grouped = grouped

    def forward(self, x, counts):
        if self.grouped:
            mm = grouped_mm_op()
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            dt = torch.bfloat16
            gate, up = mm(x.to(dt), self.gate_up.to(dt).transpose(-2, -1), offs=offs).chunk(2, dim=-1)
            return mm(F.silu(gate) * up, self.down.to(dt).transpose(-2, -1), offs=offs)
        return self.per_expert(x, counts)

    @eager
    def per_expert(self, x, counts):
        # The row counts go to the host, as sdmoe's routing plan does.
        outs = []
        for e, rows in enumerate(x.split(counts.tolist())):
            gate, up = F.linear(rows, self.gate_up[e]).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(gate) * up, self.down[e]))
        return torch.cat(outs)


class MoeFeedForward(nn.Module):
    def __init__(self, spec, grouped):
        super().__init__()
        m, d = spec["moe"], spec["dim"]
        self.e, self.k = m["num_experts"], m["top_k"]
        self.sigmoid = m["router_score"] == "SIGMOID"
        self.normalize = m["normalize_topk"]
        self.aux_coef, self.z_coef = m["aux_loss_coef"], m["z_loss_coef"]
        self.router = nn.Parameter(torch.randn(self.e, d) * spec["init_std"])
        self.experts = Experts(self.e, d, m["expert_ffn_dim"], spec["init_std"], spec["out_std"], grouped)
        fs = m["shared_expert_ffn_dim"]
        self.shared = SwigluMlp(d, fs, spec["init_std"], spec["out_std"]) if fs > 0 else None

    def forward(self, h):
        b, s, d = h.shape
        t = b * s
        x = h.reshape(t, d)
        logits = F.linear(x, self.router).float()  # [T, E]
        lse = torch.logsumexp(logits, dim=-1)
        if self.sigmoid:
            scores = torch.sigmoid(logits)
            probs = scores / scores.sum(-1, keepdim=True)
        else:
            scores = probs = torch.softmax(logits, dim=-1)
        weight, index = torch.topk(scores, self.k, dim=-1)  # [T, K]
        if self.normalize:
            weight = weight / weight.sum(-1, keepdim=True)
        flat = index.reshape(-1)
        order = torch.sort(flat, stable=True).indices  # rows by expert, token order within
        # Counted by a scatter rather than bincount, whose output size depends on the data.
        counts = torch.zeros(self.e, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
        y_sorted = self.experts(x[order // self.k], counts)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        y = (y_sorted[inverse].view(t, self.k, d).float() * weight.unsqueeze(-1)).sum(1)
        if self.shared is not None:
            y = y + self.shared(x)
        share = counts.float() / float(t * self.k)
        aux = self.aux_coef * self.e * (share * probs.mean(0)).sum()
        z = self.z_coef * lse.pow(2).mean()
        return y.view(b, s, d), aux + z


class Block(nn.Module):
    def __init__(self, spec, rope, moe, grouped):
        super().__init__()
        self.attention = Attention(spec, rope)
        self.ffn_norm = nn.Parameter(torch.ones(spec["dim"]))
        self.eps = spec["norm_eps"]
        if moe:
            self.moe, self.mlp = MoeFeedForward(spec, grouped), None
        else:
            self.moe, self.mlp = None, SwigluMlp(spec["dim"], spec["ffn_dim"], spec["init_std"], spec["out_std"])

    def forward(self, x):
        x = self.attention(x)
        h = rms_norm(x, self.ffn_norm, self.eps)
        if self.moe is None:
            return x + self.mlp(h), x.new_zeros((), dtype=torch.float32)
        y, aux = self.moe(h)
        return x + y, aux


class Head(nn.Module):
    """Final norm, output projection and cross-entropy (mean over tokens)."""

    def __init__(self, spec, embedding):
        super().__init__()
        self.norm = nn.Parameter(torch.ones(spec["dim"]))
        self.eps = spec["norm_eps"]
        self.tied = embedding
        self.output = None if embedding is not None else nn.Parameter(
            torch.randn(spec["vocab_size"], spec["dim"]) * spec["init_std"])

    def forward(self, x, targets):
        w = self.tied.weight if self.tied is not None else self.output
        logits = F.linear(rms_norm(x, self.norm, self.eps), w)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


class Gpt(nn.Module):
    def __init__(self, spec, grouped):
        super().__init__()
        self.embedding = nn.Embedding(spec["vocab_size"], spec["dim"])
        nn.init.normal_(self.embedding.weight, std=spec["init_std"])
        rope = Rope(spec["seq_len"], spec["dim"] // spec["heads"], spec["rope_theta"])
        self.blocks = nn.ModuleList(Block(spec, rope, is_moe_layer(spec, l), grouped) for l in range(spec["layers"]))
        self.head = Head(spec, self.embedding if spec["tie_embeddings"] else None)
        # What forward calls: the modules, or their compiled wrappers (a plain dict, so
        # that the wrappers do not register as submodules).
        self.run = {"blocks": list(self.blocks), "head": self.head}

    def compile_parts(self):
        # Block by block: blocks of one kind share the compiled code, which compiles much
        # faster than one graph of the whole model. Allow a recompilation per block in
        # case this torch guards on the module itself.
        for limit in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, limit):
                setattr(torch._dynamo.config, limit, max(64, getattr(torch._dynamo.config, limit)))
        self.run = {"blocks": [torch.compile(b) for b in self.blocks], "head": torch.compile(self.head)}

    def forward(self, tokens):
        x = self.embedding(tokens[:, :-1])
        aux = 0.0
        for block in self.run["blocks"]:
            x, a = block(x)
            aux = aux + a
        return self.run["head"](x, tokens[:, 1:]) + aux


def is_moe_layer(spec, layer):
    m = spec["moe"]
    return (m["num_experts"] > 0 and m["layer_freq"] > 0 and layer >= m["first_dense_layers"]
            and (layer - m["first_dense_layers"]) % m["layer_freq"] == 0)


def model_spec(cfg, dense):
    spec = {f: cfg.get("model." + f) for f in
            ("vocab_size", "seq_len", "dim", "layers", "heads", "ffn_dim", "tie_embeddings", "rope_theta",
             "norm_eps", "init_std")}
    spec["moe"] = {f: cfg.get("model.moe." + f) for f in
                   ("num_experts", "top_k", "expert_ffn_dim", "router_score", "normalize_topk", "aux_loss_coef",
                    "z_loss_coef", "shared_expert_ffn_dim", "first_dense_layers", "layer_freq")}
    if dense:
        spec["moe"]["num_experts"] = 0
    spec["out_std"] = spec["init_std"] / math.sqrt(2.0 * spec["layers"])
    return spec


def active_matmul_params(spec):
    """ModelSpec::active_matmul_params (model/model_spec.cc)."""
    d, m = spec["dim"], spec["moe"]
    total = spec["vocab_size"] * d
    for layer in range(spec["layers"]):
        total += 4 * d * d
        if is_moe_layer(spec, layer):
            total += d * m["num_experts"] + m["top_k"] * 3 * d * m["expert_ffn_dim"] + 3 * d * m["shared_expert_ffn_dim"]
        else:
            total += 3 * d * spec["ffn_dim"]
    return total


def train_flops_per_token(spec):
    """ModelSpec::train_flops_per_token (model/model_spec.cc)."""
    return 6.0 * active_matmul_params(spec) + 12.0 * spec["layers"] * spec["seq_len"] * spec["dim"]


def parameter_counts(model, spec):
    total = sum(p.numel() for p in model.parameters())
    m = spec["moe"]
    idle = sum((m["num_experts"] - m["top_k"]) * 3 * spec["dim"] * m["expert_ffn_dim"]
               for layer in range(spec["layers"]) if is_moe_layer(spec, layer))
    return total, total - idle


def grouped_mm_works(device):
    """The grouped GEMM against per-expert GEMMs, forward and backward, on uneven groups
    (an empty one too); False where the op is missing or refuses this GPU or dtype."""
    mm = grouped_mm_op()
    if mm is None or device.type != "cuda":
        return False
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        counts = torch.tensor([5, 0, 37, 1, 19], device=device)
        x = torch.randn(int(counts.sum()), 64, generator=g).to(device, torch.bfloat16).requires_grad_()
        w = torch.randn(5, 48, 64, generator=g).to(device, torch.bfloat16).requires_grad_()
        y = mm(x, w.transpose(-2, -1), offs=torch.cumsum(counts, 0, dtype=torch.int32))
        y.float().square().sum().backward()
        dx, dw = x.grad.clone(), w.grad.clone()
        x.grad = w.grad = None
        ref = torch.cat([r @ w[e].t() for e, r in enumerate(x.split(counts.tolist()))])
        ref.float().square().sum().backward()
        close = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item() < 2e-2
        return close(y, ref) and close(dx, x.grad) and close(dw, w.grad)
    except Exception as err:  # noqa: BLE001 - any refusal means "use the per-expert path"
        print("torch_peer: grouped GEMM unusable here (%s); one GEMM per expert" % str(err).splitlines()[0])
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "gpt2-124m-moe.textproto"))
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a config field, as sdmoe_pretrain's --set (model.*, optimizer.*, training.*)")
    ap.add_argument("--dense", action="store_true", help="num_experts = 0: a dense MLP in every layer")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (the median is reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, autotuning)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile each block and the head (default: on CUDA)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                    help="bf16: autocast with fp32 master weights (sdmoe's BF16); fp32: everything fp32")
    ap.add_argument("--grouped-mm", choices=["auto", "on", "off"], default="auto",
                    help="experts as one grouped GEMM (bf16 only) or one GEMM per expert")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps must be at least 1")

    cfg = Config(args.config, args.set)
    spec = model_spec(cfg, args.dense)
    batch = cfg.get("training.micro_batch_size")
    device = torch.device(args.device)
    bf16 = args.dtype == "bf16"
    compiled = args.compile if args.compile is not None else device.type == "cuda"
    if compiled and not hasattr(torch, "compile"):
        print("torch_peer: this torch has no torch.compile; eager")
        compiled = False
    grouped = bf16 and spec["moe"]["num_experts"] > 0 and (
        args.grouped_mm == "on" or (args.grouped_mm == "auto" and grouped_mm_works(device)))

    torch.manual_seed(1)
    model = Gpt(spec, grouped).to(device)
    params, active = parameter_counts(model, spec)
    # Decay on matrices, not on the embedding (tied: the output projection too) or the
    # norms, as sdmoe's ParamRole::weight_decay.
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("embedding")]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or n.startswith("embedding")]
    opt_kwargs = dict(lr=cfg.get("optimizer.lr"), betas=(cfg.get("optimizer.beta1"), cfg.get("optimizer.beta2")),
                      eps=cfg.get("optimizer.eps"))
    if device.type == "cuda":
        opt_kwargs["fused"] = True
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.get("optimizer.weight_decay")},
                             {"params": no_decay, "weight_decay": 0.0}], **opt_kwargs)
    clip = cfg.get("optimizer.grad_clip")

    g = torch.Generator(device="cpu").manual_seed(7)
    tokens = torch.randint(0, spec["vocab_size"], (batch, spec["seq_len"] + 1), generator=g).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(tokens)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        return loss

    def measure(arm, warmup, steps):
        """Warm-up steps, then the median of `steps` synchronised steps; prints the result."""
        start = time.perf_counter()
        for _ in range(max(1, warmup)):
            loss = step()
        sync()
        print("torch_peer: %s: %d warm-up steps (compilation included) %.1f s, loss %.3f" % (
            arm, max(1, warmup), time.perf_counter() - start, loss.item()), flush=True)
        seconds = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            sync()
            seconds.append(time.perf_counter() - t0)
        sec = statistics.median(seconds)
        tps = batch * spec["seq_len"] / sec
        flops = tps * train_flops_per_token(spec)
        if device.type == "cuda":
            print("torch_peer: %s: median step %.4f s (min %.4f, max %.4f), peak memory %.1f GiB" % (
                arm, sec, min(seconds), max(seconds), torch.cuda.max_memory_allocated(device) / 2**30))
        print("torch_peer: %s tokens/s %.0f model TFLOP/s %.2f params %d active %d" % (
            arm, tps, flops / 1e12, params, active), flush=True)

    arm = "%s-%s" % ("dense" if spec["moe"]["num_experts"] == 0 else "moe", args.dtype)
    experts = ("experts as grouped GEMMs" if grouped else "experts as one GEMM each") if spec["moe"]["num_experts"] \
        else "no experts"
    print("torch_peer: torch %s on %s; micro-batch %d x %d tokens; %s" % (
        torch.__version__, torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU", batch,
        spec["seq_len"], experts), flush=True)
    if not compiled:
        measure(arm, args.warmup, args.steps)
        return 0
    # Eager first, briefly: a figure even if compilation outlasts its time, and the gain
    # compilation brings.
    measure(arm, 2, min(args.steps, 8))
    model.compile_parts()
    try:
        measure(arm + "-compile", args.warmup, args.steps)
    except Exception as err:  # noqa: BLE001 - a compiler failure still leaves the eager figure
        print("torch_peer: torch.compile failed (%s: %s)" % (type(err).__name__, str(err).splitlines()[0]))
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
