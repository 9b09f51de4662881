"""Commands of this group register on the shared app (see ebood.cli)."""

from __future__ import annotations

from ._app import app, command, fail  # noqa: F401
