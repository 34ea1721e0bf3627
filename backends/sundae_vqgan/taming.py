"""Import taming-transformers VQ-GAN checkpoints without executing pickled code.

A torch checkpoint is a zip of `data.pkl` plus one record per storage. We unpickle
`data.pkl` with a restricted unpickler: tensors are rebuilt by our own functions from
the raw storage bytes, plain containers are allowed, and every other global (an
`argparse.Namespace` of hyper-parameters, an omegaconf config, or a malicious
`os.system`) turns into an inert placeholder that records its arguments and is never
called. The VQ-GAN weights are then picked out of the state dict and the
architecture is inferred from their shapes.
"""

from __future__ import annotations

import collections
import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sundae_cli.errors import CheckpointError
from sundae_vqgan.taming_yaml import config_from_taming_yaml

if TYPE_CHECKING:
    from sundae_vqgan.model import VQGAN

log = logging.getLogger(__name__)

__all__ = [
    "InertObject",
    "config_from_taming_yaml",
    "extract_vqgan_state",
    "import_taming_checkpoint",
    "infer_config_from_state",
    "load_taming_vqgan",
    "read_torch_checkpoint",
]

VQGAN_PREFIXES = (
    "encoder.",
    "decoder.",
    "quantize.",
    "quant_conv.",
    "post_quant_conv.",
)
FIRST_STAGE_PREFIX = "first_stage_model."
# Storage classes as torch pickles them, and the element type of each.
STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}
# dtypes by name, read from the module dict so no lazy torch import is triggered.
TORCH_DTYPES = {
    name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)
}
IMPORT_HINT = (
    "give a taming-transformers VQModel or cond-transformer .ckpt saved by torch>=1.6 "
    "(zip format)"
)


class InertObject:
    """Stands in for an instance of any class the safe loader refuses to import.

    Records constructor arguments, pickled state and items; never runs code.
    """

    inert_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> InertObject:
        obj = super().__new__(cls)
        obj.inert_args, obj.inert_kwargs = args, kwargs
        obj.inert_state, obj.inert_items, obj.inert_list = None, {}, []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> InertObject:
        return type(self)(*args, **kwargs)

    def __setstate__(self, state: Any) -> None:
        self.inert_state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.inert_items[key] = value

    def append(self, value: Any) -> None:
        self.inert_list.append(value)

    def extend(self, values: Any) -> None:
        self.inert_list.extend(values)

    def __repr__(self) -> str:
        return f"<inert {self.inert_name}>"


