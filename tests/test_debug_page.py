"""The debug page of a user: rendered from dicts (tier 1), and served by a live worker and loaded in a real headless
Chromium (tier 3), which must show the list's items and reasons; its screenshot is kept as a test artefact
(``reports/test-artifacts/debug-page.png``). Chromium comes from Debian (`make test` installs it): a missing browser
fails the test, it does not skip it."""

from __future__ import annotations

import html
import shutil
import subprocess
from pathlib import Path

from pymk.settings import Settings
from pymk.streams.debug_page import user_page
from pymk.streams.topics import ensure_topics
from stream_helpers import latest_lists, send, settle, small_network, worker_url
from workers import running_worker

ARTIFACTS = Path(__file__).resolve().parent.parent / "reports" / "test-artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def test_the_page_shows_the_list_and_escapes_what_users_wrote() -> None:
    user = {"user": 7, "partition": 3, "degree": {"value": 2}, "profile": {"company": "<script>x</script>"},
            "behaviour": {"profiles_viewed": 1}, "embedding": None}
    recommendations = {"model_version": "m1", "generated_at": 5, "items": [
        {"candidate": 11, "rank": 1, "score": 0.5, "sources": ["graph"], "reasons": {
            "text": "2 mutual connections", "mutual_connections": 2, "mutual_examples": [3, 4],
            "top_features": [{"feature": "common_neighbor_count", "contribution": 0.4, "value": 2.0}]}},
        {"candidate": 12, "rank": 2, "score": 0.25, "sources": ["ann"], "reasons": {
            "text": "similar profile", "mutual_connections": 0, "mutual_examples": [], "top_features": []}}]}
    features = {11: {"common_neighbor_count": {"value": 2, "ts": 1}, "jaccard_sim": {"value": 0.0, "ts": 1}}}
    events = [{"ts": 9, "kind": "connections", "summary": "7 — 3 add"}]
    page = user_page(user, recommendations, features, events)
    assert "<script>x" not in page and html.escape("<script>x</script>") in page
    assert page.count('<tr class="item">') == 2 and "2 mutual connections" in page and "similar profile" in page
    assert "common_neighbor_count 2" in page and "jaccard_sim" not in page.split("feature row")[1].split("</table>")[0]
    assert "<svg" in page and page.count('class="candidate"') >= 2 and page.count('class="mutual"') == 2
    assert "7 — 3 add" in page


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "Chromium is needed for this test: apt-get install chromium (make test installs it)"
    return found


def test_a_live_worker_serves_a_page_a_browser_renders(kafka_settings: Settings, tmp_path: Path) -> None:
    settings = kafka_settings
    ensure_topics(settings)
    send(settings, small_network(120, seed=5))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with running_worker(settings, tmp_path / "worker.log"):
        settle(settings, [settings])
        lists = latest_lists(settings)
        user = max(lists, key=lambda u: (len(lists[u].items), -u))
        recs = lists[user]
        url = f"{worker_url(settings)}/users/{user}/page"
        browser = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}"]
        dom = subprocess.run([*browser, "--dump-dom", url], capture_output=True, text=True, timeout=120)
        screenshot = ARTIFACTS / "debug-page.png"
        screenshot.unlink(missing_ok=True)
        shot = subprocess.run([*browser, f"--screenshot={screenshot}", "--window-size=1280,1800", url],
                              capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = dom.stdout
    assert f"User {user}" in text
    assert text.count('<tr class="item">') == len(recs.items)
    for item in recs.items:
        assert f'<td class="candidate">{item.candidate}</td>' in text
        assert html.escape(item.reasons["text"], quote=False) in text
    assert "<svg" in text and "connections" in text  # the picture, and the events that named the user
    assert shot.returncode == 0 and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
