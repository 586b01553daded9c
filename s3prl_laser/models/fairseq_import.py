"""Reading original fairseq HuBERT checkpoints without fairseq: a restricted unpickler and the conversion.

An original fairseq checkpoint is a pickle that names fairseq's and omegaconf's classes. The
:class:`RestrictedUnpickler` resolves only a whitelist of globals (tensor rebuilders, containers, torch
dtypes, numpy scalars); globals of ``INERT_MODULES`` come back as inert stand-ins whose construction runs
none of their code; anything else raises :class:`UnsafeCheckpointError` before it is called.
:func:`convert_fairseq_hubert` then turns the result into s3prl's "converted" HuBERT format, as
``s3prl/upstream/hubert/convert.py`` does with fairseq installed.

Example:
    >>> pickle_module = restricted_pickle_module()
    >>> state = torch.load(path, weights_only=False, pickle_module=pickle_module)  # doctest: +SKIP
    >>> hubert = convert_fairseq_hubert(state, str(path))  # doctest: +SKIP
"""

from __future__ import annotations

import builtins
import collections
import pickle
import types

import torch
from torch import Tensor

from s3prl_laser.errors import UnsafeCheckpointError, UserInputError

# Globals of these packages come back as inert stand-ins: fairseq's classes and enums, omegaconf's
# containers, nodes and metadata, and the typing annotations (``Tuple[Any, ...]`` is pickled as
# ``operator.getitem(typing.Tuple, ...)``) that omegaconf keeps in its metadata.
INERT_MODULES = ("fairseq", "omegaconf", "typing")
# Builtins a checkpoint pickle may call: constructors of plain data, nothing that reaches the system.
SAFE_BUILTINS = (
    "set",
    "frozenset",
    "dict",
    "list",
    "tuple",
    "str",
    "int",
    "float",
    "bool",
    "bytes",
    "bytearray",
    "object",
)


class _Inert:
    """Stand-in for an object of a class we do not import (fairseq ``Dictionary``, omegaconf nodes, enums).

    Building it runs no code of the original class: it only keeps the constructor arguments and the
    pickled state, which :func:`to_plain` / :func:`_dictionary_symbols` read.
    """

    origin = "?"
    args: tuple = ()  # pickle's NEWOBJ builds instances without calling __init__
    kwargs: dict = {}  # read-only default
    state = None

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<inert {self.origin}>"


class _Namespace(dict):
    """Dict-like stand-in for ``argparse.Namespace``: its pickled ``__dict__`` becomes the dict's items."""

    def __setstate__(self, state):
        self.update(state)


_INERT_TYPES: dict[str, type[_Inert]] = {}


def _inert_type(origin: str) -> type[_Inert]:
    if origin not in _INERT_TYPES:
        _INERT_TYPES[origin] = type(f"Inert[{origin}]", (_Inert,), {"origin": origin})
    return _INERT_TYPES[origin]


