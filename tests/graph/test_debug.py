"""graph.debug: per-node SQNR, worst first, finds a layer quantized too coarsely."""

from __future__ import annotations

import math

from edgequant import graph
from edgequant.recipe import Recipe, Rule
from edgequant.schemes import Scheme


def test_the_worst_node_is_the_layer_quantized_to_int2(cnn, images):
    x, calibration = images
    recipe = Recipe(
        (
            Rule(Scheme("int8", activation="int8_static"), role="default"),
            Rule(Scheme("int2", activation="int8_static"), module="features.1.conv"),
        )
    )
    converted = graph.quantize(cnn, (x,), recipe, calibration=calibration, backend="generic")
    report = graph.debug(cnn, converted, (x,))
    assert report.worst.node == "conv2d_1" and report.worst.module == "features.1.conv"
    # measured: the int2 layer 10.1 dB by itself, every other node 41 dB or more locally
    assert report.worst.local_sqnr_db < 15.0
    assert all(r.local_sqnr_db > 30.0 for r in report.rows[1:])
    # errors propagate: the classifier's end-to-end SQNR is far below its own
    fc = next(r for r in report.rows if r.module == "classifier")
    assert fc.sqnr_db < fc.local_sqnr_db - 10
    table = report.table(3).splitlines()
    assert table[0] == "| node | op | module | local SQNR dB | SQNR dB |"
    assert table[2].startswith("| conv2d_1 | conv2d.default | features.1.conv | ")
    assert len(table) == 5


def test_a_float_graph_against_itself_is_exact(cnn, images):
    x, _ = images
    gm = graph.capture(cnn, (x,))
    report = graph.debug(cnn, gm, (x,))
    assert report.rows and all(math.isinf(r.local_sqnr_db) for r in report.rows)
