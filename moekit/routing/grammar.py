"""The small grammar of routing specs, shared by the policies' `from_spec` parsers (moekit/routing/spec.py).

Errors are ValueError with the reason; spec.parse turns them into one UserError line with the policy's example."""

from __future__ import annotations


def options(tokens: list[str], allowed: set[str]) -> dict[str, str]:
    out = {}
    for t in tokens:
        key, eq, val = t.partition("=")
        if key not in allowed:
            raise ValueError(f"unknown option {key!r} (options: {', '.join(sorted(allowed)) or 'none'})")
        out[key] = val if eq else "true"
    return out


def layers(text: str | None) -> frozenset[int] | None:
    if text is None:
        return None
    out = set()
    for piece in text.split("/"):
        a, dash, b = piece.partition("-")
        out.update(range(int(a), int(b) + 1) if dash else [int(a)])
    return frozenset(out)


def number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{what} must be a number, got {text!r}") from None


def pairs(tokens: list[str]) -> dict[int, tuple[int, ...]]:
    out: dict[int, list[int]] = {}
    for t in tokens:
        layer, colon, expert = t.partition(":")
        if not colon:
            raise ValueError(f"{t!r} is not LAYER:EXPERT")
        out.setdefault(int(layer), []).append(int(expert))
    if not out:
        raise ValueError("no LAYER:EXPERT pairs")
    return {l: tuple(dict.fromkeys(ids)) for l, ids in out.items()}


def strength_pairs(value: str) -> tuple[float, dict[int, tuple[int, ...]]]:
    strength, at, rest = value.partition("@")
    if not at:
        raise ValueError("missing '@' between the strength and the LAYER:EXPERT pairs")
    return number(strength, "the strength"), pairs(rest.split(","))
