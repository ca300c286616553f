"""Structured output: constrain decoding to a JSON schema, any JSON object, a regex or a grammar.

Set ``SamplingParams(structured_output=StructuredOutputParams(...))``; the engine compiles
the constraint in ``add_request`` (``ValueError`` when it cannot compile, before anything is
queued) and gives each sequence a :class:`GrammarConstraint` as its sampler
``allowed_mask_fn``. The grammar engine is xgrammar, imported on first use.
See docs/structured-output.md.
"""

from kvplane.structured.compiler import StructuredOutputCompiler, tokenizer_info
from kvplane.structured.constraint import GrammarConstraint, num_bitmask_words
from kvplane.structured.params import KINDS, StructuredOutputParams

__all__ = [
    "KINDS",
    "GrammarConstraint",
    "StructuredOutputCompiler",
    "StructuredOutputParams",
    "num_bitmask_words",
    "tokenizer_info",
]
