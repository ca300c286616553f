"""kvplane's conformance kit: the tests every platform package runs against itself.

Run it with ``pytest --pyargs kvplane.testing --kvplane-platform NAME`` (``NAME`` defaults
to the platform kvplane would select, honouring ``KVPLANE_DEVICE``). It checks every op
against :mod:`kvplane.ops.reference`, the selected attention backend against the
reference paged attention, every quantization method against ``F.linear``, KV-cache
allocation and block copies, the communicator across two processes and the platform's
identity hooks. The pytest options and fixtures live in
:mod:`kvplane.testing.pytest_plugin`; reusable helpers in :mod:`kvplane.testing.helpers`.

An end-to-end generate check (``test_generate.py``) joins the kit once the engine exists.

This module stays free of heavy imports: pytest loads the kit's plugin in every session.
"""

#: Model dtypes the kit tests, where the platform lists them in ``supported_dtypes``.
KIT_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")

__all__ = ["KIT_DTYPES"]
