# Loader shim written by raven_video: `pip install raven-video`, then
# DiffusionPipeline.from_pretrained(<this repo>, trust_remote_code=True) returns a CausalWanPipeline.
from raven_video.pipelines.pipeline_causal_wan import CausalWanPipeline  # noqa: F401
