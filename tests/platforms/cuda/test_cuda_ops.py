"""The CUDA platform's Triton ops against the reference, on fresh random inputs.

On the CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set before
Triton is imported; ``scripts/test.sh`` exports it) on small shapes in float32 and
float16 (the interpreter rounds bfloat16 by truncation, so bfloat16 runs only on a GPU).
On a GPU, without the interpreter, every case also runs compiled, in bfloat16 too, and
the ``realistic`` tests add model-sized shapes and CUDA-graph capture. Sampling is in
``test_cuda_sampling.py``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kvplane.models.layers.rotary import RotaryEmbedding, inverse_frequencies
from kvplane.ops import OP_NAMES
from kvplane.ops import reference as ref
from kvplane.testing.helpers import assert_close, rope_cos_sin_cache
from tests.platforms.cuda.op_cases import CASE_IDS, CASES, DEVICES, OPS, randn, realistic


def test_offers_only_known_ops() -> None:
    assert set(OPS) <= set(OP_NAMES)
    assert set(OP_NAMES) - set(OPS) == {"fused_moe"}


# -- norms -----------------------------------------------------------------------------

# The last shape is wider than one register block: the two-pass path.
NORM_SHAPES = [(1, 64), (7, 640), (3, 1000), (2, 9000)]


@pytest.mark.parametrize(("device", "dtype"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize(("num_tokens", "hidden_size"), NORM_SHAPES)
def test_rms_norm(
    device: str, dtype: torch.dtype, num_tokens: int, hidden_size: int, generator: torch.Generator
) -> None:
    x = randn((num_tokens, hidden_size), dtype, generator, scale=2.0)
    weight = randn((hidden_size,), dtype, generator)
    x_device = x.to(device, copy=True)
    out = OPS["rms_norm"](x_device, weight.to(device), 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, ref.rms_norm(x, weight, 1e-5))
    assert torch.equal(x_device.cpu(), x), "rms_norm must not mutate its input"


@pytest.mark.parametrize(("device", "dtype"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize(("num_tokens", "hidden_size"), NORM_SHAPES)
def test_fused_add_rms_norm_writes_the_sum_into_residual(
    device: str, dtype: torch.dtype, num_tokens: int, hidden_size: int, generator: torch.Generator
) -> None:
    x = randn((num_tokens, hidden_size), dtype, generator)
    residual = randn((num_tokens, hidden_size), dtype, generator)
    weight = randn((hidden_size,), dtype, generator)
    expected_out, expected_sum = ref.fused_add_rms_norm(x, residual, weight, 1e-6)
    residual_device = residual.to(device, copy=True)
    out, summed = OPS["fused_add_rms_norm"](
        x.to(device, copy=True), residual_device, weight.to(device), 1e-6
    )
    assert summed.data_ptr() == residual_device.data_ptr()
    assert torch.equal(summed.cpu(), expected_sum), "the sum rounds once, like the reference"
    assert_close(out, expected_out)


@pytest.mark.parametrize("device", DEVICES)
def test_norms_take_strided_rows_and_mixed_residual_dtype(
    device: str, generator: torch.Generator
) -> None:
    wide = randn((5, 300), torch.float16, generator).to(device)
    x = wide[:, 20:276]  # [5, 256], row stride 300
    weight = randn((256,), torch.float32, generator).to(device)
    assert_close(OPS["rms_norm"](x, weight, 1e-6), ref.rms_norm(x.cpu(), weight.cpu(), 1e-6))
    residual = randn((5, 256), torch.float32, generator)  # float32 residual, float16 x
    expected = ref.fused_add_rms_norm(x.cpu(), residual, weight.cpu(), 1e-6)
    out, summed = OPS["fused_add_rms_norm"](x.clone(), residual.to(device), weight, 1e-6)
    assert summed.dtype == torch.float16 and torch.equal(summed.cpu(), expected[1])
    assert_close(out, expected[0])


# -- gated activations -----------------------------------------------------------------


@pytest.mark.parametrize(("device", "dtype"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize(("num_tokens", "intermediate_size"), [(1, 64), (7, 640), (3, 1500)])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_gated_activations(
    device: str,
    dtype: torch.dtype,
    num_tokens: int,
    intermediate_size: int,
    activation: str,
    generator: torch.Generator,
) -> None:
    x = randn((num_tokens, 2 * intermediate_size), dtype, generator, scale=3.0)
    x[0, :4] = torch.tensor([-100.0, 100.0, -20.0, 20.0], dtype=dtype)  # saturated gates
    x_device = x.to(device, copy=True)
    if activation == "silu":
        out, expected = OPS["silu_and_mul"](x_device), ref.silu_and_mul(x)
    else:
        approximate = "tanh" if activation == "gelu_tanh" else "none"
        out = OPS["gelu_and_mul"](x_device, approximate)
        expected = ref.gelu_and_mul(x, approximate)
    assert out.shape == (num_tokens, intermediate_size) and out.dtype == dtype
    assert_close(out, expected)


# -- rotary embedding ------------------------------------------------------------------

# (num_tokens, num_heads, num_kv_heads, head_size, rotary_dim)
ROTARY_SHAPES = [
    (5, 4, 4, 64, 64),
    (17, 8, 2, 128, 128),
    (9, 4, 1, 128, 64),  # partial rotary
    (3, 2, 2, 80, 32),  # partial rotary, odd head size
    (4, 40, 8, 64, 64),  # more heads than one program block
]


def _qkv_views(
    num_tokens: int, num_heads: int, num_kv_heads: int, head_size: int, qkv: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key as the attention layer makes them: strided views of one qkv output."""
    q_size, kv_size = num_heads * head_size, num_kv_heads * head_size
    query, key, _ = qkv.split((q_size, kv_size, kv_size), dim=-1)
    return (
        query.reshape(num_tokens, num_heads, head_size),
        key.reshape(num_tokens, num_kv_heads, head_size),
    )


