"""Loading models and finding their decoder blocks: every architecture difference lives here.

A model source is one of
  * a Hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``),
  * a local folder holding ``config.json`` and weights,
  * a GGUF file (``path/to/model.Q4_1.gguf``), or a folder plus ``gguf_file=``.

Decoder blocks are found from the model's own metadata: the ``nn.ModuleList`` whose
children are all of a class named in ``model._no_split_modules`` (the classes Accelerate
must keep whole on one device), checked against ``config.model_type``. No repo names.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prune.core.errors import PruneError, first_line, UnsupportedModelError
from prune.io.gguf import lend_kept_reader
from prune.io.safetensors import INDEX_NAME, file_tensors, read_index
from prune.core.config import DTYPES, resolve_dtype  # noqa: F401  (resolve_dtype: part of this module's API)
from prune.io.source import ModelSource, resolve_source  # noqa: F401

#: ``config.model_type`` -> architecture name, for every architecture tested end to end.
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma2": "Gemma2",
    "gemma3_text": "Gemma3 (text)",
    "phi3": "Phi3",
    "gpt2": "GPT-2",
    "gpt_neox": "GPT-NeoX",
    "mixtral": "Mixtral (MoE)",
    "qwen3_moe": "Qwen3-MoE",
    "gemma": "Gemma",
    "olmo2": "OLMo-2",
    "granite": "Granite",
    "phi": "Phi (1.5, 2)",
    "starcoder2": "StarCoder2",
    "cohere": "Cohere (Command-R)",
    "qwen2_moe": "Qwen2-MoE",
    "smollm3": "SmolLM3",
    "deepseek_v3": "DeepSeek-V3",
    "gpt_oss": "gpt-oss",
    "olmo3": "OLMo-3",
    "olmoe": "OLMoE",
    "granitemoe": "Granite-MoE",
    "glm4": "GLM-4",
    "ernie4_5": "ERNIE-4.5",
    "seed_oss": "Seed-OSS",
    "helium": "Helium",
    "arcee": "Arcee (AFM)",
    "hunyuan_v1_dense": "Hunyuan (dense)",
    "qwen3_next": "Qwen3-Next",
    "exaone4": "EXAONE-4",
    "ministral": "Ministral",
    "olmo": "OLMo",
    "stablelm": "StableLM",
    "nemotron": "Nemotron",
    "glm": "GLM",
    "cohere2": "Cohere2 (Command-R7B, Command-A)",
    "vaultgemma": "VaultGemma",
    "bitnet": "BitNet",
    "nanochat": "nanochat",
    "doge": "Doge",
    "granite_swa": "Granite-SWA",
    "lfm2": "LFM2 (hybrid convolution)",
    "qwen3_5_text": "Qwen3.5 (text)",
    "llama4_text": "Llama 4 (text)",
    "phimoe": "PhiMoE",
    "jetmoe": "JetMoE",
    "hunyuan_v1_moe": "Hunyuan-MoE",
    "deepseek_v2": "DeepSeek-V2",
    "glm4_moe": "GLM-4-MoE (GLM-4.5)",
    "ernie4_5_moe": "ERNIE-4.5-MoE",
    "gptj": "GPT-J",
    "gpt_bigcode": "GPTBigCode (StarCoder, SantaCoder)",
    "codegen": "CodeGen",
    "bloom": "BLOOM",
    "falcon": "Falcon",
    "opt": "OPT",
    "mpt": "MPT",
    "xglm": "XGLM",
    "persimmon": "Persimmon",
    "flex_olmo": "FlexOlmo (MoE)",
    "minimax_m2": "MiniMax-M2 (MoE)",
    "glm4_moe_lite": "GLM-4-MoE-Lite",
    "exaone_moe": "EXAONE-MoE",
    "solar_open": "Solar-Open (MoE)",
    "afmoe": "AFMoE",
}

#: model types whose decoder blocks return a tuple (the hidden state first, as transformers' older models do):
#: a stand-in for a block returns the same shape (prune.measure.sequential)
TUPLE_BLOCKS = frozenset({"bloom", "falcon", "mpt"})

#: transformers' ``use_kernels`` for every load (its default since 5: on a GPU, layers swapped for
#: kernels fetched from the Hub, code run without being asked for, and offline the load fails)
USE_HUB_KERNELS = False


def rank_device_map(device_map):
    """Under a launcher with GPUs, ``None`` or ``"auto"`` means this rank's own GPU (data parallel:
    every rank holds the whole model); an explicit map or ``"cpu"`` is kept. Unchanged otherwise."""
    from prune.core import dist

    if dist.launched() and torch.cuda.is_available() and device_map in (None, "auto"):
        return {"": f"cuda:{dist.world().local_rank}"}
    return device_map


def load_model(
    source: str | os.PathLike,
    *,
    gguf_file: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    with_tokenizer: bool = True,
):
    """Load ``(model, tokenizer, source)``; the model is in eval mode and its decoder stack is checked
    (``with_tokenizer=False``: the weights alone, the tokenizer None).

    ``device_map`` and ``max_memory`` go straight to Accelerate through
    ``from_pretrained`` (``"auto"``, ``"cpu"``, or an explicit ``{module: device}`` map,
    ``"disk"`` entries need ``offload_folder``). GGUF files are dequantized to ``dtype``
    (float32 when ``"auto"``). ``trust_remote_code`` stays off unless asked for, and so do
    transformers' Hub kernels (``USE_HUB_KERNELS``).
    """
    from transformers import AutoModelForCausalLM

    src = resolve_source(source, gguf_file, revision)
    check_checkpoint_files(src)
    torch_dtype = resolve_dtype(dtype)
    if src.gguf_file and torch_dtype == "auto":  # a GGUF file, local or in a Hub repo
        torch_dtype = torch.float32
    check_device_map(device_map, offload_folder)
    device_map = rank_device_map(device_map)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code,
                              "use_kernels": USE_HUB_KERNELS}
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    if src.revision:
        kwargs["revision"] = src.revision
    if device_map is not None:
        kwargs["device_map"] = device_map
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if offload_folder is not None:
        kwargs["offload_folder"] = offload_folder
    if trust_remote_code:
        from prune.core.console import announce_remote_code

        announce_remote_code(src.display)
    try:
        config = load_config(src, trust_remote_code)
        check_supported(config)
        check_blocks_stored(src, config)  # before anything is built
        # the config just read, not read again (a GGUF file's metadata takes seconds to parse)
        with lend_kept_reader(bool(src.gguf_file)):
            model, info = AutoModelForCausalLM.from_pretrained(src.path, config=config, output_loading_info=True,
                                                               **kwargs)
        missing = sorted(info.get("missing_keys") or ())
        if missing:  # transformers filled these with random values: never score or save those
            raise PruneError(f"{src.display}: the weights lack {len(missing)} tensors the config needs (e.g. "
                             f"{missing[0]}); they would be random (re-download or re-save the model, or fix config.json)")
        tokenizer = load_tokenizer(src, trust_remote_code) if with_tokenizer else None
    except PruneError:
        raise
    except OSError as exc:  # missing files, offline hub, corrupt weights
        raise PruneError(f"could not load {src.display}: {first_line(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - one clear line for anything transformers raises
        raise PruneError(f"could not load {src.display}: {type(exc).__name__}: {first_line(exc)}") from exc
    if src.gguf_file:  # a Hub repo's GGUF file too: save_pretrained refused it at the end of a run
        _forget_gguf_quantization(model)
    model.eval()
    decoder_layers(model)  # fail now, not after calibration, if no decoder stack is found
    return model, tokenizer, src


#: a saved tokenizer holds at least one of these (``prune check`` looks for them too)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(src: ModelSource, trust_remote_code: bool = False):
    """The tokenizer that belongs to ``src`` (from the GGUF file itself for GGUF sources, read
    once per process: :func:`_gguf_once`)."""
    from transformers import AutoTokenizer

    if src.kind == "folder" and not src.gguf_file and not any((Path(src.path) / f).is_file() for f in TOKENIZER_FILES):
        raise PruneError(f"{src.display} has no tokenizer ({', '.join(TOKENIZER_FILES)}): copy the tokenizer files of "
                         "the model it came from into it (tokenizer.save_pretrained(folder))")

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    if src.revision:
        kwargs["revision"] = src.revision
    def read():
        if not src.gguf_file:
            return AutoTokenizer.from_pretrained(src.path, **kwargs)
        # the GGUF file alone: beside a model folder's (or a Hub repo's) tokenizer files transformers read those
        import tempfile

        if src.kind == "gguf":
            gguf = Path(src.path) / src.gguf_file
        else:  # a Hub repo's file: the copy in the Hub cache, which loading the model downloads anyway
            from huggingface_hub import hf_hub_download

            gguf = Path(hf_hub_download(src.path, src.gguf_file, revision=src.revision))
        with tempfile.TemporaryDirectory(prefix="prune-gguf-") as alone, lend_kept_reader():
            (Path(alone) / gguf.name).symlink_to(gguf.resolve())
            tokenizer = AutoTokenizer.from_pretrained(alone, gguf_file=gguf.name, trust_remote_code=trust_remote_code)
        tokenizer.name_or_path = src.display  # not the temporary folder, gone now
        return tokenizer

    try:
        return _gguf_once("tokenizer", src, trust_remote_code, read)
    except PruneError:
        raise
    except Exception as exc:  # noqa: BLE001
        from prune.io.source import TOKENIZER_JSON, broken_json

        why = broken_json(src, TOKENIZER_JSON) or f"{type(exc).__name__}: {first_line(exc)}"
        raise PruneError(f"could not load the tokenizer of {src.display}: {why}") from exc


def _gguf_once(what: str, src: ModelSource, trust_remote_code: bool, read):
    """``read()``, kept per process for a GGUF source (whose config and tokenizer take seconds to
    parse out of the file, asked for by the pre-flight and again by the load;
    :func:`prune.io.gguf.kept_per_file`): a deep copy each time, so callers may change theirs."""
    if src.kind != "gguf":
        return read()
    import copy

    from prune.io.gguf import kept_per_file

    return copy.deepcopy(kept_per_file(f"{what} trust_remote_code={trust_remote_code}",
                                       Path(src.path) / src.gguf_file, read))


def _forget_gguf_quantization(model) -> None:
    """A GGUF checkpoint is fully dequantized on load; drop the GGUF 'quantizer' so the model
    is a plain one (``save_pretrained`` refuses GGUF-quantized models otherwise)."""
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def load_config(src: ModelSource, trust_remote_code: bool = False):
    """``AutoConfig`` of ``src`` (a GGUF file's read once per process: :func:`_gguf_once`)."""
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    if src.revision:
        kwargs["revision"] = src.revision
    def read():
        with lend_kept_reader(bool(src.gguf_file)):
            return AutoConfig.from_pretrained(src.path, **kwargs)

    config = _gguf_once("config", src, trust_remote_code, read)
    auto_map = getattr(config, "auto_map", None)
    if auto_map and not trust_remote_code:  # a built-in model_type: transformers ignores the folder's code silently
        from prune.core.console import announce_code_not_run

        announce_code_not_run(src.display, auto_map, config.model_type)
    return config




def text_config(config):
    """The config of the text decoder: a multimodal config's ``text_config`` (Gemma 3 with its vision tower), else
    ``config`` itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_supported(config) -> None:
    """Refuse an architecture outside :data:`SUPPORTED_MODEL_TYPES` with a message naming both."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        import difflib

        near = difflib.get_close_matches(str(model_type), list(SUPPORTED_MODEL_TYPES), n=3, cutoff=0.7)
        names = (f"{len(SUPPORTED_MODEL_TYPES)} model types, listed in the README and prune.SUPPORTED_MODEL_TYPES"
                 + (f"; the nearest: {', '.join(f'{SUPPORTED_MODEL_TYPES[k]} ({k})' for k in near)}" if near else ""))
        text = text_config(config)
        text_type = getattr(text, "model_type", None)
        inner = (f" (a model around a text decoder, {text_type}: give a text-only checkpoint of it, which is supported)"
                 if text is not config and text_type in SUPPORTED_MODEL_TYPES else "")
        raise UnsupportedModelError(
            f"architecture {model_type!r} is not supported for layer pruning{inner}; supported: {names}"
        )
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise PruneError(f"the model's config says num_hidden_layers = {n!r}: a decoder has at least one block "
                         "(fix config.json)")


#: blocks a config may name beyond the highest block number in the weights before the model is not even built
#: (its block objects alone grow with the count: 10**9 would exhaust memory); fewer go to prune check's rule
BUILD_SLACK = 1024
_BLOCK_NUMBER = re.compile(r"(?:^|\.)(\d+)\.")  # layers.N., h.N., GGUF's blk.N. (an expert's number only raises the count)


def weights_dtype(model) -> torch.dtype | None:
    """The dtype of ``model``'s floating-point weights (the first one's; None: it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def dtype_name(dtype) -> str | None:
    """A torch dtype as records and ``config.json`` name it: ``torch.bfloat16`` -> ``bfloat16`` (None stays None)."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def model_dtype(model) -> str | None:
    """The name of the dtype ``model``'s floating-point weights are in (``bfloat16``), as records give it."""
    return dtype_name(weights_dtype(model))


def block_count(config, default=None):
    """The decoder stack's ``num_hidden_layers``; of a multimodal config, its text model's (``text_config``)."""
    n = getattr(text_config(config), "num_hidden_layers", default)
    return n if isinstance(n, int) and not isinstance(n, bool) else default


def blocks_named(names) -> int:
    """How many blocks tensor names number: the highest block number (``layers.N.``, GGUF's ``blk.N.``) + 1."""
    return max((int(m.group(1)) for name in names if (m := _BLOCK_NUMBER.search(name))), default=-1) + 1


def stored_block_names(src: ModelSource) -> list[str] | None:
    """The tensor names of a local checkpoint, from headers only: a GGUF file's, or a folder's safetensors
    (its index, else its single file); None for anything else (the Hub, other formats)."""
    if src.kind == "gguf":
        from prune.io.gguf import gguf_reader

        return [t.name for t in gguf_reader(Path(src.path) / src.gguf_file).tensors]
    if src.kind != "folder":
        return None
    try:
        weight_map, shards = read_index(src.path)
    except PruneError:
        return None  # no safetensors: loaded, or refused, elsewhere
    return list(weight_map) if weight_map is not None else list(file_tensors(Path(src.path) / shards[0])[0])


def check_blocks_stored(src: ModelSource, config) -> None:
    """Refuse, before the model is built, a config naming far more decoder blocks than the weights hold:
    building 10**6 blocks exhausts memory. A GGUF file's ``block_count`` must equal its ``blk.N``
    tensors' count (transformers builds its model for real, so even a few blocks too many are random
    weights after gigabytes); a folder's may exceed its highest block number by ``BUILD_SLACK`` (the
    rest is ``prune check``'s finding, on a model built on the meta device)."""
    n = block_count(config)
    names = stored_block_names(src) if n is not None else None
    if not names:
        return
    stored = blocks_named(names)
    if src.kind == "gguf" and n != stored:
        raise PruneError(f"GGUF file {src.display}: its metadata says {n} blocks (block_count) but it holds tensors "
                         f"of {stored} (blk.0 .. blk.{stored - 1}); it is corrupt or was edited (download it again)")
    if src.kind == "folder" and n > stored + BUILD_SLACK:
        raise PruneError(f"{src.path}: config.num_hidden_layers={n} but the weights hold at most {stored} blocks "
                         "(fix config.json, or re-download the model)")


def check_device_map(device_map, offload_folder: str | None) -> None:
    """Refuse device maps that name absent devices or disk offload without a folder."""
    if isinstance(device_map, int) and not isinstance(device_map, bool):  # a GPU index, as transformers takes it
        if not _device_exists(device_map):
            raise PruneError(f"device_map {device_map} names a GPU that is not present (use auto, cpu, or a present GPU)")
        return
    if device_map is None or isinstance(device_map, str):
        if isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential", "cpu") and not _device_exists(device_map):
            raise PruneError(f"device_map {device_map!r} names a device that is not present (use auto, cpu, or a present device)")
        return
    for module, device in device_map.items():
        if device == "disk":
            if not offload_folder:
                raise PruneError(f"device_map puts {module!r} on disk but no offload_folder is set (set model.offload_folder)")
        elif not _device_exists(device):
            raise PruneError(f"device_map puts {module!r} on {device!r}, which is not present on this machine (use cpu, disk, or a present GPU)")


def as_device(device, what: str = "device") -> torch.device:
    """``device`` (a name, index or :class:`torch.device`) as a torch device, or one line naming it (torch's own
    error listed every device type it was built with)."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise PruneError(f"{what} {device!r} is not a device torch knows: give cpu, cuda, cuda:1 or mps") from None


def _device_exists(device) -> bool:
    if isinstance(device, int):
        return torch.cuda.is_available() and device < torch.cuda.device_count()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        return False
    if dev.type == "cpu":
        return True
    if dev.type == "cuda":
        return torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()
    if dev.type == "mps":
        return torch.backends.mps.is_available()
    return False


def decoder_layers_path(model: nn.Module) -> str:
    """Dotted name of the decoder-block ``ModuleList`` (``model.layers``, ``transformer.h``, ...)."""
    if getattr(model, "config", None) is None:
        raise UnsupportedModelError(f"{type(model).__name__} is not a transformers causal LM (no config): give a "
                                    "model loaded with prune.load or AutoModelForCausalLM")
    check_supported(model.config)
    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    best: tuple[str, int] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if all(type(child).__name__ in block_classes for child in module):
                if best is None or len(module) > best[1]:
                    best = (name, len(module))
    if best is None:
        raise UnsupportedModelError(
            f"no decoder stack found in {type(model).__name__} (model_type {model.config.model_type!r}): "
            f"no ModuleList of {sorted(block_classes) or 'no-split blocks'}"
        )
    return best[0]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder blocks, in forward order."""
    return model.get_submodule(decoder_layers_path(model))


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied after the last decoder block (``model.norm``, GPT-2's ``ln_f``, ...):
    the one normalisation module among the decoder stack's siblings (BLOOM's: the one besides its
    embeddings' norm); ``None`` if there is none."""
    path = decoder_layers_path(model)
    parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
    norms = [(name, m) for name, m in parent.named_children()
             if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith(("Norm", "RMSNorm", "LayerNorm"))]
    if len(norms) > 1:  # BLOOM's norm of the embeddings, applied before the blocks (LFM2's final one is embedding_norm)
        norms = [(name, m) for name, m in norms if name != "word_embeddings_layernorm"]
    return norms[0][1] if len(norms) == 1 else None


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once): transformers' ``num_parameters``."""
    if hasattr(model, "num_parameters"):
        return model.num_parameters()
    return sum(p.numel() for p in model.parameters())  # parameters() skips shared tensors


def input_device(model: nn.Module) -> torch.device:
    """Device that input ids must be on (the input embedding's, even when dispatched)."""
    emb = model.get_input_embeddings()
    weight = emb.weight
    if weight.device.type == "meta":  # offloaded to disk: Accelerate's hook moves inputs
        hook = getattr(emb, "_hf_hook", None)
        exec_dev = getattr(hook, "execution_device", None)
        return torch.device(exec_dev if exec_dev is not None else "cpu")
    return weight.device


def is_dispatched(model: nn.Module) -> bool:
    """True when Accelerate spread the model over several devices (or offloaded part of it)."""
    devices = {str(v) for v in (getattr(model, "hf_device_map", None) or {}).values()}
    return len(devices) > 1 or "disk" in devices


def context_length(config) -> int | None:
    """Longest sequence a model supports, from its config (or the model's), ``None`` when unknown."""
    cfg = getattr(config, "config", config)
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def plain_config_dict(config) -> dict[str, Any]:
    """The config as saved, minus load-time artefacts (GGUF's ``quantization_config``)."""
    data = json.loads(config.to_json_string(use_diff=False))
    qc = data.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == "gguf":
        data.pop("quantization_config")
    return data


# ---- config of a pruned stack ----------------------------------------------------------
#: Config keys holding per-layer *value lists* whose names do not say "layer" (Hunyuan-MoE's top-k, expert sizes and
#: shared-expert counts may be lists over the blocks), sliced on pruning like ``layer_types``.
PER_LAYER_KEYS = ("moe_topk", "num_experts", "moe_intermediate_size", "num_shared_expert")

#: Config keys holding per-layer *index lists* (indices into the stack), remapped on pruning: Qwen-MoE's
#: dense blocks, Llama 4's MoE blocks, LFM2's attention blocks (the others convolutions).
INDEX_LIST_KEYS = ("mlp_only_layers", "moe_layers", "full_attn_idxs")


def _qwen3_moe_layout(config, kept: list[int]) -> dict[str, Any]:
    """Qwen3-MoE picks dense vs sparse MLP from the block *position*
    (``i in mlp_only_layers`` or ``(i + 1) % decoder_sparse_step != 0`` -> dense), so the
    pruned config lists every kept dense block explicitly and sets the step to 1."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    only = set(getattr(config, "mlp_only_layers", None) or [])
    experts = getattr(config, "num_experts", 0) or 0

    def dense(i: int) -> bool:
        return i in only or not (experts > 0 and (i + 1) % step == 0)

    return {"decoder_sparse_step": 1, "mlp_only_layers": [new for new, old in enumerate(kept) if dense(old)]}


def _dense_prefix_layout(config, kept: list[int]) -> dict[str, Any]:
    """DeepSeek-V2/V3 and GLM-4-MoE build a dense MLP for the blocks below ``first_k_dense_replace`` (AFMoE:
    ``num_dense_layers``) and MoE above: the kept dense blocks stay a prefix of the kept ones, so the threshold
    becomes their count."""
    key = "num_dense_layers" if config.model_type == "afmoe" else "first_k_dense_replace"
    return {key: sum(1 for i in kept if i < getattr(config, key))}


def _moe_range_layout(config, kept: list[int]) -> dict[str, Any]:
    """ERNIE-4.5-MoE builds a sparse MLP at block ``i`` when ``start <= i <= end`` and ``(i + 1) % interval == 0``
    (``moe_layer_start_index``, ``_end_index``, ``_interval``): the kept sparse blocks' new positions get the
    first such (interval, start, end) that describes them, and a cut no such triple describes is refused."""
    start, end, interval = config.moe_layer_start_index, config.moe_layer_end_index, config.moe_layer_interval or 1
    end = config.num_hidden_layers - 1 if end is None or end < 0 else end  # -1: to the last block
    sparse = [new for new, old in enumerate(kept) if start <= old <= end and (old + 1) % interval == 0]
    if not sparse:
        return {"moe_layer_start_index": len(kept), "moe_layer_end_index": len(kept), "moe_layer_interval": 1}
    for step in range(1, len(kept) + 1):
        if [i for i in range(sparse[0], sparse[-1] + 1) if (i + 1) % step == 0] == sparse:
            return {"moe_layer_start_index": sparse[0], "moe_layer_end_index": sparse[-1], "moe_layer_interval": step}
    raise PruneError(f"{config.model_type}: the kept blocks would leave sparse (MoE) blocks at positions {sparse}, which "
                     "its config cannot describe (one start, end and interval); remove other blocks")


#: model_type -> function(config, kept) -> extra config updates, for position-dependent layouts
#: (Qwen2-MoE and Qwen3-Next decide dense vs sparse as Qwen3-MoE does).
LAYOUT_REWRITES = {"qwen3_moe": _qwen3_moe_layout, "qwen2_moe": _qwen3_moe_layout, "qwen3_next": _qwen3_moe_layout,
                   "deepseek_v3": _dense_prefix_layout, "deepseek_v2": _dense_prefix_layout,
                   "glm4_moe": _dense_prefix_layout, "ernie4_5_moe": _moe_range_layout, "afmoe": _dense_prefix_layout}


#: config key of a period -> (the per-layer list that supersedes it, the value every p-th layer has): transformers
#: reads a period only without the list (Gemma3's sliding window, Qwen3-Next's linear attention: every p-th layer
#: full; SmolLM3: every p-th layer without RoPE)
PERIODS = {"sliding_window_pattern": ("layer_types", "full_attention"),
           "_sliding_window_pattern": ("layer_types", "full_attention"),
           "full_attention_interval": ("layer_types", "full_attention"),
           "no_rope_layer_interval": ("no_rope_layers", 0)}


def _may_be_none(config, key: str) -> bool:
    """Whether ``config.key`` may be set to None (a strict dataclass field typed ``int`` may not)."""
    field = getattr(type(config), "__dataclass_fields__", {}).get(key)
    return field is None or "None" in str(field.type) or "Optional" in str(field.type)


def period_of(values: list, every: Any) -> int | None:
    """The period ``p`` for which ``values[i] == every`` exactly when ``(i + 1) % p == 0`` (Gemma3's
    ``sliding_window_pattern`` of ``layer_types``), or None when no period gives ``values``: a pruned stack
    seldom keeps one, and a stale period would describe another model to whatever reads it."""
    for p in range(1, len(values) + 2):
        if all((v == every) == ((i + 1) % p == 0) for i, v in enumerate(values)):
            return p
    return None


#: layer types of a hybrid stack that are not attention (LFM2's short convolutions, Qwen3-Next's / Qwen3.5's linear
#: attention): a stack of these alone has no attention layer for transformers' cache to size its masks from
NOT_ATTENTION = ("conv", "linear_attention", "mamba")


def check_cut_keeps_attention(config, kept: list[int]) -> None:
    """:func:`cut_without_attention` as a refusal."""
    if (why := cut_without_attention(config, kept)) is not None:
        raise PruneError(why)


def keeps_attention(config, removed) -> bool:
    """Whether removing blocks ``removed`` leaves a hybrid stack an attention block (:func:`cut_without_attention`):
    what the choosing strategies ask of each candidate."""
    gone = set(removed)
    return cut_without_attention(config, [i for i in range(config.num_hidden_layers) if i not in gone]) is None


def cut_without_attention(config, kept: list[int]) -> str | None:
    """Why a hybrid stack keeping blocks ``kept`` cannot be used (every attention block removed: the forward runs,
    ``generate`` with a cache fails in transformers), or None."""
    types = getattr(config, "layer_types", None)
    if not isinstance(types, (list, tuple)) or len(types) != config.num_hidden_layers:
        return None
    attention = [i for i, t in enumerate(types) if t not in NOT_ATTENTION]
    if not attention or len(attention) == len(types) or any(i in attention for i in kept):
        return None
    return (f"the cut removes every attention block of this hybrid stack ({', '.join(map(str, attention))}; the rest "
            f"are {'/'.join(sorted({t for t in types if t in NOT_ATTENTION}))}): transformers cannot generate from what "
            f"is left; protect one of them (select.protect) or remove other blocks")


def mtp_blocks(config) -> int:
    """How many multi-token-prediction layers a checkpoint stores after the decoder stack (DeepSeek-V3's
    ``model.layers.61``, GLM-4.5's ``model.layers.92``: ``num_nextn_predict_layers``). transformers does not load
    them, so a pruned checkpoint holds none (and says so: ``num_nextn_predict_layers`` 0); they were trained on
    the whole stack's last state."""
    n = getattr(config, "num_nextn_predict_layers", None)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 0


def pruned_config_updates(config, kept: list[int]) -> dict[str, Any]:
    """Config changes that make a stack keeping blocks ``kept`` (0-based, sorted) rebuild identically.

    * ``num_hidden_layers`` (through ``attribute_map``: GPT-2's ``n_layer``) = ``len(kept)``;
    * every per-layer list (a list attribute whose name mentions "layer", or one of :data:`PER_LAYER_KEYS`, whose
      length is the old layer count: ``layer_types``, ``mlp_layer_types``, ...) is sliced to ``kept``;
    * index lists (``mlp_only_layers``) are remapped to new positions; ``max_window_layers``
      counts the kept blocks below the old threshold; a period a per-layer list supersedes (Gemma3's sliding
      window, SmolLM3's RoPE-less layers) becomes the kept list's own period, or None (:func:`period_of`);
    * architecture-specific layouts (:data:`LAYOUT_REWRITES`);
    * no multi-token-prediction layer (:func:`mtp_blocks`).
    """
    old_n = config.num_hidden_layers
    updates: dict[str, Any] = {"num_hidden_layers": len(kept)}
    if mtp_blocks(config):
        updates["num_nextn_predict_layers"] = 0
    position = {old: new for new, old in enumerate(kept)}
    for key, value in config.to_dict().items():
        if key in INDEX_LIST_KEYS and isinstance(value, (list, tuple)):
            updates[key] = [position[i] for i in value if i in position]
        elif ("layer" in key or key in PER_LAYER_KEYS) and isinstance(value, (list, tuple)) and len(value) == old_n:
            updates[key] = [value[i] for i in kept]
    mwl = getattr(config, "max_window_layers", None)
    if isinstance(mwl, int):
        updates["max_window_layers"] = sum(1 for i in kept if i < mwl)
    for key, (listed, every) in PERIODS.items():
        if listed in updates and isinstance(getattr(config, key, None), int):
            period = period_of(updates[listed], every)
            if period is not None or _may_be_none(config, key):  # a field typed int keeps its stale period:
                updates[key] = period                             # transformers reads the list
    rewrite = LAYOUT_REWRITES.get(config.model_type)
    if rewrite is not None:
        updates.update(rewrite(config, kept))
    return updates


# ---- integrity of local checkpoint files (checked before anything is loaded) -------------
def check_checkpoint_files(src: ModelSource) -> None:
    """Refuse local checkpoints with missing shards or truncated/corrupt weight files."""
    if src.kind == "hub":
        return
    folder = Path(src.path)
    if src.kind == "gguf":
        from prune.io.gguf import gguf_reader

        try:
            gguf_reader(folder / src.gguf_file)  # parsed once per process (prune.io.gguf)
        except PruneError:
            raise
        except Exception as exc:  # noqa: BLE001 - any parse failure means a bad file
            raise PruneError(f"GGUF file {folder / src.gguf_file} is truncated or corrupt ({type(exc).__name__}); "
                             "download it again") from None
        return
    # the files transformers reads (model.safetensors, else the index's shards): another *.safetensors
    # beside them (a PEFT adapter, a stray copy) is not the model's and does not block it
    has_weights = (folder / INDEX_NAME).is_file() or (folder / "model.safetensors").is_file()
    files = [folder / s for s in read_index(folder)[1]] if has_weights else []
    for file in files:
        file_tensors(file)  # safe_open refuses a truncated or corrupt file
    if not files and not any(folder.glob("*.bin")):
        raise PruneError(f"{folder} has a config but no weights (model.safetensors, an index of shards, or "
                         "pytorch_model.bin); is the download complete?")
