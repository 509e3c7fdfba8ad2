"""The debug page of one user (``GET /users/{u}/page``): plain HTML with an inline SVG picture, drawn from the same
data as the JSON views, for people who would rather look than read. No script, no stylesheet or font from
elsewhere (the machine may be offline), no build step: a function from dicts to a string.

The picture: the user in the middle; around it, the suggested candidates (the current list, best first from the
top, clockwise); between them, the mutual connections the reasons name (up to 3 per item), each joined to the user
and to the candidates it is a mutual connection of. Colours say where a candidate came from (graph, ANN, popular).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

SOURCE_COLOURS = {"graph": "#2b6cb0", "ann": "#b7791f", "popular": "#2f855a"}
WIDTH, HEIGHT = 640, 480


def _text(value: Any) -> str:
    return escape("" if value is None else str(value))


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return _text(value)


def neighbourhood_svg(user: int, items: Sequence[Mapping[str, Any]]) -> str:
    """The user, the suggested candidates on an outer ring and their named mutual connections on an inner one."""
    cx, cy = WIDTH / 2, HEIGHT / 2
    outer, inner = min(cx, cy) - 40, (min(cx, cy) - 40) * 0.5
    candidates = [int(item["candidate"]) for item in items]
    mutuals: list[int] = []
    for item in items:
        for z in item.get("reasons", {}).get("mutual_examples", []):
            if int(z) not in mutuals:
                mutuals.append(int(z))
    mutuals = mutuals[:24]

    def ring(count: int, radius: float) -> list[tuple[float, float]]:
        return [(cx + radius * math.sin(2 * math.pi * i / max(count, 1)),
                 cy - radius * math.cos(2 * math.pi * i / max(count, 1))) for i in range(count)]

    at = dict(zip(candidates, ring(len(candidates), outer), strict=True))
    at.update(zip(mutuals, ring(len(mutuals), inner), strict=True))
    lines: list[str] = []
    for z in mutuals:
        x, y = at[z]
        lines.append(f'<line x1="{cx:.1f}" y1="{cy:.1f}" x2="{x:.1f}" y2="{y:.1f}" stroke="#a0aec0"/>')
    for item in items:
        v = int(item["candidate"])
        for z in item.get("reasons", {}).get("mutual_examples", []):
            if int(z) in at and v in at:
                (x1, y1), (x2, y2) = at[int(z)], at[v]
                lines.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="#cbd5e0"/>')
    nodes: list[str] = []
    for z in mutuals:
        x, y = at[z]
        nodes.append(f'<g class="mutual"><title>mutual connection {z}</title><circle cx="{x:.1f}" cy="{y:.1f}" '
                     f'r="9" fill="#e2e8f0" stroke="#4a5568"/><text x="{x:.1f}" y="{y + 22:.1f}" '
                     f'text-anchor="middle" font-size="10">{z}</text></g>')
    for rank, item in enumerate(items, start=1):
        v = int(item["candidate"])
        x, y = at[v]
        sources = list(item.get("sources", []))
        colour = SOURCE_COLOURS.get(sources[0] if sources else "", "#718096")
        nodes.append(f'<g class="candidate"><title>#{rank} {v} ({_text("+".join(sources))}): '
                     f'{_text(item.get("reasons", {}).get("text", ""))}</title><circle cx="{x:.1f}" cy="{y:.1f}" '
                     f'r="13" fill="{colour}"/><text x="{x:.1f}" y="{y + 4:.1f}" text-anchor="middle" '
                     f'font-size="10" fill="white">{rank}</text><text x="{x:.1f}" y="{y + 27:.1f}" '
                     f'text-anchor="middle" font-size="10">{v}</text></g>')
    nodes.append(f'<g class="user"><circle cx="{cx:.1f}" cy="{cy:.1f}" r="18" fill="#1a202c"/><text x="{cx:.1f}" '
                 f'y="{cy + 4:.1f}" text-anchor="middle" font-size="11" fill="white">{user}</text></g>')
    legend = "".join(f'<circle cx="{14 + 90 * i}" cy="14" r="6" fill="{colour}"/><text x="{24 + 90 * i}" y="18" '
                     f'font-size="11">{name}</text>' for i, (name, colour) in enumerate(SOURCE_COLOURS.items()))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} '
            f'{HEIGHT}" role="img" aria-label="neighbourhood of user {user}">{legend}{"".join(lines)}'
            f'{"".join(nodes)}</svg>')


def user_page(user: Mapping[str, Any], recommendations: Mapping[str, Any],
              features: Mapping[int, Mapping[str, Any]], events: Sequence[Mapping[str, Any]]) -> str:
    """The whole page: ``user`` as ``/users/{u}``, ``recommendations`` as ``/recommendations/{u}``, ``features``
    each item's feature row (``/features/{u}/{v}``'s ``features``), ``events`` the last events that named the user."""
    u = int(user["user"])
    items = list(recommendations.get("items", []))
    profile = user.get("profile") or {}
    behaviour = user.get("behaviour") or {}
    embedding = user.get("embedding") or {}
    facts = [("partition", user.get("partition")), ("degree", (user.get("degree") or {}).get("value")),
             ("users within two hops", user.get("two_hop_candidates")), ("signed up at", user.get("signed_up_at")),
             *[(f"profile: {name}", ", ".join(map(str, value)) if isinstance(value, list) else value)
               for name, value in profile.items()],
             *[(name.replace("_", " "), value) for name, value in behaviour.items()],
             ("embedding", f"v{embedding.get('version')} ({embedding.get('model_version')})" if embedding else None),
             ("pending work", user.get("pending_work"))]
    rows = "".join(f"<tr><th>{_text(name)}</th><td>{_text(value)}</td></tr>" for name, value in facts
                   if value not in (None, "", []))
    list_rows = []
    for item in items:
        reasons = item.get("reasons", {})
        top = ", ".join(f"{_text(t['feature'])} (+{t['contribution']:.3g})" for t in reasons.get("top_features", []))
        row = features.get(int(item["candidate"]), {})
        feature_cells = " · ".join(f"{_text(name)} {_number(value.get('value'))}" for name, value in row.items()
                                   if value.get("value") not in (None, 0, 0.0))
        list_rows.append(
            f'<tr class="item"><td>{item["rank"]}</td><td class="candidate">{item["candidate"]}</td>'
            f'<td>{item["score"]:.4f}</td><td>{_text("+".join(item.get("sources", [])))}</td>'
            f'<td class="reason">{_text(reasons.get("text", ""))}</td><td>{reasons.get("mutual_connections", 0)}'
            f'</td><td>{top}</td><td class="features">{feature_cells}</td></tr>')
    event_rows = "".join(f"<tr><td>{_text(e.get('ts'))}</td><td>{_text(e.get('kind'))}</td>"
                         f"<td>{_text(e.get('summary'))}</td></tr>" for e in events)
    generated = recommendations.get("generated_at")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pymk · user {u}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1a202c; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ border-bottom: 1px solid #e2e8f0; padding: 3px 8px; text-align: left; vertical-align: top; }}
td.features {{ font-size: 11px; color: #4a5568; max-width: 420px; }}
h2 {{ margin-top: 1.2em; }} .muted {{ color: #718096; }}
</style></head><body>
<h1>User {u}</h1>
<table class="facts">{rows}</table>
<h2>Neighbourhood</h2>
{neighbourhood_svg(u, items)}
<h2>Current list</h2>
<p class="muted">{len(items)} suggestions · model {_text(recommendations.get('model_version'))} · generated at
{_text(generated)}</p>
<table class="list"><tr><th>#</th><th>candidate</th><th>score</th><th>sources</th><th>why</th><th>mutual</th>
<th>what sets it apart</th><th>feature row (non-zero)</th></tr>{"".join(list_rows)}</table>
<h2>Last events that named this user</h2>
<p class="muted">as this worker applied them (since it started; the newest first)</p>
<table class="events"><tr><th>ts</th><th>topic</th><th>event</th></tr>{event_rows}</table>
</body></html>
"""
