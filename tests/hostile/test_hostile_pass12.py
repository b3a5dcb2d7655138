"""Hostile inputs, pass 12: siblings of the pass-11 guards (code_deps, training curves and compare, RadDINO folders,
ELIXR shards, FilmRules and the filtered table, official split lists, params). Each case builds its input, runs the
real entry point (a stage script or library call in a fresh interpreter with a timeout and a memory cap, or the
library function wrapped as run_stage wraps it) and asserts the project's rule: one line naming the file or key and
what to do, exit 2, no traceback; never a hang, a silent acceptance, an allocation a small file declares, or a
partial output replaced by a failed run.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import stage_line
from cxr_diffusion.evaluation.training_curves import read_series
from test_hostile_pass11 import code_deps, run_script, small_repo
from test_hostile_raddino import metrics_line, one_error_line as one_line, raddino_copy
from test_hostile_raddino import raddino_folder as raddino_folder_fixture
from test_hostile_tables import prepare_on, strict_run as strict_run_fixture

raddino_folder = raddino_folder_fixture
strict_run = strict_run_fixture

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------- code_deps (code_closure.py)


@pytest.mark.parametrize("case, source", [
    ("utf8_bom", b"\xef\xbb\xbfX = 1\n"),                                 # Windows editors save UTF-8 so
    ("pep263_latin1_cookie", b"# -*- coding: latin-1 -*-\nX = 'caf\xe9'\n"),  # PEP 263: Python imports it
])
def test_code_deps_reads_a_module_python_imports(tmp_path, tiny_params_file, case, source):
    """Both modules import fine (``python -c 'import cxr_diffusion.mod'``); code_deps decodes the bytes as bare
    UTF-8 and calls ast.parse on the text, so it refuses them as 'not Python source Python can import'."""
    repo = small_repo(tmp_path, source)
    result = code_deps(repo, tiny_params_file)
    assert result.returncode == 0, result.stderr[-600:]
    assert "src/cxr_diffusion/mod.py" in (repo / "code_deps" / "entry.json").read_text()


@pytest.mark.parametrize("case, source", [
    ("unary_minus_200k", b"X = " + b"-" * 200_000 + b"1\n"),           # parser MemoryError (200 KB file)
    ("sum_of_500k_terms", b"X = 1" + b" + 1" * 500_000 + b"\n"),        # RecursionError during ast construction
])
def test_code_deps_on_a_module_too_deep_to_parse_is_one_line(tmp_path, tiny_params_file, case, source):
    """Under the 4 MB source bound, a generated module too deep for the parser ends ast.parse in MemoryError or
    RecursionError, neither caught by _parsed (only SyntaxError, ValueError): a traceback."""
    repo = small_repo(tmp_path, source)
    line = one_line(code_deps(repo, tiny_params_file), "stage code_deps failed:")
    assert "mod.py" in line, line


# ---------------------------------------------------------------------------- training curves and compare


def test_compare_replaces_nothing_when_the_report_cannot_be_built(tmp_path):
    """compare() draws reports/training_curves.png before report_text reads the utility metrics: a damaged
    utility file fails the stage with the summary and report kept, but the figure already replaced."""
    from cxr_diffusion.evaluation.report import MetricsFileError, compare
    from cxr_diffusion.profiles import params_with
    from test_hostile_reports import damage, inputs

    folder = inputs(tmp_path)
    damage(folder, "no_synthetic_set")  # utility/elixr.json without synthetic_set: read by report_text only
    for name in ("summary.json", "report.md", "training_curves.png"):
        (tmp_path / name).write_text("the last good one")
    with pytest.raises(MetricsFileError):
        compare(params_with({"branches": ["elixr"]}), folder, tmp_path / "summary.json", tmp_path / "report.md",
                tmp_path / "training_curves.png")
    for name in ("summary.json", "report.md", "training_curves.png"):
        assert (tmp_path / name).read_text(errors="replace") == "the last good one", f"{name} was replaced"


@pytest.mark.parametrize("value", ["1_0", "\u0661.\u0665", "\uff11"])  # underscore, Arabic-Indic, full-width digit
def test_a_training_value_not_written_as_dvclive_writes_it_is_refused(tmp_path, value):
    """Steps must be ASCII digits, but values go through float(), which reads '1_0' as 10.0 and Arabic-Indic or
    full-width digits as numbers: a hand-edited loss is drawn silently (the store index refuses the same forms)."""
    path = tmp_path / "loss.tsv"
    path.write_text(f"step\tloss\n1\t0.5\n2\t{value}\n", encoding="utf-8")
    line = stage_line(lambda: read_series(path, "loss"))
    assert "loss.tsv" in line and "line 3" in line, line


def test_a_training_series_that_is_a_dangling_link_is_not_read_as_not_trained(tmp_path):
    """path.exists() is False for a dangling link (a DVC checkout whose cache lost the file): the branch is
    drawn as '(not trained)' with no error, though its series is there, just broken."""
    path = tmp_path / "loss.tsv"
    path.symlink_to(tmp_path / "gone" / "loss.tsv")
    line = stage_line(lambda: read_series(path, "loss"))
    assert "loss.tsv" in line, line


# ---------------------------------------------------------------------------- RadDINO config.json


def test_a_raddino_config_asking_for_quantization_is_one_line(raddino_folder, tmp_path):
    """config.json's other keys reach Dinov2Config; from_pretrained then quantizes as quantization_config says
    (bitsandbytes 8-bit here), raising ImportError, which load_raddino does not catch: a traceback from evaluate,
    and `fetch --record-present` records the folder as usable."""
    folder = raddino_copy(raddino_folder, tmp_path, config={
        "quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}})
    line = metrics_line(folder)
    assert "config.json" in line and "quantization" in line, line


# ---------------------------------------------------------------------------- ELIXR HDF5 ids


ELIXR_SCAN = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
from pathlib import Path
import pandas as pd
from cxr_diffusion.conditioning.elixr import build_elixr_store
from cxr_diffusion.config import ElixrConfig
from cxr_diffusion.profiles import params_with
from cxr_diffusion.stage import run_stage
tmp = Path(sys.argv[2])
pd.DataFrame({"Image Index": ["00000001_000.png", "00000002_000.png", "00000003_000.png"]}).to_csv(
    tmp / "filtered.csv", index=False)
run_stage("embed_elixr", Path(sys.argv[1]), lambda params: build_elixr_store(
    tmp / "filtered.csv", params_with({"elixr": {"path": str(tmp / "snap")}}).elixr, tmp / "store",
    tmp / "rejects.csv", None, "elixr"))
print("BUILT")
"""


