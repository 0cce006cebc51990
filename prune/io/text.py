"""Text for calibration and evaluation: read it, tokenize it once, cut it into windows.

Sources: a local ``.txt`` file (one document per line; blank lines kept as separators; Windows
line ends read as ``\n``), a local ``.jsonl`` file (one document per row, from ``field``, or
several fields concatenated with nothing between them: a prefix and its completion), or a
Hugging Face ``datasets`` name (or a local folder ``datasets`` reads) with ``config`` and ``split``.
``rows="a:b"`` keeps a slice of the documents, so calibration and evaluation text
can be disjoint parts of one file.

Documents are joined with ``"\\n\\n"`` and tokenized once without special tokens
(the standard WikiText perplexity setup). Windows hold ``seq_len`` tokens; when the
tokenizer puts BOS in front of every encoded text (Llama-3, Gemma, ...) each window is
BOS followed by ``seq_len - 1`` text tokens, so the model sees what it was trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import torch

from prune.core.errors import PruneError
from prune.core.config import CalibrationConfig, TextConfig, TextSource, default

JOIN = "\n\n"
#: the suffixes load_text reads as a local file (anything else that is no file or folder: a datasets name)
TEXT_SUFFIXES = (".txt", ".raw", ".jsonl", ".json")

#: the field of a text that names none (a plain file has no field)
FIELD = default(TextConfig, "field")


def _row_slice(rows: str | None) -> slice:
    if rows is None:
        return slice(None)
    try:
        parts = [int(p) if p.strip() else None for p in rows.split(":")]
        if len(parts) != 2:
            raise ValueError
    except ValueError:
        raise PruneError(f"rows={rows!r} is not a 'start:stop' slice (e.g. '0:2000' or '2000:')") from None
    return slice(*parts)


def _pick(record, field: str | list[str], where: str) -> str:
    """The text of one row: ``field`` (or several, concatenated) of a JSON object, all strings."""
    if not isinstance(record, dict):
        raise PruneError(f"{where} is {type(record).__name__} {str(record)[:40]!r}, not a JSON object "
                         "(one object per line expected, e.g. {\"text\": \"...\"})")
    fields = [field] if isinstance(field, str) else list(field)
    missing = [f for f in fields if f not in record]
    if missing:
        raise PruneError(f"{where} has no field {missing[0]!r} (fields: {', '.join(map(str, record))}); name one of them as this text's field (a recipe's '<section>.field', or --field / --perplexity-field)")
    for f in fields:
        value = record[f]
        if not isinstance(value, str):
            shown = "null" if value is None else type(value).__name__
            raise PruneError(f"{where}: field {f!r} is {shown}, not text (remove the row or fix it)")
    return "".join(str(record[f]) for f in fields)


def read_text_file(path: Path) -> str:
    """A text file's content as UTF-8; gzip, binary and other encodings refused with one line."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PruneError(f"cannot read {path}: {exc.strerror or exc}") from None
    if data[:2] == b"\x1f\x8b":
        raise PruneError(f"{path} is gzip-compressed: decompress it first (gunzip -k {path.name})")
    if b"\x00" in data[:1 << 16]:
        raise PruneError(f"{path} is a binary file, not text (give a .txt or .jsonl file)")
    try:
        return data.decode("utf-8-sig").replace("\r\n", "\n")  # the same windows as the file with Unix line ends
    except UnicodeDecodeError as exc:
        raise PruneError(f"{path} is not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r}); convert it, "
                         f"e.g. iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}") from None


def _json_rows(path: Path, text: str, field) -> list[str]:
    """Rows of a ``.jsonl`` file (one object per line) or of a ``.json`` file holding an array of objects."""
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PruneError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return [_pick(r, field, f"{path}: item {i}") for i, r in enumerate(rows)]
    texts = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise PruneError(f"{path}:{lineno} is not valid JSON (one object per line expected)") from None
        texts.append(_pick(record, field, f"{path}:{lineno}"))
    return texts


def load_text(source: TextSource) -> str:
    """The text of ``source`` (a :class:`TextSource`, or a path / dataset name with the defaults): its rows
    (after the ``rows`` slice) joined as described above."""
    if isinstance(source, (str, os.PathLike)):
        source = TextSource(str(source))
    if not isinstance(source, TextSource):
        raise PruneError(f"load_text takes a path, a dataset name or a prune.TextSource, got {type(source).__name__}")
    path = Path(source.path).expanduser()
    if not path.is_dir() and (path.suffix in TEXT_SUFFIXES or path.exists()):
        if not path.is_file():
            raise PruneError(f"data file {source.path} is not a regular file (a device, a pipe: give a text file)"
                             if path.exists() else f"data file not found: {source.path} (check the path)")
        text = read_text_file(path)
        if path.suffix in (".jsonl", ".json"):
            texts = _json_rows(path, text, source.field)
        else:
            if source.field not in (FIELD, [FIELD], (FIELD,)):  # the default: a plain file has no field
                raise PruneError(f"field {source.field!r} names a JSON field, but {source.path} is plain text, read line "
                                 "by line (drop the field, or give a .jsonl file)")
            return "\n".join(_rows_of(text_lines(text), source))
    else:  # a datasets name, or a folder datasets reads
        texts = _read_hf_dataset(source)
    return JOIN.join(_rows_of(texts, source))


