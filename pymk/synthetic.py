"""Seeded synthetic social networks and behaviour, so every PYMK ranking feature has signal to find.

- :func:`synthetic_network` makes a whole input stream: sign-ups with profiles, connections formed by
  triadic closure, homophily and a few long-range links (with preferential attachment, so degrees are
  heavy-tailed), later removals, profile views that precede connections plus noise views, dismissals of
  plausible candidates that then never connect, and engagements with community content.
- :func:`behaviour_for_replay` adds profiles, views, dismissals and engagements to a real graph's
  connections (real data has none), using only the past when it makes profiles follow the graph.

Pure code (numpy and the standard library, no Kafka). Deterministic for a seed: a numpy Generator makes the
bulk draws and a ``random.Random`` seeded from it makes the scalar draws of the time-ordered loops (a
stdlib call costs ~30 ns, a scalar numpy call ~1 µs, and the loops make millions of them). No global state.

Time is epoch milliseconds. Synthetic user ids are ``0 .. n_users-1`` in random order of sign-up; content
items live in their own id space from ``item_id_base`` (10**9 by default), so an item is never a user.
"""

from __future__ import annotations

import gc
import heapq
import math
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import chain

import numpy as np

from pymk.events import (
    ConnectionEvent,
    DismissalEvent,
    EngagementEvent,
    InputEvent,
    Profile,
    ProfileViewEvent,
    UserEvent,
)

SECOND_MS = 1_000
MINUTE_MS = 60 * SECOND_MS
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS

# Output order at equal ts: a sign-up before anything its user does, a removal before a re-add.
_RANK_USER, _RANK_REMOVE, _RANK_ADD, _RANK_VIEW, _RANK_DISMISS, _RANK_ENGAGE = range(6)

# ---------------------------------------------------------------------------------------------------------
# Vocabulary: (industry, roles, industry skills, company-name suffixes). Skills are industry-specific so
# profile similarity (skills, title) carries the same community signal as the industry field.
_INDUSTRIES: tuple[tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]], ...] = (
    ("software", ("software engineer", "data engineer", "data scientist", "product manager",
                  "devops engineer", "frontend developer", "machine learning engineer"),
     ("python", "java", "kubernetes", "sql", "react", "go", "distributed systems", "machine learning",
      "aws", "docker", "typescript", "kafka", "spark", "rust"),
     ("Labs", "Systems", "Software", "Technologies", "Cloud")),
    ("finance", ("financial analyst", "investment banker", "portfolio manager", "risk analyst",
                 "accountant", "actuary"),
     ("financial modeling", "valuation", "risk management", "accounting", "bloomberg", "derivatives",
      "credit analysis", "audit", "portfolio management", "forecasting", "ifrs", "fixed income"),
     ("Capital", "Bank", "Partners", "Investments", "Financial")),
    ("healthcare", ("nurse", "physician", "pharmacist", "clinical researcher", "health administrator",
                    "physiotherapist"),
     ("patient care", "clinical research", "pharmacology", "emergency medicine", "healthcare management",
      "medical coding", "epidemiology", "nursing", "surgery", "telemedicine", "public health", "ehr systems"),
     ("Health", "Clinic", "Medical", "Care", "Hospital")),
    ("education", ("teacher", "lecturer", "curriculum designer", "school counselor", "education researcher",
                   "tutor"),
     ("curriculum design", "classroom management", "e-learning", "pedagogy", "assessment",
      "special education", "instructional design", "tutoring", "academic writing", "stem education",
      "lesson planning"),
     ("Academy", "Learning", "Education", "Schools", "Institute")),
    ("marketing", ("marketing manager", "growth marketer", "brand strategist", "content writer",
                   "seo specialist", "social media manager"),
     ("seo", "content marketing", "brand strategy", "google analytics", "copywriting", "social media",
      "email marketing", "market research", "a/b testing", "ppc advertising", "crm"),
     ("Media", "Agency", "Creative", "Brands", "Digital")),
    ("manufacturing", ("process engineer", "quality engineer", "plant manager", "mechanical engineer",
                       "production planner", "maintenance technician"),
     ("lean manufacturing", "six sigma", "cad", "quality control", "supply chain", "autocad",
      "plc programming", "root cause analysis", "process optimization", "iso 9001", "cnc machining"),
     ("Industries", "Manufacturing", "Works", "Components", "Motors")),
    ("retail", ("store manager", "merchandiser", "buyer", "category manager", "sales associate",
                "e-commerce manager"),
     ("merchandising", "inventory management", "retail sales", "visual merchandising", "customer service",
      "pricing", "category management", "pos systems", "e-commerce", "vendor management"),
     ("Stores", "Retail", "Market", "Outlet", "Goods")),
    ("consulting", ("management consultant", "business analyst", "strategy consultant", "engagement manager",
                    "it consultant"),
     ("strategy", "business analysis", "stakeholder management", "change management", "process improvement",
      "due diligence", "powerpoint", "operating models", "benchmarking", "workshop facilitation"),
     ("Consulting", "Advisors", "Associates", "Group", "Partners")),
    ("energy", ("petroleum engineer", "energy analyst", "solar engineer", "grid engineer", "geologist"),
     ("renewable energy", "power systems", "solar pv", "oil and gas", "energy modeling", "grid integration",
      "geology", "hse", "reservoir engineering", "battery storage"),
     ("Energy", "Power", "Renewables", "Utilities", "Resources")),
    ("media", ("journalist", "editor", "video producer", "photographer", "graphic designer", "producer"),
     ("journalism", "video editing", "adobe creative suite", "storytelling", "photography", "broadcasting",
      "editing", "motion graphics", "podcasting", "scriptwriting"),
     ("Studios", "Press", "Broadcasting", "Pictures", "News")),
    ("legal", ("lawyer", "paralegal", "legal counsel", "compliance officer", "patent attorney"),
     ("litigation", "contract law", "legal research", "corporate law", "intellectual property",
      "regulatory affairs", "mergers and acquisitions", "legal writing", "arbitration", "employment law"),
     ("Law", "Legal", "Attorneys", "Chambers", "LLP")),
    ("biotech", ("research scientist", "lab technician", "bioinformatician", "regulatory specialist",
                 "process scientist"),
     ("molecular biology", "pcr", "cell culture", "bioinformatics", "crispr", "gmp", "protein purification",
      "genomics", "assay development", "flow cytometry"),
     ("Bio", "Therapeutics", "Genomics", "Pharma", "Biosciences")),
    ("logistics", ("logistics coordinator", "supply chain analyst", "warehouse manager", "fleet manager",
                   "procurement specialist"),
     ("logistics", "warehouse management", "procurement", "freight", "sap", "demand planning",
      "transportation management", "inventory optimization", "customs", "route planning"),
     ("Logistics", "Freight", "Shipping", "Transport", "Express")),
    ("real estate", ("real estate agent", "property manager", "appraiser", "real estate analyst",
                     "leasing consultant"),
     ("property management", "real estate valuation", "leasing", "commercial real estate", "property law",
      "mortgage", "real estate development", "tenant relations", "market analysis"),
     ("Realty", "Properties", "Estates", "Homes", "Land")),
    ("government", ("policy analyst", "civil servant", "program manager", "urban planner", "diplomat"),
     ("public policy", "policy analysis", "grant writing", "urban planning", "public administration",
      "regulation", "international relations", "budgeting", "community engagement"),
     ("Agency", "Office", "Authority", "Department", "Council")),
)
_GENERAL_SKILLS = ("communication", "leadership", "project management", "teamwork", "problem solving",
                   "public speaking", "microsoft excel", "time management", "negotiation", "mentoring",
                   "english", "spanish", "data analysis", "presentation")
