"""The pluggy markers platforms decorate their hook implementations with."""

import pluggy

from kvplane.plugins.hookspec import PROJECT_NAME

hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

#: The plugin API this core implements. A plugin declares the version it was built for
#: as ``KVPLANE_PLUGIN_API`` on its entry-point module; a different major is refused, and
#: any minor of the same major loads (minors only add, see :mod:`kvplane.plugins.hookspec`).
PLUGIN_API_VERSION = "1.6"

#: Entry-point group platform packages register in.
ENTRY_POINT_GROUP = "kvplane.platforms"