def text_lines(text: str) -> list[str]:
    """The rows of a plain text file: its lines, the last keeping the file's final newline (a file ending in a
    newline has no empty row after it, so ``rows: "-1:"`` is its last line; joined with newlines, any slice
    reaching the end reads as the file does). An empty file has none (it was counted one empty row)."""
    if not text:
        return []
    lines = text.split("\n")
    if len(lines) > 1 and lines[-1] == "":
        lines.pop()
        lines[-1] += "\n"
    return lines


def row_count(source: TextSource) -> int | None:
    """How many rows (lines; JSON rows) a local file holds, for slices counted from its end; None for a
    dataset name or an unreadable file (then a check assumes the worst)."""
    path = Path(source.path).expanduser()
    if not path.is_file():
        return None
    try:
        text = read_text_file(path)
        if path.suffix in (".jsonl", ".json"):
            return len(_json_rows(path, text, source.field))
        return len(text_lines(text))
    except PruneError:
        return None


def reads_from_hub(source: TextSource) -> bool:
    """Whether :func:`load_text` reads ``source`` from the Hub (``datasets``): no local file or folder by
    that name, and not a text file's suffix (recorded by a run, so a card rendered elsewhere says the same)."""
    path = Path(source.path).expanduser()
    return not path.exists() and path.suffix not in TEXT_SUFFIXES


def _rows_of(items: list[str], source: TextSource) -> list[str]:
    """``items[rows]``; a slice that selects nothing is named (it surfaced later as "the text is empty")."""
    picked = items[_row_slice(source.rows)]
    if source.rows is not None and not picked:
        raise PruneError(f"rows={source.rows!r} selects none of the {len(items)} rows of {source.path} "
                         "(check the slice: start:stop, counted from 0)")
    return picked


def _read_hf_dataset(source: TextSource) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(source.path, source.config, split=source.split)
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PruneError(
            f"could not load dataset {source.path!r} (config {source.config!r}, split {source.split!r}): {first} "
            "(offline? use a local .txt/.jsonl file)"
        ) from exc
    fields = [source.field] if isinstance(source.field, str) else list(source.field)
    for f in fields:
        if f not in ds.column_names:
            raise PruneError(f"dataset {source.path!r} has no column {f!r} (columns: {', '.join(ds.column_names)}); name one of them as this text's field (a recipe's '<section>.field', or --field / --perplexity-field)")
    return [_pick(row, fields, f"dataset {source.path!r} row {i}") for i, row in enumerate(ds)]


def needs_bos(tokenizer) -> bool:
    """True when the tokenizer itself starts every encoded text with BOS (so windows should too)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


#: the last few token streams, keyed by the tokenizer's full serialization and the text (sha256 of each):
#: one run tokenizes the same calibration and evaluation text several times (pre-flight, scoring, held-out
#: windows, every evaluation pass), ~0.3 s per MB each
_STREAMS: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
_STREAMS_KEPT = 8
_STREAMS_BYTES = 256 << 20  # and at most this much (int64 ids: 32M tokens); a longer stream is not kept


def _tokenizer_key(tokenizer) -> str | None:
    """A digest of everything a fast tokenizer encodes with (its ``tokenizers`` serialization: vocabulary,
    merges, normalizer, added tokens); None for another kind (its streams are not kept)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    # beside the serialization: the class and the switches that change how special tokens in a text encode
    extra = (type(tokenizer).__qualname__, getattr(tokenizer, "split_special_tokens", None),
             getattr(backend, "encode_special_tokens", None))
    try:
        serialized = backend.to_str()
    except Exception:  # noqa: BLE001 - a custom Python component cannot be serialized: such streams are not kept
        return None
    return hashlib.sha256(f"{extra}\n{serialized}".encode()).hexdigest()


