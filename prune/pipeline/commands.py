"""The one-shot commands behind ``prune score`` and ``prune eval``."""

from __future__ import annotations

from pathlib import Path

from prune.core import dist
from prune.core.config import CalibrationConfig, EvaluateConfig, ScoreConfig, SelectConfig, TextConfig, default
from prune.core.console import StageClock, keeps_quiet_mode, quiet_mode, say, versions
from prune.io.text import calibration_windows, load_text
from prune.io.source import resolve_source
from prune.measure.scoring import ScoreResult, score
from prune.measure.evaluation import evaluate_loaded
from prune.model.loading import count_parameters, dtype_name, load_model, model_dtype
from prune.core.errors import PruneError, spelled
from prune.choose.rules import DEFAULT_METRIC, check_metric_read, resolve_count, resolve_protect, select
from prune.export.report import SCORE_ONLY, write_report


# ---- score / eval subcommands -------------------------------------------------------------
_C, _S, _T = CalibrationConfig, ScoreConfig, TextConfig


@keeps_quiet_mode
def score_model(source: str, *, data: str, field: str | list[str] = "text", rows: str | None = None,
                data_config: str | None = None, split: str = default(_T, "split"), bos: bool | None = None,
                n_samples: int = default(_C, "n_samples"), seq_len: int = default(_C, "seq_len"),
                seed: int = default(_C, "seed"), batch_size: int = default(_C, "batch_size"),
                positions: str = default(_S, "positions"), metrics=tuple(default(_S, "metrics")),
                cka_windows: int = default(_S, "cka_windows"), beta: float = default(_S, "beta"),
                tau: float = default(_S, "tau"), dtype: str = "auto", device_map=None,
                trust_remote_code: bool = False, output: str | None = None, quiet: bool = False,
                execution: str = default(_S, "execution"), max_memory: dict | None = None,
                overwrite: bool = False) -> ScoreResult:
    """Redundancy scores of a model over calibration text; optionally written as JSON to ``output``.
    ``data_config`` / ``split``: a ``datasets`` name's configuration and split; ``bos``: a BOS token per
    window (None: when the tokenizer adds one), as in a recipe's ``calibration`` section.

    ``execution``: ``auto`` (from the weights' size and the memory there is), ``in_memory`` or
    ``sequential`` (one block at a time, see :mod:`prune.execution`)."""
    from prune.core.config import CalibrationConfig, ScoreConfig, TextSource
    from prune.io.guard import check_output, write_file
    from prune.model.loading import load_tokenizer
    from prune.pipeline.execution import agreed_plan, plan_execution
    from prune.pipeline.inputs import command_inputs, preflight_model, validated

    quiet_mode(quiet)
    clock = StageClock()
    # -- everything checkable before the weights load: flags, output file, config, text --
    validated(CalibrationConfig, path=str(data), field=field, rows=rows, n_samples=n_samples, seq_len=seq_len, seed=seed,
              batch_size=batch_size, config=data_config, split=split, bos=bos)
    validated(ScoreConfig, metrics=list(metrics), positions=positions, cka_windows=cka_windows, beta=beta, tau=tau,
              execution=execution)
    if "cka" in metrics and n_samples % cka_windows:  # before loading (prune.score refuses it too)
        from prune.measure.scoring import short_cka_group

        raise PruneError(short_cka_group(cka_windows, n_samples, spelled("--n-samples", "n_samples"),
                                         spelled("--cka-windows", "cka_windows")))
    if (data_config is not None or split not in (None, default(TextConfig, "split"))) and Path(data).expanduser().is_file():
        raise PruneError(f"--split / --data-config select part of a datasets dataset, but {data} is a local file, read "
                         "whole (drop them; --rows takes a slice of the file)")
    src = resolve_source(source)
    if output:
        check_output(output, command_inputs(source, [data]), overwrite=overwrite, kind="file", what="--output file",
                     flag="--output")
    preflight_model(src, trust_remote_code, [(spelled("--seq-len", "seq_len"), seq_len)])
    text = load_text(TextSource(data, field, data_config, split, rows))
    try:
        windows = calibration_windows(load_tokenizer(src, trust_remote_code), text, n_samples, seq_len, seed, bos=bos)
    except PruneError as exc:  # the flags the user typed (or the parameters), not the recipe keys
        raise PruneError(str(exc).replace("calibration.n_samples", spelled("--n-samples", "n_samples"))
                         .replace("calibration.seq_len", spelled("--seq-len", "seq_len"))) from None

    def planned(mode: str):
        return plan_execution(source, mode, dtype=dtype, device_map=device_map, max_memory=max_memory,
                              n_windows=n_samples, seq_len=seq_len, batch_size=batch_size,
                              trust_remote_code=trust_remote_code, cka_windows=cka_windows if "cka" in metrics else None)

    plan = agreed_plan(planned(execution), planned)  # rank 0's mode on every rank: the same collectives
    say(plan.describe(), quiet or not dist.world().is_main)
    clock.lap("pre-flight")
    kwargs = dict(batch_size=batch_size, positions=positions, metrics=tuple(metrics), cka_windows=cka_windows,
                  beta=beta, tau=tau, progress=not quiet)
    meta = {"data": {"path": data, "field": field, "config": data_config, "split": split, "rows": rows, "bos": bos},
            "seed": seed, "versions": versions(),
            "execution": plan.to_dict()}
    if plan.mode == "sequential":
        from transformers import AutoConfig

        from prune.measure.sequential import score_sequential

        config = AutoConfig.from_pretrained(plan.folder, trust_remote_code=trust_remote_code)
        meta.update(source=resolve_source(source).to_dict(), model_type=config.model_type)
        result = score_sequential(plan.folder, windows, dtype=dtype, device=plan.device,
                                  trust_remote_code=trust_remote_code, metadata=meta, **kwargs)
    else:
        model, tokenizer, src = load_model(source, dtype=dtype, device_map=device_map, max_memory=max_memory,
                                           trust_remote_code=trust_remote_code)
        meta.update(source=src.to_dict(), model_type=model.config.model_type)
        result = score(model, windows, metadata=meta, **kwargs)
    clock.lap("load and score")
    if output:
        import json

        dist.on_main(lambda: write_file(output, json.dumps(result.to_dict(), indent=1)))  # under a launcher: rank 0
        clock.lap("write")
    say(clock.summary(), quiet or not dist.world().is_main)
    return result


