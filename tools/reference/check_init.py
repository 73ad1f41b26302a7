#!/usr/bin/env python3
"""Compare the initialization of an `openvla init` directory with the reference's own modules at the same shapes.

It builds, with the pinned libraries (tools/reference/requirements.txt):
- each vision tower as a timm 0.9.10 `VisionTransformer` with the sizes in config.json. These are the kwargs
  Prismatic's `timm.create_model` passes, plus the overrides: class token, registers, LayerScale `init_values`,
  `global_pool='map'` for a SigLIP attention pool, and `no_embed_class` for DINOv2;
- the projector as `nn.Linear` layers;
- the LLM as a transformers 4.40.1 `LlamaForCausalLM(LlamaConfig(**text_config))`.

Then it compares every tensor with its counterpart: the same names and shapes, constants equal, and for random
tensors the same law (std within a few standard errors, same bound for uniform laws). The values cannot be equal,
because the random generators differ. The OFT head and projector files are checked by check_pt.py.

    python tools/reference/check_init.py MODEL_DIR

CI never runs it.
"""
import json
import math
import os
import sys

import timm
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

TOWER_PREFIXES = ["vision_backbone.featurizer", "vision_backbone.fused_featurizer"]


def compare(name, ours, ref, failures):
    # Constants are compared after rounding the reference to the stored dtype (bf16 or f32).
    ours, ref = ours.float(), ref.to(ours.dtype).float()
    if tuple(ours.shape) != tuple(ref.shape):
        failures.append(f"{name}: shape {list(ours.shape)} vs reference {list(ref.shape)}")
        return
    if torch.all(ref == ref.flatten()[0]):
        if not torch.all(ours == ref.flatten()[0]):
            failures.append(f"{name}: reference is constant {ref.flatten()[0].item()}, ours is not")
        return
    n = ref.numel()
    so, sr = ours.std().item(), ref.std().item()
    # Standard error of a sample std is about std / sqrt(2n); allow 6 of them (and 2% for bf16 rounding).
    tol = 6 * sr / math.sqrt(2 * n) + 0.02 * sr
    if abs(so - sr) > tol:
        failures.append(f"{name}: std {so:.3e} vs reference {sr:.3e} (n={n})")
    if abs(ours.mean().item()) > 6 * sr / math.sqrt(n) + 1e-3 * sr:
        failures.append(f"{name}: mean {ours.mean().item():.3e} is not ~0 (reference std {sr:.3e})")
    mo, mr = ours.abs().max().item(), ref.abs().max().item()
    # A uniform law (max = sqrt(3) std) has a hard bound: ours must respect it. Normal laws have no such bound.
    if mr < 1.9 * sr and mo > 1.001 * mr * (1 + 1 / math.sqrt(n)):
        failures.append(f"{name}: max |x| {mo:.3e} exceeds the reference's uniform bound {mr:.3e}")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    d = sys.argv[1]
    cfg = json.load(open(os.path.join(d, "config.json")))
    files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    ours = {}
    for f in files:
        ours.update(load_file(os.path.join(d, f)))
    torch.manual_seed(0)
    failures, seen = [], set()

    widths = []
    for i, tid in enumerate(cfg["timm_model_ids"]):
        o = cfg["tiny_timm_overrides"][tid]
        dinov2 = "dinov2" in tid
        vit = timm.models.vision_transformer.VisionTransformer(
            img_size=cfg["image_sizes"][i], patch_size=o["patch_size"], embed_dim=o["embed_dim"],
            depth=o["depth"], num_heads=o["num_heads"], mlp_ratio=o["mlp_ratio"], num_classes=0,
            class_token=o["class_token"], reg_tokens=o.get("reg_tokens", 0), no_embed_class=dinov2,
            init_values=1e-5 if dinov2 else None,
            global_pool="map" if o.get("attn_pool") else "",
        )
        widths.append(o["embed_dim"])
        for k, v in vit.state_dict().items():
            name = f"{TOWER_PREFIXES[i]}.{k}".replace(".gamma", ".scale_factor")
            if name not in ours:
                failures.append(f"{name}: in the timm model, missing from ours")
                continue
            seen.add(name)
            compare(name, ours[name], v, failures)

    llm = cfg["text_config"]["hidden_size"]
    v = sum(widths)
    proj = [(v, 4 * v), (4 * v, llm), (llm, llm)] if len(widths) == 2 else [(v, llm), (llm, llm)]
    for j, (i, o) in enumerate(proj, start=1):
        lin = torch.nn.Linear(i, o)
        for k, t in lin.state_dict().items():
            name = f"projector.fc{j}.{k}"
            seen.add(name)
            compare(name, ours[name], t, failures)

    tc = {k: v for k, v in cfg["text_config"].items() if k not in ("model_type", "torch_dtype")}
    ref = LlamaForCausalLM(LlamaConfig(**tc))
    for k, t in ref.state_dict().items():
        name = f"language_model.{k}"
        if k == "lm_head.weight" and tc.get("tie_word_embeddings"):
            if name in ours:
                failures.append(f"{name}: stored although tie_word_embeddings is true")
            continue
        if name not in ours:
            failures.append(f"{name}: in the transformers model, missing from ours")
            continue
        seen.add(name)
        if k == "model.embed_tokens.weight":
            pad = cfg["pad_token_id"]
            if not torch.all(ours[name][pad] == 0):
                failures.append(f"{name}: padding row {pad} is not zero")
        compare(name, ours[name], t, failures)

    # The reference stores the towers' trailing blocks and norms too (timm builds them): all are covered above.
    extra = sorted(set(ours) - seen)
    if extra:
        failures.append(f"tensors the reference modules do not have: {extra[:5]}")
    print(f"{len(seen)} tensors compared with timm {timm.__version__} / torch {torch.__version__}")
    for f in failures:
        print("FAIL", f)
    if failures:
        sys.exit(1)
    print("ok")


if __name__ == "__main__":
    main()
