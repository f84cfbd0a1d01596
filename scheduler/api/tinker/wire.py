"""The Tinker SDK's protobuf wire format (`tinker_public.proto` of tinker 0.38.0), torch-free.

Importing `tinker` would run its `__init__`, which imports torch; so the same messages are built
here from a field table with `descriptor_pb2` in a private `DescriptorPool` (the test
`tests/unit/test_tinker_wire.py` checks every message, field name, number, type and label against
the SDK's own `tinker_public_pb2`). The converters map between those messages and the neutral JSON
formats of `common/tinker/op_store.py` (its module docstring): a `ForwardBackwardRequest` body becomes an
op payload, a neutral forward/backward or sample result becomes protobuf bytes for the SDK.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "tinker_public"
LOSS_FNS = frozenset({"cross_entropy", "importance_sampling", "ppo"})
# loss_fn_inputs each loss needs (a missing CE `weights` means all ones, as in Tinker's docs)
REQUIRED_INPUTS = {
    "cross_entropy": ("target_tokens",),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
}
KNOWN_INPUTS = ("target_tokens", "weights", "logprobs", "advantages")
FLOAT_INPUTS = frozenset({"weights", "logprobs", "advantages"})


class WireError(ValueError):
    """A request body the server cannot accept: the caller's mistake (HTTP 400, category user)."""


_F = descriptor_pb2.FieldDescriptorProto
_T = {
    "double": _F.TYPE_DOUBLE,
    "float": _F.TYPE_FLOAT,
    "int64": _F.TYPE_INT64,
    "int32": _F.TYPE_INT32,
    "uint32": _F.TYPE_UINT32,
    "uint64": _F.TYPE_UINT64,
    "bool": _F.TYPE_BOOL,
    "string": _F.TYPE_STRING,
    "bytes": _F.TYPE_BYTES,
}
_ENUMS = {
    "StopReason": [("STOP_REASON_STOP", 0), ("STOP_REASON_LENGTH", 1)],
    "DType": [
        ("DTYPE_UNSPECIFIED", 0),
        ("DTYPE_FLOAT32", 1),
        ("DTYPE_INT64", 2),
        ("DTYPE_INT32", 3),
        ("DTYPE_BFLOAT16", 4),
    ],
}
# message -> fields (number, name, type, flags). Type: a scalar name above, an enum or message
# name, or "map<K,V>". Flags: "rep" (repeated), "opt" (proto3 optional), "oneof:<name>".
_MESSAGES: dict[str, list[tuple[int, str, str, str]]] = {
    "SampleResponse": [
        (1, "sequences", "SampledSequence", "rep"),
        (2, "prompt_logprobs", "bytes", "opt"),
        (3, "topk_prompt_logprobs", "TopkLogprobs", "opt"),
        (4, "prompt_cache_hit_tokens", "int32", ""),
        (5, "target_prompt_logprobs", "Tensor", "opt"),
        (6, "prompt_alt_tokens", "PromptAltTokens", "opt"),
    ],
    "PromptAltTokens": [(1, "tokens", "Tensor", ""), (2, "logprobs", "Tensor", "")],
    "SampledSequence": [
        (1, "stop_reason", "StopReason", ""),
        (2, "tokens", "bytes", ""),
        (3, "logprobs", "bytes", "opt"),
        (4, "topk_sampled_logprobs", "TopkLogprobs", "opt"),
    ],
    "TopkLogprobs": [
        (1, "token_ids", "bytes", ""),
        (2, "logprobs", "bytes", ""),
        (3, "k", "uint32", ""),
        (4, "length", "uint32", ""),
    ],
    "SparseCsr": [
        (1, "values", "bytes", ""),
        (2, "crow_indices", "bytes", ""),
        (3, "col_indices", "bytes", ""),
    ],
    "Tensor": [
        (1, "dense", "bytes", "oneof:encoding"),
        (2, "sparse_csr", "SparseCsr", "oneof:encoding"),
        (3, "dtype", "DType", ""),
        (4, "shape", "int64", "rep"),
    ],
    "BatchedTensor": [
        (1, "data", "bytes", ""),
        (2, "offsets", "bytes", ""),
        (3, "dtype", "DType", ""),
        (4, "trailing_shape", "int64", "rep"),
    ],
    "ArrayRecord": [
        (1, "type_tag", "string", ""),
        (2, "fields", "map<string,BatchedTensor>", ""),
        (3, "num_datums", "int64", ""),
    ],
    "ForwardBackwardOutput": [
        (1, "loss_fn_output_type", "string", ""),
        (2, "loss_fn_outputs", "ArrayRecord", "rep"),
        (3, "metrics", "map<string,double>", ""),
    ],
    "ForwardBackwardRequest": [
        (1, "model_id", "string", ""),
        (2, "seq_id", "int32", ""),
        (3, "data", "Datum", "rep"),
        (4, "loss_fn", "string", ""),
        (5, "loss_fn_config", "map<string,double>", ""),
        (6, "forward_only", "bool", ""),
        (7, "loss_fn_config_v2", "map<string,LossConfigValue>", ""),
    ],
    "LossConfigValue": [(1, "number", "double", "oneof:value"), (2, "text", "string", "oneof:value")],
    "Datum": [
        (1, "model_input", "Chunk", "rep"),
        (2, "loss_fn_inputs", "map<string,Tensor>", ""),
        (3, "model_input_spans", "ProvenanceSpan", "rep"),
        (4, "loss_fn_input_spans", "ProvenanceSpan", "rep"),
    ],
    "ProvenanceSpan": [
        (1, "prompt_tokens", "PromptProvenanceSpan", "oneof:span"),
        (2, "sampled_tokens", "SampledProvenanceSpan", "oneof:span"),
    ],
    "PromptProvenanceSpan": [
        (1, "sequence_id", "string", ""),
        (2, "offset", "int64", ""),
        (3, "length", "int64", ""),
    ],
    "SampledProvenanceSpan": [
        (1, "sequence_id", "string", ""),
        (2, "offset", "int64", ""),
        (3, "length", "int64", ""),
    ],
    "Chunk": [
        (1, "encoded_text", "EncodedTextChunk", "oneof:chunk"),
        (2, "image", "ImageChunk", "oneof:chunk"),
        (3, "dmel", "DmelChunk", "oneof:chunk"),
    ],
    "EncodedTextChunk": [(1, "tokens", "bytes", "")],
    "ImageChunk": [
        (1, "data", "bytes", ""),
        (2, "format", "string", ""),
        (3, "expected_tokens", "int32", "opt"),
        (4, "override_dimensions", "ImageDimensions", "opt"),
    ],
    "ImageDimensions": [(1, "width", "uint32", ""), (2, "height", "uint32", "")],
    "DmelChunk": [(1, "dmel", "bytes", "")],
    "SamplingParams": [
        (1, "max_tokens", "int32", "opt"),
        (2, "seed", "uint64", "opt"),
        (3, "temperature", "float", "opt"),
        (4, "top_k", "int32", "opt"),
        (5, "top_p", "float", "opt"),
        (6, "stop_strs", "StopStrings", "oneof:stop"),
        (7, "stop_tokens", "StopTokens", "oneof:stop"),
    ],
    "StopStrings": [(1, "values", "string", "rep")],
    "StopTokens": [(1, "values", "int32", "rep")],
}


