"""The two ways a run touches the model, behind one interface the orchestrator drives.

* :class:`InMemory`: the model is loaded whole (or dispatched by Accelerate); blocks are removed
  in place, healing trains it, and :func:`prune.export.saving.save` writes it.
* :class:`Sequential`: nothing but a meta skeleton is built; scoring reads one block's weights
  at a time (:func:`prune.measure.sequential.score_sequential`) and the pruned checkpoint is
  copied from the source shards (:func:`prune.export.outofcore.prune_checkpoint`).

Every engine has the same calls: ``score(windows, kept=None)``, ``choose(windows, scores)``,
``evaluate(cfg, label)``, ``parameters(kept=None)``, ``remove(selection) -> (kept, healing)``
and ``save(out_dir, record, files, overwrite)``.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from prune.choose.registry import choose
from prune.choose.rules import Selection
from prune.core.config import EvaluateConfig
from prune.core.console import say
from prune.core.errors import PruneError
from prune.core.faults import fault_point
from prune.core.records import PruningRecord
from prune.measure.evaluation import evaluate_loaded, fidelity_reference
from prune.measure.scoring import ScoreResult, score
from prune.model.loading import count_parameters, load_model
from prune.pipeline.execution import ExecutionPlan
from prune.pipeline.recipe import Recipe


def score_options(recipe: Recipe, quiet: bool) -> dict:
    """The keyword arguments of :func:`prune.score` / :func:`prune.score_sequential` a recipe sets."""
    c, s = recipe.calibration, recipe.score
    return dict(batch_size=c.batch_size, positions=s.positions, metrics=tuple(s.metrics), cka_windows=s.cka_windows,
                beta=s.beta, tau=s.tau, progress=not quiet)


class InMemory:
    """The whole model in memory (or placed by Accelerate's ``device_map``)."""

    scoring_note = ""

    def __init__(self, recipe: Recipe, facts: dict, quiet: bool = False):
        self.recipe, self.quiet, self.source = recipe, quiet, facts["source"]
        m = recipe.model
        say(f"loading {facts['source'].display} ({facts['model_type']}, {facts['n_layers']} blocks)", quiet)
        self.model, self.tokenizer, _ = load_model(
            m.source, gguf_file=m.gguf_file, dtype=m.dtype, device_map=m.device_map, max_memory=m.max_memory,
            offload_folder=m.offload_folder, revision=m.revision, trust_remote_code=m.trust_remote_code)
        fault_point("loaded")
        if recipe.heal is not None:  # before scoring and evaluating: healing cannot change offloaded weights
            from prune.heal.methods import check_in_memory

            check_in_memory(self.model)
        self.heal_plan = None

    def score(self, windows, kept: list[int] | None = None) -> ScoreResult:
        """Scores of the model as it is now (after :meth:`remove`, the pruned model)."""
        return score(self.model, windows, **score_options(self.recipe, self.quiet))

    def choose(self, windows, scores: ScoreResult) -> Selection:
        r = self.recipe
        return choose(r.select, scores, model=self.model, tokenizer=self.tokenizer, windows=windows,
                      calibration=r.calibration, score=r.score, evaluate=r.evaluate, quiet=self.quiet)

    def evaluate(self, cfg: EvaluateConfig | None, label: str, name: str | None = None, folder: str = "model",
                 reference=None, is_reference: bool = False) -> dict:
        """Perplexity, fidelity to ``reference`` and lm-eval tasks of the model as it is now
        (``is_reference``: it is the model ``reference`` was built from, the original)."""
        return evaluate_loaded(self.model, self.tokenizer, cfg, quiet=self.quiet, label=label, reference=reference,
                               is_reference=is_reference, lm_eval_name=name, lm_eval_folder=folder)

    def fidelity_reference(self, cfg: EvaluateConfig | None):
        """The original's next-token distributions for ``evaluate.fidelity`` (``None`` without it)."""
        return fidelity_reference(self.model, self.tokenizer, cfg, quiet=self.quiet)

    def parameters(self, kept: list[int] | None = None) -> int:
        return count_parameters(self.model)

    def saved_dtype(self) -> str | None:
        """None: the export reads it from the model in memory (after any healing), as it saves it."""
        return None

    def remove(self, selection: Selection, before_healing=None) -> tuple[list[int], dict | None]:
        """Remove the chosen blocks in place; with a ``heal`` section, prepare healing before the
        surgery (a replacement block learns from the full model's states) and train after it.
        ``before_healing()`` runs between the surgery and the healing, on the pruned model as the
        selection left it (not for ``replace``, whose surgery keeps one of the removed blocks)."""
        from prune.model.surgery import remove_layers

        heal_cfg = self.recipe.heal
        if heal_cfg is None:
            return remove_layers(self.model, selection.removed), None
        from prune.heal import methods as H

        source_id = None
        if heal_cfg.objective == "distill":  # a teacher cache is stamped with the original it was computed from
            from prune.export.public import public_source
            from prune.heal.teacher import source_identity

            source_id = source_identity(public_source(self.source).model_dump())
        plan = H.prepare(self.model, self.tokenizer, selection.removed, heal_cfg, quiet=self.quiet,
                         out_dir=self.recipe.output.dir, source_name=self.recipe.model.source, source_id=source_id)
        kept = remove_layers(self.model, plan.remove)
        if before_healing is not None and heal_cfg.method != "replace":
            before_healing()
        return kept, H.heal(self.model, heal_cfg, plan, quiet=self.quiet)

    def save(self, out_dir, record: PruningRecord, files: dict[str, str], overwrite: bool, inputs=()) -> Path:
        from prune.export.saving import save

        return save(self.model, self.tokenizer, out_dir, pruning=record, files=files, overwrite=overwrite,
                    inputs=inputs, dtype=self.recipe.output.dtype)


class Sequential:
    """One block in memory at a time, read from the safetensors shards of ``plan.folder``."""

    scoring_note = " one at a time"

    def __init__(self, recipe: Recipe, plan: ExecutionPlan, quiet: bool = False):
        check_sequential_recipe(recipe, plan)
        self.recipe, self.plan, self.quiet = recipe, plan, quiet
        self.folder = Path(plan.folder)
        self._removed: list[int] = []

    def score(self, windows, kept: list[int] | None = None) -> ScoreResult:
        """Scores of the source model, or of it pruned to the blocks ``kept`` (nothing is written)."""
        from prune.measure.sequential import score_sequential

        m = self.recipe.model
        return score_sequential(self.folder, windows, blocks=kept, dtype=m.dtype, device=self.plan.device,
                                trust_remote_code=m.trust_remote_code, **score_options(self.recipe, self.quiet))

    @cached_property
    def config(self):
        """The source model's config (read once: selection and removal both ask it)."""
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.folder, trust_remote_code=self.recipe.model.trust_remote_code)

    def choose(self, windows, scores: ScoreResult) -> Selection:
        return choose(self.recipe.select, scores, quiet=self.quiet, config=self.config)  # a hybrid stack keeps attention

    def evaluate(self, cfg: EvaluateConfig | None, label: str, name: str | None = None, folder: str = "model",
                 reference=None, is_reference: bool = False) -> dict:
        return {}  # an evaluate section is refused for sequential runs (check_sequential_recipe)

    def fidelity_reference(self, cfg: EvaluateConfig | None):
        return None

    def parameters(self, kept: list[int] | None = None) -> int:
        """Parameter count from the checkpoint's headers (of the blocks ``kept`` only, when given)."""
        from prune.model.skeleton import Skeleton

        sk = Skeleton(self.folder, trust_remote_code=self.recipe.model.trust_remote_code)  # meta: counts only
        numel = {k: sk.checkpoint.entries[k].numel() for k in sk.counted_keys()}
        keep = set(kept) if kept is not None else None
        return sum(n for k, n in numel.items() if keep is None or sk.block_of.get(k) is None or sk.block_of[k] in keep)

    def saved_dtype(self) -> str | None:
        """The dtype the pruned shards will be written in (for the record and card, rendered before they are)."""
        from prune.export.outofcore import planned_dtype
        from prune.export.saving import out_of_core_dtype

        return planned_dtype(self.folder, self._removed, out_of_core_dtype(self.recipe), self.recipe.model.dtype,
                             self.recipe.model.trust_remote_code)

    def remove(self, selection: Selection, before_healing=None) -> tuple[list[int], dict | None]:
        from prune.model.loading import check_cut_keeps_attention

        check_cut_keeps_attention(self.config, list(selection.kept))  # now, not once the shards are read
        self._removed = list(selection.removed)  # no healing out of core (check_sequential_recipe)
        return list(selection.kept), None  # the blocks are left out when the shards are copied (save)

    def save(self, out_dir, record: PruningRecord, files: dict[str, str], overwrite: bool, inputs=()) -> Path:
        from prune.export.outofcore import prune_checkpoint

        from prune.export.saving import out_of_core_dtype

        out = prune_checkpoint(self.folder, self._removed, out_dir, pruning=record, files=files, overwrite=overwrite,
                               trust_remote_code=self.recipe.model.trust_remote_code, inputs=inputs,
                               dtype=out_of_core_dtype(self.recipe), through=self.recipe.model.dtype,
                               new_step=False,  # the record has its lineage
                               progress=not self.quiet)
        say("(written from the source shards, out of core)", self.quiet)
        return out


