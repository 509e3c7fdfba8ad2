"""A compiled evaluator of the served XGBoost model: the trees as numpy arrays, walked by a small C routine.

``Booster.inplace_predict`` costs ~14 ms for 2,000 rows of a 500-tree depth-6 model on one thread, most of it
per-row overhead of XGBoost's general predictor. ``tree_eval.c`` (shipped next to this file, model-independent)
walks complete binary trees without branches over blocks of rows; it is compiled once per machine with the C
compiler into a cache directory keyed by the source, the compiler, its flags and the CPU (``-march=native`` code
must not run on another CPU sharing the cache), then loaded with ctypes. The model's trees are converted from
the booster's JSON at model load (:func:`convert_booster`).

:func:`build_evaluator` returns the evaluator, or None with the reason it could not be used (no compiler, a
compile error, a tree deeper than :data:`MAX_DEPTH`, an objective or tree kind not supported, a failed
self-check against XGBoost): the caller then uses ``inplace_predict``, and says why.

Semantics follow XGBoost's CPU predictor: float32 features, left when ``x < threshold``, NaN to the default side,
margin = base margin + leaves summed in float32 in tree order, probability = 1 / (1 + expf(-margin)); the
contributions are XGBoost's ``approx_contribs`` (Saabas) on cover-weighted node means computed in float32 as
XGBoost does.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xgboost as xgb

SOURCE = Path(__file__).resolve().parent / "tree_eval.c"
COMPILED_C = "compiled-c"
# Deeper trees padded to complete ones grow as 2^depth per tree: 500 trees of depth 10 are ~10 MB of arrays.
MAX_DEPTH = 10
_LOGISTIC = ("binary:logistic", "reg:logistic")
_IDENTITY = ("binary:logitraw", "reg:squarederror")
_SELF_CHECK_ROWS = 256
_SELF_CHECK_TOLERANCE = 1e-4  # margins; a real mismatch (a semantics we do not model) is far larger


class Unsupported(Exception):
    """Why the compiled evaluator cannot serve this model or on this machine (the text is shown in /stats)."""


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "pymk" / "tree-eval"


@dataclass(frozen=True)
class EvaluatorOptions:
    """How to evaluate the trees. ``mode``: "auto" (compiled C when possible, else XGBoost, with the reason) or
    "xgboost" (always ``inplace_predict``). The settings' ``tree_evaluator*`` fields fill it in the worker."""

    mode: str = "auto"
    compiler: str = "gcc"
    flags: tuple[str, ...] = ("-O3", "-march=native")
    cache_dir: Path = field(default_factory=_default_cache_dir)

    @classmethod
    def from_settings(cls, settings: Any) -> EvaluatorOptions:
        return cls(mode=settings.tree_evaluator, compiler=settings.tree_evaluator_cc,
                   flags=tuple(shlex.split(settings.tree_evaluator_cflags)),
                   cache_dir=Path(settings.tree_evaluator_cache_dir).expanduser())

    @classmethod
    def from_env(cls) -> EvaluatorOptions:
        """The options of the ``PYMK_*`` environment (what offline evaluation uses, like the worker)."""
        from pymk.settings import Settings  # pure: a frozen dataclass, no Kafka

        return cls.from_settings(Settings.from_env())


# ---- trees -> arrays -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TreeArrays:
    """An ensemble as complete binary trees of ``depth`` levels, heap order (children of k: 2k+1, 2k+2)."""

    feature: np.ndarray  # (trees, 2^depth - 1) int32, split feature of each internal node (0 for padding)
    threshold: np.ndarray  # (trees, 2^depth - 1) float32
    default_left: np.ndarray  # (trees, 2^depth - 1) uint8: where NaN goes
    leaf: np.ndarray  # (trees, 2^depth) float32 leaf values
    mean: np.ndarray  # (trees, 2^(depth+1) - 1) float32 cover-weighted node means (Saabas), internal then leaves
    depth: int
    n_features: int
    base_margin: float  # float32 value, added to every row's margin
    transform: str  # "logistic" or "identity": margin -> prediction

    @property
    def trees(self) -> int:
        return int(self.feature.shape[0])


