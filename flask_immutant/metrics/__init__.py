"""Prometheus metrics (``IMMUTANT_METRICS``): the definitions call sites record on, the node's
multi-process folder, the metrics path and ``flask immutant metrics``. See docs/metrics.md.

Importing this package imports neither prometheus_client nor the plugin: call sites use
:mod:`.definitions`, whose metrics do nothing until :func:`.process.enable` runs.
"""

from __future__ import annotations
