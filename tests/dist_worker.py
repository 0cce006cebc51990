"""One rank of the multi-process tests (tests/test_dist.py), also run alone as the one-process reference.

    torchrun --nproc_per_node 2 tests/dist_worker.py MODEL_FOLDER OUT_DIR     # two ranks (gloo)
    python tests/dist_worker.py MODEL_FOLDER OUT_DIR                          # one process

Each rank writes ``OUT_DIR/rank<r>.json``: scores, the selection, perplexity, SLEB's choice and
candidate losses, an lm-eval table, a training-free bridge (heal.method: bridge: which cuts kept, KL, the
refitted weights' checksum), a healing run's loss curve and trained weights' checksum,
and what a mismatched recipe across ranks gives.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from prune.choose.rules import select  # noqa: E402
from prune.choose.strategies import sleb  # noqa: E402
from prune.choose.verified import verified  # noqa: E402
from prune.core import dist  # noqa: E402
from prune.core.config import HealConfig  # noqa: E402
from prune.core.errors import PruneError  # noqa: E402
from prune.heal.training import train  # noqa: E402
from prune.io.text import calibration_windows  # noqa: E402
from prune.measure.lmeval import evaluate_tasks  # noqa: E402
from prune.measure.perplexity import perplexity  # noqa: E402
from prune.measure.scoring import score  # noqa: E402
from prune.model.loading import decoder_layers, load_model  # noqa: E402

DATA = Path(os.environ.get("PRUNE_DATA_DIR", ROOT.parent / "shared" / "data"))


def heal(model, windows, fsdp: bool) -> dict:
    from torch.utils.data import TensorDataset

    from prune.heal.methods import _lm_loss

    torch.manual_seed(0)
    params = [p for p in decoder_layers(model)[-1].parameters()] + list(model.model.norm.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    cfg = HealConfig(method="partial", steps=3, batch_size=4, learning_rate=1e-3, seed=0, fsdp=fsdp)
    log = train(model, params, TensorDataset(windows[:8]), _lm_loss, cfg, tokens_per_item=32, quiet=True)
    return {"losses": log["losses"], "items_seen": log["items_seen"],
            "weights": [float(p.detach().double().sum()) for p in params]}


def bridge(folder: str, windows) -> dict:
    """``heal.method: bridge`` on blocks 3-4 removed: every rank fits on all the windows."""
    from prune.heal.methods import heal_model
    from prune.model.surgery import remove_layers

    full = load_model(folder, dtype="float32")[0]
    pruned = load_model(folder, dtype="float32")[0]
    kept = remove_layers(pruned, [3, 4])
    rec = heal_model(pruned, None, "bridge", windows=windows[:6], val_windows=windows[6:], teacher_model=full,
                     kept=kept, quiet=True)["bridge"]
    return {"kept": [c["kept"] for c in rec["cuts"]], "kl": [rec["kl_before"], rec["kl_after"]],
            "weights": float(decoder_layers(pruned)[2].mlp.down_proj.weight.double().sum())}


def teacher_cache(model, tok, folder: str, windows, out: Path) -> dict:
    """A top-k teacher cache of 10 windows (3 batches of 4: rank 0 computes 8, rank 1 2) and 2 held-out ones
    (rank 1 none), from the loaded model and read one block at a time from the folder; each process computes
    its share, one writes the file. Digests of what every rank holds and of what the file holds."""
    from prune.heal import teacher as distill_teacher

    res = {}
    computed, topk = [], distill_teacher.topk_logprobs  # the windows this process computed: its share, not all of them
    distill_teacher.topk_logprobs = lambda m, w, k, **kw: computed.append(len(w)) or topk(m, w, k, **kw)
    for name, teacher in (("memory", model), ("sequential", folder)):
        path = out / f"teacher-{name}.safetensors"
        try:
            held = distill_teacher.build_cache(teacher, tok, windows, windows[:2], 8, path, "tiny", quiet=True, like=model)
        finally:
            distill_teacher.topk_logprobs = topk  # counted for the loaded teacher only (the sequential one reads the folder)
        dist.barrier()
        back = distill_teacher.TopkCache.load(path)
        res[name] = [dist.digest({k: t.double().sum().item() for k, t in c.tensors.items()}) for c in (held, back)]
        res[name].append(dist.digest({k: t.flatten()[:64].tolist() for k, t in back.tensors.items()}))
    res["computed"] = computed
    return res


def main(folder: str, out: str) -> None:
    torch.set_num_threads(1)
    w = dist.world()
    model, tok, _ = load_model(folder, dtype="float32")
    text = (DATA / "wikitext2_raw" / "wiki.test.raw").read_text(encoding="utf-8")[:60_000]
    windows = calibration_windows(tok, text, 10, 32, 0)  # 10 windows, batch 2: 3 + 2 batches per rank
    res: dict = {"world": w.size}
    s = score(model, windows, batch_size=2, metrics=("angular", "cka"), progress=False)
    res["scores"] = {k: v for k, v in s.to_dict().items() if k != "seconds"}
    res["selection"] = select(s, 2, metric="angular").removed
    res["perplexity"] = perplexity(model, windows, batch_size=2)
    chosen = sleb(model, windows[:6], 2, batch_size=2, progress=False)
    res["sleb"] = {"removed": chosen.removed, "trace": chosen.details["trace"]}
    # verified on 6 held-out windows, batch 2: 2 + 1 batches per rank, all-reduced sums
    picked = verified(model, s, windows[4:], 2, batch_size=2, budget=2, progress=False)
    res["verified"] = {"removed": picked.removed, "candidates": picked.details["candidates"],
                       "passes": picked.details["full_forward_equivalents"], "runner_up": picked.details["runner_up"]}
    res["lmeval"] = evaluate_tasks(model, tok, ["copa"], limit=10, batch_size=4, data_dir_path=str(DATA), progress=False)
    res["bridge"] = bridge(folder, windows)
    # healing: the last block and the final norm, 3 steps of a global batch of 4 windows (DDP; then
    # FSDP from a fresh copy, under the launcher only)
    res["heal"] = heal(model, windows, fsdp=False)
    if w.distributed:
        res["heal_fsdp"] = heal(load_model(folder, dtype="float32")[0], windows, fsdp=True)
    try:
        dist.check_same({"recipe": "a" if w.rank == 0 else "b"}, "recipe")
        res["mismatch"] = None
    except PruneError as exc:
        res["mismatch"] = str(exc)
    # settings whose launched run would differ from one process's, or fail on one rank: refused on every rank
    from prune.heal.training import check_parallel
    from prune.measure.lmeval import check_limit_over_ranks

    # each rank plans from its own free memory: every rank runs rank 0's mode
    from prune.pipeline.execution import ExecutionPlan, agreed_plan

    mine = ExecutionPlan("in_memory" if w.rank == 0 else "sequential", "auto", "this rank's memory")
    res["plan"] = agreed_plan(mine, lambda mode: ExecutionPlan(mode, mode, "rank 0's")).mode
    res["refused"] = []
    from prune.core.config import EvaluateConfig
    from prune.pipeline.commands import evaluate_model

    ppl = EvaluateConfig(perplexity={"path": str(DATA / "wikitext2_raw" / "wiki.test.raw"), "rows": "0:200", "seq_len": 16,
                                     "max_windows": 2})  # every rank would measure all of it and write it
    from prune.measure.lmeval import check_tasks

    for check in (lambda: check_parallel(HealConfig(method="partial", n_samples=10, batch_size=4)),
                  lambda: check_limit_over_ranks(1), lambda: evaluate_model(folder, ppl, quiet=True) and None,
                  lambda: check_tasks(["copa"], data_dir_path=str(DATA), limit=0.01) and None):  # ceil(100 x 0.01) = 1
        try:
            check()
            res["refused"].append(None)
        except PruneError as exc:
            res["refused"].append(str(exc))
    # distillation's teacher kind from free memory: one rank short of it makes every rank take the cache
    from prune.heal import teacher as distill_teacher

    own = distill_teacher._own_free_memory
    distill_teacher._own_free_memory = lambda device: own(device) if w.rank == 0 else 0
    try:
        res["teacher_kind"] = distill_teacher.teacher_kind(HealConfig(method="lora", objective="distill"), model)
    finally:
        distill_teacher._own_free_memory = own
    Path(out).mkdir(parents=True, exist_ok=True)
    res["teacher_cache"] = teacher_cache(load_model(folder, dtype="float32")[0], tok, folder, windows, Path(out))  # untrained
    (Path(out) / f"rank{w.rank}.json").write_text(json.dumps(res))


if __name__ == "__main__":
    from prune.cli import dist_exit  # leave as a launched prune rank does: gloo's threads can abort a plain teardown

    dist_exit(lambda argv: main(*argv) or 0, sys.argv[1:3])
