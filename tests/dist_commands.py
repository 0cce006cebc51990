"""One rank of tests/test_dist.py's launch of the CLI's commands (argument lists in a JSON file, one
after another in the same processes, as ``python -m prune CMD ...`` runs each of them), then
``score_model`` with a memory cap on rank 1 only (it plans sequential scoring, rank 0 in memory).

    torchrun --nproc_per_node 2 tests/dist_commands.py COMMANDS.json MODEL DATA_FILE

Each rank's output goes to ``rank<r>.out`` (and ``.err``) beside COMMANDS.json: what the commands print,
``rc <command> <code>`` per command, ``eval sequences <n>`` (sequences its model ran in ``eval``),
``nested <size>`` and ``plan <mode>``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prune.cli import build_parser, run_command  # noqa: E402
from prune.core import dist  # noqa: E402
from prune.pipeline.commands import score_model  # noqa: E402


def main(commands: str, model: str, data: str) -> None:
    sys.stdout = open(Path(commands).parent / f"rank{os.environ['RANK']}.out", "w", buffering=1)  # noqa: SIM115
    sys.stderr = open(Path(commands).parent / f"rank{os.environ['RANK']}.err", "w", buffering=1)  # noqa: SIM115
    import torch

    seen = []  # sequences each rank's model ran while evaluating: a share each, not every example twice

    def count(module, args, kwargs, out):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if type(module).__name__.endswith("ForCausalLM") and isinstance(ids, torch.Tensor):
            seen.append(ids.shape[0])

    for argv in json.loads(Path(commands).read_text()):
        seen.clear()
        hook = torch.nn.modules.module.register_module_forward_hook(count, with_kwargs=True) if argv[0] == "eval" else None
        code = run_command(build_parser().parse_args(argv))
        if hook is not None:
            hook.remove()
            print(f"eval sequences {sum(seen)}", flush=True)
        print(f"rc {argv[0]} {code}", flush=True)
    # rank 0 alone inside on_main is a world of one: its own collectives never pair with the others' wait
    print(f"nested {dist.on_main(lambda: dist.on_main(lambda: dist.broadcast(dist.world().size)))}", flush=True)
    w = dist.world()
    capped = {"cpu": "1200KiB"} if w.rank == 1 else None  # rank 1 alone would score sequentially
    result = score_model(model, data=data, rows="0:300", n_samples=4, seq_len=32, batch_size=2, max_memory=capped,
                         quiet=True)
    print(f"plan {result.metadata['execution']['mode']}", flush=True)


if __name__ == "__main__":
    from prune.cli import dist_exit  # leave as a launched prune rank does: gloo's threads can abort a plain teardown

    dist_exit(lambda argv: main(*argv) or 0, sys.argv[1:4])  # (SIGABRT after every output was written: a flaky test)
