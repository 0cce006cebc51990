"""The ``prune`` console script: a thin layer over the Python API, one call per subcommand.

Exit status: 0 on success, 2 for a problem with the input (one ``error:`` line, nothing
written), 1 for an unexpected failure (with its traceback), 130 when interrupted (143 for SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
import traceback
from pathlib import Path

from prune.choose.registry import names
from prune.core.errors import PruneError, called_from_cli, first_line
from prune.core.console import notes_once, say
from prune.core.config import (
    BOOTSTRAP_ITERS,
    HEAL_METHODS,
    MAX_BOOTSTRAP_ITERS,
    CalibrationConfig,
    EvaluateConfig,
    ModelConfig,
    FidelityConfig,
    PerplexityConfig,
    ScoreConfig,
    SelectConfig,
    metric_is_read,
    TextConfig,
    default,
    describe,
)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _positive(value: str) -> int:
    if not value.strip().isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of at least 1")
    return int(value)


def _iters(value: str) -> int:
    n = _positive(value)
    if n > MAX_BOOTSTRAP_ITERS:  # numpy allocated n floats per row: terabytes, a traceback, for a typo
        raise argparse.ArgumentTypeError(f"{value} resamples is more than {MAX_BOOTSTRAP_ITERS:,} (the interval's "
                                         "percentiles are steady long before)")
    return n


def _non_negative(value: str) -> int:
    if not value.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of at least 0")
    return int(value)


def _int_csv(value: str) -> list[int]:
    try:
        return [int(v) for v in _csv(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of block indices (e.g. 0,-1)") from None


def _device_map(value: str | None):
    if value is None:
        return None
    if value.strip().startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"--device-map is not valid JSON: {exc}") from None
    if value.strip().startswith("["):  # it was read as a device's name: "names a device that is not present"
        raise argparse.ArgumentTypeError(f"{value!r} is a list: give auto, cpu, a device, or a JSON object of module "
                                         "names to devices ('{\"model.layers.0\": 0, ...}')")
    return value


def option(p: argparse.ArgumentParser, flag: str, section, name: str, **kwargs) -> None:
    """``--flag`` for the config field ``section.name``: its default and help come from the config model."""
    kwargs.setdefault("help", describe(section, name))
    p.add_argument(flag, default=default(section, name), **kwargs)


def _given(args, dests: tuple[str, ...]) -> list[str]:
    """The flags among ``dests`` that this command line changed from their default (as typed: ``--n-layers``)."""
    parser = args.subparser

    def typed(action) -> str:  # --no-bos for a False of a --bos/--no-bos pair
        value = getattr(args, action.dest)
        negative = [s for s in action.option_strings if s.startswith("--no-")]
        return negative[0] if value is False and negative and isinstance(action, argparse.BooleanOptionalAction) \
            else action.option_strings[0]

    return [typed(action) for action in parser._actions
            if action.dest in dests and action.option_strings and getattr(args, action.dest) != action.default]


def _refuse_unused(args, dests: tuple[str, ...], why: str) -> None:
    """A one-line error for flags that would be silently ignored: ``why`` says when they count."""
    flags = _given(args, dests)
    if flags:
        verb = "has" if len(flags) == 1 else "have"
        raise PruneError(f"{', '.join(flags)} {verb} no effect {why}")


def _refuse_overwrite_without_output(args) -> None:
    if not args.output:
        _refuse_unused(args, ("overwrite",), "without --output (it replaces an existing --output file)")


def _common_model_flags(p: argparse.ArgumentParser) -> None:
    option(p, "--dtype", ModelConfig, "dtype")
    p.add_argument("--device-map", type=_device_map, default=None,
                   help='Accelerate placement: auto, cpu, or a JSON map like \'{"model.layers.0": "cpu", ...}\'')
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the checkpoint (off by default)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars, progress messages or notes (the result "
                                                                "a command prints, score's and eval's table, still goes "
                                                                "to stdout)")


# ---- run ------------------------------------------------------------------------------
def add_run(sub) -> None:
    p = sub.add_parser("run", help="run a pruning recipe: score, select, prune, evaluate before/after, save",
                       description="Run a YAML pruning recipe end to end: load the model, score every decoder block on "
                                   "calibration text, choose blocks, evaluate the original, remove the blocks, evaluate "
                                   "the pruned model and write the output folder (checkpoint, recipe.yaml, pruning.json, "
                                   "eval.json, eval.md). Examples are in recipes/.")
    p.add_argument("recipe", help="path to a recipe YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set select.n_layers=8 --set evaluate.limit=50 (repeatable; "
                        "the value is parsed as YAML)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder (only once the new one is complete)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: reuse the scores, selection and original evaluation it saved "
                        "(in .<output name>.progress beside the output folder), each unless the recipe section it "
                        "reads changed")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars, progress messages, tables or notes "
                                                                "(the results stay in the files written)")
    p.set_defaults(func=cmd_run)


#: when the command began (set by :func:`main`): a record written since is this run's
_STARTED = time.time()


def _interrupted_write(args) -> str:
    """What an interrupted ``prune remove`` / ``prune heal`` left: nothing, where its output is not there (a folder is
    written under a hidden name and renamed when complete)."""
    out = getattr(args, "output", None) if args.command in ("remove", "heal") else None
    return f"; nothing was written ({out} does not exist)" if out and not Path(out).expanduser().exists() else ""


def _interrupted_run(args) -> str:
    """What an interrupted ``prune run`` left: its output saved complete (its ``pruning.json`` written since this
    process started: the interrupt came after, e.g. during a push), finished stages ``--resume`` would reuse, or
    nothing."""
    try:
        from prune.core.records import RECORD_FILE
        from prune.pipeline.progress import finished_stages, progress_dir
        from prune.pipeline.recipe import load_recipe

        recipe = load_recipe(args.recipe, args.overrides)
        out = Path(recipe.output.dir).expanduser()
        if (out / RECORD_FILE).is_file() and (out / RECORD_FILE).stat().st_mtime >= _STARTED:
            hub, push = recipe.output.push_to_hub, ""
            if hub is not None:  # the push's own settings: prune push alone would go to main, private
                flags = "".join(f" {flag} {shlex.quote(str(value))}" for flag, value in (
                    ("--revision", hub.revision), ("--commit-message", hub.commit_message)) if value)
                push = (f"; the push to {hub.repo_id} may not have finished: prune push {shlex.quote(str(out))} "
                        f"{hub.repo_id}{flags}{'' if hub.private else ' --public'}")
            return f"; the output {out} was saved complete before the interruption{push}"
        finished = bool(finished_stages(progress_dir(recipe.output.dir)))
    except Exception:  # noqa: BLE001 - the recipe no longer loads: say nothing about resuming
        finished = False
    return "; nothing was saved as a checkpoint (" + (
        "rerun with --resume to reuse the finished stages)" if finished else "no stage had finished: rerun it)")


def cmd_run(args) -> int:
    from prune.pipeline.orchestrator import run

    result = run(args.recipe, overrides=args.overrides, overwrite=args.overwrite, quiet=args.quiet, resume=args.resume)
    _say_saved(args, result.out_dir)
    return 0


def _say_saved(args, folder) -> None:
    """Under -q (no progress, no tables) a command that writes a folder still says where: its one line of result."""
    from prune.core import dist

    if args.quiet and dist.world().is_main:
        print(f"saved {folder}")


def _calibration_flags(p: argparse.ArgumentParser, data_required: bool) -> None:
    """Calibration text and scoring flags shared by ``score`` and ``report``."""
    p.add_argument("--data", required=data_required, help="calibration text: a .txt/.jsonl file or a datasets name")
    p.add_argument("--field", type=_csv, default=["text"], help="JSONL field(s) holding the text (comma-separated: concatenated)")
    p.add_argument("--rows", default=None, help="slice of rows/lines to use, e.g. 0:2000")
    p.add_argument("--data-config", default=None, help="datasets configuration of --data (e.g. wikitext-2-raw-v1)")
    option(p, "--split", TextConfig, "split", help="datasets split of --data (default train; a file has none)")
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="a BOS token at the start of every window (default: when the tokenizer adds one)")
    for flag, name in (("--n-samples", "n_samples"), ("--seq-len", "seq_len"), ("--seed", "seed"),
                       ("--batch-size", "batch_size")):
        option(p, flag, CalibrationConfig, name, type=int)
    option(p, "--positions", ScoreConfig, "positions", choices=["all", "skip_first"])
    option(p, "--metrics", ScoreConfig, "metrics", type=_csv)
    option(p, "--cka-windows", ScoreConfig, "cka_windows", type=int)
    option(p, "--beta", ScoreConfig, "beta", type=float)
    option(p, "--tau", ScoreConfig, "tau", type=float)


def _score_kwargs(args) -> dict:
    """The :func:`prune.pipeline.score_model` keyword arguments from the flags above."""
    return dict(data=args.data, field=args.field[0] if len(args.field) == 1 else args.field, rows=args.rows,
                data_config=args.data_config, split=args.split, bos=args.bos,
                n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed, batch_size=args.batch_size,
                positions=args.positions, metrics=args.metrics, cka_windows=args.cka_windows, beta=args.beta,
                tau=args.tau, dtype=args.dtype, device_map=args.device_map, trust_remote_code=args.trust_remote_code,
                quiet=args.quiet, execution=getattr(args, "execution", "auto"))


# ---- score ----------------------------------------------------------------------------
def add_score(sub) -> None:
    p = sub.add_parser("score", help="redundancy scores only (table to the terminal, JSON to a file)",
                       description="Score every decoder block of MODEL on calibration text: Block Influence, angular "
                                   "distances, the CKA matrix between block outputs and MSRS. Prints a per-block table; "
                                   "--output writes everything as JSON. Block indices are 0-based.")
    p.add_argument("model", help="Hub id, local model folder, or .gguf file")
    _calibration_flags(p, data_required=True)
    p.add_argument("--output", "-o", default=None, help="write the scores as JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    option(p, "--execution", ScoreConfig, "execution", choices=["auto", "in_memory", "sequential"])
    _common_model_flags(p)
    p.set_defaults(func=cmd_score)


def cmd_score(args) -> int:
    from prune.core import dist
    from prune.pipeline.commands import score_model

    _refuse_overwrite_without_output(args)
    result = score_model(args.model, output=args.output, overwrite=args.overwrite, **_score_kwargs(args))
    if dist.world().is_main:  # under a launcher: one table, from the rank that wrote the file
        print(result.table())
        if args.output:
            print(f"scores written to {args.output}")
    return 0


# ---- eval -----------------------------------------------------------------------------
def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate any model (original or pruned): perplexity and lm-eval tasks",
                       description="Evaluate MODEL with perplexity on a text file and/or lm-eval tasks, on the model in "
                                   "memory through lm-eval's HFLM. Offline, set --data-dir (or PRUNE_DATA_DIR) to use the "
                                   "shipped local copies of arc_easy, arc_challenge, piqa, hellaswag, winogrande, boolq, "
                                   "openbookqa and copa, and the exact-last-word task tinystories_lastword_local.")
    p.add_argument("model", help="Hub id, local model folder, or .gguf file")
    p.add_argument("--tasks", type=_csv, default=[], help="comma-separated lm-eval task names")
    p.add_argument("--perplexity-data", default=None, help="text file for perplexity (e.g. wiki.test.raw)")
    p.add_argument("--perplexity-field", type=_csv, default=["text"],
                   help="JSONL field(s) for --perplexity-data (comma-separated: concatenated)")
    p.add_argument("--perplexity-rows", default=None, help="slice of rows of --perplexity-data, e.g. 2000:")
    p.add_argument("--perplexity-config", default=None, help="datasets configuration of --perplexity-data")
    option(p, "--perplexity-split", TextConfig, "split", help="datasets split of --perplexity-data (default train; a file "
                                                              "has none)")
    p.add_argument("--perplexity-bos", action=argparse.BooleanOptionalAction, default=None,
                   help="a BOS token at the start of every perplexity window (default: when the tokenizer adds one)")
    option(p, "--seq-len", PerplexityConfig, "seq_len", type=int)
    option(p, "--max-windows", PerplexityConfig, "max_windows", type=int)
    p.add_argument("--fidelity-to", default=None, metavar="ORIGINAL",
                   help="also measure KL(ORIGINAL || MODEL) per token, top-1 agreement and the perplexity ratio on the "
                        "--perplexity-data windows (ORIGINAL runs first, once)")
    option(p, "--fidelity-top-k", FidelityConfig, "top_k", type=int)
    option(p, "--limit", EvaluateConfig, "limit", type=float)
    option(p, "--batch-size", EvaluateConfig, "batch_size", type=str)
    option(p, "--num-fewshot", EvaluateConfig, "num_fewshot", type=int)
    option(p, "--seed", EvaluateConfig, "seed", type=int)
    p.add_argument("--data-dir", default=None, help="offline task data folder (default $PRUNE_DATA_DIR)")
    p.add_argument("--include-path", "--task-dir", dest="task_dir", action="append", default=[],
                   help="folder of extra lm-eval task YAMLs (lm-eval's --include_path; repeatable)")
    p.add_argument("--apply-chat-template", nargs="?", const=True, default=False, metavar="TEMPLATE",
                   help="format prompts with the tokenizer's chat template (optionally a named one), as lm-eval does")
    p.add_argument("--fewshot-as-multiturn", action=argparse.BooleanOptionalAction, default=None,
                   help="few-shot examples as a multi-turn chat (default: on with --apply-chat-template)")
    p.add_argument("--model", dest="backend", choices=["hf", "vllm"], default="hf",
                   help="lm-eval backend for the tasks (default hf: the model in memory; with --model-args, vllm or "
                        "under accelerate launch lm-eval loads MODEL itself with pretrained=MODEL)")
    p.add_argument("--model-args", default=None,
                   help="lm-eval's model_args, passed through after pretrained=MODEL, e.g. "
                        "'dtype=bfloat16,max_length=2048' (hf) or 'tensor_parallel_size=2,gpu_memory_utilization=0.8' (vllm)")
    p.add_argument("--local-alias", action="store_true",
                   help="report the local task copies under the registry names (arc_easy for arc_easy_local)")
    p.add_argument("--fewshot-from-scored-split", action="store_true",
                   help="allow few-shot examples from the split being scored (refused otherwise; results are marked)")
    p.add_argument("--output-path", default=None, metavar="DIR",
                   help="write lm-eval's own files (results_*.json, samples_*.jsonl) to DIR/<model name>, as lm-eval's "
                        "--output_path --log_samples does; read them with prune compare")
    p.add_argument("--output", "-o", default=None, help="write the results as JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    _common_model_flags(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from prune.pipeline.commands import evaluate_model
    from prune.pipeline.inputs import validated

    if args.fidelity_to and not args.perplexity_data:
        raise PruneError("--fidelity-to measures on the perplexity text: give --perplexity-data too")
    _refuse_overwrite_without_output(args)
    if not args.tasks and not args.perplexity_data:
        raise PruneError("nothing to evaluate: give --tasks and/or --perplexity-data")
    if not args.tasks:
        _refuse_unused(args, ("limit", "batch_size", "num_fewshot", "seed", "data_dir", "task_dir", "apply_chat_template",
                              "fewshot_as_multiturn", "backend", "model_args", "local_alias",
                              "fewshot_from_scored_split", "output_path"),
                       "without --tasks (they set the lm-eval tasks): give --tasks or drop them")
    if not args.perplexity_data:
        _refuse_unused(args, ("perplexity_field", "perplexity_rows", "perplexity_config", "perplexity_split",
                              "perplexity_bos", "seq_len", "max_windows"),
                       "without --perplexity-data: give --perplexity-data or drop them")
    if not args.fidelity_to:
        _refuse_unused(args, ("fidelity_top_k",), "without --fidelity-to ORIGINAL: give it or drop the flag")
    limit = args.limit
    if limit is not None and not math.isfinite(limit):
        raise PruneError(f"--limit: give a whole number of examples or a fraction below 1 (got {limit:g})")
    if limit is not None and limit >= 1:
        if limit != int(limit):
            raise PruneError(f"--limit: give a whole number of examples or a fraction below 1 (got {limit:g})")
        limit = int(limit)
    ppl = None
    if args.perplexity_data:
        field = args.perplexity_field[0] if len(args.perplexity_field) == 1 else args.perplexity_field  # as a recipe's
        ppl = validated(PerplexityConfig, {"path": "--perplexity-data", "field": "--perplexity-field",
                                           "rows": "--perplexity-rows", "config": "--perplexity-config",
                                           "split": "--perplexity-split", "bos": "--perplexity-bos"},
                        path=args.perplexity_data, field=field, rows=args.perplexity_rows,
                        config=args.perplexity_config, split=args.perplexity_split, bos=args.perplexity_bos,
                        seq_len=args.seq_len, max_windows=args.max_windows)
        if (args.perplexity_config is not None or args.perplexity_split != default(TextConfig, "split")) and \
                Path(args.perplexity_data).expanduser().is_file():
            raise PruneError(f"--perplexity-split / --perplexity-config select part of a datasets dataset, but "
                             f"{args.perplexity_data} is a local file, read whole (drop them; --perplexity-rows takes a "
                             "slice of the file)")
    fidelity = {"top_k": args.fidelity_top_k} if args.fidelity_to else None
    cfg = validated(EvaluateConfig, perplexity=ppl, fidelity=fidelity, tasks=args.tasks, task_dirs=args.task_dir,
                    data_dir=args.data_dir, limit=limit, batch_size=args.batch_size, num_fewshot=args.num_fewshot,
                    seed=args.seed, apply_chat_template=args.apply_chat_template,
                    fewshot_as_multiturn=args.fewshot_as_multiturn, model=args.backend, model_args=args.model_args,
                    local_alias=args.local_alias, fewshot_from_scored_split=args.fewshot_from_scored_split)
    evaluate_model(args.model, cfg, dtype=args.dtype, device_map=args.device_map,
                   trust_remote_code=args.trust_remote_code, quiet=args.quiet, original=args.fidelity_to,
                   output_path=args.output_path, output=args.output, overwrite=args.overwrite,
                   show_result=lambda result: _print_eval(result, args))  # a data-parallel rank but the first: None
    return 0


def _print_eval(result: dict, args) -> None:
    """``prune eval``'s table on stdout: perplexity, fidelity, each task's metrics, counts, lm-eval's tables."""
    lm_eval_files = result.get("lm_eval_files") or {}
    row = lambda task, metric, value, err: print(f"{task:<16} {metric:<16} {value:>10} {err:>8}")  # one width each
    row("task", "metric", "value", "stderr")
    if "perplexity" in result:
        row("perplexity", "ppl", f"{result['perplexity']['perplexity']:.3f}", "")
    if "fidelity" in result:
        f = result["fidelity"]
        for metric in ("kl_mean", "kl_median", "kl_p99", "kl_max", "top1_agreement", "perplexity_ratio"):
            err = f["kl_mean_stderr"] if metric == "kl_mean" else None
            row("fidelity", metric, f"{f[metric]:.4g}", "" if err is None else f"{err:.2g}")
    marked = False
    for task, res in result.get("tasks", {}).items():
        mark = "*" if res.get("fewshot_from_scored_split") else ""
        marked = marked or bool(mark)
        for metric, value in res["metrics"].items():
            err = res["stderr"].get(metric)
            row(task + mark, metric, f"{value:.4f}", "" if err is None else f"{err:.4f}")
    if marked:
        print("* few-shot examples drawn from the split being scored (--fewshot-from-scored-split)")
    params = f"{result['parameters']:,} parameters" if result["parameters"] is not None else "parameters not counted"
    print(f"{result['layers']} layers, {params}")
    if lm_eval_files:
        from prune.measure.evaluation import lm_eval_tables

        print("\n" + lm_eval_tables(lm_eval_files))
    if result.get("lm_eval_folder"):
        print(f"lm-eval results and samples written to {result['lm_eval_folder']}", file=sys.stderr)
    if args.output:
        print(f"results written to {args.output}")


