"""The extractor API shared by every model family with a matrix-valued recurrent state.

A family says how to find its token mixers (``find_mixers``) and how a mixer turns its input hidden
states into the quantities of its state update (``state_inputs`` -> :class:`StateInputs`); the base class
does the rest in ONE forward pass of the model's own code: a forward pre-hook on each requested mixer
takes its input ``x [B, T, D]``, recomputes ``k``, ``v``, decays (and ``beta`` for the delta rule) with
the mixer's own weights, computes the states entering every chunk and the exact state at each requested
position from the chunk-entry state plus an in-chunk correction (:mod:`retnet_forgetting.extractors.scan`,
fp32). The forward stops after the deepest requested layer unless logits are asked for.

Semantics (as for :class:`~retnet_forgetting.RetNetStateExtractor`): the state "at position t" includes
token t, i.e. equals the final recurrent state of ``input_ids[:, :t+1]``. States are returned key-major,
``[..., H, Dk, Dv]`` (``layout="kv"``, so that ``q S`` reads them); ``layout="native"`` gives the layout of
the model's own cache (fla's GLA and Gated DeltaNet keep ``[H, Dv, Dk]``, Mamba-2 ``[H, headdim, d_state]``).
Short-convolution states are separate: :meth:`StateExtractor.extract_conv_states_at_positions`.

Hook names follow TransformerLens/MambaLens: ``blocks.{l}.{attn|mixer}.hook_state`` and
``blocks.{l}.{attn|mixer}.hook_conv_state_{name}``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from retnet_forgetting.extractors import scan
from retnet_forgetting.padding import check_inputs, check_positions, gather_rows, right_align_index

StateSink = Callable[[int, torch.Tensor, torch.Tensor], None]
"""``sink(layer, positions [B, n], states [B, n, ...])`` receives streamed states."""


@dataclass
class StateInputs:
    """What one mixer feeds its state update, per token (``[B, T, H, ...]``; ``H`` = state heads).

    ``log_a``: log-decay ``[B, T, H, Dk]`` or ``[B, T, H, 1]``, None for none; ``beta [B, T, H]`` marks the
    delta rule (None: decayed outer products). ``q``/``scale`` give the mixer's readout ``scale * q S``;
    ``conv`` holds the short convolutions' inputs ``{name: [B, T, D]}`` (their state is the last
    ``conv_width`` of them).
    """

    k: torch.Tensor
    v: torch.Tensor
    log_a: torch.Tensor | None
    beta: torch.Tensor | None = None
    q: torch.Tensor | None = None
    scale: float = 1.0
    conv: dict[str, torch.Tensor] = field(default_factory=dict)
    conv_width: int = 0

    def scan(self, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(``u``, ``log_a``, chunk-entry states ``h``, final state): ``S_t`` at any t is
        ``scan.states_at_positions(k, u, log_a, positions, h)``."""
        k = self.k
        log_a = self.log_a if self.log_a is not None else k.new_zeros(*k.shape[:3], 1, dtype=torch.float32)
        if self.beta is None:
            h, final = scan.chunk_entry_states(k, self.v, log_a, chunk_size)
            return self.v, log_a, h, final
        u, h, final = scan.delta_chunk_scan(k, self.v, self.beta, log_a, chunk_size)
        return u, log_a, h, final


class _StopForward(Exception):
    """Raised by the last hook when no later layer (or logits) is needed."""


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                activation: str | None = None) -> torch.Tensor:
    """Depthwise causal convolution: ``x [B, T, D]``, ``weight [D, 1, W]`` (nn.Conv1d) -> ``[B, T, D]``."""
    W = weight.shape[-1]
    y = F.conv1d(F.pad(x.transpose(1, 2), (W - 1, 0)), weight, bias, groups=x.shape[-1]).transpose(1, 2)
    if activation in ("silu", "swish"):
        return F.silu(y)
    if activation is not None:
        raise ValueError(f"activation={activation!r}: expected 'silu', 'swish' or None")
    return y