_SENIORITY = ("junior", "", "", "senior", "senior", "lead", "principal")
_NAME_WORDS = ("Acme", "Nimbus", "Vertex", "Blue Harbor", "Quantum", "Northwind", "Silverline", "Redwood",
               "Helix", "Orbit", "Pioneer", "Summit", "Lumen", "Cobalt", "Evergreen", "Atlas", "Nova",
               "Granite", "Meridian", "Sterling", "Zenith", "Crescent", "Falcon", "Ironwood", "Juniper",
               "Keystone", "Maple", "Oakridge", "Polaris", "Aurora", "Beacon", "Cascade", "Delta", "Ember",
               "Fjord", "Glacier", "Horizon", "Indigo", "Jade", "Kestrel")
_SCHOOL_PATTERNS = ("University of {}", "{} Institute of Technology", "{} State University", "{} College",
                    "{} School of Business", "{} Polytechnic")
# Real city centres (name, lat, lon), biggest first; more cities get generated names and centres.
_CITIES: tuple[tuple[str, float, float], ...] = (
    ("Tokyo", 35.68, 139.69), ("New York", 40.71, -74.01), ("London", 51.51, -0.13),
    ("Sao Paulo", -23.55, -46.63), ("Mumbai", 19.08, 72.88), ("Shanghai", 31.23, 121.47),
    ("Paris", 48.86, 2.35), ("Los Angeles", 34.05, -118.24), ("Bangalore", 12.97, 77.59),
    ("Berlin", 52.52, 13.41), ("Toronto", 43.65, -79.38), ("Sydney", -33.87, 151.21),
    ("Singapore", 1.35, 103.82), ("Chicago", 41.88, -87.63), ("San Francisco", 37.77, -122.42),
    ("Madrid", 40.42, -3.70), ("Mexico City", 19.43, -99.13), ("Seoul", 37.57, 126.98),
    ("Amsterdam", 52.37, 4.90), ("Lagos", 6.52, 3.38), ("Dubai", 25.20, 55.27), ("Seattle", 47.61, -122.33),
    ("Boston", 42.36, -71.06), ("Stockholm", 59.33, 18.07), ("Milan", 45.46, 9.19), ("Warsaw", 52.23, 21.01),
    ("Nairobi", -1.29, 36.82), ("Buenos Aires", -34.60, -58.38), ("Istanbul", 41.01, 28.98),
    ("Jakarta", -6.21, 106.85), ("Cairo", 30.04, 31.24), ("Zurich", 47.38, 8.54), ("Austin", 30.27, -97.74),
    ("Dublin", 53.35, -6.26), ("Lisbon", 38.72, -9.14), ("Tel Aviv", 32.09, 34.78),
    ("Cape Town", -33.92, 18.42), ("Montreal", 45.50, -73.57), ("Hong Kong", 22.32, 114.17),
    ("Melbourne", -37.81, 144.96),
)
_CITY_SUFFIXES = ("ton", "ville", "burg", "field", "port", "haven", "ford", "mouth")

