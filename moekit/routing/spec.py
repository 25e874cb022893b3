"""Reading routing specs (`--routing "top-p=0.5,renorm+mask=1:3"`) and steering files (`--steer FILE`).

A malformed spec or file is a UserError of one line naming the known policies or the field at fault.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from moekit.errors import UserError
from moekit.routing import policies as P

STEERING_SCHEMA = "moekit.steering"
STEERING_VERSION = 1
ACTIONS = ("force", "mask", "steer", "scale")


def parse(spec: str | None, steer: str | Path | None = None) -> P.Routing | None:
    """`--routing SPEC` and `--steer FILE` -> a Routing (None when both are empty: the stock routing)."""
    policies = [] if not spec or spec.strip() in ("", "stock") else [_one(part) for part in spec.split("+")]
    if steer is not None:
        policies += read_steering(Path(steer))
    return P.Routing(policies) if policies else None


def parse_request(spec: str) -> P.Routing | None:
    """A routing spec sent with one request (`moekit serve`'s `routing` body field): the same grammar, except that a
    request never names a file for the server to open (replay=TRACE, c3po=REF) nor makes it calibrate (skip=auto);
    the server's own --routing may do both, once, at start-up. "stock": the model's own routing."""
    if spec.strip() == "stock":
        return None
    for part in spec.split("+"):
        name, _, value = part.strip().partition("=")
        cls = P.POLICIES.lookup(name.strip())
        if cls.reads_files:
            raise UserError(f"{name.strip()}=... reads a file, which a request may not name: start the server with "
                            f"--routing {part.strip()} instead")
        if cls is P.Skip and value.split(",")[0].strip() == "auto":
            raise UserError("skip=auto calibrates on data: give skip=BETA per request, or start the server with "
                            "--routing skip=auto")
    return parse(spec)


def _one(part: str) -> P.Policy:
    part = part.strip()
    name, _, value = part.partition("=")
    cls = P.POLICIES.lookup(name.strip())  # unknown names: one line listing the known ones
    if not value:
        raise UserError(f"--routing {part!r}: {cls.name} needs a value, e.g. {cls.example}")
    try:
        return cls.from_spec(value.strip())
    except UserError:
        raise
    except (ValueError, IndexError) as err:
        raise UserError(f"--routing {part!r}: {err}; write it like {cls.example}") from None


# ---------------------------------------------------------------- steering files


def steering_document(entries: list[dict], meta: dict) -> dict:
    """A steering file's JSON: {"schema", "version", "meta", "experts": [{layer, expert, action, strength}]}."""
    return {"schema": STEERING_SCHEMA, "version": STEERING_VERSION, "meta": meta, "experts": entries}


def write_steering(path: Path, entries: list[dict], meta: dict) -> None:
    from moekit.files import write_json

    doc = steering_document(entries, meta)
    policies_from_steering(doc, path)  # never write a file that would not read back
    write_json(path, doc)


def read_steering(path: Path) -> list[P.Policy]:
    if not path.is_file():
        raise UserError(f"--steer {path}: no such file (write one with `moekit experts find ... --out {path}`)")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"--steer {path}: not JSON ({err})") from None
    policies = policies_from_steering(doc, path)
    for p in policies:  # a refusal against the model names the file (policies.Routing.check)
        p.source = f"--steer {path}"
    return policies


def policies_from_steering(doc, path) -> list[P.Policy]:
    """Steering entries -> policies: forced and masked experts, one soft-steer and one scale policy per strength."""
    def bad(field: str, why: str):
        return UserError(f"--steer {path}: {field} {why}")

    if not isinstance(doc, dict) or doc.get("schema") != STEERING_SCHEMA:
        raise bad("schema", f"must be {STEERING_SCHEMA!r} (a file written by `moekit experts find`)")
    if doc.get("version") != STEERING_VERSION:
        raise bad("version", f"is {doc.get('version')!r}; this moekit reads version {STEERING_VERSION}")
    entries = doc.get("experts")
    if not isinstance(entries, list):
        raise bad("experts", "must be a list of {layer, expert, action, strength}")
    groups: dict[tuple[str, float], dict[int, list[int]]] = {}
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise bad(f"experts[{i}]", "must be an object")
        for key in ("layer", "expert"):
            if not isinstance(e.get(key), int) or isinstance(e.get(key), bool) or e[key] < 0:
                raise bad(f"experts[{i}].{key}", f"must be an integer >= 0, got {e.get(key)!r}")
        if e.get("action") not in ACTIONS:
            raise bad(f"experts[{i}].action", f"must be one of {', '.join(ACTIONS)}, got {e.get('action')!r}")
        strength = e.get("strength", 0.0 if e["action"] in ("force", "mask") else None)
        if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not math.isfinite(strength):
            raise bad(f"experts[{i}].strength", f"must be a finite number, got {strength!r}")
        key = (e["action"], float(strength) if e["action"] in ("steer", "scale") else 0.0)
        groups.setdefault(key, {}).setdefault(e["layer"], []).append(e["expert"])
    out = []
    for (action, strength), experts in groups.items():
        pairs = {l: tuple(dict.fromkeys(ids)) for l, ids in experts.items()}
        out.append({"force": lambda: P.Force(pairs), "mask": lambda: P.Mask(pairs),
                    "steer": lambda: P.Steer(pairs, lam=strength),
                    "scale": lambda: P.Scale(pairs, beta=strength)}[action]())
    return out
