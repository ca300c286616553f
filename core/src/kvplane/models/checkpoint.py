"""Streaming named tensors out of checkpoints, one tensor in host memory at a time."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvplane.models.source import ModelSource

#: Called with the number of checkpoint bytes each tensor took in its file.
BytesRead = Callable[[int], None]


def iterate_weights(
    source: ModelSource,
    hf_config: Any,
    on_bytes_read: BytesRead | None = None,
    native_gguf: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(Hugging Face tensor name, tensor)`` pairs from ``source`` (a GGUF file's
    projections as raw blocks with ``native_gguf``: see :func:`iterate_gguf`)."""
    if source.is_gguf:
        assert source.gguf_file is not None
        path = source.directory / source.gguf_file
        yield from iterate_gguf(path, hf_config, on_bytes_read, native=native_gguf)
    else:
        yield from iterate_safetensors(source.directory, on_bytes_read)


def checkpoint_files(source: ModelSource) -> list[Path]:
    """The files ``iterate_weights`` reads."""
    if source.is_gguf:
        assert source.gguf_file is not None
        return [source.directory / source.gguf_file]
    return safetensors_files(source.directory)


def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's shard files: from the index when there is one, else every file."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory} has no *.safetensors files")
    return files


#: safetensors dtype names -> torch dtypes.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def iterate_safetensors(
    directory: Path, on_bytes_read: BytesRead | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Read each tensor with plain ``readinto`` into a fresh buffer, one at a time.

    Unlike a memory map, reading leaves no file pages mapped into the process, so peak
    host memory while loading is the model plus the largest tensor.
    """
    for path in safetensors_files(directory):
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_len))
            data_start = 8 + header_len
            entries = sorted(
                ((name, info) for name, info in header.items() if name != "__metadata__"),
                key=lambda item: item[1]["data_offsets"][0],
            )
            for name, info in entries:
                if info["dtype"] not in _SAFETENSORS_DTYPES:
                    raise ValueError(
                        f"{path.name}: tensor {name} has unsupported dtype {info['dtype']}"
                    )
                start, end = info["data_offsets"]
                tensor = torch.empty(info["shape"], dtype=_SAFETENSORS_DTYPES[info["dtype"]])
                if end > start:
                    handle.seek(data_start + start)
                    data = tensor.reshape(-1).view(torch.uint8).numpy()
                    # numpy's stub declares __buffer__ only for Python >= 3.12.
                    view = memoryview(data).cast("B")  # type: ignore[arg-type]
                    if handle.readinto(view) != end - start:
                        raise ValueError(f"{path.name}: tensor {name} is truncated")
                if on_bytes_read is not None:
                    on_bytes_read(end - start)
                yield name, tensor


# GGUF names (llama.cpp) to Hugging Face names, per decoder block and global.
_GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors llama.cpp stores that the model derives from its config instead.
_GGUF_SKIPPED = {"rope_freqs.weight"}
_BLOCK_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def gguf_to_hf_name(name: str) -> str | None:
    """Map a llama.cpp tensor name to its Hugging Face name (None: skip the tensor)."""
    if name in _GGUF_SKIPPED:
        return None
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    match = _BLOCK_PATTERN.fullmatch(name)
    if match is None or match.group(2) not in _GGUF_BLOCK_NAMES:
        raise ValueError(f"GGUF tensor {name!r} has no known Hugging Face name")
    layer, kind, param = match.groups()
    return f"model.layers.{layer}.{_GGUF_BLOCK_NAMES[kind]}.{param}"


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of Q/K rows (interleaved rotary pairs -> halves)."""
    rows = weight.shape[0]
    head_rows = rows // num_heads
    return (
        weight.reshape(num_heads, head_rows // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def iterate_gguf(
    path: Path, hf_config: Any, on_bytes_read: BytesRead | None = None, native: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantize a GGUF file tensor by tensor to float32, under Hugging Face names.

    With ``native``, a projection (``*_proj.weight``) in a block type of
    :mod:`kvplane.quantization.gguf_blocks` comes instead as its bytes, ``uint8 [rows,
    bytes_per_row]``, named ``{prefix}.gguf_{TYPE}`` (what the ``gguf`` method reads)."""
    from gguf import GGUFReader, dequantize

    from kvplane.quantization.gguf import RAW_PREFIX
    from kvplane.quantization.gguf_blocks import GGUF_BLOCK_FORMATS

    native_types = {fmt.type_id: fmt for fmt in GGUF_BLOCK_FORMATS.values()} if native else {}
    reader = GGUFReader(str(path))
    num_heads = hf_config.num_attention_heads
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
    for tensor in reader.tensors:
        if on_bytes_read is not None:
            on_bytes_read(int(tensor.n_bytes))
        hf_name = gguf_to_hf_name(tensor.name)
        if hf_name is None:
            continue
        fmt = native_types.get(int(tensor.tensor_type))
        if fmt is not None and hf_name.endswith("_proj.weight"):
            # Rows are whole blocks, so the Q / K rows un-permute as they are.
            raw = _unpermuted(tensor.data, hf_name, num_heads, num_kv_heads)
            name = hf_name.removesuffix("weight") + RAW_PREFIX + fmt.name
            yield name, torch.from_numpy(np.array(raw, copy=True))
            continue
        array = dequantize(tensor.data, tensor.tensor_type)
        array = _unpermuted(array, hf_name, num_heads, num_kv_heads)
        # Copy: unquantized tensors are read-only views of the memory-mapped file.
        yield hf_name, torch.from_numpy(np.array(array, dtype=np.float32, copy=True))


def _unpermuted(array: np.ndarray, hf_name: str, num_heads: int, num_kv_heads: int) -> np.ndarray:
    """``array``'s rows in Hugging Face order (llama.cpp permutes those of Q and K)."""
    if ".q_proj." in hf_name:
        return unpermute_rotary_rows(array, num_heads)
    if ".k_proj." in hf_name:
        return unpermute_rotary_rows(array, num_kv_heads)
    return array
