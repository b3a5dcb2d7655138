"""The demo CLIP's prompt tokenizer: learned the same way on every run, lossless, and CLIP-format."""

import json
import subprocess
import sys
from collections import Counter

from cxr_diffusion.conditioning.prompt_tokenizer import VOCAB_FLOOR, learn_merges, split_words, train_prompt_tokenizer

PROMPTS = ["chest x-ray showing effusion", "chest x-ray showing nodule, mass", "chest x-ray with no findings",
           "chest x-ray showing atelectasis and effusion", "chest x-ray showing infiltration"]
LEARN = ("from cxr_diffusion.conditioning.prompt_tokenizer import train_prompt_tokenizer; import json, sys; "
         "t = train_prompt_tokenizer(json.loads(sys.argv[1]), 1000, 32); "
         "print(json.dumps(sorted(t.get_vocab().items(), key=lambda kv: kv[1])))")


def test_the_same_prompts_give_the_same_vocabulary_in_every_process():
    # tokenizers' BpeTrainer gave a different vocabulary in each of five processes on the same prompts.
    runs = {subprocess.run([sys.executable, "-c", LEARN, json.dumps(PROMPTS)], capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": str(seed), "PATH": ""}).stdout for seed in (1, 2, 3)}
    assert len(runs) == 1
    in_process = sorted(train_prompt_tokenizer(PROMPTS, 1000, 32).get_vocab().items(), key=lambda kv: kv[1])
    assert json.loads(runs.pop()) == [list(kv) for kv in in_process]


def test_corpus_words_become_single_tokens_and_any_text_round_trips():
    tokenizer = train_prompt_tokenizer(PROMPTS, 1000, 32)
    assert tokenizer.tokenize("chest x-ray showing nodule, mass") == [
        "chest</w>", "x</w>", "-</w>", "ray</w>", "showing</w>", "nodule</w>", ",</w>", "mass</w>"]
    unseen = "cardiomegaly with pneumothorax déjà vu 2x"
    ids = tokenizer(unseen)["input_ids"]
    assert tokenizer.unk_token_id not in ids[1:-1]  # every byte, word-final or not, has a symbol
    assert tokenizer.decode(ids, skip_special_tokens=True) == "cardiomegaly with pneumothorax déjà vu 2 x"


def test_vocabulary_size_caps_the_merges():
    small = train_prompt_tokenizer(PROMPTS, VOCAB_FLOOR + 3, 32)
    assert len(small) == VOCAB_FLOOR + 3
    assert train_prompt_tokenizer(PROMPTS, 10, 32).tokenize("ray") == ["r", "a", "y</w>"]  # below the floor: no merges


def test_merges_take_the_most_frequent_pair_and_break_ties_by_the_smaller_pair():
    counts = Counter({("b", "a</w>"): 2, ("a", "b</w>"): 2, ("c", "c</w>"): 3})
    assert learn_merges(counts, 3) == [("c", "c</w>"), ("a", "b</w>"), ("b", "a</w>")]
    assert split_words("X-Ray  OK") == [("x</w>",), ("-</w>",), ("r", "a", "y</w>"), ("o", "k</w>")]