def whole_model_parts(recipe: Recipe) -> list[str]:
    """The parts of the recipe that need the whole model in memory (``evaluate``, ``heal``, ``strategy``)."""
    from prune.choose.registry import STRATEGIES

    ev = recipe.evaluate
    return [part for part, needs in (
        ("evaluate", ev is not None and (ev.perplexity is not None or ev.fidelity is not None or bool(ev.tasks))),
        ("heal", recipe.heal is not None),
        ("strategy", STRATEGIES[recipe.select.strategy].needs_model)) if needs]


def whole_model_reason(recipe: Recipe) -> str | None:
    """Why the recipe needs the whole model in memory, in words (None: it can run one block at a time)."""
    parts = whole_model_parts(recipe)
    return {"evaluate": "its evaluate section runs the whole model", "heal": "healing trains the model in memory",
            "strategy": f"select.strategy {recipe.select.strategy} runs the whole model"}[parts[0]] if parts else None


def check_sequential_recipe(recipe: Recipe, plan: ExecutionPlan) -> None:
    """Refuse, before any work, the parts of a recipe that need the whole model in memory."""
    from prune.choose.registry import STRATEGIES

    why = f"score.execution chose sequential ({plan.reason})"
    fix = ("or set score.execution: in_memory (with model.device_map: auto and model.offload_folder to let "
           "Accelerate offload weights)")
    parts = whole_model_parts(recipe)
    if "evaluate" in parts:
        raise PruneError(f"{why}: an out-of-core run cannot evaluate the model; remove the evaluate section (evaluate "
                         f"the output folder afterwards with `prune eval ... --device-map auto`) {fix}")
    if "heal" in parts:
        raise PruneError(f"{why}: healing trains the model in memory; remove the heal section {fix}")
    if "strategy" in parts:
        score_only = ", ".join(n for n, s in STRATEGIES.items() if not s.needs_model)
        raise PruneError(f"{why}: select.strategy={recipe.select.strategy!r} runs the model; use {score_only} {fix}")


def make_engine(recipe: Recipe, plan: ExecutionPlan, facts: dict, quiet: bool = False):
    """The engine the execution plan chose."""
    if plan.mode == "sequential":
        return Sequential(recipe, plan, quiet)
    return InMemory(recipe, facts, quiet)

