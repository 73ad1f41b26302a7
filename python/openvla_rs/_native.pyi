"""Type stubs of the native module (crates/openvla-py)."""

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt

__version__: str

ImageLike = Any  # PIL.Image.Image or an HxWx3 uint8 numpy array

class OpenVLAError(RuntimeError):
    """A model file is invalid, or the engine failed while running."""

class Policy:
    """An OpenVLA policy loaded from a Hugging Face model directory."""

    @classmethod
    def from_pretrained(
        cls,
        model_dir: Union[str, "os.PathLike[str]"],
        precision: str = "auto",
        quantize: Optional[str] = None,
        compute: str = "f32",
    ) -> "Policy": ...
    def predict_action(
        self,
        image: ImageLike,
        instruction: str,
        unnorm_key: Optional[str] = None,
        *,
        images: Optional[Union[Mapping[str, ImageLike], Sequence[ImageLike]]] = None,
        proprio: Optional[Union[Sequence[float], npt.NDArray[Any]]] = None,
    ) -> npt.NDArray[np.float64]: ...
    def predict(
        self,
        image: ImageLike,
        instruction: str,
        unnorm_key: Optional[str] = None,
        *,
        images: Optional[Union[Mapping[str, ImageLike], Sequence[ImageLike]]] = None,
        proprio: Optional[Union[Sequence[float], npt.NDArray[Any]]] = None,
    ) -> Dict[str, Any]: ...
    def predict_batch(
        self,
        images: Sequence[ImageLike],
        instructions: Union[str, Sequence[str]],
        unnorm_key: Optional[Union[str, Sequence[Optional[str]]]] = None,
    ) -> List[npt.NDArray[np.float64]]: ...
    def action_dim(self, unnorm_key: Optional[str] = None) -> int: ...
    @property
    def norm_stats(self) -> Dict[str, Dict[str, Any]]: ...
    @property
    def unnorm_keys(self) -> List[str]: ...
    @property
    def config(self) -> Dict[str, Any]: ...
    @property
    def family(self) -> str: ...
    @property
    def chunk_size(self) -> int: ...
    @property
    def image_keys(self) -> List[str]: ...
    @property
    def proprio_dim(self) -> Optional[int]: ...
    @property
    def compute(self) -> str: ...
    @property
    def model_dir(self) -> str: ...
