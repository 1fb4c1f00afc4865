"""First-order linear recurrence ``h_t = a_t * h_{t-1} + x_t`` along dim 1.

``assoc_scan_reference`` is a Hillis-Steele doubling scan in plain PyTorch (log2(n) vectorised steps,
no division, so it is exact up to rounding for any gates, including zeros). On CUDA, ``backend="auto"``
uses accelerated-scan's Triton kernel when that package is installed (its CUDA ``warp`` extension is
never imported).
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F
from seqmem_shared.backends import optional_import
from torch import Tensor, nn


def assoc_scan_loop(gates: Tensor, inputs: Tensor, prev: Tensor | None = None) -> Tensor:
    """Sequential oracle: gates broadcastable to inputs [b, n, ...]; prev [b, ...] or None."""
    gates = gates.expand_as(inputs)
    h = prev if prev is not None else torch.zeros_like(inputs[:, 0])
    out = []
    for t in range(inputs.shape[1]):
        h = gates[:, t] * h + inputs[:, t]
        out.append(h)
    return torch.stack(out, dim=1)


def assoc_scan_reference(gates: Tensor, inputs: Tensor, prev: Tensor | None = None) -> Tensor:
    """Doubling scan: gates broadcastable to inputs [b, n, ...]; prev [b, ...] seeds h_{-1}."""
    a = gates.expand_as(inputs)
    h = inputs
    if prev is not None:
        h = torch.cat((a[:, :1] * prev.unsqueeze(1) + h[:, :1], h[:, 1:]), dim=1)
    n, shift = inputs.shape[1], 1
    while shift < n:
        # combine (a_prev, h_prev) o (a, h) = (a * a_prev, a * h_prev + h), elements shifted by `shift`
        h = torch.cat((h[:, :shift], torch.addcmul(h[:, shift:], a[:, shift:], h[:, :-shift])), dim=1)
        a = torch.cat((a[:, :shift], a[:, shift:] * a[:, :-shift]), dim=1)
        shift *= 2
    return h


def _triton_scan() -> tuple[object, bool] | None:
    """(accelerated-scan's Triton ``scan(gates, tokens)`` on [b, d, n], needs power-of-2 n) or None.

    accelerated-scan >= 0.3 ships it as ``accelerated_scan.scalar`` (any n); older releases as
    ``accelerated_scan.triton`` (n a power of two >= 32). The CUDA ``warp`` module is never imported.
    """
    for name, pow2 in (("accelerated_scan.scalar", False), ("accelerated_scan.triton", True)):
        if importlib.util.find_spec("accelerated_scan") is None:
            return None
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            mod = optional_import(name, "the Titans momentum scan")
            if mod is not None and hasattr(mod, "scan"):
                return mod.scan, pow2
    return None


def assoc_scan_triton(gates: Tensor, inputs: Tensor, prev: Tensor | None = None) -> Tensor:
    """Same contract as :func:`assoc_scan_reference`, through accelerated-scan on CUDA tensors."""
    found = _triton_scan()
    if found is None:
        raise RuntimeError("backend='triton' for assoc_scan needs the accelerated-scan package")
    scan, pow2 = found
    b = inputs.shape[0]
    if prev is not None:
        inputs = torch.cat((prev.unsqueeze(1), inputs), dim=1)
        gates = torch.cat((torch.ones_like(gates[:, :1]).expand(b, 1, *gates.shape[2:]), gates), dim=1)
    shape = inputs.shape
    x = inputs.reshape(b, shape[1], -1).transpose(1, 2).float()
    a = gates.expand(shape).reshape(b, shape[1], -1).transpose(1, 2).float()
    if pow2:
        length = 2 ** max(5, math.ceil(math.log2(shape[1])))
        x, a = F.pad(x, (0, length - shape[1])), F.pad(a, (0, length - shape[1]))
    out = scan(a.contiguous(), x.contiguous())[..., : shape[1]].to(inputs.dtype)
    out = out.transpose(1, 2).reshape(shape)
    return out[:, 1:] if prev is not None else out


def assoc_scan(gates: Tensor, inputs: Tensor, prev: Tensor | None = None, backend: str = "auto") -> Tensor:
    """``h_t = gates_t * h_{t-1} + inputs_t`` over dim 1, ``h_{-1} = prev`` (zeros when None).

    ``backend``: "auto" (Triton kernel for CUDA tensors when accelerated-scan is installed), "torch",
    or "triton".
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend={backend!r}: expected one of 'auto', 'torch', 'triton'")
    use_triton = backend == "triton" or (backend == "auto" and inputs.is_cuda and _triton_scan() is not None)
    if use_triton:
        return assoc_scan_triton(gates, inputs, prev)
    return assoc_scan_reference(gates, inputs, prev)


class AssocScan(nn.Module):
    """Module form with the public titans-pytorch signature.

    ``forward(gates, inputs, prev=None, remove_prev=None)``: with ``prev`` given and ``remove_prev``
    False, the output starts with ``prev`` (length n + 1).
    """

    def __init__(self, use_accelerated: bool = False, reverse: bool = False):
        super().__init__()
        self.use_accelerated = use_accelerated
        self.reverse = reverse

    def forward(
        self, gates: Tensor, inputs: Tensor, prev: Tensor | None = None, remove_prev: bool | None = None
    ) -> Tensor:
        squeeze = inputs.ndim == 1
        if squeeze:
            inputs, gates = inputs.unsqueeze(0), gates.reshape(1, -1)
            prev = prev.unsqueeze(0) if prev is not None and prev.ndim == 0 else prev
        if gates.ndim < inputs.ndim:
            gates = gates.reshape(*gates.shape, *(1,) * (inputs.ndim - gates.ndim))
        if self.reverse:
            gates, inputs = gates.flip(1), inputs.flip(1)
        out = assoc_scan(gates, inputs, prev, backend="auto" if self.use_accelerated else "torch")
        if prev is not None and remove_prev is False:
            out = torch.cat((prev.unsqueeze(1), out), dim=1)
        if self.reverse:
            out = out.flip(1)
        return out.squeeze(0) if squeeze else out
