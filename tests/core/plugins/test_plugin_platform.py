"""The resolved Platform: reference fallbacks (logged), op tables, attention-backend and
quant-method ranking."""

from __future__ import annotations

import dataclasses
import logging
import types
from collections.abc import Callable
from typing import Any

import pytest
import torch

from kvplane.attention.backend import AttentionBackend, AttentionImpl
from kvplane.attention.reference import ReferenceAttentionBackend
from kvplane.ops import OP_NAMES, reference
from kvplane.plugins import Platform, register_platform, select_platform
from kvplane.plugins.types import (
    AttentionSpec,
    BlockCopyRequest,
    GraphCaptureRequest,
    KVCacheSpec,
    LayerQuantSpec,
    OpsQuery,
)
from kvplane.quantization.base import QuantMethod
from kvplane.quantization.unquantized import UnquantizedMethod

MakePlatform = Callable[..., types.ModuleType]  # the make_platform fixture (conftest.py)
PLATFORM_LOGGER = "kvplane.plugins.platform"
OPTIONAL_HOOKS = (
    "kvplane_ops",
    "kvplane_attention_backends",
    "kvplane_quant_methods",
    "kvplane_communicator",
    "kvplane_profile_memory",
    "kvplane_allocate_kv_cache",
    "kvplane_copy_blocks",
)


def _platform(make_platform: MakePlatform, name: str = "mini", **hooks: Any) -> Platform:
    register_platform(name, make_platform(name, **hooks))
    return select_platform(name)


def _spec(head_size: int = 64, num_heads: int = 4, num_kv_heads: int = 2) -> AttentionSpec:
    return AttentionSpec(num_heads, num_kv_heads, head_size, torch.float32, 16, head_size**-0.5)


# -- reference fallbacks ---------------------------------------------------------------


def test_minimal_platform_falls_back_to_the_reference_and_logs_it(
    make_platform: MakePlatform, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger=PLATFORM_LOGGER):
        platform = _platform(make_platform)
    hooks_line = f"'mini' uses the torch reference for {', '.join(sorted(OPTIONAL_HOOKS))}"
    assert hooks_line in caplog.text  # one line, and no hook the reference lacks
    assert f"'mini' uses the reference ops {', '.join(OP_NAMES)}" in caplog.text
    for op_name in OP_NAMES:
        assert getattr(platform.ops, op_name) is getattr(reference, op_name)

    assert isinstance(platform.attention_backend(_spec()), ReferenceAttentionBackend)
    assert isinstance(
        platform.quant_method(LayerQuantSpec("none", 8, 8, torch.float32)), UnquantizedMethod
    )
    # No reference graph runner: the engine asks only platforms that capture.
    assert platform.graph_runner(GraphCaptureRequest(torch.device("cpu"), (1, 2))) is None
    cache = platform.allocate_kv_cache(KVCacheSpec(3, 16, 2, 8, torch.float16, torch.device("cpu")))
    assert cache.shape == (2, 3, 16, 2, 8) and cache.dtype == torch.float16


def test_reference_copy_blocks(make_platform: MakePlatform) -> None:
    platform = _platform(make_platform)
    cache = torch.arange(2 * 4 * 2, dtype=torch.float32).reshape(2, 4, 2, 1, 1)
    expected = cache.clone()
    expected[:, 3] = cache[:, 0]
    expected[:, 2] = cache[:, 0]
    platform.copy_blocks(BlockCopyRequest((cache,), (0, 0), (3, 2)))
    assert torch.equal(cache, expected)


def test_platform_hooks_win_over_the_reference(
    make_platform: MakePlatform, caplog: pytest.LogCaptureFixture
) -> None:
    def kvplane_allocate_kv_cache(spec: KVCacheSpec) -> torch.Tensor:
        return torch.full(spec.shape, 7.0, dtype=spec.dtype)

    with caplog.at_level(logging.INFO, logger=PLATFORM_LOGGER):
        platform = _platform(make_platform, kvplane_allocate_kv_cache=kvplane_allocate_kv_cache)
    assert "kvplane_allocate_kv_cache" not in caplog.text
    cache = platform.allocate_kv_cache(KVCacheSpec(1, 2, 1, 1, torch.float32, torch.device("cpu")))
    assert bool((cache == 7.0).all())


def test_missing_required_hook_is_an_error(make_platform: MakePlatform) -> None:
    register_platform("nomem", make_platform("nomem", memory=False))
    with pytest.raises(
        ValueError, match=r"does not implement required hooks \['kvplane_device_memory'\]"
    ):
        select_platform("nomem")


