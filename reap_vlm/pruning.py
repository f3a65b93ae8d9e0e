"""Streaming expert pruning of a safetensors checkpoint: read tensor by tensor, write only kept experts.

Nothing is ever loaded whole.  Each output tensor is a list of byte ranges of its source tensor
(the whole tensor, or one slab per kept expert on dim 0), copied file to file with ``os.sendfile``.
We parse the safetensors header ourselves for the data offsets rather than read through
``safe_open``: its memory map keeps every page it touched resident until the shard is closed, so
reading a shard through it grows the process's RSS to the shard's size.  ``safe_open`` is still
the authority on what a file holds: every source shard's keys and metadata are cross-checked
against it, and ``--verify`` reopens every output tensor with it.

Byte ranges also make the pruner dtype-agnostic (bf16, fp8, packed int4 in int32, scales...):
a fused tensor [E, ...] is E equal slabs, whatever its element type.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import struct
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from .checkpoint import INDEX_NAME, Checkpoint
from .errors import ReapError
from .families import KeyRole, ModelFamily
from .fsutil import atomic_output_dir, read_json
from .metadata import METADATA_NAME, ReapMetadata, load_metadata
from .selection import num_to_keep, select_experts

PRUNING_RECORD = "pruning_record.json"
QUANTIZATION_LISTS = ("modules_to_not_convert", "ignore")
COPY_CHUNK = 64 << 20  # bytes per sendfile call: keeps the progress bar moving on multi-GB tensors
DISK_MARGIN = 64 << 20  # headers, config, filesystem slack
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


# ----------------------------------------------------------------------------------------------- headers

@dataclass(frozen=True)
class SourceTensor:
    """One tensor of a safetensors file: dtype, shape and absolute byte span in the file."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    def slabs(self, count: int) -> list[tuple[int, int]]:
        """The byte spans of the ``count`` equal slabs along dim 0 (one per expert)."""
        step = self.nbytes // count
        return [(self.begin + i * step, self.begin + (i + 1) * step) for i in range(count)]


@dataclass(frozen=True)
class ShardHeader:
    metadata: dict[str, str] | None
    tensors: dict[str, SourceTensor]  # in file order


def read_header(path: Path) -> ShardHeader:
    """Parse a safetensors header (8-byte little-endian length, JSON) into absolute byte spans."""
    with open(path, "rb") as handle:
        raw_len = handle.read(8)
        if len(raw_len) != 8:
            raise ReapError(f"{path} is not a safetensors file (too short); re-download the shard")
        (length,) = struct.unpack("<Q", raw_len)
        if length > MAX_HEADER:
            raise ReapError(f"{path} is not a safetensors file (header length {length}); re-download the shard")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ReapError(f"{path} has a corrupt safetensors header; re-download the shard") from None
    base = 8 + length
    metadata = header.pop("__metadata__", None) if isinstance(header, dict) else None
    try:
        tensors = {}
        for key, spec in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = spec["data_offsets"]
            tensors[key] = SourceTensor(key, spec["dtype"], tuple(spec["shape"]), base + begin, base + end)
    except (AttributeError, KeyError, TypeError, ValueError):
        raise ReapError(f"{path} has a malformed safetensors header; re-download the shard") from None
    size = path.stat().st_size
    if tensors and max(t.end for t in tensors.values()) > size:
        raise ReapError(f"{path} is truncated ({size} bytes, header says more); re-download the shard")
    return ShardHeader(metadata, tensors)


def header_bytes(metadata: dict[str, str] | None, entries: list[tuple[str, str, tuple[int, ...], int]]) -> bytes:
    """A safetensors header for (key, dtype, shape, nbytes) laid out in order, padded to 8 bytes
    with spaces as the reference writer does."""
    header: dict = {"__metadata__": metadata} if metadata is not None else {}
    offset = 0
    for key, dtype, shape, nbytes in entries:
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


# ----------------------------------------------------------------------------------------------- what to keep

