"""
pytorch_baseline.py: time OpenVLA's `predict_action` in PyTorch on a model directory, stage by stage.

This is the PyTorch side of `openvla bench --pytorch`. It builds the same architecture as the reference from
the reference's own library pieces (timm 0.9.10 ViTs, transformers 4.40.1 LlamaForCausalLM with SDPA, the
fused-GELU-MLP projector; wiring from tools/reference/openvla_ref.py), loads the safetensors weights of an HF
model directory (e.g. one written by `openvla synth`), and times the equivalent of `predict_action`:

    preprocess  tokenizer + PIL/torchvision image transform
    vision      both towers (output of block len-2)
    projector   fc1-GELU-fc2-GELU-fc3
    prefill     LlamaForCausalLM forward over [BOS, 256 patches, prompt] with KV cache
    decode      one KV-cached forward per further action token (greedy)

An OpenVLA-OFT model directory (config.json with `oft_constants`, an `action_head--*.pt`) is timed as OFT's
`predict_action` runs it: each of the `num_images_in_input` images through the towers (one pass per image, as
the reference's backbone loops), the projector, the proprio projector (on a zero state), one forward of
LlamaForCausalLM over [BOS, patches, proprio token, prompt, 29871, K*D zeroed placeholders, </s>] with
**bidirectional** attention (a 4-D all-ones mask: what the reference gets from its transformers fork) and
`output_hidden_states=True` (the reference computes the logits too), then the MLPResNet L1 head on the shifted
window. Stages: `prefill` is that one LLM pass, `head` the head, no decode. The images get the OpenVLA transform
(resize + normalize); OFT's 90% centre crop is not timed (a few ms).

Only PyPI torch 2.2.0, timm 0.9.10 and transformers 4.40.1 are used (the repo's .venv).

dtypes: `fp32` (the float32 run) and `bf16` (weights and activations in bfloat16, as the HF reference runs with
torch_dtype=torch.bfloat16). Modules are created on the meta device and filled tensor by tensor from the
safetensors files, so peak memory is the model in its dtype (the 7B fits in bf16 without an fp32 copy).

With `--pairs DIR` (a directory written by `openvla bench --accuracy N --dump-pairs DIR`), it instead predicts
every image/instruction pair in fp32 and in bf16 and prints PyTorch's own bf16-vs-fp32 action-token agreement, the
yardstick for our quantized modes' agreement with f32.

Usage:
    .venv/bin/python tools/bench/pytorch_baseline.py MODEL_DIR --dtype bf16 --runs 3 --threads 2 --json
    .venv/bin/python tools/bench/pytorch_baseline.py MODEL_DIR --pairs bench-results/pairs-tiny --unnorm-key KEY --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Dict, List

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference"))
from openvla_ref import (  # noqa: E402  (the reference wiring, reused as is)
    SPACE_TOKEN_ID,
    ImagePreprocessor,
    Projector,
    Tower,
    build_prompt,
    default_prompt_format,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
STOP_TOKEN_ID = 2


STAGES = ["preprocess", "vision", "projector", "prefill", "head"]


def stage_ms(marks: List[float], end: float | None = None) -> Dict[str, float]:
    """Milliseconds of each stage in STAGES order between consecutive `marks` (as many as the marks
    allow), and `total` from the first mark to `end` (default: the last mark)."""
    end = marks[-1] if end is None else end
    out = {name: (b - a) * 1e3 for name, a, b in zip(STAGES, marks, marks[1:])}
    out["total"] = (end - marks[0]) * 1e3
    return out


def finite_or_none(x: float) -> float | None:
    return x if np.isfinite(x) else None


def timm_kwargs(overrides: Dict[str, object]) -> Dict[str, object]:
    """A tower's overrides as timm 0.9.10 keywords: `openvla init` writes `attn_pool` (SigLIP's MAP head), which
    timm spells `global_pool="map"`; without it the tower has no pooling head (`global_pool=""`)."""
    out = dict(overrides)
    if "attn_pool" in out:
        out["global_pool"] = "map" if out.pop("attn_pool") else ""
    return out


class MLPResNet(nn.Module):
    """OFT's L1 head (action_heads.py): LayerNorm -> fc1 -> ReLU -> blocks of x + ReLU(fc(LN(x))) -> LN -> fc2."""

    def __init__(self, sd: Dict[str, torch.Tensor]):
        super().__init__()
        hidden, inp = sd["model.fc1.weight"].shape
        blocks = sum(1 for k in sd if k.startswith("model.mlp_resnet_blocks.") and k.endswith(".ffn.1.weight"))
        self.layer_norm1 = nn.LayerNorm(inp)
        self.fc1 = nn.Linear(inp, hidden)
        self.blocks = nn.ModuleList(
            [nn.ModuleDict({"0": nn.LayerNorm(hidden), "1": nn.Linear(hidden, hidden)}) for _ in range(blocks)]
        )
        self.layer_norm2 = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, sd["model.fc2.weight"].shape[0])
        own = {k.replace("model.mlp_resnet_blocks.", "blocks.").replace(".ffn.", ".").replace("model.", ""): v
               for k, v in sd.items()}
        self.load_state_dict(own)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(self.layer_norm1(x)))
        for b in self.blocks:
            h = h + torch.relu(b["1"](b["0"](h)))
        return self.fc2(self.layer_norm2(h))


