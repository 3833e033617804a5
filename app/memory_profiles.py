"""The MMGP memory profiles (1-5): what each pins in RAM and streams into VRAM, and whom it suits.

Data only, no torch: the CLI's --help and the page's Config section list them without loading torch;
app/offload.py applies them.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PROFILE = 4


@dataclass(frozen=True)
class MemoryProfile:
    number: int
    name: str
    pinned: str  # which models mmgp pins in RAM: "all", "transformer" or "none"
    low_vram: bool  # models streamed block by block (budgets) rather than loaded whole
    description: str


PROFILES: dict[int, MemoryProfile] = {p.number: p for p in (
    MemoryProfile(1, "HighRAM_HighVRAM", "all", False,
                  "fastest: all models pinned in RAM, each loaded whole into VRAM; "
                  "64 GB RAM and a 24 GB card (int8: 32 GB RAM, 12-16 GB card)"),
    MemoryProfile(2, "HighRAM_LowVRAM", "all", True,
                  "fast: all models pinned in RAM, streamed into VRAM block by block; "
                  "64 GB RAM (int8: 32 GB), cards from 6-8 GB"),
    MemoryProfile(3, "LowRAM_HighVRAM", "transformer", False,
                  "only the transformer pinned, models loaded whole into VRAM; "
                  "32 GB RAM (int8: 24 GB) and a 24 GB card (int8: 12-16 GB)"),
    MemoryProfile(4, "LowRAM_LowVRAM", "transformer", True,
                  "default: only the transformer pinned, streamed block by block; "
                  "32 GB RAM (int8: 16-24 GB), cards from 6-8 GB"),
    MemoryProfile(5, "VerylowRAM_LowVRAM", "none", True,
                  "slowest: nothing pinned, streamed from ordinary RAM; "
                  "24 GB RAM (int8: 16 GB), cards from 6 GB"),
)}
PROFILE_NAMES: dict[int, str] = {n: p.name for n, p in PROFILES.items()}
PROFILE_DESCRIPTIONS: dict[int, str] = {n: f"{p.name}: {p.description}" for n, p in PROFILES.items()}


__all__ = ["DEFAULT_PROFILE", "PROFILES", "PROFILE_DESCRIPTIONS", "PROFILE_NAMES", "MemoryProfile"]