def check_experts_to_keep(experts_to_keep: dict, moe_layers: list[int], num_experts: int,
                          top_k: int) -> dict[int, list[int]]:
    """The kept ids per MoE layer, sorted, after checking they fit the model; a ReapError says what does not."""
    keep = {int(layer): sorted(int(e) for e in ids) for layer, ids in experts_to_keep.items()}
    if set(keep) != set(moe_layers):
        extra, missing = sorted(set(keep) - set(moe_layers)), sorted(set(moe_layers) - set(keep))
        raise ReapError(f"experts_to_keep does not fit the model: its layers differ from the model's MoE layers "
                        f"(missing {missing[:8]}, not MoE {extra[:8]}); the metadata was made for another "
                        "model — rerun reap.py on this model or pass the matching --model / --metadata")
    for layer, ids in sorted(keep.items()):
        bad = [e for e in ids if not 0 <= e < num_experts]
        if bad:
            raise ReapError(f"experts_to_keep does not fit the model: layer {layer} names expert ids {bad[:5]} "
                            f"outside 0..{num_experts - 1}; rerun reap.py on this model")
        duplicated = sorted(e for e, n in Counter(ids).items() if n > 1)
        if duplicated:
            raise ReapError(f"experts_to_keep is invalid: layer {layer} lists expert ids {duplicated[:5]} more "
                            "than once; rerun reap.py or fix the list")
    counts = sorted({len(ids) for ids in keep.values()})
    if len(counts) > 1:
        raise ReapError(f"experts_to_keep keeps uneven counts across layers ({counts}); vLLM needs one expert "
                        "count for every layer — recompute the selection with --prune-ratio")
    if counts[0] < top_k:
        raise ReapError(f"experts_to_keep keeps {counts[0]} experts per layer, fewer than the {top_k} each token "
                        "routes to; lower --prune-ratio")
    return keep


def new_ids(keep: dict[int, list[int]]) -> dict[int, dict[int, int]]:
    """Per layer, old expert id -> new id: kept experts renumbered 0..K-1 in ascending order."""
    return {layer: {old: new for new, old in enumerate(sorted(ids))} for layer, ids in keep.items()}


def keep_from_metadata(metadata: ReapMetadata, num_experts: int, top_k: int, *, prune_ratio: float | None = None,
                       criterion: str | None = None, keep_multiple: int | None = None) -> dict[int, list[int]]:
    """The metadata's selection, or — when any of the three is given — one recomputed from its stored metrics."""
    raw = metadata.raw
    if int(raw["num_experts"]) != num_experts:
        raise ReapError(f"{metadata.path} was computed for a model with {raw['num_experts']} experts per layer, "
                        f"but the model to prune has {num_experts}; pass the matching --model or rerun reap.py")
    if prune_ratio is None and criterion is None and keep_multiple is None:
        return metadata.experts_to_keep
    ratio = raw.get("prune_ratio") if prune_ratio is None else prune_ratio
    multiple = raw.get("keep_multiple", 1) if keep_multiple is None else keep_multiple
    criterion = raw.get("criterion", "reap") if criterion is None else criterion
    if ratio is None:
        raise ReapError(f"{metadata.path} records no prune_ratio; pass --prune-ratio")
    if not metadata.metrics:
        raise ReapError(f"{metadata.path} stores no metrics to recompute the selection from; rerun reap.py "
                        "with the new --prune-ratio / --criterion")
    keep = num_to_keep(num_experts, float(ratio), int(multiple), top_k)
    return select_experts(metadata.metrics, metadata.moe_layers, criterion, keep)


# ----------------------------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class OutputTensor:
    key: str
    dtype: str
    shape: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]  # absolute byte spans in the source shard, written in order

    @property
    def nbytes(self) -> int:
        return sum(end - begin for begin, end in self.ranges)


@dataclass
class ShardPlan:
    source_name: str
    name: str
    metadata: dict[str, str] | None
    tensors: list[OutputTensor] = field(default_factory=list)

    @property
    def header(self) -> bytes:
        return header_bytes(self.metadata, [(t.key, t.dtype, t.shape, t.nbytes) for t in self.tensors])

    @property
    def nbytes(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)


