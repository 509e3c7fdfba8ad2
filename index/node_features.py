"""Node input features of the GraphSAGE user model, and compact profile/activity encoders for later models.

A node's features come only from its own profile and activity, never from its id, so the model is
inductive: a user who signed up a second ago (no connections, no history) still gets a meaningful vector,
and two users with the same profile and degree get the same one.

Layout of :func:`encode_node` (``NODE_FEATURE_DIM`` = 256, float32)::

    [  0,  64) company   hashed categorical, 2 signed probes (a collision on one probe still leaves the other)
    [ 64, 128) school    same
    [128, 160) industry  same
    [160, 192) title     signed hashed bag of title tokens (stop-words dropped), L2-normalised
    [192, 224) skills    signed hashed set of normalised skills, L2-normalised
    [224, 240) geo       present flag, unit-sphere xyz, and sin/cos of 6 projections at three scales
                         (continent, region, city), so nearby users get nearby features
    [240, 256) activity  :func:`encode_activity`: degree (log1p and one-hot power-of-two bucket) then
                         profile flags (signed up, completeness, has company/school/skills/geo)

Hashing uses blake2b of the normalised text (never Python's ``hash()``, which is salted per process), so a
vector is the same in every process and after a restart. Missing fields encode as zeros.
"""

from __future__ import annotations

import math
from functools import lru_cache
from hashlib import blake2b
from typing import Protocol

import numpy as np

from pymk.events import Profile
from pymk.features.profile import normalise_text, skill_set, title_tokens

FEATURE_VERSION = "node-features-v1"  # bump on any change of the encoding: saved models record it

COMPANY_DIM, SCHOOL_DIM, INDUSTRY_DIM, TITLE_DIM, SKILLS_DIM, GEO_DIM = 64, 64, 32, 32, 32, 16
DEGREE_DIM = 10  # log1p(degree) and 9 one-hot buckets 0, 1, 2-3, 4-7, ..., 64-127, 128+
PROFILE_FLAGS_DIM = 6  # signed up, completeness, has company, has school, has skills, has geo
ACTIVITY_FEATURE_DIM = DEGREE_DIM + PROFILE_FLAGS_DIM  # 16
PROFILE_FIELDS_DIM = COMPANY_DIM + SCHOOL_DIM + INDUSTRY_DIM + TITLE_DIM + SKILLS_DIM + GEO_DIM  # 240
NODE_FEATURE_DIM = PROFILE_FIELDS_DIM + ACTIVITY_FEATURE_DIM  # 256
DEGREE_SLICE = slice(PROFILE_FIELDS_DIM, PROFILE_FIELDS_DIM + DEGREE_DIM)  # the only degree-dependent part

PROFILE_FEATURE_DIM = 32  # compact profile encoding for the two-tower model: 8+6+4+4+6+4

# The feature layout a saved model was trained with (checked on load).
FEATURE_CONFIG: dict[str, object] = {
    "version": FEATURE_VERSION,
    "node_feature_dim": NODE_FEATURE_DIM,
    "blocks": {"company": COMPANY_DIM, "school": SCHOOL_DIM, "industry": INDUSTRY_DIM, "title": TITLE_DIM,
               "skills": SKILLS_DIM, "geo": GEO_DIM, "degree": DEGREE_DIM, "profile_flags": PROFILE_FLAGS_DIM},
    "hash": "blake2b-64 of namespace + normalised text",
}

_DEGREE_BUCKETS = 9
_LOG_DEGREE_SCALE = 1.0 / math.log1p(1000.0)  # degree 1000 → 1.0: keeps the input in the range of the others


class NodeFeatureSource(Protocol):
    """Where the embedder reads a user's profile and degree (the worker implements it over its state).

    A source may also define ``profile_version(user) -> Hashable``; the embedder then caches encoded
    profiles by ``(user, version)`` and calls :meth:`profile` only on a cache miss."""

    def profile(self, user: int) -> Profile | None: ...

    def degree(self, user: int) -> int: ...