def conv_windows(x: torch.Tensor, positions: torch.Tensor, width: int) -> torch.Tensor:
    """The last ``width`` inputs up to each position (zeros before the start), as fla caches a short
    convolution's state: ``x [B, T, D]``, ``positions [B, K]`` -> ``[B, K, D, width]`` (newest last)."""
    padded = F.pad(x, (0, 0, width - 1, 0))
    idx = positions[..., None] + torch.arange(width, device=x.device)  # columns t-W+1 .. t, shifted by W-1
    b = torch.arange(x.shape[0], device=x.device)[:, None, None]
    return padded[b, idx].transpose(-1, -2)


@dataclass
class Pass:
    """One prepared pass: ``ids [B, T]`` (on the model's device, rows right-aligned when padded),
    ``positions [B, K]`` (columns of ``ids``; on the device, and ``host_positions`` the same on the CPU),
    ``given [B, K]`` (CPU, the caller's columns), ``index`` (the right-alignment permutation or None), the
    sorted requested ``layers`` and ``memo`` (what a subclass computes once per pass)."""

    ids: torch.Tensor
    positions: torch.Tensor
    host_positions: torch.Tensor
    given: torch.Tensor
    index: torch.Tensor | None
    layers: list[int]
    memo: dict = field(default_factory=dict)


LayerFn = Callable[[int, StateInputs], object]
"""``at_layer(layer, inputs)``: emits the layer's states; returns its chunk scan (see ``chunk_states``)."""


