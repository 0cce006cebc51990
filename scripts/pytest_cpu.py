"""CPU time of every test, its child processes included (CI's budget is CPU time, not wall time).

As a pytest plugin it writes one JSON line per test to ``$PYTEST_CPU_OUT`` (default
``bench_cache/pytest_cpu.jsonl``, emptied when the session starts): the test's id and the CPU seconds (user + system) of the
pytest process (``self``) and of the processes it waited for (``children``: subprocesses, torchrun)
between its start and its end, setup and teardown included. Run as a script it sums a file by
test module and lists the costliest tests.

    PYTHONPATH=scripts OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -p pytest_cpu
    python scripts/pytest_cpu.py [bench_cache/pytest_cpu.jsonl] [--top 20]
"""

from __future__ import annotations

import json
import os
import resource
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("PYTEST_CPU_OUT", ROOT / "bench_cache" / "pytest_cpu.jsonl"))


def _cpu() -> tuple[float, float]:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


try:
    import pytest
except ImportError:  # the summary needs no pytest
    pytest = None

if pytest is not None:
    def pytest_sessionstart(session):  # noqa: ARG001 - pytest's hook signature
        OUT.unlink(missing_ok=True)  # one run per file: the summary adds up what it holds

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):  # noqa: ARG001 - pytest's hook signature
        before = _cpu()
        yield
        after = _cpu()
        OUT.parent.mkdir(parents=True, exist_ok=True)
        with OUT.open("a") as f:
            f.write(json.dumps({"id": item.nodeid, "self": round(after[0] - before[0], 2),
                                "children": round(after[1] - before[1], 2)}) + "\n")


def summary(path: Path, top: int = 20) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    cost = {r["id"]: r["self"] + r["children"] for r in rows}
    modules = Counter()
    for test, seconds in cost.items():
        modules[test.split("::")[0]] += seconds
    lines = [f"{len(cost)} tests, {sum(cost.values()):.0f} CPU-seconds", "", "by module:"]
    lines += [f"{seconds:8.1f}  {module}" for module, seconds in modules.most_common()]
    lines += ["", f"the {top} costliest tests:"]
    lines += [f"{seconds:8.1f}  {test}" for test, seconds in sorted(cost.items(), key=lambda kv: -kv[1])[:top]]
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", nargs="?", default=str(OUT))
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args()
    print(summary(Path(args.file), args.top))
