"""Capturing the engine's step graphs at start-up, where the platform and the user allow."""

from __future__ import annotations

import logging

from kvplane.config import EngineConfig
from kvplane.engine.model_runner import ModelRunner
from kvplane.engine.step_graphs import (
    StepGraphs,
    graph_families,
    layers_that_cannot_be_captured,
)
from kvplane.models.base import CausalLM
from kvplane.plugins import capabilities
from kvplane.plugins.types import GraphCaptureRequest

# The engine's start-up log, where these lines were before this module held them.
logger = logging.getLogger("kvplane.engine.llm_engine")


def capture_step_graphs(
    runner: ModelRunner, model: CausalLM, config: EngineConfig, max_model_len: int
) -> None:
    """Capture decode steps and small mixed steps of ``runner`` (its KV cache bound) when
    the platform can and the user did not forbid it (``enforce_eager``); a family the
    platform's graph runner cannot run stays eager."""
    platform = runner.platform
    if config.enforce_eager or not platform.has_capability(capabilities.GRAPH_CAPTURE):
        return
    eager_layers = layers_that_cannot_be_captured(model)
    if eager_layers:
        logger.info("no graphs: %s cannot be captured", ", ".join(eager_layers))
        return
    step_graphs: list[StepGraphs] = []
    for graphs_class, sizes in graph_families(config):
        request = GraphCaptureRequest(runner.device, sizes, step_kind=graphs_class.step_kind)
        graph_runner = platform.graph_runner(request)
        if graph_runner is None or not any(graph_runner.can_run(size) for size in sizes):
            continue  # the platform does not capture this family: its steps run eagerly
        step_graphs.append(
            graphs_class(
                model,
                graph_runner,
                runner.transfer,
                config.block_size,
                max_model_len,
                sizes,
                config.batch_limits().max_num_seqs,
            )
        )
    runner.use_step_graphs(tuple(step_graphs))
