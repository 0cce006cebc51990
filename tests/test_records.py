"""pruning.json as a typed record: 0.1.0 files still read, one writer, one-line errors."""

import json
from pathlib import Path

import pytest

from prune.core.errors import PruneError
from prune.core.records import SCHEMA_VERSION, PruningRecord, read_record, record_json, write_record

FIXTURE = Path(__file__).parent / "fixtures" / "pruning-0.1.0.json"


def test_a_record_written_by_0_1_0_reads_with_every_value():
    raw = json.loads(FIXTURE.read_text())
    record = read_record(FIXTURE)
    assert record.schema_version == 1  # what 0.1.0 wrote: no schema_version key
    assert record.removed == raw["removed"] and record.kept == raw["kept"]
    assert record.removed_original_all == raw["removed_original_all"]
    assert record.original.n_layers == raw["original"]["n_layers"]
    assert record.source.path == raw["source"]["path"]
    assert record.calibration.seq_len == raw["calibration"]["seq_len"]
    assert record.strategy == raw["selection"]["strategy"]
    assert [s.step for s in record.chain()] == [1, 2]
    assert record.history[0].eval_rows == raw["history"][0]["eval_rows"]
    assert record.scores_before == raw["scores_before"]


def test_written_record_round_trips_and_carries_the_schema_version(tmp_path):
    record = read_record(FIXTURE)
    file = write_record(tmp_path, record)
    again = read_record(file)
    assert json.loads(file.read_text())["schema_version"] == SCHEMA_VERSION
    assert again.model_dump(exclude={"schema_version"}) == record.model_dump(exclude={"schema_version"})
    assert record_json(again) == file.read_text()


def test_unknown_keys_are_kept():
    data = {**json.loads(FIXTURE.read_text()), "from_the_future": {"x": 1}}
    record = PruningRecord.model_validate(data)
    assert json.loads(record_json(record))["from_the_future"] == {"x": 1}


@pytest.mark.parametrize("content, message", [
    (b"[1, 2]", "not a pruning record"),
    (b'{"removed": 5}', "'removed'"),
    (b'{"removed": [1], "kept": "x"}', "'kept'"),
    (b"\xff\xfe{", "not UTF-8"),
    (b"{", "not valid JSON"),
    # indices that no saved model has (heal crashed on them after training; check called such a record consistent)
    (b'{"removed": [3, 3], "layers_before": 8}', "'removed' repeats a block"),
    (b'{"removed": [3], "kept": [0, 1, 2, 4, 5, 6, 99], "layers_before": 8}', r"'kept' holds \[99\], outside the 8"),
    (b'{"removed": [-1], "layers_before": 8}', r"'removed' holds \[-1\]"),
    (b'{"removed": [1], "kept_original": [700], "original": {"n_layers": 8}}', "'kept_original' holds \\[700\\]"),
    (b'{"removed": [1], "history": [{"removed": [9, 9]}]}', "step 1: 'removed' repeats"),
    # kept and removed that do not split the blocks (check called it consistent; export-mergekit wrote wrong slices)
    (b'{"removed": [3, 4], "kept": [0, 1, 2, 3, 4, 7], "layers_before": 8}', r"'kept' and 'removed' both hold \[3, 4\]"),
    (b'{"removed": [3], "kept": [0, 1, 2, 4, 5], "layers_before": 8}', r"leave out \[6, 7\] of the 8"),
    (b'{"removed": [3], "kept": [0, 1, 2, 4, 5, 6, 7], "layers_before": 8, "layers_after": 6}', "'layers_after' is 6"),
    (b'{"removed": [3, 4], "kept_original": [0, 1, 2, 3, 4, 7], "removed_original_all": [3, 4], '
     b'"original": {"n_layers": 8}}', r"'kept_original' and 'removed_original_all' both hold"),
    # blocks out of order (check passed it; export-mergekit wrote slices stacking 5 1 2 0 6 7 for a model holding 0-7 in order)
    (b'{"removed": [3, 4], "kept": [5, 1, 2, 0, 6, 7], "layers_before": 8}', r"'kept' is \[5, 1, 2, 0, 6, 7\], not in increasing"),
    (b'{"removed": [3, 4], "kept": [0, 1, 2, 5, 6, 7], "kept_original": [7, 1, 2, 5, 6, 0], "layers_before": 8, '
     b'"original": {"n_layers": 8}}', "'kept_original' is .* not in increasing order"),
])
def test_bad_records_are_one_line_errors(tmp_path, content, message):
    file = tmp_path / "pruning.json"
    file.write_bytes(content)
    with pytest.raises(PruneError, match=message) as err:
        read_record(file)
    assert "\n" not in str(err.value)


def test_a_replacement_block_is_found_while_it_is_kept_and_after_a_second_healing():
    """The card names the kept index that is a trained replacement block. A replace-healed folder healed again keeps
    the replacement under ``healing.previous``: it was not found there; a later step that removes it drops it."""
    from prune.core.records import PruningRecord

    step = {"removed": [3, 4, 5], "kept": [0, 1, 2, 5, 6, 7], "removed_original": [3, 4, 5],
            "kept_original": [0, 1, 2, 5, 6, 7]}
    replace = {"method": "replace", "replacement": {"replaces": [3, 4, 5], "position": 3}}
    assert PruningRecord.model_validate({**step, "healing": replace}).kept_replacement() == (5, [3, 4, 5])
    again = {**step, "healing": {"method": "lora", "previous": replace}}
    assert PruningRecord.model_validate(again).kept_replacement() == (5, [3, 4, 5])
    assert PruningRecord.model_validate(step).kept_replacement() is None
    later = {"removed": [3], "kept": [0, 1, 2, 4, 5], "removed_original": [5], "kept_original": [0, 1, 2, 6, 7]}
    assert PruningRecord.model_validate({**later, "history": [{**step, "healing": replace}]}).kept_replacement() is None
    kept_later = {"removed": [0], "kept": [1, 2, 3, 4, 5], "removed_original": [0], "kept_original": [1, 2, 5, 6, 7]}
    assert PruningRecord.model_validate({**kept_later, "history": [{**step, "healing": replace}]}).kept_replacement() \
        == (5, [3, 4, 5])


def test_a_healing_record_names_its_method():
    """A hand-edited healing without its method (or with settings that are no mapping) failed later: a KeyError in
    the card, the report and `prune check --original`."""
    import pytest

    from prune.core.errors import PruneError
    from prune.core.records import parse_record

    base = {"removed": [1], "kept": [0, 2], "layers_before": 3, "layers_after": 2}
    for healing in ({"settings": {}}, {"method": 3}, {"method": "lora", "settings": "lr=1"}):
        with pytest.raises(PruneError, match="'healing': Value error, a healing record names its method"):
            parse_record({**base, "healing": healing})
    assert parse_record({**base, "healing": {"method": "lora"}}).healing == {"method": "lora"}