# ---- check ----------------------------------------------------------------------------
def add_check(sub) -> None:
    p = sub.add_parser("check", help="check an output folder is a complete, loadable checkpoint (no weights loaded)",
                       description="Check OUTPUT_DIR without loading weights: config and per-layer lists, every shard "
                                   "in the safetensors index present and whole, block tensors numbered 0..L-1, "
                                   "from_pretrained on the meta device, tied embeddings, tokenizer, model card and "
                                   "pruning.json. Prints a one-screen summary; exit status 2 when something is wrong.")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="a folder written by `prune run` (or any checkpoint folder)")
    p.add_argument("--require-export", action="store_true",
                   help="also require README.md (model card) and pruning.json, as `prune push` does")
    p.add_argument("--original", metavar="MODEL", default=None,
                   help="also load both models and check the weights: each kept block is the original's block "
                        "pruning.json names, unchanged, or trained by a healing it records (a folder, Hub id or GGUF file)")
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the checkpoints (off by default)")
    p.set_defaults(func=cmd_check)


def cmd_check(args) -> int:
    from prune.export.check import check_checkpoint

    report = check_checkpoint(args.output_dir, require_export=args.require_export)
    if args.original is not None and report.ok:  # the weights against the original's: a complete checkpoint only
        from prune.export.verify import check_original

        check_original(report, args.original, trust_remote_code=args.trust_remote_code)
    print(report.summary())
    report.raise_for_problems(shown=True)
    return 0


