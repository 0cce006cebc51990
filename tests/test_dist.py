"""Several processes for real: ``torchrun --nproc_per_node 2`` (gloo on this CPU), fixture models.

* the same work in 2 ranks and in 1 process: scores within 1e-9, the same selection, the same
  perplexity, SLEB and verified choice (every candidate's KL) and lm-eval table, and a healing run (DDP, and FSDP, same global
  batch) whose loss curve and trained weights match to float32 precision;
* ranks with different recipes are refused;
* ``python -m prune run`` under the launcher: only rank 0 writes; a rank killed while the
  model is saved leaves no folder that looks complete, the other rank stops with one line (no
  hang), and ``--resume`` under the launcher finishes the run from the stored stages;
* the other subcommands in one launch (tests/dist_commands.py): each writes and prints once, ``prune
  eval`` data-parallel equals one process, and ranks that plan different execution modes run rank 0's;
* heal.fsdp without a launcher is refused in one line.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import DATA, ROOT, tiny_recipe

sys.path.insert(0, str(Path(__file__).parent))
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))
pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
#: float32 forward/backward over halves of a batch and an all-reduce of the gradients: the
#: loss agrees with one process to ~1e-7 relative (measured 1.6e-7); the test allows 1e-5
HEAL_RTOL = 1e-5


def torchrun(*args, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PRUNE_DATA_DIR": str(DATA), "OMP_NUM_THREADS": "1",
           "PRUNE_DIST_TIMEOUT": "60", **(env_extra or {})}
    env.pop("PRUNE_FAULT", None)
    env.update(env_extra or {})
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", *map(str, args)]  # standalone: a free port
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


def close(a, b, tol: float) -> bool:
    """Equal structures, floats within ``tol`` (absolute), NaN equal to NaN."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol
    return a == b


def test_two_ranks_equal_one_process(tiny_folder, tmp_path):
    import dist_worker

    proc = torchrun("tests/dist_worker.py", tiny_folder, tmp_path / "two")
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist_worker.main(str(tiny_folder), str(tmp_path / "one"))  # the same code, one process
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert one["world"] == 1 and ranks[0]["world"] == 2
    for two in ranks:  # every rank returns the full result
        assert close(two["scores"], one["scores"], 1e-9)
        assert two["selection"] == one["selection"]
        assert two["perplexity"] == one["perplexity"]  # per-batch sums added in window order: bit-equal
        assert two["sleb"]["removed"] == one["sleb"]["removed"]
        assert close(two["sleb"]["trace"], one["sleb"]["trace"], 1e-12)
        assert two["verified"]["removed"] == one["verified"]["removed"]
        assert two["verified"]["passes"] == one["verified"]["passes"]
        # float64 sums of per-rank shares against one sum in window order: equal to ~1e-12
        assert close(two["verified"]["candidates"], one["verified"]["candidates"], 1e-9)
        assert one["verified"]["runner_up"]["windows"] == 6  # every rank's windows in the paired margin
        assert close(two["verified"]["runner_up"], one["verified"]["runner_up"], 1e-9)
        assert two["lmeval"]["copa_local"]["metrics"] == one["lmeval"]["copa_local"]["metrics"]
        assert two["lmeval"]["copa_local"]["n"] == one["lmeval"]["copa_local"]["n"] == 10
        assert close(two["lmeval"]["copa_local"]["stderr"], one["lmeval"]["copa_local"]["stderr"], 1e-12)
        for kind in ("heal", "heal_fsdp"):  # DDP, and FSDP (works on gloo CPU for this model)
            assert two[kind]["items_seen"] == one["heal"]["items_seen"] == 12  # 3 steps x global batch 4
            for a, b in zip(two[kind]["losses"], one["heal"]["losses"]):
                assert abs(a - b) <= HEAL_RTOL * abs(b)
            for a, b in zip(two[kind]["weights"], one["heal"]["weights"]):
                assert abs(a - b) <= HEAL_RTOL * max(1.0, abs(b))
        assert two["bridge"] == one["bridge"] and one["bridge"]["kept"] == [True]  # the same refit, bit for bit
        assert "different recipe" in two["mismatch"]
        uneven, limit, ppl, fraction = two["refused"]  # the short last batch would be padded; a rank would get no example
        assert "n_samples=10 is not a multiple of heal.batch_size=4" in uneven and "evaluate.limit=1" in limit
        assert "perplexity and fidelity run in one process" in ppl
        assert "'copa_local' scores 1 example(s) with evaluate.limit=0.01, fewer than the processes (2)" in fraction
        assert two["teacher_kind"] == "cache"  # rank 0 alone had room for the teacher: both take the cache
        # a teacher cache: each rank computed its share (all of it before), every rank holds and the file has the
        # same numbers as one process's, from the loaded model and one block at a time
        assert {k: v for k, v in two["teacher_cache"].items() if k != "computed"} == \
            {k: v for k, v in one["teacher_cache"].items() if k != "computed"}
    assert one["mismatch"] is None and one["refused"] == [None, None, None, None]
    assert one["teacher_kind"] == "memory"
    for held, written, head in (one["teacher_cache"][k] for k in ("memory", "sequential")):
        assert held == written
    # the shares in whole batches of 4: 8 and 2 of the 10 windows, both held-out windows on rank 0 (one process: all)
    assert [ranks[0]["teacher_cache"]["computed"], ranks[1]["teacher_cache"]["computed"]] == [[8, 2], [2]]
    assert one["teacher_cache"]["computed"] == [10, 2]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [  # one writer: no rank's temporary file left
        "rank0.json", "rank1.json", "teacher-memory.safetensors", "teacher-sequential.safetensors"]
    assert one["plan"] == ranks[0]["plan"] == ranks[1]["plan"] == "in_memory"  # rank 1 planned sequential
    # the training moved the weights: the comparison is not between untouched copies
    assert one["heal"]["losses"][0] != one["heal"]["losses"][-1]