# -- ops ------------------------------------------------------------------------------


def test_platform_op_overrides_only_what_it_offers(
    make_platform: MakePlatform, caplog: pytest.LogCaptureFixture
) -> None:
    def fast_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return x

    def kvplane_ops(query: OpsQuery) -> dict[str, Callable[..., Any]]:
        assert query.device_type == "cpu"
        return {"rms_norm": fast_rms_norm}

    with caplog.at_level(logging.INFO, logger=PLATFORM_LOGGER):
        platform = _platform(make_platform, kvplane_ops=kvplane_ops)
    assert platform.ops.rms_norm is fast_rms_norm
    assert platform.ops.silu_and_mul is reference.silu_and_mul
    reference_ops = caplog.text.split("uses the reference ops ")[1].split("\n")[0].split(", ")
    assert "silu_and_mul" in reference_ops and "rms_norm" not in reference_ops


def test_ops_hook_may_take_no_arguments(make_platform: MakePlatform) -> None:
    # pluggy lets an implementation accept a subset of the spec's arguments.
    def my_silu(x: torch.Tensor) -> torch.Tensor:
        return x

    def kvplane_ops() -> dict[str, Callable[..., Any]]:
        return {"silu_and_mul": my_silu}

    assert _platform(make_platform, kvplane_ops=kvplane_ops).ops.silu_and_mul is my_silu


def test_ops_hook_returning_none_uses_the_reference(make_platform: MakePlatform) -> None:
    platform = _platform(make_platform, kvplane_ops=lambda query: None)
    assert platform.ops.gelu_and_mul is reference.gelu_and_mul


def test_unknown_op_name_is_an_error(make_platform: MakePlatform) -> None:
    register_platform("typo", make_platform("typo", kvplane_ops=lambda query: {"rms_nrom": abs}))
    with pytest.raises(ValueError, match=r"unknown ops \{'rms_nrom'\}"):
        select_platform("typo")


# -- attention backends ---------------------------------------------------------------


class FakeBackend(AttentionBackend):
    def __init__(self, name: str, priority: int, max_head_size: int | None = None) -> None:
        self.name = name
        self.priority = priority
        self.max_head_size = max_head_size

    def cannot_serve(self, spec: AttentionSpec) -> str | None:
        if self.max_head_size is not None and spec.head_size > self.max_head_size:
            return f"head size {spec.head_size} > {self.max_head_size}"
        return None

    def make_impl(self, spec: AttentionSpec) -> AttentionImpl:
        raise NotImplementedError


def test_attention_backend_ranking(
    make_platform: MakePlatform, caplog: pytest.LogCaptureFixture
) -> None:
    backends = [
        FakeBackend("medium", 5),
        FakeBackend("fast", 10, max_head_size=128),
        FakeBackend("slow", 1),
    ]
    calls: list[AttentionSpec] = []

    def kvplane_attention_backends(spec: AttentionSpec) -> list[AttentionBackend]:
        calls.append(spec)
        return backends

    platform = _platform(make_platform, kvplane_attention_backends=kvplane_attention_backends)
    assert platform.attention_backend(_spec(head_size=128)).name == "fast"
    with caplog.at_level(logging.INFO, logger=PLATFORM_LOGGER):
        assert platform.attention_backend(_spec(head_size=256)).name == "medium"
    assert "'fast' cannot serve: head size 256 > 128" in caplog.text
    # Resolved once per spec.
    platform.attention_backend(_spec(head_size=128))
    assert len(calls) == 2


def test_attention_falls_back_to_the_reference_when_no_backend_can_serve(
    make_platform: MakePlatform,
) -> None:
    platform = _platform(
        make_platform, kvplane_attention_backends=lambda spec: [FakeBackend("tiny", 9, 32)]
    )
    assert platform.attention_backend(_spec(head_size=64)).name == "reference"


def test_attention_error_lists_every_reason(make_platform: MakePlatform) -> None:
    platform = _platform(
        make_platform, kvplane_attention_backends=lambda spec: [FakeBackend("tiny", 9, 32)]
    )
    with pytest.raises(ValueError, match=r"tiny: head size 64 > 32; reference: num_heads 3"):
        platform.attention_backend(_spec(num_heads=3, num_kv_heads=2))


def test_the_error_names_the_platform(make_platform: MakePlatform) -> None:
    platform = _platform(make_platform, kvplane_attention_backends=lambda spec: [])
    with pytest.raises(ValueError, match=r"^platform 'mini': no attention backend can serve"):
        platform.attention_backend(_spec(num_heads=3, num_kv_heads=2))