# ---- push -----------------------------------------------------------------------------
def add_push(sub) -> None:
    p = sub.add_parser("push", help="push a checked output folder to the Hugging Face Hub",
                       description="Check OUTPUT_DIR (as `prune check --require-export`), refuse it when incomplete, "
                                   "then create REPO_ID (exist_ok) and upload the folder. The token comes from HF_TOKEN "
                                   "or `hf auth login` and is never printed. --dry-run prints exactly what would be "
                                   "uploaded without any network access.")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="a folder written by `prune run`")
    p.add_argument("repo_id", metavar="REPO_ID", help="Hub model repo, e.g. your-name/SmolLM2-135M-pruned-23L")
    p.add_argument("--revision", default=None, help="branch to push to (created if missing; default main)")
    vis = p.add_mutually_exclusive_group()
    vis.add_argument("--private", dest="private", action="store_true", default=True,
                     help="create the repo private (the default)")
    vis.add_argument("--public", dest="private", action="store_false", help="create the repo public")
    p.add_argument("--commit-message", default=None, help="commit message (default: names the block counts)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request on the repo instead of committing to main")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="leave out files matching this glob (on the relative path, the file name or a folder: 'eval/' "
                        "leaves out the eval folder), e.g. 'eval.*' (repeatable)")
    p.add_argument("--token-file", default=None, help="read the Hub token from this file (never printed)")
    p.add_argument("--dry-run", action="store_true", help="print the files, sizes, repo and revision; send nothing")
    p.add_argument("--keep-card", action="store_true",
                   help="publish README.md as it is (by default the card is rendered anew for the repo; a card that "
                        "is not as prune wrote it, edited by hand or older than 0.2, is refused without this flag or "
                        "--replace-card)")
    p.add_argument("--replace-card", action="store_true",
                   help="publish the card rendered from pruning.json even where README.md is not as prune wrote it "
                        "(the file is replaced after the push)")
    p.add_argument("--quiet", "-q", action="store_true", help="no check summary or progress messages")
    p.set_defaults(func=cmd_push)


