"""The package works with its runtime dependencies alone: no test or optional extra imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

#: Installed here by the `test`/`rabbitmq`/`otel` extras, absent after a plain `pip install flask-immutant`.
OPTIONAL = ("pika", "playwright", "flask_caching", "pytest", "requests", "opentelemetry")
#: The modules that exist for an extra and import it: loaded only when it is installed and on.
NEEDS_EXTRA = ("flask_immutant.tracing.spans",)

CHECK = f"""
import importlib, pkgutil, sys
for name in {OPTIONAL!r}:
    sys.modules[name] = None  # importing it now raises ImportError, as if not installed
import flask_immutant
for module in pkgutil.walk_packages(flask_immutant.__path__, "flask_immutant."):
    if module.name not in {NEEDS_EXTRA!r}:
        importlib.import_module(module.name)
sys.path.insert(0, "example_app")
import app
print("ok")
"""


def test_every_module_and_the_example_app_import_without_optional_packages():
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=False, cwd=root)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
