"""A model skeleton on the meta device whose weights are read from the checkpoint part by part.

``Skeleton(folder)`` builds the ``AutoModelForCausalLM`` of a safetensors folder with every
parameter on the meta device (``accelerate.init_empty_weights``; buffers such as rotary
frequencies are built for real, they are tiny) and maps every checkpoint tensor to the
parameter it fills, with transformers' own key conversions (legacy names, per-expert
tensors fused into one, ...). Then :meth:`Skeleton.load_block` materialises one decoder
block, :meth:`Skeleton.load_rest` everything outside the blocks (embeddings, final norm;
never the LM head, which scoring does not use) and :meth:`Skeleton.free` returns a part
to the meta device, so at most one block's weights are in memory at a time.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from prune.io.safetensors import Checkpoint
from prune.io.source import ModelSource
from prune.core.errors import PruneError
from prune.model.arch import block_index, meta_model
from prune.model.hf_internals import checkpoint_key_renamer, load_state_dict_into
from prune.model.loading import check_blocks_stored, check_supported, decoder_layers_path
from prune.core.config import resolve_dtype


def resolve_load_dtype(dtype, config, checkpoint: Checkpoint) -> torch.dtype:
    """The dtype weights are loaded in: ``dtype``, or for ``"auto"`` the config's, else the checkpoint's."""
    resolved = resolve_dtype(dtype)
    if resolved != "auto":
        return resolved
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    if isinstance(value, torch.dtype):
        return value
    return checkpoint.float_dtype() or torch.float32


@contextlib.contextmanager
def _quiet_loading():
    """Silence transformers' per-call "Loading weights" bar (we show our own per block)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def equal_tied_copies(model, checkpoint: Checkpoint, target: dict[str, str] | None = None) -> list[str]:
    """Checkpoint keys of the tied parameters of ``model`` (``all_tied_weights_keys``: copy -> source) that the
    checkpoint stores beside their source with the same values, as transformers' load decides whether to tie
    them (a copy of other values is loaded untied, and kept). ``target``: checkpoint key -> model parameter name
    (default: the same names)."""
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    key_of = {name: key for key, name in (target or {k: k for k in checkpoint.entries}).items()}
    copies = []
    for copy, source in tied.items():
        if copy not in key_of or source not in key_of:
            continue
        a, b = checkpoint.entries[key_of[copy]], checkpoint.entries[key_of[source]]
        if a.shape == b.shape and a.dtype == b.dtype and torch.equal(checkpoint.read(a.key), checkpoint.read(b.key)):
            copies.append(a.key)  # (read only when they can be equal)
    return copies