def test_a_two_dimensional_id_column_is_bounded_before_it_is_read(tmp_path, tiny_params_file):
    """'Image Index' of shape (3, 2**31) S1: the row and id-bytes bounds use shape[0] x itemsize (3 bytes), the
    chunks are 64 MB, all written, gzipped to 6 MB; handle[ids][()] then allocates 6 GiB before the ndim check
    (MemoryError traceback under a 4 GiB cap)."""
    root = tmp_path / "snap"
    features = {"img_emb": {"dtype": "float32", "shape": [4, 8]}, "Image Index": {"dtype": "bytes", "shape": []}}
    (root / "elixrb" / "img_emb").mkdir(parents=True)
    (root / "datasets.json").write_text(json.dumps({"info": {}, "datasets": {"elixrb": {"img_emb": {
        "type": "dataset", "features": features}}}}))
    chunk = 1 << 26
    with h5py.File(root / "elixrb" / "img_emb" / "img_emb_1.h5", "w") as handle:
        ids = handle.create_dataset("Image Index", shape=(3, 32 * chunk), dtype="S1", chunks=(1, chunk),
                                    compression="gzip")
        packed = zlib.compress(b"\0" * chunk, 9)
        for row in range(3):
            for column in range(0, 32 * chunk, chunk):
                ids.id.write_direct_chunk((row, column), packed)
        handle["img_emb"] = np.random.default_rng(0).normal(size=(3, 4, 8)).astype(np.float32)
    assert (root / "elixrb" / "img_emb" / "img_emb_1.h5").stat().st_size < 8 << 20
    script = tmp_path / "scan.py"
    script.write_text(ELIXR_SCAN)
    line = one_line(run_script([script, tiny_params_file, tmp_path], cwd=tmp_path, timeout=90),
                    "stage embed_elixr failed:")
    assert "img_emb_1.h5" in line and "Image Index" in line, line


