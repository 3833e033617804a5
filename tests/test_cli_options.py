"""Command-line options and the checks made before any model loads (one error line, nothing downloaded)."""

from pathlib import Path

import wgp_zimage
from app.settings import ProfileStore


def main(capsys, *args):
    rc = wgp_zimage.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_top_level_profiles_dir_is_read_by_profiles_and_generate(tmp_path, capsys):
    pdir = tmp_path / "p"
    ProfileStore(pdir).save("mine", {"model_type": "z_image_tiny", "prompt": "from the profile"})
    rc, out, err = main(capsys, "--profiles-dir", str(pdir), "profiles", "list")
    assert rc == 0 and out.startswith("mine "), (out, err)
    parser = wgp_zimage.build_parser()
    for argv in (["--profiles-dir", str(pdir), "generate", "--gen-profile", "mine"],
                 ["generate", "--profiles-dir", str(pdir), "--gen-profile", "mine"],
                 ["--profiles-dir", str(pdir), "profiles", "show", "mine"],
                 ["profiles", "--profiles-dir", str(pdir), "show", "mine"],
                 ["profiles", "show", "mine", "--profiles-dir", str(pdir)]):
        assert parser.parse_args(argv).profiles_dir == pdir, argv
    assert parser.parse_args(["profiles", "list"]).profiles_dir == Path("profiles")
    assert parser.parse_args(["generate"]).profiles_dir == Path("profiles")