@pytest.mark.parametrize(("device", "dtype"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("is_neox_style", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize(
    ("num_tokens", "num_heads", "num_kv_heads", "head_size", "rotary_dim"), ROTARY_SHAPES
)
def test_rotary_embedding_in_place_on_qkv_views(
    device: str,
    dtype: torch.dtype,
    is_neox_style: bool,
    num_tokens: int,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    rotary_dim: int,
    generator: torch.Generator,
) -> None:
    width = (num_heads + 2 * num_kv_heads) * head_size
    qkv = randn((num_tokens, width), dtype, generator)
    positions = torch.randint(0, 4096, (num_tokens,), generator=generator)
    cos_sin_cache = rope_cos_sin_cache(4096, rotary_dim, dtype)
    query, key = _qkv_views(num_tokens, num_heads, num_kv_heads, head_size, qkv)
    expected_query, expected_key = ref.rotary_embedding(
        positions, query, key, cos_sin_cache, is_neox_style
    )
    qkv_device = qkv.to(device, copy=True)
    query_device, key_device = _qkv_views(
        num_tokens, num_heads, num_kv_heads, head_size, qkv_device
    )
    assert not query_device.is_contiguous()
    out_query, out_key = OPS["rotary_embedding"](
        positions.to(device), query_device, key_device, cos_sin_cache.to(device), is_neox_style
    )
    assert out_query is query_device and out_key is key_device, "rotates in place"
    assert_close(out_query, expected_query)
    assert_close(out_key, expected_key)
    # Value columns and channels past rotary_dim are left alone, bit for bit.
    untouched = qkv_device.cpu().view(num_tokens, -1, head_size)[..., rotary_dim:]
    assert torch.equal(untouched, qkv.view(num_tokens, -1, head_size)[..., rotary_dim:])
    value_start = (num_heads + num_kv_heads) * head_size
    assert torch.equal(qkv_device[:, value_start:].cpu(), qkv[:, value_start:])


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_embedding_with_llama3_scaled_table(device: str, generator: torch.Generator) -> None:
    # The table as the core's RotaryEmbedding builds it for a Llama-3.1 checkpoint.
    params = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    max_position, head_size = 16384, 128
    platform = SimpleNamespace(ops=SimpleNamespace(rotary_embedding=OPS["rotary_embedding"]))
    ctx: Any = SimpleNamespace(platform=platform, device=torch.device(device))
    rotary = RotaryEmbedding(head_size, head_size, max_position, params, True, ctx)
    default, _ = inverse_frequencies(head_size, {**params, "rope_type": "default"}, max_position)
    scaled, _ = inverse_frequencies(head_size, params, max_position)
    assert not torch.allclose(default, scaled), "llama3 scaling changes the low frequencies"

    num_tokens = 6
    positions = torch.randint(0, max_position, (num_tokens,), generator=generator)
    positions[0] = max_position - 1  # past the original context
    query = randn((num_tokens, 8, head_size), torch.float32, generator)
    key = randn((num_tokens, 2, head_size), torch.float32, generator)
    table = rotary.cos_sin_cache.cpu()
    expected_query, expected_key = ref.rotary_embedding(positions, query, key, table, True)
    out_query, out_key = rotary(positions.to(device), query.to(device), key.to(device))
    assert_close(out_query, expected_query)
    assert_close(out_key, expected_key)


# -- KV-cache writes -------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "skipped", [[], [0], [2, 5], [0, 1, 2, 3, 4, 5, 6]], ids=["none", "first", "some", "all"]
)
@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.float32])
def test_reshape_and_cache_skips_negative_slots(
    device: str, skipped: list[int], cache_dtype: torch.dtype, generator: torch.Generator
) -> None:
    # key and value are strided views of one [7, 3 * 2 * 8] qkv tensor, as in attention.
    qkv = randn((7, 48), torch.float32, generator)
    key, value = qkv[:, 16:32].view(7, 2, 8), qkv[:, 32:].view(7, 2, 8)
    slot_mapping = torch.randperm(24, generator=generator)[:7]
    slot_mapping[skipped] = -1
    kv_cache = randn((2, 6, 4, 2, 8), cache_dtype, generator)
    expected = kv_cache.clone()
    ref.reshape_and_cache(key, value, expected, slot_mapping)
    on_device = kv_cache.to(device, copy=True)
    qkv_device = qkv.to(device)
    OPS["reshape_and_cache"](
        qkv_device[:, 16:32].view(7, 2, 8),
        qkv_device[:, 32:].view(7, 2, 8),
        on_device,
        slot_mapping.to(device),
    )
    assert torch.equal(on_device.cpu(), expected)