def test_killed_rank_leaves_nothing_complete_and_resume_finishes(tiny_folder, tmp_path):
    out = tmp_path / "pruned"
    recipe = tmp_path / "recipe.yaml"
    data = tiny_recipe(tiny_folder, out)
    # lm-eval's samples are on rank 0 only: the files too; the last-word task's config holds a function
    data["evaluate"].update(tasks=["copa", "tinystories_lastword_local"], limit=6)
    recipe.write_text(yaml.safe_dump(data))
    killed = torchrun("-m", "prune", "run", recipe, "-q",
                      env_extra={"PRUNE_FAULT": "saved_weights:kill", "PRUNE_FAULT_RANK": "0"})
    assert killed.returncode != 0
    assert not out.exists()  # rank 0 died inside the atomic save: only a hidden staging folder
    staging = [p for p in tmp_path.iterdir() if ".incomplete-" in p.name]
    assert all((p / "INCOMPLETE").exists() for p in staging)
    # rank 1 says in one line that another failed: its collective broke, or the launcher's SIGTERM came first
    lines = [line for line in killed.stderr.splitlines() if line.startswith(("error: rank 1", "rank 1 terminated"))]
    assert len(lines) == 1 and "another" in lines[0], killed.stderr[-2000:]
    resumed = torchrun("-m", "prune", "run", recipe, "-q", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = json.loads((out / "pruning.json").read_text())
    assert record["removed"] == [3, 4] and {"scores", "selection", "original"} <= set(record["resumed"])
    assert "Paired: pruned against original" in (out / "eval.md").read_text()
    [copa] = (out / "eval" / "pruned").glob("samples_copa_local_*.jsonl")
    ids = [json.loads(line)["doc_id"] for line in copa.read_text().splitlines()]
    assert ids == list(range(6))  # in document order, as one process writes them (rank by rank before: 0 2 4 1 3 5)
    assert not list(tmp_path.glob(".pruned.progress"))


def test_a_stopped_launch_is_an_interruption_not_a_failure(tiny_folder, tmp_path):
    """The launcher stopped (``timeout``, SLURM, ``docker stop``) while rank 0 saves: each rank said "another process
    of the launch failed" (none had), and left its half-written save folder (``os._exit`` ran no cleanup). Now each
    rank says it was terminated, as one process does, and only the stages a ``--resume`` reuses stay."""
    out = tmp_path / "pruned"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_folder, out)))
    stopped = torchrun("-m", "prune", "run", recipe, "-q",
                       env_extra={"PRUNE_FAULT": "saved_weights:term_launcher", "PRUNE_FAULT_RANK": "0"})
    assert stopped.returncode != 0
    assert "rank 0 terminated (SIGTERM from the launcher" in stopped.stderr, stopped.stderr[-3000:]
    rank1 = [line for line in stopped.stderr.splitlines() if line.startswith(("rank 1 terminated", "error: rank 1"))]
    assert len(rank1) == 1, stopped.stderr[-3000:]  # terminated too (or, were rank 0 gone first, its peer failed)
    # no traceback of prune's (torchrun prints its own SignalException's)
    assert "another process of the launch failed" not in stopped.stderr and 'prune/' not in stopped.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".incomplete-" in p.name]
    assert list(tmp_path.glob(".pruned.progress"))  # what --resume reuses (under a launch: the test above)
    from conftest import prune_main

    prune_main("run", recipe, "-q", "--resume", check_rc=0)
    assert {"scores", "selection", "original"} <= set(json.loads((out / "pruning.json").read_text())["resumed"])


