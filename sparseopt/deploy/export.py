"""``export_sparse`` / ``load_sparse``: a trained sparse network as a file that holds only its active weights.

The file is a ``torch.save`` container of tensors, strings and numbers only, read back
with ``weights_only=True`` (nothing in it can run code):

* ``format``: ``"sparseopt-sparse-v1"``;
* ``header``: zlib-compressed JSON (bytes in a uint8 tensor, parsed without pickle) with
  ``meta``: what rebuilds the model without the run folder: the registered model's name
  and keyword arguments, the number of classes and their names, the input shape and
  normalisation, the sparsity structure, versions and where it came from;
  ``layers``: per masked weight its shape and encoding; and ``table``: where each tensor
  lies in the blobs;
* ``blobs``: one flat tensor per dtype holding every tensor of the file
  (:func:`~sparseopt.deploy.encoding.pack`): ``masked/<layer>/<field>``, the active values
  plus positions as gaps, rows or a bitmap, whichever is smallest
  (:func:`~sparseopt.deploy.encoding.encode`), and ``dense/<key>``, every other entry of
  ``model.state_dict()`` as it is (biases, BatchNorm, unmasked layers). The mask buffers
  are not stored: the positions are.

``format="safetensors"`` writes the same blobs as a safetensors file (tensors ``blobs/<dtype>``) whose
header metadata holds ``format`` and the same compressed description (base64), so both files carry
the same contents at nearly the same size; :func:`load_sparse` reads either (safetensors needs the
``safetensors`` package: ``pip install 'sparseopt[safetensors]'``).
"""

from __future__ import annotations

import base64
import io
import json
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import atomic_write, load_failure
from ..masks.maskset import MASK_SUFFIX, MaskSet
from ..masks.structure import Structure
from ..models import MODELS, build_model
from ..plugins import load_plugins
from ..version import __version__
from .encoding import decode, encode, pack, unpack

FORMAT = "sparseopt-sparse-v1"
FILE_FORMATS = ("pt", "safetensors")
SAFETENSORS_HINT = "pip install 'sparseopt[safetensors]'"


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError(f"safetensors files need the safetensors package: {SAFETENSORS_HINT}") from None
    return safetensors.torch


def _unmasked_state(model: nn.Module, masks: MaskSet) -> dict[str, torch.Tensor]:
    """The state_dict without the mask buffers: what a dense model of this architecture saves."""
    buffers = {layer.buffer_path for layer in masks}
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in buffers}


