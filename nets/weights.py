"""Weights by name: PyTorch state_dicts <-> Keras layers, and the trunk weight file.

**State_dict mapping.** Every Conv2D and BatchNormalization layer of our HRNet is named after
its official PyTorch module path (``nets/hrnet.py``), so a state_dict key is
``<layer name>.<tensor>``:

==========================  ==================  ==========================================
Keras layer / variable      state_dict key      layout
==========================  ==================  ==========================================
Conv2D ``kernel``           ``.weight``         HWIO (Keras) <-> OIHW (PyTorch)
Conv2D ``bias``             ``.bias``           same
BatchNorm ``gamma``         ``.weight``         same
BatchNorm ``beta``          ``.bias``           same
BatchNorm ``moving_mean``   ``.running_mean``   same
BatchNorm ``moving_variance`` ``.running_var``  same
--                          ``.num_batches_tracked``  ignored (exported as 0)
==========================  ==================  ==========================================

:func:`load_state_dict` refuses a state_dict with a missing, unexpected or mis-shaped key and
lists every one; keys of documented heads the trunk does not have can be declared ignorable.

**Official checkpoints** (:func:`convert_checkpoint`):

* ``pose`` (deep-high-resolution-net.pytorch, e.g. ``pose_hrnet_w32_256x192.pth``): the trunk
  plus ``final_layer`` (the 1x1 heatmap conv), which is ignored.
* ``imagenet`` (HRNet-Image-Classification, e.g. ``hrnetv2_w32_imagenet_pretrained.pth``): the
  trunk plus the classification head ``incre_modules``, ``downsamp_modules``, ``final_layer``,
  ``classifier``, all ignored. Its last stage-4 module fuses into all four branches; the pose
  trunk (``multi_scale_output=False``) keeps only the fuse into branch 0, so the fuse layers into
  branches 1-3 of that module (``stage4.<last>.fuse_layers.{1,2,3}.*``) are ignored too. The
  multi-scale trunk of the ``hrnetv2`` head uses them.
* A pose checkpoint has no such fuse layers, so it cannot fill the multi-scale trunk: that is
  refused (use an ImageNet checkpoint for the ``hrnetv2`` head).

**Trunk weight file** (``.weights.h5``; :func:`save_layer_weights`, :func:`load_layer_weights`).
Keras 3's own ``save_weights`` keys variables by layer *position and type*, not by name, so a
trunk file could not be loaded into the trunk nested inside the SPM model reliably. This file
is keyed by name: HDF5 group ``layers/<layer name>`` holding one dataset per variable
(``kernel``, ``gamma``, ``beta``, ``moving_mean``, ``moving_variance``), with the attribute
``format = "spm_tf2.layer_weights"``.
"""

from __future__ import annotations

import inspect
import io
import logging
import os
import pickletools
import zipfile
from typing import Dict, Iterable, List, Sequence, Tuple

import h5py
import keras
import numpy as np

from nets.hrnet import HRNetSpec, build_hrnet, iter_layers

log = logging.getLogger(__name__)

FILE_FORMAT = "spm_tf2.layer_weights"
FILE_VERSION = 1

_CONV_VARS = {"kernel": "weight", "bias": "bias"}
_BN_VARS = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
            "moving_variance": "running_var"}
_BN_IGNORED = "num_batches_tracked"

IGNORABLE_HEADS = {
    "pose": ("final_layer.",),
    "imagenet": ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier."),
}
MAX_LISTED = 25   # keys listed per problem category in an error message


# ----------------------------------------------------------------------------- state_dicts

def _mapped_variables(model: keras.Model) -> Dict[str, Tuple[keras.Variable, bool]]:
    """state_dict key -> (Keras variable, is a conv kernel) for every mapped variable."""
    out: Dict[str, Tuple[keras.Variable, bool]] = {}
    for layer in iter_layers(model):
        if not layer.weights:
            continue
        if isinstance(layer, keras.layers.Conv2D):
            table = _CONV_VARS
        elif isinstance(layer, keras.layers.BatchNormalization):
            table = _BN_VARS
        else:
            raise ValueError(f"layer {layer.name!r} ({type(layer).__name__}) has weights but no "
                             f"state_dict mapping")
        for v in layer.weights:
            if v.name not in table:
                raise ValueError(f"layer {layer.name!r}: variable {v.name!r} has no state_dict "
                                 f"mapping")
            out[f"{layer.name}.{table[v.name]}"] = (v, v.name == "kernel")
    return out


