"""LeRobot's policy contract over an openvla_rs.Policy: ``select_action(batch)`` and ``reset()``.

LeRobot's evaluation loop (``lerobot-eval``) and robot scripts hand a policy one batch per
control step::

    {
        "observation.images.<camera>": float tensor [B, C, H, W] in [0, 1] (or uint8 [B, H, W, C]),
        "observation.state": float tensor [B, S],
        "task": list of B instructions,
    }

and expect ``select_action`` to return the next action of every environment, ``[B, D]``.
Chunked models (OFT) predict ``K`` actions at once; this adapter keeps a queue of the first
``n_action_steps`` of them and predicts again when it runs dry, as LeRobot's chunked policies
do. ``reset()`` empties the queue (call it at every episode start).

The actions are un-normalized with the model's ``dataset_statistics.json`` (``unnorm_key``),
so no LeRobot normalization processor belongs after this policy.

Neither ``lerobot`` nor ``torch`` is needed: torch is imported only when the batch holds torch
tensors (the answer is then a float32 torch tensor; otherwise a float64 numpy array).
"""

from collections import deque
from typing import Any, Deque, Dict, List, Mapping, Optional, Sequence

import numpy as np

IMAGE_PREFIX = "observation.images."
STATE_KEY = "observation.state"
TASK_KEY = "task"


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _to_numpy(x: Any) -> np.ndarray:
    if _is_torch(x):
        return x.detach().to("cpu").numpy()
    return np.asarray(x)


def to_uint8_hwc(image: Any) -> np.ndarray:
    """One camera frame as the HxWx3 uint8 array the engine takes.

    Accepts LeRobot's float CHW frames in [0, 1] (``uint8 / 255`` of the camera image, which
    ``round(x * 255)`` recovers exactly), float HWC in [0, 1], and uint8 HWC or CHW.
    """
    a = _to_numpy(image)
    if a.ndim != 3:
        raise ValueError(f"expected one image of 3 dimensions (CHW or HWC), got shape {a.shape}")
    if a.shape[0] == 3 and a.shape[-1] != 3:
        a = np.transpose(a, (1, 2, 0))
    if a.shape[-1] != 3:
        raise ValueError(f"expected 3 color channels (CHW or HWC), got shape {a.shape}")
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"expected a float image in [0, 1] or a uint8 image, got dtype {a.dtype}")
    lo, hi = float(a.min()), float(a.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"expected a float image in [0, 1], got values in [{lo}, {hi}]")
    return np.ascontiguousarray(np.rint(a.astype(np.float64) * 255.0).astype(np.uint8))


