#!/usr/bin/env python3
"""PyTorch training baseline for `openvla finetune` speed (issue 16, item 4).

The same network as crates/openvla-train's differentiable OpenVLA, written in plain PyTorch from
a model directory's config.json and safetensors (no timm/transformers/PEFT at run time):
timm-style ViT towers stopping at block len-2 (LayerScale, class/register tokens where the
config has them), the gelu-mlp / fused-gelu-mlp projector, and the Llama decoder (RMSNorm, RoPE,
SwiGLU, causal mask) on [BOS, patches, rest of the prompt]. Logits are computed for the text
positions only (as the Rust trainer does), and the loss is the next-token cross-entropy on the
action tokens and EOS (the last 8 labels), as finetune.py's. Full fine-tuning (every parameter
trained, AdamW) or LoRA on every Linear that is run (all-linear, lm_head included; the
patch-embed convs count as Linears over flattened patches; the modules of the blocks past
len-2, which the Rust trainer adapts but never runs, are left out).

The batch is synthetic with the shapes of the real one (pixel values [B, 3*towers, H, W], token
ids [B, T]); the compute does not depend on the values. Step times exclude the first
--warmup steps.

    # write a random model directory of the from-scratch small-policy shape (issue 15)
    python tools/train/pytorch_train_baseline.py write-small --out bench-models/small-vla \\
        --tokenizer-dir testdata/openvla-tiny/model
    # time training steps
    python tools/train/pytorch_train_baseline.py train --model bench-models/small-vla --batch 32 \\
        --seq-len 29 --steps 12 --threads 2
    # the OFT L1 objective of the Meta-World recipe (chunk 8 x 4 actions, 4-D proprio; the MT10
    # prompts are 18-23 tokens, padded to 23 in a batch: 23 + 1 + 32 + 1 = 57 text tokens)
    python tools/train/pytorch_train_baseline.py train --model runs/metaworld/default/init \\
        --batch 32 --seq-len 57 --head l1 --chunk 8 --action-dim 4 --proprio-dim 4

Run it with the tools venv that has torch 2.2.0 (.venv-torch); never in CI.
"""
import argparse
import json
import math
import os
import shutil
import struct
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# The timm towers the Rust config knows: (embed_dim, depth, heads, mlp_ratio, patch, image,
# class_token, reg_tokens, layer_scale).
KNOWN_TOWERS = {
    "vit_large_patch14_reg4_dinov2": (1024, 24, 16, 4.0, 14, 224, True, 4, True),
    "vit_base_patch14_reg4_dinov2": (768, 12, 12, 4.0, 14, 224, True, 4, True),
    "vit_small_patch14_reg4_dinov2": (384, 12, 6, 4.0, 14, 224, True, 4, True),
    "vit_large_patch14_dinov2": (1024, 24, 16, 4.0, 14, 224, True, 0, True),
    "vit_so400m_patch14_siglip_224": (1152, 27, 16, 3.7362, 14, 224, False, 0, False),
    "vit_so400m_patch14_siglip_384": (1152, 27, 16, 3.7362, 14, 384, False, 0, False),
    "vit_base_patch16_siglip_224": (768, 12, 12, 4.0, 16, 224, False, 0, False),
}
TOWER_PREFIXES = ["vision_backbone.featurizer", "vision_backbone.fused_featurizer"]


