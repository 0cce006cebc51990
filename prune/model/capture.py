"""Forward hooks that record the hidden state entering and leaving every decoder block.

Never ``output_hidden_states``: its last entry is taken after the final norm. A forward
pre-hook sees what enters block ``l`` and a forward hook what leaves it, wherever
Accelerate placed the block; each state is copied at once to one ``device`` as float32,
so statistics from a dispatched model are gathered in one place.

The input of block ``l + 1`` is normally the very tensor block ``l`` returned; it is then
stored once. Only when an architecture changes the stream between blocks is the input
kept separately, so Block Influence always compares a block's own input and output.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the states needed are taken (caught by the caller)."""


def _hidden_from_args(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return kwargs["hidden_states"]


def _hidden_from_output(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


class BlockStates:
    """Context manager recording, per forward pass, the stream ``h_0 .. h_L`` of every block.

    After a forward pass, :meth:`pop` returns ``(states, inputs)``: ``states[l]`` enters
    block ``l`` for ``l = 0`` and is block ``l-1``'s output for ``l >= 1``; ``inputs[l]``
    is what entered block ``l`` when that differs from ``states[l]`` (else ``None``).
    Tensors are ``[batch, seq - first, d]``, float32, on ``device``: positions before ``first``
    are never copied (scoring that skips the attention-sink token keeps nothing of it).
    """

    def __init__(self, layers: nn.ModuleList, device: torch.device | str, dtype: torch.dtype = torch.float32,
                 first: int = 0):
        self.layers = layers
        self.device = torch.device(device)
        self.dtype = dtype
        self.first = first
        self._handles: list = []
        self._reset()

    def _reset(self) -> None:
        n = len(self.layers)
        self._states: list[torch.Tensor | None] = [None] * (n + 1)
        self._inputs: list[torch.Tensor | None] = [None] * n
        self._last_output = None  # the raw tensor block l-1 returned (identity check only)

    def _copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """One contiguous copy of the kept positions (``.to(copy=True)`` of a slice would keep its
        strides and need a second copy to be contiguous)."""
        src = tensor.detach()[:, self.first :]
        return torch.empty(src.shape, dtype=self.dtype, device=self.device).copy_(src)

    def _pre_hook(self, index: int):
        def hook(module, args, kwargs):
            hidden = _hidden_from_args(args, kwargs)
            if index == 0:
                self._states[0] = self._copy(hidden)
            elif hidden is not self._last_output:
                self._inputs[index] = self._copy(hidden)
            self._last_output = None

        return hook

    def _post_hook(self, index: int):
        def hook(module, args, kwargs, output):
            hidden = _hidden_from_output(output)
            self._states[index + 1] = self._copy(hidden)
            self._last_output = hidden

        return hook

    def __enter__(self) -> BlockStates:
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._post_hook(i), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._reset()

    def pop(self) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        if any(s is None for s in self._states):
            missing = [i for i, s in enumerate(self._states) if s is None]
            raise RuntimeError(f"hooks did not see every block (missing states {missing}); was the forward complete?")
        states, inputs = self._states, self._inputs
        self._reset()
        return states, inputs


def measured_in_eval_mode(fn):
    """Run ``fn(model, ...)`` with ``model`` in eval mode (dropout off: a measurement gives one answer),
    each module's own mode restored afterwards (a model being trained stays in training mode)."""
    import functools

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        if not isinstance(model, nn.Module):
            return fn(model, *args, **kwargs)
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            return fn(model, *args, **kwargs)
        finally:
            for module, mode in modes:
                module.training = mode

    return wrapper


def batches(windows: torch.Tensor, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first_index, windows[first:first+batch_size])`` over the windows, in order."""
    for start in range(0, windows.shape[0], batch_size):
        yield start, windows[start : start + batch_size]
