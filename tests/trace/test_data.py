"""--max-tokens is split equally across data sources; a short source hands its unused share on."""

from collections import Counter

from moekit.trace.data import resolve_data, sequences


def _tokens_per_domain(tmp_path, sizes, max_tokens):
    specs = []
    for name, n in sizes.items():
        (tmp_path / f"{name}.txt").write_text("x" * n)
        specs.append(str(tmp_path / f"{name}.txt"))
    counts = Counter()
    for seq in sequences(resolve_data(specs), lambda text: [0] * len(text), seq_len=7, max_tokens=max_tokens):
        counts[seq.domain] += len(seq.token_ids)
    return counts


def test_budget_is_shared_equally(tmp_path):
    assert _tokens_per_domain(tmp_path, {"a": 100, "b": 100, "c": 100}, 60) == {"a": 20, "b": 20, "c": 20}


def test_unused_share_goes_to_later_sources(tmp_path):
    assert _tokens_per_domain(tmp_path, {"a": 5, "b": 100, "c": 100}, 61) == {"a": 5, "b": 28, "c": 28}


def test_no_budget_reads_everything(tmp_path):
    assert _tokens_per_domain(tmp_path, {"a": 5, "b": 9}, None) == {"a": 5, "b": 9}


def test_skip_tokens_drops_each_sources_first_windows(tmp_path):
    (tmp_path / "a.txt").write_text("".join(chr(65 + i % 26) for i in range(30)))
    (tmp_path / "b.txt").write_text("x" * 30)
    encode = lambda text: [ord(c) for c in text]  # noqa: E731
    full = [s for s in sequences(resolve_data([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]), encode, 7)]
    kept = [s for s in sequences(resolve_data([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]), encode, 7,
                                 skip_tokens=28)]  # 14 per source: two whole windows each
    assert [s.start for s in kept if s.domain == "a"] == [14, 21, 28]
    assert [s.start for s in kept if s.domain == "b"] == [14, 21, 28]
    assert [s.token_ids.tolist() for s in kept if s.domain == "a"] == \
        [s.token_ids.tolist() for s in full if s.domain == "a"][2:]