def towers_of(cfg):
    overrides = cfg.get("tiny_timm_overrides") or {}
    out = []
    for i, tid in enumerate(cfg["timm_model_ids"]):
        d, depth, heads, ratio, patch, img, cls, reg, ls = KNOWN_TOWERS[tid.split(".")[0]]
        o = overrides.get(tid, {})
        t = dict(
            dim=o.get("embed_dim", d), depth=o.get("depth", depth), heads=o.get("num_heads", heads),
            ratio=o.get("mlp_ratio", ratio), patch=o.get("patch_size", patch),
            image=o.get("img_size", img), cls=o.get("class_token", cls),
            reg=o.get("reg_tokens", reg), ls=ls,
        )
        sizes = cfg.get("image_sizes")
        if sizes and i < len(sizes):
            t["image"] = sizes[i]
        t["hidden"] = int(t["dim"] * t["ratio"])
        t["patches"] = (t["image"] // t["patch"]) ** 2
        out.append(t)
    return out


def text_of(cfg):
    t = cfg.get("text_config", {})
    heads = t.get("num_attention_heads", 32)
    return dict(
        vocab=t.get("vocab_size", 32000), dim=t.get("hidden_size", 4096),
        inter=t.get("intermediate_size", 11008), layers=t.get("num_hidden_layers", 32),
        heads=heads, kv=t.get("num_key_value_heads", heads), eps=t.get("rms_norm_eps", 1e-6),
        theta=t.get("rope_theta", 10000.0),
    )


class LoraLinear(nn.Module):
    """`x W^T + b` with an optional LoRA branch (`alpha / r · B A x`)."""

    def __init__(self, fin, fout, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(fout, fin))
        self.bias = nn.Parameter(torch.zeros(fout)) if bias else None
        self.lora_a = None
        self.lora_b = None
        self.scale = 1.0

    def add_lora(self, r, alpha):
        fout, fin = self.weight.shape
        self.lora_a = nn.Parameter(torch.randn(r, fin) / math.sqrt(fin))
        self.lora_b = nn.Parameter(torch.zeros(fout, r))
        self.scale = alpha / r

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.lora_a is not None:
            y = y + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale
        return y


class Block(nn.Module):
    def __init__(self, t):
        super().__init__()
        d, h = t["dim"], t["hidden"]
        self.heads = t["heads"]
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.qkv = LoraLinear(d, 3 * d, True)
        self.proj = LoraLinear(d, d, True)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.fc1 = LoraLinear(d, h, True)
        self.fc2 = LoraLinear(h, d, True)
        self.ls1 = nn.Parameter(torch.ones(d)) if t["ls"] else None
        self.ls2 = nn.Parameter(torch.ones(d)) if t["ls"] else None

    def forward(self, x):
        b, n, c = x.shape
        hd = c // self.heads
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = torch.softmax((q * hd ** -0.5) @ k.transpose(-1, -2), dim=-1) @ v
        a = self.proj(a.transpose(1, 2).reshape(b, n, c))
        x = x + (a * self.ls1 if self.ls1 is not None else a)
        m = self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return x + (m * self.ls2 if self.ls2 is not None else m)


class Tower(nn.Module):
    def __init__(self, t):
        super().__init__()
        self.t = t
        d, p = t["dim"], t["patch"]
        self.patch = LoraLinear(3 * p * p, d, True)
        self.pos_embed = nn.Parameter(torch.zeros(1, t["patches"], d))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if t["cls"] else None
        self.reg_token = nn.Parameter(torch.zeros(1, t["reg"], d)) if t["reg"] else None
        self.blocks = nn.ModuleList([Block(t) for _ in range(t["depth"] - 1)])

    def forward(self, px):
        b, c, h, w = px.shape
        p = self.t["patch"]
        gh, gw = h // p, w // p
        x = px.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * p * p)
        x = self.patch(x) + self.pos_embed
        prefix = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(b, -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(b, -1, -1))
        np_ = sum(t.shape[1] for t in prefix)
        if prefix:
            x = torch.cat(prefix + [x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return x[:, np_:]


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, hd = c["dim"], c["dim"] // c["heads"]
        self.c = c
        self.input_layernorm = RMSNorm(d, c["eps"])
        self.q_proj = LoraLinear(d, c["heads"] * hd, False)
        self.k_proj = LoraLinear(d, c["kv"] * hd, False)
        self.v_proj = LoraLinear(d, c["kv"] * hd, False)
        self.o_proj = LoraLinear(c["heads"] * hd, d, False)
        self.post_attention_layernorm = RMSNorm(d, c["eps"])
        self.gate_proj = LoraLinear(d, c["inter"], False)
        self.up_proj = LoraLinear(d, c["inter"], False)
        self.down_proj = LoraLinear(c["inter"], d, False)

    def forward(self, x, mask, cos, sin):
        b, s, d = x.shape
        c = self.c
        hd = d // c["heads"]
        n = self.input_layernorm(x)
        q = self.q_proj(n).view(b, s, c["heads"], hd).transpose(1, 2)
        k = self.k_proj(n).view(b, s, c["kv"], hd).transpose(1, 2)
        v = self.v_proj(n).view(b, s, c["kv"], hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = c["heads"] // c["kv"]
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        att = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(hd) + mask, dim=-1)
        x = x + self.o_proj((att @ v).transpose(1, 2).reshape(b, s, d))
        n = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(n)) * self.up_proj(n))


