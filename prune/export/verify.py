"""Check a pruned checkpoint's weights against its original's (``prune check OUT --original MODEL``).

``pruning.json`` says which of the original's blocks a checkpoint keeps (``kept_original``) and whether a
healing trained them; :mod:`prune.export.check` checks that record against the checkpoint's shapes and
counts only. Here both models are loaded (plain ``from_pretrained``, or a GGUF file dequantized) and each
kept block ``i`` is compared with the original's block ``kept_original[i]``, tensor by tensor:

* **unchanged**: equal to it, in the checkpoint's dtype (a cut that moved no weight);
* **trained**: not equal, but nearer to it than to any other block of the original, by the relative
  difference ``d(i, j) = ||W_i - W_j|| / ||W_j||`` over the block's tensors, and a healing is recorded
  (or the block is the replacement ``heal.method: replace`` trained);
* a **failure** otherwise: the block is another block of the original (the record names the wrong
  blocks), or changed with no healing recorded, or has other tensors or shapes.

The tensors outside the stack (embeddings, final norm, LM head) are compared by name the same way. The
nearest block is found on a fixed sample of each tensor's values (``SAMPLE`` per tensor), the equality on
every value. Both models are held in memory at once (the checkpoint in its dtype, the original in its own).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prune.core.errors import PruneError
from prune.core.records import PruningRecord

#: values per tensor on which the nearest original block is looked for (every value is compared for equality)
SAMPLE = 4096
#: a relative difference above which a block is not the original's, trained or not (healing moves weights by
#: 1e-4 to 1e-1 of their norm; two unrelated blocks of one model differ by about 1.4, sqrt(2))
FAR = 0.5


@dataclass
class BlockMatch:
    """Block ``position`` of the checkpoint against the original's block ``recorded`` (``kept_original``)."""

    position: int
    recorded: int
    equal: bool
    change: float  # d(position, recorded): relative Frobenius difference over the block's tensors
    nearest: int  # the original block of smallest difference (on the sampled values)
    nearest_change: float


def block_tensors(model) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """``([block i's tensors by name inside the block], tensors outside the stack by name)``."""
    from prune.model.arch import block_index
    from prune.model.loading import decoder_layers, decoder_layers_path

    path = decoder_layers_path(model)
    blocks: list[dict[str, torch.Tensor]] = [{} for _ in decoder_layers(model)]
    rest: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if found := block_index(name, path):
            blocks[found[0]][found[1].removeprefix(".")] = tensor
        else:
            rest[name] = tensor
    return blocks, rest


def _sample(tensor: torch.Tensor, seed: int) -> torch.Tensor:
    """The same ``SAMPLE`` positions of every tensor of this name and shape, as float64."""
    flat = tensor.reshape(-1)
    if flat.numel() <= SAMPLE:
        return flat.double()
    g = torch.Generator().manual_seed(seed)
    return flat[torch.randint(flat.numel(), (SAMPLE,), generator=g)].double()