# ---------------------------------------------------------------------------- filtered.csv and the filter's rules


def test_prepare_refuses_a_film_outside_the_filter_age_range(tmp_path, strict_run):
    """filter.age_max is 100: the filter rejects a 120-year-old's film (age_out_of_range); an edited table had it
    prepared (FilmRules hold labels and views, not the age range, the next rule of the same row)."""
    table = strict_run[2].copy()
    table.loc[0, "Patient Age"] = "120"
    error, manifest = prepare_on(tmp_path, strict_run, table)
    assert manifest is None, "accepted silently: Patient Age 120 with filter.age_max 100"
    assert "Patient Age" in error and "line 2" in error, error


# ---------------------------------------------------------------------------- official split lists


OFFICIAL_READ = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from pathlib import Path
from cxr_diffusion.data.nih import read_image_list
from cxr_diffusion.stage import run_stage
run_stage("filter", Path(sys.argv[1]), lambda params: read_image_list(Path(sys.argv[2])))
print("READ")
"""


def test_a_sparse_official_list_is_refused_unread(tmp_path, tiny_params_file):
    """read_image_list reads the whole file (no regular-file or size check, unlike every other table reader): a
    sparse 3 GiB test_list.txt (no disk used; NUL is valid UTF-8) is a MemoryError traceback under a 2 GiB cap.
    NIH's list is 1.6 MB."""
    path = tmp_path / "test_list.txt"
    with open(path, "wb") as handle:
        handle.truncate(3 << 30)
    script = tmp_path / "read.py"
    script.write_text(OFFICIAL_READ)
    line = one_line(run_script([script, tiny_params_file, path], cwd=tmp_path, timeout=60), "stage filter failed:")
    assert "test_list.txt" in line, line


# ---------------------------------------------------------------------------- params: clip.prompt_template


@pytest.mark.parametrize("template", [
    "chest x-ray showing {findings} {0}",        # IndexError in str.format
    "chest x-ray showing {findings} of {side}",  # KeyError
    "chest x-ray showing {{findings}}",          # every prompt the literal 'chest x-ray showing {findings}'
])
def test_a_prompt_template_that_does_not_format_to_the_findings_is_refused_by_the_params(template):
    """The params only ask that '{findings}' occur in the text. A template with another field ends
    embed_clip_text / train_clip in a traceback from str.format; an escaped '{{findings}}' passes and gives
    every film one prompt (no condition at all)."""
    from cxr_diffusion.conditioning.prompts import prompt_for
    from cxr_diffusion.profiles import params_with

    def run():
        clip = params_with({"clip": {"prompt_template": template}}).clip
        prompts = {prompt_for(labels, clip) for labels in ("Effusion", "Mass", "Effusion|Mass")}
        assert len(prompts) == 3, f"accepted silently: every finding gives the prompt {prompts}"

    line = stage_line(run)
    assert "prompt_template" in line, line


# ---------------------------------------------------------------------------- params: device


def test_a_cuda_device_index_past_int64_is_refused_by_the_params(tmp_path, tiny_params_file):
    """The params accept device 'cuda:' + any digits; torch.device() cannot parse an index past int64 and raises
    RuntimeError (not a DeviceError) in resolve_device: a traceback from train, evaluate, utility and
    `cxr-diffusion memory-plan`, where 'cuda:99' is one line."""
    import yaml
    from typer.testing import CliRunner

    from conftest import cli_refusal
    from cxr_diffusion.cli import app

    data = yaml.safe_load(tiny_params_file.read_text())
    data["device"] = "cuda:99999999999999999999"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(data))
    line = cli_refusal(CliRunner().invoke(app, ["memory-plan", "--params", str(params), "--root", str(tmp_path)]))
    assert "device" in line, line


