#!/usr/bin/env python3
"""Check that `.pt` state dicts written by openvla-rs (`openvla::oft::pt::write_state_dict`) load in PyTorch.

Each file is loaded with `torch.load(path, weights_only=True)` (the restricted unpickler the reference's
`experiments/robot/openvla_utils.py` path can use), and every tensor is compared byte for byte with the raw
storage in the archive (`<archive>/data/<n>`, read here with zipfile/numpy, independently of torch's reader).
It prints one line per tensor (name, dtype, shape) and exits non-zero on the first mismatch.

    python tools/reference/check_pt.py FILE.pt [FILE.pt ...]
    python tools/reference/check_pt.py --state-dict MODEL_DIR   # also loads the head into the reference's
                                                                # MLPResNet / ProprioProjector shapes

Needs only torch (tools/reference/requirements.txt); CI never runs it.
"""
import argparse
import collections
import pickle
import sys
import zipfile

import numpy as np
import torch


class _StorageIds(pickle.Unpickler):
    """Unpickles data.pkl just far enough to map each tensor name to its storage key (no torch involved)."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *rest: (storage, offset, tuple(size), tuple(stride))
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage"):
            return name
        raise pickle.UnpicklingError(f"unexpected global {module}.{name}")

    def persistent_load(self, pid):
        kind, storage_type, key, location, numel = pid
        assert kind == "storage" and location == "cpu", pid
        return (storage_type, key, numel)


NUMPY = {"FloatStorage": np.float32, "BFloat16Storage": np.uint16}


def check(path):
    sd = torch.load(path, weights_only=True, map_location="cpu")
    assert isinstance(sd, collections.OrderedDict), f"{path}: top-level object is {type(sd)}, not OrderedDict"
    with zipfile.ZipFile(path) as z:
        pkl = [n for n in z.namelist() if n.endswith("/data.pkl")]
        assert len(pkl) == 1, f"{path}: expected one data.pkl, found {pkl}"
        prefix = pkl[0][: -len("data.pkl")]
        raw = _StorageIds(__import__("io").BytesIO(z.read(pkl[0]))).load()
        assert list(raw) == list(sd), f"{path}: key order differs"
        for name, t in sd.items():
            (storage_type, key, numel), offset, size, stride = raw[name]
            data = np.frombuffer(z.read(f"{prefix}data/{key}"), dtype=NUMPY[storage_type])
            assert data.size == numel, f"{name}: storage holds {data.size} elements, pickle says {numel}"
            assert tuple(t.shape) == size and t.stride() == stride, f"{name}: shape/stride mismatch"
            mine = t.contiguous().view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32).numpy()
            want = data[offset : offset + t.numel()].view(np.int16 if t.dtype == torch.bfloat16 else np.int32)
            assert np.array_equal(mine.reshape(-1), want), f"{name}: values differ from the raw storage"
            print(f"  {name:50s} {str(t.dtype):16s} {list(t.shape)}")
    return sd


def _mlp_resnet_like(blocks, inp, hidden, out):
    """A module with the parameter names and shapes of OFT's L1RegressionActionHead (oft-spec: `model.` holds
    layer_norm1, fc1, mlp_resnet_blocks[i].ffn = (LayerNorm, Linear, ReLU), layer_norm2, fc2), for a strict
    load_state_dict."""
    nn = torch.nn
    body = nn.Module()
    body.layer_norm1, body.fc1 = nn.LayerNorm(inp), nn.Linear(inp, hidden)
    body.mlp_resnet_blocks = nn.ModuleList()
    for _ in range(blocks):
        block = nn.Module()
        block.ffn = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.ReLU())
        body.mlp_resnet_blocks.append(block)
    body.layer_norm2, body.fc2 = nn.LayerNorm(hidden), nn.Linear(hidden, out)
    head = nn.Module()
    head.model = body
    return head


def check_model_dir(model_dir):
    """Loads the OFT component files of an `openvla init` directory into the reference's module shapes."""
    import glob
    import os

    for f in sorted(glob.glob(os.path.join(model_dir, "*_checkpoint.pt"))):
        print(f)
        sd = check(f)
        stripped = {k.removeprefix("module."): v for k, v in sd.items()}
        if "action_head" in os.path.basename(f):
            blocks = len({k.split(".")[2] for k in stripped if k.startswith("model.mlp_resnet_blocks.")})
            hidden, inp = stripped["model.fc1.weight"].shape
            out = stripped["model.fc2.weight"].shape[0]
            print(f"    MLPResNet(num_blocks={blocks}, input_dim={inp}, hidden_dim={hidden}, output_dim={out})")
            head = _mlp_resnet_like(blocks, inp, hidden, out)
            head.load_state_dict({k: v.float() for k, v in stripped.items()}, strict=True)
            for k, v in stripped.items():
                if "layer_norm" in k or ".ffn.0." in k:
                    want = 1.0 if k.endswith("weight") else 0.0
                    assert torch.all(v.float() == want), f"{k}: LayerNorm not at its default init"
        if "proprio_projector" in os.path.basename(f):
            llm, p = stripped["fc1.weight"].shape
            print(f"    ProprioProjector(llm_dim={llm}, proprio_dim={p})")
            proj = torch.nn.Module()
            proj.fc1, proj.fc2 = torch.nn.Linear(p, llm), torch.nn.Linear(llm, llm)
            proj.load_state_dict(stripped, strict=True)
            bound = 1 / p**0.5
            assert stripped["fc1.weight"].abs().max() <= bound, "fc1 exceeds nn.Linear's default bound"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*")
    ap.add_argument("--state-dict", metavar="MODEL_DIR", help="check the component files of a model directory")
    a = ap.parse_args()
    if not a.files and not a.state_dict:
        ap.error("give .pt files or --state-dict MODEL_DIR")
    for f in a.files:
        print(f)
        check(f)
    if a.state_dict:
        check_model_dir(a.state_dict)
    print("ok")


if __name__ == "__main__":
    sys.exit(main())