def _float32_of(text: str) -> float:
    """XGBoost ≥2 writes base_score as "[4.1322086E-2]" (a vector), older versions as "4.1322086E-2"."""
    return float(np.float32(text.strip().strip("[]").split(",")[0]))


def _base_margin(base_score: float, transform: str) -> float:
    if transform == "identity":
        return float(np.float32(base_score))
    # binary:logistic stores base_score as a probability (learner_model_param): its margin is the logit, in float32
    p = np.float32(base_score)
    if not 0.0 < p < 1.0:
        raise Unsupported(f"base_score {base_score} outside (0, 1) for a logistic objective")
    return float(np.float32(-np.log(np.float32(1.0) / p - np.float32(1.0))))


def _tree_depth(left: list[int], right: list[int]) -> int:
    depth, frontier = 0, [0]
    while True:
        children = [c for k in frontier for c in (left[k], right[k]) if c != -1]
        if not children:
            return depth
        depth, frontier = depth + 1, children


def convert_booster(booster: xgb.Booster) -> TreeArrays:
    """The booster's trees as :class:`TreeArrays`; raises :class:`Unsupported` for what the C code does not model."""
    learner = json.loads(bytes(booster.save_raw("json")))["learner"]
    objective = learner["objective"]["name"]
    if objective in _LOGISTIC:
        transform = "logistic"
    elif objective in _IDENTITY:
        transform = "identity"
    else:
        raise Unsupported(f"objective {objective} not supported")
    gbm = learner["gradient_booster"]
    if gbm["name"] != "gbtree":
        raise Unsupported(f"booster {gbm['name']} not supported (gbtree only)")
    params = learner["learner_model_param"]
    if int(params.get("num_class", "0")) > 1 or int(params.get("num_target", "1")) != 1:
        raise Unsupported("multi-class or multi-target models not supported")
    model = gbm["model"]
    trees = model["trees"]
    if not trees:
        raise Unsupported("a model without trees")
    if any(int(group) != 0 for group in model["tree_info"]):
        raise Unsupported("trees of several output groups not supported")
    n_features = int(params["num_feature"])
    depths = []
    for tree in trees:
        if any(int(kind) != 0 for kind in tree["split_type"]):
            raise Unsupported("categorical splits not supported")
        if int(tree["tree_param"].get("size_leaf_vector", "1")) > 1:
            raise Unsupported("vector leaves not supported")
        depths.append(_tree_depth(tree["left_children"], tree["right_children"]))
    depth = max(1, max(depths))  # at least one level, so a model of single leaves still has arrays to walk
    if depth > MAX_DEPTH:
        raise Unsupported(f"tree depth {depth} > {MAX_DEPTH} supported")

    n_trees, n_internal, n_nodes = len(trees), (1 << depth) - 1, (2 << depth) - 1
    feature = np.zeros((n_trees, n_internal), np.int32)
    threshold = np.zeros((n_trees, n_internal), np.float32)
    default_left = np.ones((n_trees, n_internal), np.uint8)
    value = np.zeros((n_trees, n_nodes), np.float32)  # leaf values where a leaf (or its padding) is
    hessian = np.ones((n_trees, n_nodes), np.float32)
    is_split = np.zeros((n_trees, n_nodes), bool)
    for t, tree in enumerate(trees):
        left, right = tree["left_children"], tree["right_children"]
        index, condition = tree["split_indices"], tree["split_conditions"]
        defaults, cover = tree["default_left"], tree["sum_hessian"]
        stack = [(0, 0)]  # (XGBoost node id, heap position)
        while stack:
            nid, pos = stack.pop()
            hessian[t, pos] = cover[nid]
            if left[nid] == -1:
                # A leaf: its value fills the whole padded subtree below its position (any path reaches it).
                first, count = pos, 1
                while first < n_nodes:
                    value[t, first:first + count] = condition[nid]
                    first, count = 2 * first + 1, 2 * count
                continue
            if int(index[nid]) >= n_features:
                raise Unsupported(f"split on feature {index[nid]} of a {n_features}-feature model")
            feature[t, pos], threshold[t, pos] = index[nid], condition[nid]
            default_left[t, pos] = bool(defaults[nid])
            is_split[t, pos] = True
            stack += [(left[nid], 2 * pos + 1), (right[nid], 2 * pos + 2)]
    # Node means bottom-up, level by level over all trees, in float32 and XGBoost's order of operations
    # (FillNodeMeanValue: (mean_left * cover_left + mean_right * cover_right) / cover), so Saabas values match.
    for level in range(depth - 1, -1, -1):
        positions = np.arange((1 << level) - 1, (2 << level) - 1)
        lefts, rights = 2 * positions + 1, 2 * positions + 2
        combined = (value[:, lefts] * hessian[:, lefts] + value[:, rights] * hessian[:, rights]) / hessian[:, positions]
        value[:, positions] = np.where(is_split[:, positions], combined, value[:, positions])
    base = _float32_of(params["base_score"])
    return TreeArrays(feature, threshold, default_left, np.ascontiguousarray(value[:, n_internal:]), value, depth,
                      n_features, _base_margin(base, transform), transform)


