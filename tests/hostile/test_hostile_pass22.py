"""Hostile inputs, pass 22: what the helpers noted without a test. Their failing cases are in
test_hostile_pass22_fixes.py and test_hostile_pass22_areas.py.
"""

from __future__ import annotations


def test_a_fresh_run_drops_a_linked_live_folder_instead_of_writing_through_it(tmp_path):
    """open_live emptied a fresh run's --live folder with `shutil.rmtree(directory, ignore_errors=True)`, which
    skips a symbolic link without a word (DVC's symlink cache makes outputs links): DVCLive then wrote the new
    run's series into the linked folder, beside the old run's, in the cache."""
    from cxr_diffusion.diffusion.live_log import open_live

    elsewhere = tmp_path / "cache" / "live"
    elsewhere.mkdir(parents=True)
    (elsewhere / "metrics.json").write_text('{"step": 99}')
    live_dir = tmp_path / "dvclive"
    live_dir.symlink_to(elsewhere, target_is_directory=True)
    live = open_live(live_dir, None, {"lr": 1e-4})
    live.end()
    assert not live_dir.is_symlink() and live_dir.is_dir()
    assert (elsewhere / "metrics.json").read_text() == '{"step": 99}' and sorted(p.name for p in elsewhere.iterdir()) == ["metrics.json"]
