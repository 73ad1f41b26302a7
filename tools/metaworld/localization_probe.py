"""Does a from-scratch vision network find Meta-World's goal marker? An offline probe (issue 15).

The trained policies fail on the tasks whose goal or object is a few-pixel marker (reach, push,
pick-place, peg-insert-side). This probe separates vision from control: it trains a network to
regress the goal position (the demos' `observation.environment_state[3:6]`, privileged simulator
state) from one corner4 frame, on some episodes' frames, and measures the error on the frames of
held-out episodes (other placements). `--arch`: `vit`, the policy's tower shape (a ViT on 16 px
patches, width 192, 4 blocks, mean-pooled); `vit-conv` / `vit-hmlp`, the same with a
convolutional (Xiao et al. 2021) or hierarchical-MLP (Touvron et al. 2022) stem; `cnn`, a small
convolutional network read out by a spatial softmax (expected image coordinates of learned
keypoint maps, Levine et al. 2016); `vla`, the policy's path in miniature (the ViT, an MLP
projector, prompt and query tokens through a 4-layer bidirectional trunk); `oft`, the engine's own
path as `openvla init` builds it (Llama layers with RoPE and RMSNorm, zeroed action positions,
the auxiliary head's readout; `--oft-queries` and `--oft-init` switch two of its choices).
`--target env --norm bounds` regresses the six object and goal coordinates normalized as the
engine's auxiliary head sees them, so its training L1 reads on the scale of `aux_l1_loss`. Results:
docs/evaluation.md, "The policy copies its own motion".

Two steps, in two virtual environments (the project's never gets torch):

  # frames and targets of a recorded LeRobot dataset (`openvla sim demos metaworld`) -> npz
  .venv/bin/python tools/metaworld/localization_probe.py extract --demos RUN/demos --out probe.npz
  # train and evaluate (PyTorch, the baseline venv of tools/train/bench_vs_pytorch.sh)
  .venv-torch/bin/python tools/metaworld/localization_probe.py train --data probe.npz \
      --train 0:50 --test 50:100 --arch vit --steps 1500

Episodes are addressed by their index in the dataset (`--train 0:50,100:500`). The report line
gives the held-out mean distance in centimetres and the fraction within 5 cm (reach's success
radius), beside the predictor of the training mean.
"""

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SIZE = 128


