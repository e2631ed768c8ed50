"""Constant folding and dead-code removal of an exported graph (onnxscript's optimizer).

What it does: folds only small tensors (``input_size_limit``), so the large lazy weights are not read here; small
ones (norm weights, biases) are, by the initializer-deduplication pass. TensorRT's parser needs it: it wants e.g.
ReduceMean axes as constants, not as a Reshape of constants. An error a lazy weight raised while being read (a
NaN norm: export/weights.py's CheckpointError) is re-raised as itself, not wrapped in the optimizer's PassError.

What it does not do: quantize (graphs/quantize.py runs after it, so the optimizer never folds a dequantize back
into a float weight) or fuse anything.
"""

from __future__ import annotations

import logging


def fold_constants(model, keep: tuple[type[BaseException], ...] = ()) -> None:
    """Optimize `model` in place; an exception of a type in `keep` found in the cause chain is raised as is."""
    import onnxscript.optimizer

    logging.getLogger("onnxscript").setLevel(logging.ERROR)
    try:
        onnxscript.optimizer.optimize_ir(model, num_iterations=2, input_size_limit=1024, output_size_limit=1 << 16,
                                         inline=False)
    except Exception as e:  # noqa: BLE001 - the passes wrap what a lazy weight raised in PassError
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, keep):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None