# Homophily: which shared community a "meet someone like me" connection goes through.
_DIM_COMPANY, _DIM_SCHOOL, _DIM_CITY, _DIM_INDUSTRY = range(4)
_HOMOPHILY_DIMS = (0.40, 0.25, 0.25, 0.10)  # company, school, city, industry
# Which community a content item belongs to, and which of a user's communities an engagement goes to.
_CONTENT_DIMS = (0.50, 0.10, 0.15, 0.25)
_RANDOM_ENGAGEMENT = 0.10  # share of engagements with any item (popular ones), not the user's communities


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of :func:`synthetic_network`. Community counts left ``None`` scale with ``n_users``
    (see :meth:`scaled`). Rates "per user" are averages over the whole window."""

    n_users: int = 10_000
    seed: int = 0
    start_ms: int = 1_700_000_000_000
    duration_days: float = 90.0
    avg_degree: float = 20.0  # target mean degree of the final graph (after removals)
    n_companies: int | None = None  # default n_users // 80
    n_schools: int | None = None  # default n_users // 250
    n_cities: int | None = None  # default sqrt(n_users) / 3
    n_industries: int | None = None  # default n_users // 200, at most 15 (the vocabulary)
    n_items: int | None = None  # default n_users // 5
    company_zipf: float = 0.8  # company sizes ∝ rank^-a, so there are a few big employers
    initial_share: float = 0.2  # users who sign up on the first day; the rest sign up over the window
    onboarding_share: float = 0.25  # share of connections made in a burst just after the user signs up
    triadic_share: float = 0.5  # share of connection attempts that try to close a triangle
    closure_prob: float = 0.35  # per mutual friend: a friend-of-a-friend is accepted w.p. 1-(1-p)^mutual
    homophily: float = 0.85  # of the other attempts, share that go through a shared community (rest random)
    sociability_alpha: float = 1.5  # Pareto tail of how often a user reaches out (smaller: bigger hubs)
    max_sociability: int = 100
    removal_rate: float = 0.03  # share of connections removed later (mean 20 days after)
    view_before_connect: float = 0.5  # share of connections preceded by profile view(s) within the pair
    noise_views_per_user: float = 3.0  # views that are not followed by a connection
    dismissals_per_user: float = 1.0  # dismissed plausible candidates (who then never connect)
    engagements_per_user: float = 5.0
    job_change_rate: float = 0.05  # share of users who later change company (a second UserEvent)
    profileless_share: float = 0.0  # users who never send a UserEvent (they still connect and act)
    item_id_base: int = 10**9

    def __post_init__(self) -> None:
        if self.n_users < 2:
            raise ValueError("n_users must be at least 2")
        if self.duration_days <= 0 or self.avg_degree < 0:
            raise ValueError("duration_days must be positive and avg_degree non-negative")
        for name in ("initial_share", "onboarding_share", "triadic_share", "closure_prob", "homophily",
                     "removal_rate", "view_before_connect", "job_change_rate", "profileless_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        if self.item_id_base < self.n_users:
            raise ValueError("item_id_base must be above every user id")

    @property
    def end_ms(self) -> int:
        return self.start_ms + int(self.duration_days * DAY_MS)

    def scaled(self) -> SyntheticConfig:
        """This config with every ``None`` community count filled in from ``n_users``."""
        n = self.n_users
        return replace(
            self,
            n_companies=self.n_companies or max(2, n // 80),
            n_schools=self.n_schools or max(2, n // 250),
            n_cities=self.n_cities or max(2, round(math.sqrt(n) / 3)),
            n_industries=min(self.n_industries or max(2, n // 200), len(_INDUSTRIES)),
            n_items=self.n_items or max(20, n // 5),
        )


# ---------------------------------------------------------------------------------------------------------
# Latent world: communities and how users are spread over them.

@dataclass
class _World:
    industries: list[int]  # index into _INDUSTRIES, per industry id
    city_names: list[str]
    city_lat: list[float]
    city_lon: list[float]
    city_weights: np.ndarray
    company_names: list[str]
    company_industry: np.ndarray
    company_city: np.ndarray
    company_weights: np.ndarray
    companies_by_industry: list[list[int]]
    school_names: list[str]
    school_weights: np.ndarray
    schools_by_city: list[list[int]]


def _zipf(n: int, a: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1, dtype=float) ** a
    return weights / weights.sum()


def _unique(name: str, taken: set[str]) -> str:
    candidate, k = name, 2
    while candidate in taken:
        candidate, k = f"{name} {k}", k + 1
    taken.add(candidate)
    return candidate


def _make_world(n_companies: int, n_schools: int, n_cities: int, n_industries: int, company_zipf: float,
                rng: np.random.Generator) -> _World:
    industries = sorted(rng.choice(len(_INDUSTRIES), size=n_industries, replace=False).tolist())
    industry_weights = _zipf(n_industries, 0.7)

    city_names = [c[0] for c in _CITIES[:n_cities]]
    city_lat = [c[1] for c in _CITIES[:n_cities]]
    city_lon = [c[2] for c in _CITIES[:n_cities]]
    taken = set(city_names)
    for k in range(len(city_names), n_cities):
        word = _NAME_WORDS[k % len(_NAME_WORDS)] + _CITY_SUFFIXES[(k // len(_NAME_WORDS)) % len(_CITY_SUFFIXES)]
        city_names.append(_unique(word, taken))
        city_lat.append(round(float(rng.uniform(-40.0, 60.0)), 2))
        city_lon.append(round(float(rng.uniform(-130.0, 150.0)), 2))
    city_weights = _zipf(n_cities, 0.9)

    company_industry = rng.choice(n_industries, size=n_companies, p=industry_weights)
    company_city = rng.choice(n_cities, size=n_companies, p=city_weights)
    taken = set()
    company_names = []
    for c in range(n_companies):
        suffixes = _INDUSTRIES[industries[company_industry[c]]][3]
        word = _NAME_WORDS[int(rng.integers(len(_NAME_WORDS)))]
        company_names.append(_unique(f"{word} {suffixes[int(rng.integers(len(suffixes)))]}", taken))
    companies_by_industry: list[list[int]] = [[] for _ in range(n_industries)]
    for c, ind in enumerate(company_industry.tolist()):
        companies_by_industry[ind].append(c)

    school_city = rng.choice(n_cities, size=n_schools, p=city_weights)
    taken = set()
    school_names = []
    schools_by_city: list[list[int]] = [[] for _ in range(n_cities)]
    for s, city in enumerate(school_city.tolist()):
        pattern = _SCHOOL_PATTERNS[int(rng.integers(len(_SCHOOL_PATTERNS)))]
        school_names.append(_unique(pattern.format(city_names[city]), taken))
        schools_by_city[city].append(s)

    return _World(industries, city_names, city_lat, city_lon, city_weights, company_names, company_industry,
                  company_city, _zipf(n_companies, company_zipf), companies_by_industry, school_names,
                  _zipf(n_schools, 0.7), schools_by_city)


def _assign_users(world: _World, n: int, rng: np.random.Generator
                  ) -> tuple[list[int], list[int], list[int], list[int]]:
    """Latent (company, school, city, industry) per user, correlated the way real ones are: industry and
    city mostly follow the employer, the school is often in the home city."""
    n_industries, n_cities = len(world.industries), len(world.city_names)
    company = rng.choice(len(world.company_names), size=n, p=world.company_weights)
    industry = np.where(rng.random(n) < 0.9, world.company_industry[company], rng.integers(n_industries, size=n))
    city = np.where(rng.random(n) < 0.6, world.company_city[company],
                    rng.choice(n_cities, size=n, p=world.city_weights))
    school = rng.choice(len(world.school_names), size=n, p=world.school_weights)
    local = rng.random(n) < 0.5
    pick = rng.random(n)
    for i in np.nonzero(local)[0].tolist():
        options = world.schools_by_city[city[i]]
        if options:
            school[i] = options[int(pick[i] * len(options))]
    return company.tolist(), school.tolist(), city.tolist(), industry.tolist()


def _title(world: _World, industry: int, rnd: random.Random, promoted: bool = False) -> str:
    roles = _INDUSTRIES[world.industries[industry]][1]
    seniority = _SENIORITY[rnd.randrange(3, len(_SENIORITY)) if promoted else rnd.randrange(len(_SENIORITY))]
    role = roles[rnd.randrange(len(roles))]
    return f"{seniority} {role}" if seniority else role


def _sample(pool: Sequence[str], k: int, rnd: random.Random) -> list[str]:
    # Partial Fisher-Yates: random.sample pays an ABC isinstance check per call, which dominates here.
    items = list(pool)
    for i in range(k):
        j = i + int(rnd.random() * (len(items) - i))
        items[i], items[j] = items[j], items[i]
    return items[:k]


def _skills(world: _World, industry: int, rnd: random.Random) -> tuple[str, ...]:
    vocab = _INDUSTRIES[world.industries[industry]][2]
    k = 3 + int(rnd.random() * 6)
    n_general = int(rnd.random() * (min(2, k - 1) + 1))
    return tuple(_sample(vocab, k - n_general, rnd) + _sample(_GENERAL_SKILLS, n_general, rnd))


def _geo(world: _World, city: int, rnd: random.Random) -> tuple[float, float]:
    # ~5 km of jitter: people of one city are close, cities are far apart.
    lat = min(89.9, max(-89.9, world.city_lat[city] + rnd.gauss(0.0, 0.05)))
    lon = world.city_lon[city] + rnd.gauss(0.0, 0.05) / max(0.2, math.cos(math.radians(lat)))
    lon = (lon + 180.0) % 360.0 - 180.0
    return round(lat, 5), round(lon, 5)


def _profile(world: _World, company: int, school: int, city: int, industry: int, rnd: random.Random) -> Profile:
    return Profile(company=world.company_names[company], school=world.school_names[school],
                   industry=_INDUSTRIES[world.industries[industry]][0], title=_title(world, industry, rnd),
                   skills=_skills(world, industry, rnd), geo=_geo(world, city, rnd))


def _make_items(world: _World, groups: Sequence[Sequence[int]], n_items: int, rng: np.random.Generator
                ) -> list[list[list[int]]]:
    """Items per (dimension, community): each item belongs to one community of one dimension; bigger
    communities get more items. Returns ``items[dim][group] -> [item index]``."""
    sizes = (len(world.company_names), len(world.school_names), len(world.city_names), len(world.industries))
    items: list[list[list[int]]] = [[[] for _ in range(size)] for size in sizes]
    dims = rng.choice(4, size=n_items, p=_CONTENT_DIMS)
    for d in range(4):
        members = np.bincount(np.asarray(groups[d]), minlength=sizes[d]).astype(float) + 0.5
        which = np.nonzero(dims == d)[0]
        chosen = rng.choice(sizes[d], size=len(which), p=members / members.sum())
        for item, group in zip(which.tolist(), chosen.tolist(), strict=True):
            items[d][group].append(item)
    return items


def _pick_item(items: list[list[list[int]]], groups: Sequence[int], n_items: int, rnd: random.Random) -> int:
    r = rnd.random
    if r() >= _RANDOM_ENGAGEMENT:
        x, d = r(), 0
        while d < 3 and x >= _CONTENT_DIMS[d]:
            x -= _CONTENT_DIMS[d]
            d += 1
        pool = items[d][groups[d]]
        if pool:
            return pool[int(r() * r() * len(pool))]  # r*r skews to each community's first (popular) items
    return int(r() * r() * n_items)


# ---------------------------------------------------------------------------------------------------------
# Output

def _sorted_events(objs: list[InputEvent], ts: list[int], rank: list[int], a: list[int], b: list[int]
                   ) -> list[InputEvent]:
    """``objs`` in (ts, kind rank, first id, second id) order; a stable numpy sort, so fully deterministic."""
    order = np.lexsort((np.asarray(b, dtype=np.int64), np.asarray(a, dtype=np.int64),
                        np.asarray(rank, dtype=np.int8), np.asarray(ts, dtype=np.int64)))
    return [objs[i] for i in order.tolist()]


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while millions of objects are built: each full collection walks
    every live container, which makes bulk generation quadratic-ish (it doubles the time at 100k users).
    Nothing built here forms reference cycles; the previous state is restored."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _seeded(seed: int) -> tuple[np.random.Generator, random.Random]:
    rng = np.random.default_rng(seed)
    return rng, random.Random(int(rng.integers(2**62)))


# ---------------------------------------------------------------------------------------------------------
# The synthetic network

def synthetic_network(config: SyntheticConfig) -> list[InputEvent]:
    """Every event of a seeded synthetic network, sorted by ts (ties: sign-up, remove, add, view, dismissal,
    engagement, then by ids). All ts are in ``[start_ms, end_ms]``; every id an event names has signed up at
    or before it, except users of ``profileless_share`` (none by default), who never send a UserEvent."""
    with _gc_paused():
        return _synthetic_network(config)


def _synthetic_network(config: SyntheticConfig) -> list[InputEvent]:
    cfg = config.scaled()
    assert cfg.n_companies and cfg.n_schools and cfg.n_cities and cfg.n_industries and cfg.n_items
    n, start, end = cfg.n_users, cfg.start_ms, cfg.end_ms
    span = end - start
    rng, rnd = _seeded(cfg.seed)
    r = rnd.random

    world = _make_world(cfg.n_companies, cfg.n_schools, cfg.n_cities, cfg.n_industries, cfg.company_zipf, rng)
    company, school, city, industry = _assign_users(world, n, rng)
    groups = (company, school, city, industry)

    # Sign-ups: some on day one, the rest spread over the window but early enough to make friends.
    first_day = rng.random(n) < cfg.initial_share
    signup_np = np.where(first_day, start + rng.integers(0, min(DAY_MS, span) + 1, size=n),
                         start + rng.integers(0, int(span * 0.85) + 1, size=n)).astype(np.int64)
    signup = signup_np.tolist()
    order = np.argsort(signup_np, kind="stable").tolist()
    signup_sorted = [signup[u] for u in order]

    # Job changes (applied in the loop, so later colleagues are the new ones).
    jobs: list[tuple[int, int, int]] = []  # (ts, user, new company)
    movers = np.nonzero(rng.random(n) < cfg.job_change_rate)[0].tolist()
    for u in movers:
        earliest = signup[u] + 7 * DAY_MS
        if earliest >= end:
            continue
        same = world.companies_by_industry[industry[u]]
        new = same[rnd.randrange(len(same))] if r() < 0.7 and len(same) > 1 else rnd.randrange(cfg.n_companies)
        if new != company[u]:
            jobs.append((earliest + int(r() * (end - earliest)), u, new))
    jobs.sort()

    # Connection attempts: onboarding bursts right after sign-up, plus organic attempts whose rate grows
    # with the number of signed-up users. Adds are scaled up so removals leave the target mean degree.
    target_adds = round(n * cfg.avg_degree / 2 / (1.0 - 0.5 * cfg.removal_rate))
    n_onboard = round(cfg.onboarding_share * target_adds)
    per_user = rng.poisson(n_onboard / n, size=n)
    onboard_u = np.repeat(np.arange(n), per_user)
    onboard_t = signup_np[onboard_u] + MINUTE_MS + rng.exponential(DAY_MS, size=len(onboard_u)).astype(np.int64)
    keep = onboard_t <= end
    onboard_u, onboard_t = onboard_u[keep], onboard_t[keep]
    n_organic = max(0, target_adds - len(onboard_u))
    edges = np.linspace(start, end, 2049)
    alive = np.searchsorted(np.asarray(signup_sorted), (edges[:-1] + edges[1:]) / 2, side="right").astype(float)
    bins = rng.choice(2048, size=n_organic, p=alive / alive.sum())
    organic_t = (edges[bins] + rng.random(n_organic) * (edges[1] - edges[0])).astype(np.int64)
    att_t_np = np.concatenate([onboard_t, np.minimum(organic_t, end)])
    att_u_np = np.concatenate([onboard_u, np.full(n_organic, -1)])
    att_order = np.argsort(att_t_np, kind="stable")
    att_t, att_u = att_t_np[att_order].tolist(), att_u_np[att_order].tolist()
    n_att = len(att_t)

    # State of the growing graph. Token lists implement preferential attachment: a user is in the list once
    # at sign-up plus once per edge gained, so a uniform pick is ∝ degree + 1. Industries are big enough
    # that a uniform pick among members does (saves two appends per edge).
    adj_l: list[list[int]] = [[] for _ in range(n)]
    adj_s: list[set[int]] = [set() for _ in range(n)]
    blocked: set[int] = set()  # pairs (a*n+b, a<b) dismissed: they never connect afterwards
    glob: list[int] = []
    # Sociability (Pareto, capped): some people reach out far more than others; with preferential attachment
    # on the receiving side this makes hubs.
    social_tokens: list[int] = []
    sociability = np.minimum(cfg.max_sociability, 1 + rng.pareto(cfg.sociability_alpha, size=n)).astype(int).tolist()
    tok_company: list[list[int]] = [[] for _ in range(cfg.n_companies)]
    tok_school: list[list[int]] = [[] for _ in range(cfg.n_schools)]
    tok_city: list[list[int]] = [[] for _ in range(cfg.n_cities)]
    tok_industry: list[list[int]] = [[] for _ in range(cfg.n_industries)]
    cur_company = list(company)
    mine: list[tuple[list[int], list[int], list[int]]] = [
        (tok_company[company[u]], tok_school[school[u]], tok_city[city[u]]) for u in range(n)]
    accept = [1.0 - (1.0 - cfg.closure_prob) ** m for m in range(64)]
    tri = cfg.triadic_share
    homo = tri + (1.0 - tri) * cfg.homophily
    d_company, d_school, d_city = (sum(_HOMOPHILY_DIMS[: k + 1]) for k in range(3))

    add_t: list[int] = []
    add_u: list[int] = []
    add_v: list[int] = []
    rem_t: list[int] = []
    rem_u: list[int] = []
    rem_v: list[int] = []
    nview_t: list[int] = []
    nview_u: list[int] = []
    nview_v: list[int] = []
    dis_t: list[int] = []
    dis_u: list[int] = []
    dis_v: list[int] = []
    removals: list[tuple[int, int, int]] = []  # heap of (ts, u, v)
    mean_removal = 20 * DAY_MS
    p_noise = cfg.noise_views_per_user * n / max(1, n_att)
    p_dismiss = cfg.dismissals_per_user * n / max(1, n_att)
    sp = jp = 0  # signed-up prefix of `order`; applied job changes

    def plausible(u: int) -> int:
        """A friend-of-a-friend or a colleague of u who is not a friend: a candidate PYMK would show."""
        nu = adj_l[u]
        if nu and r() < 0.7:
            nw = adj_l[nu[int(r() * len(nu))]]
            v = nw[int(r() * len(nw))]
        else:
            toks = mine[u][0]
            if not toks:
                return -1
            v = toks[int(r() * len(toks))]
        return -1 if v == u or v in adj_s[u] else v

    for i in range(n_att):
        t = att_t[i]
        while sp < n and signup_sorted[sp] <= t:
            x = order[sp]
            glob.append(x)
            social_tokens.extend([x] * sociability[x])
            for toks in mine[x]:
                toks.append(x)
            tok_industry[industry[x]].append(x)
            sp += 1
        while jp < len(jobs) and jobs[jp][0] <= t:
            _, x, new = jobs[jp]
            cur_company[x] = new
            mine[x] = (tok_company[new], mine[x][1], mine[x][2])
            tok_company[new].append(x)
            jp += 1
        while removals and removals[0][0] <= t:
            tr, x, y = heapq.heappop(removals)
            adj_l[x].remove(y)
            adj_l[y].remove(x)
            adj_s[x].discard(y)
            adj_s[y].discard(x)
            rem_t.append(tr)
            if r() < 0.5:
                x, y = y, x
            rem_u.append(x)
            rem_v.append(y)
        u = att_u[i]
        if u < 0:
            if sp < 2:
                continue
            u = social_tokens[int(r() * len(social_tokens))] if r() < 0.5 else glob[int(r() * len(glob))]

        # Browsing that leads nowhere, and dismissals (which block the pair for good).
        if r() < p_noise:
            x = r()
            v = plausible(u) if x < 0.7 else order[int(r() * sp)]
            if v >= 0 and v != u and v not in adj_s[u]:
                nview_t.append(min(end, t + int(r() * 6 * HOUR_MS)))
                nview_u.append(u)
                nview_v.append(v)
        if r() < p_dismiss:
            v = plausible(u)
            if v >= 0:
                key = u * n + v if u < v else v * n + u
                if key not in blocked:
                    blocked.add(key)
                    dis_t.append(min(end, t + int(r() * 10 * MINUTE_MS)))
                    dis_u.append(u)
                    dis_v.append(v)

        su = adj_s[u]
        for _ in range(8):
            x = r()
            nu = adj_l[u]
            if x < tri and nu:  # triadic closure: more mutual friends, more likely
                nw = adj_l[nu[int(r() * len(nu))]]
                v = nw[int(r() * len(nw))]
                if v == u or v in su:
                    continue
                mutual = len(su & adj_s[v])
                if r() >= accept[mutual if mutual < 64 else 63]:
                    continue
            elif x < homo:  # homophily: someone from one of my communities (∝ their degree)
                y = r()
                if y < d_company:
                    toks = mine[u][0]
                elif y < d_school:
                    toks = mine[u][1]
                elif y < d_city:
                    toks = mine[u][2]
                else:
                    toks = tok_industry[industry[u]]
                v = toks[int(r() * len(toks))]
            else:  # long-range: anyone, half of the time ∝ degree
                v = glob[int(r() * len(glob))] if r() < 0.5 else order[int(r() * sp)]
            if v == u or v in su or (u * n + v if u < v else v * n + u) in blocked:
                continue
            adj_l[u].append(v)
            adj_l[v].append(u)
            su.add(v)
            adj_s[v].add(u)
            add_t.append(t)
            add_u.append(u)
            add_v.append(v)
            glob.append(u)
            glob.append(v)
            t_company, t_school, t_city = mine[u]
            t_company.append(u)
            t_school.append(u)
            t_city.append(u)
            t_company, t_school, t_city = mine[v]
            t_company.append(v)
            t_school.append(v)
            t_city.append(v)
            if r() < cfg.removal_rate:
                tr = t + HOUR_MS + int(rnd.expovariate(1.0 / mean_removal))
                if tr <= end:
                    heapq.heappush(removals, (tr, u, v))
            break

    # Views before connections: hours to days earlier, mostly by the one who then connects; never before
    # either sign-up (squeezed into the time both have been around when that is shorter).
    a_t, a_u, a_v = (np.asarray(x, dtype=np.int64) for x in (add_t, add_u, add_v))
    chosen = np.nonzero(rng.random(len(a_t)) < cfg.view_before_connect)[0]
    idx = np.repeat(chosen, rng.geometric(0.65, size=len(chosen)))
    first_of_pair = np.ones(len(idx), dtype=bool)
    first_of_pair[1:] = idx[1:] != idx[:-1]
    vt = a_t[idx]
    lo = np.maximum(signup_np[a_u[idx]], signup_np[a_v[idx]])
    ts = vt - np.exp(rng.uniform(math.log(HOUR_MS), math.log(4 * DAY_MS), size=len(idx))).astype(np.int64)
    squeeze = rng.random(len(idx))
    ts = np.where(ts < lo, lo + (squeeze * (vt - lo)).astype(np.int64), ts)
    by_initiator = np.where(first_of_pair, rng.random(len(idx)) < 0.75, rng.random(len(idx)) < 0.5)
    ok = vt > lo
    pview_u = np.where(by_initiator, a_u[idx], a_v[idx])[ok].tolist()
    pview_v = np.where(by_initiator, a_v[idx], a_u[idx])[ok].tolist()
    pview_t = ts[ok].tolist()

    # Engagements: heavy-tailed activity, items of the user's communities (company as of that time).
    activity = rng.lognormal(0.0, 0.8, size=n)
    counts = rng.poisson(cfg.engagements_per_user * activity / activity.mean())
    eng_u_np = np.repeat(np.arange(n), counts)
    eng_t_np = signup_np[eng_u_np] + (rng.random(len(eng_u_np)) * (end - signup_np[eng_u_np] + 1)).astype(np.int64)
    items = _make_items(world, groups, cfg.n_items, rng)
    moved = {u: (ts_, new) for ts_, u, new in jobs}
    eng_u, eng_t = eng_u_np.tolist(), eng_t_np.tolist()
    eng_item: list[int] = []
    for u, t in zip(eng_u, eng_t, strict=True):
        job = moved.get(u)
        comp = job[1] if job is not None and t >= job[0] else company[u]
        eng_item.append(cfg.item_id_base
                        + _pick_item(items, (comp, school[u], city[u], industry[u]), cfg.n_items, rnd))

    # Profiles last, from their own stream of draws.
    has_profile = (rng.random(n) >= cfg.profileless_share).tolist()
    user_ids = [u for u in range(n) if has_profile[u]]
    user_ts = [signup[u] for u in user_ids]
    users: list[InputEvent] = [
        UserEvent(u, signup[u], _profile(world, company[u], school[u], city[u], industry[u], rnd)) for u in user_ids
    ]
    for ts_, u, new in jobs:
        if has_profile[u]:
            users.append(UserEvent(u, ts_, Profile(company=world.company_names[new],
                                                   title=_title(world, industry[u], rnd, promoted=True))))
            user_ts.append(ts_)
            user_ids.append(u)

    view_u, view_v, view_t = pview_u + nview_u, pview_v + nview_v, pview_t + nview_t
    objs: list[InputEvent] = list(chain(
        users,
        (ConnectionEvent(x, y, "remove", t) for x, y, t in zip(rem_u, rem_v, rem_t, strict=True)),
        (ConnectionEvent(x, y, "add", t) for x, y, t in zip(add_u, add_v, add_t, strict=True)),
        (ProfileViewEvent(x, y, t) for x, y, t in zip(view_u, view_v, view_t, strict=True)),
        (DismissalEvent(x, y, t) for x, y, t in zip(dis_u, dis_v, dis_t, strict=True)),
        (EngagementEvent(x, y, t) for x, y, t in zip(eng_u, eng_item, eng_t, strict=True)),
    ))
    kinds = ((user_ts, _RANK_USER, user_ids, [0] * len(user_ids)), (rem_t, _RANK_REMOVE, rem_u, rem_v),
             (add_t, _RANK_ADD, add_u, add_v), (view_t, _RANK_VIEW, view_u, view_v),
             (dis_t, _RANK_DISMISS, dis_u, dis_v), (eng_t, _RANK_ENGAGE, eng_u, eng_item))
    return _sorted_events(objs, list(chain.from_iterable(k[0] for k in kinds)),
                          list(chain.from_iterable([k[1]] * len(k[0]) for k in kinds)),
                          list(chain.from_iterable(k[2] for k in kinds)),
                          list(chain.from_iterable(k[3] for k in kinds)))


# ---------------------------------------------------------------------------------------------------------
# Behaviour for a replay of a real graph

def behaviour_for_replay(connections: Sequence[tuple[int, int, int]], seed: int,
                         users: Iterable[int] | None = None, *,
                         view_before_connect: float = 0.5,
                         noise_views_per_user: float = 2.0,
                         dismissals_per_user: float = 0.5,
                         engagements_per_user: float = 4.0,
                         profile_updates_at: Sequence[int] = (1, 3, 10),
                         adopt_prob: float = 0.6,
                         n_items: int | None = None,
                         item_id_base: int = 10**9) -> list[InputEvent]:
    """Seeded synthetic behaviour for a real graph's ``connections`` ((u, v, ts_ms), any order; self-loops
    and repeats of a pair are ignored, the first interaction of a pair is its connection).

    Returns, sorted by ts:
    - a sign-up UserEvent per user (of ``connections`` and of ``users``) 1 ms before its first connection,
      so any ts-sorted merge delivers it first; users without connections sign up 1 ms before the first
      connection of the graph. Its profile is drawn from the prior (nothing about the user is known yet).
    - profile updates (only the fields that change) a little after the user's k-th connection for each k
      of ``profile_updates_at`` (a user with fewer connections updates once, after its last): company,
      school, city and industry each move, w.p. ``adopt_prob`` (less for the last three), to the label
      that is most over-represented among its neighbours then (votes / sqrt(global count), so big labels
      don't swallow the graph). Only strictly earlier connections count, so profiles follow graph
      communities without leaking the future. The lift is large on clustered graphs (ego-Facebook: future
      pairs share a company ~7x more often than random pairs) and small where structure is weak.
    - views between pairs that connect later (``view_before_connect`` of the connections, hours to days
      before, never before a sign-up) and noise views between pairs that never connect, half of them
      friends-of-friends at the time;
    - dismissals of friends-of-friends (at the time) that never connect;
    - engagements with items (ids from ``item_id_base``) of the user's communities as of that time.

    Delays ("hours before") are scaled down on graphs spanning less than 60 days (untimed files are
    replayed one connection per second) so behaviour stays between the connections it relates to.
    """
    with _gc_paused():
        return _behaviour_for_replay(
            connections, seed, users, view_before_connect=view_before_connect,
            noise_views_per_user=noise_views_per_user, dismissals_per_user=dismissals_per_user,
            engagements_per_user=engagements_per_user, profile_updates_at=tuple(profile_updates_at),
            adopt_prob=adopt_prob, n_items=n_items, item_id_base=item_id_base)


def _behaviour_for_replay(connections: Sequence[tuple[int, int, int]], seed: int, users: Iterable[int] | None,
                          *, view_before_connect: float, noise_views_per_user: float,
                          dismissals_per_user: float, engagements_per_user: float,
                          profile_updates_at: tuple[int, ...],
                          adopt_prob: float, n_items: int | None, item_id_base: int) -> list[InputEvent]:
    rng, rnd = _seeded(seed)
    r = rnd.random

    # Normalise: stable sort by time, first interaction of each unordered pair only.
    raw = sorted(connections, key=lambda c: c[2])
    pairs: set[tuple[int, int]] = set()
    conns: list[tuple[int, int, int]] = []
    index: dict[int, int] = {}
    ids: list[int] = []
    first: list[int] = []
    for a, b, ts in raw:
        a, b, ts = int(a), int(b), int(ts)
        pair = (a, b) if a < b else (b, a)
        if a == b or pair in pairs:
            continue
        pairs.add(pair)
        for x in (a, b):
            if x not in index:
                index[x] = len(ids)
                ids.append(x)
                first.append(ts)
        conns.append((index[a], index[b], ts))
    t0 = conns[0][2] if conns else 0
    t_end = conns[-1][2] if conns else 0
    n_connected = len(ids)
    for x in users or ():
        if int(x) not in index:
            index[int(x)] = len(ids)
            ids.append(int(x))
            first.append(t0)
    n = len(ids)
    if n == 0:
        return []
    if max(ids) >= item_id_base:
        raise ValueError("item_id_base must be above every user id")
    signup = [max(0, ts - 1) for ts in first]
    unit = min(1.0, (t_end - t0) / (60 * DAY_MS))  # shrink delays on short timelines
    connects = {(index[a], index[b]) for a, b in pairs}  # pairs that ever connect, by index, both orders
    connects |= {(b, a) for a, b in connects}

    world = _make_world(max(2, n // 60), max(2, n // 200), max(2, round(math.sqrt(n) / 3)),
                        min(max(2, n // 150), len(_INDUSTRIES)), 0.8, rng)
    company, school, city, industry = _assign_users(world, n, rng)
    groups = (company, school, city, industry)
    label_sizes = [Counter(g) for g in groups]  # current members per label, for the over-representation vote
    n_items = n_items or max(20, n // 5)
    items = _make_items(world, groups, n_items, rng)

    out: list[InputEvent] = []
    o_ts: list[int] = []
    o_rank: list[int] = []
    o_a: list[int] = []
    o_b: list[int] = []

    def emit(event: InputEvent, ts: int, rank: int, a: int, b: int) -> None:
        out.append(event)
        o_ts.append(ts)
        o_rank.append(rank)
        o_a.append(a)
        o_b.append(b)

    for x in range(n):
        emit(UserEvent(ids[x], signup[x], _profile(world, company[x], school[x], city[x], industry[x], rnd)),
             signup[x], _RANK_USER, ids[x], 0)

    # Views before connections (only pairs that connect; only after both sign-ups).
    for a, b, ts in conns:
        if r() >= view_before_connect:
            continue
        lo = max(signup[a], signup[b]) + 1
        if ts - lo < 1:
            continue
        k = 1
        while r() < 0.35:
            k += 1
        for j in range(k):
            delay = int(math.exp(rnd.uniform(math.log(HOUR_MS), math.log(3 * DAY_MS))) * unit) + 1
            vts = ts - delay if ts - delay >= lo else lo + int(r() * (ts - lo))
            # The first view is mostly by the interaction's source (the one who reached out).
            x, y = (a, b) if r() < (0.75 if j == 0 else 0.5) else (b, a)
            emit(ProfileViewEvent(ids[x], ids[y], vts), vts, _RANK_VIEW, ids[x], ids[y])

    # The time-ordered part: (ts, rank, tiebreak, kind, user, other). Updates run before same-ts
    # connections so they only see strictly earlier ones.
    timeline: list[tuple[int, int, int, int, int, int]] = []
    times: list[list[int]] = [[] for _ in range(n)]
    for seq, (a, b, ts) in enumerate(conns):
        timeline.append((ts, 2, seq, 0, a, b))
        times[a].append(ts)
        times[b].append(ts)
    update_delay = max(SECOND_MS, int(DAY_MS * unit))
    for x in range(n_connected):
        for k in sorted({min(c, len(times[x])) for c in profile_updates_at if c > 0}):
            uts = min(t_end, times[x][k - 1] + MINUTE_MS + int(r() * update_delay))
            if uts > times[x][k - 1]:
                timeline.append((uts, 1, len(timeline), 1, x, 0))
    activity = rng.lognormal(0.0, 0.8, size=n)
    counts = rng.poisson(engagements_per_user * activity / activity.mean()).tolist()
    seq = 0
    for x in range(n):
        for _ in range(counts[x]):
            ets = signup[x] + int(r() * (t_end - signup[x] + 1))
            timeline.append((ets, 3, seq, 2, x, 0))
            seq += 1
    timeline.sort()

    adj: list[list[int]] = [[] for _ in range(n)]
    appeared: list[int] = list(range(n_connected, n))  # signed up users, in sign-up order
    seen = [False] * n
    dismissed: set[tuple[int, int]] = set()
    p_noise = noise_views_per_user * n / max(1, len(conns))
    p_dismiss = dismissals_per_user * n / max(1, len(conns))

    def repeat(p: float) -> int:
        return int(p) + (r() < p - int(p))

    for ts, _, _, kind, a, b in timeline:
        if kind == 0:  # a connection
            adj[a].append(b)
            adj[b].append(a)
            for x in (a, b):
                if not seen[x]:
                    seen[x] = True
                    appeared.append(x)
            for _ in range(repeat(p_noise)):
                x = a if r() < 0.5 else b
                if r() < 0.5:
                    nw = adj[adj[x][int(r() * len(adj[x]))]]
                    y = nw[int(r() * len(nw))]
                else:
                    y = appeared[int(r() * len(appeared))]
                if y != x and (x, y) not in connects:
                    vts = min(t_end, ts + int(r() * 6 * HOUR_MS * unit))
                    emit(ProfileViewEvent(ids[x], ids[y], vts), vts, _RANK_VIEW, ids[x], ids[y])
            for _ in range(repeat(p_dismiss)):
                x, y = (a, b) if r() < 0.5 else (b, a)
                z = adj[y][int(r() * len(adj[y]))]  # a new friend-of-a-friend of x
                if z != x and (x, z) not in connects and (x, z) not in dismissed:
                    dismissed.add((x, z))
                    dts = min(t_end, ts + int((MINUTE_MS + r() * DAY_MS) * unit))
                    emit(DismissalEvent(ids[x], ids[z], dts), dts, _RANK_DISMISS, ids[x], ids[z])
        elif kind == 1:  # a profile update from the neighbours so far
            neighbours = adj[a]
            changed: list[int] = []
            for d, p in ((_DIM_COMPANY, adopt_prob), (_DIM_SCHOOL, adopt_prob * 0.7),
                         (_DIM_CITY, adopt_prob * 0.8), (_DIM_INDUSTRY, adopt_prob * 0.6)):
                if r() >= p:
                    continue
                votes = Counter(groups[d][y] for y in neighbours)
                sizes = label_sizes[d]
                label = -max((count / math.sqrt(sizes[g]), -g) for g, count in votes.items())[1]
                if label != groups[d][a]:
                    sizes[groups[d][a]] -= 1
                    sizes[label] += 1
                    groups[d][a] = label
                    changed.append(d)
            if changed:
                new_industry = _DIM_INDUSTRY in changed
                profile = Profile(
                    company=world.company_names[company[a]] if _DIM_COMPANY in changed else None,
                    school=world.school_names[school[a]] if _DIM_SCHOOL in changed else None,
                    industry=_INDUSTRIES[world.industries[industry[a]]][0] if new_industry else None,
                    title=_title(world, industry[a], rnd) if new_industry else None,
                    skills=_skills(world, industry[a], rnd) if new_industry else None,
                    geo=_geo(world, city[a], rnd) if _DIM_CITY in changed else None)
                emit(UserEvent(ids[a], ts, profile), ts, _RANK_USER, ids[a], 1)
        else:  # an engagement with content of the user's communities as of now
            item = item_id_base + _pick_item(items, (company[a], school[a], city[a], industry[a]), n_items, rnd)
            emit(EngagementEvent(ids[a], item, ts), ts, _RANK_ENGAGE, ids[a], item)

    return _sorted_events(out, o_ts, o_rank, o_a, o_b)


def merge_by_time(*streams: Iterable[InputEvent]) -> list[InputEvent]:
    """All events of ``streams`` sorted by ts. Stable: at equal ts, events keep the order of the streams as
    given, then their order within a stream (so pass sign-ups/behaviour before what should follow them)."""
    return sorted(chain.from_iterable(streams), key=lambda e: e.ts)
