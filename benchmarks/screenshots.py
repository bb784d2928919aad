"""The README screenshots of TensorBoard: Custom Scalars and HParams for two runs of the main job.

    python benchmarks/screenshots.py                       # writes docs/screenshots/*.png
    python benchmarks/screenshots.py --runs /tmp/shots/runs  # reuse runs made before (skip the fits)
    python benchmarks/screenshots.py --keep                # keep the scratch folder (runs, logs)

What it does, all in a scratch folder outside the repository unless told otherwise:

1. Two fits of ``configs/digits_mlp.yaml`` that differ only in label noise (0.0 and
   ``--data.init_args.label_noise=0.4``), one after the other with ``OMP_NUM_THREADS=1``
   (about 20 s each on one core); each must print the end-of-fit results table.
2. ``tensorboard --logdir <runs> --host 127.0.0.1 --port <free port>`` in the background.
3. Headless Chromium (Debian's ``chromium`` package, ``/usr/bin/chromium``), driven through the
   DevTools protocol over a websocket (``aiohttp``, which Lightning already installs), takes:

   * ``custom_scalars.png``: the Custom Scalars dashboard, category "genbounds: bounds", smoothing
     off, outliers not ignored, the bound-vs-gap (Multiline) charts on a log y axis, the other
     categories collapsed (1600 px wide, as tall as the category);
   * ``hparams.png``: the HParams table view, only ``data/label_noise`` and six bound/gap metric
     columns ticked, the Trial ID column widened so the run names are not cut (1800x760);
   * ``scalars.png``: the Scalars dashboard as it first opens (default settings, 1600x1400).

   PNGs larger than 600 KB are downscaled with Pillow.

Every process it starts (the fits, TensorBoard, Chromium) is ended before it returns.
Needs: ``apt-get install -y chromium``; no network access.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "digits_mlp.yaml"
MAX_BYTES = 600_000
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--remote-debugging-port=0"]

# JavaScript run in the page: TensorBoard's dashboards are Polymer elements inside shadow roots,
# so every lookup walks them.
JS_HELPERS = r"""
window.__deep = (selector, root) => {
  const found = [];
  const walk = (node) => {
    if (!node || !node.querySelectorAll) return;
    found.push(...node.querySelectorAll(selector));
    for (const el of node.querySelectorAll('*')) if (el.shadowRoot) walk(el.shadowRoot);
  };
  root = root || document;
  walk(root);  // light DOM (slotted children) and, below, the root's own shadow tree
  if (root.shadowRoot) walk(root.shadowRoot);
  return [...new Set(found)];
};
window.__loaded = (dashboard) => {
  const dash = __deep(dashboard)[0];
  if (!dash) return false;
  const loaders = __deep('tf-line-chart-data-loader', dash);
  return loaders.length > 0 && loaders.every(l => l.dataLoadedAtLeastOnce && !l.dataLoading);
};
"""


def log(msg: str) -> None:
    print(f"[screenshots] {msg}", flush=True)


# ---------------------------------------------------------------- runs and TensorBoard


def fit(save_dir: Path, extra: list[str], logfile: Path) -> None:
    cmd = [sys.executable, "-m", "genbounds", "fit", "--config", str(CONFIG),
           f"--trainer.logger.init_args.save_dir={save_dir}", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    log("running " + " ".join(cmd[2:]))
    with open(logfile, "w") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=save_dir.parent,
                            check=False).returncode
    text = logfile.read_text(errors="replace")
    if rc != 0 or "genbounds — final values" not in text:
        raise SystemExit(f"fit failed (exit {rc}) or printed no results table; see {logfile}")
    table = text[text.index("genbounds — final values"):]
    print(table, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def start_tensorboard(logdir: Path, port: int, logfile: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
           "--port", str(port), "--reload_interval", "0"]
    with open(logfile, "w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"tensorboard exited ({proc.returncode}); see {logfile}")
        try:
            runs = get_json(f"http://127.0.0.1:{port}/data/runs")
            if len(runs) >= 2:
                log(f"tensorboard on 127.0.0.1:{port}, runs {runs}")
                return proc
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"tensorboard did not list two runs within 90 s; see {logfile}")


def start_chromium(profile: Path, logfile: Path) -> tuple[subprocess.Popen, int]:
    binary = shutil.which("chromium") or "/usr/bin/chromium"
    cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1600,1400", "about:blank"]
    with open(logfile, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    port_file = profile / "DevToolsActivePort"
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"chromium exited ({proc.returncode}); see {logfile}")
        if port_file.exists() and port_file.read_text().strip():
            return proc, int(port_file.read_text().split()[0])
        time.sleep(0.2)
    raise SystemExit(f"chromium did not open its DevTools port within 60 s; see {logfile}")


def stop(proc: subprocess.Popen | None, name: str) -> None:
    """End a process this script started (in its own session) and the rest of its process group
    (chromium's helpers): SIGTERM, then SIGKILL after 10 s."""
    if proc is None:
        return
    pgid = proc.pid  # start_new_session=True: the process leads its own group

    def group_alive() -> bool:
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False

    for sig in (signal.SIGTERM, signal.SIGKILL):
        if group_alive():
            os.killpg(pgid, sig)
        deadline = time.time() + 10
        while time.time() < deadline:
            proc.poll()  # reap the leader
            if proc.returncode is not None and not group_alive():
                log(f"stopped {name}")
                return
            time.sleep(0.2)
    log(f"warning: {name} (process group {pgid}) may still be running")


# ---------------------------------------------------------------- DevTools protocol


class Page:
    """The few DevTools-protocol calls the screenshots need, over one page target's websocket."""

    def __init__(self, ws):
        self.ws = ws
        self._id = 0

    async def call(self, method: str, **params):
        self._id += 1
        await self.ws.send_str(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads((await self.ws.receive()).data)
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def js(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}\n{expression[:300]}")
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, what: str, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if await self.js(expression):
                return
            await asyncio.sleep(0.5)
        raise SystemExit(f"timed out waiting for {what}")

    async def open(self, url: str, width: int, height: int) -> None:
        await self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                        mobile=False)
        await self.call("Page.navigate", url="about:blank")  # a fresh app each time, not a hash change
        await self.wait_for("location.href === 'about:blank'", "about:blank")
        await self.call("Page.navigate", url=url)
        await self.wait_for(f"location.href.startsWith({json.dumps(url.split('#')[0])}) && "
                            "document.readyState === 'complete' && !!document.querySelector('tb-webapp')",
                            f"{url} to load")
        await self.js(JS_HELPERS)

    async def shot(self, path: Path, clip: dict | None = None) -> None:
        params = {"format": "png"}
        if clip:
            params["clip"] = {**clip, "scale": 1}
        data = base64.b64decode((await self.call("Page.captureScreenshot", **params))["data"])
        path.write_bytes(shrink(data))
        log(f"wrote {path} ({path.stat().st_size // 1024} KB)")


def shrink(png: bytes) -> bytes:
    """Re-encode (optimised) and, while over MAX_BYTES, downscale with Pillow."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    scale = 1.0
    while True:
        size = (round(image.width * scale), round(image.height * scale))
        out = io.BytesIO()
        (image if scale == 1.0 else image.resize(size, Image.LANCZOS)).save(out, "PNG", optimize=True)
        if out.tell() <= MAX_BYTES or scale < 0.4:
            return out.getvalue()
        scale *= 0.85


# ---------------------------------------------------------------- the three views


async def custom_scalars(page: Page, base: str, out: Path) -> None:
    # tall enough for all 16 charts of the first category (3 per row at 1600 px)
    await page.open(f"{base}/#custom_scalars&_smoothingWeight=0", 1600, 2150)
    await page.wait_for("__deep('tf-custom-scalar-margin-chart-card').length > 0", "the custom-scalar charts")
    await page.js("""(() => {
      const dash = __deep('tf-custom-scalar-dashboard')[0];
      dash.set('_ignoreYOutliers', false);
      dash.set('_smoothingWeight', 0);
      for (const view of __deep('tf-category-paginated-view', dash)) {
        view.set('opened', view.category.name === 'genbounds: bounds');
      }
    })()""")
    await page.wait_for("__loaded('tf-custom-scalar-dashboard')", "the custom-scalar data", timeout=90)
    # bound (order 1-40) and gap (order 0.01) on one linear axis: the gap is a flat line at 0
    await page.js("""(() => {
      const view = __deep('tf-category-paginated-view').find(v => v.category.name === 'genbounds: bounds');
      for (const card of __deep('tf-custom-scalar-multi-line-chart-card', view)) card.set('_logScaleActive', true);
    })()""")
    await asyncio.sleep(3)
    box = await page.js("""(() => {
      const view = __deep('tf-category-paginated-view').find(v => v.category.name === 'genbounds: bounds');
      const r = view.getBoundingClientRect();
      return {bottom: r.bottom};
    })()""")
    await page.shot(out / "custom_scalars.png", {"x": 0, "y": 0, "width": 1600, "height": min(2150, box["bottom"] + 8)})


HPARAM_COLUMNS = {"data/label_noise"}
METRIC_COLUMNS = {"bound/wang_mao_eq3", "bound/wang_mao_eq2", "bound/neu", "gap/measured", "gap/error",
                  "bound/test_error_upper"}


async def hparams(page: Page, base: str, out: Path) -> None:
    await page.open(f"{base}/#hparams", 1800, 760)
    await page.wait_for("__deep('tf-hparams-query-pane').length > 0 && "
                        "(__deep('tf-hparams-query-pane')[0]._hparams || []).length > 0", "the hparams pane")
    missing = await page.js(f"""(() => {{
      const pane = __deep('tf-hparams-query-pane')[0];
      const wantH = new Set({json.dumps(sorted(HPARAM_COLUMNS))});
      const wantM = new Set({json.dumps(sorted(METRIC_COLUMNS))});
      const seen = [];
      pane._hparams.forEach((h, i) => {{
        pane.set(`_hparams.${{i}}.displayed`, wantH.has(h.info.name));
        if (wantH.has(h.info.name)) seen.push(h.info.name);
      }});
      pane._metrics.forEach((m, i) => {{
        const tag = m.info.name.tag;
        pane.set(`_metrics.${{i}}.displayed`, wantM.has(tag));
        if (wantM.has(tag)) seen.push(tag);
      }});
      pane._updateConfiguration && pane._updateConfiguration();
      return [...wantH, ...wantM].filter(x => !seen.includes(x));
    }})()""")
    if missing:
        raise SystemExit(f"HParams has no column for {missing}")
    # the table's cells (vaadin-grid) hold the column names and both runs' trial ids
    await page.wait_for(
        "(() => { const t = __deep('tf-hparams-table-view')[0]; if (!t) return false;"
        " const text = __deep('vaadin-grid-cell-content', t).map(c => c.textContent).join(' ');"
        " return text.includes('data/label_noise') && text.includes('gap/error')"
        " && text.includes('label_noise=0.4') && text.includes('version_0'); })()",
        "the HParams table with both runs and the data/label_noise column")
    # the Trial ID column (10em) cuts "digits_mlp/label_noise=0.4" short: widen it, as a drag would
    await page.js("""(() => {
      const grid = __deep('vaadin-grid', __deep('tf-hparams-table-view')[0])[0];
      const first = grid.querySelector('vaadin-grid-column');
      first.width = '17em';
    })()""")
    await asyncio.sleep(2)
    await page.shot(out / "hparams.png")


async def scalars(page: Page, base: str, out: Path) -> None:
    await page.open(f"{base}/#scalars", 1600, 1400)
    await page.wait_for("__deep('tf-scalar-card').length > 0", "the scalar charts")
    await page.wait_for("__loaded('tf-scalar-dashboard')", "the scalar data", timeout=90)
    await asyncio.sleep(2)
    await page.shot(out / "scalars.png")


async def take(devtools_port: int, base: str, out: Path, only: list[str]) -> None:
    import aiohttp

    targets = get_json(f"http://127.0.0.1:{devtools_port}/json/list")
    target = next(t for t in targets if t.get("type") == "page")
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
        page = Page(ws)
        await page.call("Page.enable")
        # scalars first: it shows TensorBoard's defaults, and "ignore outliers" (unticked for the
        # custom scalars) is kept in the profile's localStorage, shared by the dashboards
        for name, view in (("scalars", scalars), ("hparams", hparams), ("custom_scalars", custom_scalars)):
            if name in only:
                await view(page, base, out)
        with contextlib.suppress(Exception):  # a polite close; the process group is ended anyway
            await page.call("Browser.close")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--runs", type=Path, default=None, help="reuse this TensorBoard logdir (skip the fits)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--only", nargs="+", default=["custom_scalars", "hparams", "scalars"],
                        choices=["custom_scalars", "hparams", "scalars"])
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="genbounds-shots-"))
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tensorboard = chromium = None
    try:
        runs = args.runs
        if runs is None:
            runs = work / "runs"
            fit(runs, [], work / "fit_clean.log")
            fit(runs, ["--data.init_args.label_noise=0.4"], work / "fit_noise.log")
        port = free_port()
        tensorboard = start_tensorboard(runs, port, work / "tensorboard.log")
        profile = work / "chromium-profile"
        shutil.rmtree(profile, ignore_errors=True)
        profile.mkdir()
        chromium, devtools_port = start_chromium(profile, work / "chromium.log")
        asyncio.run(take(devtools_port, f"http://127.0.0.1:{port}", args.out, args.only))
    finally:
        stop(chromium, "chromium")
        stop(tensorboard, "tensorboard")
        if args.keep or args.workdir:
            log(f"scratch folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
