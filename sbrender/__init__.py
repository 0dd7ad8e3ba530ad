"""sbrender: a Stable Diffusion batch renderer daemon fed by a spool folder."""

from __future__ import annotations

__version__ = "0.1.0"
