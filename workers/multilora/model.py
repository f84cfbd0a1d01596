"""A Hugging Face causal LM with `MultiLoRALinear` injected: many adapters on one frozen base.

Export and import use PEFT's on-disk layout, so every adapter is a standard PEFT checkpoint:
keys `base_model.model.<module>.lora_A.weight` (r, in) and `...lora_B.weight` (out, r).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from lorafleet.common.schemas import KNOWN_TARGET_MODULES, LoRASpec
from lorafleet.common.store.adapter_import import lora_spec_from_peft_config
from lorafleet.workers.multilora.layer import Backend, MultiLoRALinear
from lorafleet.workers.multilora.layout import BatchLayout, LayoutSlot

PEFT_PREFIX = "base_model.model."


def _default_wrap(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in KNOWN_TARGET_MODULES


def matches_target(module_name: str, targets: tuple[str, ...]) -> bool:
    """PEFT's rule for a list of targets: the full name, or its last dotted components."""
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


class MultiLoRAModel:
    """Owns the injected layers and the per-adapter LoRA specs of one base model.

    Composition, not a subclass: `self.model` stays the original HF model, so its forward,
    generation and gradient checkpointing work unchanged.
    """

    def __init__(
        self,
        model: nn.Module,
        backend: Backend = "segment",
        wrap: Callable[[str, nn.Module], bool] = _default_wrap,
    ) -> None:
        self.model = model
        self.slot = LayoutSlot()
        self.specs: dict[str, LoRASpec] = {}
        for p in model.parameters():
            p.requires_grad_(False)
        self.layers: dict[str, MultiLoRALinear] = {}
        targets = [(n, m) for n, m in model.named_modules() if wrap(n, m)]
        for name, linear in targets:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            layer = MultiLoRALinear(linear, self.slot, backend)
            setattr(parent, attr, layer)
            self.layers[name] = layer
        if not self.layers:
            raise ValueError("no linear layer to wrap: is this a Llama/Qwen2-style model?")

    # ---- adapters -------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return list(self.specs)

    def add_adapter(self, name: str, spec: LoRASpec, seed: int = 0) -> None:
        if name in self.specs:
            raise ValueError(f"adapter {name!r} is already loaded")
        layers = self._target_layers(spec)
        if not layers:
            raise ValueError(f"target modules {spec.target_modules} match no layer of the model")
        gen = torch.Generator().manual_seed(seed)  # init is a function of the seed alone
        for _, layer in layers:
            layer.add_adapter(name, spec.rank, spec.alpha, spec.dropout, spec.use_rslora, gen)
        self.specs[name] = spec

    def remove_adapter(self, name: str) -> None:
        for _, layer in self._target_layers(self.specs.pop(name)):
            layer.remove_adapter(name)

    def _target_layers(self, spec: LoRASpec) -> list[tuple[str, MultiLoRALinear]]:
        return [(n, lay) for n, lay in self.layers.items() if matches_target(n, spec.target_modules)]

    def parameters_of(self, name: str) -> list[tuple[str, nn.Parameter]]:
        """(PEFT key, parameter) pairs of one adapter, in a fixed order."""
        out = []
        for module_name, layer in self._target_layers(self.specs[name]):
            out.append((f"{PEFT_PREFIX}{module_name}.lora_A.weight", layer.lora_A[name]))
            out.append((f"{PEFT_PREFIX}{module_name}.lora_B.weight", layer.lora_B[name]))
        return out

    # ---- PEFT format ----------------------------------------------------------------------
    def peft_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        return {k: p.detach().to("cpu", copy=True).contiguous() for k, p in self.parameters_of(name)}

    def peft_config(self, name: str, base_model_name_or_path: str | None = None) -> dict:
        spec = self.specs[name]
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "r": spec.rank,
            "lora_alpha": spec.alpha,
            "lora_dropout": spec.dropout,
            "target_modules": sorted(spec.target_modules),
            "use_rslora": spec.use_rslora,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "modules_to_save": None,
        }

    def load_peft(self, name: str, weights: Mapping[str, torch.Tensor], config: Mapping) -> None:
        """Load a PEFT LoRA checkpoint (our own export or one made by PEFT) as adapter `name`."""
        spec = lora_spec_from_peft_config(config)
        self.add_adapter(name, spec)
        expected = dict(self.parameters_of(name))
        clean = {_strip_adapter_name(k): v for k, v in weights.items()}
        missing, extra = expected.keys() - clean.keys(), clean.keys() - expected.keys()
        if missing or extra:
            self.remove_adapter(name)
            raise ValueError(
                f"checkpoint does not fit adapter {name!r}: missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(extra)[:3]}"
            )
        with torch.no_grad():
            for key, param in expected.items():
                param.copy_(clean[key])

    # ---- forward ------------------------------------------------------------------------
    def logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layout: BatchLayout | None
    ) -> torch.Tensor:
        """(B, T) -> (B, T, V). Callers that backpropagate must keep `slot.use` open instead."""
        unknown = [a for a in (layout.adapters if layout else []) if a not in self.specs]
        if unknown:  # a layer treats an adapter it does not hold as base-only: catch typos here
            raise KeyError(f"adapters not loaded: {unknown}")
        with self.slot.use(layout):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def _strip_adapter_name(key: str) -> str:
    # PEFT saves without the adapter name; an in-memory PEFT state dict has ".default."
    return key.replace(".lora_A.default.weight", ".lora_A.weight").replace(
        ".lora_B.default.weight", ".lora_B.weight"
    )
