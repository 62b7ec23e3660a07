"""Compact encodings of a masked weight (pure functions): only the active values and where they are.

A masked weight of shape ``(out, *in)`` is stored as its active values in row-major
order (``weight[mask]``) plus the positions, in whichever of three encodings is
smallest for that layer:

* ``gaps``: for each active weight the number of inactive ones before it (since the
  previous active one), one byte each; a byte 255 means "255 inactive, no value yet",
  so any gap fits: about 1 byte per active weight below 1/255 density's spacing;
* ``rows``: per output neuron its active count and, for each active value, its column
  (the index into the flattened ``*in``), in the smallest integer type that holds the
  fan-in (uint8 up to 256 inputs, int16 up to 32768): 1-2 bytes per active weight;
* ``bitmap``: one bit per weight, packed 8 to a byte: ``numel / 8`` bytes, the
  smallest above about 12% density.

:func:`pack` / :func:`unpack` put many tensors into one flat tensor per dtype and a
table of offsets, so a file of hundreds of small tensors pays no per-tensor overhead.
"""

from __future__ import annotations

import math

import torch

_INT_TYPES = ((255, torch.uint8), (32767, torch.int16), (2**31 - 1, torch.int32))
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def smallest_int_type(largest: int) -> torch.dtype:
    """The smallest integer dtype that holds ``0 .. largest``."""
    for limit, dtype in _INT_TYPES:
        if largest <= limit:
            return dtype
    return torch.int64


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bytes, 8 entries a byte, most significant bit first (row-major order)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    flat = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, 8)
    return (flat * _BIT_WEIGHTS).sum(1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` bits as a flat bool tensor."""
    expanded = (bits.to(torch.uint8).reshape(-1, 1) & _BIT_WEIGHTS) > 0
    return expanded.reshape(-1)[:numel]


def encode_gaps(flat_mask: torch.Tensor) -> torch.Tensor:
    """uint8 codes of the active positions of a flat bool mask (see the module doc)."""
    positions = flat_mask.nonzero().reshape(-1)
    gaps = torch.diff(positions, prepend=positions.new_tensor([-1])) - 1  # inactive entries before each active one
    escapes = gaps // 255
    lengths = escapes + 1
    codes = torch.full((int(lengths.sum()),), 255, dtype=torch.uint8)
    codes[torch.cumsum(lengths, 0) - 1] = (gaps - 255 * escapes).to(torch.uint8)
    return codes


def decode_gaps(codes: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`encode_gaps`: the flat bool mask of ``numel`` entries."""
    codes = codes.to(torch.int64)
    advance = torch.where(codes == 255, codes, codes + 1)  # entries each code moves past
    positions = torch.cumsum(advance, 0)[codes != 255] - 1
    if positions.numel() and int(positions[-1]) >= numel:
        raise ValueError(f"gap codes run past the weight's {numel} entries")
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[positions] = True
    return mask


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def encode(weight: torch.Tensor, mask: torch.Tensor) -> dict:
    """``{"encoding", "values", ...}`` for one masked weight: the smallest encoding (see the module doc)."""
    mask = mask.to(torch.bool).cpu()
    rows = mask.reshape(mask.shape[0], -1)
    fan = rows.shape[1]
    values = weight.detach().cpu()[mask]
    options = [
        {"encoding": "gaps", "codes": encode_gaps(mask.reshape(-1))},
        {"encoding": "rows", "counts": rows.sum(1).to(smallest_int_type(fan)),
         "columns": rows.nonzero()[:, 1].to(smallest_int_type(fan - 1))},
        {"encoding": "bitmap", "bits": pack_bits(mask)},
    ]
    best = min(options, key=lambda o: sum(_nbytes(t) for t in o.values() if isinstance(t, torch.Tensor)))
    return {**best, "values": values}


def decode_mask(entry: dict, shape: tuple[int, ...]) -> torch.Tensor:
    """The bool mask of ``shape`` an :func:`encode` entry describes; ValueError when the entry is inconsistent."""
    out, fan = shape[0], math.prod(shape[1:])
    nnz = entry["values"].numel()
    if entry["encoding"] == "bitmap":
        bits = entry["bits"]
        if bits.dtype != torch.uint8 or bits.numel() != math.ceil(out * fan / 8):
            raise ValueError(f"bitmap of {bits.numel()} bytes does not fit a weight of shape {tuple(shape)}")
        mask = unpack_bits(bits, out * fan)
    elif entry["encoding"] == "gaps":
        if entry["codes"].dtype != torch.uint8:
            raise ValueError("gap codes must be uint8")
        mask = decode_gaps(entry["codes"], out * fan)
    elif entry["encoding"] == "rows":
        counts, columns = entry["counts"].to(torch.int64), entry["columns"].to(torch.int64)
        if counts.numel() != out or int(counts.sum()) != columns.numel() or (columns.numel() and (
                int(columns.min()) < 0 or int(columns.max()) >= fan)):
            raise ValueError(f"row encoding ({counts.numel()} rows, {columns.numel()} columns) does not fit a weight "
                             f"of shape {tuple(shape)}")
        mask = torch.zeros(out, fan, dtype=torch.bool)
        mask[torch.repeat_interleave(torch.arange(out), counts), columns] = True
        if int(mask.sum()) != columns.numel():
            raise ValueError("row encoding names one position twice")
        mask = mask.reshape(-1)
    else:
        raise ValueError(f"unknown encoding {entry['encoding']!r}")
    if int(mask.sum()) != nnz:
        raise ValueError(f"{nnz} values for {int(mask.sum())} active positions")
    return mask.reshape(shape)


def decode(entry: dict, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight, mask)`` of ``shape`` from an :func:`encode` entry (zeros where the mask is off)."""
    mask = decode_mask(entry, shape)
    values = entry["values"]
    weight = torch.zeros(shape, dtype=dtype or values.dtype)
    weight[mask] = values.to(weight.dtype)
    return weight, mask


# The dtypes a packed file may name (read back by name, never by an arbitrary attribute lookup).
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool)}


def pack(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[list]]:
    """``(blobs, table)``: one flat tensor per dtype, and ``[key, dtype, offset, shape]`` rows to cut them apart."""
    parts: dict[str, list[torch.Tensor]] = {}
    sizes: dict[str, int] = {}
    table = []
    for key, t in tensors.items():
        name = str(t.dtype).removeprefix("torch.")
        if name not in DTYPES:
            raise ValueError(f"{key}: dtype {t.dtype} cannot be stored; storable: {list(DTYPES)}")
        table.append([key, name, sizes.get(name, 0), list(t.shape)])
        parts.setdefault(name, []).append(t.detach().cpu().reshape(-1))
        sizes[name] = sizes.get(name, 0) + t.numel()
    blobs = {name: torch.cat(ts) if ts else torch.empty(0, dtype=DTYPES[name]) for name, ts in parts.items()}
    return blobs, table


def unpack(blobs: dict[str, torch.Tensor], table: list) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack`; ValueError when a row does not fit its blob."""
    out = {}
    for row in table:
        if not (isinstance(row, (list, tuple)) and len(row) == 4):
            raise ValueError(f"bad table row {row!r}")
        key, name, offset, shape = row
        blob = blobs.get(name)
        if name not in DTYPES or blob is None or blob.dtype != DTYPES[name]:
            raise ValueError(f"{key}: no {name!r} data")
        numel = math.prod(shape)
        if not (isinstance(offset, int) and 0 <= offset and offset + numel <= blob.numel()):
            raise ValueError(f"{key}: offset {offset} + {numel} runs past the {blob.numel()} stored {name} values")
        out[key] = blob[offset: offset + numel].reshape(shape).clone()
    return out