def export_sparse(
    model: nn.Module,
    masks: MaskSet,
    path: str | Path,
    *,
    model_name: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
    input_shape: tuple[int, ...] | None = None,
    normalization: dict[str, list[float]] | None = None,
    source: str | None = None,
    format: str = "pt",
) -> dict[str, Any]:
    """Write the compact file of a masked model to ``path`` (atomically); returns its size summary.

    ``format``: ``"pt"`` (a ``torch.save`` container) or ``"safetensors"`` (the same contents).

    ``model_name`` / ``model_kwargs``: how :func:`sparseopt.models.build_model` rebuilds the
    model (a name registered in :data:`sparseopt.MODELS`); without them :func:`load_sparse`
    needs the model passed in. ``input_shape`` ``(C, H, W)``, ``normalization``
    ``{"mean": [...], "std": [...]}`` and ``class_names`` are stored for the user of the file.
    """
    if format not in FILE_FORMATS:
        raise ValueError(f"format must be one of {list(FILE_FORMATS)}, got {format!r}")
    if masks.model is not model:
        raise ValueError("masks belong to another model: export the model the MaskSet was built on")
    if model_name is not None and model_name not in MODELS:
        raise ValueError(f"model_name {model_name!r} is not registered; registered models: {MODELS.names()}")
    if class_names is not None and num_classes is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    tensors, layers = {}, {}
    for layer in masks:
        entry = encode(layer.weight, layer.mask)
        layers[layer.name] = {"shape": list(layer.mask.shape), "encoding": entry.pop("encoding")}
        tensors.update({f"masked/{layer.name}/{field}": t for field, t in entry.items()})
    unmasked = _unmasked_state(model, masks)
    weights = {layer.weight_path for layer in masks}  # stored encoded above
    tensors.update({f"dense/{k}": v for k, v in unmasked.items() if k not in weights})
    blobs, table = pack(tensors)
    state = {
        "format": FORMAT,
        "meta": {
            "model": model_name,
            "model_kwargs": dict(model_kwargs or {}),
            "model_class": type(model).__name__,
            "num_classes": num_classes,
            "class_names": list(class_names) if class_names is not None else None,
            "input_shape": list(input_shape) if input_shape is not None else None,
            "normalization": normalization,
            "structure": masks.structure.to_dict(),
            "sparsity": masks.sparsity(),
            "masked_layers": masks.names,
            "torch": str(torch.__version__),
            "source": source,
        },
        "layers": layers,
        "table": table,
    }
    state["meta"]["sparseopt"] = __version__
    # The description goes in as compressed JSON bytes: a fraction of the pickled size, and parsed without pickle.
    compressed = zlib.compress(json.dumps(state).encode(), 9)
    if format == "safetensors":
        data = _safetensors().save({f"blobs/{name}": blob.contiguous() for name, blob in blobs.items()},
                                   metadata={"format": FORMAT, "header": base64.b64encode(compressed).decode()})
    else:
        buffer = io.BytesIO()
        torch.save({"format": FORMAT, "header": torch.frombuffer(bytearray(compressed), dtype=torch.uint8),
                    "blobs": blobs}, buffer)
        data = buffer.getvalue()
    atomic_write(path, lambda f: f.write(data))
    reference = io.BytesIO()
    torch.save(unmasked, reference)
    size, dense_size = len(data), len(reference.getvalue())
    return {"path": str(path), "format": format, "bytes": size, "dense_bytes": dense_size, "ratio": size / dense_size,
            "encodings": {n: e["encoding"] for n, e in layers.items()}}


def _read_container(path: Path) -> tuple[bytes, dict]:
    """``(compressed header, blobs)`` of either file format; ValueError for a foreign or damaged file."""
    with open(path, "rb") as f:
        start = f.read(9)
    if start[:2] == b"PK" or start[:1] == b"\x80":  # a torch.save zip (or legacy pickle) container
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # not a torch file, truncated, or it asks for objects a weights-only load refuses
            raise ValueError(f"{path} is not a sparseopt sparse export, or it is damaged: {load_failure(e)}") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{path} is not a sparseopt sparse export (format {found!r}, expected {FORMAT!r}); "
                             "a training checkpoint is exported with `sparseopt export RUN_DIR`")
        header = state.get("header")
        if not (isinstance(header, torch.Tensor) and header.dtype == torch.uint8 and isinstance(state.get("blobs"), dict)):
            raise ValueError(f"{path} is damaged: its header or data section is missing")
        return header.numpy().tobytes(), state["blobs"]
    if len(start) == 9 and start[8:9] == b"{":  # safetensors: an 8-byte header length, then its JSON
        st = _safetensors()
        try:
            data = path.read_bytes()
            tensors = st.load(data)
            header_length = int.from_bytes(data[:8], "little")
            metadata = json.loads(data[8:8 + header_length]).get("__metadata__") or {}
        except Exception as e:  # safetensors raises its own error types for a bad header or truncated data
            raise ValueError(f"{path} is a damaged safetensors file: {e}") from None
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is a safetensors file but not a sparseopt sparse export "
                             f"(format {metadata.get('format')!r}, expected {FORMAT!r})")
        try:
            header = base64.b64decode(metadata["header"], validate=True)
        except (KeyError, ValueError):
            raise ValueError(f"{path} is damaged: its header cannot be read") from None
        return header, {k[len("blobs/"):]: v for k, v in tensors.items() if k.startswith("blobs/")}
    raise ValueError(f"{path} is not a sparseopt sparse export (neither a torch.save container nor a safetensors "
                     "file)")


