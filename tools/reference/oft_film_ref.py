#!/usr/bin/env python3
"""
oft_film_ref.py: a tiny OpenVLA-OFT **FiLM** checkpoint and its inference goldens, computed by the reference code.

It imports the REFERENCE's own modules at run time from a checkout of moojink/openvla-oft (`--oft-src`) and the
bidirectional `modeling_llama.py` of moojink/transformers-openvla-oft (`--fork-src`), through the import helpers of
oft_l1_ref.py (same pins, same stand-ins for the TensorFlow/dlimp package __init__ files). None of their code is
copied into this repository.

1. Training side (vla-scripts/finetune.py:835-872 and :642-646): the tiny fixture model
   (testdata/openvla-oft-tiny/model) is loaded in bf16 as finetune.py loads it, wrapped with PEFT LoRA
   (r=32, lora_alpha=min(r,16)=16, dropout 0, target_modules="all-linear", init "gaussian"), then its
   `vla.model.vision_backbone` is replaced by `FiLMedPrismaticVisionBackbone` (prismatic/models/film_vit_wrapper.py).
   The vision LoRA tensors (lora_A, and lora_B, which the gaussian init leaves at zero) and every FiLM
   `scale`/`shift` Linear get seeded non-zero values. `vla.vision_backbone.state_dict()` is saved with torch.save
   as `vision_backbone--150000_checkpoint.pt`, exactly what finetune.py saves (the whole FiLMed backbone: base
   weights under `.base_layer.`, `lora_A.default` / `lora_B.default`, FiLM `scale`/`shift`, no `module.` prefix;
   base and LoRA tensors bf16, FiLM Linears fp32 as created). The LLM's LoRA stays at its zero init, so the
   fixture's shards are its (trivially) merged shards; lora_adapter/adapter_config.json records r and lora_alpha
   (what `vla.module.save_pretrained(adapter_dir)` writes there, finetune.py:628).
2. Inference side, the reference's own eval functions, extracted from experiments/robot/openvla_utils.py with
   `ast` and executed (the module imports TensorFlow, json_numpy and the Hub client at top level):
   `_apply_film_to_vla` (fresh PEFT LoRA with r=cfg.lora_rank, alpha=min(r,16), FiLM wrap, strict load of the
   file, no prefix stripping), `get_proprio_projector`, `get_action_head`, `normalize_proprio`, `get_vla_action`
   (with use_film=True), `find_checkpoint_file`, `load_component_state_dict`.
   Float32 throughout: the `torch` those functions see is a proxy whose `bfloat16` is float32 (their bf16 casts keep
   float32), as in oft_l1_ref.py. The model is loaded with torch_dtype=float32 (bf16-stored weights upcast exactly).
3. Images: `prepare_images_for_vla` needs TensorFlow (JPEG round trip, lanczos3, TF crop_and_resize), which is not
   in this venv. The samples are the shared fixture's s0, s1, s3 (same images, instructions, proprio, unnorm keys),
   and the stand-in for `prepare_images_for_vla` checks that it receives exactly the fixture's input images and
   returns the fixture's `*_cropped.npy` arrays, which the unmodified reference produced with TensorFlow.

Written to --out (default testdata/openvla-oft-film-tiny): model/{config.json (the fixture's, with
oft_eval_cfg.use_film=true, lora_rank=32), vision_backbone--150000_checkpoint.pt, lora_adapter/adapter_config.json}
(the other model files are the fixture's, unchanged; the Rust test assembles the directory), per sample
`<p>language_mean.npy`, `<p>projected_features.npy`, `<p>actions_hidden_states.npy`, `<p>normalized_actions.npy`,
`<p>actions.npy`, `<p>input_ids_full.npy`, samples.json, manifest.json, and the error-path fixture
errors/vision_backbone_without_film.pt (one block of the backbone saved without the FiLM wrap).

Checks, all asserted: the pixel_values equal the fixture's stored ones (s0); the FiLM projected features differ from
a run with FiLM disabled (gamma=beta=0 and LoRA B=0: the same reference code then reproduces the fixture's non-FiLM
s0 goldens to 1e-5); the language embeddings the reference averages are exactly embed(BOS, prompt, 29871, </s>);
a second run is bit-identical.

Usage (venv: tools/reference/README.md):
    git -C /path/to/openvla-oft.git archive 213c5ff | tar -x -C target/reference/openvla-oft
    git -C /path/to/transformers-openvla-oft.git archive bc339d9 src/transformers/models/llama | tar -x -C target/reference/tf-fork
    python tools/reference/oft_film_ref.py --oft-src target/reference/openvla-oft --fork-src target/reference/tf-fork [--out DIR]
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import shutil
import sys
import tempfile
import types
import typing
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import oft_l1_ref as l1  # noqa: E402  (sets CUDA_VISIBLE_DEVICES="" and the offline flags before torch loads)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

REPO = l1.REPO
FIXTURE = os.path.join(REPO, "testdata", "openvla-oft-tiny")
DEFAULT_OUT = os.path.join(REPO, "testdata", "openvla-oft-film-tiny")
SEED = 20261207
LORA_RANK = 32
LORA_ALPHA = min(LORA_RANK, 16)  # finetune.py:849 and openvla_utils.py:327
STEP = 150000
SAMPLES = ["s0_", "s1_", "s3_"]
# Relative size of the merged LoRA update, ||scale * B @ A|| / ||W||, and the std of gamma / beta for a typical
# instruction: large enough that a wrong scale, a missing LoRA or a missing FiLM term is far outside the tolerances.
LORA_REL = 0.3
GAMMA_STD = 0.3
BETA_STD = 0.2

EVAL_FUNCTIONS = [
    "find_checkpoint_file",
    "load_component_state_dict",
    "_apply_film_to_vla",
    "get_proprio_projector",
    "get_action_head",
    "normalize_proprio",
    "get_vla_action",
]
REF_FILES = l1.REF_FILES + ["prismatic/models/film_vit_wrapper.py", "experiments/robot/openvla_utils.py"]


def load_eval_functions(oft_src: str, names: Dict[str, Any]) -> Dict[str, Any]:
    """Executes the definitions of EVAL_FUNCTIONS from experiments/robot/openvla_utils.py in a namespace holding
    the names they use."""
    path = os.path.join(oft_src, "experiments", "robot", "openvla_utils.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    fns = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in EVAL_FUNCTIONS]
    found = sorted(n.name for n in fns)
    if found != sorted(EVAL_FUNCTIONS):
        raise SystemExit(f"{path}: expected the functions {sorted(EVAL_FUNCTIONS)}, found {found}")
    namespace = dict(names)
    exec(compile(ast.Module(body=fns, type_ignores=[]), path, "exec"), namespace)  # noqa: S102
    return namespace


def seeded(shape, std: float, *key) -> torch.Tensor:
    rng = np.random.default_rng([SEED, *key])
    return torch.from_numpy(rng.normal(0.0, std, size=tuple(shape)).astype(np.float32))


class Film:
    def __init__(self, args):
        self.args = args
        self.fork, _stock = l1.install_fork_llama(args.fork_src)
        l1.install_prismatic(args.oft_src)
        for rel in REF_FILES:
            if not os.path.isfile(os.path.join(args.oft_src, rel)):
                raise SystemExit(f"--oft-src {args.oft_src}: missing {rel}")
        sys.argv = [sys.argv[0], "libero"]  # constants.py picks the platform from the command line
        self.c = importlib.import_module("prismatic.vla.constants")
        self.cfgm = importlib.import_module("prismatic.extern.hf.configuration_prismatic")
        self.modeling = importlib.import_module("prismatic.extern.hf.modeling_prismatic")
        self.processing = importlib.import_module("prismatic.extern.hf.processing_prismatic")
        self.heads = importlib.import_module("prismatic.models.action_heads")
        self.projectors = importlib.import_module("prismatic.models.projectors")
        self.film = importlib.import_module("prismatic.models.film_vit_wrapper")
        from transformers import AutoConfig, AutoImageProcessor, AutoModelForVision2Seq, AutoProcessor

        AutoConfig.register("openvla", self.cfgm.OpenVLAConfig)
        AutoImageProcessor.register(self.cfgm.OpenVLAConfig, self.processing.PrismaticImageProcessor)
        AutoProcessor.register(self.cfgm.OpenVLAConfig, self.processing.PrismaticProcessor)
        AutoModelForVision2Seq.register(self.cfgm.OpenVLAConfig, self.modeling.OpenVLAForActionPrediction)
        self.AutoModelForVision2Seq = AutoModelForVision2Seq
        self.AutoProcessor = AutoProcessor
        l1.patch_timm(os.path.join(FIXTURE, "model"))
        with open(os.path.join(FIXTURE, "samples.json")) as f:
            self.samples = {s["prefix"]: s for s in json.load(f)["samples"]}
        self.current: Dict[str, Any] = {}

    # -------------------------------------------------------------------------------------------------------------
    # Training side: the FiLM checkpoint file
    # -------------------------------------------------------------------------------------------------------------
    def write_checkpoint(self, model_out: str, typical_ids: List[int]) -> Dict[str, Any]:
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraLayer

        vla = self.AutoModelForVision2Seq.from_pretrained(
            os.path.join(FIXTURE, "model"), torch_dtype=torch.bfloat16, low_cpu_mem_usage=True,
            trust_remote_code=False,
        )
        vla.vision_backbone.set_num_images_in_input(2)
        lora_config = LoraConfig(
            r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
            init_lora_weights="gaussian",
        )
        vla = get_peft_model(vla, lora_config)
        # finetune.py:864-867
        vla.model.vision_backbone = self.film.FiLMedPrismaticVisionBackbone(
            vision_backbone=vla.model.vision_backbone, llm_dim=vla.llm_dim,
        )
        backbone = vla.vision_backbone
        if not isinstance(backbone, self.film.FiLMedPrismaticVisionBackbone):
            raise SystemExit(f"vla.vision_backbone is {type(backbone)}, expected the FiLM wrapper")
        scale = LORA_ALPHA / LORA_RANK
        lora_names = sorted(n for n, m in backbone.named_modules() if isinstance(m, LoraLayer))
        modules = dict(backbone.named_modules())
        stats = {}
        with torch.no_grad():
            for i, name in enumerate(lora_names):
                layer = modules[name]
                a = layer.lora_A["default"].weight
                b = layer.lora_B["default"].weight
                w = layer.get_base_layer().weight.float()
                a_new = seeded(a.shape, 1.0 / LORA_RANK, 1, i).to(a.dtype)
                b_raw = seeded(b.shape, 1.0, 2, i)
                delta = scale * (b_raw.reshape(b.shape[0], -1) @ a_new.float().reshape(a.shape[0], -1))
                gain = LORA_REL * float(w.norm()) / float(delta.norm())
                a.copy_(a_new)
                b.copy_((b_raw * gain).to(b.dtype))
                stats[name] = list(a.shape) + list(b.shape)
            # FiLM Linears: gamma = scale(avg), beta = shift(avg), sized for a typical instruction's average embedding.
            emb = vla.get_input_embeddings()
            avg = emb(torch.tensor([typical_ids])).float().mean(dim=1)[0]
            blocks = [(n, m) for n, m in backbone.named_modules() if isinstance(m, self.film.FiLMedVisionTransformerBlock)]
            for i, (name, blk) in enumerate(blocks):
                for j, (lin, target) in enumerate(((blk.scale, GAMMA_STD), (blk.shift, BETA_STD))):
                    w = seeded(lin.weight.shape, 1.0, 3, i, j)
                    w *= (0.7 * target) / float((w @ avg).std())
                    lin.weight.copy_(w.to(lin.weight.dtype))
                    lin.bias.copy_(seeded(lin.bias.shape, 0.7 * target, 4, i, j).to(lin.bias.dtype))
        os.makedirs(os.path.join(model_out, "lora_adapter"), exist_ok=True)
        path = os.path.join(model_out, f"vision_backbone--{STEP}_checkpoint.pt")
        # finetune.py:644-646: vla.module.vision_backbone.state_dict() (vla.module is the PeftModel)
        torch.save(vla.vision_backbone.state_dict(), path)
        cfg = vla.peft_config["default"].to_dict()
        cfg["target_modules"] = sorted(cfg["target_modules"])
        cfg["base_model_name_or_path"] = "testdata/openvla-oft-tiny/model"
        cfg["revision"] = None
        cfg["task_type"] = None
        cfg["peft_type"] = str(getattr(cfg["peft_type"], "value", cfg["peft_type"]))
        with open(os.path.join(model_out, "lora_adapter", "adapter_config.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
        with open(os.path.join(FIXTURE, "model", "config.json")) as f:
            config = json.load(f)
        config["oft_eval_cfg"]["use_film"] = True
        config["oft_eval_cfg"]["lora_rank"] = LORA_RANK
        with open(os.path.join(model_out, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        sd = torch.load(path, weights_only=True)
        # Error-path fixture: the same backbone saved without the FiLM wrap (what a LoRA-only run would save), cut to
        # the tensors of one block to stay small. The engine must refuse it as a FiLM file.
        errors = os.path.join(os.path.dirname(model_out), "errors")
        os.makedirs(errors, exist_ok=True)
        no_film = {
            k.replace(".blocks.0.block.", ".blocks.0."): v.clone()
            for k, v in sd.items()
            if k.startswith("vision_backbone.featurizer.blocks.0.block.")
        }
        torch.save(no_film, os.path.join(errors, "vision_backbone_without_film.pt"))
        return {
            "lora_modules": stats,
            "num_tensors": len(sd),
            "dtypes": sorted({str(v.dtype).replace("torch.", "") for v in sd.values()}),
            "film_blocks": len(blocks),
        }

    # -------------------------------------------------------------------------------------------------------------
    # Inference side
    # -------------------------------------------------------------------------------------------------------------
    def prepare_images_for_vla(self, images, cfg):
        """Stand-in for openvla_utils.prepare_images_for_vla (TensorFlow): the fixture's TF-cropped images."""
        p = self.current["prefix"]
        out = []
        for j, image in enumerate(images):
            want = np.array(Image.open(os.path.join(FIXTURE, f"{p}img{j}_input.png")).convert("RGB"))
            if image.shape != want.shape or not np.array_equal(image, want):
                raise SystemExit(f"{p}image {j}: not the fixture's input image")
            if not cfg.center_crop:
                raise SystemExit("the fixture's cropped images need cfg.center_crop")
            out.append(Image.fromarray(np.load(os.path.join(FIXTURE, f"{p}img{j}_cropped.npy"))).convert("RGB"))
        return out

    def load_policy(self, model_dir: str, disable_film: bool = False):
        proxy = l1._TorchComputeDtypeProxy()
        ns = load_eval_functions(self.args.oft_src, {
            "torch": proxy, "np": np, "os": os, "Image": Image, "Any": Any, "Dict": Dict, "List": List,
            "Optional": typing.Optional, "Union": typing.Union,
            "DEVICE": torch.device("cpu"),
            "ACTION_DIM": self.c.ACTION_DIM,
            "ACTION_PROPRIO_NORMALIZATION_TYPE": self.c.ACTION_PROPRIO_NORMALIZATION_TYPE,
            "NormalizationType": self.c.NormalizationType,
            "FiLMedPrismaticVisionBackbone": self.film.FiLMedPrismaticVisionBackbone,
            "L1RegressionActionHead": self.heads.L1RegressionActionHead,
            "DiffusionActionHead": self.heads.DiffusionActionHead,
            "ProprioProjector": self.projectors.ProprioProjector,
            "model_is_on_hf_hub": lambda _p: False,
            "hf_hub_download": l1._unavailable("hf_hub_download"),
            "prepare_images_for_vla": self.prepare_images_for_vla,
        })
        cfg = types.SimpleNamespace(
            pretrained_checkpoint=model_dir, lora_rank=LORA_RANK, use_film=True, num_images_in_input=2,
            center_crop=True, use_proprio=True, use_l1_regression=True, use_diffusion=False, unnorm_key=None,
        )
        processor = self.AutoProcessor.from_pretrained(model_dir, trust_remote_code=False)
        vla = self.AutoModelForVision2Seq.from_pretrained(
            model_dir, torch_dtype=torch.float32, low_cpu_mem_usage=True, trust_remote_code=False
        )
        # get_vla (openvla_utils.py:292-303), float32 on CPU.
        vla = ns["_apply_film_to_vla"](vla, cfg)
        vla.vision_backbone.set_num_images_in_input(cfg.num_images_in_input)
        vla.eval()
        if vla.language_model.config._attn_implementation != "sdpa":
            raise SystemExit("attention implementation is not sdpa")
        if not any(isinstance(m, self.fork.LlamaSdpaAttention) for m in vla.language_model.modules()):
            raise SystemExit("the language model does not use the fork's LlamaSdpaAttention")
        with open(os.path.join(model_dir, "dataset_statistics.json")) as f:
            vla.norm_stats = json.load(f)  # _load_dataset_stats
        if disable_film:
            from peft.tuners.lora import LoraLayer

            with torch.no_grad():
                for m in vla.vision_backbone.modules():
                    if isinstance(m, self.film.FiLMedVisionTransformerBlock):
                        for lin in (m.scale, m.shift):
                            lin.weight.zero_()
                            lin.bias.zero_()
                    if isinstance(m, LoraLayer):
                        m.lora_B["default"].weight.zero_()
        proprio_projector = ns["get_proprio_projector"](cfg, vla.llm_dim, self.c.PROPRIO_DIM)
        action_head = ns["get_action_head"](cfg, vla.llm_dim)
        for mod in (vla, proprio_projector, action_head):
            for t in mod.parameters():
                if t.dtype != torch.float32:
                    raise SystemExit(f"a parameter is {t.dtype}; this golden is float32")
        return ns, cfg, processor, vla, proprio_projector, action_head

    def run(self, policy, prefix: str) -> Dict[str, np.ndarray]:
        ns, cfg, processor, vla, proprio_projector, action_head = policy
        s = self.samples[prefix]
        self.current = {"prefix": prefix}
        cfg.unnorm_key = s["unnorm_key"]
        obs = {}
        for j, im in enumerate(s["images"]):
            obs[im["obs_key"]] = np.array(Image.open(os.path.join(FIXTURE, f"{prefix}img{j}_input.png")).convert("RGB"))
        obs["state"] = np.load(os.path.join(FIXTURE, f"{prefix}proprio_raw.npy"))
        captured: Dict[str, Any] = {}
        hooks = [
            vla.vision_backbone.register_forward_hook(
                lambda _m, args, _o: captured.update(pixel_values=args[0].detach().clone(),
                                                     language_embeddings=args[1].detach().clone())),
            vla.projector.register_forward_hook(
                lambda _m, _a, out: captured.update(projected=out.detach().clone())),
            action_head.model.register_forward_hook(
                lambda _m, args, out: captured.update(head_input=args[0].detach().clone(),
                                                      normalized=out.detach().clone())),
            vla.language_model.get_input_embeddings().register_forward_hook(
                lambda _m, args, _o: captured.update(input_ids_full=args[0].detach().clone())),
        ]
        try:
            actions = ns["get_vla_action"](
                cfg, vla, processor, obs, s["instruction"], action_head=action_head,
                proprio_projector=proprio_projector, noisy_action_projector=None, use_film=True,
            )
        finally:
            for h in hooks:
                h.remove()
        k, d = self.c.NUM_ACTIONS_CHUNK, self.c.ACTION_DIM
        ids = captured["input_ids_full"][0]
        # The reference's language embeddings: every non-placeholder position of the id sequence.
        emb = vla.get_input_embeddings()
        keep = torch.cat([ids[: len(ids) - k * d - 1], ids[-1:]])
        if int(ids[-1]) != 2 or not torch.equal(captured["language_embeddings"][0], emb(keep)):
            raise SystemExit(f"{prefix}: the averaged embeddings are not embed(BOS, prompt, 29871, </s>)")
        return {
            "pixel_values": captured["pixel_values"].float().numpy(),
            "input_ids_full": ids.numpy().astype(np.int64),
            "language_mean": captured["language_embeddings"].mean(dim=1).float().numpy(),
            "projected_features": captured["projected"].float().numpy(),
            "actions_hidden_states": captured["head_input"].reshape(1, k * d, -1).float().numpy(),
            "normalized_actions": captured["normalized"].reshape(k, d).float().numpy(),
            "actions": np.stack(actions).astype(np.float64),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--oft-src", required=True, help="work tree of moojink/openvla-oft @ 213c5ff")
    ap.add_argument("--fork-src", required=True, help="work tree of moojink/transformers-openvla-oft @ bc339d9")
    ap.add_argument("--out", default=DEFAULT_OUT, help="output dir (default: %(default)s)")
    args = ap.parse_args()
    args.oft_src, args.fork_src, args.out = map(os.path.abspath, (args.oft_src, args.fork_src, args.out))
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    ref = Film(args)

    tok = ref.AutoProcessor.from_pretrained(os.path.join(FIXTURE, "model"), trust_remote_code=False).tokenizer
    typical = tok(f"In: What action should the robot take to {ref.samples['s0_']['instruction']}?\nOut:")["input_ids"]
    model_out = os.path.join(args.out, "model")
    if os.path.isdir(model_out):
        shutil.rmtree(model_out)
    ckpt_info = ref.write_checkpoint(model_out, typical)

    with tempfile.TemporaryDirectory() as tmp:
        # The assembled FiLM checkpoint directory: the fixture's files + this script's (what the Rust test does).
        for f in os.listdir(os.path.join(FIXTURE, "model")):
            shutil.copy(os.path.join(FIXTURE, "model", f), tmp)
        shutil.copy(os.path.join(model_out, "config.json"), tmp)
        shutil.copy(os.path.join(model_out, f"vision_backbone--{STEP}_checkpoint.pt"), tmp)
        shutil.copytree(os.path.join(model_out, "lora_adapter"), os.path.join(tmp, "lora_adapter"))
        policy = ref.load_policy(tmp)
        outs = {p: ref.run(policy, p) for p in SAMPLES}
        again = ref.run(policy, SAMPLES[0])
        for key, v in again.items():
            if not np.array_equal(v, outs[SAMPLES[0]][key]):
                raise SystemExit(f"two runs differ in {key}")
        control = ref.run(ref.load_policy(tmp, disable_film=True), "s0_")

    # Checks against the fixture (the unmodified reference's non-FiLM goldens).
    checks = {}
    for j in range(2):
        want = np.load(os.path.join(FIXTURE, f"s0_img{j}_pixel_values.npy"))
        got = outs["s0_"]["pixel_values"][:, 6 * j: 6 * j + 6]
        if not np.array_equal(got.reshape(want.shape), want):
            raise SystemExit(f"s0 image {j}: pixel_values differ from the fixture's")
    checks["s0_pixel_values_equal_fixture"] = True
    for key in ("normalized_actions", "actions_hidden_states"):
        want = np.load(os.path.join(FIXTURE, f"s0_{key}.npy")).reshape(control[key].shape)
        err = float(np.abs(control[key] - want).max())
        checks[f"control_no_film_s0_{key}_max_abs_vs_fixture"] = err
        if err > 1e-4:
            raise SystemExit(f"with FiLM disabled the harness does not reproduce the fixture's s0 {key} ({err:.2e})")
    for key in ("projected_features", "normalized_actions"):
        diff = float(np.abs(outs["s0_"][key] - control[key]).max())
        checks[f"film_effect_s0_{key}_max_abs"] = diff
        if diff < 1e-2:
            raise SystemExit(f"FiLM changes s0 {key} by only {diff:.2e}")
    print(json.dumps(checks, indent=1))

    os.makedirs(args.out, exist_ok=True)
    files = {}
    for p, o in outs.items():
        for key, v in o.items():
            if key == "pixel_values":
                continue
            name = f"{p}{key}.npy"
            np.save(os.path.join(args.out, name), v)
            files[name] = {"shape": list(v.shape), "dtype": str(v.dtype)}
    samples = []
    for p in SAMPLES:
        s = dict(ref.samples[p])
        s["fixture_inputs"] = f"../openvla-oft-tiny/{p}img<i>_input.png, {p}proprio_raw.npy"
        samples.append(s)
    with open(os.path.join(args.out, "samples.json"), "w") as f:
        json.dump({"samples": samples}, f, indent=1)
        f.write("\n")
    for root, _dirs, names in os.walk(args.out):
        for n in sorted(names):
            full = os.path.join(root, n)
            rel = os.path.relpath(full, args.out)
            if rel == "manifest.json":
                continue
            files.setdefault(rel, {}).update({"bytes": os.path.getsize(full), "sha256": l1.sha256_file(full)})
    manifest = {
        "description": "A tiny OpenVLA-OFT FiLM checkpoint (vision_backbone--*.pt with unmerged vision LoRA and FiLM "
                       "layers, saved as finetune.py saves it) and the reference's float32 CPU inference goldens "
                       "(experiments/robot/openvla_utils.py get_vla_action with use_film=True).",
        "generator": {
            "script": "tools/reference/oft_film_ref.py",
            "script_sha256": l1.sha256_file(os.path.abspath(__file__)),
            "seed": SEED,
            "source_repo": "moojink/openvla-oft",
            "source_commit": l1.OFT_COMMIT,
            "source_files_sha256": {r: l1.sha256_file(os.path.join(args.oft_src, r)) for r in REF_FILES},
            "transformers_fork": {"repo": "moojink/transformers-openvla-oft", "commit": l1.FORK_COMMIT,
                                  "modeling_llama_fork_sha256": l1.FORK_LLAMA_SHA256},
            "base_model_dir": "testdata/openvla-oft-tiny/model",
            "versions": l1.versions(),
            "dtype": "float32 everywhere (bf16 casts of the eval code kept float32), no autocast",
        },
        "lora": {"r": LORA_RANK, "alpha": LORA_ALPHA, "scale": LORA_ALPHA / LORA_RANK, "target_modules": "all-linear",
                 "relative_update": LORA_REL},
        "film": {"gamma_std_target": GAMMA_STD, "beta_std_target": BETA_STD},
        "checkpoint": ckpt_info,
        "checks": checks,
        "files": files,
    }
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