# -- model-sized shapes and CUDA graphs (GPU only) -------------------------------------

GPU_DTYPES = [torch.bfloat16, torch.float16]
# (num_heads, num_kv_heads, head_size): Llama-3-8B, Qwen3-0.6B
HEAD_LAYOUTS = {"llama3-8b": (32, 8, 128), "qwen3-0.6b": (16, 8, 128)}


@realistic
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("hidden_size", [4096, 1024])
def test_norms_at_model_size(
    dtype: torch.dtype, hidden_size: int, generator: torch.Generator
) -> None:
    x, residual = (randn((4096, hidden_size), dtype, generator) for _ in range(2))
    weight = randn((hidden_size,), dtype, generator)
    assert_close(OPS["rms_norm"](x.cuda(), weight.cuda(), 1e-5), ref.rms_norm(x, weight, 1e-5))
    expected_out, expected_sum = ref.fused_add_rms_norm(x, residual, weight, 1e-5)
    out, summed = OPS["fused_add_rms_norm"](x.cuda(), residual.cuda(), weight.cuda(), 1e-5)
    assert torch.equal(summed.cpu(), expected_sum)
    assert_close(out, expected_out)


@realistic
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize(("num_tokens", "intermediate_size"), [(512, 14336), (4096, 3072)])
def test_gated_activations_at_model_size(
    dtype: torch.dtype, num_tokens: int, intermediate_size: int, generator: torch.Generator
) -> None:
    x = randn((num_tokens, 2 * intermediate_size), dtype, generator, scale=3.0)
    assert_close(OPS["silu_and_mul"](x.cuda()), ref.silu_and_mul(x))
    for approximate in ("none", "tanh"):
        assert_close(OPS["gelu_and_mul"](x.cuda(), approximate), ref.gelu_and_mul(x, approximate))


@realistic
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
def test_rotary_embedding_at_model_size(
    dtype: torch.dtype, layout: str, generator: torch.Generator
) -> None:
    num_heads, num_kv_heads, head_size = HEAD_LAYOUTS[layout]
    num_tokens = 4096
    qkv = randn((num_tokens, (num_heads + 2 * num_kv_heads) * head_size), dtype, generator)
    positions = torch.randint(0, 32768, (num_tokens,), generator=generator)
    cos_sin_cache = rope_cos_sin_cache(32768, head_size, torch.float32, base=1000000.0)
    query, key = _qkv_views(num_tokens, num_heads, num_kv_heads, head_size, qkv)
    expected = ref.rotary_embedding(positions, query, key, cos_sin_cache, True)
    query_gpu, key_gpu = _qkv_views(num_tokens, num_heads, num_kv_heads, head_size, qkv.cuda())
    out_query, out_key = OPS["rotary_embedding"](
        positions.cuda(), query_gpu, key_gpu, cos_sin_cache.cuda(), True
    )
    assert_close(out_query, expected[0])
    assert_close(out_key, expected[1])


@realistic
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_reshape_and_cache_at_model_size(dtype: torch.dtype, generator: torch.Generator) -> None:
    num_tokens, num_blocks, block_size, num_kv_heads, head_size = 4096, 512, 16, 8, 128
    key, value = (randn((num_tokens, num_kv_heads, head_size), dtype, generator) for _ in "kv")
    slot_mapping = torch.randperm(num_blocks * block_size, generator=generator)[:num_tokens]
    slot_mapping[torch.rand(num_tokens, generator=generator) < 0.1] = -1
    kv_cache = randn((2, num_blocks, block_size, num_kv_heads, head_size), dtype, generator)
    expected = kv_cache.clone()
    ref.reshape_and_cache(key, value, expected, slot_mapping)
    on_gpu = kv_cache.cuda()
    OPS["reshape_and_cache"](key.cuda(), value.cuda(), on_gpu, slot_mapping.cuda())
    assert torch.equal(on_gpu.cpu(), expected)


