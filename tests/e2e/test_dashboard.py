"""The dashboard at ``/`` in a real headless Chromium against a real ``compactor serve`` tree.

The browser loads the page with Alice's key in the URL fragment; a job is submitted through
the HTTP API (not through the page), and the page must show it move (its progress bar fed
by the job's events stream) and reach ``succeeded``; then the job view must show the
before/after table, the target search's chart, the layer table and download links, and a
download through the page must yield the artifact's bytes. The job is a real target search
on a small trained CNN (a few seconds of work), so the chart is drawn from real points.
Screenshots go to ``$COMPACTOR_TEST_ARTIFACTS`` (else the test's tmp dir).

Chromium is Debian's ``chromium`` package; without it the browser tests skip, unless
``COMPACTOR_REQUIRE_CHROMIUM=1`` (CI) turns that into a failure. The served files and their
headers are checked without a browser.
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import os
import re
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.e2e.cdp import CDP, Chromium, Tab, find_chromium
from tests.e2e.test_serve import Serve
from tests.support.jobs import REPO_ROOT, write_digits_dataset
from tests.support.models import TinyCNN, load_digits_tensors, train_classifier

ALICE_KEY = "alice-dashboard-key"
BOB_KEY = "bob-dashboard-key"
TERMINAL = {"succeeded", "failed", "cancelled"}
# A real target search that takes a few seconds on two cores: the budget is met at some amounts
# and missed at others, so the chart has points of both kinds; the fine-tuning epochs keep the
# job running long enough for the page to show it moving.
SEARCH_SPEC: dict[str, Any] = {
    "model": {"input_shape": [1, 1, 8, 8]},
    "prune": {"granularity": "unstructured", "amount": 0.97},
    "finetune": {"epochs": 40, "lr": 0.01},
    "target": {"max_accuracy_drop": 0.02, "max_trials": 4},
}


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium_binary() -> str:
    binary = find_chromium()
    if binary is None:
        if os.environ.get("COMPACTOR_REQUIRE_CHROMIUM") == "1":
            pytest.fail("COMPACTOR_REQUIRE_CHROMIUM=1 but chromium is not on PATH (apt-get install chromium)")
        pytest.skip("chromium is not installed (CI installs it and sets COMPACTOR_REQUIRE_CHROMIUM=1)")
    return binary


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    root = tmp_path_factory.mktemp("dashboard-serve")
    serve = Serve(root / "data", root / "serve.log", COMPACTOR_API_KEYS=f"alice:{ALICE_KEY},bob:{BOB_KEY}")
    yield serve
    serve.close()


@pytest.fixture(scope="module")
def browser(chromium_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CDP]:
    root = tmp_path_factory.mktemp("chromium")
    chromium = Chromium(chromium_binary, root / "profile", root / "chromium.log")
    cdp = CDP(chromium.websocket_url)
    yield cdp
    cdp.close()
    chromium.close()


@pytest.fixture(scope="module")
def artifacts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get("COMPACTOR_TEST_ARTIFACTS")
    directory = Path(configured) if configured else tmp_path_factory.mktemp("artifacts")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture(scope="module")
def search_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A narrow TinyCNN trained to ~100% on digits (so pruning visibly costs accuracy), and digits."""
    root = tmp_path_factory.mktemp("dashboard-inputs")
    inputs, targets, _, _ = load_digits_tensors()
    torch.manual_seed(0)
    model = train_classifier(TinyCNN(width=8), inputs[:480], targets[:480], epochs=8, lr=1e-2)
    torch.jit.save(torch.jit.script(model), str(root / "trained.ts"))
    return {"model": root / "trained.ts", "dataset": write_digits_dataset(root / "digits.pt")}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def submit(client: httpx.Client, key: str, inputs: dict[str, Path], spec: dict[str, Any]) -> dict[str, Any]:
    files = {
        "model": ("model.ts", inputs["model"].read_bytes(), "application/octet-stream"),
        "dataset": ("digits.pt", inputs["dataset"].read_bytes(), "application/octet-stream"),
        "spec": (None, json.dumps(spec), "application/json"),
    }
    response = client.post("/v1/jobs", files=files, headers=auth(key))
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