@keeps_quiet_mode
def evaluate_model(source: str, cfg: EvaluateConfig, *, dtype: str = "auto", device_map=None,
                   trust_remote_code: bool = False, quiet: bool = False, original: str | None = None,
                   output_path: str | None = None, output: str | None = None, overwrite: bool = False,
                   show_result=None) -> dict | None:
    """Perplexity, fidelity and lm-eval tasks of any model (original or pruned), loaded from ``source``;
    with ``cfg.fidelity``, its fidelity to ``original`` (loaded first, then released).

    Tasks run on the model in memory (``cfg.model`` hf without ``model_args``), or lm-eval loads
    ``source`` itself with its backend ``cfg.model`` and ``pretrained=SOURCE,<model_args>``: with
    ``model_args``, with ``vllm``, and always in a data-parallel launch (``accelerate launch``), where
    only the first process returns results (the others return None).

    lm-eval logs every example; its own files (``results_<date>.json``, ``samples_<task>_<date>.jsonl``)
    are returned as ``lm_eval_files`` and, with ``output_path``, written where lm-eval's
    ``--output_path`` puts them: ``output_path/<model name, sanitized>/``. ``output``: the result as
    JSON (an existing file is refused unless ``overwrite``). Inputs are checked before any loading.
    ``show_result(result)``: called before the timing line (the CLI prints its table there)."""
    from lm_eval.utils import sanitize_model_name

    from prune.io.guard import check_output, input_paths
    from prune.io.text import eval_windows
    from prune.measure import lmeval as L
    from prune.model.loading import load_tokenizer
    from prune.pipeline.inputs import command_inputs, preflight_model

    quiet_mode(quiet)
    clock = StageClock()
    if not isinstance(cfg, EvaluateConfig):
        raise PruneError(f"evaluate_model: cfg must be a prune.EvaluateConfig, got a {type(cfg).__name__}")
    if (cfg.fidelity is None) != (original is None):
        raise PruneError(spelled("fidelity needs both the original model (--fidelity-to) and fidelity settings",
                                 "fidelity needs both the original model (original=) and cfg.fidelity"))
    if output_path is not None and not cfg.tasks:
        raise PruneError("evaluate_model: output_path is where lm-eval writes its files, and cfg has no tasks (give "
                         "tasks, or drop output_path)")
    # lm-eval loads the model itself for another backend or its own model_args; otherwise the model is loaded here
    # and, under a launcher, each rank scores a share of every task's examples (as a run does; lm-eval's own hf
    # backend splits only over GPUs: on CPUs every rank would score every example)
    named = bool(cfg.tasks) and (cfg.model != "hf" or cfg.model_args is not None)
    measures = cfg.perplexity is not None or cfg.fidelity is not None  # always in memory, in one process
    in_memory = measures or (cfg.tasks and not named)
    if measures and L.world_size() > 1:  # each rank would measure all of it
        raise PruneError("perplexity and fidelity run in one process: evaluate them without a launcher "
                         "(a data-parallel launch evaluates lm-eval tasks only)")
    if named:
        L.check_backend(cfg.model)
    src = resolve_source(source)
    ppl = cfg.perplexity
    inputs = command_inputs(source, [ppl.path if ppl else None, cfg.fidelity.path if cfg.fidelity else None])
    inputs += input_paths(original, label="the original model (--fidelity-to)")
    if cfg.tasks:  # the task data and task folders: lm-eval's files never go inside them (a resume fingerprints them)
        inputs += input_paths(L.data_dir(cfg.data_dir), label="the task data folder (--data-dir)")
        inputs += input_paths(*(cfg.task_dirs or []), label="a task folder (--task-dir)")
    same = output and output_path and Path(output).expanduser().resolve() == Path(output_path).expanduser().resolve()
    if same and cfg.tasks:
        raise PruneError(f"--output and --output-path both name {output}: --output is a JSON file, --output-path a "
                         "folder for lm-eval's files (give two paths)")
    if output:
        check_output(output, inputs, overwrite=overwrite, kind="file", what="--output file", flag="--output",
                     example="eval.json")
    folder = sanitize_model_name(str(source))
    if output_path and cfg.tasks:  # lm-eval's files go to OUTPUT_PATH/<model>: a folder of its own, never an input
        check_output(Path(output_path).expanduser() / folder, inputs, overwrite=True, what="--output-path folder",
                     flag="--output-path")
    if cfg.tasks:
        L.check_tasks(cfg.tasks, data_dir_path=cfg.data_dir, task_dirs=cfg.task_dirs, num_fewshot=cfg.num_fewshot,
                      fewshot_from_scored_split=cfg.fewshot_from_scored_split, quiet=quiet,
                      local_alias=cfg.local_alias)  # fail before loading
    config = preflight_model(src, trust_remote_code, [(spelled("--seq-len", "perplexity.seq_len"), ppl.seq_len if ppl else None)])
    if original is not None:  # one vocabulary, or no KL between them: refused before either model loads
        base_config = preflight_model(resolve_source(original), trust_remote_code)
        if base_config.vocab_size != config.vocab_size:
            raise PruneError(f"--fidelity-to {original}: its vocabulary has {base_config.vocab_size} tokens, {source}'s "
                             f"{config.vocab_size}; fidelity compares next-token distributions over one vocabulary "
                             "(give the model this one was pruned from)")
    templated = bool(cfg.tasks and cfg.apply_chat_template)
    tokenizer = load_tokenizer(src, trust_remote_code) if ppl is not None or templated else None  # read once
    if ppl is not None:  # empty or too short text fails now, not after loading
        eval_windows(tokenizer, load_text(ppl.source()), ppl.seq_len, ppl.max_windows, ppl.bos)
    if templated:
        L.check_chat_template(tokenizer, cfg.apply_chat_template, "--apply-chat-template")
    if original is not None:  # the fidelity windows are cut with the original's tokenizer: it and they load now
        text, seq_len, max_windows = cfg.fidelity.text(ppl)
        eval_windows(load_tokenizer(resolve_source(original), trust_remote_code), load_text(text.source()), seq_len,
                     max_windows, text.bos)
    clock.lap("pre-flight")
    reference = None
    if original is not None:
        from prune.measure.evaluation import fidelity_reference

        base, base_tok, _ = load_model(original, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code)
        reference = fidelity_reference(base, base_tok, cfg, quiet=quiet)
        del base
        clock.lap("fidelity reference (original)")
    result: dict = {}
    layers = parameters = ran_in = None
    if in_memory:
        model, tokenizer, src = load_model(source, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code)
        memory_cfg = cfg.model_copy(update={"tasks": []}) if named else cfg
        result = evaluate_loaded(model, tokenizer, memory_cfg, quiet=quiet, reference=reference, lm_eval_name=str(source),
                                 lm_eval_folder=folder, refuse_not_finite=str(source))  # before lm-eval, nothing written
        layers, parameters = model.config.num_hidden_layers, count_parameters(model)
        ran_in = model_dtype(model)
        del model
        clock.lap("load and evaluate")
        if not dist.world().is_main:  # a data-parallel rank but the first: rank 0 writes and prints
            return None
    if named:
        args = L.backend_model_args(src.path, cfg.model_args, backend=cfg.model, dtype=dtype, gguf_file=src.gguf_file,
                                    trust_remote_code=trust_remote_code)
        say(f"lm-eval loads the model itself: --model {cfg.model} --model_args {args}", quiet)
        run = L.run_lm_eval(cfg.model, None, cfg.tasks, model_args=args, limit=cfg.limit, batch_size=cfg.batch_size,
                            num_fewshot=cfg.num_fewshot, seed=cfg.seed, data_dir_path=cfg.data_dir, task_dirs=cfg.task_dirs,
                            progress=not quiet, apply_chat_template=cfg.apply_chat_template,
                            fewshot_as_multiturn=cfg.fewshot_as_multiturn, local_alias=cfg.local_alias)
        if run is None:
            return None
        result["tasks"] = run.summary
        result["lm_eval_files"] = run.files(str(source), folder)
        clock.lap("lm-eval")
    if output_path and result.get("lm_eval_files"):
        from prune.io.guard import write_file

        target = Path(output_path).expanduser() / folder
        for name, text in result["lm_eval_files"].items():  # each whole or not at all (lm-eval's names carry a date)
            write_file(target / name, text)
        result["lm_eval_folder"] = str(target)
    if original is not None:
        result["fidelity"]["original"] = str(original)
    if layers is None:  # lm-eval loaded the model itself (another backend, or a launch): counted on the meta device
        from prune.model.arch import meta_model
        from prune.model.loading import load_config

        config = load_config(src, trust_remote_code)
        layers = config.num_hidden_layers
        if cfg.model == "hf" and not src.gguf_file:  # lm-eval's HF backend loads it in the dtype asked for, or as stored
            stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
            ran_in = dtype if dtype != "auto" else dtype_name(stored) if stored is not None else None
        try:
            parameters = count_parameters(meta_model(config, trust_remote_code=trust_remote_code))
        except Exception:  # noqa: BLE001 - a config transformers cannot build here: the count is left out
            parameters = None
    result["model"] = src.to_dict()
    result["layers"] = layers
    result["parameters"] = parameters
    result["dtype"] = ran_in  # the dtype the model ran in (settings.dtype: the one asked for, auto = as stored)
    result["settings"] = {"dtype": dtype, "limit": cfg.limit, "batch_size": cfg.batch_size, "num_fewshot": cfg.num_fewshot,
                          "seed": cfg.seed, "model": cfg.model, "model_args": cfg.model_args,
                          "apply_chat_template": cfg.apply_chat_template, "n_shot": L.n_shots(result),
                          "versions": versions()}
    if output:
        import json

        from prune.io.guard import write_file

        write_file(output, json.dumps({k: v for k, v in result.items() if k != "lm_eval_files"}, indent=1))
    if output or output_path:
        clock.lap("write")
    if show_result is not None:  # the command's table, before where the time went (the last line, as in run)
        show_result(result)
    say(clock.summary(), quiet)
    return result


