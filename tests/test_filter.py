import pandas as pd
import pytest

from cxr_diffusion.config import FilterConfig, SplitConfig
from cxr_diffusion.profiles import profile_section
from cxr_diffusion.data.filter import REJECT_REASONS, filter_metadata, read_include_list
from cxr_diffusion.data.nih import DataError

from conftest import nih_row


def metadata(rows):
    return pd.DataFrame(rows)


def run(rows, present=None, **config):
    frame = metadata(rows)
    present = set(frame["Image Index"]) if present is None else present
    return filter_metadata(frame, present, profile_section(FilterConfig, **config), seed=0)


def many_patients(n_patients=60, studies=3):
    rows = []
    labels = ["No Finding", "Effusion", "Infiltration|Effusion", "Nodule", "Mass", "Atelectasis"]
    for p in range(1, n_patients + 1):
        for f in range(studies):
            rows.append(nih_row(f"{p:08d}_{f:03d}.png", labels[(p + f) % len(labels)], patient=p, follow_up=f))
    return rows


def test_counts_reconcile_rows_in_equals_kept_plus_each_reason():
    rows = many_patients(10) + [nih_row("00000001_000.png"), nih_row("../etc.png"), nih_row("x_1.png", "Hernia"),
                                nih_row("y_1.png", "Flu"), nih_row("z_1.png", age=414), nih_row("v_1.png", view="LL")]
    result = run(rows)
    metrics = result.metrics
    assert metrics["rows_in"] == len(rows)
    assert metrics["rows_in"] == metrics["kept"] + sum(metrics["rejected"].values())
    assert set(metrics["rejected"]) == set(REJECT_REASONS)
    assert metrics["rejected"]["duplicate_image_index"] == 1
    assert metrics["rejected"]["unsafe_image_index"] == 1
    assert metrics["rejected"]["unknown_label"] == 1
    assert metrics["rejected"]["age_out_of_range"] == 1
    assert metrics["rejected"]["view"] == 1
    assert metrics["rejected"]["no_class_of_interest"] == 1  # Hernia only


def test_path_like_image_index_is_rejected_never_kept():
    result = run([nih_row("../../secret.png"), nih_row("/abs/path.png"), nih_row("sub/dir.png"), nih_row("ok.png")])
    assert list(result.table["Image Index"]) == ["ok.png"]
    assert set(result.rejects["reason"]) == {"unsafe_image_index"}


def test_unknown_label_is_listed_with_its_name():
    result = run([nih_row("a.png", "Effusion|Covid")])
    assert result.rejects.loc[0, "reason"] == "unknown_label"
    assert result.rejects.loc[0, "detail"] == "Covid"


def test_missing_image_is_rejected():
    result = run([nih_row("a.png"), nih_row("b.png", patient=2)], present={"a.png"})
    assert result.rejects.set_index("Image Index").loc["b.png", "reason"] == "image_missing"


def test_merge_makes_one_class_from_two_findings():
    result = run([nih_row("a.png", "Nodule"), nih_row("b.png", "Mass", patient=2), nih_row("c.png", "Effusion", patient=3)])
    assert result.table.set_index("Image Index")["Nodule/Mass"].to_dict() == {"a.png": 1, "b.png": 1, "c.png": 0}


def test_other_labels_rejected_when_not_allowed():
    result = run([nih_row("a.png", "Effusion|Hernia"), nih_row("b.png", "Effusion", patient=2)], allow_other_labels=False)
    assert list(result.table["Image Index"]) == ["b.png"]
    assert result.rejects.loc[0, "reason"] == "labels_outside_classes"
    assert result.rejects.loc[0, "detail"] == "Hernia"


def test_class_cap_limits_every_class_and_is_seeded():
    rows = many_patients(60)
    first = run(rows, max_per_class=20)
    second = run(rows, max_per_class=20)
    assert all(count <= 20 for count in first.metrics["classes"].values())
    assert first.metrics["rejected"]["class_cap"] > 0
    assert first.table.equals(second.table)


def test_follow_up_first_keeps_one_study_per_patient():
    result = run(many_patients(10), follow_up="first")
    assert result.table.groupby("Patient ID").size().max() == 1
    assert (result.table["Follow-up #"] == 0).all()


def test_no_patient_is_in_two_splits():
    result = run(many_patients(100, studies=4), split=profile_section(SplitConfig, val_fraction=0.2, test_fraction=0.2))
    splits_per_patient = result.table.groupby("Patient ID")["split"].nunique()
    assert (splits_per_patient == 1).all()
    assert set(result.table["split"]) == {"train", "val", "test"}
    assert result.metrics["splits"]["test"]["patients"] == 20


