"""Triton kernels of the CUDA platform, each checked against its plain-torch twin in the
core's reference (:mod:`kvplane.ops.reference`, :mod:`kvplane.attention.reference`):

- :mod:`.paged_attention`: the unified attention kernel (prefill chunks and decodes in one
  launch) and the tile helpers it shares with decode;
- :mod:`.decode_attention`: split-KV decode, one new token per sequence, the partitions
  merged in the same launch;
- :mod:`.cache`: ``reshape_and_cache``, the KV-cache write (quantizing into an FP8 cache);
- :mod:`.norm`: ``rms_norm`` and ``fused_add_rms_norm``;
- :mod:`.rotary`: ``rotary_embedding``, in place;
- :mod:`.activation`: ``silu_and_mul`` and ``gelu_and_mul``;
- :mod:`.sampling`: ``top_k_top_p_sample`` without sorting the vocabulary.

Modules here import ``triton`` at module level; :mod:`kvplane_cuda.plugin` (and the
modules it imports) must only import them lazily, when an op table or attention layer is
built, so that the plugin still loads on machines without Triton or a GPU.
"""