# ---- compile and load -----------------------------------------------------------------------------------------
_LOCK = threading.Lock()
_LIBRARIES: dict[Path, ctypes.CDLL] = {}


def _cpu_key() -> str:
    """What -march=native depends on: the CPU model and its flags (a home shared by other machines)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))][:2]
        return platform.machine() + "\n" + "\n".join(lines)
    except OSError:
        return platform.machine() + platform.processor()


def library_path(options: EvaluatorOptions) -> Path:
    """Where the compiled library for this source, compiler, flags and CPU lives in the cache."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), options.compiler.encode(), " ".join(options.flags).encode(), _cpu_key().encode()):
        key.update(hashlib.sha256(part).digest())
    return options.cache_dir / f"tree_eval-{key.hexdigest()[:16]}.so"


def compile_library(options: EvaluatorOptions) -> Path:
    """The cached library, compiled first when missing. Two processes compiling at once each write a temporary
    file in the cache directory and rename it into place (atomic), so a loader never sees half a library."""
    target = library_path(options)
    if target.exists():
        return target
    compiler = shutil.which(options.compiler)
    if compiler is None:
        raise Unsupported(f"C compiler {options.compiler!r} not found")
    try:
        options.cache_dir.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".tree_eval-", suffix=".so", dir=options.cache_dir)
        os.close(handle)
    except OSError as error:
        raise Unsupported(f"cache directory {options.cache_dir} not writable: {error}") from error
    try:
        command = [compiler, *options.flags, "-shared", "-fPIC", "-std=c11", "-o", temporary, str(SOURCE), "-lm"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no message"])[0]
            raise Unsupported(f"{options.compiler} failed ({done.returncode}): {first[:200]}")
        os.replace(temporary, target)
    except (OSError, subprocess.SubprocessError) as error:
        raise Unsupported(f"{options.compiler} could not run: {error}") from error
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


def load_library(path: Path) -> ctypes.CDLL:
    with _LOCK:
        library = _LIBRARIES.get(path)
        if library is None:
            library = ctypes.CDLL(str(path))
            pointer = ctypes.c_void_p
            for name in ("tree_eval_margin", "tree_eval_sigmoid", "tree_eval_contribs"):
                function = getattr(library, name)
                # x, n, n_features, key, threshold, leaf|mean, n_trees, depth, base, out
                function.argtypes = [pointer, ctypes.c_int64, ctypes.c_int32, pointer, pointer, pointer,
                                     ctypes.c_int32, ctypes.c_int32, ctypes.c_float, pointer]
                function.restype = None
            library.tree_eval_kernel.argtypes = [ctypes.c_int32]
            library.tree_eval_kernel.restype = ctypes.c_char_p
            # m, values, anchors, known, latest, has_view, as_of, taus, thresholds, offsets, block, until
            library.kept_rows_as_of.argtypes = [ctypes.c_int64, *[pointer] * 5, ctypes.c_int64, *[pointer] * 5]
            library.kept_rows_as_of.restype = None
            # m, rows, values, anchors, known, latest, has_view, as_of, taus, thresholds, offsets, x, stride,
            # col_activity, col_recency, until
            library.kept_rows_as_of_at.argtypes = [ctypes.c_int64, *[pointer] * 6, ctypes.c_int64, *[pointer] * 4,
                                                   *[ctypes.c_int64] * 3, pointer]
            library.kept_rows_as_of_at.restype = None
            # model, list, n, dirty, moved, fresh, as_of, k, top, query_held, query_anchor, query_known
            library.kept_rows_update.argtypes = [pointer, pointer, ctypes.c_int64, *[pointer] * 3, ctypes.c_int64,
                                                 ctypes.c_int64, pointer, ctypes.c_double, ctypes.c_int64,
                                                 ctypes.c_int32]
            library.kept_rows_update.restype = ctypes.c_int64
            # m, values, anchors, known, as_of, taus, x, stride, col
            library.activity_columns.argtypes = [ctypes.c_int64, *[pointer] * 3, ctypes.c_int64, pointer, pointer,
                                                 ctypes.c_int64, ctypes.c_int64]
            library.activity_columns.restype = None
            # n, ids, m, middles, sizes, others, band_upper, n_upper, out, stride
            library.structure_columns.argtypes = [ctypes.c_int64, pointer, ctypes.c_int64, *[pointer] * 4,
                                                  ctypes.c_int32, pointer, ctypes.c_int64]
            library.structure_columns.restype = ctypes.c_int
            _LIBRARIES[path] = library
        return library


_FEATURE_KERNELS: list[ctypes.CDLL | None] = []


def feature_kernels() -> ctypes.CDLL | None:
    """The library for the feature matrix's compiled passes (``structure_columns``), compiled with the
    environment's evaluator options; None when it cannot be built here (no compiler, PYMK_TREE_EVALUATOR=xgboost):
    the callers then run their numpy version, which gives the same bits. Tried once per process."""
    with _LOCK:
        if _FEATURE_KERNELS:
            return _FEATURE_KERNELS[0]
    library = None
    options = EvaluatorOptions.from_env()
    if options.mode == "auto":
        try:
            library = load_library(compile_library(options))
        except (Unsupported, OSError):
            library = None
    with _LOCK:
        if not _FEATURE_KERNELS:
            _FEATURE_KERNELS.append(library)
        return _FEATURE_KERNELS[0]


# ---- the evaluator -----------------------------------------------------------------------------------------------
class CompiledEvaluator:
    """Margins, predictions and Saabas contributions of one model's :class:`TreeArrays` through the C library."""

    def __init__(self, arrays: TreeArrays, library: ctypes.CDLL) -> None:
        self.arrays = arrays
        self._library = library
        a = arrays
        # The C layout: split feature and default side in one int32 key (bit 31: NaN goes left); trees one after
        # the other with 64 spare entries at the end, which a 64-wide register load past the last tree may read.
        spare = 64
        key = (a.feature.astype(np.uint32) | (a.default_left.astype(np.uint32) << 31)).view(np.int32)
        self._buffers = (np.concatenate([key.ravel(), np.zeros(spare, np.int32)]),
                         np.concatenate([a.threshold.ravel(), np.zeros(spare, np.float32)]),
                         np.concatenate([a.leaf.ravel(), np.zeros(spare, np.float32)]),
                         np.ascontiguousarray(a.mean.ravel()))
        # Their addresses are taken once (ctypes' .data lookups cost microseconds per call).
        self._trees = (self._buffers[0].ctypes.data, self._buffers[1].ctypes.data)
        self._leaf, self._mean = self._buffers[2].ctypes.data, self._buffers[3].ctypes.data
        self._shape = (ctypes.c_int32(a.trees), ctypes.c_int32(a.depth), ctypes.c_float(a.base_margin))
        self.kernel = library.tree_eval_kernel(a.depth).decode()

    @property
    def library(self) -> ctypes.CDLL:
        """The loaded C library (its other entry points: ``kept_rows_as_of``, for ranking/incremental.py)."""
        return self._library

    def tree_context(self) -> tuple[int, ...]:
        """The trees for another entry point of the library (``kept_rows_update``): the key, threshold and leaf
        arrays' addresses (alive as long as this evaluator), trees, depth, the base margin's float32 bits, and
        whether the prediction is the logistic of the margin."""
        a = self.arrays
        base_bits = int(np.asarray(a.base_margin, np.float32).view(np.int32))
        return (*self._trees, self._leaf, a.trees, a.depth, base_bits, int(a.transform == "logistic"))

    def _rows(self, features: np.ndarray) -> np.ndarray:
        # XGBoost casts every value to float32 before comparing it: the same cast here.
        rows = np.ascontiguousarray(features, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.arrays.n_features:
            raise ValueError(f"expected (n, {self.arrays.n_features}) features, got {rows.shape}")
        return rows

    def _run(self, name: str, features: np.ndarray, values: int, width: int) -> np.ndarray:
        rows = self._rows(features)
        out = np.empty((len(rows), width) if width > 1 else len(rows), np.float32)
        if len(rows):
            getattr(self._library, name)(rows.ctypes.data, len(rows), self.arrays.n_features, *self._trees, values,
                                         *self._shape, out.ctypes.data)
        return out

    def margin(self, features: np.ndarray) -> np.ndarray:
        return self._run("tree_eval_margin", features, self._leaf, 1)

    def predict(self, features: np.ndarray) -> np.ndarray:
        name = "tree_eval_sigmoid" if self.arrays.transform == "logistic" else "tree_eval_margin"
        return self._run(name, features, self._leaf, 1)

    def contributions(self, features: np.ndarray) -> np.ndarray:
        """(n, n_features + 1): Saabas contributions then the bias; each row sums to its margin."""
        return self._run("tree_eval_contribs", features, self._mean, self.arrays.n_features + 1)


def self_check_rows(arrays: TreeArrays, rows: int = _SELF_CHECK_ROWS, seed: int = 0) -> np.ndarray:
    """Rows that put values exactly on the model's thresholds, just below them and NaN: where a comparison or
    missing-value rule that differs from XGBoost's would show."""
    rng = np.random.default_rng(seed)
    used = arrays.threshold.ravel()
    x = np.empty((rows, arrays.n_features), np.float32)
    for column in range(arrays.n_features):
        mine = arrays.threshold[arrays.feature == column]
        pool = mine if len(mine) else (used if len(used) else np.zeros(1, np.float32))
        values = rng.choice(pool, rows)
        below = np.nextafter(values, np.float32(-np.inf))
        x[:, column] = np.where(rng.random(rows) < 0.5, values, below)
    x[rng.random(x.shape) < 0.1] = np.nan
    return x


def build_evaluator(booster: xgb.Booster, options: EvaluatorOptions) -> tuple[CompiledEvaluator | None, str]:
    """(evaluator, "compiled-c") or (None, "xgboost (why)"). Never raises for a model or machine it cannot serve."""
    if options.mode == "xgboost":
        return None, "xgboost (PYMK_TREE_EVALUATOR=xgboost)"
    if options.mode != "auto":
        return None, f"xgboost (unknown PYMK_TREE_EVALUATOR={options.mode!r}: auto or xgboost)"
    try:
        arrays = convert_booster(booster)
        evaluator = CompiledEvaluator(arrays, load_library(compile_library(options)))
        check = self_check_rows(arrays)
        expected = booster.inplace_predict(check, predict_type="margin", missing=np.nan)
        worst = float(np.max(np.abs(evaluator.margin(check) - expected)))
        if not worst <= _SELF_CHECK_TOLERANCE:
            raise Unsupported(f"self-check against XGBoost failed: margins differ by {worst:.3g}")
    except Unsupported as reason:
        return None, f"xgboost ({reason})"
    except Exception as error:  # noqa: BLE001 - an unexpected model layout must not stop serving: XGBoost can
        return None, f"xgboost (compiled evaluator failed: {type(error).__name__}: {error})"
    return evaluator, COMPILED_C


__all__ = ["COMPILED_C", "MAX_DEPTH", "CompiledEvaluator", "EvaluatorOptions", "TreeArrays", "Unsupported",
           "build_evaluator", "compile_library", "convert_booster", "feature_kernels", "library_path", "load_library"]
