"""The missing-dataset refusal names each missing file of a prefix (this line reaches the resource's Failed
condition when a pod cannot find its corpus)."""

from __future__ import annotations

import pytest

from qwen_trainer.data.pretrain import check_prefixes
from qwen_trainer.errors import UserErrors


def test_both_files_missing(tmp_path):
    with pytest.raises(UserErrors) as err:
        check_prefixes([str(tmp_path / "corpus")])
    assert f"data.pretrain.prefixes[0].path: {tmp_path}/corpus.bin and {tmp_path}/corpus.idx do not exist" in str(err.value)


def test_one_file_missing_names_it(tmp_path):
    (tmp_path / "ok.bin").write_bytes(b"")
    (tmp_path / "ok.idx").write_bytes(b"")
    (tmp_path / "half.bin").write_bytes(b"")
    with pytest.raises(UserErrors) as err:
        check_prefixes([str(tmp_path / "ok"), str(tmp_path / "half")])
    text = str(err.value)
    assert f"data.pretrain.prefixes[1].path: {tmp_path}/half.idx does not exist" in text
    assert "prefixes[0]" not in text
