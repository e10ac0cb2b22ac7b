"""The dev split of wiki_calib (EVAL.md): dev windows and sentences, and calibration refusing to reach them."""

from __future__ import annotations

import numpy as np
import pytest

from qsvd_export.cli import main
from qsvd_export.data import (DEV_LENGTH, DEV_SENTENCES, DEV_WINDOWS, dev_sentences, dev_split_start, dev_windows,
                              read_text, sentences_with_offsets, token_windows)
from qsvd_export.errors import UsageError
from qsvd_export.evaluate import eval_sentences
from qsvd_export.tiny import ByteTokenizer

TOK = ByteTokenizer()
CALIB = read_text("wiki_calib")
IDS = np.frombuffer(CALIB.encode("utf-8"), dtype=np.uint8).astype(np.int64)


def test_dev_windows_are_the_last_32_windows_of_wiki_calib():
    whole = len(IDS) // DEV_LENGTH
    expected = IDS[:whole * DEV_LENGTH].reshape(whole, DEV_LENGTH)[-DEV_WINDOWS:]
    assert np.array_equal(dev_windows(TOK), expected)
    assert np.array_equal(dev_windows(TOK, 4, 128), expected[:1].reshape(4, 128))  # same span, re-cut
    with pytest.raises(UsageError, match="dev split holds"):
        dev_windows(TOK, DEV_WINDOWS + 1)


def test_dev_sentences_are_the_last_256_sentences_split_like_the_eval_sentences():
    everything = eval_sentences(CALIB, count=10**9)
    assert dev_sentences() == everything[-DEV_SENTENCES:]
    assert dev_sentences(3) == everything[-DEV_SENTENCES:][:3]
    assert all(CALIB[offset:offset + len(s)] == s for offset, s in sentences_with_offsets(CALIB)[-300:])
    with pytest.raises(UsageError):
        dev_sentences(DEV_SENTENCES + 1)


def test_calibration_windows_stop_before_both_dev_sets():
    start = dev_split_start(TOK)
    first_sentence_offset = sentences_with_offsets(CALIB)[-DEV_SENTENCES][0]
    assert start <= len(CALIB[:first_sentence_offset].encode("utf-8"))  # byte tokens: index == byte offset
    assert start <= (len(IDS) // DEV_LENGTH - DEV_WINDOWS) * DEV_LENGTH
    most = start // DEV_LENGTH
    calib = token_windows(TOK, CALIB, DEV_LENGTH, most, source="wiki_calib")  # the largest request that fits
    assert calib.size <= start
    seen = TOK.decode(calib.reshape(-1).tolist())
    assert not any(s in seen for s in dev_sentences()[:5])
    with pytest.raises(UsageError, match="dev split"):
        token_windows(TOK, CALIB, DEV_LENGTH, most + 1, source="wiki_calib")
    with pytest.raises(UsageError, match="dev split"):
        token_windows(TOK, CALIB, 64, start // 64 + 1, source="wiki_calib")


def test_other_texts_are_not_limited():
    text = CALIB[:-10]  # not wiki_calib: every window may be read
    assert token_windows(TOK, text, DEV_LENGTH, len(text) // DEV_LENGTH).shape == (len(text) // DEV_LENGTH, DEV_LENGTH)


def test_compress_refuses_calibration_that_reads_into_the_dev_split(tmp_path, capsys):
    windows = dev_split_start(TOK) // 64 + 1
    code = main(["compress", "tiny-llama", "--budget", "kv=0.5", "--calib-windows", str(windows), "--calib-length",
                 "64", "--grad-windows", "1", "-q", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "dev split" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_smollm2_dev_windows_are_disjoint_from_default_calibration():
    from qsvd_export.zoo import load_model

    tokenizer = load_model("smollm2-135m").tokenizer
    start = dev_split_start(tokenizer)
    assert 128 * 512 <= start  # EVAL.md's 128 calibration windows fit before the dev split
    ids = np.asarray(tokenizer(CALIB, add_special_tokens=False)["input_ids"])
    first_dev = (len(ids) // DEV_LENGTH - DEV_WINDOWS) * DEV_LENGTH
    assert start <= first_dev and np.array_equal(dev_windows(tokenizer)[0], ids[first_dev:first_dev + DEV_LENGTH])
    token_windows(tokenizer, CALIB, 512, 128, source="wiki_calib")  # the default calibration is allowed