class _StorageKind:
    """What `find_class` returns for a torch storage class: just its dtype."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor(
    storage: torch.Tensor,
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    *_: Any,
) -> torch.Tensor:
    """Our `_rebuild_tensor(_v2)`: a strided view of a 1-D storage tensor.

    Requires-grad flags, hooks and conj/neg metadata are dropped (state dicts have
    none).
    """
    if not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError("tensor without a storage record")
    return torch.as_strided(storage, tuple(size), tuple(stride), int(offset))


def _rebuild_tensor_v3(
    storage: torch.Tensor,
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool,
    hooks: Any,
    dtype: torch.dtype,
    *_: Any,
) -> torch.Tensor:
    """Our `_rebuild_tensor_v3`: like v2, over byte storage with an explicit dtype."""
    if not isinstance(dtype, torch.dtype):
        raise pickle.UnpicklingError("tensor with an unknown dtype")
    return _rebuild_tensor(storage.view(dtype), offset, size, stride)


def _rebuild_parameter(data: torch.Tensor, *_: Any) -> torch.Tensor:
    """Parameters come back as plain tensors."""
    return data


SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles `data.pkl` of a torch zip checkpoint, executing nothing."""

    def __init__(self, file: Any, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._storages: dict[str, torch.Tensor] = {}
        self._inert_classes: dict[tuple[str, str], type[InertObject]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in SAFE_GLOBALS:
            return SAFE_GLOBALS[module, name]
        if module in ("torch", "torch.storage") and name in STORAGE_DTYPES:
            return _StorageKind(STORAGE_DTYPES[name])
        if module == "torch" and name in TORCH_DTYPES:
            return TORCH_DTYPES[name]
        return self._inert_class(module, name)

    def _inert_class(self, module: str, name: str) -> type[InertObject]:
        key = (module, name)
        if key not in self._inert_classes:
            attrs = {"inert_name": f"{module}.{name}"}
            self._inert_classes[key] = type("Inert", (InertObject,), attrs)
            log.debug("checkpoint global %s.%s kept as inert data", module, name)
        return self._inert_classes[key]

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, kind, key, _location, _numel = pid
        if not isinstance(kind, _StorageKind):
            raise pickle.UnpicklingError(f"unsupported storage type {kind!r}")
        key = str(key)
        if key not in self._storages:
            raw = bytearray(self._archive.read(f"{self._prefix}/data/{key}"))
            if not raw:
                self._storages[key] = torch.empty(0, dtype=kind.dtype)
            else:
                self._storages[key] = torch.frombuffer(raw, dtype=kind.dtype)
        return self._storages[key]


def read_torch_checkpoint(path: Path) -> Any:
    """Load a torch zip checkpoint safely: tensors and plain containers, inert rest."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found", IMPORT_HINT)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a zip-format torch checkpoint (legacy format or not torch)",
            hint="re-save it with torch.save under torch>=1.6 in a trusted environment",
        )
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _archive_prefix(archive)
            _check_byteorder(archive, prefix)
            with archive.open(f"{prefix}/data.pkl") as handle:
                return SafeUnpickler(handle, archive, prefix).load()
    except CheckpointError:
        raise
    except Exception as exc:  # malformed data can fail anywhere in unpickling
        raise CheckpointError(
            f"{path}: cannot read checkpoint: {type(exc).__name__}: {exc}", IMPORT_HINT
        ) from exc


def _archive_prefix(archive: zipfile.ZipFile) -> str:
    for name in archive.namelist():
        folder, _, leaf = name.rpartition("/")
        if leaf == "data.pkl" and "/" not in folder:
            return folder
    raise CheckpointError(f"{archive.filename}: no data.pkl record", IMPORT_HINT)


def _check_byteorder(archive: zipfile.ZipFile, prefix: str) -> None:
    try:
        order = archive.read(f"{prefix}/byteorder").decode().strip()
    except KeyError:
        return  # files from before torch recorded it are little-endian
    if order != "little":
        raise CheckpointError(
            f"{archive.filename}: {order}-endian checkpoints are not supported",
            hint="re-save the checkpoint on a little-endian machine",
        )


def extract_vqgan_state(checkpoint: Any) -> dict[str, torch.Tensor]:
    """The VQ-GAN tensors of a taming checkpoint, keyed as `VQGAN.state_dict()`.

    Takes `checkpoint["state_dict"]` (or a bare state dict); strips the
    `first_stage_model.` prefix of a cond-transformer checkpoint; drops the loss
    (discriminator, LPIPS), transformer and conditioning keys and the index-remap
    buffer `quantize.used` (our indices address the full codebook).
    """
    state = checkpoint
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        state = checkpoint["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError("checkpoint holds no state dict", IMPORT_HINT)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if any(key.startswith(FIRST_STAGE_PREFIX) for key in tensors):
        tensors = {
            key.removeprefix(FIRST_STAGE_PREFIX): value
            for key, value in tensors.items()
            if key.startswith(FIRST_STAGE_PREFIX)
        }

    kept = {k: v for k, v in tensors.items() if k.startswith(VQGAN_PREFIXES)}
    kept.pop("quantize.used", None)
    if "quantize.embedding.weight" not in kept:
        raise CheckpointError(
            "checkpoint has no quantize.embedding.weight: not a taming VQModel "
            "(Gumbel and EMA quantizers are not supported)",
            IMPORT_HINT,
        )
    log.info("kept %d VQ-GAN tensors, dropped %d", len(kept), len(state) - len(kept))
    return kept


def infer_config_from_state(
    state: dict[str, torch.Tensor], resolution: int = 256
) -> dict[str, Any]:
    """`VQGANConfig` fields read off the tensor shapes of a taming VQ-GAN state dict.

    `resolution` cannot be seen in the weights; it only names the levels in
    `attn_resolutions` (level i has size resolution // 2**i). Taming's usual 256
    is the default; pass the training resolution when it is known.
    """
    try:
        return _infer(state, resolution)
    except KeyError as exc:
        raise CheckpointError(
            f"checkpoint lacks the VQ-GAN tensor {exc.args[0]}", IMPORT_HINT
        ) from exc


def _infer(state: dict[str, torch.Tensor], resolution: int) -> dict[str, Any]:
    ch, in_channels = state["encoder.conv_in.weight"].shape[:2]
    num_levels = len(_indices(state, r"encoder\.down\.(\d+)\."))
    num_res_blocks = len(_indices(state, r"encoder\.down\.0\.block\.(\d+)\."))
    widths = [
        state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]
        for i in range(num_levels)
    ]
    if any(width % ch for width in widths):
        raise CheckpointError(f"level widths {widths} are not multiples of ch {ch}")

    z_channels = state["decoder.conv_in.weight"].shape[1]
    if state["encoder.conv_out.weight"].shape[0] != z_channels:
        raise CheckpointError("encoder output is not z_channels wide (double_z?)")
    encoder_attn = _indices(state, r"encoder\.down\.(\d+)\.attn\.")
    decoder_attn = _indices(state, r"decoder\.up\.(\d+)\.attn\.")
    if encoder_attn != decoder_attn:
        raise CheckpointError(
            f"encoder attention at levels {sorted(encoder_attn)} but decoder at "
            f"{sorted(decoder_attn)}; taming places both alike"
        )
    codebook_size, embed_dim = state["quantize.embedding.weight"].shape
    return {
        "ch": int(ch),
        "ch_mult": [int(width // ch) for width in widths],
        "num_res_blocks": num_res_blocks,
        "attn_resolutions": [resolution // 2**i for i in sorted(encoder_attn)],
        "resolution": resolution,
        "in_channels": int(in_channels),
        "out_ch": int(state["decoder.conv_out.weight"].shape[0]),
        "z_channels": int(z_channels),
        "embed_dim": int(embed_dim),
        "codebook_size": int(codebook_size),
    }


def _indices(state: dict[str, torch.Tensor], pattern: str) -> set[int]:
    regex = re.compile(pattern)
    return {int(match[1]) for key in state if (match := regex.match(key))}


def import_taming_checkpoint(
    path: Path, yaml_text: str | None = None, resolution: int = 256
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, VQGANConfig fields) of a taming checkpoint, read safely.

    The config comes from the weights' shapes; a taming YAML, when given, confirms
    it (a mismatch is a CheckpointError) and supplies `resolution` and `dropout`.
    """
    state = extract_vqgan_state(read_torch_checkpoint(path))
    if yaml_text is None:
        return state, infer_config_from_state(state, resolution)

    declared = config_from_taming_yaml(yaml_text)
    inferred = infer_config_from_state(state, declared.get("resolution", resolution))
    mismatched = [
        f"{key}: yaml {declared[key]!r}, weights {value!r}"
        for key, value in inferred.items()
        if key in declared and declared[key] != value
    ]
    if mismatched:
        raise CheckpointError(
            f"{path}: YAML config disagrees with the weights: " + "; ".join(mismatched),
            hint="pass the YAML that belongs to this checkpoint, or none",
        )
    return state, {**inferred, **declared}


def load_taming_vqgan(
    path: Path, yaml_text: str | None = None, resolution: int = 256
) -> VQGAN:
    """A `VQGAN` holding a taming checkpoint's weights (loaded strictly)."""
    from sundae_vqgan.config import VQGANConfig
    from sundae_vqgan.model import build_autoencoder

    state, fields = import_taming_checkpoint(path, yaml_text, resolution)
    model = build_autoencoder(VQGANConfig(**fields))
    model.load_state_dict(state, strict=True)
    return model