@dataclass
class PrunePlan:
    shards: list[ShardPlan]
    counts: Counter  # copied / sliced / renumbered / dropped
    source_numel: int
    output_numel: int

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for s in self.shards for t in s.tensors)

    @property
    def shard_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)


def _expert_dim_check(tensor: SourceTensor, num_experts: int, what: str) -> None:
    if not tensor.shape or tensor.shape[0] != num_experts or tensor.nbytes % num_experts:
        raise ReapError(f"{tensor.key}: {what} tensor of shape {list(tensor.shape)} should have the "
                        f"{num_experts} experts of config.json on dim 0; the checkpoint does not match its config")


def plan_tensor(family: ModelFamily, tensor: SourceTensor, num_experts: int, keep: dict[int, list[int]],
                id_map: dict[int, dict[int, int]]) -> tuple[str, OutputTensor | None]:
    """What happens to one source tensor: (action, output tensor or None when dropped)."""
    info = family.classify(tensor.key)
    if info.role is KeyRole.OTHER:
        return "copied", OutputTensor(tensor.key, tensor.dtype, tensor.shape, ((tensor.begin, tensor.end),))
    if info.layer not in keep:
        raise ReapError(f"{tensor.key}: experts in layer {info.layer}, which config.json does not list as a MoE "
                        "layer; the checkpoint does not match its config")
    kept = keep[info.layer]
    if info.role is KeyRole.PER_EXPERT:
        if not 0 <= info.expert < num_experts:
            raise ReapError(f"{tensor.key}: expert id {info.expert} is outside the {num_experts} experts of "
                            "config.json; the checkpoint does not match its config")
        new_id = id_map[info.layer].get(info.expert)
        if new_id is None:
            return "dropped", None
        new_key = f"{info.prefix}.{new_id}.{info.name}"
        return "renumbered", OutputTensor(new_key, tensor.dtype, tensor.shape, ((tensor.begin, tensor.end),))
    what = "fused expert" if info.role is KeyRole.FUSED_EXPERTS else "router"
    _expert_dim_check(tensor, num_experts, what)
    slabs = tensor.slabs(num_experts)
    shape = (len(kept), *tensor.shape[1:])
    return "sliced", OutputTensor(tensor.key, tensor.dtype, shape, _merge_adjacent([slabs[e] for e in kept]))