class StateExtractor:
    """Per-layer recurrent states at any positions in one pass (see the module docstring).

    Subclasses set ``family``, ``hook_module`` (``"attn"`` or ``"mixer"``), ``native_v_first`` and
    implement :meth:`find_mixers` and :meth:`state_inputs`; a family with its own kernels overrides
    :meth:`chunk_states` / :meth:`states_at` (and :meth:`_forward` to run the model itself, as
    :class:`~retnet_forgetting.RetNetStateExtractor` does).

    Args:
        model: a causal LM of the family (fla's or this package's reference).
        chunk_size: chunk length of the chunked scan.
        state_dtype: dtype of returned states (accumulation is always fp32).
        position_block: requested positions processed at a time (bounds transient memory).
        layout: ``"kv"`` (``[H, Dk, Dv]``) or ``"native"`` (the layout of the model's own cache).
    """

    family = "abstract"
    hook_module = "attn"
    native_v_first = False  # the model's cache keeps states as [H, Dv, Dk]

    def __init__(self, model: nn.Module, chunk_size: int = scan.DEFAULT_CHUNK_SIZE,
                 state_dtype: torch.dtype = torch.float32, position_block: int = 64, layout: str = "kv"):
        if layout not in ("kv", "native"):
            raise ValueError(f"layout={layout!r}: expected 'kv' or 'native'")
        self.model = model
        self.mixers = self.find_mixers(model)
        self.num_layers = len(self.mixers)
        self.chunk_size, self.state_dtype = chunk_size, state_dtype
        self.position_block, self.layout = position_block, layout

    # ------------------------------------------------------------------ family interface
    @classmethod
    def find_mixers(cls, model: nn.Module) -> list[nn.Module]:
        """The token mixer of every layer, in order (raise TypeError when ``model`` is not of the family)."""
        raise NotImplementedError

    def state_inputs(self, mixer: nn.Module, x: torch.Tensor) -> StateInputs:
        """The state update's inputs from the mixer's input hidden states ``x [B, T, D]``."""
        raise NotImplementedError

    def chunk_states(self, inputs: StateInputs) -> object:
        """The layer's chunk scan, computed once per layer and handed to :meth:`states_at`."""
        return inputs.scan(self.chunk_size)

    def states_at(self, inputs: StateInputs, scanned: object, p: Pass, sl: slice) -> torch.Tensor:
        """States after the tokens at ``p.positions[:, sl]`` (checked): ``[B, n, ...]`` in ``state_dtype``
        and this extractor's layout."""
        u, log_a, h, _ = scanned
        s = scan.states_at_positions(inputs.k, u, log_a, p.positions[:, sl], h, self.chunk_size)
        return self._to_layout(s).to(self.state_dtype)

    # ------------------------------------------------------------------ public API
    def hook_name(self, layer: int, what: str = "state") -> str:
        return f"blocks.{layer}.{self.hook_module}.hook_{what}"

    @property
    def hook_names(self) -> list[str]:
        return [self.hook_name(layer) for layer in range(self.num_layers)]

    @torch.inference_mode()
    def extract_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       layers: Iterable[int] | None = None) -> dict[int, torch.Tensor]:
        """Final state per layer (after each row's last real token): ``{layer: [B, H, Dk, Dv]}``."""
        input_ids, attention_mask = self._inputs(input_ids, attention_mask)
        states = self.extract_states_at_positions(input_ids, last_columns(input_ids, attention_mask),
                                                  attention_mask, layers)
        return {layer: s[:, 0] for layer, s in states.items()}

    @torch.inference_mode()
    def extract_states_at_positions(self, input_ids: torch.Tensor, positions: torch.Tensor | list[int],
                                    attention_mask: torch.Tensor | None = None,
                                    layers: Iterable[int] | None = None) -> dict[int, torch.Tensor]:
        """States after the tokens at ``positions`` (``[K]`` or ``[B, K]`` columns of ``input_ids``):
        ``{layer: [B, K, H, Dk, Dv]}``."""
        out: dict[int, list[torch.Tensor]] = {}
        self._run(input_ids, attention_mask, positions, layers,
                  lambda layer, _pos, s, _inputs: out.setdefault(layer, []).append(s))
        return join_blocks(out)

    @torch.inference_mode()
    def extract_conv_states_at_positions(self, input_ids: torch.Tensor, positions: torch.Tensor | list[int],
                                         attention_mask: torch.Tensor | None = None,
                                         layers: Iterable[int] | None = None,
                                         ) -> dict[int, dict[str, torch.Tensor]]:
        """Short-convolution states at ``positions``: ``{layer: {name: [B, K, D, W]}}`` in fla's cache layout
        (the last ``W`` convolution inputs, newest last; empty dicts for mixers without convolutions)."""
        out: dict[int, dict[str, torch.Tensor]] = {}
        self._run(input_ids, attention_mask, positions, layers, None, conv_sink=out.__setitem__)
        return out

    @torch.inference_mode()
    def extract_states_single_pass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                   layers: Iterable[int] | None = None, sink: StateSink | None = None,
                                   reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                                   ) -> dict[int, torch.Tensor] | None:
        """The state at EVERY position, in blocks of ``position_block`` positions: to ``sink(layer,
        positions [B, n], states [B, n, ...])`` (after ``reduce``) when given, else returned as
        ``{layer: [B, T, ...]}`` (retnet-2.7B: 84 MB per position over its 32 layers in bf16, so stream
        long inputs). With padding only real positions are emitted (shorter rows repeat their last one so
        that blocks stay rectangular)."""
        input_ids, attention_mask = self._inputs(input_ids, attention_mask)
        B, T = input_ids.shape
        if attention_mask is None:
            positions = torch.arange(T).expand(B, T)
        else:
            index, lengths = right_align_index(attention_mask)
            positions = index.gather(1, torch.minimum(torch.arange(T)[None], (lengths - 1)[:, None]))
        out: dict[int, list[torch.Tensor]] = {}

        def keep(layer: int, pos: torch.Tensor, states: torch.Tensor, _inputs: StateInputs) -> None:
            states = reduce(states) if reduce is not None else states
            if sink is not None:
                sink(layer, pos, states)
            else:
                out.setdefault(layer, []).append(states)

        self._run(input_ids, attention_mask, positions, layers, keep, stream=True)
        return None if sink is not None else join_blocks(out)

    @torch.inference_mode()
    def run_with_cache(self, input_ids: torch.Tensor, positions: torch.Tensor | list[int] | None = None,
                       attention_mask: torch.Tensor | None = None, layers: Iterable[int] | None = None,
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(logits ``[B, T, V]``, ``{hook name: tensor}``) TransformerLens style: ``hook_state`` (final states
        ``[B, H, Dk, Dv]`` when ``positions`` is None, else ``[B, K, H, Dk, Dv]``) and, for mixers with short
        convolutions, ``hook_conv_state_{name}`` (``[B, D, W]`` / ``[B, K, D, W]``)."""
        input_ids, attention_mask = self._inputs(input_ids, attention_mask)
        final = positions is None
        if final:
            positions = last_columns(input_ids, attention_mask)
        out: dict[int, list[torch.Tensor]] = {}
        convs: dict[int, dict[str, torch.Tensor]] = {}
        logits = self._run(input_ids, attention_mask, positions, layers,
                           lambda layer, _p, s, _inputs: out.setdefault(layer, []).append(s),
                           conv_sink=convs.__setitem__, logits=True)
        cache = {self.hook_name(layer): s for layer, s in join_blocks(out).items()}
        for layer, named in convs.items():
            cache.update({self.hook_name(layer, f"conv_state_{name}"): c for name, c in named.items()})
        if final:
            cache = {name: s[:, 0] for name, s in cache.items()}
        return logits, cache

    @torch.no_grad()
    def extract_states_incremental(self, input_ids: torch.Tensor, positions: Iterable[int] | None = None,
                                   layers: Iterable[int] | None = None) -> dict[int, torch.Tensor]:
        """TEST ORACLE ONLY (O(N^2)): the model's own final recurrent state (``.states``, or its cache after
        ``model(input_ids[:, :t+1], use_cache=True)``) for each t: ``{layer: [B, K, H, Dk, Dv]}`` fp32, in
        this extractor's layout. No padding support."""
        T = input_ids.shape[1]
        positions = list(range(T)) if positions is None else [int(p) for p in positions]
        layers = self._layers(layers)
        per_pos = []
        for t in positions:
            out = self.model(input_ids[:, : t + 1], use_cache=True)
            states = getattr(out, "states", None)
            if states is None:
                states = [out.past_key_values[layer]["recurrent_state"] for layer in range(self.num_layers)]
            per_pos.append([self._to_layout(states[layer].float(), native_given=True) for layer in layers])
        return {layer: torch.stack([s[i] for s in per_pos], dim=1) for i, layer in enumerate(layers)}

    # ------------------------------------------------------------------ internals
    def _to_layout(self, states: torch.Tensor, native_given: bool = False) -> torch.Tensor:
        """Between the key-major layout and the model's own: transposes the last two dims when they differ."""
        want_native = self.layout == "native"
        if self.native_v_first and (want_native != native_given):
            return states.transpose(-1, -2)
        return states

    def _layers(self, layers: Iterable[int] | None) -> list[int]:
        chosen = list(range(self.num_layers)) if layers is None else sorted({int(x) for x in layers})
        bad = [x for x in chosen if not 0 <= x < self.num_layers]
        if bad or not chosen:
            raise ValueError(f"layers={bad or chosen}: expected indices in [0, {self.num_layers - 1}]")
        return chosen

    _inputs = staticmethod(check_inputs)
    _positions = staticmethod(check_positions)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _block(self, num_positions: int, stream: bool) -> int:
        """Positions per :meth:`states_at` call (``stream``: every position, sent on block by block)."""
        return self.position_block

    def _prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 positions: torch.Tensor | list[int], layers: Iterable[int] | None) -> Pass:
        """Check everything once on the host (no device syncs later) and move the inputs to the model."""
        input_ids, attention_mask = self._inputs(input_ids, attention_mask)
        B, T = input_ids.shape
        layers = self._layers(layers)
        given = self._positions(positions, B, T)
        positions, index = given, None
        if attention_mask is not None:  # right-align: causal outputs at real tokens do not change
            if not bool(attention_mask.gather(1, given).all()):
                raise ValueError("positions: some requested positions are padding (attention_mask == 0)")
            index, _ = right_align_index(attention_mask)
            positions = (attention_mask.cumsum(1) - 1).gather(1, given)
            input_ids = gather_rows(input_ids, index.to(input_ids.device))
        device = self._device()  # host -> device copies that do not wait for the device
        return Pass(input_ids.to(device, non_blocking=True), positions.to(device, non_blocking=True),
                    positions, given, index, layers)

    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
             positions: torch.Tensor | list[int], layers: Iterable[int] | None,
             emit: Callable[[int, torch.Tensor, torch.Tensor, StateInputs], None] | None,
             conv_sink: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
             logits: bool = False, stream: bool = False) -> torch.Tensor | None:
        """One forward pass; ``emit(layer, positions, states, inputs)`` per block of positions and
        ``conv_sink(layer, {name: [B, K, D, W]})`` once per layer. Returns the logits when asked for."""
        p = self._prepare(input_ids, attention_mask, positions, layers)
        K = p.positions.shape[1]
        block = max(1, self._block(K, stream))

        def at_layer(layer: int, inputs: StateInputs) -> object:
            scanned = None
            if emit is not None:
                scanned = self.chunk_states(inputs)
                for start in range(0, K, block):
                    sl = slice(start, start + block)
                    emit(layer, p.given[:, sl], self.states_at(inputs, scanned, p, sl), inputs)
            if conv_sink is not None:
                conv_sink(layer, {name: conv_windows(c, p.positions, inputs.conv_width).to(self.state_dtype)
                                  for name, c in inputs.conv.items()})
            return scanned

        result = self._forward(p, at_layer, logits)
        if result is not None and p.index is not None:
            result = gather_rows(result, torch.argsort(p.index.to(result.device), dim=1))
        return result

    def _forward(self, p: Pass, at_layer: LayerFn, logits: bool) -> torch.Tensor | None:
        """The model's own forward with pre-hooks on the requested mixers; stops after the deepest one
        unless ``logits``."""
        deepest = max(p.layers)

        def hook(layer: int) -> Callable:
            def pre_hook(mixer: nn.Module, args: tuple, kwargs: dict) -> None:
                at_layer(layer, self.state_inputs(mixer, args[0] if args else kwargs["hidden_states"]))
                if layer == deepest and not logits:
                    raise _StopForward
            return pre_hook

        handles = [self.mixers[layer].register_forward_pre_hook(hook(layer), with_kwargs=True)
                   for layer in p.layers]
        try:
            out = self.model(p.ids, use_cache=False)
        except _StopForward:
            return None
        finally:
            for handle in handles:
                handle.remove()
        return out.logits if hasattr(out, "logits") else out[0]


