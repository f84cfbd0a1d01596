"""Child process of the resume-equivalence test: load every adapter of the scenario from the
store at version K, train the remaining steps, publish the final version. Run as
`python tests/resume_child.py CACHE_DIR STORE_URL K`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lf_testkit import SPECS, STEPS, load_model, run_fused

from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.workers.checkpoints import load_adapter, publish_adapter
from lorafleet.workers.fused_step import FusedTrainStep
from lorafleet.workers.multilora.model import MultiLoRAModel

if __name__ == "__main__":
    cache, store_url, k = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    store = AdapterStore(store_url)
    model, _ = load_model(cache)
    fused = FusedTrainStep(MultiLoRAModel(model))
    for name in SPECS:
        load_adapter(store, fused, name, version=k)
    reports = run_fused(fused, steps=range(k, STEPS))
    for name in SPECS:
        publish_adapter(store, fused, name, STEPS)
    print(json.dumps([{a: r.loss for a, r in rep.items()} for rep in reports]))
