"""Input from outside the app (API values, image metadata, dropped or imported files) never crashes or hangs
it, and is never read more generously than a user would read it: one clear message instead."""

from __future__ import annotations

import pytest

from app.settings import normalize_settings
from app.ui_loras import parse_selection, parse_strength
from models.errors import UserError
from models.lora_runtime import parse_schedule

# ------------------------------------------------------------------ numbers and LoRA strengths


@pytest.mark.parametrize("bad", ["٣", "1,٣", "²", "1e308", 1e308, 11, -10.5, "1,20", 10**400, "inf", "1_0"])
def test_lora_strength_is_ascii_and_bounded(bad):
    with pytest.raises(UserError):
        parse_schedule(bad)
    with pytest.raises(UserError):
        parse_strength(bad, "style")
    with pytest.raises(UserError, match=r"loras\[0\]"):
        normalize_settings({"loras": [{"name": "style", "strength": bad}]})


def test_lora_strength_message_says_the_bounds():
    with pytest.raises(UserError, match="between -10 and 10"):
        parse_schedule(1e308)
    with pytest.raises(UserError, match="'style' strength.*between -10 and 10"):
        parse_selection("style=1e308")


def test_lora_strength_good_values():
    assert parse_schedule(10) == (10.0,) and parse_schedule("-10, 0.5") == (-10.0, 0.5)
    assert parse_schedule([1, "0.5"]) == (1.0, 0.5)
    assert parse_strength(" 0.8 ") == 0.8 and parse_strength("1.0, 0.25") == "1.0,0.25"
    settings, _ = normalize_settings({"loras": [{"name": "a", "strength": "1,0.5"}, {"name": "b", "strength": 2}]})
    assert settings["loras"] == [{"name": "a", "strength": "1,0.5"}, {"name": "b", "strength": 2.0}]


def test_profiles_cli_lora_strength_is_ascii():
    from app.profiles_cli import _parse_lora

    assert _parse_lora("style:0.5") == {"name": "style", "strength": 0.5}
    for bad in ("style:٣", "style:1e308"):
        with pytest.raises(UserError, match="--lora"):
            _parse_lora(bad)


def test_ascii_numbers():
    from models.parsing import ascii_float, ascii_int

    assert ascii_int(" -12 ") == -12 and ascii_float("1.5e-3") == 0.0015 and ascii_float(".5") == 0.5
    for bad in ("٣", "²", "1.0", "", "1_000", "0x10", None):
        with pytest.raises(ValueError):
            ascii_int(bad)
    for bad in ("٣", "۱.۵", "inf", "nan", "1e999", "", "1_0", "1.2.3"):
        with pytest.raises(ValueError):
            ascii_float(bad)