class ProprioProjector(nn.Module):
    """OFT's proprio projector: fc1 -> GELU -> fc2."""

    def __init__(self, sd: Dict[str, torch.Tensor]):
        super().__init__()
        hidden, p = sd["fc1.weight"].shape
        self.fc1 = nn.Linear(p, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.load_state_dict(sd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def load_component(model_dir: str, name: str) -> Dict[str, torch.Tensor] | None:
    """`{name}--<step>_checkpoint.pt` of an OFT directory, `module.` stripped (None if absent)."""
    found = sorted(f for f in os.listdir(model_dir) if f.startswith(name + "--") and f.endswith("_checkpoint.pt"))
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f"{model_dir}: several {name} files: {found}")
    sd = torch.load(os.path.join(model_dir, found[0]), map_location="cpu")
    return {k.removeprefix("module."): v.float() for k, v in sd.items()}


def test_pattern() -> Image.Image:
    """The same deterministic 256x256 image as `openvla bench` uses when no image is given."""
    y, x = np.mgrid[0:256, 0:256]
    rgb = np.stack([x % 256, y % 256, (x * 7 + y * 13) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Model:
    def __init__(self, model_dir: str, dtype: torch.dtype):
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
        with open(os.path.join(model_dir, "preprocessor_config.json")) as f:
            self.preprocess = ImagePreprocessor(json.load(f))
        self.prompt_format = default_prompt_format(cfg)
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_file=os.path.join(model_dir, "tokenizer.json"))
        self.dtype = dtype

        fused = bool(cfg["use_fused_vision_backbone"])
        ids = cfg["timm_model_ids"]
        acts = cfg.get("timm_override_act_layers") or [None] * len(ids)
        sizes = cfg.get("image_sizes") or [224] * len(ids)
        overrides = {k: timm_kwargs(v) for k, v in (cfg.get("tiny_timm_overrides") or {}).items()}
        n_towers = 2 if fused else 1
        text_cfg = dict(cfg.get("text_config") or {})
        text_cfg.pop("model_type", None)
        llm_config = LlamaConfig(**text_cfg)
        llm_config._attn_implementation = "sdpa"
        self.llm_config = llm_config

        # Build in the target dtype (the projector and the LLM on the meta device, then allocated once) and fill
        # from the files. timm's constructor calls .item(), so the towers are built on the CPU directly.
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            self.towers = nn.ModuleList(
                [Tower(ids[i], sizes[i], acts[i], overrides.get(ids[i], {})) for i in range(n_towers)]
            )
            vision_dim = sum(t.vit.embed_dim for t in self.towers)
            with torch.device("meta"):
                self.projector = Projector(fused, vision_dim, llm_config.hidden_size)
                self.llm = LlamaForCausalLM(llm_config)
        finally:
            torch.set_default_dtype(default)
        for m in (self.projector, self.llm):
            m.to_empty(device="cpu")
        for m in (self.towers, self.projector, self.llm):
            m.eval()
        # Non-persistent RoPE buffers were created on the meta device: rebuild them (one module shared by all
        # layers; transformers makes one per layer with identical contents).
        head_dim = llm_config.hidden_size // llm_config.num_attention_heads
        with torch.device("cpu"):
            rope = LlamaRotaryEmbedding(
                head_dim, max_position_embeddings=llm_config.max_position_embeddings, base=llm_config.rope_theta
            )
        for layer in self.llm.model.layers:
            layer.self_attn.rotary_emb = rope

        params: Dict[str, torch.Tensor] = {}
        prefixes = ["vision_backbone.featurizer.", "vision_backbone.fused_featurizer."][:n_towers]
        for tower, prefix in zip(self.towers, prefixes):
            for k, v in tower.vit.state_dict(keep_vars=True).items():
                params[prefix + k.replace(".gamma", ".scale_factor")] = v
        for k, v in self.projector.state_dict(keep_vars=True).items():
            params["projector." + k] = v
        for k, v in self.llm.state_dict(keep_vars=True).items():
            params["language_model." + k] = v

        index = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        loaded = set()
        with torch.no_grad():
            for fn in files:
                with safe_open(os.path.join(model_dir, fn), framework="pt") as f:
                    for k in f.keys():
                        if k not in params:
                            raise ValueError(f"unexpected tensor {k}")
                        params[k].copy_(f.get_tensor(k).to(dtype))
                        loaded.add(k)
        missing = set(params) - loaded
        if missing:
            raise ValueError(f"tensors missing from the checkpoint: {sorted(missing)[:5]}")

        norm_stats = cfg.get("norm_stats") or {}
        side = os.path.join(model_dir, "dataset_statistics.json")
        if os.path.exists(side):
            with open(side) as f:
                norm_stats = json.load(f)
        self.norm_stats = norm_stats
        self.eos = llm_config.eos_token_id

        head = load_component(model_dir, "action_head")
        self.oft = None
        if head is not None:
            consts = cfg.get("oft_constants") or {}
            eval_cfg = cfg.get("oft_eval_cfg") or {}
            proprio = load_component(model_dir, "proprio_projector")
            self.oft = {
                "chunk": int(consts["NUM_ACTIONS_CHUNK"]),
                "action_dim": int(consts["ACTION_DIM"]),
                "images": int(eval_cfg.get("num_images_in_input", 1)),
                "head": MLPResNet(head).to(dtype).eval(),
                "proprio": ProprioProjector(proprio).to(dtype).eval() if proprio is not None else None,
            }

    def prompt_ids(self, instruction: str) -> torch.Tensor:
        """The prompt's ids `[1, n]`: BOS first, ending with 29871 (spec 5.1)."""
        prompt = build_prompt(instruction, self.prompt_format)
        ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        if int(ids[0, 0]) != 1:  # tokenizer.json without tokenizer_config.json: add BOS as LlamaTokenizer does
            ids = torch.cat([torch.tensor([[1]], dtype=ids.dtype), ids], dim=1)
        if not torch.all(ids[:, -1] == SPACE_TOKEN_ID):
            ids = torch.cat([ids, torch.tensor([[SPACE_TOKEN_ID]], dtype=ids.dtype)], dim=1)
        return ids

    @torch.no_grad()
    def predict(self, image: Image.Image, instruction: str, unnorm_key: str | None) -> Dict[str, object]:
        t0 = time.perf_counter()
        if unnorm_key is None:
            unnorm_key = next(iter(self.norm_stats)) if len(self.norm_stats) == 1 else None
        action_dim = len(self.norm_stats[unnorm_key]["action"]["q01"]) if unnorm_key else 7
        ids = self.prompt_ids(instruction)
        pv = self.preprocess(image).to(self.dtype)
        t1 = time.perf_counter()
        feats = [tower(pv[:, 3 * i : 3 * i + 3]) for i, tower in enumerate(self.towers)]
        vision = torch.cat(feats, dim=2)
        t2 = time.perf_counter()
        proj = self.projector(vision)
        t3 = time.perf_counter()
        emb = self.llm.get_input_embeddings()(ids)
        inputs_embeds = torch.cat([emb[:, :1], proj, emb[:, 1:]], dim=1)
        out = self.llm(inputs_embeds=inputs_embeds, attention_mask=None, use_cache=True, return_dict=True)
        past = out.past_key_values
        logits = out.logits[:, -1, :].float()
        t4 = time.perf_counter()
        generated: List[int] = []
        step_times: List[float] = []
        for step in range(action_dim):
            tok = int(torch.argmax(logits[0]))
            generated.append(tok)
            if tok == self.eos or step + 1 == action_dim:
                break
            ts = time.perf_counter()
            out = self.llm(
                input_ids=torch.tensor([[tok]]), past_key_values=past, attention_mask=None, use_cache=True,
                return_dict=True,
            )
            past = out.past_key_values
            logits = out.logits[:, -1, :].float()
            step_times.append(time.perf_counter() - ts)
        t5 = time.perf_counter()
        return {
            **stage_ms([t0, t1, t2, t3, t4], t5),
            "decode_per_token": float(np.mean(step_times)) * 1e3 if step_times else float("nan"),
            "prefill_tokens": int(inputs_embeds.shape[1]),
            "token_ids": generated,
        }


@torch.no_grad()
def predict_oft(model: Model, image: Image.Image, instruction: str) -> Dict[str, object]:
    """One OFT parallel pass, timed by stage (see the module docstring)."""
    oft = model.oft
    k, d = oft["chunk"], oft["action_dim"]
    t0 = time.perf_counter()
    ids = model.prompt_ids(instruction)
    pvs = [model.preprocess(image).to(model.dtype) for _ in range(oft["images"])]
    t1 = time.perf_counter()
    per_image = []
    for pv in pvs:
        feats = [tower(pv[:, 3 * i : 3 * i + 3]) for i, tower in enumerate(model.towers)]
        per_image.append(torch.cat(feats, dim=2))
    vision = torch.cat(per_image, dim=1)
    t2 = time.perf_counter()
    prefix = [model.projector(vision)]
    if oft["proprio"] is not None:
        p_dim = oft["proprio"].fc1.in_features
        prefix.append(oft["proprio"](torch.zeros(1, p_dim, dtype=model.dtype)).unsqueeze(1))
    t3 = time.perf_counter()
    embed = model.llm.get_input_embeddings()
    emb = embed(ids)
    hidden_size = emb.shape[-1]
    zeros = torch.zeros(1, k * d, hidden_size, dtype=emb.dtype)
    stop = embed(torch.tensor([[STOP_TOKEN_ID]]))
    inputs_embeds = torch.cat([emb[:, :1], *prefix, emb[:, 1:], zeros, stop], dim=1)
    n = inputs_embeds.shape[1]
    mask = torch.ones(1, 1, n, n, dtype=inputs_embeds.dtype)
    out = model.llm(inputs_embeds=inputs_embeds, attention_mask=mask, output_hidden_states=True, return_dict=True)
    hidden = out.hidden_states[-1]
    t4 = time.perf_counter()
    start = sum(p.shape[1] for p in prefix) + ids.shape[1] - 1
    window = hidden[:, start : start + k * d].reshape(1, k, d * hidden_size)
    chunk = oft["head"](window).float()
    t5 = time.perf_counter()
    return {
        **stage_ms([t0, t1, t2, t3, t4, t5]),
        "decode_per_token": float("nan"),
        "prefill_tokens": int(n),
        "chunk": chunk[0].tolist(),
    }


def agreement(args: argparse.Namespace) -> None:
    with open(os.path.join(args.pairs, "pairs.json")) as f:
        pairs = json.load(f)
    results = {}
    for dtype in ("fp32", "bf16"):
        model = Model(args.model_dir, DTYPES[dtype])
        out = []
        for p in pairs:
            image = Image.open(os.path.join(args.pairs, p["image"])).convert("RGB")
            r = model.predict(image, p["instruction"], args.unnorm_key)
            out.append(r["token_ids"])
        results[dtype] = out
        detok_vocab = model.llm_config.vocab_size - 64  # pad_to_multiple_of rows (spec 6.3)
        del model
    ref, got = results["fp32"], results["bf16"]
    same = sum(sum(int(x == y) for x, y in zip(r, g)) for r, g in zip(ref, got))
    total = sum(len(r) for r in ref)
    all_same = sum(int(r == g) for r, g in zip(ref, got))
    centers = (np.linspace(-1, 1, 256)[:-1] + np.linspace(-1, 1, 256)[1:]) / 2.0

    def norm(ids: List[int]) -> np.ndarray:
        return centers[np.clip(detok_vocab - np.array(ids) - 1, 0, 254)]

    delta = float(np.mean([np.mean(np.abs(norm(r) - norm(g))) for r, g in zip(ref, got) if len(r) == len(g)]))
    result = {
        "engine": f"pytorch {torch.__version__}",
        "pairs": len(pairs),
        "tokens": total,
        "bf16_vs_fp32_token_agreement": same / max(total, 1),
        "bf16_vs_fp32_action_agreement": all_same / max(len(pairs), 1),
        "bf16_vs_fp32_mean_abs_delta": delta,
    }
    print(json.dumps(result) if args.json else
          f"PyTorch bf16 vs fp32 on {len(pairs)} pairs: token agreement {100 * same / max(total, 1):.1f}%, "
          f"all-7 {100 * all_same / max(len(pairs), 1):.1f}%, mean |delta normalized action| {delta:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--runs", type=int, default=3,
                    help="timed runs after one warm-up run (0: a single run, timed, no warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--instruction", default="put the carrot in the bowl")
    ap.add_argument("--unnorm-key", default=None)
    ap.add_argument("--image", default=None, help="image file; the bench test pattern when omitted")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--pairs", default=None, help="directory from openvla bench --dump-pairs: bf16-vs-fp32 agreement")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.pairs:
        agreement(args)
        return
    image = Image.open(args.image).convert("RGB") if args.image else test_pattern()
    t = time.perf_counter()
    model = Model(args.model_dir, DTYPES[args.dtype])
    load_s = time.perf_counter() - t
    runs = []
    for i in range(args.runs + 1):
        if model.oft is not None:
            r = predict_oft(model, image, args.instruction)
        else:
            r = model.predict(image, args.instruction, args.unnorm_key)
        if i > 0 or args.runs == 0:
            runs.append(r)
    stages = ["preprocess", "vision", "projector", "prefill", "decode_per_token", "total"]
    if model.oft is not None:
        stages.insert(-1, "head")
    result = {
        "engine": f"pytorch {torch.__version__}",
        "dtype": args.dtype,
        "threads": args.threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "runs": args.runs,
        "load_s": load_s,
        "prefill_tokens": runs[-1]["prefill_tokens"] if runs else 0,
        # NaN (OFT has no decode step) is written as null: JSON has no NaN.
        "median_ms": {s: finite_or_none(float(np.median([r[s] for r in runs]))) for s in stages} if runs else {},
        "peak_rss_bytes": peak_rss_bytes(),
        "token_ids": runs[-1].get("token_ids", []) if runs else [],
    }
    if model.oft is not None:
        result["family"] = "oft-l1"
        result["chunk_size"] = model.oft["chunk"]
        total = result["median_ms"].get("total", float("nan"))
        result["actions_per_s"] = model.oft["chunk"] * 1e3 / total
    elif runs:
        result["actions_per_s"] = 1e3 / result["median_ms"]["total"]
    if args.json:
        print(json.dumps(result))
    else:
        m = result["median_ms"]
        print(f"pytorch {args.dtype} ({args.threads} threads, {result['cpu_capability']}), {args.runs} runs, "
              f"load {load_s:.1f} s")
        print(" | ".join(f"{s} {m[s]:.1f}" if m[s] is not None else f"{s} -" for s in stages) + " (median ms)")
        print(f"peak RSS: {result['peak_rss_bytes'] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