def cmd_push(args) -> int:
    from prune.export.push import push

    push(args.output_dir, args.repo_id, revision=args.revision, private=args.private,
         commit_message=args.commit_message, dry_run=args.dry_run, quiet=args.quiet, exclude=args.exclude,
         create_pr=args.create_pr, token_file=args.token_file, keep_card=args.keep_card,
         replace_card=args.replace_card)
    return 0


# ---- remove (out of core) ---------------------------------------------------------------
def add_remove(sub) -> None:
    p = sub.add_parser("remove", help="remove blocks from a safetensors checkpoint on disk, without loading it",
                       description="Write a copy of MODEL (a safetensors folder or Hub id) without the given decoder "
                                   "blocks, straight from its shards: kept blocks are renumbered, the config rewritten, "
                                   "tokenizer files carried over. Memory stays small whatever the model size. "
                                   "Block indices are 0-based.")
    p.add_argument("model", help="safetensors model folder or Hub id")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--blocks", type=_csv, help="0-based block indices to remove, comma-separated, inclusive ranges allowed: 12-18,25")
    which.add_argument("--slices", help="the blocks to KEEP as mergekit passthrough slices: a mergekit config file, "
                                        "or half-open ranges like '[[0, 12], [15, 30]]'")
    p.add_argument("--output", "-o", required=True, help="output folder (written atomically)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="dtype of the saved weights (default auto: what a load with dtype auto gives, the config's "
                        "dtype, as prune.save would write), converted one tensor at a time")
    p.add_argument("--base-model", default=None, help="Hub repo id of the model, for the card (a local MODEL only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the checkpoint (off by default)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_remove)


def cmd_remove(args) -> int:
    from prune.export.outofcore import prune_checkpoint
    from prune.io.source import resolve_source

    from prune.pipeline.inputs import preflight_model

    blocks = parse_blocks(args.blocks) if args.blocks is not None else None
    src = resolve_source(args.model)
    if args.slices is not None:  # a missing file or bad ranges: before the model is read
        from prune.export.lineage import is_pruned
        from prune.export.mergekit import check_slices_model, read_slices

        ranges, named, dtype = read_slices(args.slices)
        check_slices_model(named, args.model, bool(named) and is_pruned(src))  # a Hub repo's pruning.json too
        if dtype and args.dtype not in ("auto", dtype):
            raise PruneError(f"--dtype {args.dtype}, but the --slices config writes {dtype} (its dtype): drop one")
        if dtype and args.dtype == "auto":
            say(f"note: writing {dtype}, the --slices config's dtype (as mergekit would; --dtype {dtype} says the same)")
        args.dtype = dtype or args.dtype  # the config's dtype, as mergekit writes it
        if named and named != args.model and not is_pruned(src):
            say(f"note: the --slices config names the model {named}; its layer ranges are applied to {args.model}")
    if args.base_model and src.kind == "hub" and args.base_model != src.path:
        raise PruneError(f"--base-model is only for a local MODEL: {src.path} is a Hub id and is the base model itself "
                         "(drop --base-model)")
    config = preflight_model(src, args.trust_remote_code)  # config, weights cover it, before writing
    if blocks is None:
        from prune.export.mergekit import blocks_from_slices

        blocks = blocks_from_slices(ranges, config.num_hidden_layers)
    from prune.io.guard import input_paths

    inputs = input_paths(args.slices, label="the --slices file")  # when it names a file (not inline ranges)
    out = prune_checkpoint(args.model, blocks, args.output, pruning={}, overwrite=args.overwrite, inputs=inputs,
                           trust_remote_code=args.trust_remote_code, dtype=args.dtype,
                           base_model=_repo_id_arg(args.base_model, "--base-model"), progress=not args.quiet)
    print(f"wrote {out} without blocks {sorted(blocks)}")
    return 0


def parse_blocks(items: list[str]) -> list[int]:
    """``--blocks``: 0-based indices and inclusive ranges, ``12-18,25`` -> 12..18 and 25, sorted; a block named twice is refused."""
    import re

    out: list[int] = []
    for item in items:
        m = re.fullmatch(r"([0-9]+)(?:\s*-\s*([0-9]+))?", item)  # ASCII digits ("\\d" took "١" for 1)
        if m is None or (m[2] is not None and int(m[2]) < int(m[1])):
            raise PruneError(f"--blocks takes 0-based indices and inclusive ranges like 12-18,25; got {item!r}")
        if int(m[2] or m[1]) >= MAX_BLOCKS:  # before a range of millions is built (it ran out of memory)
            raise PruneError(f"--blocks names block {int(m[2] or m[1])}, beyond any model's blocks: give the 0-based "
                             "indices of the model's blocks")
        out.extend(range(int(m[1]), int(m[2] or m[1]) + 1))
    if len(set(out)) != len(out):  # a typo (3,3 for 3,4) removed fewer blocks than meant, silently
        from collections import Counter

        twice = sorted(b for b, n in Counter(out).items() if n > 1)
        raise PruneError(f"--blocks names block(s) {twice} more than once (give each block once)")
    return sorted(out)


#: more blocks than any decoder stack has: a --blocks index at or past it is refused before its range is built
MAX_BLOCKS = 100_000


def _repo_id_arg(value: str | None, flag: str) -> str | None:
    if value is None:
        return None
    from prune.core.config import _hub_repo_id

    try:
        return _hub_repo_id(value)
    except ValueError as exc:
        raise PruneError(f"{flag} {value!r}: {exc}") from None


# ---- export-mergekit --------------------------------------------------------------------
def add_export_mergekit(sub) -> None:
    p = sub.add_parser("export-mergekit", help="write the mergekit passthrough config of a run's kept blocks",
                       description="Write mergekit.yaml for RUN_DIR: merge_method passthrough, one slice per run of "
                                   "consecutive kept blocks of the ORIGINAL model (half-open layer_range), so "
                                   "`mergekit-yaml mergekit.yaml OUT` rebuilds the pruned model from the original.")
    p.add_argument("run_dir", help="a folder written by prune run / remove / heal (reads pruning.json)")
    p.add_argument("--output", "-o", default=None, help="config file to write (default RUN_DIR/mergekit.yaml)")
    p.add_argument("--model", default=None, help="model id or path for the slices (default: the original's Hub id, "
                                                 "its declared base_model, or its local name)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="mergekit dtype (default: the run's saved dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.set_defaults(func=cmd_export_mergekit)


def cmd_export_mergekit(args) -> int:
    from prune.export.mergekit import export_mergekit

    out = export_mergekit(args.run_dir, args.output, model=args.model, dtype=args.dtype, overwrite=args.overwrite)
    print(f"mergekit config written to {out}")
    return 0


# ---- report ---------------------------------------------------------------------------
def add_report(sub) -> None:
    p = sub.add_parser("report", help="redundancy report (Markdown + HTML with plots) of a model or a run folder",
                       description="Write a self-contained report folder: report.md and report.html (images embedded) with "
                                   "the CKA heatmap between block outputs (pairs above tau outlined), per-block Block "
                                   "Influence, angular distances and MSRS contributions with the removed blocks marked, "
                                   "and MSRS raw and per pair. Give a folder written by 'prune run' (reads its "
                                   "pruning.json; original and pruned side by side), a scores file of 'prune score -o' "
                                   "(nothing is scored again), or a model plus --data (scores it first, like 'prune "
                                   "score'). Block indices are 0-based.")
    p.add_argument("source", metavar="MODEL_OR_RUN_DIR",
                   help="a 'prune run' output folder, a 'prune score -o' JSON file, or a Hub id / model folder / .gguf")
    p.add_argument("--output", "-o", default=None,
                   help="report folder (default: RUN_DIR/report, or ./report-<model name> for a model)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    p.add_argument("--strategy", default="contiguous", choices=names(needs_model=False),
                   help="model reports: the strategy whose blocks are marked (default contiguous)")
    option(p, "--metric", SelectConfig, "metric", choices=["bi", "angular", "cka", "msrs"],
           help=f"model reports: metric of --strategy one_shot (default {default(SelectConfig, 'metric')})")
    p.add_argument("--n-layers", type=int, default=None,
                   help="model reports: blocks to mark, and n of d(l, n) (default: a quarter of the blocks)")
    p.add_argument("--protect", type=_int_csv, default=default(SelectConfig, "protect"),
                   help="model reports: blocks never marked, comma-separated, negative from the end (default 0,-1; "
                        "'' for none)")
    _calibration_flags(p, data_required=False)
    _common_model_flags(p)
    p.set_defaults(func=cmd_report)


#: the flags of a model's report: a run folder's report reads what its run recorded
_MODEL_REPORT_FLAGS = ("strategy", "metric", "n_layers", "protect", "field", "rows", "data_config", "split", "bos",
                       "n_samples", "seq_len", "seed", "batch_size", "positions", "metrics", "cka_windows", "beta",
                       "tau", "dtype", "device_map", "trust_remote_code")


_MARKING_FLAGS = ("strategy", "metric", "n_layers", "protect")  # which blocks a model report marks


def _refuse_unread_metric(args) -> None:
    if not metric_is_read(args.strategy, args.metric, ("one_shot",)):
        _refuse_unused(args, ("metric",), f"with --strategy {args.strategy} (only one_shot reads it; contiguous "
                       "ranks by angular alone): drop it, or give --strategy one_shot")


def _read_metric(args) -> str | None:
    """The marking strategy's metric: ``--metric`` (or its default) for one_shot, none for the others."""
    return args.metric if args.strategy == "one_shot" else None


def _run_folders_near(path: str) -> str:
    """``"; the run folder above it: runs/x"`` or ``"; run folders in it: a, b"``: where a run folder is, when
    ``path`` is a folder inside one (its eval/) or a folder of runs ('' otherwise)."""
    from prune.core.records import RECORD_FILE

    folder = Path(path).expanduser().resolve()
    above = next((p for p in folder.parents if (p / RECORD_FILE).is_file()), None)
    if above is not None:
        return f"; the run folder above it: {above}"
    inside = sorted(p.name for p in folder.iterdir() if (p / RECORD_FILE).is_file()) if folder.is_dir() else []
    return f"; run folders in it: {', '.join(inside[:5])}{' ...' if len(inside) > 5 else ''}" if inside else ""


def cmd_report(args) -> int:
    from prune.export.report import default_output, is_run_dir, report_run
    from prune.pipeline.commands import report_model

    out = args.output or default_output(args.source, as_model=bool(args.data))
    if is_run_dir(args.source) and not args.data:  # with --data a pruned folder is scored as a model
        from prune.pipeline.inputs import run_inputs

        _refuse_unused(args, _MODEL_REPORT_FLAGS, f"on a run folder ({args.source} reports the blocks its run chose, "
                       "scored as it was): give --data to score the folder as a model, or drop them")
        folder = report_run(args.source, out, overwrite=args.overwrite, inputs=run_inputs(args.source))
    elif not args.data and args.source.endswith(".json") and os.path.isfile(os.path.expanduser(args.source)):
        from prune.pipeline.commands import report_scores

        _refuse_unused(args, tuple(f for f in _MODEL_REPORT_FLAGS if f not in _MARKING_FLAGS),
                       f"on a scores file ({args.source} holds scores already: they are not computed again)")
        _refuse_unread_metric(args)
        folder = report_scores(args.source, out, strategy=args.strategy, metric=_read_metric(args), n_layers=args.n_layers,
                               protect=args.protect, overwrite=args.overwrite)
    else:
        if not args.data:
            from prune.io.source import HUB_ID

            if not os.path.exists(os.path.expanduser(args.source)):
                hub = HUB_ID.match(args.source)  # never a path: an id starts with a letter or digit
                raise PruneError(f"{args.source} not found here (give a 'prune run' output folder" + (
                    "; as a Hub model it needs --data to be scored)" if hub else ", or a model with --data)"))
            raise PruneError(f"{args.source} is not a run folder (no pruning.json){_run_folders_near(args.source)}: give "
                             "--data to score it as a model, or a run folder")
        _refuse_unread_metric(args)
        folder = report_model(args.source, out, strategy=args.strategy, metric=_read_metric(args), n_layers=args.n_layers,
                              protect=args.protect, overwrite=args.overwrite, **_score_kwargs(args))
    from prune.core import dist

    if dist.world().is_main:
        print(f"report written to {folder}/report.md and report.html")
    return 0


# ---- heal -----------------------------------------------------------------------------
def add_heal(sub) -> None:
    p = sub.add_parser("heal", help="heal a saved pruned run into a new folder (LoRA, partial fine-tuning, replacement layer, bridge; "
                                      "next-token loss or distillation)",
                       description="Win back utility lost to pruning: train the pruned model of RUN_DIR (a folder written "
                                   "by prune run) on training text and write a NEW complete folder (a plain checkpoint, "
                                   "pruning.json with the healing record, recipe.yaml). RUN_DIR is never modified. Settings "
                                   "come from RUN_DIR/recipe.yaml's heal section (without its objective and bridge when "
                                   "--method is given), then --config, then the flags and --set. "
                                   "Methods: lora (adapters merged into the weights), replace (one trained block in place of "
                                   "the removed contiguous run; loads the original model recorded in pruning.json), partial "
                                   "(fine-tune the last blocks), bridge (nothing trained: a least-squares refit at each cut, "
                                   "fitted on the original model recorded in pruning.json; --set bridge=linear|down adds it "
                                   "before lora/partial too).")
    p.add_argument("run_dir", help="a folder written by prune run")
    p.add_argument("--output", "-o", required=True, help="the new folder to write (must not be RUN_DIR)")
    p.add_argument("--method", choices=[*HEAL_METHODS, "distill"], default=None,
                   help="healing method; distill = LoRA trained to match the original model (--set params=partial for "
                        "partial fine-tuning; --set temperature=2 --set top_k=64 --set teacher_cache=FILE --set "
                        "hidden_weight=..., one --set each)")
    p.add_argument("--config", default=None, help="YAML file with heal settings (a heal section, or a recipe holding one)")
    p.add_argument("--data", default=None, help="training text (.txt/.jsonl or a datasets name); never the evaluation text")
    p.add_argument("--field", type=_csv, default=None, help="JSONL field(s) of --data (comma-separated: concatenated)")
    p.add_argument("--rows", default=None, help="slice of rows of --data, e.g. 0:1000")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a heal setting, e.g. --set steps=200 --set learning_rate=5e-4 --set rank=16 (repeatable)")
    p.add_argument("--source", default=None, help="the original model (replace, distill's teacher, bridge, --evaluate "
                                                  "with fidelity), when pruning.json records a local source by name only "
                                                  "(checked against its sha256)")
    p.add_argument("--calibration-data", default=None, metavar="PATH",
                   help="the calibration text file, when RUN_DIR's recipe records it by name only (<local>/name)")
    p.add_argument("--evaluate", action="store_true", help="evaluate the healed model with RUN_DIR's evaluate settings "
                                                          "and write eval.json / eval.md (original, pruned, healed); with "
                                                          "evaluate.fidelity the original is loaded once for its reference "
                                                          "(--source where pruning.json names it by name only)")
    p.add_argument("--task-dir", dest="task_dir", action="append", default=[], metavar="DIR",
                   help="with --evaluate: a folder of lm-eval task YAMLs, repeatable; replaces RUN_DIR's "
                        "evaluate.task_dirs, which are never read from RUN_DIR's own recipe (task YAMLs can run Python)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder (only once the new one is complete)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run code shipped with the checkpoint (off by default; never taken from RUN_DIR's own files)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars, progress messages, tables or notes "
                                                                "(the results stay in the files written)")
    p.set_defaults(func=cmd_heal)


def cmd_heal(args) -> int:
    from prune.pipeline.heal_run import heal_run

    out = heal_run(args.run_dir, args.output, method=args.method, config=args.config, data=args.data, field=args.field,
             rows=args.rows, overrides=args.overrides, evaluate=args.evaluate, overwrite=args.overwrite, quiet=args.quiet,
             trust_remote_code=args.trust_remote_code, source=args.source, calibration=args.calibration_data,
             task_dirs=args.task_dir)
    _say_saved(args, out)
    return 0


# ---- compare --------------------------------------------------------------------------
def add_compare(sub) -> None:
    p = sub.add_parser("compare", help="paired comparison of two evaluations on the same examples (lm-eval samples, "
                                       "fidelity windows)",
                       description="Compare B against A example by example from lm-eval's per-example samples "
                                   "(samples_*.jsonl): per task and metric the mean difference B - A, its paired standard "
                                   "error sd(d)/sqrt(n), a 95% interval (Newcombe's score interval for right/wrong answers, "
                                   "else a percentile bootstrap, or Student's interval under 30 examples), how many "
                                   "answers flipped "
                                   "each way and McNemar's exact p-value. A and B are prune run folders (their "
                                   "eval/pruned), lm-eval --output_path folders or folders of samples_*.jsonl. With only A "
                                   "(a run folder), its original is compared with its pruned model. With several B (seeds "
                                   "of one recipe), B is their mean per example: the pooled difference and an interval "
                                   "that counts the examples' sampling, which every seed shares. When A and B both "
                                   "measured fidelity to the same original on the same windows (a run's eval.json, or "
                                   "prune eval --output FILE.json), their KL and log perplexity ratio are compared "
                                   "window by window too (Student's 95% interval).")
    p.add_argument("a", metavar="A", help="run folder, lm-eval results folder or prune eval --output file (the baseline)")
    p.add_argument("b", metavar="B", nargs="*", default=None,
                   help="run folder, lm-eval results folder or prune eval --output file (compared to A); several: "
                        "pooled per example")
    p.add_argument("--iters", type=_iters, default=BOOTSTRAP_ITERS,
                   help=f"bootstrap resamples, for scores that are not right/wrong (default {BOOTSTRAP_ITERS}, at most "
                        f"{MAX_BOOTSTRAP_ITERS:,})")
    p.add_argument("--seed", type=_non_negative, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--output", "-o", default=None, help="also write the comparison as JSON to this file (never one of "
                                                          "the compared results)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.set_defaults(func=cmd_compare)


def _pruned_label(run_dir: str) -> str:
    """How a run folder's model is named in a comparison with its original: ``healed`` once healed."""
    from prune.core.records import RECORD_FILE, read_record

    file = Path(run_dir).expanduser() / RECORD_FILE
    try:
        return read_record(file).label() if file.is_file() else "pruned"
    except PruneError:
        return "pruned"


def cmd_compare(args) -> int:
    from prune.measure.paired import (average_line, compare_fidelity, compare_folders, fidelity_markdown, fidelity_of,
                                      has_samples, paired_markdown)

    bs = args.b or []
    _refuse_overwrite_without_output(args)
    if args.output:
        from prune.io.guard import check_output, input_paths

        check_output(args.output, input_paths(args.a, *bs, label="a compared result"), overwrite=args.overwrite,
                     kind="file", what="--output file", flag="--output", example="compare.json")
    if bs:
        from prune.measure.paired import check_distinct_files

        check_distinct_files([args.a, *bs])
    fid_a, fid_b = (fidelity_of(args.a), [fidelity_of(x) for x in bs]) if bs else (None, [])
    sides = [has_samples(x) for x in [args.a, *bs]] if bs else [has_samples(args.a, w) for w in ("original", "pruned")]
    samples = all(sides)
    try:
        fid_rows = compare_fidelity(fid_a, fid_b) if fid_a and fid_b and all(fid_b) else []
    except PruneError as exc:
        if not samples:
            raise
        print(f"note: fidelity left out: {exc}", file=sys.stderr)  # the lm-eval samples still pair
        fid_rows = []
    if fid_rows and any(sides) and not samples:  # the lm-eval pairing was dropped without a word
        print("note: lm-eval samples left out: only some of the compared results have them", file=sys.stderr)
    # lm-eval samples where both sides have them; without them and without fidelity, compare_folders says what is missing
    rows, each = [], []  # each: several B's own averages, read with the pooled rows
    if (samples or not fid_rows) and len(bs) > 1:
        from prune.measure.paired import compare_pooled

        rows, each = compare_pooled(args.a, bs, iters=args.iters, seed=args.seed)
    elif samples or not fid_rows:
        rows = compare_folders(args.a, bs or None, iters=args.iters, seed=args.seed)
    names = (("original", _pruned_label(args.a)) if not bs else
             ("A", "B" if len(bs) == 1 else f"mean of {len(bs)} B"))
    if not rows and not fid_rows:  # it printed nothing and wrote an empty comparison
        raise PruneError("nothing to pair: no task metric scored on examples both have (the notes above say why)")
    if rows:
        from prune.measure.paired import evaluated_more_than_once, evaluations_mixed, samples_folder

        folders = ([samples_folder(x) for x in [args.a, *bs]] if bs else
                   [samples_folder(args.a, which) for which in ("original", "pruned")])
        for folder in folders:  # each task from its newest file: say when they are not one evaluation's
            if stamps := evaluations_mixed(folder, sorted({r.task for r in rows})):
                print(f"note: {folder}'s tasks come from {len(stamps)} lm-eval runs ({', '.join(stamps)}; the newest "
                      "file of each task): the comparison mixes them", file=sys.stderr)
            elif again := sorted({r.task for r in rows} & set(evaluated_more_than_once(folder))):
                print(f"note: {folder} holds more than one evaluation of {', '.join(again[:3])}"
                      f"{' and more' if len(again) > 3 else ''}: the newest is compared", file=sys.stderr)
        print(paired_markdown(rows, *names))
    if len({r.task for r in rows}) > 1:
        from prune.measure.paired import some, without_headline

        print("\n" + (average_line(rows, *names) or f"No average over tasks: no task has a metric scored 0 to 1 (higher better) per "
                                                      f"example ({some(without_headline(rows))})"))
    if rows and each and not any(math.isnan(d) for d in each):
        print(f"\nEach B alone, on the same examples (task average, B - A, points): "
              f"{', '.join(f'{100 * d:+.2f}' for d in each)}. The interval of the mean counts the sampling of the "
              f"questions for these {len(bs)} B; the spread between them (another seed's training) is not in it. "
              "right->wrong and wrong->right count the questions whose mean over the B is below and above A's score; "
              "McNemar p is the exact sign test on them.")
    if fid_rows:
        print(("\n" if rows else "") + f"Fidelity to the original, paired over the {fid_rows[0].n} windows both were measured "
              "on (KL per token and log perplexity ratio, each window's mean):\n\n" + fidelity_markdown(fid_rows, *names))
    if args.output:
        from prune.io.guard import write_file

        b = bs[0] if len(bs) == 1 else bs or None  # several: the list pooled
        from dataclasses import asdict

        from prune.measure.paired import task_average

        average = task_average(rows) if len({r.task for r in rows}) > 1 else None
        write_file(args.output, json.dumps(_finite({"a": args.a, "b": b, "rows": [r.to_dict() for r in rows],
                                                    "task_average": asdict(average) if average else None,
                                                    "each_b_task_average": each or None,
                                                    "fidelity_rows": [r.to_dict() for r in fid_rows]}),
                                           indent=1, allow_nan=False))
        print(f"comparison written to {args.output}", file=sys.stderr)
    return 0


def _finite(data):
    """``data`` with every NaN and infinity as None (null): JSON has neither, and strict readers refuse them."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


#: every subcommand registers itself here: (adder, ...) in --help order
SUBCOMMANDS = [add_run, add_score, add_eval, add_compare, add_report, add_heal, add_remove, add_check, add_push,
               add_export_mergekit]


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors redacted: a token given in any argument is never echoed; no
    abbreviated flags (``--token VALUE`` must not silently mean ``--token-file VALUE``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        """One line, as every other refusal (argparse printed its usage above it: 4 to 19 lines)."""
        from prune.core.secrets import redact

        if message.endswith("expected one argument"):  # "--rows -10:": a value that starts with "-" reads as a flag
            flag = message.split()[1].rstrip(":") if message.startswith("argument ") else "--flag"
            message += f" (a value that starts with '-' is given as {flag.split('/')[-1]}=VALUE)"
        self.exit(2, f"{self.prog}: error: {redact(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="prune", description="Measure and remove redundant decoder layers of LLMs. "
                                     "Block indices are 0-based everywhere.")
    from prune.core.console import __version__

    parser.add_argument("--version", action="version", version=f"prune {__version__}")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None,
                        help="log messages of prune's libraries (transformers, datasets, lm-eval) from this level on, to "
                             "stderr (default: their own defaults; --quiet lowers them to errors)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for add in SUBCOMMANDS:
        add(sub)
    for subparser in sub.choices.values():
        subparser.set_defaults(subparser=subparser)  # for the flags a command would ignore (_given)
    return parser


def input_error(exc: BaseException) -> str | None:
    """The one line for an exception caused by the user's input or environment, ``None`` for a bug.

    ``PruneError`` is ours; ``OSError`` (files, permissions, a full disk), ``UnicodeError`` (a
    non-UTF-8 file or name), pydantic's ``ValidationError`` (a setting) and safetensors'
    ``SafetensorError`` (a weight file) come from what the user gave; any other exception is a
    bug and keeps its traceback."""
    from prune.io.guard import disk_full

    if isinstance(exc, PruneError):
        return str(exc)
    if disk_full(exc):
        return f"disk full (No space left on device): {_first_line(exc)}; free some space or choose another output path"
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        return f"cannot access{where}: {exc.strerror or _first_line(exc)} (check the path and its permissions)"
    if isinstance(exc, UnicodeError):
        return f"not valid UTF-8 text: {_first_line(exc)} (convert the file to UTF-8)"
    try:
        from pydantic import ValidationError
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover
        return None
    if isinstance(exc, ValidationError):
        from prune.core.config import format_validation_error

        return format_validation_error(exc, "settings")
    if isinstance(exc, SafetensorError):
        return f"a safetensors file is unreadable or could not be written: {_first_line(exc)}"
    return None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    global _STARTED
    _STARTED = time.time()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_level:
        from prune.core.console import set_log_level

        set_log_level(args.log_level)

    from prune.core import dist

    if dist.launched():  # torchrun / accelerate launch: every rank ends with one line, never a hang
        return dist_exit(run_command, args)
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return run_command(args)
    before = signal.signal(signal.SIGTERM, _terminated)  # timeout, SLURM, docker stop: as Ctrl-C, exit 143
    try:
        return run_command(args)
    finally:
        signal.signal(signal.SIGTERM, before)


#: a rank's line when the launcher's SIGTERM stops it
TERMINATED_BY_LAUNCHER = "terminated (SIGTERM from the launcher: the launch was stopped, or another of its processes failed)"


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an interruption: the same cleanup and resume hint as Ctrl-C, exit status 143."""


def _terminated(signum, frame):  # noqa: ARG001
    raise Terminated()


#: commands with no work to share: under a launcher rank 0 runs them alone and the others wait for
#: its outcome (every rank wrote, pushed and printed the same thing; a second writer found the first's folder)
RANK0_COMMANDS = ("check", "push", "remove", "export-mergekit", "compare")


def rank0_only(args) -> bool:
    """Whether ``args``' command runs on rank 0 alone under a launcher (a run folder's report too)."""
    return args.command in RANK0_COMMANDS or (args.command == "report" and not getattr(args, "data", None))


def run_command(args) -> int:
    from prune.core import dist
    from prune.core.secrets import redact

    try:
        # messages name the flags the user typed, not the Python parameters; a note is said once a command
        with called_from_cli(), notes_once():
            if dist.launched() and rank0_only(args):
                return dist.on_main(lambda: args.func(args))
            return args.func(args)
    except (PruneError, OSError, UnicodeError, ValueError) as exc:  # ValueError: pydantic, SafetensorError? see below
        line = input_error(exc)
        if line is None:
            traceback.print_exc()
            return 1
        print(f"error: {redact(line)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        hint = _interrupted_run(args) if args.command == "run" else _interrupted_write(args)
        term = isinstance(exc, Terminated)
        what = "terminated (SIGTERM)" if term else "interrupted"
        if term and dist.launched():  # the launcher's stop: asked for, or another rank failed (it says which)
            what = f"rank {os.environ.get('RANK', '?')} {TERMINATED_BY_LAUNCHER}"
        print(f"{what}{hint}", file=sys.stderr)
        return 143 if term else 130
    except Exception as exc:  # noqa: BLE001 - SafetensorError and the tokenizers' disk-full Exception, else a bug
        from prune.core import dist

        if dist.launched() and dist.is_collective_failure(exc):  # another rank died or hung: one line
            import signal

            signal.signal(signal.SIGTERM, lambda *_: exit_quietly(1))  # the launcher's stop: no second line
            print(f"error: rank {os.environ.get('RANK', '?')} stopped: another rank failed or timed out "
                  f"({first_line(exc)})", file=sys.stderr)
            return 1
        line = input_error(exc)
        if line is None:
            traceback.print_exc()  # a bug: show everything
            return 1
        print(f"error: {redact(line)}", file=sys.stderr)
        return 2


def exit_quietly(code: int) -> None:
    """Leave at once with ``code``, scratch folders removed (``os._exit`` runs no finally), nothing printed: the
    launcher's SIGTERM to a rank that has already said its one line."""
    from prune.core import scratch

    scratch.remove_all()
    os._exit(code)


def dist_exit(command, args) -> int:
    """Run ``command(args)`` as one rank of a launch. A rank that fails prints its one line and
    leaves at once (``os._exit``: its sockets close, so the other ranks' next collective fails
    instead of waiting); a rank whose collective failed because another died says so in one line;
    the launcher's SIGTERM (the launch stopped by ``timeout``, SLURM or ``docker stop``, or another rank
    failed) is an interruption, as in one process: what is half-written is removed, the stages a ``--resume``
    reuses are kept, one line, exit status 143. A rank that succeeded destroys the process
    group and also leaves with ``os._exit``: at interpreter teardown gloo's worker threads can abort the
    process (SIGABRT, "terminate called without an active exception"; seen once in CI on a resumed
    run) after every output was written."""
    import signal

    from prune.core import scratch

    said: list[int] = []  # the command's exit status, once it has said its line

    def on_term(signum, frame):  # noqa: ARG001
        if said:  # the launcher's SIGTERM after this rank said its line: no second one
            exit_quietly(said[0])
        raise Terminated()

    signal.signal(signal.SIGTERM, on_term)
    try:
        said.append(command(args))
    except KeyboardInterrupt as exc:  # a command that lets it through (a launched script's main; run_command says it)
        term = isinstance(exc, Terminated)
        print(f"rank {os.environ.get('RANK', '?')} {TERMINATED_BY_LAUNCHER if term else 'interrupted'}", file=sys.stderr)
        said.append(143 if term else 130)
    code = said[0]
    sys.stdout.flush()
    sys.stderr.flush()
    if code == 0:
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.destroy_process_group()
        import logging

        logging.shutdown()
        os._exit(0)
    scratch.remove_all()  # os._exit runs no finally: spilled states would stay in $TMPDIR
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
