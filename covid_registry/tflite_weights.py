"""Weight-only int8 for the dense layers of a float32 TFLite file, everything else left float32.

A fine-tuned MobileNetV2 moves by more than its bounds when its convolutions get smaller weights
(float16 or int8: BENCHMARKS.md, "Phone app"), yet most of its bytes are the paper's flatten-dense head.
Here each large ``FULLY_CONNECTED`` weight tensor is stored as int8 with one scale per output unit
(symmetric, zero point 0) behind a ``DEQUANTIZE`` op, the layout the TFLite converter itself uses for
float16 weights: the runtime expands the weights to float32 once, and every op still computes in
float32. Activations are never quantised (unlike the converter's dynamic-range int8, whose hybrid
kernels quantise them on the fly). The converter has no option to quantise only some layers, so the
flatbuffer is edited with TensorFlow's own schema bindings (``tensorflow.lite.tools.flatbuffer_utils``).
"""

from __future__ import annotations

import copy

import numpy as np

# Only the large kernels (a flatten head's: 4 MB and more in float32) hold the bytes; the small ones, the
# classifier's last layer among them, would save kilobytes and move the probabilities most.
MIN_ELEMENTS = 1 << 20


def _schema():
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    return schema, flatbuffer_utils


def _builtin(code) -> int:
    # Operator codes past 127 live in builtinCode; older files keep the deprecated byte field.
    return max(code.builtinCode, code.deprecatedBuiltinCode)


def _dequantize_opcode(model, schema) -> int:
    for i, code in enumerate(model.operatorCodes):
        if _builtin(code) == schema.BuiltinOperator.DEQUANTIZE:
            return i
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.DEQUANTIZE
    code.version = 4  # int8 input with per-channel scales
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def quantize_per_row(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weights, float32 scale per output unit) of an ``[out, in]`` weight matrix, symmetric:
    ``w ≈ q * scale[:, None]``, the largest magnitude of each row at ±127."""
    scale = np.abs(w).max(axis=1) / 127.0
    scale[scale == 0] = 1.0  # an all-zero row stays zero
    q = np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def int8_dense_weights(flatbuffer: bytes) -> tuple[bytes, int]:
    """The float32 model ``flatbuffer`` with its large dense weights as int8: (new flatbuffer, how many
    weight tensors were quantised). Raises ``ValueError`` on a file that is not float32 where it edits."""
    schema, fb = _schema()
    model = fb.read_model_from_bytearray(bytearray(flatbuffer))
    # A buffer that several tensors share (the converter merges equal constants) is left float32: the
    # other tensors would read its new int8 bytes as float32.
    users: dict[int, int] = {}
    for graph in model.subgraphs:
        for tensor in graph.tensors:
            users[tensor.buffer] = users.get(tensor.buffer, 0) + 1
    dequantize = None
    done = 0
    for graph in model.subgraphs:
        expand = []
        for op in graph.operators:
            if _builtin(model.operatorCodes[op.opcodeIndex]) != schema.BuiltinOperator.FULLY_CONNECTED:
                continue
            index = op.inputs[1]
            tensor = graph.tensors[index]
            data = model.buffers[tensor.buffer].data
            if tensor.type != schema.TensorType.FLOAT32 or data is None or len(data) // 4 < MIN_ELEMENTS:
                continue  # a weight computed at run time, already compact, or small
            if users[tensor.buffer] > 1:
                continue
            if len(tensor.shape) != 2:
                raise ValueError(f"dense weights {tensor.name!r} of shape {list(tensor.shape)} are not [out, in]")
            w = np.frombuffer(bytes(data), dtype=np.float32).reshape(tensor.shape)
            q, scale = quantize_per_row(w)
            packed = copy.deepcopy(tensor)
            packed.name = (tensor.name or b"weights") + b"/int8"
            packed.type = schema.TensorType.INT8
            packed.quantization = schema.QuantizationParametersT()
            packed.quantization.scale = scale.tolist()
            packed.quantization.zeroPoint = [0] * len(scale)
            packed.quantization.quantizedDimension = 0
            model.buffers[tensor.buffer].data = np.frombuffer(q.tobytes(), dtype=np.uint8)
            graph.tensors.append(packed)
            # The float32 tensor the op reads is now DEQUANTIZE's output, with no data of its own.
            model.buffers.append(schema.BufferT())
            tensor.buffer = len(model.buffers) - 1
            if dequantize is None:
                dequantize = _dequantize_opcode(model, schema)
            op_ = schema.OperatorT()
            op_.opcodeIndex, op_.inputs, op_.outputs = dequantize, [len(graph.tensors) - 1], [index]
            expand.append(op_)
            done += 1
        graph.operators = expand + graph.operators  # weights first: the ops stay in topological order
    return bytes(fb.convert_object_to_bytearray(model)), done


def dense_weight_share(keras_model) -> float:
    """The share of ``keras_model``'s weights that :func:`int8_dense_weights` would store as int8 (the
    kernels of its Dense layers with at least ``MIN_ELEMENTS`` values, nested models included)."""
    import keras

    def layers(layer):
        yield layer
        for sub in getattr(layer, "layers", []):  # a nested model (a transfer backbone) and its layers
            yield from layers(sub)

    total = sum(int(np.prod(w.shape)) for w in keras_model.weights)
    dense = sum(
        int(np.prod(layer.kernel.shape))
        for layer in layers(keras_model)
        if isinstance(layer, keras.layers.Dense) and int(np.prod(layer.kernel.shape)) >= MIN_ELEMENTS
    )
    return dense / total if total else 0.0