def shot(tab: Tab, directory: Path, name: str) -> Path:
    path = tab.screenshot(directory / name)
    print(f"dashboard screenshot: {path}")
    return path


# -- the served files, without a browser -------------------------------------------------------------


def test_page_and_assets_are_served_with_a_strict_policy(server: Serve) -> None:
    page = server.client.get("/")
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    policy = {
        directive.split()[0]: directive.split()[1:]
        for directive in (part.strip() for part in page.headers["Content-Security-Policy"].split(";"))
        if directive
    }
    assert policy["default-src"] == ["'self'"] and policy["script-src"] == ["'self'"]
    assert policy["object-src"] == ["'none'"] and policy["frame-ancestors"] == ["'none'"]
    assert "unsafe" not in page.headers["Content-Security-Policy"]
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    # No inline script: every <script> has a src and an empty body; nothing from another origin.
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", page.text, flags=re.S)
    assert scripts and all("src=" in attributes and not body.strip() for attributes, body in scripts)
    assert not re.search(r"""(src|href)=["'](https?:)?//""", page.text)
    assert "/" not in server.client.get("/openapi.json").json()["paths"]
    # The page is public (it holds no data); the API behind it is not.
    assert server.client.get("/v1/jobs").status_code == 401

    for name, media_type in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css"), ("favicon.svg", "image/svg+xml")):
        asset = server.client.get(f"/static/{name}")
        assert asset.status_code == 200 and asset.headers["Content-Type"].startswith(media_type), name
        assert asset.headers["X-Content-Type-Options"] == "nosniff"
        assert asset.content == (REPO_ROOT / "service" / "static" / name).read_bytes()
        again = server.client.get(f"/static/{name}", headers={"If-None-Match": asset.headers["ETag"]})
        assert again.status_code == 304 and not again.content

    # A fixed table of files, not a directory: nothing else under static/ or beside it is reachable.
    for path in ("/static/index.html", "/static/dashboard.py", "/static/..%2Froutes%2Fdashboard.py", "/static/"):
        missing = server.client.get(path)
        assert missing.status_code == 404, path
        assert missing.headers["Content-Type"].startswith("application/problem+json"), path


