"""The Tinker SDK's protobuf wire format, torch-free: converters between the SDK's messages
(built in `wire_schema.py`) and the neutral JSON formats of `common/tinker/op_store.py` (its
module docstring): a `ForwardBackwardRequest` body becomes an op payload, a neutral
forward/backward or sample result becomes protobuf bytes for the SDK. The loss names and the
inputs each needs are the closed set of `common/tinker/losses.py`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lorafleet.common.tinker.losses import FLOAT_INPUTS, KNOWN_INPUTS, LOSS_FNS, REQUIRED_INPUTS
from lorafleet.scheduler.api.tinker.wire_schema import DTYPE, MESSAGES, STOP_REASON


class WireError(ValueError):
    """A request body the server cannot accept: the caller's mistake (HTTP 400, category user)."""


_NP_DTYPE = {
    DTYPE["DTYPE_FLOAT32"]: np.dtype("<f4"),
    DTYPE["DTYPE_INT64"]: np.dtype("<i8"),
    DTYPE["DTYPE_INT32"]: np.dtype("<i4"),
}


def _buffer(data: bytes, dtype: np.dtype, what: str) -> np.ndarray:
    if len(data) % dtype.itemsize:
        raise WireError(f"{what}: {len(data)} bytes is not a whole number of {dtype.name} values")
    return np.frombuffer(data, dtype=dtype)


def _tensor(msg: Any, what: str) -> np.ndarray:
    """A request Tensor (dense or sparse CSR) as a dense 1-D array."""
    dtype = _NP_DTYPE.get(msg.dtype)
    if dtype is None:
        raise WireError(f"{what}: unsupported dtype {msg.dtype} (float32 or int64)")
    shape = [int(s) for s in msg.shape]
    if msg.HasField("sparse_csr"):
        csr = msg.sparse_csr
        values = _buffer(csr.values, dtype, what)
        crow = _buffer(csr.crow_indices, np.dtype("<i8"), what)
        col = _buffer(csr.col_indices, np.dtype("<i8"), what)
        if (
            len(shape) != 2
            or len(crow) != shape[0] + 1
            or len(col) != len(values)
            or (len(col) and (col.min() < 0 or col.max() >= shape[1]))
            or (len(crow) and (crow[0] != 0 or crow[-1] != len(values) or np.any(np.diff(crow) < 0)))
        ):
            raise WireError(f"{what}: malformed sparse CSR tensor (shape {shape})")
        dense = np.zeros(shape, dtype=dtype)
        rows = np.repeat(np.arange(shape[0]), np.diff(crow))
        dense[rows, col] = values
        arr = dense
    else:
        arr = _buffer(msg.dense, dtype, what)
        if shape:
            if int(np.prod(shape)) != arr.size:
                raise WireError(f"{what}: shape {shape} does not match {arr.size} values")
            arr = arr.reshape(shape)
    if arr.ndim != 1:
        raise WireError(f"{what}: only 1-D per-token tensors are supported (shape {list(arr.shape)})")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise WireError(f"{what}: non-finite values")
    return arr


def _tokens(datum: Any, i: int) -> list[int]:
    tokens: list[int] = []
    for chunk in datum.model_input:
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise WireError(
                f"data[{i}].model_input: {kind or 'empty'} chunks are not supported (token ids only)"
            )
        tokens += _buffer(chunk.encoded_text.tokens, np.dtype("<i4"), f"data[{i}].model_input").tolist()
    if not tokens:
        raise WireError(f"data[{i}].model_input is empty")
    if min(tokens) < 0:
        raise WireError(f"data[{i}].model_input: negative token id")
    return tokens


def _loss_config(req: Any) -> dict[str, float]:
    config = {k: float(v) for k, v in req.loss_fn_config.items()}
    for k, v in req.loss_fn_config_v2.items():  # the SDK dual-writes; v2 wins when set
        if v.WhichOneof("value") == "text":
            raise WireError(f"loss_fn_config[{k!r}]: string values are not supported")
        if v.WhichOneof("value") == "number":
            config[k] = float(v.number)
    for k, v in config.items():
        if not math.isfinite(v):
            raise WireError(f"loss_fn_config[{k!r}] is not finite")
    return config


