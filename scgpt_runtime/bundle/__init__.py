"""Model bundles: the one contract between export and the runtime (docs/bundle-format.md).

BUNDLE/
  config.json                  format, version, model, preprocessing, inputs, graphs by kind
                               with their validation errors, provenance, sha256 of every file
  vocab.safetensors            token names (and namespaces), label names, gene panel
  genes.safetensors            gene embeddings, one row per vocabulary id (optional: bundles
                               exported before them lack it)
  {kind}-{precision}.onnx      one graph per kind and precision, serving every length
  evaluation.json              metrics recorded after export (optional)

This package is the only code that knows the layout: format.py (names, parts, encodings),
read.py (versions 1 and 2), write.py (version 2).
"""

from .format import (
    CELL_EMB,
    CELL_EMB_NORMALIZED,
    CLASS_PROBS,
    CONFIG_FILE,
    EMBED,
    FORMAT_VERSION,
    PRECISIONS,
    Bundle,
    Graphs,
    Variant,
    graph_file,
)
from .read import load_bundle, load_gene_embeddings
from .write import check_target, record_evaluation, write_bundle

__all__ = [
    "CELL_EMB",
    "CELL_EMB_NORMALIZED",
    "CLASS_PROBS",
    "CONFIG_FILE",
    "EMBED",
    "FORMAT_VERSION",
    "PRECISIONS",
    "Bundle",
    "Graphs",
    "Variant",
    "check_target",
    "graph_file",
    "load_bundle",
    "load_gene_embeddings",
    "record_evaluation",
    "write_bundle",
]
