"""Importers: adapters saved by the papers' own code, turned into tensadapt adapters.

- :mod:`.lorta_peft`: the LoRTA authors' PEFT tuner (``peft_type: "LORTA"``).
"""

from __future__ import annotations

__all__: list[str] = []
