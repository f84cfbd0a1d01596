"""`ExperimentRecord` owns the experiment hash: encoding round trip, derived values, and the Lua
scripts that can only name fields it has."""

from __future__ import annotations

import re

import pytest

from lorafleet.common.schemas import ExperimentSpec
from lorafleet.common.state import protocol_lua
from lorafleet.common.state.experiment import FIELD_NAMES, SCHEDULING_FIELDS, ExperimentRecord

SPEC = ExperimentSpec(name="e", env="char_class", env_args={"cls": "digits"}, steps=7,
                      prompts_per_step=3, group_size=5, weight=2.0)


def test_new_record_encodes_and_decodes_as_redis_returns_it() -> None:
    rec = ExperimentRecord.new("e-1", SPEC, now_ms=123)
    h = {k: str(v) for k, v in rec.to_hash().items()}  # Redis hands back strings
    back = ExperimentRecord.from_hash("e-1", h)
    assert back == rec
    assert back.spec == SPEC
    assert (back.rows, back.steps_total, back.weight, back.status, back.step) == (15, 7, 2.0, "queued", 0)
    assert back.version == back.step == 0 and not back.done


def test_partial_reads_keep_defaults_and_derive_fair_share() -> None:
    values = ["running", "4", "train", "w1", "b9", "55", "30", "2.0", "15", "7", "1234"]
    rec = ExperimentRecord.from_values("e-1", SCHEDULING_FIELDS, values)
    assert (rec.status, rec.step, rec.phase, rec.node, rec.inflight) == ("running", 4, "train", "w1", "b9")
    assert rec.not_before == 1234
    assert rec.version == 4 and rec.fair_key == 15.0 and rec.error == ""
    assert set(SCHEDULING_FIELDS) <= set(FIELD_NAMES) and "spec_json" not in SCHEDULING_FIELDS


def test_every_field_a_lua_script_names_is_a_record_field() -> None:
    scripts = {n: v for n, v in vars(protocol_lua).items() if n.isupper() and not n.startswith("_")
               and isinstance(v, str)}
    assert len(scripts) >= 12
    for name, text in scripts.items():
        assert "$" not in text, f"{name}: an unrendered placeholder"
    # the experiment hash is always KEYS[2] or an 'exp' local in the scripts: every field they
    # read or write there is one of the record's
    named = set()
    for text in scripts.values():
        for call in re.findall(r"'H(?:MGET|GET|SET|INCRBY)', (?:KEYS\[2\]|exp|KEYS\[i\])([^)]*)\)", text):
            named |= set(re.findall(r"'([a-z_]+)'", call))
    named -= {"running", "train", "rollout", "completed", "failed", "claimed", "committed"}
    assert named and named <= set(FIELD_NAMES), named - set(FIELD_NAMES)


def test_an_unknown_field_in_a_script_fails_when_rendered() -> None:
    assert protocol_lua.render("redis.call('HGET', KEYS[2], '$status')") == \
        "redis.call('HGET', KEYS[2], '$status')".replace("$status", "status")
    with pytest.raises(KeyError, match="version"):
        protocol_lua.render("redis.call('HGET', KEYS[2], '$version')")