def token_stream(tokenizer, text: str) -> torch.Tensor:
    """``text`` tokenized once without special tokens (1-D int64); the same tokenizer and text again
    return the stream kept from the first time (a copy)."""
    if not text.strip():
        raise PruneError("the text is empty (check its path, field and rows)")
    tok_key = _tokenizer_key(tokenizer)
    key = (tok_key, hashlib.sha256(text.encode()).hexdigest()) if tok_key else None
    if key in _STREAMS:
        _STREAMS.move_to_end(key)
        return _STREAMS[key].clone()
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    stream = torch.tensor(ids, dtype=torch.long)
    if key is not None and stream.nbytes <= _STREAMS_BYTES:
        _STREAMS[key] = stream.clone()
        while len(_STREAMS) > _STREAMS_KEPT or sum(t.nbytes for t in _STREAMS.values()) > _STREAMS_BYTES:
            _STREAMS.popitem(last=False)
    return stream


def check_window_args(tokenizer, **whole) -> None:
    """One line unless ``tokenizer`` is a tokenizer (``None`` or a model in its place raised AttributeError from
    inside) and each ``name=value`` a whole number (``n_samples=2.5`` raised TypeError from torch)."""
    if not callable(tokenizer) or not hasattr(tokenizer, "bos_token_id"):
        raise PruneError(f"the tokenizer is a {type(tokenizer).__name__}, not a tokenizer: give the loaded tokenizer "
                         "(prune.load returns it second)")
    import numbers

    for name, value in whole.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise PruneError(f"{name}={value!r} must be a whole number")


def _window_body(tokenizer, seq_len: int, bos: bool | None) -> tuple[int, int | None]:
    use_bos = needs_bos(tokenizer) if bos is None else bos
    if use_bos and tokenizer.bos_token_id is None:
        raise PruneError("BOS per window was asked for but the tokenizer has no BOS token (set this text's bos to false: a recipe's '<section>.bos', or --no-bos)")
    if seq_len < 2 + int(use_bos):
        raise PruneError(f"seq_len={seq_len} is too short (use at least {2 + int(use_bos)})")
    return seq_len - int(use_bos), (tokenizer.bos_token_id if use_bos else None)


def _assemble(chunks: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    if bos_id is None:
        return chunks
    return torch.cat([torch.full((chunks.shape[0], 1), bos_id, dtype=torch.long), chunks], dim=1)


def calibration_windows(
    tokenizer,
    text: str,
    n_samples: int,
    seq_len: int,
    seed: int = 0,
    bos: bool | None = None,
    section: str = "calibration",
) -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` tokens, ``[n_samples, seq_len]`` int64 (``section``: the
    recipe section a too-short text is reported against).

    The token stream is cut into non-overlapping windows and ``n_samples`` of them are
    drawn without replacement with ``torch.Generator().manual_seed(seed)``, then kept in
    stream order, so windows never overlap and the same seed gives the same windows.
    """
    check_window_args(tokenizer, n_samples=n_samples, seq_len=seq_len, seed=seed)
    if n_samples < 1:
        raise PruneError(f"n_samples={n_samples} must be at least 1")
    body, bos_id = _window_body(tokenizer, seq_len, bos)
    stream = token_stream(tokenizer, text)
    available = stream.numel() // body
    if available < n_samples:
        raise PruneError(
            f"{section} text too short: {stream.numel()} tokens make {available} windows of {body}, "
            f"{n_samples} asked (add text, or lower {section}.n_samples / {section}.seq_len)"
        )
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randperm(available, generator=gen)[:n_samples].sort().values
    chunks = stream[: available * body].view(available, body)[picks]
    return _assemble(chunks, bos_id)


def eval_windows(
    tokenizer,
    text: str,
    seq_len: int,
    max_windows: int | None = None,
    bos: bool | None = None,
) -> torch.Tensor:
    """Consecutive non-overlapping windows from the start of the stream (the perplexity setup)."""
    import numbers

    if max_windows is not None:
        if isinstance(max_windows, bool) or not isinstance(max_windows, numbers.Integral) or max_windows < 1:
            raise PruneError(f"max_windows={max_windows!r} must be a whole number of at least 1 (None: every window)")
        max_windows = int(max_windows)
    check_window_args(tokenizer, seq_len=seq_len)
    body, bos_id = _window_body(tokenizer, seq_len, bos)
    stream = token_stream(tokenizer, text)
    available = stream.numel() // body
    if available < 1:
        raise PruneError(f"evaluation text too short: {stream.numel()} tokens, one window needs {body}")
    n = available if max_windows is None else min(available, max_windows)
    return _assemble(stream[: n * body].view(n, body)[:n], bos_id)


def calibration_windows_of(tokenizer, cfg: CalibrationConfig) -> torch.Tensor:
    """The calibration windows a recipe's ``calibration`` section describes (the one place they are cut)."""
    return calibration_windows(tokenizer, load_text(cfg.source()), cfg.n_samples, cfg.seq_len, cfg.seed, cfg.bos)
