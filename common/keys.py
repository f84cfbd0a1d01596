"""Every Redis key lorafleet uses, in one place.

Redis is the record of truth (Celery only dispatches): experiment state, step claims and
commits, trajectories, metrics, the event stream, worker heartbeats and the scheduler lease.
"""

from __future__ import annotations

from lorafleet.common.ids import validate_id

PREFIX = "lf:"

# Sizes and lifetimes of what lives under these keys (the Lua scripts take them from here too).
STREAM_MAXLEN = 100_000  # lf:events and lf:worker_tasks keep about this many entries (MAXLEN ~)
TASK_TTL_MS = 7 * 24 * 3600 * 1000  # a step's task hash outlives any retry of that step
TRAJECTORY_TTL_MS = 24 * 3600 * 1000  # a committed rollout waits at most this long for its train step

# Celery queues
ROLLOUT_QUEUE = "lf.rollout"  # shared: any worker can roll out any adapter version
TRAIN_QUEUE = "lf.train"  # shared: train batches of adapters not yet placed on a node
NODE_QUEUE_PREFIX = "lf.node."  # per node: train batches of the adapters held hot there


def node_queue(node: str) -> str:
    return NODE_QUEUE_PREFIX + validate_id(node, "node name")


class Keys:
    """Key names. Methods take IDs that were validated at the boundary."""

    experiments = PREFIX + "experiments"  # zset: experiment id -> submit time (ms)
    active = PREFIX + "active"  # set: ids of queued or running experiments
    events = PREFIX + "events"  # stream: commits, completions, failures
    fence = PREFIX + "fence"  # counter: fencing tokens of step claims
    batches = PREFIX + "batches"  # hash: batch id -> JSON of an outstanding batch
    leader = PREFIX + "scheduler:leader"  # string: holder id, with a TTL (the lease)
    leader_epoch = PREFIX + "scheduler:epoch"  # counter: bumped on every leadership change
    cursor = PREFIX + "scheduler:cursor"  # string: last event id the scheduler consumed
    rebalance = PREFIX + "scheduler:rebalance"  # string with TTL: workers stop chaining rollouts
    workers = PREFIX + "workers"  # set: node names ever seen (liveness is per-node key)
    worker_tasks = PREFIX + "worker_tasks"  # stream: one entry per Celery task a worker ran
    dead_letters = PREFIX + "dead_letters"  # list: JSON of each poison payload taken off a queue
    dead_letter_count = PREFIX + "dead_letters:count"  # counter: poison payloads ever seen

    experiment_prefix = PREFIX + "exp:"  # + experiment id (Lua scripts that read hashes by id)

    # Indexes of the experiment hashes (`common/ready_index.py`): what the scheduler and the
    # workers look for, so that their cost per step does not grow with the number of experiments.
    # Each is a pure function of the hashes' fields, rewritten by every Lua script that changes
    # those fields (and by the submit transaction), in the same atomic step; the leader rebuilds
    # them all when it takes over, and checks every entry against its hash before using it.
    idx_queued = PREFIX + "idx:queued"  # set: ids of queued experiments (the leader activates them)
    idx_waiting = PREFIX + "idx:waiting"  # set: queued, or running with nothing in flight
    idx_inflight = PREFIX + "idx:inflight"  # set: running, with a published or claimed task
    idx_backoff = PREFIX + "idx:backoff"  # zset: id -> not_before (ms) of one waiting out a backoff
    idx_nodes = PREFIX + "idx:nodes"  # set: every node name an index entry ever named
    idx_ready_prefix = PREFIX + "idx:ready:"  # + phase + ":" + node (Lua builds the names)
    idx_node_prefix = PREFIX + "idx:node:"  # + node (Lua builds the names)

    @staticmethod
    def ready(phase: str, node: str) -> str:
        """zset: running experiments at `phase` held by `node` ("": not placed yet) with nothing in
        flight and not backing off; score rows served / weight, member `ready_member(...)`, so
        the zset's own order (score, then member) is the scheduler's fair order."""
        return f"{Keys.idx_ready_prefix}{phase}:{node}"

    @staticmethod
    def node_experiments(node: str) -> str:
        return f"{Keys.idx_node_prefix}{node}"  # set: running experiments placed on the node (its load)

    @staticmethod
    def experiment(exp_id: str) -> str:
        return f"{PREFIX}exp:{exp_id}"  # hash: spec, status, step, phase, version, node, ...

    @staticmethod
    def metrics(exp_id: str) -> str:
        return f"{PREFIX}metrics:{exp_id}"  # list: one JSON object per committed train step

    @staticmethod
    def task(exp_id: str, step: int, phase: str) -> str:
        return f"{PREFIX}task:{exp_id}:{step}:{phase}"  # hash: status, token, owner, lease, ...

    @staticmethod
    def refusals(exp_id: str) -> str:
        return f"{PREFIX}refusals:{exp_id}"  # hash: reason -> refused claims/commits of the experiment

    @staticmethod
    def trajectory(exp_id: str, step: int) -> str:
        # string: JSON trajectory of a committed rollout; after its train commit the replay log
        # (no TTL) until the next snapshot version is committed
        return f"{PREFIX}traj:{exp_id}:{step}"

    @staticmethod
    def trajectory_prefix(exp_id: str) -> str:
        return f"{PREFIX}traj:{exp_id}:"  # + step (COMMIT_TRAIN drops the replay log by prefix)

    @staticmethod
    def worker(node: str) -> str:
        return f"{PREFIX}worker:{node}"  # string with TTL: heartbeat JSON of a live worker