def keras_to_state_dict(model: keras.Model) -> Dict[str, np.ndarray]:
    """The model's Conv2D/BN weights as a state_dict in the official key layout (OIHW kernels).

    BatchNorm layers also get ``num_batches_tracked = 0`` (int64), as a PyTorch state_dict has.
    """
    state: Dict[str, np.ndarray] = {}
    for key, (var, is_kernel) in _mapped_variables(model).items():
        value = np.asarray(keras.ops.convert_to_numpy(var), dtype=np.float32)
        state[key] = value.transpose(3, 2, 0, 1) if is_kernel else value
        if key.endswith(".running_var"):
            state[key[:-len("running_var")] + _BN_IGNORED] = np.array(0, dtype=np.int64)
    return state


def normalize_state_dict(state_dict) -> Dict[str, np.ndarray]:
    """Unwrap ``{'state_dict': ...}``, strip DataParallel ``module.`` prefixes, drop
    ``num_batches_tracked``, and turn tensors into NumPy arrays."""
    if isinstance(state_dict, dict) and "state_dict" in state_dict and \
            isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    out = {}
    for key, value in state_dict.items():
        while key.startswith("module."):
            key = key[len("module."):]
        if key.endswith("." + _BN_IGNORED):
            continue
        if hasattr(value, "detach"):          # a torch.Tensor
            value = value.detach().cpu().numpy()
        out[key] = np.asarray(value)
    return out


