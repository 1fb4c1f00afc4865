"""Per-token prediction error as HTML."""

from __future__ import annotations

import html

import torch
import torch.nn.functional as F

SATURATION_NATS = 7.0


def token_surfaces(ids: list[int], tokenizer) -> list[str]:
    """Surface strings of ``ids`` that concatenate to ``tokenizer.decode(ids)`` exactly (each token's
    string is what decoding it adds to the decoded prefix; the last one absorbs any mismatch)."""
    surfaces, prev = [], ""
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n])
        if text.startswith(prev):
            surfaces.append(text[len(prev):])
            prev = text
        else:  # decoding is not prefix-stable here (e.g. merged whitespace): defer to later tokens
            surfaces.append("")
    full = tokenizer.decode(ids)
    if "".join(surfaces) != full:
        surfaces[-1] += full[len("".join(surfaces)):] if full.startswith("".join(surfaces)) else ""
    return surfaces


@torch.no_grad()
def visualize_prediction_error(model, tokens: torch.Tensor | list[int], tokenizer) -> str:
    """HTML of the text with each token's background from white (0 nats) to red (>= 7 nats) by the
    cross-entropy of predicting it from the previous tokens (the first token has no prediction: white)."""
    ids = torch.as_tensor(tokens, dtype=torch.long).flatten()
    if ids.numel() == 0:
        raise ValueError("tokens: expected at least one token")
    device = next(model.parameters()).device
    logits = model(ids[None].to(device))[0].float()
    losses = [0.0] + F.cross_entropy(logits[:-1], ids[1:].to(device), reduction="none").tolist()
    parts = []
    for surface, loss in zip(token_surfaces(ids.tolist(), tokenizer), losses):
        s = min(max(loss, 0.0) / SATURATION_NATS, 1.0)
        gb = round(255 * (1 - s))
        parts.append(f'<span style="background-color: rgb(255, {gb}, {gb})" title="{loss:.2f} nats">'
                     f"{html.escape(surface)}</span>")
    return ('<div style="font-family: monospace; white-space: pre-wrap; line-height: 1.6">'
            + "".join(parts) + "</div>")
