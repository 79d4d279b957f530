"""Graph mode: recipe-driven quantization of any exported model, on torchao's PT2E engine.

::

    from edgequant import graph
    converted = graph.quantize(model, (x,), "int8-static", calibration=[(x,) for x in batches])
    print(graph.debug(model, converted, (x,)).table(5))   # the nodes that lost most, worst first
    graph.to_pte(converted, (x,), "model.pte")            # XNNPACK program

`RecipeQuantizer` is a PT2E `Quantizer` (compose it with others through `ComposableQuantizer`);
`edgequant.graph.backends` holds what each backend can represent. Needs the ``executorch``
extra (torchao's PT2E engine and ExecuTorch's pattern annotators).
"""

from torchao.quantization.pt2e import FakeQuantizeBase, ObserverBase
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.quantization.pt2e.quantizer import ComposableQuantizer

from edgequant.graph.backends import BACKENDS, Backend
from edgequant.graph.debug import DebugReport, NodeError, debug
from edgequant.graph.quantizer import Decision, RecipeQuantizer
from edgequant.graph.workflow import calibrate, capture, convert, prepare, quantize, to_pte

__all__ = [
    "BACKENDS",
    "Backend",
    "ComposableQuantizer",
    "DebugReport",
    "FakeQuantizeBase",
    "ObserverBase",
    "Decision",
    "NodeError",
    "RecipeQuantizer",
    "calibrate",
    "capture",
    "convert",
    "convert_pt2e",
    "debug",
    "prepare",
    "prepare_pt2e",
    "quantize",
    "to_pte",
]
