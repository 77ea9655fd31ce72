"""Files on disk, the ground floor of the package (it imports nothing of the project): atomic
writes, the run directory's layout, weights snapshots, resume checkpoints, and one safe reader
for every weights format the project meets.

Formats read (never by unpickling arbitrary objects):
- this project's snapshots: ``.safetensors`` with parameter names of ``model.GPT``, or, from
  a run of several processes, a ``step_XXXXXXXX/`` directory of ``shard-RRRRR-of-WWWWW.safetensors``
  files, one per rank, each holding that rank's flat pieces of the parameters;
- nanoGPT / Sophia ``ckpt*.pt`` dicts (weights under ``"model"``, ``_orig_mod.`` and
  ``module.`` prefixes), read with ``torch.load(weights_only=True)``;
- Hugging Face model directories (``model.safetensors``, sharded or not, or
  ``pytorch_model.bin``). GPT-2 directories are converted to ``model.GPT`` names; other
  architectures (e.g. GPT-NeoX / Pythia) keep their own names;
- this project's resume checkpoints: a ``torch.distributed.checkpoint`` directory (tensors)
  with ``state.json`` (everything else), whose ``.metadata`` is read without executing code.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import shutil
import struct
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata

SNAPSHOT_RE = re.compile(r"(\d+)")
SHARD_RE = re.compile(r"shard-(\d{5})-of-(\d{5})\.safetensors")
# Conv1D weights in Hugging Face GPT-2 are stored transposed relative to nn.Linear.
HF_GPT2_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
WRAPPER_PREFIXES = re.compile(r"^(?:_orig_mod\.|module\.)+")
HF_WEIGHT_LAYOUTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Write ``path`` through a temporary file in the same folder, fsync it, then rename.

    A crash at any moment leaves either the previous complete file or the new complete
    file, never a partial one under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (a directory's entries: renames into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a hidden temporary name and rename it to ``path`` when the
    block completes: ``path`` is either absent or complete, whatever happens."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for f in tmp.iterdir():
            fsync_path(f)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


# ---------------------------------------------------------------------------------------------
# key normalisation


def strip_wrapper_prefixes(key: str) -> str:
    """``module._orig_mod.transformer.h.0...`` -> ``transformer.h.0...`` (DDP / torch.compile)."""
    return WRAPPER_PREFIXES.sub("", key)


def is_attention_mask(key: str) -> bool:
    """Causal-mask buffers older GPT-2 code saved beside the weights (not parameters)."""
    return key.endswith(".attn.bias") or key.endswith(".attn.masked_bias")


def hf_gpt2_key(key: str) -> tuple[str, bool]:
    """Hugging Face GPT-2 name -> (``model.GPT`` name, whether to transpose)."""
    if not key.startswith(("transformer.", "lm_head.")):
        key = "transformer." + key
    return key, key.endswith(HF_GPT2_TRANSPOSED)


# ---------------------------------------------------------------------------------------------
# reading


def _load_pickle_safely(path: Path) -> dict:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # files in torch's legacy (non-zip) format cannot be mapped
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: it holds Python objects beyond tensors and plain "
            f"containers, which could run code when unpickled ({str(e).splitlines()[0]}). "
            "Convert it to safetensors where it was made."
        ) from None
    except Exception as e:  # truncated zip, not a torch file, ...
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({e}); re-save or remove it") from None


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint64: "U64", torch.uint32: "U32",
    torch.uint16: "U16", torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ", torch.float8_e5m2: "F8_E5M2", torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    torch.complex64: "C64",
}  # safetensors' own names (safetensors.torch._TYPES): Weights reads every dtype safetensors does
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


class Weights:
    """A lazy, read-only view of one checkpoint's tensors under normalised names.

    ``get`` reads one tensor at a time into memory of its own (safetensors are read, not
    mapped), so a caller can stream a model through memory tensor by tensor, and holding k
    checkpoints open costs nothing until their tensors are asked for."""

    def __init__(self, path: str | os.PathLike, hf_names: bool = False):
        """``hf_names``: keep a Hugging Face GPT-2 directory's own tensor names (and layout)
        instead of converting them to ``model.GPT``'s."""
        self.path = Path(path)
        self.hf_names = hf_names
        self.metadata: dict[str, str] = {}
        self.nbytes = 0  # size of the files this view reads
        # name -> (reader, key inside the file, transpose, shape as stored)
        self._index: dict[str, tuple[Callable[[str], torch.Tensor], str, bool, tuple[int, ...]]] = {}
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such checkpoint file or directory")
        if self.path.is_dir() and sharded_snapshot_files(self.path):
            self._open_sharded_snapshot()
        elif self.path.is_dir():
            self._open_hf_dir()
        elif self.path.suffix == ".safetensors":
            self._add_safetensors(self.path, rename=lambda k: (strip_wrapper_prefixes(k), False))
            self.metadata = self._safetensors_metadata
        else:
            self._add_pickle(self.path, rename=lambda k: (strip_wrapper_prefixes(k), False))
        if not self._index:
            raise CheckpointError(f"{self.path}: holds no tensors")

    def keys(self) -> list[str]:
        return list(self._index)

    def get(self, name: str) -> torch.Tensor:
        read, key, transpose, _ = self._index[name]
        t = read(key)
        return t.t().contiguous() if transpose else t

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor shapes, read from the headers only."""
        return {k: shape[::-1] if transpose else shape for k, (_, _, transpose, shape) in self._index.items()}

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for k in self._index:
            yield k, self.get(k)

    # -- formats ----------------------------------------------------------------------------

    def _add_safetensors(self, file: Path, rename: Callable[[str], tuple[str, bool]]) -> None:
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
            keys = list(handle.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e}); re-save or remove it") from None
        self._safetensors_metadata = handle.metadata() or {}
        self.nbytes += file.stat().st_size
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))

        def read(key: str, file=file, start=8 + size) -> torch.Tensor:
            """The tensor read into memory of its own: the file is not mapped, so a reader
            holding several checkpoints open holds only the tensors it asked for."""
            info = header[key]
            begin, end = info["data_offsets"]
            data = torch.empty(end - begin, dtype=torch.uint8)
            with open(file, "rb", buffering=0) as f:
                f.seek(start + begin)
                got = f.readinto(data.numpy())
            if got != end - begin or info["dtype"] not in TORCH_DTYPES:
                raise CheckpointError(f"{file}: tensor {key!r} cannot be read (truncated, or dtype {info['dtype']})")
            return data.view(TORCH_DTYPES[info["dtype"]]).reshape(info["shape"])

        for key in keys:
            if not is_attention_mask(key):
                name, transpose = rename(key)
                self._index[name] = (read, key, transpose, tuple(handle.get_slice(key).get_shape()))

    def _add_pickle(self, file: Path, rename: Callable[[str], tuple[str, bool]]) -> None:
        obj = _load_pickle_safely(file)
        if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
            for key in ("model_args", "model_config"):  # nanoGPT / Sophia keep the model's shape here
                if isinstance(obj.get(key), dict):
                    self.metadata["model_config"] = json.dumps(obj[key])
            obj = obj["model"]  # nanoGPT / Sophia / this project's resume checkpoint
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{file}: expected a dict of tensors (or one under 'model')")
        self.nbytes += file.stat().st_size
        for key, tensor in obj.items():
            if not is_attention_mask(key):
                name, transpose = rename(key)
                self._index[name] = (lambda _k, t=tensor: t, key, transpose, tuple(tensor.shape))

    def _open_sharded_snapshot(self) -> None:
        """A snapshot written by several ranks: each shard file holds, per parameter, the
        rank's contiguous piece of its flattened elements (metadata ``pieces``: name ->
        [offset, shape]). ``get`` assembles the whole tensor from the pieces."""
        pieces: dict[str, list[tuple[Callable[[str], torch.Tensor], int]]] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for file in sharded_snapshot_files(self.path, complete=True):
            self._add_safetensors(file, rename=lambda k: (k, False))
            meta = dict(self._safetensors_metadata)
            for name, (offset, shape) in json.loads(meta.pop("pieces")).items():
                pieces.setdefault(name, []).append((self._index.pop(name)[0], offset))
                shapes[name] = tuple(shape)
            self.metadata = meta

        def assemble(name: str) -> torch.Tensor:
            parts = [(offset, read(name)) for read, offset in pieces[name]]
            out = torch.empty(math.prod(shapes[name]), dtype=parts[0][1].dtype)
            filled = 0
            for offset, part in parts:
                out[offset : offset + part.numel()] = part
                filled += part.numel()
            if filled != out.numel():
                raise CheckpointError(f"{self.path}: the shards hold {filled} of {out.numel()} elements of {name}")
            return out.view(shapes[name])

        for name in pieces:
            self._index[name] = (assemble, name, False, shapes[name])

    def _open_hf_dir(self) -> None:
        config_file = self.path / "config.json"
        if not config_file.exists():
            raise CheckpointError(
                f"{self.path}: a directory without config.json is not a Hugging Face model; "
                "point at a checkpoint file or a save_pretrained directory"
            )
        self.metadata = {"hf_config": config_file.read_text()}
        hf = json.loads(self.metadata["hf_config"])
        if hf.get("model_type") == "gpt2" and not self.hf_names:
            self.metadata["model_config"] = json.dumps(gpt2_config_from_hf(hf))
        convert = hf.get("model_type") == "gpt2" and not self.hf_names
        rename = hf_gpt2_key if convert else (lambda k: (k, False))
        for file in hf_weight_files(self.path):
            (self._add_safetensors if file.suffix == ".safetensors" else self._add_pickle)(file, rename)
        if convert:
            self._index.pop("lm_head.weight", None)  # tied to transformer.wte.weight


def hf_weight_files(folder: Path) -> list[Path]:
    """The files holding a save_pretrained directory's weights, safetensors first as transformers reads them."""
    for name in HF_WEIGHT_LAYOUTS:
        path = folder / name
        if not path.exists():
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            shards = json.loads(path.read_text())["weight_map"].values()
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path}: not a shard index ({e}); download or save the directory again") from None
        return [folder / shard for shard in sorted(set(shards))]
    raise CheckpointError(f"{folder}: none of {', '.join(HF_WEIGHT_LAYOUTS)}; not a complete save_pretrained directory")