class Skeleton:
    """The model of ``folder`` on the meta device plus the checkpoint tensors of each part.

    ``device`` is where loaded parts live and run; ``dtype`` as in :func:`prune.load`.
    """

    def __init__(self, folder: str | Path, *, dtype="auto", device: torch.device | str = "cpu",
                 trust_remote_code: bool = False):
        from transformers import AutoConfig

        self.folder = Path(folder)
        self.device = torch.device(device)
        self.checkpoint = Checkpoint(self.folder)
        config = AutoConfig.from_pretrained(self.folder, trust_remote_code=trust_remote_code)
        check_supported(config)
        check_blocks_stored(ModelSource("folder", str(self.folder)), config)  # 10**6 blocks: refused, not built
        self.dtype = resolve_load_dtype(dtype, config, self.checkpoint)
        model = meta_model(config, trust_remote_code=trust_remote_code, dtype=self.dtype, real_buffers=True)
        self.model = model.eval()
        for module in model.modules():  # buffers were built for real (on CPU): move them to the device
            for name, buf in module._buffers.items():
                if buf is not None and buf.device.type != "meta":
                    module._buffers[name] = buf.to(self.device)
        self.layers_path = decoder_layers_path(model)
        self.layers: nn.ModuleList = model.get_submodule(self.layers_path)
        self._map_keys()

    # ---- which checkpoint tensor fills which parameter --------------------------------------
    def _map_keys(self) -> None:
        model = self.model
        rename = checkpoint_key_renamer(model)
        self.weight_mapping = rename.mapping
        meta_sd = model.state_dict()
        out = model.get_output_embeddings()
        names = {id(m): n for n, m in model.named_modules()}
        head = names.get(id(out)) if out is not None and out is not model.get_input_embeddings() else None
        self.head = head
        self.target: dict[str, str] = {}  # checkpoint key -> model key
        self.block_of: dict[str, int | None] = {}  # checkpoint key -> block index (None: outside the blocks)
        self.head_keys: list[str] = []
        self.unused: list[str] = []
        for key in self.checkpoint.entries:
            renamed = rename(key, meta_sd)
            if renamed not in meta_sd and key in meta_sd:
                renamed = key
            if renamed not in meta_sd:
                self.unused.append(key)
                continue
            self.target[key] = renamed
            if head is not None and (renamed == head or renamed.startswith(head + ".")):
                self.head_keys.append(key)
                continue
            found = block_index(renamed, self.layers_path)
            self.block_of[key] = found[0] if found else None
        self.load_as: dict[str, str] = {}  # checkpoint key -> the name it loads under, where not its own
        tied, filled = dict(getattr(model, "all_tied_weights_keys", None) or {}), set(self.target.values())
        for key in list(self.head_keys):  # a tied pair stored under the copy's name only (the LM head's), which
            source = tied.get(self.target[key])  # from_pretrained loads into the copy and ties the source to it
            if source is not None and source not in filled and source in meta_sd:
                self.head_keys.remove(key)
                self.target[key] = self.load_as[key] = source
                found = block_index(source, self.layers_path)
                self.block_of[key] = found[0] if found else None
        n = len(self.layers)
        found = {i for i in self.block_of.values() if i is not None}
        if found != set(range(n)):
            missing = sorted(set(range(n)) - found)
            raise PruneError(f"{self.folder}: the checkpoint has no weights for block(s) {missing[:5]} of {n} "
                             "(is it complete? does config.json match the weights?)")

    def missing_parameters(self) -> list[str]:
        """Parameters of the model that no checkpoint tensor fills (tied copies excepted)."""
        filled = set(self.target.values())
        tied = dict(getattr(self.model, "all_tied_weights_keys", None) or {})  # tied copy -> its source
        return [name for name, _ in self.model.named_parameters()
                if name not in filled and tied.get(name) not in filled]

    def counted_keys(self) -> list[str]:
        """The checkpoint keys that are parameters of their own, as the loaded model counts them: a tied copy
        stored beside its source (an LM head tied to the embeddings) counts once, and a stored buffer (DeepSeek-V3's
        router bias) not at all."""
        filled = set(self.target.values())
        tied = dict(getattr(self.model, "all_tied_weights_keys", None) or {})
        params = {name for name, _ in self.model.named_parameters(remove_duplicate=False)}
        return [k for k, name in self.target.items() if name in params and not (name in tied and tied[name] in filled)]

    def tied_copies(self) -> list[str]:
        """Checkpoint keys of tied parameters stored beside their source with equal values (an LM head saved
        with the embeddings it is tied to): a load ties them, so a save leaves them out (:func:`equal_tied_copies`)."""
        return equal_tied_copies(self.model, self.checkpoint, self.target)

    def block_keys(self, index: int) -> list[str]:
        return [k for k, b in self.block_of.items() if b == index]

    def rest_keys(self) -> list[str]:
        return [k for k, b in self.block_of.items() if b is None]

    def block_bytes(self, index: int) -> int:
        return self.checkpoint.bytes_at(self.block_keys(index), self.dtype)

    # ---- loading and freeing ----------------------------------------------------------------
    def _load(self, keys: list[str], params: list[str], what: str) -> None:
        model = self.model
        state = {self.load_as.get(k, k): self.checkpoint.lazy(k) for k in keys}
        with _quiet_loading():
            info = load_state_dict_into(model, state, self.device, self.dtype, self.weight_mapping)
        if info.mismatched_keys:
            bad = sorted(info.mismatched_keys)[0]
            raise PruneError(f"{self.folder}: {bad[0]} has shape {tuple(bad[1])} in the checkpoint but {tuple(bad[2])} "
                             "in the model (does config.json match the weights?)")
        left = [n for n in params if model.get_parameter(n).device.type == "meta"]
        if left:
            raise PruneError(f"{self.folder}: the checkpoint has no weights for {what} parameter(s) {left[:3]}")

    def _params(self, prefix: str | None) -> list[str]:
        """Names of the parameters under ``prefix``; ``None``: outside the blocks and the LM head."""
        names = []
        for name, _ in self.model.named_parameters():
            inside_blocks = name.startswith(self.layers_path + ".")
            if prefix is not None:
                if name.startswith(prefix + "."):
                    names.append(name)
            elif not inside_blocks and not (self.head and name.startswith(self.head + ".")):
                names.append(name)
        return names

    def load_block(self, index: int) -> nn.Module:
        """Materialise block ``index`` on the device and return it."""
        self._load(self.block_keys(index), self._params(f"{self.layers_path}.{index}"), f"block {index}")
        return self.layers[index]

    def load_rest(self) -> None:
        """Materialise everything outside the decoder blocks (embeddings, final norm), not the LM head."""
        self._load(self.rest_keys(), self._params(None), "non-block")

    def free_block(self, index: int) -> None:
        self._free(self._params(f"{self.layers_path}.{index}"))

    def free_rest(self) -> None:
        self._free(self._params(None))

    def _free(self, names: list[str]) -> None:
        """Return the parameters ``names`` to the meta device (their memory is released)."""
        for name in names:
            owner, _, attr = name.rpartition(".")
            module = self.model.get_submodule(owner)
            param = module._parameters[attr]
            if param is not None and param.device.type != "meta":
                module._parameters[attr] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
