"""Corpus → tokenized, packed, fixed-length token shards with a manifest. See `pipeline` for the design.

    python -m runtime.prepare --plan plan.json [--workers N] [--no-progress] [--json]

Output in `prepared_dir`: `train-00000.bin`, … and `validation-00000.bin`, … (raw little-endian uint16 or
uint32 arrays of shape sequences × seq_len; every sample is exactly seq_len tokens, documents joined by EOS,
the final remainder dropped), and `manifest.json` (`Manifest`), written last. Optional filters drop documents
that hold benchmark items (`DecontaminationSettings`) and duplicates (`DedupSettings`) before tokenizing counts.
"""

from .filters import BenchmarkItem, DecontaminationSettings, DedupSettings, benchmark_items
from .manifest import FORMAT_VERSION, FilterStats, Manifest, SplitStats, TokenizerInfo, load_manifest
from .from_plan import prepare_from_plan
from .pipeline import prepare_corpus
from .shards import ShardInfo
from .sources import InputFile, PrepareError

__all__ = [
    "FORMAT_VERSION",
    "BenchmarkItem",
    "DecontaminationSettings",
    "DedupSettings",
    "FilterStats",
    "InputFile",
    "Manifest",
    "PrepareError",
    "ShardInfo",
    "SplitStats",
    "TokenizerInfo",
    "benchmark_items",
    "load_manifest",
    "prepare_corpus",
    "prepare_from_plan",
]