def test_the_static_files_are_package_data() -> None:
    """A non-editable install (the Docker image) gets exactly what the repository serves from."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["service"]
    static = sorted(path.relative_to(REPO_ROOT / "service").as_posix() for path in (REPO_ROOT / "service" / "static").iterdir())
    assert static
    unshipped = [name for name in static if not any(fnmatch.fnmatch(name, pattern) for pattern in patterns)]
    assert not unshipped, f"not in [tool.setuptools.package-data]: {unshipped}"


# -- in Chromium -------------------------------------------------------------------------------------

ROW = 'document.querySelector(`tr[data-job-id="{id}"]`)'
ROW_STATE = """(() => {{
  const row = {row};
  if (!row) return null;
  return {{status: row.dataset.status, progress: Number(row.dataset.progress), source: row.dataset.source,
           bar: row.querySelector("progress").value, text: row.innerText}};
}})()"""
TABLE_ROWS = "[...document.querySelectorAll('{selector} tbody tr')].map(tr => [...tr.cells].map(c => c.innerText.trim()))"


def test_the_page_follows_a_job_to_success_and_shows_its_report(
    browser: CDP, server: Serve, search_inputs: dict[str, Path], artifacts_dir: Path, tmp_path: Path
) -> None:
    tab = browser.new_tab()
    # A second tab whose event streams cannot connect (as behind a proxy that drops them): its
    # job view must fall back to polling and still follow the job to the end.
    no_streams = browser.new_tab()
    no_streams.call("Network.enable")
    no_streams.call("Network.setBlockedURLs", {"urls": ["*/events"]})
    try:
        tab.navigate(f"{server.base}/#key={ALICE_KEY}")
        # The key was taken from the fragment and removed from the address bar (and the history).
        assert tab.evaluate("location.href") == f"{server.base}/"
        assert tab.evaluate("sessionStorage.getItem('compactor.apiKey')") == ALICE_KEY
        tab.wait_for("document.getElementById('jobs-empty')?.hidden === false", 15, "the (empty) jobs list")
        no_streams.navigate(f"{server.base}/#key={ALICE_KEY}")
        # The tab under test in front: background tabs get their timers throttled.
        tab.call("Page.bringToFront")

        job_id = submit(server.client, ALICE_KEY, search_inputs, SEARCH_SPEC)["id"]
        no_streams.evaluate(f"location.hash = '#/jobs/{job_id}'")
        row_state = ROW_STATE.format(row=ROW.format(id=job_id))
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + 60
        while not seen or seen[-1]["status"] not in TERMINAL:
            assert time.monotonic() < deadline, f"the page did not show {job_id} finish; last seen {seen[-1:]}"
            state = tab.evaluate(row_state)
            if state is not None:
                seen.append(state)
            browser.pump(0.1)
        final = seen[-1]
        api_job = server.client.get(f"/v1/jobs/{job_id}", headers=auth(ALICE_KEY)).json()
        assert final["status"] == "succeeded", (final, api_job.get("error"))
        # The final state came from the job's events stream, not from the list's refresh.
        assert final["source"] == "events", seen
        assert final["progress"] == 1.0 and final["bar"] == 1.0 and "100%" in final["text"]
        # A live progress bar: the page showed the job part-way, and never going backwards.
        partway = [state["progress"] for state in seen if 0 < state["progress"] < 1]
        assert partway, f"the page never showed the job part-way: {seen}"
        assert all(a["progress"] <= b["progress"] for a, b in itertools.pairwise(seen)), seen
        shot(tab, artifacts_dir, "dashboard-jobs.png")

        # The job view, through the link in the list.
        tab.evaluate(f"{ROW.format(id=job_id)}.querySelector('a.job-link').click()")
        tab.wait_for("!!document.querySelector('#metrics tbody tr')", 10, "the job view's metrics")
        assert tab.evaluate("location.hash") == f"#/jobs/{job_id}"
        assert tab.evaluate("document.querySelector('#job-summary .badge').textContent") == "succeeded"
        metrics = api_job["metrics"]

        table = {row[0]: row[1:] for row in tab.evaluate(TABLE_ROWS.format(selector="#metrics"))}
        original, compressed = metrics["original"], metrics["compressed"]
        assert table["Parameters"][:2] == [f"{original['params']:,}", f"{compressed['params']:,}"]
        assert table["Non-zero parameters"][:2] == [f"{original['nonzero_params']:,}", f"{compressed['nonzero_params']:,}"]
        assert table["Non-zero parameters"][2].startswith(f"×{metrics['ratios']['nonzero_params']:.2f}")
        assert table["Top-1 accuracy"][:2] == [f"{original['accuracy']['top1']:.1%}", f"{compressed['accuracy']['top1']:.1%}"]
        assert {"Size (TorchScript file)", "MACs per sample", "CPU latency, batch 1 (p50, TorchScript)", "Top-5 accuracy"} <= set(table)
        # The TorchScript rows compare like with like; the headline speedup lives in the runtime table.
        ts_b1 = original["latency_ms"]["cpu"]["batch_1"]["p50"] / compressed["latency_ms"]["cpu"]["batch_1"]["p50"]
        assert table["CPU latency, batch 1 (p50, TorchScript)"][2] == (f"{ts_b1:.2f}× faster" if ts_b1 >= 1 else f"{1 / ts_b1:.2f}× slower")

        # The runtime table: the original and every artifact in its runtime, in the report's order,
        # the recommended ones marked, each speedup against the original in its fastest runtime.
        runtimes = metrics["runtimes"]
        assert {row["runtime"] for row in runtimes if row["model"] == "original"} == {"torchscript", "onnxruntime"}
        shown = tab.evaluate("""[...document.querySelectorAll('#runtimes tbody tr')].map(tr => ({
          artifact: tr.dataset.artifact, runtime: tr.dataset.runtime, recommended: tr.classList.contains('recommended'),
          cells: [...tr.cells].map(c => c.innerText.trim())}))""")
        assert [(row["artifact"], row["runtime"]) for row in shown] == [(row["artifact"] or "original", row["runtime"]) for row in runtimes]
        chosen = {(choice["artifact"], choice["runtime"]) for choice in metrics["recommended"].values()}
        assert chosen and {(row["artifact"], row["runtime"]) for row in shown if row["recommended"]} == chosen
        for row, cells in zip(runtimes, (row["cells"] for row in shown), strict=True):
            speedup = (row.get("speedup_vs_best_original") or {}).get("batch_1")
            if speedup is not None:
                assert cells[-2] == (f"{speedup:.2f}× faster" if speedup >= 1 else f"{1 / speedup:.2f}× slower"), cells
        recommended = tab.evaluate("[...document.querySelectorAll('#recommended dd')].map(dd => dd.innerText)")
        assert [text.split(" in ")[0] for text in recommended] == [choice["artifact"] for choice in metrics["recommended"].values()]

        layers = tab.evaluate(TABLE_ROWS.format(selector="#layers"))
        assert [row[0] for row in layers] == [layer["name"] for layer in metrics["layers"]]
        assert [row[3] for row in layers] == [f"{layer['sparsity']:.1%}" for layer in metrics["layers"]]

        # The search chart: one dot per point tried, in the order tried, the chosen one ringed.
        points = metrics["search"]["points"]
        assert len(points) >= 2 and {p["within_budget"] for p in points} == {True, False}, points
        chart = tab.evaluate("""(() => {
          const chart = document.querySelector('#search-chart');
          const groups = [...chart.querySelectorAll('g.point')];
          return {amounts: groups.map(g => Number(g.dataset.amount)),
                  within: groups.map(g => g.classList.contains('within')),
                  cy: groups.map(g => Number(g.querySelector('.dot').getAttribute('cy'))),
                  chosen: [...chart.querySelectorAll('g.chosen')].map(g => Number(g.dataset.amount)),
                  box: chart.getBoundingClientRect().toJSON()};
        })()""")
        assert chart["amounts"] == [p["amount"] for p in points]
        assert chart["within"] == [p["within_budget"] for p in points]
        assert chart["chosen"] == [metrics["search"]["chosen_amount"]]
        assert chart["box"]["width"] > 300 and chart["box"]["height"] > 150
        # Higher accuracy is drawn higher (smaller y).
        by_top1 = sorted(range(len(points)), key=lambda i: points[i]["top1"])
        assert [chart["cy"][i] for i in by_top1] == sorted((chart["cy"][i] for i in by_top1), reverse=True)
        assert len(tab.evaluate(TABLE_ROWS.format(selector="#search-points"))) == len(points)

        links = tab.evaluate("[...document.querySelectorAll('#artifacts a.download')].map(a => a.dataset.artifact)")
        assert links == [artifact["name"] for artifact in api_job["artifacts"]]
        assert {"model.ts", "report.json"} <= set(links)
        shot(tab, artifacts_dir, "dashboard-job.png")

        # A download through the page sends the key and saves the artifact's exact bytes.
        downloads = tmp_path / "downloads"
        downloads.mkdir()
        browser.call("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads), "eventsEnabled": True})
        since = len(browser.events)
        tab.evaluate("document.querySelector('#artifacts a[data-artifact=\"model.ts\"]').click()")
        browser.wait_event("Browser.downloadProgress", lambda event: event["state"] != "inProgress", timeout=20, since=since)
        recorded = next(artifact for artifact in api_job["artifacts"] if artifact["name"] == "model.ts")
        saved = downloads / "model.ts"
        assert saved.exists(), sorted(downloads.iterdir())
        assert hashlib.sha256(saved.read_bytes()).hexdigest() == recorded["sha256"]

        assert tab.problems() == []

        # The tab without streams got there by polling (its job view never saw an event).
        summary = "document.querySelector('#job-summary dl')"
        no_streams.wait_for(f"{summary}?.dataset.status === 'succeeded'", 20, "the polled job view to show success")
        assert no_streams.evaluate(f"{summary}.dataset.source") == "poll"
        assert no_streams.evaluate("document.querySelectorAll('#metrics tbody tr').length") == len(table)
        # It did try the stream, and was refused.
        assert any(url.endswith(f"/v1/jobs/{job_id}/events") for url in no_streams.blocked_urls())
        assert no_streams.problems() == []

        # Another tenant's key, given the same way: none of Alice's jobs.
        tab.evaluate(f"location.hash = '#key={BOB_KEY}'")
        tab.wait_for("document.getElementById('jobs-empty')?.hidden === false", 10, "Bob's (empty) jobs list")
        assert tab.evaluate("document.querySelectorAll('#jobs tbody tr').length") == 0
        assert tab.evaluate("location.hash") == ""
    except BaseException:
        try:
            shot(tab, artifacts_dir, "dashboard-failure.png")
        except Exception as exc:  # noqa: BLE001 - the test's own failure is what matters
            print(f"no failure screenshot: {exc}")
        raise
    assert tab.problems() == []


def test_a_missing_or_wrong_key_says_so_and_the_key_form_recovers(browser: CDP, server: Serve) -> None:
    tab = browser.new_tab()
    tab.navigate(f"{server.base}/")
    notice = "document.getElementById('notice')"
    text = tab.wait_for(f"!{notice}.hidden && {notice}.textContent", 10, "the 401 notice")
    assert "401" in text and "needs an API key" in text

    tab.evaluate("location.hash = '#key=not-a-valid-key'")
    tab.wait_for(f"{notice}.textContent.includes('not accepted')", 10, "the wrong-key notice")
    assert tab.evaluate("document.querySelectorAll('#jobs').length") == 0

    # Typing the right key into the form recovers without a reload.
    mark = tab.mark()
    tab.evaluate(f"""(() => {{
      document.getElementById('api-key').value = {json.dumps(BOB_KEY)};
      document.getElementById('key-form').requestSubmit();
    }})()""")
    tab.wait_for("document.getElementById('jobs-empty')?.hidden === false", 10, "the jobs list after entering the key")
    assert tab.evaluate(f"{notice}.hidden") is True
    assert tab.evaluate("sessionStorage.getItem('compactor.apiKey')") == BOB_KEY
    # The 401 answers above are logged by Chromium as failed loads; after the key, nothing is.
    assert tab.problems(since=mark) == []
    assert not [problem for problem in tab.problems() if not problem.startswith("log (network)")]


def test_the_event_stream_parser_handles_any_split_of_the_stream(browser: CDP, server: Serve) -> None:
    """The page's SSE parser, in the browser, fed the same stream cut at every pair of positions."""
    tab = browser.new_tab()
    tab.navigate(f"{server.base}/#key={ALICE_KEY}")
    result = tab.evaluate(
        """(async () => {
      const { SSEParser } = await import("./static/dashboard.js");
      const stream = "retry: 1500\\r\\n\\r\\n: keep-alive\\n\\n"
        + "id: 1.running.finetune.0.5\\nevent: job\\ndata: {\\"id\\": \\"job_1\\"}\\n\\n"
        + "id: 2\\r\\nevent: job\\r\\ndata: first line\\r\\ndata: second line\\r\\n\\r\\n"
        + "data: plain\\rdata:no-space\\r\\r\\n"
        + "event: deleted\\ndata\\n\\n";
      const parse = (pieces) => {
        const events = [];
        const parser = new SSEParser((event) => events.push(event));
        for (const piece of pieces) parser.feed(piece);
        return JSON.stringify({ events, retry: parser.retry });
      };
      const whole = parse([stream]);
      let mismatches = 0;
      for (let first = 0; first <= stream.length; first += 1) {
        for (let second = first; second <= stream.length; second += 1) {
          const pieces = [stream.slice(0, first), stream.slice(first, second), stream.slice(second)];
          if (parse(pieces) !== whole) mismatches += 1;
        }
      }
      return { whole: JSON.parse(whole), mismatches };
    })()""",
        await_promise=True,
    )
    assert result["mismatches"] == 0
    assert result["whole"] == {
        "retry": 1500,
        "events": [
            {"type": "job", "data": '{"id": "job_1"}', "id": "1.running.finetune.0.5"},
            {"type": "job", "data": "first line\nsecond line", "id": "2"},
            {"type": "message", "data": "plain\nno-space", "id": "2"},
            {"type": "deleted", "data": "", "id": "2"},
        ],
    }
    assert tab.problems() == []