def _type_of(field: _F, type_name: str) -> None:
    if type_name in _T:
        field.type = _T[type_name]
    elif type_name in _ENUMS:
        field.type, field.type_name = _F.TYPE_ENUM, f".{PACKAGE}.{type_name}"
    else:
        field.type, field.type_name = _F.TYPE_MESSAGE, f".{PACKAGE}.{type_name}"


def _entry_name(field_name: str) -> str:
    """protoc's map entry naming: loss_fn_config_v2 -> LossFnConfigV2Entry."""
    return "".join(p[:1].upper() + p[1:] for p in field_name.split("_")) + "Entry"


def _message(name: str, fields: list[tuple[int, str, str, str]]) -> descriptor_pb2.DescriptorProto:
    msg = descriptor_pb2.DescriptorProto(name=name)
    oneofs: list[str] = []
    synthetic: list[tuple[_F, str]] = []  # proto3 optional: a synthetic oneof "_<name>", declared last
    for number, fname, ftype, flags in fields:
        f = msg.field.add(name=fname, number=number, label=_F.LABEL_OPTIONAL)
        if ftype.startswith("map<"):
            key, value = ftype[4:-1].split(",")
            entry = msg.nested_type.add(name=_entry_name(fname))
            entry.options.map_entry = True
            _type_of(entry.field.add(name="key", number=1, label=_F.LABEL_OPTIONAL), key)
            _type_of(entry.field.add(name="value", number=2, label=_F.LABEL_OPTIONAL), value)
            f.label, f.type, f.type_name = (
                _F.LABEL_REPEATED,
                _F.TYPE_MESSAGE,
                f".{PACKAGE}.{name}.{entry.name}",
            )
            continue
        _type_of(f, ftype)
        if flags == "rep":
            f.label = _F.LABEL_REPEATED
        elif flags.startswith("oneof:"):
            if flags[6:] not in oneofs:
                oneofs.append(flags[6:])
            f.oneof_index = oneofs.index(flags[6:])
        elif flags == "opt":
            f.proto3_optional = True
            synthetic.append((f, f"_{fname}"))
    for f, oneof in synthetic:
        f.oneof_index = len(oneofs)
        oneofs.append(oneof)
    for oneof in oneofs:
        msg.oneof_decl.add(name=oneof)
    return msg


def _build_pool() -> descriptor_pool.DescriptorPool:
    fd = descriptor_pb2.FileDescriptorProto(
        name="lorafleet_tinker_public.proto", package=PACKAGE, syntax="proto3"
    )
    for name, fields in _MESSAGES.items():
        fd.message_type.append(_message(name, fields))
    for name, values in _ENUMS.items():
        enum = fd.enum_type.add(name=name)
        for vname, number in values:
            enum.value.add(name=vname, number=number)
    pool = descriptor_pool.DescriptorPool()  # private: never clashes with the SDK's default-pool file
    pool.Add(fd)
    return pool


POOL = _build_pool()
MESSAGES: dict[str, type[Any]] = {
    name: message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))
    for name in _MESSAGES
}
DTYPE = {name: number for name, number in _ENUMS["DType"]}
STOP_REASON = {"stop": 0, "length": 1}
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
