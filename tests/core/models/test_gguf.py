"""GGUF: a file written here with the `gguf` package from a tiny Llama loads in kvplane
and generates what transformers generates from the same file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kvplane.models.checkpoint import gguf_to_hf_name, unpermute_rotary_rows
from kvplane.testing.models import save_random_model, tiny_llama_config

from .harness import hf_greedy, load_tiny, random_prompts

# Hugging Face name -> llama.cpp name, per block and global.
_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def permute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order (interleaved rotary pairs), the inverse of ours."""
    head_rows = weight.shape[0] // num_heads
    return (
        weight.reshape(num_heads, 2, head_rows // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, _, param = rest.rpartition(".")
    return f"blk.{layer}.{_BLOCK[module]}.{param}"


def write_gguf(model: torch.nn.Module, config: object, path: Path, quantize: bool) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    # A byte-level tokenizer of single-character tokens, enough for transformers to load.
    tokens = [f"<t{i}>" for i in range(config.vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * config.vocab_size)
    writer.add_token_merges([])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if ".q_proj." in name:
            array = permute_rotary_rows(array, config.num_attention_heads)
        elif ".k_proj." in name:
            array = permute_rotary_rows(array, config.num_key_value_heads)
        if quantize and array.ndim == 2:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(name), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_rotary_row_order_round_trips() -> None:
    weight = np.arange(8 * 4 * 3, dtype=np.float32).reshape(8 * 4, 3)
    assert np.array_equal(unpermute_rotary_rows(permute_rotary_rows(weight, 4), 4), weight)
    assert gguf_to_hf_name("blk.3.attn_k.weight") == "model.layers.3.self_attn.k_proj.weight"
    assert gguf_to_hf_name("rope_freqs.weight") is None


@pytest.mark.parametrize("quantize", [False, True], ids=["f32", "q8_0"])
def test_gguf_generates_like_transformers(tmp_path: Path, quantize: bool) -> None:
    from transformers import AutoModelForCausalLM

    config = tiny_llama_config(head_dim=16)
    model = save_random_model(config, tmp_path / "hf")
    path = tmp_path / "gguf" / "tiny.gguf"
    path.parent.mkdir()
    write_gguf(model, config, path, quantize)
    reference = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    llm = load_tiny(path)
    for prompt in random_prompts(config.vocab_size)[:3]:
        from kvplane import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=16, min_tokens=16, detokenize=False)
        output = llm.generate({"prompt_token_ids": prompt}, params)[0]
        assert list(output.outputs[0].token_ids) == hf_greedy(reference, prompt, 16)