# ---------------------------------------------------------------------------- code_deps: imports it does not see


def test_code_deps_lists_the_submodules_a_star_import_of_a_package_loads(tmp_path, tiny_params_file):
    """`from cxr_diffusion.sub import *` with ``__all__ = ['inner']`` imports sub/inner.py when the entry runs; it
    was left out of code_deps/entry.json, so editing inner.py left the stage up to date (silently stale results)."""
    repo = small_repo(tmp_path)
    package = repo / "src" / "cxr_diffusion" / "sub"
    package.mkdir()
    (package / "__init__.py").write_text("__all__ = ['inner']\n")
    (package / "inner.py").write_text("Y = 1\n")
    (repo / "stages" / "entry.py").write_text("from cxr_diffusion.sub import *\n")
    result = code_deps(repo, tiny_params_file)
    assert result.returncode == 0, result.stderr[-600:]
    assert "src/cxr_diffusion/sub/inner.py" in (repo / "code_deps" / "entry.json").read_text(), \
        "the module the entry imports is missing from its closure"


DYNAMIC_IMPORTS = {  # each imports src/cxr_diffusion/sub/inner.py when the entry runs; line 2 loads it
    "import_module_relative_to_its_package": "import importlib\nimportlib.import_module('.inner', 'cxr_diffusion.sub')\n",
    "import_module_by_keyword": "import importlib\nimportlib.import_module(name='cxr_diffusion.sub.inner')\n",
    "dunder_import": "X = 1\n__import__('cxr_diffusion.sub.inner')\n",
    "computed_name": "import importlib\nname = 'cxr_diffusion.sub.inner'; importlib.import_module(name)\n",
}


@pytest.mark.parametrize("case", sorted(DYNAMIC_IMPORTS))
def test_code_deps_refuses_a_dynamic_import_with_its_line(tmp_path, tiny_params_file, case):
    """Each form loaded sub/inner.py and was left out of the closure (silently stale stages). No reading can tell
    what every such call loads, so the stages' code imports by statements only: one line naming the file and
    line."""
    repo = small_repo(tmp_path)
    package = repo / "src" / "cxr_diffusion" / "sub"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "inner.py").write_text("Y = 1\n")
    (repo / "stages" / "entry.py").write_text(DYNAMIC_IMPORTS[case])
    line = one_line(code_deps(repo, tiny_params_file), "stage code_deps failed:")
    assert "entry.py line 2" in line and "use an import statement" in line, line


# ---------------------------------------------------------------------------- CLI: profile's success line


@pytest.mark.parametrize("name", [
    "\x1b]0;owned\x07tiny.yaml",           # ReaderError: unacceptable character #x001b
    "x\rseed: 9.yaml",                      # ScannerError: mapping values are not allowed here
    "x\rbranches: [elixr]\r#.yaml",         # DuplicateKeyError
    "x\u2028y.yaml",                        # ParserError
])
def test_profile_with_an_overlay_whose_name_holds_a_control_or_line_break_character(tmp_path, monkeypatch, name):
    """_retitle writes the overlay's file name (chain[-1].stem) raw into the header comment of the params.yaml it
    builds; validated_profile_text rereads that text with ruamel, whose error (ReaderError, ScannerError,
    DuplicateKeyError, ParserError: YAMLErrors, not ParamsError) escapes `cxr-diffusion profile` as a traceback.
    The overlay itself ('seed: 3') is valid: the command should write params.yaml, or refuse in one line, and
    never echo the raw control characters."""
    from typer.testing import CliRunner

    from cxr_diffusion.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_text("seed: 3\n")
    (tmp_path / "out").mkdir()
    result = CliRunner().invoke(app, ["profile", name, "--root", str(tmp_path / "out")])
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"traceback: {type(result.exception).__name__}: {ascii(str(result.exception)[:200])}"
    assert result.exit_code in (0, 2), result.exit_code
    assert not any(char in result.output for char in "\x1b\x07\r\u2028"), ascii(result.output)