def _listed(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:MAX_LISTED])
    return shown + (f", ... and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else "")

def _refuse_mismatch(source, model, missing, extra, wrong, words, hint=None) -> None:
    """Raise one ValueError listing every missing, extra and mis-shaped entry (nothing if none)."""
    if not (missing or extra or wrong):
        return
    parts = [f"{source}: does not fit model {model.name!r}"]
    for items, word in zip((missing, extra, wrong), words):
        if items:
            parts.append(f"{len(items)} {word}: {_listed(items)}")
    if hint:
        parts.append(hint)
    raise ValueError("; ".join(parts))



def load_state_dict(model: keras.Model, state_dict, ignore_prefixes: Sequence[str] = (),
                    source: str = "state_dict", hint: str = "") -> List[str]:
    """Copy a state_dict in the official key layout into ``model``; returns the ignored keys.

    Every Conv2D/BN variable of ``model`` must be present with the right shape, and every key
    must be used, except keys starting with one of ``ignore_prefixes`` (documented heads the
    model does not have). Otherwise raises ValueError naming ``source`` and listing every
    missing, unexpected and mis-shaped key; nothing is assigned in that case.
    """
    state = normalize_state_dict(state_dict)
    expected = _mapped_variables(model)
    missing = [k for k in expected if k not in state]
    ignored = [k for k in state if k not in expected and k.startswith(tuple(ignore_prefixes))]
    extra = [k for k in state if k not in expected and k not in ignored]
    wrong = []
    for key, (var, is_kernel) in expected.items():
        if key in state:
            want = tuple(var.shape[i] for i in (3, 2, 0, 1)) if is_kernel else tuple(var.shape)
            if tuple(state[key].shape) != want:
                wrong.append(f"{key} (got {tuple(state[key].shape)}, expected {want})")
    _refuse_mismatch(source, model, missing, extra, wrong,
                     ("missing keys", "unexpected keys", "keys with a wrong shape"), hint)
    for key, (var, is_kernel) in expected.items():
        value = state[key].astype(np.float32)
        var.assign(value.transpose(2, 3, 1, 0) if is_kernel else value)
    return sorted(ignored)


# What a PyTorch state_dict pickle may import: containers, tensor and storage rebuilders, dtypes.
_TORCH_DTYPES = {"float16", "float32", "float64", "bfloat16", "half", "float", "double", "int8", "int16",
                 "int32", "int64", "uint8", "bool", "long", "int", "short"}
_ALLOWED_GLOBALS = {("collections", "OrderedDict"), ("torch", "Size"), ("torch", "device"), ("_codecs", "encode")}


def _allowed_global(module: str, name: str) -> bool:
    if (module, name) in _ALLOWED_GLOBALS:
        return True
    if module == "torch._utils":
        return name.startswith("_rebuild_")
    if module == "torch":
        return name.endswith("Storage") or name in _TORCH_DTYPES
    return False


def check_pickle_globals(data: bytes, source: str) -> None:
    """Refuse a pickle that would import anything but what a state_dict needs.

    Reads the opcodes with ``pickletools`` (nothing is executed): every ``GLOBAL`` /
    ``STACK_GLOBAL`` / ``INST`` must name a container, a tensor or storage rebuilder or a dtype
    (``_allowed_global``); a pickled object of any other class, or a call such as ``os.system``,
    raises ValueError naming it.
    """
    strings: List[str] = []
    stream = io.BytesIO(data)
    # a legacy (non-zip) file holds five pickles in a row, then raw storage bytes
    for _ in range(5):
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                if isinstance(arg, str):
                    strings.append(arg)
                if opcode.name in ("GLOBAL", "INST"):
                    module, name = arg.split(" ", 1)
                elif opcode.name == "STACK_GLOBAL":
                    if len(strings) < 2:
                        raise ValueError(f"{source}: a STACK_GLOBAL without its module and name strings")
                    module, name = strings[-2], strings[-1]
                else:
                    continue
                if not _allowed_global(module, name):
                    raise ValueError(f"{source}: refused: the checkpoint's pickle imports {module}.{name}, "
                                     f"which a state_dict of tensors never needs (a checkpoint is data; "
                                     f"nothing of it was run)")
        except ValueError as e:
            if "refused" in str(e) or "STACK_GLOBAL" in str(e):
                raise
            raise ValueError(f"{source}: not a readable pickle ({e})") from None
        if stream.tell() >= len(data):
            break


def _torch_load_weights(path: str):
    """``torch.load`` of tensors only: the pickle is checked first, then loaded with
    ``weights_only=True`` (PyTorch 1.13 or newer; an older one is refused)."""
    try:
        import torch  # optional dependency: needed only for .pth checkpoints
    except ImportError:
        raise ValueError(f"{path}: reading a PyTorch checkpoint needs the torch package; "
                         f"install it, or save the state_dict as .npz with NumPy "
                         f"(np.savez(out, **{{k: v.numpy() for k, v in sd.items()}}))") from None
    if "weights_only" not in inspect.signature(torch.load).parameters:
        raise ValueError(f"{path}: PyTorch {torch.__version__} cannot load weights only "
                         f"(torch.load(weights_only=True) needs 1.13 or newer); upgrade it, or save "
                         f"the state_dict as .npz with NumPy where it was made")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe files
        raise ValueError(f"{path}: torch.load(weights_only=True) failed ({type(e).__name__}: {e})") from None


def _pickles_of(path: str) -> List[Tuple[str, bytes]]:
    """The pickles of a ``.pth``: ``*/data.pkl`` of the zip format, or the legacy stream."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return [(f"{path}:{n}", z.read(n)) for n in z.namelist() if n.endswith(".pkl")]
    with open(path, "rb") as f:
        return [(path, f.read())]


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
    """Read a state_dict from ``.pth`` (needs PyTorch) or ``.npz`` (keys -> arrays)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable .npz state_dict ({e})") from None
    if path.endswith((".pth", ".pt", ".pth.tar")):
        for source, data in _pickles_of(path):
            check_pickle_globals(data, source)
        loaded = _torch_load_weights(path)
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a state_dict or {{'state_dict': ...}}, "
                             f"got {type(loaded).__name__}")
        return normalize_state_dict(loaded)
    raise ValueError(f"{path}: unknown checkpoint type; expected .pth or .npz")


def _last_module_lower_fuse_prefixes(spec: HRNetSpec) -> Tuple[str, ...]:
    last = spec.stages[-1]
    return tuple(f"stage{len(spec.stages)}.{last.num_modules - 1}.fuse_layers.{i}."
                 for i in range(1, last.num_branches))


