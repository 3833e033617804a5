"""`generate --prompt-file F --ray-local --ray-workers 2`: the prompt lines spread over two Ray workers."""

from __future__ import annotations

import re

import pytest

from tests.conftest import run_cli

pytest.importorskip("ray")


def test_prompt_file_spreads_over_ray_workers(tiny_dir, tmp_path):
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "z_image_tiny").symlink_to(tiny_dir, target_is_directory=True)
    pf = tmp_path / "prompts.txt"
    pf.write_text("# four jobs\none\ntwo\nthree\nfour\n")
    r = run_cli("generate", "--model", "tiny", "--checkpoints-dir", str(tmp_path / "ckpts"), "--prompt-file", str(pf),
                "--steps", "2", "--width", "64", "--height", "64", "--seed", "3", "--output", str(tmp_path / "out"),
                "--ray-local", "--ray-workers", "2", timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    names = [p.name for p in (tmp_path / "out").iterdir()]  # <time>_seed3_1_<prompt>.png: jobs end in any order
    assert sorted(n.split("_seed3_1_")[1] for n in names) == ["four.png", "one.png", "three.png", "two.png"]
    workers = re.findall(r"^saved .*_seed3_1_\w+\.png \(seed 3, on (ray-\d)\)$", r.stdout, re.M)
    assert len(workers) == 4 and set(workers) == {"ray-1", "ray-2"}, r.stdout


def test_ray_flags_are_checked(tmp_path):
    r = run_cli("generate", "--model", "tiny", "--prompt", "x", "--ray-workers", "2")
    assert r.returncode == 2 and r.stderr.strip().endswith("--ray-workers goes with --ray-local or --ray-address")
    r = run_cli("generate", "--model", "tiny", "--prompt", "x", "--ray-local", "--transformer", str(tmp_path / "t"))
    assert r.returncode == 2 and "--transformer does not go with --ray-local" in r.stderr