class Vla(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.towers_cfg = towers_of(cfg)
        self.c = text_of(cfg)
        self.towers = nn.ModuleList([Tower(t) for t in self.towers_cfg])
        v = sum(t["dim"] for t in self.towers_cfg)
        d = self.c["dim"]
        if len(self.towers_cfg) == 2:
            dims = [(v, 4 * v), (4 * v, d), (d, d)]
        else:
            dims = [(v, d), (d, d)]
        self.projector = nn.ModuleList([LoraLinear(a, b, True) for a, b in dims])
        self.embed_tokens = nn.Parameter(torch.zeros(self.c["vocab"], d))
        self.layers = nn.ModuleList([Layer(self.c) for _ in range(self.c["layers"])])
        self.norm = RMSNorm(d, self.c["eps"])
        self.lm_head = LoraLinear(d, self.c["vocab"], False)

    def named_tensors(self):
        """(checkpoint name, parameter) for every parameter, in the HF layout."""
        out = []
        for i, (tw, tc) in enumerate(zip(self.towers, self.towers_cfg)):
            pre = TOWER_PREFIXES[i]
            p = tc["patch"]
            out.append((f"{pre}.patch_embed.proj.weight", tw.patch.weight, (tc["dim"], 3, p, p)))
            out.append((f"{pre}.patch_embed.proj.bias", tw.patch.bias, None))
            out.append((f"{pre}.pos_embed", tw.pos_embed, None))
            if tw.cls_token is not None:
                out.append((f"{pre}.cls_token", tw.cls_token, None))
            if tw.reg_token is not None:
                out.append((f"{pre}.reg_token", tw.reg_token, None))
            for j, b in enumerate(tw.blocks):
                bp = f"{pre}.blocks.{j}"
                for n, m in [("norm1", b.norm1), ("norm2", b.norm2)]:
                    out += [(f"{bp}.{n}.weight", m.weight, None), (f"{bp}.{n}.bias", m.bias, None)]
                for n, m in [("attn.qkv", b.qkv), ("attn.proj", b.proj), ("mlp.fc1", b.fc1),
                             ("mlp.fc2", b.fc2)]:
                    out += [(f"{bp}.{n}.weight", m.weight, None), (f"{bp}.{n}.bias", m.bias, None)]
                if b.ls1 is not None:
                    out += [(f"{bp}.ls1.scale_factor", b.ls1, None),
                            (f"{bp}.ls2.scale_factor", b.ls2, None)]
        for i, m in enumerate(self.projector):
            out += [(f"projector.fc{i + 1}.weight", m.weight, None),
                    (f"projector.fc{i + 1}.bias", m.bias, None)]
        out.append(("language_model.model.embed_tokens.weight", self.embed_tokens, None))
        for i, l in enumerate(self.layers):
            lp = f"language_model.model.layers.{i}"
            out.append((f"{lp}.input_layernorm.weight", l.input_layernorm.weight, None))
            out.append((f"{lp}.post_attention_layernorm.weight",
                        l.post_attention_layernorm.weight, None))
            for n in ["q_proj", "k_proj", "v_proj", "o_proj"]:
                out.append((f"{lp}.self_attn.{n}.weight", getattr(l, n).weight, None))
            for n in ["gate_proj", "up_proj", "down_proj"]:
                out.append((f"{lp}.mlp.{n}.weight", getattr(l, n).weight, None))
        out.append(("language_model.model.norm.weight", self.norm.weight, None))
        out.append(("language_model.lm_head.weight", self.lm_head.weight, None))
        return out

    def linears(self):
        """Every Linear that openvla finetune's all-linear adapts (lm_head included, as PEFT 0.11.1
        does on OpenVLA: 169,112 LoRA parameters at r=4 on the tiny fixture)."""
        return [m for m in self.modules() if isinstance(m, LoraLinear)]

    def patch_features(self, pixels):
        """The towers' patch features, concatenated and projected: [B, patches, dim]."""
        feats = [tw(pixels[:, 3 * i:3 * i + 3]) for i, tw in enumerate(self.towers)]
        x = torch.cat(feats, dim=-1) if len(feats) > 1 else feats[0]
        for i, m in enumerate(self.projector):
            x = m(x)
            if i + 1 < len(self.projector):
                x = F.gelu(x)
        return x

    def rope(self, s):
        """The RoPE cos and sin tables of positions 0..s."""
        hd = self.c["dim"] // self.c["heads"]
        inv = 1.0 / (self.c["theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        ang = torch.arange(s, dtype=torch.float32)[:, None] * inv[None]
        ang = torch.cat([ang, ang], dim=-1)
        return ang.cos(), ang.sin()

    def forward(self, pixels, ids, labels):
        x = self.patch_features(pixels)
        text = F.embedding(ids, self.embed_tokens)
        seq = torch.cat([text[:, :1], x, text[:, 1:]], dim=1)
        b, s, _ = seq.shape
        np_ = x.shape[1]
        cos, sin = self.rope(s)
        mask = torch.full((s, s), torch.finfo(torch.float32).min / 2).triu(1)[None, None]
        h = seq
        for l in self.layers:
            h = l(h, mask, cos, sin)
        h = self.norm(h)[:, np_:]
        logits = self.lm_head(h)
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
            ignore_index=-100)


class MLPResNet(nn.Module):
    """OFT's L1 regression head (prismatic/models/action_heads.py): LayerNorm, fc1, ReLU, two
    residual blocks of (LayerNorm, Linear, ReLU), LayerNorm, fc2."""

    def __init__(self, fin, hidden, fout, blocks=2):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(fin)
        self.fc1 = nn.Linear(fin, hidden)
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.ReLU())
            for _ in range(blocks)])
        self.layer_norm2 = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, fout)

    def forward(self, x):
        x = F.relu(self.fc1(self.layer_norm1(x)))
        for b in self.blocks:
            x = x + b(x)
        return self.fc2(self.layer_norm2(x))


