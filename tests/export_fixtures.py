"""Helpers shared by test_export.py and test_hub.py: a tiny real model saved as a source
folder (with a model card carrying a license) and recipes that prune it with `prune run`."""

from __future__ import annotations

import hashlib
from pathlib import Path

from conftest import WIKI_RAW, build_model, build_tokenizer

SOURCE_CARD = "---\nlicense: mit\nlibrary_name: transformers\n---\n\n# tiny source model\n"


def save_source(folder: Path, redundant=(2, 3), **save_kwargs) -> Path:
    """A random 8-block Llama (tied embeddings) whose blocks ``redundant`` barely change the
    residual stream, with a real BPE tokenizer and a README whose front matter says MIT."""
    import prune

    model = build_model("llama", redundant=redundant)
    return prune.save(model, build_tokenizer(True), folder, files={"README.md": SOURCE_CARD}, **save_kwargs)


def recipe(source, out, n_layers: int = 2, strategy: str = "contiguous", **sections) -> dict:
    """A small recipe: 8 calibration windows x 64 tokens of WikiText-2, perplexity on 4
    held-out windows, ``n_layers`` blocks removed with ``strategy``."""
    data = {
        "model": {"source": str(source)},
        "calibration": {"path": str(WIKI_RAW), "rows": "0:2000", "n_samples": 8, "seq_len": 64, "batch_size": 8},
        "select": {"strategy": strategy, "n_layers": n_layers},
        "evaluate": {"perplexity": {"path": str(WIKI_RAW), "rows": "2000:", "seq_len": 64, "max_windows": 4}},
        "output": {"dir": str(out)},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return data


def folder_digest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (to prove it was left untouched)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
