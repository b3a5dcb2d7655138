"""Pass 23, final sweep: new cases over the original issue's classes. Each test failed on the code at filing."""

from __future__ import annotations

import h5py
import numpy as np
import pytest


@pytest.mark.parametrize("suffix", [".hdf5", ".H5"])
def test_a_standin_snapshot_whose_shards_are_not_named_dot_h5_is_still_a_standin(tmp_path, suffix):
    """The ELIXR reader takes `.h5` and `.hdf5` shards, case-insensitively (`HDF5_SUFFIXES`, `suffix.lower()`), but
    the stand-in label check (`standin_marker._content_label`) looked only at `rglob("*.h5")`: a stand-in snapshot
    with its index's `standin` flag dropped and its labelled shard named `img_emb_1.hdf5` (or `.H5`) was no stand-in
    to `doctor` ("unrecorded") and `fetch --record-present` recorded it as the real ELIXR, while `embed_elixr`
    read the same shard as a stand-in."""
    from cxr_diffusion.assets.standin_marker import read_standin
    from cxr_diffusion.conditioning.elixr_files import find_snapshot_shards, scan_elixr_file
    from cxr_diffusion.conditioning.elixr_format import FeatureSpec
    from cxr_diffusion.conditioning.elixr_writers import write_snapshot_index, write_snapshot_shard

    snapshot = tmp_path / "snap"
    shard = write_snapshot_shard(snapshot / "elixrb" / "img_emb" / f"img_emb_1{suffix}", ["00000001_000.png"],
                                 "img_emb", np.ones((1, 4, 8)))
    with h5py.File(shard, "a") as handle:
        handle.attrs["standin"] = "NOT ELIXR"
    write_snapshot_index(snapshot, {"elixrb/img_emb": [FeatureSpec("img_emb", "float32", (4, 8))]}, {})
    assert find_snapshot_shards(snapshot, "elixrb/img_emb") == [shard]  # the reader reads it as a shard...
    assert scan_elixr_file(shard, (4, 8), "img_emb").standin is True  # ...and as a stand-in
    label = read_standin(snapshot)
    assert label is not None and label["standin"] is True, label
