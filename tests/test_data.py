import hashlib
import json

import pytest
import torch

from prune import PruneError, TextSource, calibration_windows, eval_windows, load_text
from prune.io.text import needs_bos, token_stream

from conftest import WIKI_JSONL, WIKI_RAW


def test_txt_and_jsonl_give_the_standard_wikitext_text():
    raw = load_text(TextSource(str(WIKI_RAW), rows="0:40"))
    rows = [json.loads(line)["text"] for line in WIKI_JSONL.read_text().splitlines()[:40]]
    assert raw.startswith("\n = Robert Boulter = \n")
    joined = load_text(TextSource(str(WIKI_JSONL), rows="0:40"))
    assert joined == "\n\n".join(rows)


def test_rows_slice_and_fields(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"p{i} ", "response": f"r{i}"}) for i in range(5)) + "\n")
    assert load_text(TextSource(str(path), field=["prompt", "response"], rows="1:3")) == "p1 r1\n\np2 r2"
    with pytest.raises(PruneError, match="no field 'text'"):
        load_text(TextSource(str(path)))
    with pytest.raises(PruneError, match="not a 'start:stop' slice"):
        load_text(TextSource(str(path), field="prompt", rows="3"))


def test_a_text_files_rows_are_its_lines(tmp_path):
    """A file ending in a newline has no empty row after it (rows "-1:" read that phantom row, and the counts of a
    slice from the end were one too many); any slice reaching the end still reads as the file does."""
    from prune.io.text import row_count

    path = tmp_path / "abc.txt"
    path.write_text("alpha beta\nbeta\ngamma\n")
    assert row_count(TextSource(str(path))) == 3
    assert load_text(TextSource(str(path), rows="-1:")) == "gamma\n"
    assert load_text(TextSource(str(path), rows="1:")) == "beta\ngamma\n" and load_text(TextSource(str(path))) == path.read_text()
    with pytest.raises(PruneError, match="rows='3:' selects none of the 3 rows"):
        load_text(TextSource(str(path), rows="3:"))
    with pytest.raises(PruneError, match="names a JSON field, but .*abc.txt is plain text"):  # it was ignored
        load_text(TextSource(str(path), field=["prompt", "response"]))
    path.write_text("no newline at the end")
    assert row_count(TextSource(str(path))) == 1 and load_text(TextSource(str(path), rows="-1:")) == "no newline at the end"
    path.write_text("")  # none: it was counted one empty row ("selects none of the 1 rows")
    assert row_count(TextSource(str(path))) == 0 and load_text(TextSource(str(path))) == ""
    with pytest.raises(PruneError, match="rows='0:5' selects none of the 0 rows"):
        load_text(TextSource(str(path), rows="0:5"))


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(PruneError, match="data file not found"):
        load_text(TextSource(str(tmp_path / "nope.txt")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(PruneError, match="bad.jsonl:1 is not valid JSON"):
        load_text(TextSource(str(bad)))


def test_calibration_windows_are_seeded_disjoint_and_from_the_stream(tokenizers_by_bos, calib_text):
    tok = tokenizers_by_bos[False]
    a = calibration_windows(tok, calib_text, 6, 32, seed=3)
    b = calibration_windows(tok, calib_text, 6, 32, seed=3)
    c = calibration_windows(tok, calib_text, 6, 32, seed=4)
    assert a.shape == (6, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    stream = token_stream(tok, calib_text)
    windows = stream[: stream.numel() // 32 * 32].view(-1, 32)
    positions = [int(torch.nonzero((windows == row).all(1))[0]) for row in a]
    assert positions == sorted(set(positions))  # distinct windows, in stream order


def test_bos_is_put_in_front_of_every_window_when_the_tokenizer_uses_it(tokenizers_by_bos, calib_text):
    with_bos, without = tokenizers_by_bos[True], tokenizers_by_bos[False]
    assert needs_bos(with_bos) and not needs_bos(without)
    w = calibration_windows(with_bos, calib_text, 4, 16, seed=0)
    assert (w[:, 0] == with_bos.bos_token_id).all() and (w[:, 1:] != with_bos.bos_token_id).all()
    e = eval_windows(with_bos, calib_text, 16, max_windows=3)
    assert e.shape == (3, 16) and (e[:, 0] == 1).all()
    assert not (calibration_windows(without, calib_text, 4, 16)[:, 0] == 1).all()


def test_eval_windows_are_consecutive(tokenizers_by_bos, calib_text):
    tok = tokenizers_by_bos[False]
    e = eval_windows(tok, calib_text, 20, max_windows=4)
    assert torch.equal(e.flatten(), token_stream(tok, calib_text)[:80])


def test_too_little_text_is_refused(tokenizers_by_bos):
    tok = tokenizers_by_bos[False]
    with pytest.raises(PruneError, match="calibration text too short"):
        calibration_windows(tok, "a few words only", 4, 64)
    with pytest.raises(PruneError, match="text is empty"):
        calibration_windows(tok, "  \n ", 4, 64)


def test_text_edge_cases_read_the_same_or_say_why(tmp_path):
    """Windows line ends read as the Unix file (they changed every window), a number where text belongs is
    refused (it became text), a slice that selects nothing is named (it surfaced as "the text is empty"),
    and a folder goes to datasets (it was "not found")."""
    lines = [f"line {i} of the corpus" for i in range(20)]
    (tmp_path / "unix.txt").write_text("\n".join(lines))
    (tmp_path / "dos.txt").write_bytes("\r\n".join(lines).encode())
    assert load_text(TextSource(str(tmp_path / "dos.txt"))) == load_text(TextSource(str(tmp_path / "unix.txt")))
    (tmp_path / "n.jsonl").write_text('{"text": "words"}\n{"text": 123}\n')
    with pytest.raises(PruneError, match="field 'text' is int, not text"):
        load_text(TextSource(str(tmp_path / "n.jsonl")))
    for rows in ("5:2", "100:"):
        with pytest.raises(PruneError, match=f"rows='{rows}' selects none of the 20 rows"):
            load_text(TextSource(str(tmp_path / "unix.txt"), rows=rows))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "from a folder"}\n')
    assert load_text(TextSource(str(folder))) == "from a folder"


def test_heal_text_that_overlaps_evaluation_text_is_caught_however_it_is_written():
    """The guard against healing on evaluation text compared field, config and split literally and rows as
    plain numbers: ["text"] against "text", a .txt file's unused split, rows counted from the end, and the
    fidelity's own text all passed; a malformed rows slice was blamed on an overlap."""
    from prune.core.config import EvaluateConfig, HealConfig
    from prune.pipeline.recipe import check_heal_data

    ev = EvaluateConfig(perplexity={"path": str(WIKI_RAW), "rows": "4000:"})
    for data in ({"path": str(WIKI_RAW), "rows": "0:-10"}, {"path": str(WIKI_RAW), "field": ["text"], "rows": "3990:"},
                 {"path": str(WIKI_RAW), "split": "test", "rows": "-5:"}):
        with pytest.raises(PruneError, match="overlaps the perplexity text"):
            check_heal_data(HealConfig(method="lora", data=data), ev)
    check_heal_data(HealConfig(method="lora", data={"path": str(WIKI_RAW), "rows": "0:-400"}), ev)  # 0:3958: disjoint
    fid = EvaluateConfig(perplexity={"path": str(WIKI_JSONL)}, fidelity={"path": str(WIKI_RAW), "rows": "100:200"})
    with pytest.raises(PruneError, match="overlaps the fidelity text"):
        check_heal_data(HealConfig(method="lora", data={"path": str(WIKI_RAW), "rows": "150:160"}), fid)
    # rows read as several fields hold the text of each: a field in common is the same text (it passed)
    c4 = {"path": str(WIKI_JSONL), "rows": "0:100"}
    with pytest.raises(PruneError, match="overlaps the perplexity text"):
        check_heal_data(HealConfig(method="lora", data={**c4, "field": ["text", "title"]}),
                        EvaluateConfig(perplexity={**c4, "field": "text"}))
    with pytest.raises(ValueError, match="not a 'start:stop' slice of whole numbers"):
        HealConfig(method="lora", data={"path": str(WIKI_RAW), "rows": "abc"})
    assert HealConfig(method="lora", data={"path": str(WIKI_RAW), "rows": "+0:1_000"}).data.rows == "+0:1_000"  # int() reads it


def test_a_text_is_tokenized_once_per_tokenizer(tokenizers_by_bos):
    """A run tokenized its evaluation text on every pass (~0.3 s per MB each): the stream of the same
    tokenizer and text is kept, equal to a fresh tokenization, handed out as a copy; a tokenizer that
    encodes otherwise (a token added) gets its own stream."""
    import copy

    from prune.io import text as T

    tok = tokenizers_by_bos[True]
    body = load_text(TextSource(str(WIKI_RAW), rows="0:200"))
    first = token_stream(tok, body)
    key = (T._tokenizer_key(tok), hashlib.sha256(body.encode()).hexdigest())
    assert key in T._STREAMS and torch.equal(first, torch.tensor(tok(body, add_special_tokens=False)["input_ids"]))
    first[0] = -1  # the caller's copy
    again = token_stream(tok, body)
    assert again[0] != -1 and torch.equal(again[1:], first[1:])
    other = copy.deepcopy(tok)
    other.add_tokens(["Boulter"])
    assert T._tokenizer_key(other) != key[0]
    assert token_stream(other, body).numel() < again.numel()  # "Boulter" is one token now
    split = copy.deepcopy(tok)
    split.backend_tokenizer.encode_special_tokens = True  # special tokens in the text split like any text
    assert T._tokenizer_key(split) != key[0]
    # a custom Python pre-tokenizer cannot be serialized: its streams are not kept, and tokenizing still works
    from tokenizers import pre_tokenizers

    class Whole:
        def pre_tokenize(self, pretok):
            pass

    custom = copy.deepcopy(tok)
    custom.backend_tokenizer.pre_tokenizer = pre_tokenizers.PreTokenizer.custom(Whole())
    assert T._tokenizer_key(custom) is None and token_stream(custom, body).numel() > 0
