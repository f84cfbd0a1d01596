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
    # counter written right before every WAIT (common/redis/replication.py): makes the WAIT cover every
    # earlier write of any connection, and a retried write that changed nothing
    replication_fence = PREFIX + "replication:fence"
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

    # Indexes of the experiment hashes (`common/state/ready_index.py`): what the scheduler and the
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

    # ---- HTTP API access (`scheduler/api/keys.py`): only the sha256 of a key is ever stored ------
    api_keys = PREFIX + "apikeys"  # zset: key id -> created (ms)

    @staticmethod
    def api_key(key_id: str) -> str:
        return f"{PREFIX}apikey:{key_id}"  # hash: name, sha256, admin, limits, created, revoked, last_used

    @staticmethod
    def api_key_by_hash(sha256_hex: str) -> str:
        return f"{PREFIX}apikey_by_hash:{sha256_hex}"  # string: key id

    @staticmethod
    def owner_experiments(key_id: str) -> str:
        return f"{PREFIX}owner:{key_id}:exps"  # zset: experiment id -> submit time (ms)

    # ---- uploaded datasets (`common/data/uploads.py`); bytes in the store under .datasets/ -----
    datasets = PREFIX + "datasets"  # zset: dataset id -> created (ms)

    @staticmethod
    def dataset(ds_id: str) -> str:
        return f"{PREFIX}dataset:{ds_id}"  # hash: owner, name, sha256, format, bytes, rows, created

    @staticmethod
    def dataset_experiments(ds_id: str) -> str:
        return f"{PREFIX}dataset:{ds_id}:exps"  # set: experiments submitted with the dataset

    @staticmethod
    def owner_datasets(owner: str) -> str:
        return f"{PREFIX}owner:{owner}:datasets"  # zset: dataset id -> created (ms)

    @staticmethod
    def dataset_blob(sha256_hex: str) -> str:
        return f"{PREFIX}dataset_blob:{sha256_hex}"  # set: dataset ids whose bytes are this object

    @staticmethod
    def dataset_blob_lock(sha256_hex: str) -> str:
        return f"{PREFIX}dataset_blob:{sha256_hex}:lock"  # string with TTL: writing or removing it

    # ---- Prometheus counters and histograms written where the events happen (`/metrics`) -----
    prom_counters = PREFIX + "prom:counters"  # hash: "<name>|<label>=<value>,..." -> count
    prom_last = PREFIX + "prom:last"  # hash: experiment id -> JSON {step, reward, finished_at}

    @staticmethod
    def prom_histogram(name: str) -> str:
        return f"{PREFIX}prom:hist:{name}"  # hash: "<labels>|<le>" -> count, "<labels>|sum" -> sum

    # ---- client-driven models (the Tinker endpoint; `common/tinker/op_store.py`). Payloads and
    # results are JSON text (OpStore uses a decode_responses=True client) ------------------------
    tk_done = PREFIX + "tk:done"  # stream: request id, status of every finished future (wakeups)
    tk_ready = PREFIX + "tk:ready"  # set: client models whose next op is present, nothing in flight
    tk_samples = PREFIX + "tk:samples"  # zset: sample request id -> enqueue time (ms)
    tk_samples_running = PREFIX + "tk:samples:running"  # zset: sample request id -> lease deadline
    fused_steps = PREFIX + "fused_steps"  # stream: one record per fused client-op batch

    @staticmethod
    def tk_session(session_id: str) -> str:
        return f"{PREFIX}tk:session:{session_id}"  # hash: owner, sdk_version, last_beat (TTL)

    @staticmethod
    def tk_model(exp_id: str) -> str:
        return f"{PREFIX}tk:model:{exp_id}"  # hash: op_seq, node, token, lease, gradlog, ...

    @staticmethod
    def tk_model_id(model_id: str) -> str:
        return f"{PREFIX}tk:model_id:{model_id}"  # string: Tinker model id -> experiment id

    @staticmethod
    def tk_ops(exp_id: str) -> str:
        return f"{PREFIX}tk:ops:{exp_id}"  # zset: op seq -> request id (ops not yet committed)

    @staticmethod
    def tk_gradlog(exp_id: str) -> str:
        return f"{PREFIX}tk:gradlog:{exp_id}"  # list: forward_backward request ids since the last optim_step

    @staticmethod
    def tk_dedupe(scope: str, seq: int) -> str:
        return f"{PREFIX}tk:dedupe:{scope}:{seq}"  # string: request id (a retried submit finds it)

    @staticmethod
    def tk_future(request_id: str) -> str:
        return f"{PREFIX}tk:future:{request_id}"  # hash: exp, seq, op, status, owner, created, done, error

    @staticmethod
    def tk_payload(request_id: str) -> str:
        return f"{PREFIX}tk:payload:{request_id}"  # bytes: the op's decoded request (JSON)

    @staticmethod
    def tk_result(request_id: str) -> str:
        return f"{PREFIX}tk:result:{request_id}"  # bytes: the op's result (JSON)

    @staticmethod
    def tk_sampler(sampling_session_id: str) -> str:
        return f"{PREFIX}tk:sampler:{sampling_session_id}"  # hash: exp, version, owner

    @staticmethod
    def tk_checkpoints(exp_id: str) -> str:
        return f"{PREFIX}tk:ckpt:{exp_id}"  # hash: "weights/<n>", "sampler_weights/<n>" -> JSON

    # ---- client-op protocol bookkeeping (`common/tinker/op_lua.py`) ---------------------------
    tk_inflight = PREFIX + "tk:inflight"  # set: client models with a published or claimed ops batch
    tk_held_owners = PREFIX + "tk:held_owners"  # set: API key ids with held (rate-limited) futures

    @staticmethod
    def tk_owner_queued(owner: str) -> str:
        return f"{PREFIX}tk:owner:{owner}:queued"  # set: the key's queued/running futures (its quota)

    @staticmethod
    def tk_held(owner: str) -> str:
        return f"{PREFIX}tk:owner:{owner}:held"  # list: the key's held request ids, released in order

    # ---- Tinker facade (`scheduler/api/tinker/`) ---------------------------------------------
    # hash written by workers at start: name, tokenizer_dir (a directory clients can load), arch,
    # max_context. The API is torch-free, so get_info reads the base model's facts from here.
    tk_base_model = PREFIX + "tk:base_model"

    @staticmethod
    def tk_answer(request_id: str) -> str:
        return f"{PREFIX}tk:answer:{request_id}"  # string: JSON of the Tinker-shaped answer extras

    @staticmethod
    def tk_session_models(session_id: str) -> str:
        return f"{PREFIX}tk:session:{session_id}:models"  # set: experiment ids of the session's models

    # ---- client models' lifecycle (`scheduler/tinker/capacity.py`, session expiry) ----------
    # zset: client models over their owner's max_experiments -> created (ms); their ops wait
    tk_waiting = PREFIX + "tk:waiting"
    tk_sessions = PREFIX + "tk:sessions"  # zset: active Tinker session id -> last heartbeat (ms)
