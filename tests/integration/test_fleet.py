"""End to end on real parts: Redis, `lorafleet worker` processes (Celery prefork), the scheduler
process, and a client in a separate process."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import torch
import yaml
from peft import PeftModel

from lorafleet.common.keys import Keys
from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.scheduler.client import FleetClient
from lorafleet.scheduler.embedded import LocalFleet
from lorafleet.workers.tiny_model import load_base_model

pytestmark = pytest.mark.slow


def spec(name: str, env: str, env_args: dict, steps: int = 12, seed: int = 0, lr: float = 3e-3) -> dict:
    # temperature 0.3 and lr 3e-3: what the tiny model learns from quickly (tests/unit/test_rl_learning.py)
    return {"name": name, "env": env, "env_args": env_args, "steps": steps, "prompts_per_step": 4,
            "group_size": 4, "max_new_tokens": 8, "temperature": 0.3,
            "train": {"seed": seed, "lora": {"rank": 8, "alpha": 16},
                      "optimizer": {"lr": lr, "max_grad_norm": 1.0}}}


SPECS = [
    spec("digits", "char_class", {"cls": "digits"}, seed=1),
    spec("nearz", "near_char", {"char": "z"}, seed=2),
    spec("lorafleet", "target_string", {"target": "lorafleet"}, seed=3),
]


def submit_from_other_process(redis_url: str, specs: list[dict], tmp_path: Path) -> list[str]:
    files = []
    for s in specs:
        f = tmp_path / f"{s['name']}.yaml"
        f.write_text(yaml.safe_dump(s))
        files.append(str(f))
    out = subprocess.run([sys.executable, "-m", "lorafleet.scheduler.cli", "submit", *files,
                          "--redis-url", redis_url],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def test_three_experiments_two_workers_end_to_end(make_fleet, redis_url: str, tmp_path: Path,
                                                  fleet_env: dict, model_cache: Path) -> None:
    fleet = make_fleet(workers=2)
    ids = submit_from_other_process(fleet.redis_url, SPECS, tmp_path)
    client = FleetClient(redis_url, fleet_env["LORAFLEET_STORE_URL"])
    states = client.wait(ids, timeout_s=600)
    assert [s.status for s in states] == ["completed"] * 3, [s.error for s in states]
    store = AdapterStore(fleet_env["LORAFLEET_STORE_URL"])
    mixed_train = False
    for s, sp in zip(states, SPECS, strict=True):
        m = client.metrics(s.id)
        assert [x["step"] for x in m] == list(range(sp["steps"])), "a step was lost or repeated"
        assert s.version == sp["steps"] and store.versions(s.id) == list(range(sp["steps"] + 1))
        first, last = mean([x["reward_mean"] for x in m[:3]]), mean([x["reward_mean"] for x in m[-3:]])
        assert last > first + 0.02, f"{s.name}: reward {first:.3f} -> {last:.3f}"
        mixed_train |= any(x["train_batch"] > 1 for x in m)
        for v in store.versions(s.id):  # every published version is a loadable PEFT checkpoint
            base, _, _ = load_base_model("builtin:tiny-llama", torch.float64, cache_dir=model_cache)
            peft = PeftModel.from_pretrained(base, store.local_dir(s.id, v))
            want = store.load(s.id, v).weights
            got = {k.replace(".default", ""): p for k, p in peft.named_parameters() if "lora_" in k}
            assert max((got[k] - want[k]).abs().max().item() for k in want) == 0.0
    assert mixed_train, "no train task carried more than one adapter"


def test_cotenants_do_not_change_an_experiments_results(make_fleet, redis_url: str,
                                                        fleet_env: dict, r) -> None:
    """float64, same seeds: the same experiment alone and fused with two co-tenants."""
    client = FleetClient(redis_url, fleet_env["LORAFLEET_STORE_URL"])
    make_fleet(workers=1)
    probe = spec("probe", "char_class", {"cls": "digits"}, steps=5, seed=7)
    alone_id = client.submit(probe)
    client.wait([alone_id], timeout_s=300)
    alone = client.metrics(alone_id)
    store = AdapterStore(fleet_env["LORAFLEET_STORE_URL"])
    w_alone = store.load(alone_id).weights

    ids = [client.submit(probe), client.submit(spec("other1", "near_char", {"char": "q"}, steps=5, seed=8)),
           client.submit(spec("other2", "target_string", {"target": "abc"}, steps=5, seed=9))]
    states = client.wait(ids, timeout_s=300)
    assert all(s.status == "completed" for s in states)
    shared = client.metrics(ids[0])
    assert max(x["train_batch"] for x in shared) == 3 and max(x["rollout_batch"] for x in shared) == 3
    # identical samples (same seeds, per-experiment RNG) -> identical rewards; losses and weights
    # agree to float64 rounding of differently shaped fused batches
    assert [x["reward_mean"] for x in shared] == [x["reward_mean"] for x in alone]
    assert [x["loss"] for x in shared] == pytest.approx([x["loss"] for x in alone], abs=1e-9)
    w_shared = store.load(ids[0]).weights
    assert max((w_shared[k] - w_alone[k]).abs().max().item() for k in w_alone) < 1e-9


def test_flower_lists_workers_and_queues_with_basic_auth(make_fleet, redis_url: str, tmp_path: Path,
                                                         fleet_env: dict) -> None:
    import base64
    import time
    import urllib.error
    import urllib.request

    from lorafleet.common.redis.connection import free_port

    fleet = make_fleet(workers=1)
    port = free_port()
    flower = fleet.spawn("flower", ["flower", "--port", str(port)],
                         env={"LORAFLEET_FLOWER_BASIC_AUTH": "admin:s3cret"})
    auth = "Basic " + base64.b64encode(b"admin:s3cret").decode()

    def get(path: str, with_auth: bool = True):
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
        if with_auth:
            req.add_header("Authorization", auth)
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())

    # workers run without remote control: Flower lists them from their events and heartbeats
    # (the Workers page, /workers?json=1), and cannot inspect them
    deadline = time.monotonic() + 60
    workers: list = []
    while time.monotonic() < deadline and not any(w["hostname"].startswith("w0@") for w in workers):
        assert flower.poll() is None, (tmp_path / "logs" / "flower.log").read_text()[-2000:]
        with contextlib.suppress(urllib.error.URLError, ConnectionError):
            workers = get("/workers?json=1")["data"]
        time.sleep(0.5)
    (w0,) = [w for w in workers if w["hostname"].startswith("w0@")]
    assert w0["status"] is True and w0["pid"] == fleet.procs["w0"].pid, w0
    assert get("/api/workers?refresh=1") == {}  # inspection gets no answer
    with pytest.raises(urllib.error.HTTPError) as info:  # nor does a worker's detail page
        get(f"/worker/{w0['hostname']}")
    assert info.value.code == 404
    # lorafleet's queues come from the Flower app (lorafleet.scheduler.flower), not from workers
    queues = get("/api/queues/length")
    assert {"lf.rollout", "lf.train", "lf.node.w0"} <= {q["name"] for q in queues["active_queues"]}
    # tasks come from task events (a train step usually runs chained inside its rollout task)
    client = FleetClient(redis_url, fleet_env["LORAFLEET_STORE_URL"])
    exp_id = client.submit(spec("fl", "char_class", {"cls": "digits"}, steps=1))
    (state,) = client.wait([exp_id], timeout_s=120)
    assert state.status == "completed", state.error
    deadline, tasks = time.monotonic() + 30, {}
    while time.monotonic() < deadline and "lf.rollout_batch" not in {t["name"] for t in tasks.values()}:
        tasks = get("/api/tasks")
        time.sleep(0.5)
    names = {t["name"] for t in tasks.values()}
    assert "lf.rollout_batch" in names and names <= {"lf.rollout_batch", "lf.train_batch"}, tasks
    assert {t["state"] for t in tasks.values()} == {"SUCCESS"}, tasks
    with pytest.raises(urllib.error.HTTPError) as info:
        get("/workers?json=1", with_auth=False)
    assert info.value.code == 401


def test_events_stream_records_every_commit(make_fleet, redis_url: str, fleet_env: dict, r) -> None:
    make_fleet(workers=1)
    client = FleetClient(redis_url, fleet_env["LORAFLEET_STORE_URL"])
    exp_id = client.submit(spec("ev", "char_class", {"cls": "vowels"}, steps=3))
    client.wait([exp_id], timeout_s=300)
    seen = []
    def done() -> bool:
        return bool(seen) and seen[-1]["type"] == "completed"

    for ev in client.events(since="0", block_ms=100, stop=done):
        if ev.get("exp") == exp_id:
            seen.append(ev)
    kinds = [e["type"] for e in seen]
    assert kinds == ["submitted"] + ["rollout_committed", "train_committed"] * 3 + ["completed"]
    assert [int(e["version"]) for e in seen if e["type"] == "train_committed"] == [1, 2, 3]
    assert r.xlen(Keys.events) >= len(seen)


@pytest.mark.parametrize("chain", [True, False], ids=["chained", "through-the-queue"])
def test_train_step_runs_right_after_its_rollout_unless_disabled(make_fleet, redis_url, fleet_env, r,
                                                                 chain: bool) -> None:
    """A node-routed rollout batch commits and claims its train step in one script and trains it
    in the same task, and the train commit claims the next rollout while nothing else waits;
    with both chains off the scheduler publishes every batch."""
    make_fleet(workers=1, env={"LORAFLEET_CHAIN_TRAIN": "1" if chain else "0",
                               "LORAFLEET_CHAIN_ROLLOUTS_S": "30" if chain else "0"})
    client = FleetClient(redis_url, fleet_env["LORAFLEET_STORE_URL"])
    ids = client.submit_many([spec(f"ch{i}", "near_char", {"char": "q"}, steps=3, seed=i) for i in range(2)])
    assert [s.status for s in client.wait(ids, timeout_s=300)] == ["completed"] * 2
    for exp_id in ids:
        metrics = client.metrics(exp_id)
        assert [m["step"] for m in metrics] == [0, 1, 2]
        assert [m["train_batch"] for m in metrics] == [2, 2, 2]  # submitted together: in step from the start
        chained = [m["batch_id"] == f"{m['rollout_batch_id']}-t" for m in metrics]
        assert chained == [chain] * 3
        # nothing else waits, so after step 0 the worker also claims the next rollouts itself
        rollouts_chained = [m["rollout_batch_id"].startswith("chain-") for m in metrics]
        assert rollouts_chained == [False, chain, chain]
        # a chained train step's versions are written on the publisher thread (while its next
        # step is generated, where there is one); unchained, inline
        assert ["publish_wait_s" in m for m in metrics] == [chain] * 3
        assert all(m["publish_s"] > 0 for m in metrics)
        for step in range(3):  # claimed exactly once either way: the scheduler never published it too
            assert r.hget(Keys.task(exp_id, step, "train"), "claims") == "1"
        # fair-share accounting counts the chained train step like a published one
        assert int(r.hget(Keys.experiment(exp_id), "served")) == 3 * 2 * 4 * 4


# each train step takes >= 0.3 s, so the run outlasts the new worker's start-up (~5-8 s here)
SCALE_OUT_ENV = {"LORAFLEET_TORCH_THREADS": "1", "LORAFLEET_TEST_TRAIN_DELAY_S": "0.3"}


def scale_out(fleet: LocalFleet, client: FleetClient, r: redis.Redis, steps: int = 40) -> dict[str, int]:
    """4 experiments run on w0 (`fleet`, started with one worker and SCALE_OUT_ENV); w1 joins
    mid-run and takes over 2 of them within a step or two; every step runs exactly once, and the
    rebalance flag is cleared -> steps run per node."""
    ids = client.submit_many([spec(f"so{i}", "char_class", {"cls": "digits"}, steps=steps, seed=i)
                              for i in range(4)])
    deadline = time.monotonic() + 300
    while min(client.get(i).step for i in ids) < 2:
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)
    fleet.start_worker("w1")
    fleet.wait_for_workers(2, 120)
    joined_at = max(client.get(i).step for i in ids)
    assert joined_at < steps - 10, "the run ended before w1 started; slow the steps down further"
    states = client.wait(ids, timeout_s=600)
    assert [s.status for s in states] == ["completed"] * 4, [s.error for s in states]
    by_node: dict[str, int] = {}
    on_w1 = []
    for exp_id in ids:
        metrics = client.metrics(exp_id)
        assert [m["step"] for m in metrics] == list(range(steps)), "a step was lost or repeated"
        for m in metrics:
            node = m["worker"].split(":")[0]
            by_node[node] = by_node.get(node, 0) + 1
        workers = [m["worker"].split(":")[0] for m in metrics]
        if "w1" in workers:
            # moved once, at the join, and ran on w1 from then on (or back on the worker that went
            # idle first at the tail: rebalancing follows load, whose timing is the machine's)
            first = workers.index("w1")
            assert first > 0 and set(workers[:first]) == {"w0"}, workers
            on_w1.append(exp_id)
    # half of the experiments (or more, at the tail) moved to w1 (how soon depends on the
    # machine's load: a takeover loads the snapshot from the store and replays; not asserted)
    assert len(on_w1) >= 2, (on_w1, by_node, joined_at)
    assert not r.exists(Keys.rebalance)  # balanced (then done): the flag is cleared
    return by_node


def test_a_worker_that_joins_mid_run_takes_over_half_the_experiments(make_fleet, redis_url, fleet_env,
                                                                      r) -> None:
    """Scale-out: experiments already running on w0 are rebalanced onto w1 once it joins; every
    step still runs exactly once (tests/chaos/test_shared_nothing.py: the same with nothing
    shared but Redis and S3)."""
    fleet = make_fleet(workers=1, env=SCALE_OUT_ENV)
    scale_out(fleet, FleetClient(redis_url, fleet_env["LORAFLEET_STORE_URL"]), r)


def test_fleet_with_tiny_residency_budget_equals_in_process_reference(make_fleet, redis_url, fleet_env,
                                                                      model_cache) -> None:
    """One worker that may keep only ONE adapter resident: every fused step reloads the others
    from the store (weights + AdamW state). The fleet must still equal an in-process fused run
    of the same experiments (float64: identical rewards, weights to 1e-9)."""
    from lorafleet.common.schemas import ExperimentSpec
    from lorafleet.workers.local_runner import LocalRunner
    from lorafleet.workers.multilora.model import MultiLoRAModel

    specs = [spec(f"lru{i}", env, args, steps=4, seed=20 + i)
             for i, (env, args) in enumerate([("char_class", {"cls": "upper"}), ("near_char", {"char": "m"}),
                                              ("target_string", {"target": "xyz"})])]
    make_fleet(workers=1, env={"LORAFLEET_MAX_RESIDENT": "1"})
    client = FleetClient(redis_url, fleet_env["LORAFLEET_STORE_URL"])
    ids = [client.submit(s) for s in specs]
    assert all(s.status == "completed" for s in client.wait(ids, timeout_s=300))
    store = AdapterStore(fleet_env["LORAFLEET_STORE_URL"])

    model, tok, _ = load_base_model("builtin:tiny-llama", torch.float64, cache_dir=model_cache)
    runner = LocalRunner(MultiLoRAModel(model), tok)
    for exp_id, s in zip(ids, specs, strict=True):
        runner.add(exp_id, ExperimentSpec.model_validate(s))
    reference = runner.run()
    for exp_id in ids:
        fleet_metrics = client.metrics(exp_id)
        assert max(x["train_batch"] for x in fleet_metrics) == 3  # fused although only 1 stays hot
        assert [x["reward_mean"] for x in fleet_metrics] == [x["reward_mean"] for x in reference[exp_id]]
        want = dict(runner.model.parameters_of(exp_id))
        got = store.load(exp_id).weights
        assert max((got[k] - want[k].detach()).abs().max().item() for k in want) < 1e-9


def test_cancel_stops_one_experiment_and_spares_its_cotenant(make_fleet, redis_url, fleet_env, r) -> None:
    """The cancel lands while a fused train step that carries BOTH experiments is running: that
    batch must still commit the co-tenant's step after the cancel, and never the cancelled one's."""
    import time

    make_fleet(workers=1, env={"LORAFLEET_TEST_TRAIN_DELAY_S": "1.0"})  # a wide window mid-step
    client = FleetClient(redis_url, fleet_env["LORAFLEET_STORE_URL"])
    long_id = client.submit(spec("long", "char_class", {"cls": "digits"}, steps=200, seed=1))
    short_id = client.submit(spec("short", "near_char", {"char": "a"}, steps=6, seed=2))

    def shared_train_batch() -> tuple[int, int, str] | None:
        """(long's step, short's step, batch id) while one train batch holds claims of both
        (a fused batch may carry the two at different steps)."""
        long_step, short_step = client.get(long_id).step, client.get(short_id).step
        if long_step < 2:
            return None
        t_long = r.hgetall(Keys.task(long_id, long_step, "train"))
        t_short = r.hgetall(Keys.task(short_id, short_step, "train"))
        if t_long.get("status") == t_short.get("status") == "claimed" and t_long["batch"] == t_short["batch"]:
            return long_step, short_step, t_long["batch"]
        return None

    deadline = time.monotonic() + 120
    while (shared := shared_train_batch()) is None:
        assert time.monotonic() < deadline, "no train batch carried both experiments"
        time.sleep(0.02)
    step, short_step, batch = shared
    assert client.cancel(long_id)
    assert not client.cancel(long_id)  # already finished: a no-op
    short, long_ = client.wait([short_id, long_id], timeout_s=300)
    assert short.status == "completed" and long_.status == "cancelled"

    # evidence that the cancel was tested: the shared batch ran to its commit AFTER the cancel
    events = [f for _, f in r.xrange(Keys.events) if f.get("exp") in (long_id, short_id)]  # in order
    (cancelled_at,) = [n for n, f in enumerate(events) if f["exp"] == long_id and f["type"] == "cancelled"]
    after = events[cancelled_at + 1:]
    assert [f for f in after if f["exp"] == short_id and f["type"] == "train_committed"
            and f["step"] == str(short_step)], after
    assert r.hget(Keys.task(short_id, short_step, "train"), "status") == "committed"
    assert client.metrics(short_id)[short_step]["batch_id"] == batch  # committed by that very batch
    # ... and committed nothing of the cancelled experiment, in that batch or after it
    assert not [f for f in after if f["exp"] == long_id], after
    assert r.hget(Keys.task(long_id, step, "train"), "status") != "committed"
    m = client.metrics(long_id)
    assert [x["step"] for x in m] == list(range(step)) and len(m) < 200
    assert client.get(long_id).version == step
    assert [x["step"] for x in client.metrics(short_id)] == list(range(6))


def test_weighted_fair_share_when_the_batch_budget_binds(make_fleet, redis_url, fleet_env) -> None:
    """A row budget of one experiment per batch: a weight-3 experiment gets ~3x the batches of a
    weight-1 one, and the light one is never starved."""
    import time

    make_fleet(workers=1, env={"LORAFLEET_MAX_BATCH_ROWS": "16"})  # 4 prompts x 4 samples = 16
    client = FleetClient(redis_url, fleet_env["LORAFLEET_STORE_URL"])
    heavy = client.submit({**spec("heavy", "char_class", {"cls": "digits"}, steps=12, seed=1), "weight": 3.0})
    light = client.submit({**spec("light", "near_char", {"char": "b"}, steps=12, seed=2), "weight": 1.0})
    deadline = time.monotonic() + 300
    while client.get(heavy).status != "completed" and time.monotonic() < deadline:
        time.sleep(0.02)
    light_steps = client.get(light).step
    print(f"light experiment: {light_steps} steps when heavy finished 12")
    assert 2 <= light_steps <= 7, f"light did {light_steps} steps while heavy did 12 (expected ~4)"
    assert max(x["train_batch"] for x in client.metrics(heavy)) == 1  # the budget really bound
    (state,) = client.wait([light], timeout_s=300)
    assert state.status == "completed"


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral"])
def test_a_fleet_step_on_each_architecture(make_fleet, redis_url, fleet_env, arch) -> None:
    """Llama is the default model of every other fleet test; the others run here end to end:
    worker start, rollout, fused train step, publish, commit, a PEFT checkpoint per version."""
    from lorafleet.workers.tiny_model import load_base_model as load

    make_fleet(workers=1, env={"LORAFLEET_BASE_MODEL": f"builtin:tiny-{arch}"})
    client = FleetClient(redis_url, fleet_env["LORAFLEET_STORE_URL"])
    exp = client.submit(spec(f"arch-{arch}", "char_class", {"cls": "digits"}, steps=2))
    state = client.wait([exp], timeout_s=180)[0]
    assert state.status == "completed", state.error
    store = AdapterStore(fleet_env["LORAFLEET_STORE_URL"])
    assert store.versions(exp) == [0, 1, 2]
    base, _, _ = load(f"builtin:tiny-{arch}", torch.float64, cache_dir=Path(fleet_env["LORAFLEET_CACHE_DIR"]))
    assert type(base).__name__.lower().startswith(arch)
    PeftModel.from_pretrained(base, str(store.local_dir(exp, 2)))