# ---- hashing -------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1 << 16)
def stable_hash64(namespace: str, text: str) -> int:
    """64-bit blake2b of ``namespace`` and ``text``: the same in every process (unlike ``hash()``)."""
    return int.from_bytes(blake2b(f"{namespace}\x1f{text}".encode(), digest_size=8).digest(), "little")


def _add_hashed(out: np.ndarray, offset: int, dim: int, namespace: str, text: str, weight: float,
                probes: int) -> None:
    """Add ``weight`` to ``probes`` signed buckets of ``out[offset:offset+dim]`` chosen by the text's hash
    (20 bits per probe: a sign bit and the bucket)."""
    bits = stable_hash64(namespace, text)
    for probe in range(probes):
        chunk = (bits >> (20 * probe)) & 0xFFFFF
        sign = 1.0 if chunk & 1 else -1.0
        out[offset + (chunk >> 1) % dim] += sign * weight


def _categorical(out: np.ndarray, offset: int, dim: int, namespace: str, value: str | None) -> None:
    text = normalise_text(value)
    if text:
        _add_hashed(out, offset, dim, namespace, text, 1.0 / math.sqrt(2.0), probes=2)


def _bag(out: np.ndarray, offset: int, dim: int, namespace: str, items: list[str] | frozenset[str]) -> None:
    """Signed hashed counts of the items, L2-normalised (so a long skill list does not dominate)."""
    for item in sorted(items):  # sorted: float sums in the same order whatever the set's iteration order
        _add_hashed(out, offset, dim, namespace, item, 1.0, probes=1)
    block = out[offset:offset + dim]
    norm = float(np.sqrt(np.dot(block, block)))
    if norm > 0.0:
        block /= norm


# Six fixed projection directions (a Fibonacci sphere: spread evenly, no RNG whose stream could change).
def _fibonacci_directions(count: int) -> np.ndarray:
    golden = math.pi * (3.0 - math.sqrt(5.0))
    rows = []
    for i in range(count):
        z = 1.0 - 2.0 * (i + 0.5) / count
        r = math.sqrt(1.0 - z * z)
        rows.append((r * math.cos(golden * i), r * math.sin(golden * i), z))
    return np.array(rows, dtype=np.float64)


_GEO_DIRECTIONS = _fibonacci_directions(6)
# Radians of phase per radian of arc: 3 → continents, 15 → regions (~400 km), 75 → cities (~80 km).
_GEO_SCALES = np.array([3.0, 3.0, 15.0, 15.0, 75.0, 75.0])


def _unit_xyz(lat: float, lon: float) -> np.ndarray:
    phi, lam = math.radians(lat), math.radians(lon)
    return np.array([math.cos(phi) * math.cos(lam), math.cos(phi) * math.sin(lam), math.sin(phi)])


def _geo(out: np.ndarray, offset: int, geo: tuple[float, float] | None) -> None:
    if geo is None:
        return
    xyz = _unit_xyz(float(geo[0]), float(geo[1]))
    phase = (_GEO_DIRECTIONS @ xyz) * _GEO_SCALES
    out[offset] = 1.0
    out[offset + 1:offset + 4] = xyz
    # Each sin/cos pair has norm 1; 1/sqrt(6) keeps the whole block's norm comparable to the other blocks.
    out[offset + 4:offset + 10] = np.sin(phase) / math.sqrt(6.0)
    out[offset + 10:offset + 16] = np.cos(phase) / math.sqrt(6.0)


# ---- full node features ------------------------------------------------------------------------------------
def encode_profile_fields(profile: Profile | None) -> np.ndarray:
    """The 240 profile-field features of :func:`encode_node` (zeros for None)."""
    out = np.zeros(PROFILE_FIELDS_DIM, dtype=np.float64)
    if profile is not None:
        offset = 0
        _categorical(out, offset, COMPANY_DIM, "company", profile.company)
        offset += COMPANY_DIM
        _categorical(out, offset, SCHOOL_DIM, "school", profile.school)
        offset += SCHOOL_DIM
        _categorical(out, offset, INDUSTRY_DIM, "industry", profile.industry)
        offset += INDUSTRY_DIM
        _bag(out, offset, TITLE_DIM, "title", title_tokens(profile.title))
        offset += TITLE_DIM
        _bag(out, offset, SKILLS_DIM, "skill", skill_set(profile.skills))
        offset += SKILLS_DIM
        _geo(out, offset, profile.geo)
    return out.astype(np.float32)


