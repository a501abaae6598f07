"""A Hugging Face model dir worked on one decoder layer at a time: what lets one node prune a 70B model.

The model is built on the meta device (no memory); the parameters outside the decoder layers (embeddings,
final norm, lm_head) are read in the source dtype. Each decoder layer is read from the safetensors shards
when its turn comes, in fp32 on the pruning device, and once pruned is written back in the source dtype
with its masks to a file of its own and dropped. `save` then writes the pruned dir sharded exactly like the
source (same files, same index, same dtypes), one tensor at a time (export/shards.py). The host holds the
outside parameters, one layer and one tensor: 4.2 GB + 1.7 GB for Llama-3-70B in bf16, against 280 GB for
the whole model in fp32.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from megatron_ast import hf_layout
from megatron_ast.errors import UsageError
from megatron_ast.export import shards
from megatron_ast.modeling import WeightReader
from megatron_ast.sparsity.sparse_weights import decoder_layers

_DTYPES = {v: k for k, v in shards.TAGS.items()}


def _set(root: nn.Module, name: str, value: torch.Tensor) -> None:
    module_path, _, attr = name.rpartition(".")
    module = root.get_submodule(module_path) if module_path else root
    module._parameters[attr] = nn.Parameter(value, requires_grad=False)


class StreamedModel:
    def __init__(self, model_dir: str | Path, work: Path, device: str):
        from accelerate import init_empty_weights
        from safetensors import safe_open
        from transformers import AutoConfig, AutoModelForCausalLM

        self.source, self.work, self.device = Path(model_dir), work, device
        self.reader = WeightReader(model_dir)
        self.dtypes = {}
        for f in sorted(set(self.reader.files.values())):
            with safe_open(str(f), framework="pt") as h:
                self.dtypes.update({k: _DTYPES[h.get_slice(k).get_dtype()] for k in h.keys()})
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary tables) in fp32
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        self.prefix = decoder_layers(self.model)[0] + "."
        # the stored tensors of each decoder layer (stored names may differ from the parameters': hf_layout.py)
        short = self.prefix.removeprefix(getattr(self.model, "base_model_prefix", "") + ".")
        self.layer_keys: dict[int, list[str]] = {}
        outside = []
        for key in self.reader.files:
            head = next((p for p in (self.prefix, short) if key.startswith(p)), None)
            if head is None:
                outside.append(key)
            else:
                self.layer_keys.setdefault(int(key[len(head):].split(".")[0]), []).append(key)
        self.param_dtypes: dict[str, torch.dtype] = {}
        params = dict(self.model.named_parameters(remove_duplicate=False))
        for name, value in hf_layout.to_model(self.model, {k: self.reader.get(k) for k in outside}).items():
            if name in params:
                self.param_dtypes[name] = value.dtype
                _set(self.model, name, value)
        self.model.tie_weights()
        missing = [n for n, p in self.model.named_parameters() if p.is_meta and not n.startswith(self.prefix)]
        if missing:
            raise UsageError(f"{model_dir} has no tensor for {missing[0]}"
                             f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: is it this config's model?")
        self.masks: dict[str, torch.Tensor] = {}  # prune_model's, by parameter name: each layer's go with it
        self.written: dict[str, Path] = {}  # stored tensor name -> the layer file holding it
        work.mkdir(parents=True, exist_ok=True)

    def load(self, i: int, layer: nn.Module) -> None:
        mine = f"{self.prefix}{i}."
        params = hf_layout.to_model(self.model, {k: self.reader.get(k) for k in self.layer_keys.get(i, [])})
        for name, _ in list(layer.named_parameters()):
            value = params.get(f"{mine}{name}")
            if value is None:
                raise UsageError(f"{self.source} has no tensor for {mine}{name}: is it this config's model?")
            self.param_dtypes[f"{mine}{name}"] = value.dtype
            _set(layer, name, value.to(self.device, torch.float32))

    def release(self, i: int, layer: nn.Module) -> None:
        from safetensors.torch import save_file

        mine = f"{self.prefix}{i}."
        params = {f"{mine}{n}": p.detach().to("cpu", self.param_dtypes[f"{mine}{n}"]) for n, p in layer.named_parameters()}
        tensors = self._as_source(hf_layout.to_stored(self.model, params), i)
        masks = {k: self.masks.pop(k) for k in list(self.masks) if k.startswith(mine)}
        tensors.update({f"mask:{k}": v for k, v in self._as_source(hf_layout.to_stored(self.model, masks), i).items()})
        path = self.work / f"layer{i}.safetensors"
        save_file(tensors, str(path))
        self.written.update({k: path for k in tensors})
        for name, p in list(layer.named_parameters()):
            _set(layer, name, torch.empty(p.shape, dtype=p.dtype, device="meta"))

    def _as_source(self, stored: dict[str, torch.Tensor], layer: int | None = None) -> dict[str, torch.Tensor]:
        """Stored tensors under the source's own names (GPT-2's hub files leave out `transformer.`); each must be
        one the source holds (of `layer`, when given)."""
        known = set(self.reader.files) if layer is None else set(self.layer_keys.get(layer, []))
        base = getattr(self.model, "base_model_prefix", "") + "."
        out = {}
        for key, value in stored.items():
            name = key if key in known else key.removeprefix(base)
            if name not in known:
                where = f"layer {layer}" if layer is not None else "the model"
                raise UsageError(f"{self.source}: transformers writes {key} for {where}, which the source does not "
                                 f"store ({sorted(known)[:2]}...): this layout is unknown here")
            out[name] = value.contiguous()
        return out

    def _from_layer_file(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.written[key]), framework="pt") as h:
            return h.get_tensor(key)

    def _shape(self, key: str) -> tuple[int, ...]:
        from safetensors import safe_open

        with safe_open(str(self.written[key]), framework="pt") as h:
            return tuple(h.get_slice(key).get_shape())

    def save(self, out: Path, outside_masks: dict[str, torch.Tensor], masks_file: str,
             metadata: dict[str, str]) -> list[str]:
        """The pruned weights into `out`, sharded like the source; `masks_file` beside them (the layers' masks
        from their files, `outside_masks` for lm_head/embeddings), under the stored names. Returns the mask names."""
        outside = {n: p for n, p in self.model.named_parameters(remove_duplicate=False) if not n.startswith(self.prefix)}
        stored = hf_layout.to_stored(self.model, outside)  # a tied lm_head the source stores too, or not
        outside = self._as_source({k: v for k, v in stored.items()
                                   if k in self.reader.files or k.removeprefix(f"{self.model.base_model_prefix}.")
                                   in self.reader.files})

        def make(key: str) -> torch.Tensor:
            """A file's tensor: pruned (a layer's file), the model's outside parameter, or the source's own (a stored
            buffer, which the model does not own as a parameter)."""
            if key in self.written:
                return self._from_layer_file(key)
            if key in outside:
                return outside[key].detach().to("cpu", self.dtypes[key])
            return self.reader.get(key)

        by_file: dict[str, list[shards.Spec]] = {}
        for name, f in self.reader.files.items():
            by_file.setdefault(f.name, []).append((name, self.dtypes[name], self.reader.shape(name)))
        for fname, specs in sorted(by_file.items()):
            shards.write_file(out / fname, specs, make, {"format": "pt"})
        index = self.source / "model.safetensors.index.json"
        if index.is_file():
            shutil.copy2(index, out / index.name)  # the same tensors in the same files at the same dtypes and sizes
        outside_masks = self._as_source(hf_layout.to_stored(self.model, outside_masks))
        layer_masks = {k.removeprefix("mask:"): None for k in self.written if k.startswith("mask:")}
        names = sorted({**layer_masks, **outside_masks})

        def make_mask(name: str) -> torch.Tensor:
            return outside_masks[name] if name in outside_masks else self._from_layer_file(f"mask:{name}")

        specs = [(k, torch.bool, tuple(outside_masks[k].shape) if k in outside_masks else self._shape(f"mask:{k}"))
                 for k in names]  # each mask is shaped like its weight as stored
        shards.write_file(out / masks_file, specs, lambda k: make_mask(k).bool(), metadata)
        shutil.copy2(self.source / "config.json", out / "config.json")  # the source dtype is kept
        return names