def gpt2_config_from_hf(hf: dict) -> dict:
    """``model.GPTConfig`` fields of a Hugging Face GPT-2 config.json."""
    return {"block_size": hf["n_positions"], "vocab_size": hf["vocab_size"], "n_layer": hf["n_layer"],
            "n_head": hf["n_head"], "n_embd": hf["n_embd"], "bias": True,
            "scale_attn_by_inverse_layer_idx": hf.get("scale_attn_by_inverse_layer_idx", False)}


def model_config_of(weights: Weights) -> dict | None:
    """The GPT shape recorded with a checkpoint (our snapshots, nanoGPT's model_args,
    a Hugging Face GPT-2 config), or None."""
    text = weights.metadata.get("model_config")
    return json.loads(text) if text else None


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint in any supported format, under normalised names."""
    return dict(Weights(path).items())


def check_compatible(reference: Weights, other: Weights) -> None:
    """Raise a CheckpointError naming ``other`` if its tensor names or shapes differ."""
    ref, got = reference.shapes(), other.shapes()
    if ref == got:
        return
    missing, extra = sorted(ref.keys() - got.keys()), sorted(got.keys() - ref.keys())
    shapes = [k for k in sorted(ref.keys() & got.keys()) if ref[k] != got[k]]
    detail = f"missing {missing[:3]}" if missing else f"extra {extra[:3]}" if extra else (
        f"{shapes[0]}: {got[shapes[0]]} vs {ref[shapes[0]]}"
    )
    raise CheckpointError(
        f"{other.path}: does not match {reference.path} ({detail}); "
        "checkpoints averaged together must come from one architecture"
    )


# ---------------------------------------------------------------------------------------------
# this project's files


def is_run_dir(path: str | os.PathLike) -> bool:
    """A training run's directory: its config.json beside its snapshots or resume checkpoints."""
    path = Path(path)
    return (path / "config.json").is_file() and ((path / "snapshots").is_dir() or (path / "resume").is_dir())