def profile_flags(profile: Profile | None, signed_up: bool = False) -> np.ndarray:
    """(6,) float32: signed up, share of the 6 fields given, has company, has school, has skills, has geo."""
    out = np.zeros(PROFILE_FLAGS_DIM, dtype=np.float32)
    if profile is None:
        out[0] = float(signed_up)
        return out
    given = [getattr(profile, name) is not None for name in Profile.FIELDS]
    out[0] = 1.0  # a profile exists, so the user signed up
    out[1] = sum(given) / len(given)
    out[2] = float(bool(normalise_text(profile.company)))
    out[3] = float(bool(normalise_text(profile.school)))
    out[4] = float(bool(skill_set(profile.skills)))
    out[5] = float(profile.geo is not None)
    return out


def encode_degrees(degrees: np.ndarray) -> np.ndarray:
    """(n, 10) float32 degree features of many users at once (vectorised: the embedder's hot path)."""
    degree = np.maximum(np.asarray(degrees, dtype=np.int64), 0)
    out = np.zeros((degree.shape[0], DEGREE_DIM), dtype=np.float32)
    out[:, 0] = (np.log1p(degree.astype(np.float64)) * _LOG_DEGREE_SCALE).astype(np.float32)
    # Bucket b holds degrees in [2^(b-1), 2^b): 0 → 0, 1 → 1, 2-3 → 2, ..., 128+ → 8.
    bucket = np.zeros(degree.shape[0], dtype=np.int64)
    positive = degree > 0
    bucket[positive] = np.minimum(np.floor(np.log2(degree[positive])).astype(np.int64) + 1, _DEGREE_BUCKETS - 1)
    out[np.arange(degree.shape[0]), 1 + bucket] = 1.0
    return out


def encode_activity(degree: int, signed_up: bool = False, profile: Profile | None = None) -> np.ndarray:
    """(16,) float32 activity features: degree (log1p, power-of-two bucket) and profile-completeness flags
    (``signed_up`` matters only without a profile: a profile implies a sign-up)."""
    return np.concatenate([encode_degrees(np.array([degree]))[0], profile_flags(profile, signed_up)])


def encode_profile_part(profile: Profile | None) -> np.ndarray:
    """(NODE_FEATURE_DIM,) float32 :func:`encode_node` with zeros in the degree slots: what the embedder
    caches per user, since only the degree part changes with every new connection."""
    out = np.zeros(NODE_FEATURE_DIM, dtype=np.float32)
    out[:PROFILE_FIELDS_DIM] = encode_profile_fields(profile)
    out[DEGREE_SLICE.stop:] = profile_flags(profile)
    return out


def encode_node(profile: Profile | None, degree: int) -> np.ndarray:
    """(NODE_FEATURE_DIM,) float32 input features of a user (see the module doc for the layout)."""
    out = encode_profile_part(profile)
    out[DEGREE_SLICE] = encode_degrees(np.array([degree]))[0]
    return out


# ---- compact profile encoding (two-tower model) --------------------------------------------------------------
def encode_profile_compact(profile: Profile | None) -> np.ndarray:
    """(32,) float32: company 8, school 6, industry 4, title 4, skills 6 (hashed as in :func:`encode_node`,
    fewer buckets) and geo 4 (present flag and unit-sphere xyz)."""
    out = np.zeros(PROFILE_FEATURE_DIM, dtype=np.float64)
    if profile is not None:
        _categorical(out, 0, 8, "company", profile.company)
        _categorical(out, 8, 6, "school", profile.school)
        _categorical(out, 14, 4, "industry", profile.industry)
        _bag(out, 18, 4, "title", title_tokens(profile.title))
        _bag(out, 22, 6, "skill", skill_set(profile.skills))
        if profile.geo is not None:
            out[28] = 1.0
            out[29:32] = _unit_xyz(float(profile.geo[0]), float(profile.geo[1]))
    return out.astype(np.float32)
