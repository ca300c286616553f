"""Loading streams weights: peak host memory stays under 1.3x the model's size.

Measured in a fresh process from the kernel's resident-set high-water mark (VmHWM,
reset just before loading), so nothing else in the test session counts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SAVE = """
import sys, torch
from kvplane.testing.models import save_random_model, tiny_llama_config
config = tiny_llama_config(vocab_size=32000, hidden_size=512, intermediate_size=2048,
                           num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
save_random_model(config, sys.argv[1])
"""

LOAD = """
import json, sys, torch
from kvplane.models.config import load_hf_config
from kvplane.models.layers.context import BuildContext
from kvplane.models.loader import build_model
from kvplane.models.source import resolve_model
from kvplane.plugins import select_platform

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

platform = select_platform("cpu")
source = resolve_model(sys.argv[1])
config = load_hf_config(source)
ctx = BuildContext(platform, torch.float32, torch.device("cpu"), 16)
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # reset VmHWM to the current RSS
before = status("VmRSS:")
model = build_model(config, ctx, source)
peak = status("VmHWM:")
model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"model_bytes": model_bytes, "peak_extra_bytes": peak - before}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_host_memory_while_loading_is_under_1_3x_the_model(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-c", SAVE, str(tmp_path)], check=True)
    result = subprocess.run(
        [sys.executable, "-c", LOAD, str(tmp_path)], check=True, capture_output=True, text=True
    )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    ratio = figures["peak_extra_bytes"] / figures["model_bytes"]
    print(f"model {figures['model_bytes'] / 2**20:.0f} MiB, peak while loading {ratio:.2f}x")
    assert figures["model_bytes"] > 150 * 2**20
    assert ratio < 1.3