class Fp8Backend(FakeBackend):
    supports_fp8_kv_cache = True


def test_fp8_caches_go_only_to_backends_that_read_them(
    make_platform: MakePlatform, caplog: pytest.LogCaptureFixture
) -> None:
    """FakeBackend's cannot_serve skips super(): selection still refuses it an FP8 cache
    (the reference serves it, the log says why), and picks a backend that reads one."""
    fp8_spec = dataclasses.replace(_spec(), kv_cache_dtype=torch.float8_e4m3fn)
    older = _platform(
        make_platform, kvplane_attention_backends=lambda spec: [FakeBackend("older", 9)]
    )
    assert older.attention_backend(_spec()).name == "older"
    with caplog.at_level(logging.INFO, logger=PLATFORM_LOGGER):
        assert older.attention_backend(fp8_spec).name == "reference"
    assert (
        "'older' cannot serve: kv_cache_dtype torch.float8_e4m3fn: backend 'older' does not "
        "read FP8 KV caches (it does not set supports_fp8_kv_cache)"
    ) in caplog.text
    newer = _platform(
        make_platform,
        "newer",
        kvplane_attention_backends=lambda spec: [FakeBackend("older", 9), Fp8Backend("fp8", 5)],
    )
    assert newer.attention_backend(fp8_spec).name == "fp8"


# -- quantization methods -------------------------------------------------------------


class FakeQuant(UnquantizedMethod):
    def __init__(self, name: str, priority: int, min_input: int = 0) -> None:
        self.name = name
        self.priority = priority
        self.min_input = min_input

    def can_implement(self, spec: LayerQuantSpec) -> tuple[bool, str]:
        if spec.input_size < self.min_input:
            return False, f"input_size {spec.input_size} < {self.min_input}"
        return True, ""


REFERENCE_QUANT_METHODS = ("fp8", "int8", "gptq", "awq", "gguf")


def test_quant_method_ranking_and_reasons(make_platform: MakePlatform) -> None:
    methods: list[QuantMethod] = [
        FakeQuant("alpha", 1),
        FakeQuant("alpha", 5, min_input=128),
        FakeQuant("beta", 3, min_input=1024),
    ]
    platform = _platform(make_platform, kvplane_quant_methods=lambda spec: methods)
    # The core's reference offers fp8, int8, gptq, awq and gguf on every platform.
    assert platform.quant_method_names(LayerQuantSpec("none", 8, 8, torch.float32)) == {
        "none",
        "alpha",
        "beta",
        *REFERENCE_QUANT_METHODS,
    }
    assert platform.quant_method(LayerQuantSpec("alpha", 256, 8, torch.float32)) is methods[1]
    assert platform.quant_method(LayerQuantSpec("alpha", 64, 8, torch.float32)) is methods[0]
    with pytest.raises(ValueError, match="input_size 64 < 1024"):
        platform.quant_method(LayerQuantSpec("beta", 64, 8, torch.float32))
    with pytest.raises(
        ValueError,
        match=r"'nf4' is not offered.*\['alpha', 'awq', 'beta', 'fp8', 'gguf', 'gptq', 'int8', "
        r"'none'\]",
    ):
        platform.quant_method(LayerQuantSpec("nf4", 64, 8, torch.float32))


def test_reference_quant_method_is_a_logged_fallback(
    make_platform: MakePlatform, caplog: pytest.LogCaptureFixture
) -> None:
    own = FakeQuant("int8", 1)
    platform = _platform(make_platform, kvplane_quant_methods=lambda spec: [own])
    with caplog.at_level(logging.INFO, logger="kvplane.plugins.platform"):
        assert platform.quant_method(LayerQuantSpec("int8", 64, 8, torch.float32)) is own
        fallback = platform.quant_method(LayerQuantSpec("fp8", 64, 8, torch.float32))
        platform.quant_method(LayerQuantSpec("fp8", 64, 16, torch.float32))
    assert fallback.is_reference_fallback and fallback.name == "fp8"
    notes = [r.getMessage() for r in caplog.records if "torch reference" in r.getMessage()]
    assert len(notes) == 1 and "'fp8'" in notes[0], notes


def test_graph_capture_request_keeps_its_pre_1_4_names() -> None:
    import torch

    from kvplane.plugins.types import GraphCaptureRequest

    request = GraphCaptureRequest(torch.device("cpu"), (1, 2, 4), step_kind="mixed")
    assert request.batch_sizes == request.bucket_sizes == (1, 2, 4)
    assert request.enabled
