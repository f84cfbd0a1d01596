"""The server's protobuf messages against the tinker SDK's own: same schema, and bytes made by the
SDK's request converter decode on our side, our result bytes decode with the SDK's deserializers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import zstandard
from google.protobuf import descriptor_pb2

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402
from tinker.proto import request_conv, response_conv  # noqa: E402
from tinker.proto import tinker_public_pb2 as sdk_pb  # noqa: E402

from lorafleet.scheduler.api.tinker import wire, wire_schema  # noqa: E402


def _file(fd_source: object) -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto()
    fd_source.CopyToProto(fd)  # type: ignore[attr-defined]
    return fd


def test_every_message_field_and_enum_matches_the_sdk_schema() -> None:
    sdk = _file(sdk_pb.DESCRIPTOR)
    ours = _file(wire_schema.POOL.FindFileByName("lorafleet_tinker_public.proto"))
    assert ours.package == sdk.package == "tinker_public"
    sdk_msgs = {m.name: m for m in sdk.message_type}
    our_msgs = {m.name: m for m in ours.message_type}
    assert set(our_msgs) == set(sdk_msgs)
    for name, msg in sdk_msgs.items():
        # whole DescriptorProto equality: names, numbers, types, labels, oneofs, map entries
        assert our_msgs[name] == msg, name
        for f in msg.field:
            assert (f.number, f.type, f.label) == next(
                (g.number, g.type, g.label) for g in our_msgs[name].field if g.name == f.name
            )
    assert {e.name: e for e in ours.enum_type} == {e.name: e for e in sdk.enum_type}


def _datum(tokens: list[int], **inputs: list[float] | list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens),
        loss_fn_inputs={k: np.asarray(v) for k, v in inputs.items()},
    )


def _sdk_body(
    data: list[types.Datum],
    loss_fn: str = "cross_entropy",
    config: dict | None = None,
    seq_id: int = 3,
    forward_only: bool = False,
) -> bytes:
    req = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn, loss_fn_config=config),
        model_id="sess:train:0",
        seq_id=seq_id,
    )
    msg = request_conv.forward_backward_request_to_proto(req)
    msg.forward_only = forward_only
    return msg.SerializeToString()


def test_sdk_cross_entropy_request_decodes_to_the_neutral_payload() -> None:
    body = _sdk_body(
        [
            _datum(
                [5, 6, 7],
                target_tokens=np.array([6, 7, 8], np.int64),
                weights=np.array([0.0, 1.5, -2.0], np.float32),
            ),
            _datum([9, 10], target_tokens=np.array([10, 11], np.int64)),
        ]
    )
    got = wire.decode_forward_backward(body)
    assert got["model_id"] == "sess:train:0" and got["seq_id"] == 3 and got["forward_only"] is False
    assert got["payload"] == {
        "loss_fn": "cross_entropy",
        "loss_fn_config": {},
        "data": [
            {
                "tokens": [5, 6, 7],
                "loss_fn_inputs": {"target_tokens": [6, 7, 8], "weights": [0.0, 1.5, -2.0]},
            },
            # a CE datum without weights weighs every token 1
            {"tokens": [9, 10], "loss_fn_inputs": {"target_tokens": [10, 11], "weights": [1.0, 1.0]}},
        ],
    }


def test_sdk_ppo_request_with_config_forward_only_and_zstd() -> None:
    lp = np.array([-0.5, -1.25], np.float32)
    adv = np.array([1.0, -0.5], np.float32)
    body = _sdk_body(
        [_datum([1, 2], target_tokens=np.array([2, 3], np.int64), logprobs=lp, advantages=adv)],
        loss_fn="ppo",
        config={"clip_low_threshold": 0.7, "clip_high_threshold": 1.3},
        forward_only=True,
    )
    got = wire.decode_forward_backward(zstandard.ZstdCompressor().compress(body), "zstd")
    assert got["forward_only"] is True
    p = got["payload"]
    assert p["loss_fn"] == "ppo"
    assert p["loss_fn_config"] == pytest.approx(
        {"clip_low_threshold": 0.7, "clip_high_threshold": 1.3}, abs=1e-12
    )
    assert p["data"][0]["loss_fn_inputs"] == {
        "target_tokens": [2, 3],
        "logprobs": [-0.5, -1.25],
        "advantages": [1.0, -0.5],
    }


@pytest.mark.parametrize(
    "case,needle",
    [
        ("loss", "unsupported loss_fn"),
        ("length", "has 2 values for 3 tokens"),
        ("nan", "non-finite"),
        ("image", "image chunks are not supported"),
        ("missing", "needs loss_fn_inputs ['logprobs', 'advantages']"),
        ("garbage", "not a ForwardBackwardRequest"),
        ("sparse2d", "only 1-D"),
        ("string_config", "string values"),
    ],
)
def test_bad_requests_are_wire_errors(case: str, needle: str) -> None:
    t3 = np.array([1, 2, 3], np.int64)
    if case == "loss":
        body = _sdk_body([_datum([1, 2, 3], target_tokens=t3)], loss_fn="cispo")
    elif case == "length":
        body = _sdk_body([_datum([1, 2, 3], target_tokens=np.array([1, 2], np.int64))])
    elif case == "nan":
        body = _sdk_body(
            [_datum([1, 2, 3], target_tokens=t3, weights=np.array([1, math.nan, 1], np.float32))]
        )
    elif case == "image":
        datum = types.Datum(
            model_input=types.ModelInput(
                chunks=[types.ImageChunk(data=b"\x89PNG", format="png", expected_tokens=3)]
            ),
            loss_fn_inputs={"target_tokens": t3},
        )
        body = _sdk_body([datum])
    elif case == "missing":
        body = _sdk_body([_datum([1, 2, 3], target_tokens=t3)], loss_fn="importance_sampling")
    elif case == "garbage":
        body = b"\xff\xff\xff\xff not protobuf"
    elif case == "sparse2d":
        td = types.TensorData(
            data=[7, 9], dtype="int64", shape=[2, 3], sparse_crow_indices=[0, 1, 2], sparse_col_indices=[0, 2]
        )
        body = _sdk_body(
            [
                types.Datum(
                    model_input=types.ModelInput.from_ints([1, 2]), loss_fn_inputs={"target_tokens": td}
                )
            ]
        )
    else:
        body = _sdk_body([_datum([1, 2, 3], target_tokens=t3)], config={"mode": "x"})
    with pytest.raises(wire.WireError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        wire.decode_forward_backward(body)


def test_sparse_csr_tensors_densify() -> None:
    """CSR decoding itself (the SDK only makes CSR for 2-D tensors, which the losses refuse): a
    [1, T] CSR reshaped by hand into the 1-D shape the server accepts."""
    msg = wire.MESSAGES["Tensor"]()
    msg.dtype = wire.DTYPE["DTYPE_INT64"]
    msg.shape.extend([2, 3])
    msg.sparse_csr.values = np.array([7, 9], "<i8").tobytes()
    msg.sparse_csr.crow_indices = np.array([0, 1, 2], "<i8").tobytes()
    msg.sparse_csr.col_indices = np.array([0, 2], "<i8").tobytes()
    with pytest.raises(wire.WireError, match="only 1-D"):
        wire._tensor(msg, "t")
    msg.sparse_csr.crow_indices = np.array([0, 1, 3], "<i8").tobytes()  # claims 3 values, has 2
    with pytest.raises(wire.WireError, match="malformed sparse CSR"):
        wire._tensor(msg, "t")


def test_our_forward_backward_output_decodes_with_the_sdk() -> None:
    result = {
        "loss_fn_output_type": "ArrayRecord",
        "metrics": {"loss:sum": 3.25},
        "outputs": [
            {"logprobs": [-0.5, -1.5, -2.0], "elementwise_loss": [0.0, 1.5, 1.75]},
            {"logprobs": [-0.25], "elementwise_loss": [0.25]},
        ],
    }
    out = response_conv.deserialize_forward_backward_output(wire.encode_forward_backward_output(result))
    assert out.metrics == {"loss:sum": 3.25}
    assert len(out.loss_fn_outputs) == 2
    assert out.loss_fn_outputs[0]["logprobs"].tolist() == [-0.5, -1.5, -2.0]
    assert out.loss_fn_outputs[0]["elementwise_loss"].shape == [3]
    assert out.loss_fn_outputs[1]["elementwise_loss"].tolist() == [0.25]
    assert out.loss_fn_outputs[1]["logprobs"].dtype == "float32"
    empty = response_conv.deserialize_forward_backward_output(
        wire.encode_forward_backward_output({"metrics": {"loss:sum": 0.0}, "outputs": []})
    )
    assert empty.loss_fn_outputs == []


def test_our_sample_response_decodes_with_the_sdk() -> None:
    result = {
        "sequences": [
            {"tokens": [4, 5, 2], "logprobs": [-0.5, -0.25, -1.0], "stop_reason": "stop"},
            {"tokens": [4, 4], "logprobs": [-0.5, -0.75], "stop_reason": "length"},
        ],
        "prompt_logprobs": [None, -1.5, -0.5],
    }
    out = response_conv.deserialize_sample_response(wire.encode_sample_response(result))
    assert [s.tokens for s in out.sequences] == [[4, 5, 2], [4, 4]]
    assert [s.stop_reason for s in out.sequences] == ["stop", "length"]
    assert out.sequences[1].logprobs == [-0.5, -0.75]
    # NaN on the wire: the SDK reports the undefined first position as None
    assert out.prompt_logprobs == [None, -1.5, -0.5]
    bare = response_conv.deserialize_sample_response(
        wire.encode_sample_response(
            {
                "sequences": [{"tokens": [1], "logprobs": None, "stop_reason": "length"}],
                "prompt_logprobs": None,
            }
        )
    )
    assert bare.sequences[0].logprobs is None and bare.prompt_logprobs is None
