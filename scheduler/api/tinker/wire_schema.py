"""The Tinker SDK's protobuf messages (`tinker_public.proto` of tinker 0.38.0), torch-free.

Importing `tinker` would run its `__init__`, which imports torch; so the same messages are built
here from a field table with `descriptor_pb2` in a private `DescriptorPool` (the test
`tests/unit/test_tinker_wire.py` checks every message, field name, number, type and label against
the SDK's own `tinker_public_pb2`). `wire.py` converts between these messages and the op store's
neutral JSON.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "tinker_public"

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