class OpenVLAPolicy:
    """An ``openvla_rs.Policy`` behind LeRobot's ``select_action(batch)`` / ``reset()``.

    Args:
        policy: the loaded ``openvla_rs.Policy`` (or use ``OpenVLAPolicy.from_pretrained``).
        unnorm_key: the dataset statistics that un-normalize the actions (None when the model
            has exactly one dataset).
        image_keys: batch keys of the cameras in the model's order, primary first; default:
            every ``observation.images.*`` key of the batch, in the batch's order.
        n_action_steps: actions of each predicted chunk to execute before predicting again
            (default: the model's whole chunk, ``policy.chunk_size``; 1 for OpenVLA).
        state_key: batch key of the proprio state (read only by models that take one).
        task_key: batch key of the instructions.
    """

    name = "openvla_rs"

    def __init__(
        self,
        policy: Any,
        unnorm_key: Optional[str] = None,
        image_keys: Optional[Sequence[str]] = None,
        n_action_steps: Optional[int] = None,
        state_key: str = STATE_KEY,
        task_key: str = TASK_KEY,
    ) -> None:
        chunk = int(policy.chunk_size)
        if n_action_steps is None:
            n_action_steps = chunk
        if not 1 <= n_action_steps <= chunk:
            raise ValueError(f"n_action_steps must be in 1..{chunk} (the model's chunk size), got {n_action_steps}")
        self.policy = policy
        self.unnorm_key = unnorm_key
        self.image_keys = list(image_keys) if image_keys is not None else None
        self.n_action_steps = n_action_steps
        self.state_key = state_key
        self.task_key = task_key
        self._queue: Deque[np.ndarray] = deque()

    @classmethod
    def from_pretrained(cls, model_dir: Any, unnorm_key: Optional[str] = None, precision: str = "auto",
                        quantize: Optional[str] = None, **kwargs: Any) -> "OpenVLAPolicy":
        """Loads ``openvla_rs.Policy.from_pretrained(model_dir, precision, quantize)`` and wraps it."""
        import openvla_rs

        policy = openvla_rs.Policy.from_pretrained(model_dir, precision=precision, quantize=quantize)
        return cls(policy, unnorm_key=unnorm_key, **kwargs)

    def reset(self) -> None:
        """Forgets the queued actions; call at the start of every episode."""
        self._queue.clear()

    def _image_keys(self, batch: Mapping[str, Any]) -> List[str]:
        keys = self.image_keys or [k for k in batch if k.startswith(IMAGE_PREFIX)]
        if not keys:
            raise KeyError(f"the batch has no {IMAGE_PREFIX}* key; it has {sorted(batch)}")
        missing = [k for k in keys if k not in batch]
        if missing:
            raise KeyError(f"the batch has no {missing}; it has {sorted(batch)}")
        return keys

    def predict_action_chunk(self, batch: Mapping[str, Any]) -> np.ndarray:
        """Predicts the whole chunk of every environment: float64 ``[B, K, D]``."""
        keys = self._image_keys(batch)
        frames = [_to_numpy(batch[k]) for k in keys]
        n = frames[0].shape[0] if frames[0].ndim == 4 else 1
        if frames[0].ndim == 3:
            frames = [f[None] for f in frames]
        for k, f in zip(keys, frames):
            if f.ndim != 4 or f.shape[0] != n:
                raise ValueError(f"{k}: expected a batch of {n} images [B, C, H, W], got shape {f.shape}")
        if self.task_key not in batch:
            raise KeyError(f"the batch has no {self.task_key!r} (the instructions); it has {sorted(batch)}")
        tasks = batch[self.task_key]
        tasks = [tasks] * n if isinstance(tasks, str) else list(tasks)
        if len(tasks) != n:
            raise ValueError(f"{self.task_key}: expected {n} instructions (one per image), got {len(tasks)}")
        n_images = len(self.policy.image_keys)
        if len(keys) < n_images:
            raise ValueError(f"the model takes {n_images} images, the batch has {keys}")
        states = None
        if self.policy.proprio_dim is not None:
            if self.state_key not in batch:
                raise KeyError(f"the model takes a state but the batch has no {self.state_key!r}")
            states = _to_numpy(batch[self.state_key]).reshape(n, -1).astype(np.float64)
        primary = [to_uint8_hwc(frames[0][b]) for b in range(n)]
        if n_images == 1 and states is None:
            answers = self.policy.predict_batch(primary, tasks, self.unnorm_key)
        else:
            answers = []
            for b in range(n):
                extra: Dict[str, np.ndarray] = {
                    k: to_uint8_hwc(f[b]) for k, f in zip(keys[1:n_images], frames[1:n_images])
                }
                answers.append(
                    self.policy.predict_action(
                        primary[b],
                        tasks[b],
                        self.unnorm_key,
                        images=extra or None,
                        proprio=None if states is None else states[b],
                    )
                )
        chunks = [np.asarray(a, dtype=np.float64) for a in answers]
        chunks = [c[None] if c.ndim == 1 else c for c in chunks]
        return np.stack(chunks)

    def select_action(self, batch: Mapping[str, Any]) -> Any:
        """The next action of every environment, ``[B, D]``.

        Predicts a chunk when the queue is empty and queues its first ``n_action_steps``
        actions; later calls pop the queue without running the model (their observations are
        not read).
        """
        if not self._queue:
            chunk = self.predict_action_chunk(batch)  # [B, K, D]
            for step in range(self.n_action_steps):
                self._queue.append(chunk[:, step, :])
        action = self._queue.popleft()
        if any(_is_torch(v) for v in batch.values()):
            import torch

            return torch.as_tensor(action, dtype=torch.float32)
        return action