def extract(args):
    from openvla_sim.lerobot_v3 import read_columns, video_path

    root = Path(args.demos)
    try:
        cols = read_columns(root, ["episode_index", "observation.environment_state", "observation.state"])
    except ValueError as e:
        sys.exit(str(e))
    episodes = np.unique(cols["episode_index"])
    frames = []
    for ep in episodes:
        video = video_path(root, int(ep))
        raw = subprocess.run(
            ["ffmpeg", "-loglevel", "error", "-i", str(video), "-vf", f"scale={SIZE}:{SIZE}:flags=bicubic",
             "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], check=True, capture_output=True).stdout
        clip = np.frombuffer(raw, np.uint8).reshape(-1, SIZE, SIZE, 3)
        n = int((cols["episode_index"] == ep).sum())
        if len(clip) < n:
            sys.exit(f"{video}: {len(clip)} frames for {n} rows")
        frames.append(clip[:n])
    np.savez(args.out, frames=np.concatenate(frames), episode=cols["episode_index"],
             env_state=cols["observation.environment_state"].astype(np.float32),
             state=cols["observation.state"].astype(np.float32))
    print(f"wrote {args.out}: {sum(len(f) for f in frames)} frames of {len(episodes)} episodes")


def parse_ranges(text):
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition(":")
        out.extend(range(int(lo), int(hi)))
    return np.array(out)


def train(args):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    d = np.load(args.data)
    # goal: env_state[3:6]; object: [0:3]; env: all six, as `--aux-environment-state` trains
    # them. The held-out error is on `scored` of the target's columns: the goal's for env.
    cols = {"goal": slice(3, 6), "object": slice(0, 3), "env": slice(0, 6)}[args.target]
    target = d["env_state"][:, cols]
    OUT = target.shape[1]
    scored = slice(3, 6) if args.target == "env" else slice(0, 3)
    tr = np.isin(d["episode"], parse_ranges(args.train))
    te = np.isin(d["episode"], parse_ranges(args.test))
    if not tr.any() or not te.any():
        sys.exit(f"empty split: {tr.sum()} training frames, {te.sum()} test frames")
    if args.norm == "bounds":
        # The engine's bounds_q99: [q01, q99] -> [-1, 1], clipped.
        lo, hi = np.quantile(target[tr], 0.01, 0), np.quantile(target[tr], 0.99, 0)
        mean, std = (hi + lo) / 2, (hi - lo) / 2 + 1e-8
    else:
        mean, std = target[tr].mean(0), target[tr].std(0) + 1e-6
    x_tr = torch.from_numpy(d["frames"][tr]).permute(0, 3, 1, 2).contiguous()
    x_te = torch.from_numpy(d["frames"][te]).permute(0, 3, 1, 2).contiguous()
    y_tr = torch.from_numpy(np.clip((target[tr] - mean) / std, -1, 1) if args.norm == "bounds"
                            else (target[tr] - mean) / std).float()
    y_te = target[te][:, scored]

    class ChannelNorm(nn.Module):
        """LayerNorm over the channels of an NCHW map."""

        def __init__(self, c):
            super().__init__()
            self.norm = nn.LayerNorm(c)

        def forward(self, x):
            return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    class ViT(nn.Module):
        """The policy tower's shape: 16 px patches, width 192, 4 blocks, 3 heads. With
        `readout=False` it is a tower only ([`tokens`]), as inside `vla` and `oft`."""

        def __init__(self, width=192, depth=4, heads=3, patch=16, stem="linear", readout=True):
            super().__init__()
            if stem == "linear":
                self.embed = nn.Conv2d(3, width, patch, patch)
            elif stem == "hmlp":
                # Hierarchical MLP stem (Touvron et al. 2022): 2x2 non-overlapping patches, four
                # times, each a linear map + LayerNorm + GELU (a linear map of every 2x2 block).
                layers, c = [], 3
                for i, out in enumerate([48, 96, 192, width]):
                    layers += [nn.Conv2d(c, out, 2, 2)]
                    if i < 3:
                        layers += [ChannelNorm(out), nn.GELU()]
                    c = out
                self.embed = nn.Sequential(*layers)
            else:
                # Convolutional stem (Xiao et al. 2021): 3x3 stride-2 convolutions, then 1x1.
                layers, c = [], 3
                for out in [24, 48, 96, 192]:
                    layers += [nn.Conv2d(c, out, 3, 2, 1), ChannelNorm(out), nn.ReLU()]
                    c = out
                self.embed = nn.Sequential(*layers, nn.Conv2d(c, width, 1))
            self.pos = nn.Parameter(torch.randn(1, (SIZE // patch) ** 2, width) * 0.02)
            layer = nn.TransformerEncoderLayer(width, heads, 4 * width, 0.0, activation="gelu",
                                               batch_first=True, norm_first=True)
            self.blocks = nn.TransformerEncoder(layer, depth)
            if readout:
                self.norm = nn.LayerNorm(width)
                self.out = nn.Linear(width, OUT)

        def tokens(self, x):
            """The patch tokens after the blocks, without a final norm (what OpenVLA reads)."""
            return self.blocks(self.embed(x).flatten(2).transpose(1, 2) + self.pos)

        def forward(self, x):
            return self.out(self.norm(self.tokens(x)).mean(1))

    class SpatialSoftmaxCNN(nn.Module):
        """Conv layers to keypoint maps at 1/4 resolution, then each map's expected (x, y)."""

        def __init__(self, keypoints=32):
            super().__init__()
            self.convs = nn.Sequential(
                nn.Conv2d(3, 32, 5, 2, 2), nn.ReLU(), nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU(),
                nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(), nn.Conv2d(64, 64, 3, 1, 1), nn.ReLU(),
                nn.Conv2d(64, keypoints, 1))
            n = SIZE // 4
            ys, xs = torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij")
            self.register_buffer("grid", torch.stack([xs.flatten(), ys.flatten()], 1))
            self.mlp = nn.Sequential(nn.Linear(2 * keypoints, 256), nn.ReLU(), nn.Linear(256, OUT))

        def forward(self, x):
            m = self.convs(x).flatten(2)
            kp = torch.softmax(m, -1) @ self.grid
            return self.mlp(kp.flatten(1))

    class FusionVLA(nn.Module):
        """The policy's path in miniature: the ViT's patch tokens (no final norm), an MLP
        projector to width 256, then 16 learned prompt-like tokens and 8 query tokens (the
        chunk's action positions) through 4 bidirectional pre-norm layers; the mean of the
        query outputs is read out (as the auxiliary head reads the action positions)."""

        def __init__(self, width=192, llm=256):
            super().__init__()
            self.vit = ViT(width=width, readout=False)
            self.projector = nn.Sequential(nn.Linear(width, llm), nn.GELU(), nn.Linear(llm, llm))
            self.prompt = nn.Parameter(torch.randn(1, 16, llm) * 0.02)
            self.queries = nn.Parameter(torch.randn(1, 8, llm) * 0.02)
            layer = nn.TransformerEncoderLayer(llm, 4, 688, 0.0, activation="gelu", batch_first=True,
                                               norm_first=True)
            self.trunk = nn.TransformerEncoder(layer, 4)
            self.norm = nn.LayerNorm(llm)
            self.out = nn.Linear(llm, OUT)

        def forward(self, x):
            b = x.shape[0]
            seq = torch.cat([self.projector(self.vit.tokens(x)), self.prompt.expand(b, -1, -1),
                             self.queries.expand(b, -1, -1)], 1)
            h = self.norm(self.trunk(seq))
            return self.out(h[:, -8:].mean(1))

    class RMSNorm(nn.Module):
        """Llama's RMSNorm (torch 2.2 has no nn.RMSNorm)."""

        def __init__(self, d, eps=1e-6):
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    class OftTrunk(nn.Module):
        """The engine's policy path as `openvla init` builds it and `openvla finetune` trains
        it: a timm-initialized SigLIP-like ViT (4 of 5 blocks read), the gelu-mlp projector,
        then BOS + patches + 20 prompt tokens + a proprio token + 32 action positions (chunk 8 x
        action dim 4) through 4 Llama layers (RMSNorm, RoPE, SwiGLU, bidirectional attention),
        read out as the auxiliary head reads it (a linear map of the mean over the chunk of each
        step's 4 concatenated positions). Toggles: `--oft-queries zero` gives the action
        positions zero input embeddings (OFT) and `learned` gives them learned ones;
        `--oft-init reference` draws the weights as `openvla init` (timm, Llama std 0.02) and
        `torch` leaves PyTorch's defaults."""

        def __init__(self, queries="zero", init="reference", width=192, llm=256, layers=4):
            super().__init__()
            self.vit = ViT(width=width, readout=False)
            self.projector = nn.Sequential(nn.Linear(width, llm), nn.GELU(), nn.Linear(llm, llm))
            self.proprio = nn.Sequential(nn.Linear(4, llm), nn.GELU(), nn.Linear(llm, llm))
            self.bos = nn.Parameter(torch.zeros(1, 1, llm))
            self.prompt = nn.Parameter(torch.zeros(1, 20, llm))
            self.queries = nn.Parameter(torch.zeros(1, 32, llm), requires_grad=queries == "learned")
            self.heads, self.llm = 4, llm
            self.layers = nn.ModuleList()
            for _ in range(layers):
                self.layers.append(nn.ModuleDict({
                    "n1": RMSNorm(llm), "q": nn.Linear(llm, llm, bias=False),
                    "k": nn.Linear(llm, llm, bias=False), "v": nn.Linear(llm, llm, bias=False),
                    "o": nn.Linear(llm, llm, bias=False), "n2": RMSNorm(llm),
                    "gate": nn.Linear(llm, 688, bias=False), "up": nn.Linear(llm, 688, bias=False),
                    "down": nn.Linear(688, llm, bias=False)}))
            self.norm = RMSNorm(llm)
            self.out = nn.Linear(4 * llm, OUT)
            with torch.no_grad():
                for t in (self.bos, self.prompt):
                    t.normal_(0, 0.02)
                if queries == "learned":
                    self.queries.normal_(0, 0.02)
                if init == "reference":
                    for m in self.vit.blocks.modules():
                        if isinstance(m, nn.TransformerEncoderLayer):
                            for w in (m.self_attn.in_proj_weight, m.self_attn.out_proj.weight,
                                      m.linear1.weight, m.linear2.weight):
                                nn.init.trunc_normal_(w, std=0.02, a=-2, b=2)
                            for b in (m.self_attn.in_proj_bias, m.self_attn.out_proj.bias,
                                      m.linear1.bias, m.linear2.bias):
                                b.zero_()
                    for layer in self.layers:
                        for k in ("q", "k", "v", "o", "gate", "up", "down"):
                            layer[k].weight.normal_(0, 0.02)
            n = 1 + (SIZE // 16) ** 2 + 20 + 1 + 32
            hd = llm // self.heads
            inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
            ang = torch.arange(n).float()[:, None] * inv[None]
            self.register_buffer("cos", torch.cat([ang.cos(), ang.cos()], -1))
            self.register_buffer("sin", torch.cat([ang.sin(), ang.sin()], -1))

        def rope(self, x):
            half = x.shape[-1] // 2
            rot = torch.cat([-x[..., half:], x[..., :half]], -1)
            return x * self.cos + rot * self.sin

        def forward(self, x):
            # The robot state is held at zero (a constant proprio token): the probe asks what
            # the image path learns, and the hand position would tell the goal in fixed-start
            # demos.
            b = x.shape[0]
            state = x.new_zeros(b, 4)
            h = torch.cat([self.bos.expand(b, -1, -1), self.projector(self.vit.tokens(x)),
                           self.prompt.expand(b, -1, -1), self.proprio(state)[:, None],
                           self.queries.expand(b, -1, -1)], 1)
            s, hd = h.shape[1], self.llm // self.heads
            for layer in self.layers:
                a = layer["n1"](h)
                q, k, v = (layer[n](a).view(b, s, self.heads, hd).transpose(1, 2) for n in "qkv")
                att = F.scaled_dot_product_attention(self.rope(q), self.rope(k), v)
                h = h + layer["o"](att.transpose(1, 2).reshape(b, s, self.llm))
                a = layer["n2"](h)
                h = h + layer["down"](F.silu(layer["gate"](a)) * layer["up"](a))
            act = self.norm(h)[:, -32:].reshape(b, 8, 4 * self.llm)
            return self.out(act.mean(1))

    if args.arch == "oft":
        net = OftTrunk(queries=args.oft_queries, init=args.oft_init)
    elif args.arch == "vla":
        net = FusionVLA()
    else:
        net = SpatialSoftmaxCNN() if args.arch == "cnn" else ViT(stem={"vit": "linear", "vit-hmlp": "hmlp", "vit-conv": "conv"}[args.arch])
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    params = sum(p.numel() for p in net.parameters())

    def prep(u8):
        return (u8.float() / 255.0 - 0.5) / 0.5

    def evaluate():
        net.eval()
        with torch.no_grad():
            pred = torch.cat([net(prep(x_te[i:i + 256])) for i in range(0, len(x_te), 256)]).numpy()
        net.train()
        err = np.linalg.norm((pred * std + mean)[:, scored] - y_te, axis=1)
        return err.mean() * 100, (err < 0.05).mean()

    g = torch.Generator().manual_seed(args.seed)
    start = time.time()
    recent = []
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / 100) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(x_tr), (args.batch,), generator=g)
        loss = F.l1_loss(net(prep(x_tr[idx])), y_tr[idx])
        recent.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.report == 0 or step == args.steps:
            cm, within = evaluate()
            print(f"step {step} train L1 {np.mean(recent):.3f} (mean since the last report) held-out {cm:.1f} cm, {within:.0%} within 5 cm "
                  f"({time.time() - start:.0f} s)", flush=True)
            recent = []
    base = np.linalg.norm(target[tr][:, scored].mean(0) - y_te, axis=1)
    cm, within = evaluate()
    print(json.dumps({"arch": args.arch, "params": params, "target": args.target, "train": args.train,
                      "test": args.test, "train_frames": int(tr.sum()), "steps": args.steps,
                      "held_out_cm": round(float(cm), 2), "within_5cm": round(float(within), 3),
                      "mean_predictor_cm": round(float(base.mean() * 100), 2),
                      "mean_predictor_within_5cm": round(float((base < 0.05).mean()), 3),
                      "seconds": round(time.time() - start)}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract", help="decode a LeRobot dataset's frames and targets into an npz")
    e.add_argument("--demos", required=True)
    e.add_argument("--out", required=True)
    t = sub.add_parser("train", help="train and evaluate a probe (PyTorch)")
    t.add_argument("--data", required=True)
    t.add_argument("--train", required=True, help="episode ranges, e.g. 0:50,100:500")
    t.add_argument("--test", required=True)
    t.add_argument("--arch", choices=["vit", "vit-hmlp", "vit-conv", "cnn", "vla", "oft"], required=True)
    t.add_argument("--oft-queries", choices=["zero", "learned"], default="zero",
                   help="--arch oft: input embeddings of the action positions")
    t.add_argument("--oft-init", choices=["reference", "torch"], default="reference",
                   help="--arch oft: openvla init's weight laws or PyTorch's defaults")
    t.add_argument("--target", choices=["goal", "object", "env"], default="goal",
                   help="what to regress: the goal, the object, or both (env; as the policy's "
                        "auxiliary head); the held-out error is the goal's (the object's with object)")
    t.add_argument("--norm", choices=["zscore", "bounds"], default="zscore",
                   help="target normalization: z-score, or the engine's bounds_q99 ([q01, q99] "
                        "to [-1, 1], clipped), which makes the L1 comparable with its aux_l1_loss")
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--report", type=int, default=250)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    extract(args) if args.cmd == "extract" else train(args)


if __name__ == "__main__":
    main()