def resume_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "resume"


def snapshot_dir(run_dir: str | os.PathLike, kind: str = "raw") -> Path:
    return Path(run_dir) / "snapshots" / kind


def run_snapshots(run_dir: str | os.PathLike, kind: str) -> dict[int, Path]:
    """The ``kind`` snapshots of a run directory by step; none: an error naming the kinds it has."""
    folder = snapshot_dir(run_dir, kind)
    paths = list_checkpoints(folder) if folder.is_dir() else {}
    if not paths:
        raise CheckpointError(f"{folder}: no snapshots; pick --kind among {', '.join(snapshot_kinds(run_dir))}")
    return paths


def step_of(path: str | os.PathLike) -> int | None:
    """Training step encoded in a checkpoint's name: the last number in it
    (``step_00001000.safetensors``, ``ckpt_1000.pt``, ``step1000/``)."""
    numbers = SNAPSHOT_RE.findall(Path(path).name.split(".")[0])
    return int(numbers[-1]) if numbers else None


def snapshot_name(step: int) -> str:
    return f"step_{step:08d}.safetensors"


def list_checkpoints(folder: str | os.PathLike) -> dict[int, Path]:
    """Checkpoints in ``folder`` by step: safetensors / .pt / .bin files, and Hugging Face
    directories; files being written (hidden temporaries) are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory of checkpoints")
    found: dict[int, Path] = {}
    for entry in sorted(folder.iterdir()):
        usable = (entry.is_dir() and is_checkpoint_dir(entry)) or (
            entry.is_file() and entry.suffix in (".safetensors", ".pt", ".bin", ".ckpt")
        )
        step = step_of(entry)
        if entry.name.startswith(".") or not usable or step is None:
            continue
        if step in found:
            raise CheckpointError(f"{folder}: {found[step].name} and {entry.name} both claim step {step}")
        found[step] = entry
    return dict(sorted(found.items()))


def snapshot_kinds(run_dir: str | os.PathLike) -> list[str]:
    """The kinds of snapshots a run directory holds: raw, ema, ema_<decay>, swa, ..."""
    folder = Path(run_dir) / "snapshots"
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def is_checkpoint_dir(folder: Path) -> bool:
    """A Hugging Face directory, a complete resume checkpoint (``torch.distributed.checkpoint``
    writes ``.metadata`` last), or a sharded snapshot with every shard written."""
    return (folder / "config.json").exists() or (folder / ".metadata").exists() or bool(
        sharded_snapshot_files(folder, complete=True, strict=False)
    )


def shard_name(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.safetensors"


def sharded_snapshot_files(folder: Path, complete: bool = False, strict: bool = True) -> list[Path]:
    """The shard files of a sharded snapshot directory ([] if it is none). With ``complete``,
    a directory missing a shard raises (``strict``) or gives []."""
    found = {}
    for f in folder.iterdir():
        m = SHARD_RE.fullmatch(f.name)
        if m:
            found[int(m[1])] = (int(m[2]), f)
    if not complete or not found:
        return [f for _, f in sorted(found.values())]
    world = next(iter(found.values()))[0]
    missing = sorted(set(range(world)) - found.keys())
    if missing or any(w != world for w, _ in found.values()):
        if not strict:
            return []
        raise CheckpointError(
            f"{folder}: incomplete sharded snapshot (missing {[shard_name(r, world) for r in missing[:3]]}); "
            "its writing was interrupted: use another step"
        )
    return [found[r][1] for r in range(world)]


def save_snapshot_shard(
    folder: str | os.PathLike,
    rank: int,
    world: int,
    pieces: list[tuple[str, int, torch.Size, torch.Tensor]],
    metadata: dict[str, str],
) -> int:
    """Atomically write one rank's pieces of a sharded snapshot: (parameter name, offset in
    its flattened elements, its shape, the flat fp32 piece) each. Returns the bytes written."""
    path = Path(folder) / shard_name(rank, world)
    where = {name: [offset, list(shape)] for name, offset, shape, _ in pieces}
    tensors = ((name, t.to(torch.float32).reshape(-1)) for name, _, _, t in pieces)
    save_safetensors(path, tensors, metadata | {"pieces": json.dumps(where)})
    return path.stat().st_size




def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """The safetensors format written straight from the tensors' (CPU) memory: no copy of
    the data, and the GIL released while the bytes go to the file, so a background writer
    does not slow the training thread."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))


