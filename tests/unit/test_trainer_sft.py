"""SFT rendering: ChatML prompt, loss only on the response, truncation, padding and packing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qwen_trainer.data import sft
from qwen_trainer.data.batches import IGNORE_INDEX
from qwen_trainer.data.tiny_tokenizer import build_tiny_tokenizer
from qwen_trainer.errors import UserError


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    d = build_tiny_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=600)
    return AutoTokenizer.from_pretrained(d)


def test_prompt_is_chatml_with_default_system(tok):
    enc = sft.SftEncoder(tok)
    assert enc.prompt_text("Add.", "2 and 3") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nAdd.\n2 and 3<|im_end|>\n<|im_start|>assistant\n")
    assert enc.prompt_text("Hi.", "") == sft.chatml_prompt("Hi.")


def test_labels_mask_the_prompt_exactly(tok):
    enc = sft.SftEncoder(tok)
    ids, labels = enc.encode("What is 2 plus 3?", "", "2 plus 3 is 5.")
    prompt_ids = tok(sft.chatml_prompt("What is 2 plus 3?"), add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    assert ids[:n] == prompt_ids
    assert labels[:n] == [IGNORE_INDEX] * n
    assert labels[n:] == ids[n:]
    assert tok.decode(ids[n:]) == "2 plus 3 is 5.<|im_end|>"
    assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")


def test_shifted_padded_sample(tok, tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"query": "Say yes.", "response": "yes"}) + "\n")
    src = sft.build(str(path), "data.sft.trainPath", tok, 96, packing=False, seed=0)
    s = src.sample(0)
    ids, labels = sft.SftEncoder(tok).encode("Say yes.", "", "yes")
    k = len(ids) - 1
    assert (s["tokens"][:k] == ids[:-1]).all()
    assert (s["targets"][:k] == labels[1:]).all()
    assert (s["tokens"][k:] == tok.pad_token_id).all() and (s["targets"][k:] == IGNORE_INDEX).all()
    trained = s["targets"][s["targets"] != IGNORE_INDEX]
    assert tok.decode(trained) == "yes<|im_end|>"
    assert (s["position_ids"][:k] == np.arange(k)).all()


def test_aliases_and_missing_fields(tok, tmp_path):
    good = [{"instruction": "a", "output": "b"}, {"query": "a", "response": "b"},
            {"prompt": "a", "completion": "b"}, {"instruction": "a", "input": "c", "content": "b"}]
    for r in good:
        assert sft.normalize(r, "x")[2] == "b"
    with pytest.raises(UserError, match="no output"):
        sft.normalize({"instruction": "a"}, "sample 0")
    path = tmp_path / "bad.json"
    path.write_text("[{\"instruction\": \"a\"}]")
    with pytest.raises(UserError, match="data.sft.trainPath"):
        sft.build(str(path), "data.sft.trainPath", tok, 64, False, 0)


def test_prompt_too_long_is_skipped_and_long_response_truncated(tok, tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps([
        {"instruction": "word " * 200, "output": "x"},
        {"instruction": "Hi.", "output": "ok " * 200},
        {"instruction": "Hi.", "output": "ok"},
    ]))
    src = sft.build(str(path), "f", tok, 64, False, 0)
    assert src.stats.samples == 2 and src.stats.skipped == 1 and src.stats.truncated == 1
    assert src.tokens.shape == (2, 64)


def test_packing_resets_positions_per_sample(tok, tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"instruction": "A.", "output": "b"}, {"instruction": "C.", "output": "d"},
                                {"instruction": "E.", "output": "f"}]))
    one = sft.SftEncoder(tok).encode("A.", "", "b")[0]
    length = 2 * (len(one) - 1) + 5
    src = sft.build(str(path), "f", tok, length, packing=True, seed=0, shuffle=False)
    assert len(src) == 2  # two samples fit in the first sequence, the third starts the next one
    pos = src.positions[0]
    k = len(one) - 1
    assert (pos[:k] == np.arange(k)).all() and (pos[k:2 * k] == np.arange(k)).all()
    assert (pos[2 * k:] == np.arange(length - 2 * k)).all()
    # each packed sample keeps its own response mask
    targets = src.targets[0]
    assert tok.decode(targets[:k][targets[:k] != IGNORE_INDEX]) == "b<|im_end|>"
    assert tok.decode(targets[k:2 * k][targets[k:2 * k] != IGNORE_INDEX]) == "d<|im_end|>"


def test_epoch_order_is_seeded(tok, tmp_path):
    path = tmp_path / "e.json"
    path.write_text(json.dumps([{"instruction": f"n{i}", "output": "x"} for i in range(10)]))
    a = sft.build(str(path), "f", tok, 64, False, seed=3)
    b = sft.build(str(path), "f", tok, 64, False, seed=3)
    first = [a.sample(i)["tokens"].tolist() for i in range(20)]
    assert first == [b.sample(i)["tokens"].tolist() for i in range(20)]
    assert sorted(map(tuple, first[:10])) == sorted(map(tuple, first[10:]))  # each epoch visits every sample
