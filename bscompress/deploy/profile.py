"""Per-layer latency in ONNX Runtime: which PyTorch modules the time goes to.

ONNX Runtime's profiler times every kernel of the *optimised* session graph, whose nodes no
longer match the exported ones one to one (Conv+BatchNorm and Conv+ReLU fusions, NCHWc layout
rewrites with ``ReorderInput``/``ReorderOutput`` nodes). Each profiled kernel is mapped back
to a module of the model:

1. a kernel whose weight is an initializer named after a parameter (the dynamo exporter keeps
   ``layer1.0.conv1.dw.weight``) belongs to that parameter's module, fused BatchNorm or not;
2. otherwise the kernel's name (ORT names rewritten nodes after the node or the output value
   they replace) is looked up among the exported nodes and their outputs, and the module is
   the innermost module scope the exporter recorded (``pkg.torch.onnx.name_scopes``); a fused
   convolution named after its activation is followed back to the convolution feeding it;
3. layout reorders and anything unmatched are reported under ``(layout)`` / ``(op Name)``.
"""

from __future__ import annotations

import ast
import json
import re
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

_WEIGHTED_OPS = {"Conv", "FusedConv", "NchwcConv", "Gemm", "MatMul", "FusedGemm",
                 "ConvTranspose", "QLinearConv"}


@dataclass
class LayerTime:
    """Time one module took per run.

    Attributes:
        module: the module's qualified name (``layer1.0.conv1.dw``), or ``(layout)`` /
            ``(op Name)`` for kernels with no module.
        ops: ONNX Runtime kernel op types that ran for it.
        ms: mean milliseconds per run.
        share: fraction of the summed kernel time of a run.
    """

    module: str
    ops: list[str]
    ms: float
    share: float

    def to_dict(self) -> dict:
        return asdict(self)


def node_modules(model) -> dict[str, tuple[str, str]]:
    """Map the names of an exported ``onnx.ModelProto``'s nodes and outputs to modules.

    Returns:
        ``name -> (module, op_type)`` for every node name and every output value name.
    """
    initializers = {init.name for init in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    table: dict[str, tuple[str, str]] = {}

    def weight_module(node) -> str | None:
        for name in node.input[1:2]:
            if name in initializers and name.endswith(".weight"):
                return name.removesuffix(".weight")
        return None

    def scope_module(node) -> str:
        meta = {p.key: p.value for p in node.metadata_props}
        try:
            scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        except (ValueError, SyntaxError):
            scopes = []
        # the last entry is the traced op itself; the one before is its module
        return (scopes[-2] or "(model)") if len(scopes) >= 2 else "(model)"

    for node in model.graph.node:
        module = weight_module(node) or scope_module(node)
        for key in (node.name, *node.output):
            table.setdefault(key, (module, node.op_type))
    # a fused conv named after its activation: attribute it to the conv feeding the activation
    for node in model.graph.node:
        if node.op_type in _WEIGHTED_OPS or not node.input:
            continue
        source = producer.get(node.input[0])
        if source is not None and source.op_type in _WEIGHTED_OPS:
            conv = table[source.name][0]
            for key in (node.name, *node.output):
                table[f"{key}\0fused"] = (conv, source.op_type)
    return table


def _module_of(event: dict, table: dict[str, tuple[str, str]]) -> str:
    op = event.get("args", {}).get("op_name", "?")
    if op in ("ReorderInput", "ReorderOutput"):
        return "(layout)"
    base = event["name"].removesuffix("_kernel_time")
    for candidate in (base, re.sub(r"_nchwc$", "", base), re.sub(r"_token_\d+$", "", base)):
        if candidate not in table:
            continue
        if op in _WEIGHTED_OPS and table[candidate][1] not in _WEIGHTED_OPS:
            fused = table.get(f"{candidate}\0fused")
            if fused is not None:
                return fused[0]
        return table[candidate][0]
    return f"(op {op})"


def profile_onnx(
    path: str | Path,
    input_shape: Sequence[int],
    runs: int = 20,
    warmup: int = 5,
    threads: int | None = None,
    seed: int = 0,
) -> list[LayerTime]:
    """Time each module of an exported model in ONNX Runtime (CPU), slowest first.

    Args:
        path: an ONNX file written by ``export_onnx`` (names and scopes from the dynamo
            exporter).
        input_shape: the input fed, with batch (e.g. ``[1, 3, 224, 224]``).
        runs: profiled runs, after ``warmup`` runs that are not profiled.
        threads: intra-op threads (default: ONNX Runtime's).
    """
    import onnx
    import onnxruntime as ort

    table = node_modules(onnx.load(str(path), load_external_data=False))
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: np.random.default_rng(seed).standard_normal(
            [int(s) for s in input_shape], dtype=np.float32)}
        for _ in range(warmup + runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    # kernels of the warm-up runs (allocation, first-touch) are left out
    model_runs = sorted((e["ts"], e["dur"]) for e in events
                        if e.get("cat") == "Session" and e.get("name") == "model_run")
    start = model_runs[warmup][0] if len(model_runs) > warmup else 0
    micros: dict[str, float] = defaultdict(float)
    ops: dict[str, set[str]] = defaultdict(set)
    for event in events:
        if (event.get("cat") != "Node" or not event["name"].endswith("_kernel_time")
                or event.get("ts", 0) < start):
            continue
        module = _module_of(event, table)
        micros[module] += float(event.get("dur", 0))
        ops[module].add(event.get("args", {}).get("op_name", "?"))
    total = sum(micros.values()) or 1.0
    layers = [LayerTime(m, sorted(ops[m]), us / runs / 1e3, us / total)
              for m, us in micros.items()]
    return sorted(layers, key=lambda layer: -layer.ms)
