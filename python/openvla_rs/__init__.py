"""openvla_rs: OpenVLA robot policies on the openvla-rs engine (Rust), without torch.

    >>> import openvla_rs
    >>> policy = openvla_rs.Policy.from_pretrained("models/openvla-tiny")
    >>> action = policy.predict_action(image, "pick up the red block", unnorm_key="bridge_orig")

``image`` is a PIL.Image or an HxWx3 uint8 numpy array; ``action`` is a float64 numpy array.
Nothing is downloaded: ``from_pretrained`` reads a local Hugging Face model directory.

Other doors over the same engine: ``openvla serve`` (deploy.py's REST ``/act``, or openpi's
websocket protocol with ``--protocol openpi``) and ``openvla_rs.lerobot.OpenVLAPolicy`` (LeRobot's
``select_action`` / ``reset``). See docs/python.md.
"""

from openvla_rs._native import OpenVLAError, Policy, __version__

__all__ = ["OpenVLAError", "Policy", "__version__"]