def test_every_subcommand_under_the_launcher_writes_and_prints_once(tiny_folder, tmp_path):
    """Commands with no work to share run on rank 0 alone (both ranks wrote: the second found the
    first's folder, "already exists", or left a stray ``rep.<pid>`` folder); score and a model's
    report share the scoring and write and print once; ranks that plan different execution modes
    run rank 0's (prune score hung until the timeout: one rank in memory, the other sequential).
    ``prune eval FOLDER`` runs data-parallel (each rank scores its share of the requests, as a run does):
    rank 0 writes lm-eval's files, with every example, equal to one process's."""
    from conftest import WIKI_RAW, prune_main
    from prune.measure.paired import compare_folders

    score = ["--data", str(WIKI_RAW), "--rows", "0:300", "--n-samples", "4", "--seq-len", "32", "-q"]
    commands = [["remove", str(tiny_folder), "--blocks", "3-4", "-o", str(tmp_path / "rm")],
                ["export-mergekit", str(tmp_path / "rm"), "-o", str(tmp_path / "mk.yaml")],
                ["check", str(tmp_path / "rm")],
                ["score", str(tiny_folder), *score, "-o", str(tmp_path / "s.json")],
                ["report", str(tiny_folder), *score, "-o", str(tmp_path / "rep")]]
    evaluate = ["eval", str(tiny_folder), "--tasks", "copa", "--limit", "12", "--batch-size", "4", "-q", "--output-path"]
    commands.append([*evaluate, str(tmp_path / "two"), "-o", str(tmp_path / "two.json")])
    (tmp_path / "commands.json").write_text(json.dumps(commands))
    proc = torchrun("tests/dist_commands.py", tmp_path / "commands.json", tiny_folder, WIKI_RAW)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = [(tmp_path / f"rank{r}.out").read_text() for r in (0, 1)]
    for text in out:
        assert [line for line in text.splitlines() if line.startswith("rc ")] == [f"rc {c[0]} 0" for c in commands]
        assert text.splitlines()[-1] == "plan in_memory"  # rank 1 planned sequential: it runs rank 0's mode
        assert "nested 1" in text.splitlines()  # collectives inside on_main: rank 0 alone, a world of one
    for once in ("wrote ", "mergekit config written", "scores written", "MSRS =", "report written"):
        assert out[0].count(once) == 1 and once not in out[1], once
    assert out[0].count("report written") == 1 and "report written" not in out[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["commands.json", "mk.yaml", "rank0.err", "rank0.out", "rank1.err",
                                                          "rank1.out", "rep", "rm", "s.json", "two", "two.json"]
    assert json.loads((tmp_path / "two.json").read_text())["dtype"] == "float32"  # it was null (lm-eval loaded it)
    # each rank ran a share of COPA's 12 x 2 choices (lm-eval's hf backend, used under a launch before, splits only
    # over GPUs: each CPU rank ran all 24)
    shares = [int(next(line for line in text.splitlines() if line.startswith("eval sequences")).split()[-1])
              for text in out]
    assert shares == [12, 12], shares
    one = prune_main(*evaluate, tmp_path / "one", check_rc=0)  # the same in one process
    table = [line for line in one.stdout.splitlines() if line.startswith("copa_local")]
    assert table and table == [line for line in out[0].splitlines() if line.startswith("copa_local")]
    assert "copa_local" not in out[1]
    (row,) = compare_folders(tmp_path / "one", tmp_path / "two")
    assert row.n == 12 and row.diff == 0 and row.right_to_wrong == row.wrong_to_right == 0


def test_fsdp_needs_a_launcher(tiny_folder, tmp_path):
    from prune.core.errors import PruneError
    from prune.pipeline.orchestrator import run

    data = tiny_recipe(tiny_folder, tmp_path / "out")
    data["heal"] = {"method": "lora", "data": {"path": str(DATA / "wikitext2_raw" / "wiki.test.raw"), "rows": "1000:3000"},
                    "steps": 1, "n_samples": 4, "seq_len": 32, "fsdp": True}
    with pytest.raises(PruneError, match="heal.fsdp shards the model over several processes"):
        run(data, quiet=True)
    assert not (tmp_path / "out").exists()


def test_a_rank_the_launcher_stops_removes_its_scratch_folders(tmp_path):
    """The launcher's SIGTERM stops a rank, which leaves with ``os._exit`` (no ``finally`` runs after it): the
    sequential engine's spilled states (registered in prune.core.scratch) are removed first, not left in $TMPDIR."""
    spill = tmp_path / "prune-states-x"
    code = ("import os, pathlib, signal\n"
            "from prune.core import scratch\n"
            "from prune.cli import dist_exit\n"
            f"folder = pathlib.Path({str(spill)!r}); folder.mkdir(); (folder / 'state_0000.f32').write_bytes(b'0' * 64)\n"
            "scratch.register(folder)\n"
            "dist_exit(lambda args: os.kill(os.getpid(), signal.SIGTERM) or 0, [])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "RANK": "1"})
    assert proc.returncode == 143 and "rank 1 terminated (SIGTERM from the launcher" in proc.stderr, proc.stderr
    assert not spill.exists()


def launched_script(path: Path, body: str) -> Path:
    """A script whose ``main(args)`` (``body``: its indented lines) runs as one rank of a launch, as the CLI does."""
    path.write_text("import prune\nfrom prune.core import dist\nfrom prune.cli import dist_exit\n"
                    f"def main(args):\n{body}    return 0\nraise SystemExit(dist_exit(main, []))\n")
    return path


def test_rank_zeros_work_may_outlast_the_collective_timeout(tmp_path):
    """A save or push on rank 0 longer than PRUNE_DIST_TIMEOUT: the other rank's wait timed out, and the launcher
    then stopped rank 0 in the middle of writing (a review: 'another rank failed' of a healthy rank 0). The wait
    for rank 0's work is not bounded by it; the collectives after it still are."""
    script = launched_script(tmp_path / "slow_main.py",
                             "    got = dist.on_main(lambda: (__import__('time').sleep(6), 'written')[1])\n"
                             "    total = dist.all_reduce_sum(__import__('torch').ones(1)).item()\n"
                             "    print(f'rank {dist.world().rank}: {got} {total:g}', flush=True)\n")
    proc = torchrun(script, env_extra={"PRUNE_DIST_TIMEOUT": "3"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0: written 2" in proc.stdout and "rank 1: written 2" in proc.stdout, proc.stdout


def test_prune_save_in_a_launched_script_writes_once(tiny_folder, tmp_path):
    """prune.save at the end of a torchrun script: every rank wrote the folder, the second refused (already exists)
    and the launch failed; with overwrite=True both wrote it, one after the other. Rank 0 writes it now, and a
    save on rank 0 alone (the usual pattern) waits for no other rank."""
    script = launched_script(tmp_path / "save.py",
                             f"    model, tok, _ = prune.load({str(tiny_folder)!r})\n"
                             "    prune.remove_layers(model, [2, 3])\n"
                             f"    out = prune.save(model, tok, {str(tmp_path / 'saved')!r}, pruning={{'removed': [2, 3]}}, "
                             f"source={str(tiny_folder)!r})\n"
                             "    print(f'rank {dist.world().rank}: {out.name}', flush=True)\n"
                             "    if dist.world().is_main:  # the usual pattern: rank 0 alone saves (it must not wait)\n"
                             f"        prune.save(model, tok, {str(tmp_path / 'alone')!r})\n"
                             "        print('rank 0 saved alone', flush=True)\n")
    proc = torchrun(script, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0: saved" in proc.stdout and "rank 1: saved" in proc.stdout, proc.stdout
    assert "rank 0 saved alone" in proc.stdout
    from prune.export.check import check_checkpoint

    assert check_checkpoint(tmp_path / "saved", require_export=True).ok and (tmp_path / "alone" / "config.json").is_file()