def join_blocks(parts: dict[int, list[torch.Tensor]]) -> dict[int, torch.Tensor]:
    """Blocks of positions joined along dim 1 (a single block is returned as is: no copy)."""
    return {layer: p[0] if len(p) == 1 else torch.cat(p, dim=1) for layer, p in parts.items()}


def last_columns(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Column of each row's last real token: ``[B, 1]``."""
    B, T = input_ids.shape
    if attention_mask is None:
        return torch.full((B, 1), T - 1, dtype=torch.long)
    return (attention_mask * torch.arange(1, T + 1)).argmax(1, keepdim=True)


def mixers_at(model: nn.Module, decoder_names: tuple[str, ...], mixer_name: str, class_names: tuple[str, ...],
              family: str) -> list[nn.Module]:
    """``model.<decoder>.layers[i].<mixer_name>`` for the first decoder attribute present; TypeError naming
    the family when the layers are missing or a mixer's class (or a base class) is not in ``class_names``."""
    decoder = next((getattr(model, n) for n in decoder_names if hasattr(model, n)), model)
    layers = getattr(decoder, "layers", None)
    mixers = [getattr(layer, mixer_name, None) for layer in layers] if layers is not None else []

    def ok(m: nn.Module | None) -> bool:
        return m is not None and any(c.__name__ in class_names for c in type(m).__mro__)

    if not mixers or not all(ok(m) for m in mixers):
        raise TypeError(f"model: expected a {family} model (model.{'|'.join(decoder_names)}.layers[i]."
                        f"{mixer_name} of class {' or '.join(class_names)}), got {type(model).__name__}")
    return mixers