def report_model(source: str, out_dir: str | Path, *, strategy: str = "contiguous", metric: str | None = None,
                 n_layers: int | None = None, protect=None, overwrite: bool = False, **score_kwargs) -> Path:
    """Score ``source`` (see :func:`prune.pipeline.score_model` for ``score_kwargs``) and report it,
    marking the ``n_layers`` blocks a score-only ``strategy`` would remove (default: a quarter) outside
    ``protect`` (default: ``select.protect``'s)."""
    from prune.export.saving import check_output_dir
    from prune.pipeline.commands import score_model
    from prune.pipeline.inputs import command_inputs, preflight_model

    inputs = command_inputs(source, [score_kwargs.get("data")])
    check_output_dir(out_dir, overwrite, inputs, flag="--output", written=("report.json",))  # before the scoring
    metrics = list(score_kwargs.get("metrics") or default(_S, "metrics"))
    blocks = preflight_model(resolve_source(source), score_kwargs.get("trust_remote_code", False)).num_hidden_layers
    k = _report_selection(blocks, metrics, strategy, metric, n_layers, protect, "add")  # fails now, not after scoring
    scores = score_model(source, **score_kwargs)  # under a launcher every rank scores its share
    return dist.on_main(lambda: _write_model_report(scores, out_dir, str(source), strategy, metric, k, protect,
                                                    score_kwargs.get("seed", 0), overwrite, inputs))  # rank 0 writes


