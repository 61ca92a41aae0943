# Loader shim written by raven_video (see ../pipeline_causal_wan.py).
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers resolves the loader by this name)
from raven_video.models.transformer_causal_wan import CausalWanTransformer3DModel  # noqa: F401