def save_snapshot(path: str | os.PathLike, weights: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """Atomically write fp32 weights as safetensors; returns the file size in bytes."""
    save_safetensors(path, ((k, v.to(torch.float32)) for k, v in weights.items()), metadata)
    return Path(path).stat().st_size


# ---------------------------------------------------------------------------------------------
# the one writer of averages and exports

SHARD_BYTES = 5 * 10**9  # transformers' default shard size


def save_safetensors(
    path: str | os.PathLike,
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
    shard_bytes: int = SHARD_BYTES,
) -> None:
    """Write ``tensors`` as safetensors in their own dtypes, each file atomically.

    ``path`` ending in ``.safetensors``: that one file. Otherwise ``path`` is a folder (build it
    inside ``atomic_dir``) that gets ``model.safetensors``, or, past ``shard_bytes``, shards
    ``model-0000i-of-0000n.safetensors`` with the ``model.safetensors.index.json`` transformers
    reads; one shard is held in memory at a time."""
    path = Path(path)
    metadata = {"format": "pt", **(metadata or {})}  # transformers refuses safetensors without a format

    def write(file: Path, shard: dict[str, torch.Tensor]) -> None:
        atomic_write(file, lambda tmp: write_safetensors(tmp, shard, metadata))

    if path.suffix == ".safetensors":
        write(path, {name: t.detach().to("cpu").contiguous() for name, t in tensors})
        return
    shards: list[list[str]] = []  # tensor names of each written shard
    shard: dict[str, torch.Tensor] = {}
    size = total = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > shard_bytes:
            write(path / f".part{len(shards)}", shard)
            shards.append(list(shard))
            shard, size = {}, 0
        shard[name] = tensor.detach().to("cpu").contiguous()
        size, total = size + nbytes, total + nbytes
    if not shards:
        write(path / "model.safetensors", shard)
        return
    write(path / f".part{len(shards)}", shard)
    shards.append(list(shard))
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for i, file in enumerate(files):
        os.replace(path / f".part{i}", path / file)
    weight_map = {name: files[i] for i, names in enumerate(shards) for name in names}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write_text(path / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# resume checkpoints

DCP_METADATA = ".metadata"  # the file torch.distributed.checkpoint writes last (its format's name for it)
# a lone process saves and loads without a process group, as intended
warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles the ``.metadata`` of a checkpoint: DCP's own record types, torch sizes,
    dtypes and layouts, and paths; anything else (which could run code) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            module == "torch.distributed.checkpoint.metadata"
            or (module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo")
            or (module == "torch" and (name == "Size" or isinstance(
                getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))))
            or (module == "torch.serialization" and name == "_get_layout")
            or (module == "pathlib" and name in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"))
            or (module == "collections" and name == "OrderedDict")
        )
        if not allowed:
            raise pickle.UnpicklingError(f"refused {module}.{name}")
        return super().find_class(module, name)


class SafeReader(FileSystemReader):
    """A ``FileSystemReader`` that reads ``.metadata`` without executing code."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = Path(self.path) / DCP_METADATA
        with open(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
                raise CheckpointError(f"{path}: refused or unreadable checkpoint metadata ({e})") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def reason(e: BaseException) -> str:
    """What went wrong, in a line: the first rank's error of a ``CheckpointException``."""
    if isinstance(e, CheckpointException):
        e = next(iter(e.failures.values()))[0]
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def resume_values(path: str | os.PathLike) -> dict:
    """Everything of a resume checkpoint but its tensors: ``state.json``, nested by component."""
    file = Path(path) / "state.json"
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a resume checkpoint of this project ({e})") from None


def resume_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The global shape of every tensor a resume checkpoint holds, by name."""
    entries = SafeReader(path).read_metadata().state_dict_metadata
    return {k: tuple(m.size) for k, m in entries.items() if isinstance(m, TensorStorageMetadata)}


def load_resume_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], no_dist: bool = False) -> None:
    """Fill ``tensors`` (tensors and DTensors, in place) from the checkpoint at ``path``,
    resharding as needed."""
    try:
        dcp.load(tensors, storage_reader=SafeReader(path), no_dist=no_dist)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"{path}: cannot be loaded ({reason(e)})") from None


def read_resume(path: str | os.PathLike) -> dict:
    """A resume checkpoint, whole, in this process, for inspection and tests: ``step``, ``model``
    (name -> tensor), ``optimizer`` (its tensors by name), ``averagers`` (name -> its counters and
    ``tensors``: buffer -> parameter name -> tensor) and ``values`` (``state.json``)."""
    values = resume_values(path)
    entries = SafeReader(path).read_metadata().state_dict_metadata
    flat = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in entries.items()
            if isinstance(m, TensorStorageMetadata)}
    load_resume_tensors(path, flat, no_dist=True)
    names = values["model"]["names"]
    model = {name: flat[f"model.{name}"] for name in names}
    averagers = {}
    for name, counters in values.get("averagers", {}).items():
        prefix = f"averagers.{name}."
        buffers: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in flat.items():
            if key.startswith(prefix):
                buffer, _, param = key[len(prefix):].partition(".")
                if param:  # FSDP: one entry per parameter
                    buffers.setdefault(buffer, {})[param] = t
                else:  # DDP: the parameters flattened one after another
                    parts = t.split([model[n].numel() for n in names])
                    buffers[buffer] = {n: p.view(model[n].shape) for n, p in zip(names, parts, strict=True)}
        averagers[name] = {**counters, "tensors": buffers}
    optimizer = {k.removeprefix("optimizer."): t for k, t in flat.items() if k.startswith("optimizer.")}
    return {"step": values["trainer"]["step"], "model": model, "optimizer": optimizer, "averagers": averagers,
            "values": values}
