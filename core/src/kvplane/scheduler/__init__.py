"""Scheduling: request state, per-step limits, the scheduler and what it hands the runner."""

from kvplane.scheduler.config import SchedulerConfig
from kvplane.scheduler.output import (
    ForkedRequest,
    ScheduledRequest,
    SchedulerOutput,
    SchedulerStats,
)
from kvplane.scheduler.request import Request, RequestStatus
from kvplane.scheduler.scheduler import Scheduler

__all__ = [
    "ForkedRequest",
    "Request",
    "RequestStatus",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "SchedulerStats",
]