def convert_checkpoint(input_path: str, output_path: str, spec: HRNetSpec, source: str = "pose",
                       multi_scale_output: bool = False) -> Dict[str, object]:
    """Convert an official HRNet checkpoint into a trunk weight file for ``spec``.

    Args:
        input_path: ``.pth`` or ``.npz`` state_dict of the official pose or ImageNet model.
        output_path: the ``.weights.h5`` file to write (see :func:`save_layer_weights`).
        spec: stage table of the trunk (``nets.hrnet.backbone_spec`` / ``make_spec``).
        source: ``pose`` or ``imagenet``: which heads are ignorable.
        multi_scale_output: convert for the multi-scale trunk of the ``hrnetv2`` head.

    Returns:
        ``{"loaded": n_keys, "ignored": [keys]}``.
    """
    if source not in IGNORABLE_HEADS:
        raise ValueError(f"unknown checkpoint source {source!r}; choose pose or imagenet")
    if not output_path.endswith(".weights.h5"):
        raise ValueError(f"{output_path}: the output name must end in .weights.h5")
    state = read_state_dict(input_path)
    ignore = IGNORABLE_HEADS[source]
    hint = (f"check that the checkpoint is an official {spec.name} "
            f"({'multi' if multi_scale_output else 'single'}-scale trunk, source {source})")
    if not multi_scale_output:
        ignore = ignore + _last_module_lower_fuse_prefixes(spec)
    elif source == "pose":
        hint = ("a pose checkpoint fuses its last module into branch 0 only, so it cannot fill "
                "the multi-scale trunk of the hrnetv2 head: use an ImageNet checkpoint "
                "(--source imagenet) or the spm head")
    trunk = build_hrnet(spec, multi_scale_output=multi_scale_output)
    ignored = load_state_dict(trunk, state, ignore, source=input_path, hint=hint)
    save_layer_weights(trunk, output_path)
    log.info("%s: %d tensors loaded, %d ignored -> %s", input_path,
             len(_mapped_variables(trunk)), len(ignored), output_path)
    return {"loaded": len(_mapped_variables(trunk)), "ignored": ignored}


# ----------------------------------------------------------------------------- weight files

def save_layer_weights(model: keras.Model, path: str) -> None:
    """Write every weight of ``model`` (nested models included) keyed by layer name."""
    tmp = path + ".tmp"
    with h5py.File(tmp, "w") as f:
        f.attrs["format"] = FILE_FORMAT
        f.attrs["version"] = FILE_VERSION
        f.attrs["model"] = model.name
        group = f.create_group("layers")
        for layer in iter_layers(model):
            if layer.weights:
                g = group.create_group(layer.name)
                for v in layer.weights:
                    g.create_dataset(v.name, data=keras.ops.convert_to_numpy(v))
    os.replace(tmp, path)


def load_layer_weights(model: keras.Model, path: str) -> None:
    """Load a :func:`save_layer_weights` file into ``model`` by layer and variable name.

    Raises ValueError naming ``path`` and listing every missing, unexpected or mis-shaped
    layer variable; nothing is assigned in that case.
    """
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 weight file ({e})") from None
    with f:
        if f.attrs.get("format") != FILE_FORMAT or "layers" not in f:
            raise ValueError(f"{path}: not a layer-weights file of this project (format "
                             f"{f.attrs.get('format')!r}); convert official checkpoints with "
                             f"tools/convert_hrnet_weights.py")
        stored = {f"{name}/{var}": ds[()] for name, g in f["layers"].items()
                  for var, ds in g.items()}
    expected = {f"{layer.name}/{v.name}": v for layer in iter_layers(model) for v in layer.weights}
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    wrong = [f"{k} (file {stored[k].shape}, model {tuple(v.shape)})"
             for k, v in expected.items() if k in stored and stored[k].shape != tuple(v.shape)]
    _refuse_mismatch(path, model, missing, extra, wrong,
                     ("variables missing from the file", "variables the model does not have",
                      "variables with a wrong shape"))
    for key, var in expected.items():
        var.assign(stored[key])