@realistic
def test_ops_replay_in_a_cuda_graph(generator: torch.Generator) -> None:
    # Capture fails on any host sync; replay must then track new inputs in the buffers.
    dtype, num_tokens, hidden_size, vocab_size = torch.bfloat16, 64, 1024, 32000
    num_heads, num_kv_heads, head_size = HEAD_LAYOUTS["qwen3-0.6b"]
    qkv_size = (num_heads + 2 * num_kv_heads) * head_size
    x = torch.empty(num_tokens, hidden_size, dtype=dtype, device="cuda")
    residual, weight = torch.empty_like(x), torch.ones(hidden_size, dtype=dtype, device="cuda")
    qkv = torch.empty(num_tokens, qkv_size, dtype=dtype, device="cuda")
    positions = torch.zeros(num_tokens, dtype=torch.int64, device="cuda")
    cos_sin_cache = rope_cos_sin_cache(4096, head_size, torch.float32).cuda()
    kv_cache = torch.zeros(2, 8, 16, num_kv_heads, head_size, dtype=dtype, device="cuda")
    slot_mapping = torch.full((num_tokens,), -1, dtype=torch.int64, device="cuda")
    probs = torch.full((8, vocab_size), 1.0 / vocab_size, device="cuda")
    noise = torch.ones(8, vocab_size, device="cuda")
    limits = [torch.full((8,), 50, device="cuda"), torch.full((8,), 0.9, device="cuda"), None]

    def step() -> tuple[torch.Tensor, ...]:
        normed, summed = OPS["fused_add_rms_norm"](x, residual, weight, 1e-6)
        query, key = _qkv_views(num_tokens, num_heads, num_kv_heads, head_size, qkv)
        OPS["rotary_embedding"](positions, query, key, cos_sin_cache, True)
        value = qkv[:, -num_kv_heads * head_size :].view(num_tokens, num_kv_heads, head_size)
        OPS["reshape_and_cache"](key, value, kv_cache, slot_mapping)
        tokens = OPS["top_k_top_p_sample"](probs, *limits, noise)
        return normed, summed, OPS["silu_and_mul"](normed), tokens

    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()

    new_x, new_residual = (randn((num_tokens, hidden_size), dtype, generator) for _ in "xr")
    new_qkv = randn((num_tokens, qkv_size), dtype, generator)
    new_positions = torch.randint(0, 4096, (num_tokens,), generator=generator)
    new_slots = torch.randperm(8 * 16, generator=generator)[:num_tokens]
    new_probs = (torch.randn(8, vocab_size, generator=generator) * 3.0).softmax(dim=-1)
    new_noise = torch.empty(8, vocab_size).exponential_(generator=generator)
    for buffer, value in [
        (x, new_x), (residual, new_residual), (qkv, new_qkv), (positions, new_positions),
        (slot_mapping, new_slots), (probs, new_probs), (noise, new_noise),
    ]:  # fmt: skip
        buffer.copy_(value)
    graph.replay()
    torch.cuda.synchronize()

    expected_normed, expected_sum = ref.fused_add_rms_norm(new_x, new_residual, weight.cpu(), 1e-6)
    assert_close(outputs[0], expected_normed)
    assert torch.equal(outputs[1].cpu(), expected_sum)
    assert_close(outputs[2], ref.silu_and_mul(outputs[0].cpu()))
    limits_cpu = [None if t is None else t.cpu() for t in limits]
    expected_tokens = ref.top_k_top_p_sample(new_probs, *limits_cpu, new_noise)
    assert outputs[3].cpu().tolist() == expected_tokens.tolist()
    query, key = _qkv_views(num_tokens, num_heads, num_kv_heads, head_size, new_qkv)
    expected_query, expected_key = ref.rotary_embedding(
        new_positions, query, key, cos_sin_cache.cpu(), True
    )
    rotated_query, _ = _qkv_views(num_tokens, num_heads, num_kv_heads, head_size, qkv.cpu())
    assert_close(rotated_query, expected_query)
    expected_cache = torch.zeros(2, 8, 16, num_kv_heads, head_size, dtype=dtype)
    value = new_qkv[:, -num_kv_heads * head_size :].view(num_tokens, num_kv_heads, head_size)
    ref.reshape_and_cache(expected_key, value, expected_cache, new_slots)
    assert_close(kv_cache, expected_cache)  # rotated keys: within rounding
