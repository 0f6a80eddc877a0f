"""Screenshots of the MLflow UI for docs/figures: the runs of one DVC experiment, nested under their parent run,
and the comparison of a few of them (not reports/figures: that is the report stage's output, which DVC empties).
Run it where a `dvc repro` has filled mlruns.db; it starts `mlflow server` on a free local port and renders the
pages in Qt WebEngine (Chromium, headless), offline.

Not a pipeline dependency: install the browser into a venv of its own (about 400 MB),
    python -m venv /tmp/qt && /tmp/qt/bin/pip install PyQt6 PyQt6-WebEngine
then, from the repository root, with the project's venv first on PATH (for `mlflow`):
    QT_QPA_PLATFORM=offscreen QTWEBENGINE_CHROMIUM_FLAGS="--no-sandbox --enable-unsafe-swiftshader" \
        /tmp/qt/bin/python tools/mlflow_screenshot.py --runs source_only-s0 fass-s0 plca-s0
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def api(base: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            sys.exit(f"error: mlflow server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(base + "/health", timeout=2)
            return
        except OSError:
            time.sleep(1)
    sys.exit(f"error: mlflow server not ready at {base} after {timeout:.0f} s")


#: Run in each page once it has rendered: close the assistant panel; open the nested runs of the parent; show
#: only the params and metrics that differ between the compared runs.
CLOSE_ASSISTANT = "document.querySelectorAll('button[aria-label=\"Close\"]').forEach(b => b.click());"
EXPAND_PARENT = ("document.querySelectorAll('button[data-component-id*=\"runnamecellrenderer\"]')"
                 ".forEach(b => b.click());")
DIFF_ONLY = "document.querySelectorAll('[role=\"switch\"]').forEach(b => b.click());"


def grab(pages: list[tuple[str, Path, str, tuple[int, int]]], wait_s: float) -> None:
    """Load each URL in a headless Chromium at its window size, run its script once it has rendered, and save
    the window as PNG `wait_s` after the load."""
    from PyQt6.QtCore import QSize, QTimer, QUrl
    from PyQt6.QtWebEngineWidgets import QWebEngineView
    from PyQt6.QtWidgets import QApplication

    app = QApplication(sys.argv[:1])
    view = QWebEngineView()
    view.show()
    todo = list(pages)

    def next_page() -> None:
        if not todo:
            app.quit()
            return
        url, _, script, size = todo[0]
        view.resize(QSize(*size))
        view.load(QUrl(url))
        QTimer.singleShot(int(wait_s * 500), lambda: view.page().runJavaScript(script))
        QTimer.singleShot(int(wait_s * 1000), save)

    def save() -> None:
        url, out, _, _ = todo.pop(0)
        out.parent.mkdir(parents=True, exist_ok=True)
        if not view.grab().save(str(out)):
            sys.exit(f"error: could not write {out}")
        print(f"{out}: {url}")
        next_page()

    QTimer.singleShot(0, next_page)
    app.exec()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="mlruns.db", help="the sqlite store (default: mlruns.db)")
    parser.add_argument("--experiment", default="plca", help="MLflow experiment (params tracking.experiment)")
    parser.add_argument("--group", default="workspace", help="the DVC experiment whose runs are shown")
    parser.add_argument("--runs", nargs="+", default=["source_only-s0", "fass-s0", "plca-s0"],
                        help="run names to compare")
    parser.add_argument("--out", type=Path, default=Path("docs/figures"))
    parser.add_argument("--size", type=int, nargs=2, default=(1500, 900), help="window width and height")
    parser.add_argument("--compare-height", type=int, default=2000, help="window height of the comparison")
    parser.add_argument("--wait", type=float, default=12.0, help="seconds each page gets to render")
    args = parser.parse_args()
    if not Path(args.store).is_file():
        sys.exit(f"error: {args.store}: no MLflow store here (run dvc repro first)")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(["mlflow", "server", "--backend-store-uri", f"sqlite:///{Path(args.store).resolve()}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    try:
        wait_ready(base, proc)
        exp = api(base, "/api/2.0/mlflow/experiments/get-by-name?experiment_name="
                  + urllib.parse.quote(args.experiment))["experiment"]["experiment_id"]
        found = api(base, "/api/2.0/mlflow/runs/search", {
            "experiment_ids": [exp], "max_results": 1000,
            "filter": f"tags.dvc_exp = '{args.group}' and tags.plca_role = 'run'"}).get("runs", [])
        ids = {r["info"]["run_name"]: r["info"]["run_id"] for r in found}
        missing = [r for r in args.runs if r not in ids]
        if missing:
            sys.exit(f"error: no run {missing} in experiment {args.experiment!r}, group {args.group!r}; "
                     f"there are {sorted(ids)}")
        chosen = json.dumps([ids[r] for r in args.runs])
        width, height = args.size
        grab([(f"{base}/#/experiments/{exp}/runs", args.out / "mlflow-runs.png", CLOSE_ASSISTANT + EXPAND_PARENT,
               (width, height)),
              (f"{base}/#/compare-runs?runs={urllib.parse.quote(chosen)}&experiments="
               f"{urllib.parse.quote(json.dumps([exp]))}", args.out / "mlflow-compare.png", CLOSE_ASSISTANT + DIFF_ONLY,
               (width, args.compare_height))], args.wait)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
