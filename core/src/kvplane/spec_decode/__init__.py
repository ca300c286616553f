"""Speculative decoding: proposers draft tokens, the target verifies them in one forward.

``config.py`` (``speculative_config``), ``base.py`` (the ``Proposer`` interface),
``ngram.py`` and ``draft_model.py`` (the proposers), ``proposers.py`` (which one),
``decoder.py`` (who gets drafts, the turn-down rule), ``verification.py`` (the rejection
sampler), ``metrics.py`` (acceptance counters). See docs/speculative-decoding.md.
"""