def test_split_is_deterministic_for_a_seed():
    rows = many_patients(50)
    assert run(rows).table.equals(run(rows).table)


def test_official_split_uses_nih_lists_and_keeps_patients_disjoint():
    rows = many_patients(20, studies=2)
    test_names = {r["Image Index"] for r in rows if r["Patient ID"] <= 5}
    train_names = {r["Image Index"] for r in rows if 5 < r["Patient ID"] <= 18}
    frame = metadata(rows)
    config = profile_section(FilterConfig, split=profile_section(SplitConfig, method="official", val_fraction=0.25))
    result = filter_metadata(frame, set(frame["Image Index"]), config, 0, None, {"test": test_names, "train_val": train_names})
    table = result.table.set_index("Image Index")
    assert set(table.index[table["split"] == "test"]) <= test_names
    assert result.metrics["rejected"]["not_in_official_split"] > 0  # patients 19-20 are on neither list
    assert (result.table.groupby("Patient ID")["split"].nunique() == 1).all()


def test_official_lists_sharing_a_patient_are_an_error():
    rows = [nih_row("a.png", patient=1), nih_row("b.png", patient=1, follow_up=1)]
    frame = metadata(rows)
    config = profile_section(FilterConfig, split=profile_section(SplitConfig, method="official"))
    with pytest.raises(DataError, match="both test_list.txt and train_val_list.txt"):
        filter_metadata(frame, {"a.png", "b.png"}, config, 0, None, {"test": {"a.png"}, "train_val": {"b.png"}})


def test_include_list_selects_and_reports_unknown_images_and_disagreements(tmp_path):
    classes = ("Effusion", "No Finding")
    path = tmp_path / "include.csv"
    pd.DataFrame({"Image Index": ["a.png", "b.png", "ghost.png"], "Effusion": [1, 1, 0], "No Finding": [0, 0, 1]}).to_csv(path, index=False)
    include = read_include_list(path, classes)
    frame = metadata([nih_row("a.png", "Effusion"), nih_row("b.png", "No Finding", patient=2), nih_row("c.png", "Effusion", patient=3)])
    config = profile_section(FilterConfig, classes=classes, merges={}, include_list="reference/include.csv")  # read above
    result = filter_metadata(frame, set(frame["Image Index"]) - {"b.png"}, config, 0, include)
    assert set(result.table["Image Index"]) == {"a.png"}
    assert result.metrics["include_list"] == {"listed": 3, "not_in_metadata": 1, "image_missing": 1,
                                              "flag_disagreements": 2}
    issues = set(zip(result.include_list_issues["Image Index"], result.include_list_issues["issue"]))
    assert {("ghost.png", "not_in_metadata"), ("b.png", "image_missing"), ("b.png", "flag_disagrees")} <= issues
    assert ("b.png", "image_missing") in set(zip(result.rejects["Image Index"], result.rejects["reason"]))


def test_include_list_missing_class_column_is_an_error_naming_it(tmp_path):
    path = tmp_path / "include.csv"
    pd.DataFrame({"Image Index": ["a.png"], "Effusion": [1]}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"missing column\(s\) \['No Finding'\]"):
        read_include_list(path, ("Effusion", "No Finding"))


def test_include_list_with_non_binary_flag_names_row_and_column(tmp_path):
    path = tmp_path / "include.csv"
    pd.DataFrame({"Image Index": ["a.png", "b.png"], "Effusion": [1, 2]}).to_csv(path, index=False)
    with pytest.raises(DataError, match="row 3: column 'Effusion'"):
        read_include_list(path, ("Effusion",))


def test_reference_subset_reproduces_48311_images(repo):
    from cxr_diffusion.data.phantom.assets import nih_metadata_csv
    from cxr_diffusion.data.nih import read_metadata_csv

    config = profile_section(FilterConfig, profile="nih-512")  # the reference subset: no per-class cap
    meta = read_metadata_csv(nih_metadata_csv())
    result = filter_metadata(meta, set(meta["Image Index"]), config, 0,
                             read_include_list(repo / config.include_list, config.classes))
    assert result.metrics["kept"] == 48311
    assert result.metrics["classes"] == {"Infiltration": 13000, "No Finding": 13000, "Effusion": 9651,
                                         "Nodule/Mass": 8947, "Atelectasis": 8591}
    assert result.metrics["include_list"] == {"listed": 48311, "not_in_metadata": 0, "image_missing": 0,
                                              "flag_disagreements": 0}
