"""Capability flags a platform may list in ``PlatformInfo.capabilities``.

The core asks for a capability, never for a platform's name. Flags are plain strings so
a platform can add its own; the ones the core reads are defined here.
"""

#: Steps can be captured and replayed (``kvplane_graph_runner`` returns a capturing runner).
GRAPH_CAPTURE = "graph_capture"
#: Host memory can be pinned for faster host-to-device copies.
PINNED_MEMORY = "pinned_memory"
#: Device work runs asynchronously to the host (a sync is needed to read results).
ASYNC_EXECUTION = "async_execution"
#: The platform can run several processes, one device each, over its communicator.
MULTI_DEVICE = "multi_device"

ALL = (GRAPH_CAPTURE, PINNED_MEMORY, ASYNC_EXECUTION, MULTI_DEVICE)
