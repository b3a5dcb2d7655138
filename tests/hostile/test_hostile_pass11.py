"""Hostile inputs, pass 11: siblings of the pass-10 guards (RadDINO folder, image_paths.csv, code_deps, training curves,
params files). Each case builds its input, runs the real entry point (a stage script in a fresh interpreter with a
timeout and a memory cap, or the library function wrapped as run_stage wraps it) and asserts the project's rule:
one line naming the file and what to do, exit 2, no traceback; never a hang, a silent acceptance, or a read outside.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cxr_diffusion.data.image_paths import read_image_paths
from cxr_diffusion.evaluation.training_curves import read_series
from conftest import stage_line
from test_hostile_raddino import one_error_line, raddino_copy, raddino_stage
from test_hostile_raddino import raddino_folder as raddino_folder_fixture

raddino_folder = raddino_folder_fixture  # the tiny RadDINO folder fixture, under the name the tests ask for

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"
CODE_DEPS = REPO / "stages" / "code_deps.py"


def run_script(args: list, cwd: Path, timeout: int = 60, memory_gib: int = 4) -> subprocess.CompletedProcess:
    prelude = (f"import resource, runpy, sys\nresource.setrlimit(resource.RLIMIT_AS, ({memory_gib} << 30, "
               f"{memory_gib} << 30))\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n")
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    try:
        return subprocess.run([sys.executable, "-c", prelude, *map(str, args)], cwd=cwd, capture_output=True,
                              text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s: a hang (it should have been refused at once)")


# ---------------------------------------------------------------------------- code_deps (stages/code_deps.py)


def small_repo(tmp_path: Path, module_bytes: bytes = b"X = 1\n") -> Path:
    """A repository with src/cxr_diffusion/{__init__,mod}.py and stages/entry.py importing the module."""
    package = tmp_path / "src" / "cxr_diffusion"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_bytes(module_bytes)
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "entry.py").write_text("from cxr_diffusion.mod import X\nprint(X)\n")
    return tmp_path


def code_deps(repo: Path, params: Path, entries: str = "stages", timeout: int = 60) -> subprocess.CompletedProcess:
    return run_script([CODE_DEPS, "--params", params, "--package", "src/cxr_diffusion", "--entries", entries,
                       "--out", "code_deps"], cwd=repo, timeout=timeout)


def test_guard_code_deps_on_a_small_repo_writes_the_closure(tmp_path, tiny_params_file):
    repo = small_repo(tmp_path)
    result = code_deps(repo, tiny_params_file)
    assert result.returncode == 0, result.stderr[-800:]
    text = (repo / "code_deps" / "entry.json").read_text()
    assert "src/cxr_diffusion/mod.py" in text and "src/cxr_diffusion/__init__.py" in text


@pytest.mark.parametrize("case, source", [
    ("syntax_error", b"def broken(:\n    pass\n"),
    ("latin1_bytes", b"# caf\xe9\nX = 1\n"),
    ("nul_byte", b"X = 1\x00\n"),
])
def test_code_deps_on_a_module_that_does_not_parse_is_one_line(tmp_path, tiny_params_file, case, source):
    """A module that is not Python text (a merge left it broken, an editor saved it as Latin-1) is one line naming it,
    not the SyntaxError / UnicodeDecodeError / ValueError traceback of ast.parse or read_text."""
    repo = small_repo(tmp_path, source)
    line = one_error_line(code_deps(repo, tiny_params_file), "stage code_deps failed:")
    assert "mod.py" in line, line


def test_code_deps_on_a_fifo_entry_script_does_not_hang(tmp_path, tiny_params_file):
    repo = small_repo(tmp_path)
    os.mkfifo(repo / "stages" / "zz_fifo.py")
    line = one_error_line(code_deps(repo, tiny_params_file, timeout=30), "stage code_deps failed:")
    assert "zz_fifo.py" in line, line


def test_code_deps_with_a_missing_entries_folder_is_refused_not_an_empty_closure(tmp_path, tiny_params_file):
    """A typo in --entries globbed nothing: the stage said 'closures of 0 entry points' and DELETED every existing
    code_deps/*.json as stale."""
    repo = small_repo(tmp_path)
    assert code_deps(repo, tiny_params_file).returncode == 0
    result = code_deps(repo, tiny_params_file, entries="stagez")
    assert (repo / "code_deps" / "entry.json").exists(), "existing code_deps files were deleted"
    line = one_error_line(result, "stage code_deps failed:")
    assert "stagez" in line, line


def test_code_deps_does_not_follow_a_module_symlink_out_of_the_source_tree(tmp_path, tiny_params_file):
    """src/cxr_diffusion/mod.py a link to a file outside src: it is read and hashed (a read outside where the code
    belongs, and DVC's own hash of src/ does not see the target change)."""
    repo = small_repo(tmp_path)
    outside = tmp_path / "elsewhere.py"
    outside.write_text("SECRET = 'outside'\n")
    (repo / "src" / "cxr_diffusion" / "mod.py").unlink()
    (repo / "src" / "cxr_diffusion" / "mod.py").symlink_to(outside)
    line = one_error_line(code_deps(repo, tiny_params_file), "stage code_deps failed:")
    assert "mod.py" in line, line


def test_code_deps_params_symlink_to_a_fifo_does_not_hang(tmp_path):
    repo = small_repo(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "params.yaml").symlink_to(fifo)
    line = one_error_line(code_deps(repo, tmp_path / "params.yaml", timeout=30), "stage code_deps failed:")
    assert "params.yaml" in line, line


# ---------------------------------------------------------------------------- RadDINO config.json other keys


@pytest.mark.parametrize("changes", [{"num_labels": 10 ** 8}, {"num_labels": 10 ** 12}])
def test_a_raddino_config_with_a_huge_num_labels_allocates_nothing_for_it(raddino_folder, tiny_params_file,
                                                                            tmp_path, changes):
    """config.json's other keys went to Dinov2Config, which built id2label = {i: 'LABEL_i' for i in
    range(num_labels)}: a MemoryError traceback under a 4 GiB cap. The backbone has no classifier head, so the
    label keys are left out of the config: the distances are computed, within the cap."""
    folder = raddino_copy(raddino_folder, tmp_path, config=changes)
    result = raddino_stage(tiny_params_file, folder, timeout=60, memory_gib=4)
    assert result.returncode == 0 and "COMPUTED fd" in result.stdout, result.stderr[-800:]


# ---------------------------------------------------------------------------- image_paths.csv


def test_image_paths_with_one_image_listed_twice_is_refused(tmp_path):
    """Two rows for one Image Index with different paths: prepare's dict(zip(...)) silently took the last."""
    path = tmp_path / "image_paths.csv"
    path.write_text("Image Index,path\n00000001_000.png,images/00000001_000.png\n"
                    "00000001_000.png,other/00000001_000.png\n")
    line = stage_line(lambda: read_image_paths(path))
    assert "image_paths.csv" in line and "00000001_000.png" in line, line


def test_guard_image_paths_with_bom_and_crlf_reads(tmp_path):
    path = tmp_path / "image_paths.csv"
    path.write_bytes(b"\xef\xbb\xbfImage Index,path\r\n00000001_000.png,images/00000001_000.png\r\n")
    table = read_image_paths(path)
    assert list(table["Image Index"]) == ["00000001_000.png"] and list(table["path"]) == ["images/00000001_000.png"]


def test_image_paths_with_a_nul_byte_past_the_sniffed_head_is_refused(tmp_path):
    """NUL is refused in the first bytes only; further in, Python 3.11's csv keeps it inside the cell."""
    path = tmp_path / "image_paths.csv"
    rows = "".join(f"{i:08d}_000.png,images/{i:08d}_000.png\n" for i in range(4000))
    path.write_bytes(b"Image Index,path\n" + rows.encode() + b"00009999_000.png,images/0000\x009999_000.png\n")
    line = stage_line(lambda: read_image_paths(path))
    assert "image_paths.csv" in line, line


# ---------------------------------------------------------------------------- training curves (compare)


def tsv(tmp_path: Path, text: bytes, metric: str = "loss") -> Path:
    path = tmp_path / f"{metric}.tsv"
    path.write_bytes(text)
    return path


def test_a_training_series_with_a_step_past_int64_is_one_line(tmp_path):
    """np.asarray(steps, dtype=int64) raised OverflowError: a traceback from compare."""
    path = tsv(tmp_path, b"step\tloss\n1\t0.5\n99999999999999999999\t0.4\n")
    line = stage_line(lambda: read_series(path, "loss"))
    assert "loss.tsv" in line, line


def test_a_training_series_with_a_nan_step_header_is_one_line(tmp_path):
    path = tsv(tmp_path, b"NaN\tloss\n1\t0.5\n")
    assert "loss.tsv" in stage_line(lambda: read_series(path, "loss"))


def test_guard_a_training_series_with_crlf_reads(tmp_path):
    steps, values = read_series(tsv(tmp_path, b"step\tloss\r\n1\t0.5\r\n2\t0.25\r\n"), "loss")
    assert list(steps) == [1, 2] and list(values) == [0.5, 0.25]


def test_a_training_loss_that_is_negative_is_refused(tmp_path):
    """The diffusion loss is an MSE: a negative value is hand-edited; on the log axis it vanished silently."""
    path = tsv(tmp_path, b"step\tloss\n1\t0.5\n2\t-3.0\n")
    assert "loss.tsv" in stage_line(lambda: read_series(path, "loss"))


def test_guard_a_million_row_series_is_read_quickly(tmp_path):
    body = "".join(f"{i}\t0.5\n" for i in range(1, 1_000_001)).encode()
    code = ("import sys, time\nfrom pathlib import Path\nfrom cxr_diffusion.evaluation.training_curves import "
            "read_series\nt = time.time()\nsteps, _ = read_series(Path(sys.argv[1]), 'loss')\n"
            "assert len(steps) == 1_000_000\nprint(round(time.time() - t, 1))\n")
    path = tsv(tmp_path, b"step\tloss\n" + body)
    script = tmp_path / "read.py"
    script.write_text(code)
    result = run_script([script, path], cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr[-800:]


def test_a_raddino_config_with_id2label_as_a_list_changes_nothing(raddino_folder, tiny_params_file, tmp_path):
    """Dinov2Config(id2label=[...]) raised AttributeError ('list' object has no attribute 'items'): a traceback
    from evaluate (and from `fetch --record-present`). The label keys are left out of the headless backbone's
    config, so they change nothing evaluate computes."""
    folder = raddino_copy(raddino_folder, tmp_path, config={"id2label": ["a", "b"]})
    result = raddino_stage(tiny_params_file, folder, timeout=60, memory_gib=4)
    assert result.returncode == 0 and "COMPUTED fd" in result.stdout, result.stderr[-800:]


def test_code_deps_on_a_folder_named_like_an_entry_script_is_one_line(tmp_path, tiny_params_file):
    """stages/zz.py a folder: read_text raises IsADirectoryError, an OSError user_error_line does not describe."""
    repo = small_repo(tmp_path)
    (repo / "stages" / "zz.py").mkdir()
    line = one_error_line(code_deps(repo, tiny_params_file), "stage code_deps failed:")
    assert "zz.py" in line, line


def test_guard_code_deps_follows_an_import_cycle_once(tmp_path, tiny_params_file):
    repo = small_repo(tmp_path, b"from cxr_diffusion import other\nX = 1\n")
    (repo / "src" / "cxr_diffusion" / "other.py").write_text("from cxr_diffusion.mod import X\n")
    result = code_deps(repo, tiny_params_file, timeout=30)
    assert result.returncode == 0, result.stderr[-800:]
    assert "other.py" in (repo / "code_deps" / "entry.json").read_text()


STORE_OPEN = """
import sys
from pathlib import Path
from cxr_diffusion.conditioning.store import ConditionStore
from cxr_diffusion.stage import run_stage
run_stage("train", Path(sys.argv[1]), lambda params: ConditionStore(sys.argv[2]))
print("OPENED")
"""


def test_a_store_mask_header_declaring_a_huge_array_is_refused_before_allocating(tmp_path, tiny_params_file):
    """mask.npy's header declares (200000, 200000) bool over 8 bytes of data: np.load allocates the declared
    37 GiB before its shape is compared with the embeddings' (MemoryError traceback under a 4 GiB cap)."""
    import numpy as np
    from test_hostile_stores import write_store

    store = write_store(tmp_path / "store")
    with open(store / "mask.npy", "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "|b1", "fortran_order": False,
                                                      "shape": (200000, 200000)})
        handle.write(b"\x01" * 8)
    script = tmp_path / "open_store.py"
    script.write_text(STORE_OPEN)
    line = one_error_line(run_script([script, tiny_params_file, store], cwd=tmp_path, timeout=60),
                          "stage train failed:")
    assert "mask.npy" in line, line
