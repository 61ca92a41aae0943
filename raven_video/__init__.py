"""RAVEN-video: real-time autoregressive video generation (RAVEN, arXiv 2605.15190) on the Hugging Face stack.

Public names are imported lazily so that ``import raven_video`` stays cheap and optional extras
(rewards, evaluation) are only needed when used.
"""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "CausalWanTransformer3DModel": "raven_video.models.transformer_causal_wan",
    "WanKVCache": "raven_video.models.kv_cache",
    "CausalWanPipeline": "raven_video.pipelines.pipeline_causal_wan",
    "StreamingWanDecoder": "raven_video.pipelines.vae_streaming",
}

__all__ = list(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'raven_video' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .models.kv_cache import WanKVCache
    from .models.transformer_causal_wan import CausalWanTransformer3DModel
    from .pipelines.pipeline_causal_wan import CausalWanPipeline
    from .pipelines.vae_streaming import StreamingWanDecoder