def _allowed_globals() -> dict[tuple[str, str], object]:
    """Globals a fairseq checkpoint may name, mapped to what the restricted unpickler returns for them."""
    import numpy as np

    allowed: dict[tuple[str, str], object] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("collections", "defaultdict"): collections.defaultdict,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch", "device"): torch.device,
        ("torch", "Size"): torch.Size,
        ("argparse", "Namespace"): _Namespace,
        ("numpy", "dtype"): np.dtype,
        ("numpy", "ndarray"): np.ndarray,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "scalar")] = np._core.multiarray.scalar
        allowed[(module, "_reconstruct")] = np._core.multiarray._reconstruct
    for module in ("builtins", "__builtin__"):
        for name in SAFE_BUILTINS:
            allowed[(module, name)] = getattr(builtins, name)
        allowed[(module, "long")] = int  # Python 2 pickles
        allowed[(module, "Ellipsis")] = Ellipsis
    for name in dir(torch):
        if isinstance(getattr(torch, name), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only whitelisted globals and raises :class:`UnsafeCheckpointError` otherwise.

    Real objects come back for torch's tensor rebuilders, containers, torch dtypes and numpy scalars;
    globals of ``INERT_MODULES`` come back as inert stand-ins (nothing of those packages is imported or
    run); ``argparse.Namespace`` comes back as a dict.
    """

    _allowed: dict[tuple[str, str], object] | None = None

    def find_class(self, module: str, name: str):
        if RestrictedUnpickler._allowed is None:
            RestrictedUnpickler._allowed = _allowed_globals()
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        if module.split(".")[0] in INERT_MODULES or (module, name) == ("_operator", "getitem"):
            return _inert_type(f"{module}.{name}")
        raise UnsafeCheckpointError(
            f"checkpoint pickle references {module}.{name}, which is not on the whitelist of the fairseq "
            "checkpoint reader; refusing to load it (nothing was executed)"
        )


def restricted_pickle_module() -> types.ModuleType:
    """A ``pickle_module`` for ``torch.load`` whose unpickler is :class:`RestrictedUnpickler`."""
    module = types.ModuleType("s3prl_laser_restricted_pickle")
    module.Unpickler = RestrictedUnpickler
    module.load = lambda f, **kwargs: RestrictedUnpickler(f, **kwargs).load()
    return module


def to_plain(obj, where: str):
    """Containers, strings, numbers and tensors only (what ``torch.load(weights_only=True)`` reads back).

    omegaconf containers and nodes become dicts/lists/values, enum stand-ins their value.
    """
    if isinstance(obj, _Inert):
        if obj.origin.startswith("omegaconf.") and isinstance(obj.state, dict):  # containers and nodes
            return to_plain(obj.state.get("_content", obj.state.get("_val")), where)
        if len(obj.args) == 1 and obj.state is None:  # an enum member: Enum(value)
            return to_plain(obj.args[0], where)
        raise UserInputError(f"{where}: cannot turn a pickled {obj.origin} into plain data")
    if isinstance(obj, dict):
        return {str(k): to_plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, str | int | float | bool | type(None) | Tensor):
        return obj
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy scalar
        return obj.item()
    raise UserInputError(f"{where}: unexpected {type(obj).__name__} in a checkpoint config")


def _dictionary_symbols(dictionary, where: str) -> list[str]:
    state = dictionary.state if isinstance(dictionary, _Inert) else dictionary
    if not isinstance(state, dict) or "symbols" not in state:
        raise UserInputError(f"{where}: expected a fairseq Dictionary with 'symbols', found {dictionary!r}")
    return [str(s) for s in state["symbols"]]


def is_fairseq_checkpoint(state: dict) -> bool:
    """True for an original fairseq checkpoint: ``model``, ``task_state`` and a ``cfg`` or ``args``.

    (WavLM's own checkpoints, ``{"cfg", "model"}``, have no ``task_state``.)
    """
    has_config = state.get("cfg") is not None or state.get("args") is not None
    return "model" in state and "task_state" in state and has_config


def unwrap(obj):
    """One level of an omegaconf container stand-in: its content (a dict or list of nodes)."""
    if isinstance(obj, _Inert) and obj.origin.startswith("omegaconf.") and isinstance(obj.state, dict):
        return obj.state.get("_content")
    return obj


def fairseq_configs(state: dict, where: str, config_classes) -> tuple[dict, dict, str]:
    """``(task_cfg, model_cfg, name)`` of an original fairseq checkpoint, as plain containers.

    ``cfg["task"]`` and ``cfg["model"]`` with the model's ``_name``; old checkpoints keep one flat ``args``
    Namespace instead, of which the entries that ``config_classes()`` (the task's and the model's config
    dataclasses, imported only then) know are kept, with ``args.arch`` as the name.
    """
    if state.get("cfg") is not None:
        cfg = unwrap(state["cfg"])
        if not isinstance(cfg, dict) or not {"model", "task"} <= set(cfg):
            found = sorted(cfg) if isinstance(cfg, dict) else type(cfg).__name__
            raise UserInputError(
                f"{where}: expected a fairseq cfg with 'model' and 'task' sections, found {found}"
            )
        task_cfg, model_cfg = (to_plain(cfg[k], f"{where}:cfg.{k}") for k in ("task", "model"))
        return task_cfg, model_cfg, str(model_cfg.get("_name", ""))
    if state.get("args") is not None:
        args = dict(state["args"])
        task_cfg, model_cfg = (
            {k: to_plain(args[k], f"{where}:args.{k}") for k in dc.__dataclass_fields__ if k in args}
            for dc in config_classes()
        )
        return task_cfg, model_cfg, str(args.get("arch", ""))
    raise UserInputError(f"{where}: fairseq checkpoint has neither 'cfg' nor 'args'")


def convert_fairseq_hubert(state: dict, where: str = "checkpoint") -> dict:
    """Convert an original fairseq HuBERT checkpoint dict to s3prl's "converted" format.

    Does what ``s3prl/upstream/hubert/convert.py::load_and_convert_fairseq_ckpt`` does, without fairseq:
    ``task_cfg = cfg["task"]``, ``model_cfg = cfg["model"]`` (old checkpoints: both from ``args``),
    ``model_weight = state["model"]``, ``dictionaries_symbols`` from ``task_state["dictionaries"]``.
    """
    def config_classes():
        from s3prl.upstream.hubert.hubert_model import HubertConfig, HubertPretrainingConfig

        return HubertPretrainingConfig, HubertConfig

    task_cfg, model_cfg, _ = fairseq_configs(state, where, config_classes)
    dictionaries = (state.get("task_state") or {}).get("dictionaries")
    if not isinstance(dictionaries, list | tuple) or not dictionaries:
        raise UserInputError(
            f"{where}: expected task_state['dictionaries'] (a HuBERT pre-training checkpoint)"
        )
    symbols = [
        _dictionary_symbols(d, f"{where}:task_state.dictionaries[{i}]") for i, d in enumerate(dictionaries)
    ]
    weights = state["model"]
    bad = [k for k, v in weights.items() if not isinstance(v, Tensor)]
    if bad:
        raise UserInputError(f"{where}: model weights that are not tensors: {bad[:5]}")
    return {
        "task_cfg": task_cfg,
        "model_cfg": model_cfg,
        "model_weight": dict(weights),
        "dictionaries_symbols": symbols,
    }