def _merge_adjacent(spans: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Runs of neighbouring kept experts become one span: fewer, larger copies."""
    merged: list[tuple[int, int]] = []
    for begin, end in spans:
        if merged and merged[-1][1] == begin:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((begin, end))
    return tuple(merged)


def _check_shard_against_index(path: Path, header: ShardHeader, indexed: list[str]) -> None:
    with safe_open(path, "pt") as f:  # the reference parser agrees with ours on keys and metadata
        if set(f.keys()) != set(header.tensors) or (f.metadata() or None) != (header.metadata or None):
            raise ReapError(f"{path}: safetensors header could not be read consistently; re-download the shard")
    missing, unindexed = set(indexed) - set(header.tensors), set(header.tensors) - set(indexed)
    if missing or unindexed:
        sample = sorted(missing or unindexed)[:2]
        raise ReapError(f"{path.name} and {INDEX_NAME} disagree ({len(missing)} indexed keys missing from the "
                        f"shard, {len(unindexed)} shard keys not indexed, e.g. {sample}); the download is "
                        "incomplete or the index is stale — re-download the model")


def plan_pruning(ckpt: Checkpoint, keep: dict[int, list[int]]) -> PrunePlan:
    """Read every shard's header and decide, tensor by tensor, what goes where."""
    family, num_experts = ckpt.family, ckpt.num_experts
    id_map = new_ids(keep)
    counts: Counter = Counter(copied=0, sliced=0, renumbered=0, dropped=0)
    shards, source_numel, output_numel = [], 0, 0
    for name, keys in sorted(ckpt.keys_by_shard().items()):
        header = read_header(ckpt.path / name)
        _check_shard_against_index(ckpt.path / name, header, keys)
        shard = ShardPlan(name, name, header.metadata)
        for tensor in header.tensors.values():
            action, out = plan_tensor(family, tensor, num_experts, keep, id_map)
            counts[action] += 1
            source_numel += math.prod(tensor.shape)
            if out is not None:
                shard.tensors.append(out)
                output_numel += math.prod(out.shape)
        shards.append(shard)
    if any(not s.tensors for s in shards):
        _rename_shards(shards)
    return PrunePlan(shards, counts, source_numel, output_numel)


def _rename_shards(shards: list[ShardPlan]) -> None:
    """Drop shards left empty and renumber the rest, so the names still say ``-of-<count>``."""
    shards[:] = [s for s in shards if s.tensors]
    for i, shard in enumerate(shards, 1):
        shard.name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"


# ----------------------------------------------------------------------------------------------- writing shards

def copy_range(source_fd: int, out_fd: int, begin: int, end: int, advance: Callable[[int], None]) -> None:
    """Append source bytes [begin, end) to ``out_fd`` without passing them through Python."""
    offset = begin
    while offset < end:
        count = min(COPY_CHUNK, end - offset)
        try:
            sent = os.sendfile(out_fd, source_fd, offset, count)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            sent = _read_write(source_fd, out_fd, offset, count)  # no file-to-file sendfile on this filesystem
        if sent <= 0:
            raise ReapError(f"unexpected end of a source shard at byte {offset}; did the file change while pruning?")
        offset += sent
        advance(sent)


def _read_write(source_fd: int, out_fd: int, offset: int, count: int) -> int:
    data = memoryview(os.pread(source_fd, count, offset))
    written = 0
    while written < len(data):
        written += os.write(out_fd, data[written:])
    return written


def write_shard(source: Path, out: Path, shard: ShardPlan, advance: Callable[[int], None]) -> int:
    """Write one output shard; return its size in bytes."""
    try:
        with open(source, "rb") as src, open(out, "wb") as dst:
            dst.write(shard.header)
            dst.flush()
            for tensor in shard.tensors:
                for begin, end in tensor.ranges:
                    copy_range(src.fileno(), dst.fileno(), begin, end, advance)
            os.fsync(dst.fileno())  # the folder is renamed into place only once the data is on disk
    except OSError as exc:
        raise ReapError(f"writing {out.name} failed: {exc.strerror or exc}; check the disk and rerun") from None
    return out.stat().st_size


# ----------------------------------------------------------------------------------------------- config.json

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def json_value_spans(text: str, path: tuple[str, ...]) -> list[tuple[int, int]]:
    """Character spans of the value(s) at ``path`` (object keys) in JSON ``text``, so it can be edited in place."""

    def skip(i: int) -> int:
        return _WS.match(text, i).end()

    def walk(i: int, rest: tuple[str, ...]) -> tuple[int, list[tuple[int, int]]]:
        if not rest or text[i] != "{":
            end = _DECODER.raw_decode(text, i)[1]
            return end, [] if rest else [(i, end)]
        spans, i = [], skip(i + 1)
        if text[i] == "}":
            return i + 1, spans
        while True:
            key, i = json.decoder.scanstring(text, skip(i) + 1)
            i = skip(skip(i) + 1)  # past ':'
            if key == rest[0]:
                i, found = walk(i, rest[1:])
                spans += found
            else:
                i = _DECODER.raw_decode(text, i)[1]
            i = skip(i)
            if text[i] == "}":
                return i + 1, spans
            i = skip(i + 1)  # past ','

    return walk(skip(0), path)[1]


def _render_list_like(original: str, values: list[str]) -> str:
    """``values`` as a JSON list laid out like ``original`` (one line, or one item per line)."""
    if "\n" not in original or not values:
        return json.dumps(values, ensure_ascii=False)
    item_indent = re.match(r"\[[ \t]*\n([ \t]*)", original)
    closing_indent = re.search(r"\n([ \t]*)\]$", original)
    item = item_indent.group(1) if item_indent else "  "
    closing = closing_indent.group(1) if closing_indent else ""
    return "[\n" + ",\n".join(item + json.dumps(v, ensure_ascii=False) for v in values) + "\n" + closing + "]"


def rewrite_module_names(names: list, family: ModelFamily, id_map: dict[int, dict[int, int]]) -> list:
    """A quantization_config module list with dropped experts removed and kept ones renumbered."""
    experts = re.escape(family.moe_module) + r"\." + re.escape(family.experts_module)
    named = re.compile(rf"(?:^|\.)layers\.(?P<layer>\d+)\.{experts}\.(?P<expert>\d+)(?=\.|$)")
    unlayered = re.compile(rf"(?<![A-Za-z0-9_]){re.escape(family.experts_module)}\\?\.\d+")
    out = []
    for name in names:
        m = named.search(name) if isinstance(name, str) and not name.startswith("re:") else None
        if m is None:
            if isinstance(name, str) and unlayered.search(name):
                raise ReapError(f"quantization_config names {name!r}, an expert by index in a form this pruner cannot "
                                "remap (a regex, or no layer); edit that entry by hand or drop it, then rerun")
            out.append(name)
            continue
        layer, expert = int(m["layer"]), int(m["expert"])
        if layer not in id_map:
            raise ReapError(f"quantization_config names {name!r}, but layer {layer} is not a MoE layer of this "
                            "model; the config does not match the checkpoint")
        if expert in id_map[layer]:
            out.append(f"{name[:m.start('expert')]}{id_map[layer][expert]}{name[m.end('expert'):]}")
    return out


def prune_config_text(text: str, family: ModelFamily, num_kept: int,
                      id_map: dict[int, dict[int, int]]) -> tuple[str, list[str]]:
    """config.json with the expert count and quantization module lists updated; every other byte as it was.
    Returns the new text and the dotted keys that changed."""
    expected = json.loads(text)  # what the edited text must parse to
    text_path = (family.text_config_key,) if family.text_config_key and family.text_config_key in expected else ()
    edits: list[tuple[tuple[int, int], str, str]] = []
    for key in family.set_num_experts(expected, num_kept):
        for span in json_value_spans(text, (*text_path, key)):
            edits.append((span, str(num_kept), ".".join((*text_path, key))))
    for where in dict.fromkeys([(), text_path]):
        quantization = _get(expected, (*where, "quantization_config"))
        for list_key in QUANTIZATION_LISTS:
            names = quantization.get(list_key) if isinstance(quantization, dict) else None
            if not isinstance(names, list) or (new := rewrite_module_names(names, family, id_map)) == names:
                continue
            quantization[list_key] = new
            path = (*where, "quantization_config", list_key)
            for start, end in json_value_spans(text, path):
                edits.append(((start, end), _render_list_like(text[start:end], new), ".".join(path)))
    for (start, end), value, _ in sorted(edits, reverse=True):
        text = text[:start] + value + text[end:]
    if json.loads(text) != expected:
        raise ReapError("config.json could not be edited in place; report this with the file")
    return text, list(dict.fromkeys(label for _, _, label in edits))


def _get(obj, path: tuple[str, ...]):
    for key in path:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


# ----------------------------------------------------------------------------------------------- other files

SKIPPED_FILES = {INDEX_NAME, METADATA_NAME, PRUNING_RECORD, "config.json"}


def files_to_carry(source: Path) -> list[Path]:
    """Everything in the source folder but weights, the index, config.json (rewritten), stale REAP files and
    hidden entries (download caches)."""
    return sorted(p for p in source.iterdir()
                  if not p.name.startswith(".") and p.name not in SKIPPED_FILES and p.suffix != ".safetensors")


def carry_files(paths: list[Path], out: Path) -> None:
    ignore = shutil.ignore_patterns("*.safetensors", ".*")  # no unpruned weights hide in subfolders
    for path in paths:
        if path.is_dir():
            shutil.copytree(path, out / path.name, ignore=ignore)
        else:
            shutil.copyfile(path, out / path.name)  # follows HF-cache symlinks: a real file in the output


def _tree_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def check_free_space(output: Path, needed: int) -> None:
    folder = Path(output).absolute().parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed + DISK_MARGIN:
        raise ReapError(f"not enough disk space in {folder}: the pruned checkpoint needs {needed / 1e9:.2f} GB, "
                        f"{free / 1e9:.2f} GB are free; free some space or choose another --output")


def check_output_location(source: Path, output: Path) -> None:
    """Refuse outputs that would write into the source or, with --force, delete it."""
    source, output = Path(source).resolve(), Path(output).resolve()
    if output == source:
        raise ReapError(f"output folder {output} is the source folder; choose another --output "
                        "(the source is never written)")
    if source in output.parents:
        raise ReapError(f"output folder {output} is inside the source folder {source}; choose a folder outside it")
    if output in source.parents:
        raise ReapError(f"output folder {output} contains the source folder {source}; replacing it would delete "
                        "the source — choose another --output")


def write_index(source: Path, out: Path, plan: PrunePlan) -> None:
    index = read_json(source / INDEX_NAME, "safetensors index")
    metadata = dict(index.get("metadata") or {})
    metadata["total_size"] = plan.tensor_bytes
    if "total_parameters" in metadata:  # keep the source's convention, less what was removed
        metadata["total_parameters"] = int(metadata["total_parameters"]) - plan.source_numel + plan.output_numel
    weight_map = {t.key: s.name for s in plan.shards for t in s.tensors}
    _write_json(out / INDEX_NAME, {**index, "metadata": metadata, "weight_map": dict(sorted(weight_map.items()))})


def _write_json(path: Path, obj) -> None:
    # Plain writes: the temporary output folder is the atomic unit, and files get the user's usual permissions.
    path.write_bytes((json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def _publishable(folder: Path) -> None:
    """Give the temporary folder (created 0700) the permissions a folder made by mkdir would have."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)


# ----------------------------------------------------------------------------------------------- pruning

def prune_checkpoint(source: Path, output: Path, experts_to_keep: dict[int, list[int]], *, force: bool = False,
                     reap_metadata_path: Path | None = None, verify: bool = False, progress: bool = True) -> dict:
    """Write ``output``: ``source`` with only ``experts_to_keep[layer]`` in every MoE layer; return the record.

    The source is only read.  The output is built in a temporary sibling folder and renamed into place when
    complete (and verified, with ``verify``); a failure leaves no output folder behind.
    """
    from tqdm.auto import tqdm

    source, output = Path(source), Path(output)
    ckpt = Checkpoint(source)
    check_output_location(source, output)
    if output.exists() and not force:
        raise ReapError(f"output {output} already exists; pass --force to replace it or choose another folder")
    keep = check_experts_to_keep(experts_to_keep, ckpt.moe_layers, ckpt.num_experts, ckpt.top_k)
    num_kept = len(next(iter(keep.values())))
    id_map = new_ids(keep)
    plan = plan_pruning(ckpt, keep)
    # Bytes, not read_text(): universal newlines would turn CRLF into LF and break "every other byte as it was".
    config_text, config_keys = prune_config_text((source / "config.json").read_bytes().decode("utf-8"),
                                                 ckpt.family, num_kept, id_map)
    carried = files_to_carry(source)
    check_free_space(output, plan.shard_bytes + sum(_tree_size(p) for p in carried))

    record = {
        "source_path": str(source.resolve()),
        "source_num_experts": ckpt.num_experts,
        "num_experts": num_kept,
        "moe_layers": ckpt.moe_layers,
        "experts_to_keep": {str(layer): ids for layer, ids in sorted(keep.items())},
        "id_map": {str(layer): {str(old): new for old, new in m.items()} for layer, m in sorted(id_map.items())},
        "config_keys_updated": config_keys,
        "tensors": dict(plan.counts),
        "bytes_written": 0,
    }
    with atomic_output_dir(output, force=force, source=source) as tmp:
        with tqdm(total=plan.tensor_bytes, unit="B", unit_scale=True, desc="pruning", disable=not progress) as bar:
            for shard in plan.shards:
                bar.set_postfix_str(shard.name)
                record["bytes_written"] += write_shard(source / shard.source_name, tmp / shard.name, shard,
                                                       bar.update)
        if (source / INDEX_NAME).is_file():
            write_index(source, tmp, plan)
        (tmp / "config.json").write_bytes(config_text.encode("utf-8"))
        carry_files(carried, tmp)
        if reap_metadata_path is not None:
            shutil.copyfile(reap_metadata_path, tmp / METADATA_NAME)
        if verify:
            record["verify"] = verify_pruned(ckpt, tmp, keep)
        _write_json(tmp / PRUNING_RECORD, record)
        _publishable(tmp)
    return record


# ----------------------------------------------------------------------------------------------- verification

def _expected_outputs(ckpt: Checkpoint, keep: dict[int, list[int]]) -> tuple[dict[str, tuple[str, OutputTensor]],
                                                                            Counter]:
    """What every source key should have become (output key -> source shard, tensor) and how many of each
    action, derived again from the source headers."""
    id_map = new_ids(keep)
    expected, accounted = {}, Counter()
    for name in ckpt.shards:
        for tensor in read_header(ckpt.path / name).tensors.values():
            action, out = plan_tensor(ckpt.family, tensor, ckpt.num_experts, keep, id_map)
            accounted[action] += 1
            if out is not None:
                expected[out.key] = (name, out)
    return expected, accounted


def _check_shapes(pruned: Checkpoint, key: str, shape: tuple[int, ...], per_expert: dict) -> None:
    family, num_kept = pruned.family, pruned.num_experts
    info = family.classify(key)
    if info.role is KeyRole.PER_EXPERT:
        per_expert[info.prefix].setdefault(info.expert, set()).add(info.name)
        return
    if info.role is KeyRole.OTHER:
        return
    wanted: list[tuple[int, ...]] = []
    if info.role is KeyRole.FUSED_EXPERTS and (layout := family.fused_layout(info.name)):
        wanted = [(num_kept, *dims) for dims in layout.shapes(family.sizes(pruned.config))]
    elif info.role is KeyRole.ROUTER and info.name == "weight":
        wanted = [(num_kept, family.sizes(pruned.config)["H"])]
    if (wanted and shape not in wanted) or not shape or shape[0] != num_kept:
        raise ReapError(f"verify: {key} has shape {list(shape)}, expected {[list(w) for w in wanted] or num_kept} "
                        "for the pruned config")


def _ends(fd: int, begin: int, end: int, size: int = 256) -> bytes:
    """The first and last ``size`` bytes of [begin, end)."""
    size = min(size, end - begin)
    return os.pread(fd, size, begin) + os.pread(fd, size, end - size)


def _check_contents(source: Path, out: Path, shard: str, expected: dict[str, tuple[str, OutputTensor]]) -> None:
    """The ends of every range written equal the source's: catches offset mistakes without rereading everything."""
    sources: dict[str, int] = {}
    try:
        with open(out / shard, "rb") as dst:
            for key, written in read_header(out / shard).tensors.items():
                source_shard, tensor = expected[key]
                if source_shard not in sources:
                    sources[source_shard] = os.open(source / source_shard, os.O_RDONLY)
                offset = written.begin
                for begin, end in tensor.ranges:
                    if _ends(sources[source_shard], begin, end) != _ends(dst.fileno(), offset, offset + end - begin):
                        raise ReapError(f"verify: {key} in {shard} differs from the source bytes")
                    offset += end - begin
    finally:
        for fd in sources.values():
            os.close(fd)


def _available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _forward_check(pruned: Checkpoint, numel: int) -> str:
    if pruned.quantization:
        return f"skipped (quantized: {pruned.quantization})"
    available = _available_memory()
    if numel * 4 >= available // 4:
        return f"skipped (needs ~{numel * 4 / 1e9:.1f} GB in float32, over a quarter of available memory)"
    import torch

    from .checkpoint import load_model

    model = load_model(pruned.path)
    vocab = int(pruned.family.text_config(pruned.config)["vocab_size"])
    input_ids = (torch.arange(8) % vocab).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    if logits.shape[-1] != vocab or not torch.isfinite(logits).all():
        raise ReapError(f"verify: the pruned model's forward gave logits of shape {list(logits.shape)} with "
                        "non-finite values; the pruned checkpoint is broken")
    return "ok"


def verify_pruned(source: Checkpoint, out: Path, keep: dict[int, list[int]]) -> dict:
    """Reopen every output tensor and check it against the new config and the source; a ReapError on a mismatch."""
    pruned = Checkpoint(out)
    num_kept = len(next(iter(keep.values())))
    if pruned.num_experts != num_kept or pruned.moe_layers != source.moe_layers:
        raise ReapError(f"verify: pruned config says {pruned.num_experts} experts in layers {pruned.moe_layers}, "
                        f"expected {num_kept} in {source.moe_layers}")
    expected, accounted = _expected_outputs(source, keep)
    found: dict[str, tuple[str, tuple[int, ...], str]] = {}
    per_expert: dict[str, dict[int, set[str]]] = defaultdict(dict)
    numel = 0
    for shard in pruned.shards:
        with safe_open(out / shard, "pt") as f:  # the reference reader sees what we wrote
            for key in f.keys():
                piece = f.get_slice(key)
                shape, dtype = tuple(piece.get_shape()), piece.get_dtype()
                found[key] = (shard, shape, dtype)
                numel += math.prod(shape)
                _check_shapes(pruned, key, shape, per_expert)
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ReapError(f"verify: source keys not accounted for (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for shard in pruned.shards:
        _check_contents(source.path, out, shard, expected)
    for key, (_, out_tensor) in expected.items():
        if found[key][1] != out_tensor.shape or found[key][2] != out_tensor.dtype:
            raise ReapError(f"verify: {key} is {found[key][2]} {list(found[key][1])}, expected "
                            f"{out_tensor.dtype} {list(out_tensor.shape)}")
    for prefix, experts in per_expert.items():
        names = {frozenset(n) for n in experts.values()}
        if sorted(experts) != list(range(num_kept)) or len(names) != 1:
            raise ReapError(f"verify: {prefix} has expert ids {sorted(experts)[:6]}..., expected 0..{num_kept - 1} "
                            "each with the same tensors")
    return {"tensors_checked": len(found), "source_keys": dict(accounted), "forward": _forward_check(pruned, numel)}


# ----------------------------------------------------------------------------------------------- prune_model.py

def prune_from_settings(settings) -> tuple[dict, Path]:
    """prune_model.py's work: metadata -> kept experts -> pruned checkpoint; returns (record, output folder)."""
    metadata_path = settings.metadata_path or Path(settings.output_path) / METADATA_NAME
    if not Path(metadata_path).is_file():
        raise ReapError(f"no REAP metadata at {metadata_path}; run reap.py first or pass --metadata "
                        "(REAP_METADATA_PATH)")
    metadata = load_metadata(metadata_path)
    source = settings.model_path or metadata.raw.get("model_path")
    if source is None or not (Path(source) / "config.json").is_file():
        raise ReapError(f"source model {source} (from {'--model' if settings.model_path else metadata_path}) is not "
                        "a checkpoint folder; pass --model / REAP_MODEL_PATH")
    ckpt = Checkpoint(Path(source))
    explicit = {name: getattr(settings, name) if settings.explicitly_set(name) else None
                for name in ("prune_ratio", "criterion", "keep_multiple")}
    keep = keep_from_metadata(metadata, ckpt.num_experts, ckpt.top_k, **explicit)
    record = prune_checkpoint(ckpt.path, settings.pruned_output_path, keep, force=settings.force,
                              reap_metadata_path=Path(metadata_path), verify=settings.verify)
    return record, Path(settings.pruned_output_path)