def decode_forward_backward(
    body: bytes, content_encoding: str = "", max_bytes: int = 64 << 20
) -> dict[str, Any]:
    """A `ForwardBackwardRequest` body -> {"model_id", "seq_id", "forward_only", "payload"} where
    payload is the neutral forward_backward payload. Raises WireError on anything unusable."""
    encoding = content_encoding.strip().lower()
    if encoding == "zstd":
        import zstandard

        try:
            body = zstandard.ZstdDecompressor().decompress(body, max_output_size=max_bytes)
        except zstandard.ZstdError as e:
            raise WireError(f"bad zstd body: {e}") from e
    elif encoding not in ("", "identity"):
        raise WireError(f"unsupported Content-Encoding {content_encoding!r} (zstd or none)")
    req = MESSAGES["ForwardBackwardRequest"]()
    try:
        req.ParseFromString(body)
    except Exception as e:  # google.protobuf.message.DecodeError and friends
        raise WireError(f"body is not a ForwardBackwardRequest: {e}") from e
    if not req.model_id:
        raise WireError("model_id is missing")
    if req.loss_fn not in LOSS_FNS:
        raise WireError(f"unsupported loss_fn {req.loss_fn!r}; supported: {sorted(LOSS_FNS)}")
    if not req.data:
        raise WireError("data is empty")
    data = []
    for i, datum in enumerate(req.data):
        tokens = _tokens(datum, i)
        inputs: dict[str, list[Any]] = {}
        for name, tensor in datum.loss_fn_inputs.items():
            if name not in KNOWN_INPUTS:
                raise WireError(
                    f"data[{i}].loss_fn_inputs: unsupported input {name!r}; known: {list(KNOWN_INPUTS)}"
                )
            arr = _tensor(tensor, f"data[{i}].loss_fn_inputs[{name!r}]")
            if len(arr) != len(tokens):
                raise WireError(
                    f"data[{i}].loss_fn_inputs[{name!r}] has {len(arr)} values for {len(tokens)} tokens"
                )
            inputs[name] = (
                [float(x) for x in arr.tolist()] if name in FLOAT_INPUTS else [int(x) for x in arr.tolist()]
            )
        missing = [n for n in REQUIRED_INPUTS[req.loss_fn] if n not in inputs]
        if missing:
            raise WireError(f"data[{i}]: loss {req.loss_fn!r} needs loss_fn_inputs {missing}")
        if min(inputs["target_tokens"]) < 0:
            raise WireError(f"data[{i}].loss_fn_inputs['target_tokens']: negative token id")
        if req.loss_fn == "cross_entropy" and "weights" not in inputs:
            inputs["weights"] = [1.0] * len(tokens)
        data.append({"tokens": tokens, "loss_fn_inputs": inputs})
    payload = {"loss_fn": req.loss_fn, "loss_fn_config": _loss_config(req), "data": data}
    return {
        "model_id": req.model_id,
        "seq_id": int(req.seq_id),
        "forward_only": bool(req.forward_only),
        "payload": payload,
    }


def _batched(rows: list[list[float]]) -> Any:
    """Per-datum float arrays -> a BatchedTensor (f32 bytes, int64 byte offsets, n+1)."""
    bt = MESSAGES["BatchedTensor"]()
    arrays = [np.asarray(r, dtype="<f4") for r in rows]
    bt.data = b"".join(a.tobytes() for a in arrays)
    bt.offsets = np.concatenate([[0], np.cumsum([a.nbytes for a in arrays])]).astype("<i8").tobytes()
    bt.dtype = DTYPE["DTYPE_FLOAT32"]
    return bt


def encode_forward_backward_output(result: dict[str, Any]) -> bytes:
    """A neutral forward_backward result -> `ForwardBackwardOutput` bytes: one ArrayRecord whose
    fields (`logprobs`, `elementwise_loss`) hold one flat f32 array per datum, plus the metrics."""
    out = MESSAGES["ForwardBackwardOutput"]()
    out.loss_fn_output_type = str(result.get("loss_fn_output_type") or "ArrayRecord")
    outputs = result.get("outputs") or []
    record = out.loss_fn_outputs.add()
    record.type_tag = out.loss_fn_output_type
    record.num_datums = len(outputs)
    names = sorted({k for o in outputs for k in o})
    for name in names:
        record.fields[name].CopyFrom(_batched([o.get(name, []) for o in outputs]))
    for k, v in (result.get("metrics") or {}).items():
        out.metrics[k] = float(v)
    return out.SerializeToString()


def encode_sample_response(result: dict[str, Any]) -> bytes:
    """A neutral sample result -> `SampleResponse` bytes (tokens int32, logprobs f32; prompt
    logprobs f32 with NaN where undefined, i.e. the first position)."""
    out = MESSAGES["SampleResponse"]()
    for seq in result.get("sequences") or []:
        s = out.sequences.add()
        s.stop_reason = STOP_REASON.get(seq.get("stop_reason", "length"), STOP_REASON["length"])
        s.tokens = np.asarray(seq.get("tokens") or [], dtype="<i4").tobytes()
        if seq.get("logprobs") is not None:
            s.logprobs = np.asarray(seq["logprobs"], dtype="<f4").tobytes()
    prompt = result.get("prompt_logprobs")
    if prompt is not None:
        out.prompt_logprobs = np.asarray(
            [math.nan if x is None else x for x in prompt], dtype="<f4"
        ).tobytes()
    return out.SerializeToString()
