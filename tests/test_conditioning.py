"""Prompts, the condition store, and loading a CLIP through the same calls a hub model uses."""

import numpy as np
import pandas as pd
import pytest
import torch

from cxr_diffusion.config import ClipConfig
from cxr_diffusion.profiles import profile_section
from cxr_diffusion.conditioning.clip import encode_prompts, load_text_encoder, load_vision_encoder
from cxr_diffusion.conditioning.prompts import prompt_for
from cxr_diffusion.conditioning.store import ConditionStore, ConditionStoreWriter, StoreError
from cxr_diffusion.data.nih import DataError


def test_prompt_lists_findings_in_plain_words():
    assert prompt_for("Effusion|Pleural_Thickening", profile_section(ClipConfig)) == "chest x-ray showing effusion and pleural thickening"
    assert prompt_for("Atelectasis|Effusion|Mass", profile_section(ClipConfig)) == "chest x-ray showing atelectasis, effusion and mass"


def test_no_finding_uses_the_normal_prompt():
    assert prompt_for("No Finding", profile_section(ClipConfig, normal_prompt="a normal chest radiograph")) == "a normal chest radiograph"


def test_empty_finding_labels_is_an_error():
    with pytest.raises(DataError, match="empty Finding Labels"):
        prompt_for("", profile_section(ClipConfig))


def test_saved_demo_clip_loads_through_the_hub_calls_with_shapes_from_its_config(tiny_clip_dir):
    text = load_text_encoder(str(tiny_clip_dir))
    vision = load_vision_encoder(str(tiny_clip_dir))
    assert text.shape == (16, 16) and vision.shape == (1, 8)


def test_encode_prompts_pads_to_max_length_and_counts_truncation(tiny_clip_dir):
    text = load_text_encoder(str(tiny_clip_dir))
    long_prompt = "chest x-ray showing " + " and ".join(["effusion"] * 20)
    hidden, mask, truncated = encode_prompts(text, ["chest x-ray showing effusion", long_prompt])
    assert hidden.shape == (2, 16, 16) and mask.shape == (2, 16)
    assert truncated == 1
    assert mask[0].sum() < 16 and mask[1].all()


def test_encoding_is_the_same_for_a_prompt_alone_or_in_a_batch(tiny_clip_dir):
    text = load_text_encoder(str(tiny_clip_dir))
    alone, _, _ = encode_prompts(text, ["chest x-ray showing mass"])
    batched, _, _ = encode_prompts(text, ["chest x-ray with no findings", "chest x-ray showing mass"])
    torch.testing.assert_close(alone[0], batched[1], atol=1e-5, rtol=0)


def test_clip_path_that_does_not_exist_says_how_to_fix_it(tmp_path):
    with pytest.raises(DataError, match="could not be loaded as a saved CLIP"):
        load_text_encoder(str(tmp_path / "no-such-clip"))


def test_unreachable_hub_id_says_to_point_clip_model_at_a_local_copy(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without network: fail fast, no retries
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="set clip.model to that directory"):
        load_vision_encoder("someone/not-cached-clip-model")


def write_store(path, rows=3, tokens=2, dim=4, names=None, data=None):
    data = np.arange(rows * tokens * dim, dtype=np.float32).reshape(rows, tokens, dim) if data is None else data
    with ConditionStoreWriter(path, rows, tokens, dim) as store:
        store.write(0, data)
        store.finish(names or [f"{i:08d}_000.png" for i in range(rows)], np.arange(rows), {"branch": "test"})
    return data


def test_store_round_trip_reads_rows_by_image_index(tmp_path):
    data = write_store(tmp_path / "s")
    store = ConditionStore(tmp_path / "s")
    assert (store.tokens, store.dim, len(store)) == (2, 4, 3)
    np.testing.assert_allclose(store["00000002_000.png"].embeddings.numpy(), data[2])


def test_store_rejects_wrong_shape_and_non_finite_blocks(tmp_path):
    with pytest.raises(StoreError, match="shape"):
        write_store(tmp_path / "a", data=np.zeros((3, 2, 5), dtype=np.float32))
    bad = np.zeros((3, 2, 4), dtype=np.float32)
    bad[1, 0, 0] = np.nan
    with pytest.raises(StoreError, match="non-finite values in rows 0..2"):
        write_store(tmp_path / "b", data=bad)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_store_rejects_duplicate_image_index(tmp_path):
    with pytest.raises(StoreError, match="duplicate Image Index"):
        write_store(tmp_path / "s", names=["a.png", "a.png", "b.png"])


def test_truncated_store_is_detected(tmp_path):
    write_store(tmp_path / "s")
    embeddings = tmp_path / "s" / "embeddings.npy"
    embeddings.write_bytes(embeddings.read_bytes()[:-8])
    with pytest.raises(StoreError, match="truncated"):
        ConditionStore(tmp_path / "s")


def test_text_store_encodes_each_distinct_prompt_once(tmp_path, tiny_clip_dir):
    from cxr_diffusion.conditioning.embed import embed_clip_text

    table = pd.DataFrame({"Image Index": ["a.png", "b.png", "c.png", "d.png"],
                          "Finding Labels": ["Effusion", "No Finding", "Effusion", "Mass"]})
    table.to_csv(tmp_path / "filtered.csv", index=False)
    metrics = embed_clip_text(tmp_path / "filtered.csv", profile_section(ClipConfig, model=str(tiny_clip_dir)), tmp_path, tmp_path / "store")
    store = ConditionStore(tmp_path / "store")
    assert metrics["unique_prompts"] == 3 and len(store) == 4
    assert store.row_of["a.png"] == store.row_of["c.png"] != store.row_of["b.png"]
    text = load_text_encoder(str(tiny_clip_dir))
    direct, _, _ = encode_prompts(text, ["chest x-ray showing mass"])
    torch.testing.assert_close(store["d.png"].embeddings, direct[0], atol=2e-3, rtol=1e-2)  # fp16 storage


def test_a_max_length_that_cuts_two_prompts_to_the_same_tokens_is_refused():
    from cxr_diffusion.config import ParamsError
    from cxr_diffusion.conditioning.demo_clip import check_prompts_stay_distinct
    from cxr_diffusion.conditioning.prompt_tokenizer import train_prompt_tokenizer

    prompts = ["a chest x-ray showing effusion and cardiomegaly", "a chest x-ray showing effusion and mass"]
    tokenizer = train_prompt_tokenizer(prompts, 1000, 32)
    check_prompts_stay_distinct(tokenizer, prompts, 32)  # long enough: nothing to refuse
    with pytest.raises(ParamsError, match=r"'clip.demo.max_length' is 6; the prompts .* are cut to the same tokens; "
                                          r"set it to at least \d+"):
        check_prompts_stay_distinct(tokenizer, prompts, 6)