def report_scores(path: str | Path, out_dir: str | Path, *, strategy: str = "contiguous", metric: str | None = None,
                  n_layers: int | None = None, protect=None, overwrite: bool = False) -> Path:
    """The report of a scores file (``prune score -o FILE.json``), as :func:`report_model` writes it
    after scoring: nothing is scored again."""
    from prune.export.saving import check_output_dir
    from prune.io.guard import input_paths

    inputs = input_paths(path, label="the scores file")
    check_output_dir(out_dir, overwrite, inputs, flag="--output", written=("report.json",))
    scores = ScoreResult.load_json(path)  # one line when it is not a scores file
    metrics = [m for m, present in (("bi", True), ("angular", scores.angular is not None),
                                    ("cka", scores.cka is not None)) if present]
    k = _report_selection(scores.n_layers, metrics, strategy, metric, n_layers, protect, "score again with",
                          held=f"{path} holds")
    meta = scores.metadata if isinstance(scores.metadata, dict) else {}
    source = (meta.get("source") or {}).get("path") if isinstance(meta.get("source"), dict) else None
    seed = meta.get("seed") if isinstance(meta.get("seed"), int) else 0  # the scoring's: random marks what it would
    return _write_model_report(scores, out_dir, source or str(path), strategy, metric, k, protect, seed, overwrite,
                               inputs)


