"""The few-step consistency sampler shared by inference and training: flow-matching primitives (:mod:`.flow`) and the
chunk-by-chunk sampler over a KV cache (:mod:`.sampler`). See ``docs/method.md``."""
