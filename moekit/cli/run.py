"""`moekit run MODEL --budget 512MB --prompt "..."`: generate with routed experts offloaded to an on-disk store."""

from __future__ import annotations

from pathlib import Path

import typer
from rich import box
from rich.table import Table

from moekit.cli import app, console, print_json, progress_bar
from moekit.cli.runtime_flags import runtime_options
from moekit.errors import UserError


@app.command()
@runtime_options
def run(
    model: Path = typer.Argument(..., help="Hugging Face checkpoint folder of an MoE causal LM"),
    prompt: str = typer.Option(..., "--prompt", "-p", help="text to continue (with --chat: the user's message)"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy (default); > 0: sample"),
    top_p: float = typer.Option(1.0, "--top-p", help="nucleus sampling: keep the smallest set with this mass"),
    top_k: int = typer.Option(0, "--top-k", help="sample among the k most likely tokens (0: all)"),
    seed: int = typer.Option(None, "--seed", help="sampling seed (same seed, same text; as `moekit serve`'s seed)"),
    chat: bool = typer.Option(False, "--chat", help="wrap the prompt as a user message in the model's chat template"),
    scmoe: str = typer.Option(None, "--scmoe", help="self-contrast decoding (SCMoE): 'alpha=0.1,beta=0.5,rank=2' or "
                                                    "'default' (two passes per token, greedy)"),
    stats: bool = typer.Option(False, "--stats", help="print per-layer cache and prefetch counters"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object (text + counters) instead"),
    runtime=None,
) -> None:
    """Generate with experts on disk behind a byte budget (experts unfused into a store once); greedy by default."""
    import time

    import torch
    from transformers import LogitsProcessorList, TextStreamer

    import moekit.runtime as rt
    from moekit.models.validate import check_routing
    from moekit.routing.scmoe import generate as scmoe_generate
    from moekit.routing.scmoe import parse_contrast
    from moekit.runtime.sampling import SamplerLogitsProcessor, SamplingParams

    if not prompt:
        raise UserError("--prompt is empty: give the text to continue, e.g. --prompt \"def fibonacci(n):\"")
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)  # checked before loading
    contrast = parse_contrast(scmoe)
    if contrast is not None and not params.greedy:
        raise UserError("--scmoe decodes greedily (SCMoE's plausibility-masked argmax): leave out --temperature")
    checked = rt.check_offloaded(model, runtime)  # the checkpoint, budget and routing: before a weight is read
    if contrast is not None:
        check_routing(contrast.weak(), checked.skeleton)
    om = rt.open_offloaded(model, runtime, progress=progress_bar, checked=checked)
    tok, view = om.tokenizer, om.view
    try:  # what needs the tokenizer's output (a template, tokens at all) comes after the load: close it first
        ids = torch.tensor([prompt_ids(tok, prompt, chat)], dtype=torch.long, device=runtime.resolved_device())
        if ids.shape[1] == 0:
            raise UserError(f"--prompt {prompt!r} gives no tokens with {model}'s tokenizer: give some text")
    except UserError:
        om.close()
        raise
    streamer = None if json_out else TextStreamer(tok, skip_prompt=chat, skip_special_tokens=True)
    sampler = LogitsProcessorList([] if params.greedy else [SamplerLogitsProcessor(params)])
    routing = om.routing_policy.for_prompt(prompt) if om.routing_policy is not None else None  # C3PO: the prompt
    om.routing_hooks.set_all(routing)
    t0 = time.perf_counter()
    with torch.no_grad():
        if contrast is not None:
            out = scmoe_generate(view.model, om.routing_hooks, ids, contrast, routing, max_new_tokens,
                                 tok.eos_token_id)
            if streamer is not None:
                console.print(tok.decode(out[0, ids.shape[1]:] if chat else out[0], skip_special_tokens=True))
        else:
            out = view.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                                      logits_processor=sampler, pad_token_id=tok.pad_token_id
                                      if tok.pad_token_id is not None else tok.eos_token_id)
    seconds = time.perf_counter() - t0
    new = out.shape[1] - ids.shape[1]
    summary = {"budget": om.budget, "experts_per_layer": om.capacity, "policy": runtime.policy,
               **({"routing": om.routing_policy.spec()} if om.routing_policy is not None else {}),
               "new_tokens": new,
               "seconds": seconds, "tokens_per_s": new / seconds, **om.totals()}
    if json_out:
        print_json({"text": tok.decode(out[0, ids.shape[1]:] if chat else out[0], skip_special_tokens=True),
                    **summary, **({"layers": om.stats()} if stats else {})})
    elif stats:
        console.print(stats_table(om.stats(), summary))
    om.close()


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    """The prompt's token ids; with chat, the model's chat template around one user message (tokenised by the
    template itself: its BOS is the only one)."""
    if not chat:
        return tokenizer(prompt).input_ids
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("this model's tokenizer has no chat template: leave out --chat, or add one "
                        "(tokenizer.chat_template, saved as chat_template.jinja in the model folder)")
    return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


def stats_table(rows: list[dict], summary: dict) -> Table:
    """Per-layer counters; the prefetch columns only when something was prefetched, the low-bit one only when used."""
    from moekit.runtime import format_bytes

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,  # every column fits 80 characters
                  title=f"{summary['new_tokens']} tokens in {summary['seconds']:.2f} s "
                        f"({summary['tokens_per_s']:.2f} tok/s), policy {summary['policy']}, "
                        + (f"routing {summary['routing']}, " if "routing" in summary else "") +
                        f"{summary['experts_per_layer']} experts/layer")
    columns = {"layer": lambda r: str(r["layer"]), "hits": lambda r: str(r["hits"]),
               "misses": lambda r: str(r["misses"]), "rate": lambda r: f"{r['hit_rate']:.3f}",
               "read": lambda r: format_bytes(r["bytes_read"])}
    if summary["prefetch_reads"]:
        columns.update({"pre P": lambda r: f"{r['prefetch_precision']:.2f}",
                        "pre R": lambda r: f"{r['prefetch_recall']:.2f}"})
    if summary["lowbit_reads"]:
        columns["low-bit"] = lambda r: str(r["lowbit_reads"])
    columns.update({"comp s": lambda r: f"{r['compute_s']:.3f}", "wait s": lambda r: f"{r['wait_s']:.3f}"})
    table.caption = "rate: hit rate; " + ("pre P / R: prefetch precision / recall; " if "pre P" in columns else "") \
        + "comp s / wait s: seconds computing / waiting for reads"
    for col in columns:
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows + [{**summary, "layer": "all"}]:
        table.add_row(*(cell(r) for cell in columns.values()))
    return table