def relative_change(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], sampled: bool = False) -> float:
    """``||a - b|| / ||b||`` over the tensors of ``a`` (``b`` holds them, of the same shapes), in float64."""
    num = den = 0.0
    for k, (name, ta) in enumerate(sorted(a.items())):  # a's tensors: b may hold more (one a bridge refitted)
        tb = b[name]
        x, y = (_sample(ta, k), _sample(tb, k)) if sampled else (ta.double(), tb.double())
        num += float(((x - y) ** 2).sum())
        den += float((y ** 2).sum())
    return (num / den) ** 0.5 if den else (0.0 if num == 0 else float("inf"))


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` (the checkpoint's) holds ``b``'s values in ``a``'s dtype: every element within two roundings of it
    (``2 eps |b|``: a cast on save, GPT-2's query columns rescaled in one step or several); exact for integers."""
    if not a.dtype.is_floating_point:
        return torch.equal(a, b.to(a.dtype))
    info = torch.finfo(a.dtype)
    x, y = a.double(), b.double()
    return bool(((x - y).abs() <= 2 * info.eps * y.abs() + info.tiny).all())


def same_block(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(same_values(t, b[name]) for name, t in a.items())


def original_at(block: dict[str, torch.Tensor], config, old: int, new: int) -> dict[str, torch.Tensor]:
    """The original's block ``old`` as the cut leaves it at position ``new``: GPT-2's query columns rescaled
    (:func:`prune.model.surgery.query_rescale`), every other block as it is."""
    from prune.model.surgery import query_rescale

    factor = query_rescale(config, old, new)
    if factor == 1.0 or "attn.c_attn.weight" not in block:
        return block
    width = block["attn.c_attn.weight"].shape[-1] // 3
    out = dict(block)
    weight = block["attn.c_attn.weight"].clone()
    weight[..., :width] *= factor
    out["attn.c_attn.weight"] = weight
    if "attn.c_attn.bias" in block:
        bias = block["attn.c_attn.bias"].clone()
        bias[:width] *= factor
        out["attn.c_attn.bias"] = bias
    return out


def _layout_problem(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> str | None:
    if a.keys() != b.keys():
        odd = sorted(a.keys() ^ b.keys())
        return f"{what} has other tensors than the original's ({', '.join(odd[:3])}): not the same architecture"
    shapes = [n for n in a if a[n].shape != b[n].shape]
    if shapes:
        return (f"{what}: {shapes[0]} is {tuple(a[shapes[0]].shape)} here, {tuple(b[shapes[0]].shape)} in the original: "
                "not the same architecture")
    return None


def match_blocks(pruned_blocks, original_blocks, kept: list[int], config, refitted: dict[int, list[str]]) -> list[BlockMatch]:
    """Each of the checkpoint's blocks against the original's block ``kept`` names, and the nearest of them all
    of the same layout (``config``: the original's, for a block whose weights a cut rewrites where it moves;
    ``refitted``: by original block, the tensors a recorded bridge refitted, compared apart)."""
    out = []
    for i, (block, j) in enumerate(zip(pruned_blocks, kept)):
        block = {n: t for n, t in block.items() if n not in refitted.get(j, ())}
        expected = original_at(original_blocks[j], config, j, i)
        equal = same_block(block, expected)
        change = relative_change(block, expected)
        nearest, nearest_change = j, change
        if not equal:  # which block is it? (a record naming the wrong blocks; sampled: one pass over every block)
            near = {k: relative_change(block, original_at(ob, config, k, i), sampled=True)
                    for k, ob in enumerate(original_blocks)
                    if ob.keys() >= block.keys() and all(ob[n].shape == t.shape for n, t in block.items())}
            k = min(near, key=near.get)
            if near[k] < near[j]:  # ties go to the recorded block (of its own layout: always among them)
                nearest_change, nearest = near[k], k
        out.append(BlockMatch(i, j, equal, change, nearest, nearest_change))
    return out


#: a block's attention by name: its output projection is not where a bridge folds (GPT-2's attn.c_proj)
ATTENTION_NAMES = ("attn", "self_attn", "attention", "self_attention", "cross_attn")


def bridged_tensors(record: PruningRecord, blocks: dict[int, dict[str, torch.Tensor]]) -> dict[int, list[str]]:
    """By original block index: the tensors of the MLP output projection a recorded bridge refitted (least squares:
    far from the original's values by design). Every healing of the lineage is read, the ones it healed again too."""
    from prune.model.arch import OUTPUT_PROJECTIONS

    named: set[int] = set()
    for step in record.chain():
        healing = step.healing
        while isinstance(healing, dict):
            bridge = healing.get("bridge")
            for cut in (bridge.get("cuts") or []) if isinstance(bridge, dict) else []:
                if isinstance(cut, dict) and cut.get("kept", True) and isinstance(cut.get("block"), int):
                    named.add(cut["block"])
            healing = healing.get("previous")
    return {j: [n for n in blocks[j] if any(p in OUTPUT_PROJECTIONS for p in n.split("."))
                and not any(p in ATTENTION_NAMES for p in n.split("."))] for j in named if j in blocks}


def healed(record: PruningRecord) -> bool:
    """Whether a step of the lineage trained (or refitted) weights."""
    return any(step.healing for step in record.chain())


def verify_weights(record: PruningRecord, pruned, original) -> list[tuple[str, str]]:
    """Findings ``(level, message)`` of the checkpoint model ``pruned`` (read with ``record``, its pruning.json)
    against the loaded ``original`` (see the module docstring); ``level`` is ``"ok"``, ``"warn"`` or ``"fail"``."""
    kept = record.kept_original or record.kept
    p_blocks, p_rest = block_tensors(pruned)
    o_blocks, o_rest = block_tensors(original)
    said = record.original.n_layers if record.original else record.chain()[0].layers_before
    if said is not None and len(o_blocks) != said:
        return [("fail", f"the model given has {len(o_blocks)} blocks, but pruning.json says the original had {said}: "
                         "not the model this checkpoint was pruned from (give that one)")]
    if len(kept) != len(p_blocks):
        return [("fail", f"pruning.json names {len(kept)} kept blocks, but the checkpoint holds {len(p_blocks)}")]
    if bad := [j for j in kept if not 0 <= j < len(o_blocks)]:
        return [("fail", f"pruning.json keeps block {bad[0]}, but the original has {len(o_blocks)} blocks (0-{len(o_blocks) - 1})")]
    for i, j in enumerate(kept):
        if problem := _layout_problem(p_blocks[i], o_blocks[j], f"block {i}"):
            return [("fail", problem)]
    rest_names = {n: t for n, t in p_rest.items() if n in o_rest}
    if problem := _layout_problem(rest_names, {n: o_rest[n] for n in rest_names}, "outside the blocks"):
        return [("fail", problem)]
    if missing := sorted(p_rest.keys() - o_rest.keys()):
        return [("fail", f"{missing[0]} is not a tensor of the original: not the same architecture")]
    said_type = record.original.model_type if record.original else None
    if said_type and said_type != original.config.model_type:
        return [("fail", f"the model given is {original.config.model_type}, but pruning.json says the original was "
                         f"{said_type}: not the model this checkpoint was pruned from (give that one)")]
    trained = healed(record)
    replacement = record.kept_replacement()
    replaced_at = kept.index(replacement[0]) if replacement and replacement[0] in kept else None
    findings: list[tuple[str, str]] = []
    refitted = bridged_tensors(record, dict(enumerate(o_blocks)))
    matches = match_blocks(p_blocks, o_blocks, kept, original.config, refitted)
    if all(m.nearest_change > FAR for m in matches):
        nearest = min(m.nearest_change for m in matches)
        return [("fail", f"no block of the checkpoint is near a block of the model given (the nearest pair differs by "
                         f"{nearest:.3g}): not the model this checkpoint was pruned from (give that one)")]
    for m in matches:
        if m.equal:
            continue
        if m.position == replaced_at:  # a block trained in place of a run: it started from one of them, or their mean
            continue
        if m.nearest_change > FAR:
            findings.append(("fail", f"block {m.position} is far from every block of the original (nearest: block "
                                     f"{m.nearest}, relative difference {m.nearest_change:.3g}): not a block of it, "
                                     "nor one a healing trained from it"))
        elif m.nearest != m.recorded:
            findings.append(("fail", f"block {m.position} of the checkpoint is the original's block {m.nearest} (relative "
                                     f"difference {m.nearest_change:.3g}), not block {m.recorded} as pruning.json records "
                                     f"({m.change:.3g} from it): the record names other blocks than the weights hold"))
        elif not trained:
            findings.append(("fail", f"block {m.position} differs from the original's block {m.recorded} (relative "
                                     f"difference {m.change:.3g}), but pruning.json records no healing that trained it"))
    unique, seen = {}, set()
    for name, tensor in sorted(p_rest.items()):  # a tied head and embedding: one tensor, counted once
        if (key := tensor.untyped_storage().data_ptr()) not in seen:
            seen.add(key)
            unique[name] = tensor
    p_rest = unique
    changed_rest = sorted(n for n, t in p_rest.items() if not same_values(t, o_rest[n]))
    if changed_rest and not trained:
        change = relative_change({n: p_rest[n] for n in changed_rest}, {n: o_rest[n] for n in changed_rest})
        findings.append(("fail", f"{changed_rest[0]}{f' and {len(changed_rest) - 1} more' if len(changed_rest) > 1 else ''}"
                                 f" differ{'s' if len(changed_rest) == 1 else ''} from the original's (relative difference "
                                 f"{change:.3g}), but pruning.json "
                                 "records no healing that trained them"))
    if any(level == "fail" for level, _ in findings):
        return findings
    from prune.export.check import index_ranges

    checked = [m for m in matches if m.position != replaced_at]
    equal = sum(m.equal for m in checked)
    moved = [m for m in checked if not m.equal]
    line = (f"each of the {len(checked)} blocks{' besides the replacement' if replaced_at is not None else ''} is the "
            f"original's block pruning.json names ({index_ranges([m.recorded for m in checked])})")
    if moved:
        worst = max(moved, key=lambda m: m.change)
        line += (f": {equal} unchanged, {len(moved)} trained by the recorded healing (relative change up to "
                 f"{worst.change:.3g}, block {worst.position}), each nearest the block recorded")
    else:
        line += ", unchanged"
    if bridged := [i for i, j in enumerate(kept) if refitted.get(j)]:
        line += (f"; the MLP output projection of block{'s' if len(bridged) > 1 else ''} "
                 f"{', '.join(map(str, bridged))} refitted by the recorded bridge (not compared)")
    if replaced_at is not None:
        line += f"; block {replaced_at} is the trained replacement of blocks {replacement[1]}"
    findings.append(("ok", line))
    outside = "unchanged" if not changed_rest else f"{len(changed_rest)} trained by the recorded healing"
    findings.append(("ok", f"tensors outside the blocks (embeddings, final norm, head): {len(p_rest)}, {outside}"))
    return findings


def check_original(report, original: str, *, trust_remote_code: bool = False) -> None:
    """Add the ``original`` findings of :func:`verify_weights` to a :class:`prune.export.check.CheckReport` of a
    folder holding ``pruning.json``: both models loaded (``original``: a folder, Hub id or GGUF file)."""
    from prune.core.records import RECORD_FILE, read_record
    from prune.model.loading import load_model

    folder = report.folder
    if not (folder / RECORD_FILE).is_file():
        raise PruneError(f"{folder} has no {RECORD_FILE}: --original checks the blocks it records (give a folder "
                         "written by prune run, remove, heal or save)")
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise PruneError(f"{folder} holds a LoRA adapter, not a model: check the pruned run it adapts with --original")
    record = read_record(folder / RECORD_FILE)
    from prune.model.loading import check_checkpoint_files, resolve_source

    check_checkpoint_files(resolve_source(original, None, None))  # a wrong path: one line, before any loading
    pruned, _, _ = load_model(folder, dtype="auto", trust_remote_code=trust_remote_code, with_tokenizer=False)
    model, _, _ = load_model(original, dtype="auto", trust_remote_code=trust_remote_code, with_tokenizer=False)
    for level, message in verify_weights(record, pruned, model):
        report.add("original", level, message)
