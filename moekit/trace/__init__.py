"""Routing traces: capture hooks, the versioned Parquet schema, a resumable writer and a lazy reader.

    moekit.trace.record(model, ["code", "prose"], "traces/demo")   # or `moekit trace MODEL --data code,prose --out DIR`
    t = moekit.trace.open("traces/demo"); t.ids(layer)  # [T, K]

Layout and schema: moekit/trace/schema.py and docs/traces.md.
"""

from moekit.trace.reader import Trace, open, read_manifest  # noqa: A004
from moekit.trace.record import TraceOptions, record
from moekit.trace.schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "Trace", "TraceOptions", "open", "read_manifest", "record"]