class OftL1(nn.Module):
    """The OFT objective of `openvla finetune --head l1 --chunk K --proprio` on a Vla trunk:
    [BOS, patches, proprio token, rest of the prompt, K·D zeroed placeholders, </s>] with
    bidirectional attention, the head on the placeholders' hidden states (shifted by one), the
    L1 loss on the normalized chunk."""

    def __init__(self, vla, chunk, action_dim, proprio_dim):
        super().__init__()
        self.vla, self.k, self.d = vla, chunk, action_dim
        dim = vla.c["dim"]
        self.head = MLPResNet(dim * action_dim, dim, action_dim)
        self.proprio = nn.Sequential(nn.Linear(proprio_dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, pixels, ids, proprio, target):
        v = self.vla
        x = v.patch_features(pixels)
        kd = self.k * self.d
        text = F.embedding(ids, v.embed_tokens)
        keep = torch.ones(ids.shape[1], 1)
        keep[-kd - 1:-1] = 0.0  # the placeholders' embeddings are zeroed
        text = text * keep
        p = self.proprio(proprio)[:, None]
        seq = torch.cat([text[:, :1], x, p, text[:, 1:]], dim=1)
        b, s, _ = seq.shape
        cos, sin = v.rope(s)
        mask = torch.zeros(1, 1, s, s)  # bidirectional
        h = seq
        for layer in v.layers:
            h = layer(h, mask, cos, sin)
        h = v.norm(h)[:, -kd - 2:-2]  # the window from 29871, shifted by one
        pred = self.head(h.reshape(b, self.k, self.d * v.c["dim"]))
        return F.l1_loss(pred, target)


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        raw = np.frombuffer(data[a:b], dtype=np.uint16 if v["dtype"] == "BF16" else np.float32)
        if v["dtype"] == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        out[k] = torch.from_numpy(raw.copy()).reshape(v["shape"])
    return out


def load_model(model_dir):
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    model = Vla(cfg)
    tensors = {}
    for f in sorted(os.listdir(model_dir)):
        if f.endswith(".safetensors"):
            tensors.update(read_safetensors(os.path.join(model_dir, f)))
    with torch.no_grad():
        for name, p, shape in model.named_tensors():
            if name not in tensors and name.endswith("lm_head.weight") and cfg.get(
                    "text_config", {}).get("tie_word_embeddings"):
                name = "language_model.model.embed_tokens.weight"
            t = tensors[name]
            p.copy_(t.reshape(p.shape))
    return model, cfg


def write_small(args):
    """A random model directory of the from-scratch small-policy shape (float32 weights)."""
    cfg = {
        "architectures": ["OpenVLAForActionPrediction"],
        "arch_specifier": "no-align+gelu-mlp",
        "hf_llm_id": "meta-llama/Llama-2-7b-hf",
        "image_resize_strategy": "resize-naive",
        "image_sizes": [args.image],
        "llm_backbone_id": "llama2-7b-pure",
        "llm_max_length": 2048,
        "model_type": "openvla",
        "n_action_bins": 256,
        "output_projector_states": False,
        "pad_to_multiple_of": 64,
        "pad_token_id": 32000,
        "text_config": {
            "hidden_size": args.llm_width, "intermediate_size": args.llm_inter,
            "model_type": "llama", "num_attention_heads": args.llm_heads,
            "num_hidden_layers": args.llm_layers, "num_key_value_heads": args.llm_heads,
            "pad_token_id": 32000, "torch_dtype": "float32", "vocab_size": 32064,
        },
        "timm_model_ids": ["vit_base_patch16_siglip_224"],
        "timm_override_act_layers": [None],
        "tiny_timm_overrides": {"vit_base_patch16_siglip_224": {
            "embed_dim": args.vit_width, "depth": args.vit_depth, "num_heads": args.vit_heads,
            "patch_size": args.patch, "img_size": args.image}},
        "torch_dtype": "float32",
        "transformers_version": "4.40.1",
        "use_fused_vision_backbone": False,
        "vision_backbone_id": "siglip-vit-b16-224px",
    }
    src = args.tokenizer_dir
    src_cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["norm_stats"] = src_cfg.get("norm_stats", {})
    os.makedirs(args.out, exist_ok=True)
    json.dump(cfg, open(os.path.join(args.out, "config.json"), "w"), indent=2)
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json"]:
        if os.path.exists(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), os.path.join(args.out, f))
    s = args.image
    pre = {
        "image_processor_type": "PrismaticImageProcessor", "image_resize_strategy": "resize-naive",
        "input_sizes": [[3, s, s]], "interpolations": ["bicubic"], "means": [[0.5, 0.5, 0.5]],
        "stds": [[0.5, 0.5, 0.5]], "processor_class": "PrismaticProcessor",
        "tvf_crop_params": [{"output_size": [s, s]}], "tvf_do_letterbox": False,
        "tvf_letterbox_fill": None,
        "tvf_normalize_params": [{"inplace": False, "mean": [0.5, 0.5, 0.5],
                                  "std": [0.5, 0.5, 0.5]}],
        "tvf_resize_params": [{"antialias": True, "interpolation": 3, "max_size": None,
                               "size": [s, s]}],
        "use_fused_vision_backbone": False,
    }
    json.dump(pre, open(os.path.join(args.out, "preprocessor_config.json"), "w"), indent=2)
    torch.manual_seed(args.seed)
    model = Vla(cfg)
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name, p, shape in model.named_tensors():
        with torch.no_grad():
            if name.endswith("norm.weight") or "layernorm" in name or name.endswith(
                    ("norm1.weight", "norm2.weight")) or "scale_factor" in name:
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
        t = p.detach().reshape(shape) if shape else p.detach()
        raw = t.contiguous().numpy().astype(np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        blobs.append(raw)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(os.path.join(args.out, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    print(f"wrote {args.out}: {sum(p.numel() for _, p, _ in model.named_tensors())} parameters")


def train(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, cfg = load_model(args.model)
    if args.mode == "lora":
        for p in model.parameters():
            p.requires_grad_(False)
        for m in model.linears():
            m.add_lora(args.lora_rank, args.lora_alpha or min(args.lora_rank, 16))
    towers = model.towers_cfg
    b, t = args.batch, args.seq_len
    img = towers[0]["image"]
    pixels = torch.randn(b, 3 * len(towers), img, img)
    ids = torch.randint(3, 32000, (b, t))
    ids[:, 0] = 1
    if args.head == "l1":
        if args.chunk * args.action_dim + 2 > t:
            raise SystemExit(f"--seq-len {t} cannot hold {args.chunk}x{args.action_dim} "
                             "placeholders, 29871 and </s>")
        model = OftL1(model, args.chunk, args.action_dim, args.proprio_dim)
        proprio = torch.randn(b, args.proprio_dim)
        target = torch.rand(b, args.chunk, args.action_dim) * 2 - 1
        # the trunk's lm_head is not run by the L1 objective: it takes no optimizer step
        model.vla.lm_head.weight.requires_grad_(False)
        step_fn = lambda: model(pixels, ids, proprio, target)  # noqa: E731
    else:
        labels = torch.full((b, t), -100, dtype=torch.long)
        labels[:, -8:] = ids[:, -8:]
        step_fn = lambda: model(pixels, ids, labels)  # noqa: E731
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    times = []
    model.train()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast_bf16)
    for step in range(args.steps):
        t0 = time.perf_counter()
        with autocast:
            loss = step_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        print(f"step {step}: loss {loss.item():.4f} {times[-1]:.3f} s", flush=True)
    steady = times[args.warmup:]
    mean = sum(steady) / len(steady)
    result = {
        "framework": f"pytorch {torch.__version__}", "threads": torch.get_num_threads(),
        "mode": args.mode, "head": args.head, "autocast_bf16": args.autocast_bf16,
        "batch": b, "seq_len": t,
        "trainable_params": sum(p.numel() for p in params),
        "step_s_mean": mean, "step_s_min": min(steady), "samples_per_s": b / mean,
        "steps_timed": len(steady),
    }
    print(json.dumps(result))
    if args.json:
        json.dump(result, open(args.json, "w"), indent=2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write-small", help="write a random small-policy model directory")
    w.add_argument("--out", required=True)
    w.add_argument("--tokenizer-dir", required=True, help="model dir to copy tokenizer files from")
    w.add_argument("--image", type=int, default=128)
    w.add_argument("--patch", type=int, default=16)
    w.add_argument("--vit-width", type=int, default=192)
    w.add_argument("--vit-depth", type=int, default=5)
    w.add_argument("--vit-heads", type=int, default=3)
    w.add_argument("--llm-width", type=int, default=256)
    w.add_argument("--llm-layers", type=int, default=4)
    w.add_argument("--llm-heads", type=int, default=4)
    w.add_argument("--llm-inter", type=int, default=688)
    w.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("train", help="time training steps")
    t.add_argument("--model", required=True)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--seq-len", type=int, required=True,
                   help="text tokens: prompt + action tokens + EOS (256-bin), or prompt + 29871 + "
                   "chunk x action-dim placeholders + </s> (l1)")
    t.add_argument("--head", choices=["bins", "l1"], default="bins",
                   help="bins: the 256-bin next-token loss; l1: the OFT L1 head with proprio")
    t.add_argument("--chunk", type=int, default=8, help="l1: actions per chunk")
    t.add_argument("--action-dim", type=int, default=4, help="l1: action dimension")
    t.add_argument("--proprio-dim", type=int, default=4, help="l1: proprio dimension")
    t.add_argument("--autocast-bf16", action="store_true",
                   help="run forward and backward under torch.autocast(cpu, bfloat16)")
    t.add_argument("--steps", type=int, default=12)
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--mode", choices=["full", "lora"], default="full")
    t.add_argument("--lora-rank", type=int, default=4)
    t.add_argument("--lora-alpha", type=float, default=None)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--json", help="also write the result here")
    args = ap.parse_args()
    {"write-small": write_small, "train": train}[args.cmd](args)


if __name__ == "__main__":
    main()
