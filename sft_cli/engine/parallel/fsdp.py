"""`engine.distributed.strategy: fsdp` where Accelerate will not shard: PyTorch's FSDP2 (`fully_shard`).

Accelerate's CPU path (gloo) ignores its FSDP plugin and wraps the model in DDP; PyTorch's own FSDP2 runs on
gloo, so on CPU the engine shards with it directly: each transformer block, then the root. Checkpoints are
sharded with torch.distributed.checkpoint (every rank writes its own part, nothing is gathered), and the final
model is consolidated once into a plain `from_pretrained` directory.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from sft_cli.engine.parallel.base import Sharded
from sft_cli.model.backbone import block_lists, keyed_like_unwrapped, unwrap

SHARDED_DIR = "sharded"  # inside checkpoints/step-N/: model + optimizer, one file per rank + .metadata


class FSDP(Sharded):
    """FSDP2: by Accelerate where it shards (CUDA), else by PyTorch's `fully_shard` here (`shard_itself`)."""

    name = "fsdp"
    state_dir = SHARDED_DIR
    shards_parameters = True

    def __init__(self, accelerator: Any, shard_itself: bool):
        super().__init__(accelerator)
        self.shard_itself = shard_itself

    def shard(self, model: nn.Module) -> nn.Module:
        return shard_model(model, self.accelerator.num_processes) if self.shard_itself else model

    def prepare(self, model: nn.Module, optimizer: Any) -> tuple[nn.Module, Any]:
        if self.shard_itself:  # already sharded: the optimizer was built on the shards
            return model, self.accelerator.prepare_optimizer(optimizer)
        return super().prepare(model, optimizer)

    def collective_forwards(self, model: nn.Module) -> bool:
        return self.accelerator.num_processes > 1

    def full_state_dict(self, model: nn.Module) -> Optional[dict[str, torch.Tensor]]:
        return full_state_dict(model)

    def save_shards(self, directory: Path, model: nn.Module, optimizer: Any) -> None:
        save_sharded(directory, model, optimizer)

    def read_checkpoint(self, checkpoint: Path, model: nn.Module, optimizer: Any, saved: dict[str, Any]) -> None:
        load_sharded(checkpoint, model, optimizer)


def shard_model(model: nn.Module, world: int) -> nn.Module:
    """FSDP2 over a CPU mesh of `world` ranks: every transformer block its own unit, the rest in the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for _, blocks in block_lists(unwrap(model)):
        for block in blocks:
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    """True when the model's parameters are FSDP2 shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights, gathered onto rank 0 on CPU (a collective: every rank calls it).

    Keys are those of `unwrap(model)` (the transformers model), so `save_pretrained` can write them.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return keyed_like_unwrapped(state, model)


def save_sharded(checkpoint_tmp: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shard of the model and optimizer state (no gather) under `checkpoint_tmp`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(checkpoint_tmp / SHARDED_DIR))


def load_sharded(checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read this rank's shards back into the model and optimizer (the same world size wrote them).

    Nothing in the checkpoint is unpickled freely: its `.metadata` only into DCP's own metadata classes, and
    its non-tensor values (optimizer settings) with `torch.load(weights_only=True)`, so a checkpoint someone
    hands you cannot run code.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    directory = str(checkpoint / SHARDED_DIR)
    dcp.load(state, storage_reader=_safe_reader(directory), planner=_safe_planner())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


# What DCP's `.metadata` pickle may name: its metadata dataclasses and the plain values inside them.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata and refuses any other global (no code from a checkpoint file runs)."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = name in _METADATA_GLOBALS.get(module, ())
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's .metadata")
        return super().find_class(module, name)


def _safe_reader(directory: str) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as stream:
                metadata = _MetadataUnpickler(stream).load()
            if not isinstance(metadata, Metadata):
                raise pickle.UnpicklingError(f".metadata holds a {type(metadata).__name__}, not DCP metadata")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(directory)


def _safe_planner() -> Any:
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class WeightsOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return WeightsOnlyPlanner()
