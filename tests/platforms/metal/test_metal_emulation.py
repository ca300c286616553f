"""Emulated Metal (``KVPLANE_EMULATE=metal``): the Metal platform's own code on the host.

Probe decisions, the op table, the torch attention path and the unified-memory
budgeting run as on a Mac, selected through the same plugin machinery; the whole engine
gives transformers' greedy tokens in float32.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvplane import LLM, SamplingParams
from kvplane.plugins import PlatformSelectionError, capabilities, probe_platforms, select_platform
from kvplane.plugins.selection import EMULATE_ENV
from kvplane.plugins.types import AttentionSpec
from kvplane.testing.models import hf_greedy_tokens, save_random_model, tiny_llama_config
from kvplane_metal.emulation import DESCRIPTION

pytestmark = pytest.mark.skipif(
    torch.backends.mps.is_available(), reason="a Mac runs the real platform"
)
NUM_TOKENS = 12
PROMPTS = ([5, 17, 99, 3], [200, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [42])


@pytest.fixture
def emulate_metal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EMULATE_ENV, "metal")


def test_unavailable_without_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(EMULATE_ENV, raising=False)
    status = next(status for status in probe_platforms() if status.name == "metal")
    assert not status.available and not status.emulated
    assert status.can_emulate and status.emulation == DESCRIPTION
    with pytest.raises(PlatformSelectionError, match=r"not macOS"):
        select_platform("metal")


@pytest.mark.usefixtures("emulate_metal")
def test_selected_with_the_variable_runs_metals_own_code() -> None:
    platform = select_platform("metal")
    assert platform.emulated and platform.name == "metal"
    assert platform.device(0) == torch.device("cpu", 0)
    assert platform.info.capabilities == frozenset({capabilities.MULTI_DEVICE})
    assert platform.ops.rms_norm.__module__ == "kvplane_metal.ops"
    assert platform.ops.silu_and_mul.__module__ == "kvplane.ops.reference"
    spec = AttentionSpec(8, 2, 64, torch.float16, 16, 0.125)
    assert platform.attention_backend(spec).name == "metal-torch"
    memory = platform.device_memory(0)
    assert 0 < memory.free_bytes < memory.total_bytes  # the working set, not the RAM


def test_kvplane_platforms_shows_metal_with_its_reason_and_as_emulated() -> None:
    kvplane = str(Path(sys.executable).with_name("kvplane"))
    env = {k: v for k, v in os.environ.items() if k not in ("KVPLANE_DEVICE", EMULATE_ENV)}
    rows = {}
    for extra in ({}, {EMULATE_ENV: "metal"}):
        result = subprocess.run(
            [kvplane, "platforms", "--json"],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode in (0, 1), result.stderr
        rows[bool(extra)] = next(r for r in json.loads(result.stdout) if r["name"] == "metal")
    plain, emulated = rows[False], rows[True]
    assert not plain["available"] and plain["reason"].startswith("not macOS")
    assert plain["can_emulate"] and not plain["emulated"]
    assert emulated["available"] and emulated["emulated"] and emulated["selected"]
    assert emulated["reason"] == f"emulated: {DESCRIPTION}"


@pytest.mark.slow
@pytest.mark.usefixtures("emulate_metal")
def test_llm_greedy_matches_transformers_float32(tmp_path: Path) -> None:
    reference = save_random_model(tiny_llama_config(), tmp_path)
    llm = LLM(
        model=str(tmp_path),
        device="metal",
        dtype="float32",
        skip_tokenizer_init=True,
        max_num_batched_tokens=16,  # chunked prefill: mixed steps through the torch path
        kv_cache_memory_bytes=4 << 20,
    )
    assert llm.engine.platform.emulated
    params = SamplingParams(
        temperature=0.0, max_tokens=NUM_TOKENS, min_tokens=NUM_TOKENS, detokenize=False
    )
    outputs = llm.generate([{"prompt_token_ids": list(p)} for p in PROMPTS], params)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        expected = hf_greedy_tokens(reference, list(prompt), NUM_TOKENS)
        assert list(output.outputs[0].token_ids) == expected