def read_sparse(path: str | Path) -> dict[str, Any]:
    """The checked contents of an exported file (``weights_only`` load); one ValueError for anything wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no sparse export at {path}")
    header, blobs = _read_container(path)
    try:
        try:
            described = json.loads(zlib.decompress(header))
        except (zlib.error, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"its header cannot be read ({e})") from None
        for key, kind in (("meta", dict), ("layers", dict), ("table", list)):
            if not isinstance(described.get(key), kind):
                raise ValueError(f"its {key!r} section is missing")
        tensors = unpack(blobs, described["table"])
    except ValueError as e:
        raise ValueError(f"{path} is damaged: {e}") from None
    return {"meta": described["meta"], "layers": described["layers"], "tensors": tensors,
            "dense": {k[len("dense/"):]: v for k, v in tensors.items() if k.startswith("dense/")}}


def _rebuild(meta: dict[str, Any], path: Path) -> nn.Module:
    name = meta.get("model")
    if name is None:
        raise ValueError(f"{path} was exported from a model that is not registered ({meta.get('model_class')}); "
                         f"pass it: load_sparse(path, model={meta.get('model_class')}(...))")
    if name not in MODELS:
        loaded = load_plugins()  # a plugin's model: registered once its package is loaded, as the CLI does first
        if name not in MODELS:
            raise ValueError(f"{path} needs model {name!r}, which no loaded plugin registers (plugins: "
                             f"{sorted(loaded) or 'none installed'}); install the package that registers it, or pass "
                             f"load_sparse(path, model=...); registered: {MODELS.names()}")
    in_shape = tuple(meta["input_shape"]) if meta.get("input_shape") else None
    return build_model(name, meta["num_classes"], in_shape=in_shape, **meta.get("model_kwargs", {}))


def load_sparse(
    path: str | Path,
    model: nn.Module | None = None,
    *,
    inference: bool = True,
    example_input: torch.Tensor | None = None,
    choose: str = "time",
) -> nn.Module:
    """The model of an exported file.

    ``model``: an instance of the exported architecture to fill (needed when the export
    names no registered model). ``inference=True`` (default): the eval-mode model with
    BatchNorm folded and each masked layer computing only with its active weights
    (:func:`~sparseopt.deploy.inference.sparse_inference`, kernels chosen per layer by
    timing them on ``example_input``, default a batch of one of the stored input shape);
    ``False``: the dense-layout model with its weights, masks applied, for evaluation or
    fine-tuning. The file's ``meta`` is attached as ``model.sparseopt_meta``.
    """
    path = Path(path)
    state = read_sparse(path)
    meta = state["meta"]
    model = model if model is not None else _rebuild(meta, path)
    target = model.state_dict()
    masks = {}
    weights = {}
    for name, info in state["layers"].items():
        key = f"{name}.weight" if f"{name}.weight" in target else name
        if key not in target:
            raise ValueError(f"{path} holds layer {name!r}, which this model has not; is it from another model?")
        shape = tuple(info["shape"])
        prefix = f"masked/{name}/"
        entry = {"encoding": info.get("encoding"),
                 **{k[len(prefix):]: v for k, v in state["tensors"].items() if k.startswith(prefix)}}
        if tuple(target[key].shape) != shape:
            raise ValueError(f"{path}: layer {name!r} has shape {shape} in the file, {tuple(target[key].shape)} in the model")
        try:
            weights[key], masks[name] = decode(entry, shape, target[key].dtype)
        except (KeyError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path} is damaged: layer {name!r}: {e}") from None
    full = {**state["dense"], **weights}
    missing = sorted(k for k in target if k not in full and not k.endswith(MASK_SUFFIX))  # mask buffers: from positions
    extra = sorted(k for k in full if k not in target)
    if missing or extra:
        raise ValueError(f"{path} does not fit this model: missing {missing[:5]}, unexpected {extra[:5]}")
    model.load_state_dict({**target, **full})
    mask_set = MaskSet(model, masks, Structure.from_dict(meta.get("structure")))
    model.sparseopt_meta = meta
    model.eval()
    if not inference:
        model.sparseopt_masks = mask_set
        return model
    from .inference import sparse_inference

    if example_input is None:
        if not meta.get("input_shape"):
            raise ValueError(f"{path} records no input shape: pass example_input= (a batch the model takes)")
        example_input = torch.zeros(1, *meta["input_shape"])
    fast = sparse_inference(model, mask_set, example_input, choose=choose)
    fast.sparseopt_meta = meta
    return fast