def _report_selection(blocks: int, metrics: list[str], strategy: str, metric: str | None, n_layers: int | None, protect,
                      fix: str, held: str = "--metrics is") -> int:
    """How many blocks the report marks (default: a quarter), checked: a score-only ``strategy`` whose scores are
    among ``metrics`` (``held``: where they come from, for the message), a count and run ``protect`` allows
    (``select.protect``'s default)."""
    from prune.pipeline.inputs import check_selection_possible
    from prune.pipeline.recipe import needed_score

    if strategy not in SCORE_ONLY:
        raise PruneError(f"a model report marks blocks with a score-only strategy ({', '.join(SCORE_ONLY)}); for "
                         f"{strategy} run a recipe and report its output folder")
    check_metric_read(strategy, metric)
    need, why = needed_score(strategy, metric or DEFAULT_METRIC)
    if need is not None and need not in metrics:
        raise PruneError(f"{why.replace('select.', '--')} reads the {need} scores, but {held} "
                         f"{' '.join(metrics)} ({fix} {need})")
    k = max(1, round(blocks / 4)) if n_layers is None else n_layers
    protect = default(SelectConfig, "protect") if protect is None else protect
    try:  # an impossible count, or a run no contiguous/tail selection can place
        protected = resolve_protect(protect, blocks)
        count = resolve_count(blocks, k, None, protected)
        check_selection_possible(blocks, count, strategy, protected)
    except PruneError as exc:
        raise PruneError(str(exc).replace("select.n_layers", "--n-layers").replace("select.protect", "--protect")) from None
    return k


def _write_model_report(scores: ScoreResult, out_dir, source: str, strategy: str, metric: str | None, k: int, protect, seed: int,
                        overwrite: bool, inputs) -> Path:
    protect = default(SelectConfig, "protect") if protect is None else protect
    sel = select(scores, k, strategy=strategy, metric=metric, protect=protect, seed=seed)
    return write_report(out_dir, scores, selection=sel, k=k, source=source, hypothetical=True,
                        title=f"Redundancy report: {Path(source).name}", overwrite=overwrite, inputs=inputs)
