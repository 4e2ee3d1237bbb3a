"""The lessons as a class opens them: JupyterLab in a real (headless) Chromium, Run All in smoke mode, every
control of each explorer moved once, the picture checked to change. Screenshots go to runs/test-artifacts/browser/.

Needs Debian's ``chromium`` (``.ci/run`` installs it with apt when missing) and Playwright for Python, which drives
it through ``executable_path`` (no browser is downloaded). Without them the test is skipped, except under CI=true,
where it fails: CI must run it.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "runs" / "test-artifacts" / "browser"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NOTEBOOKS = ("00_tour.ipynb", "02_id_adapter_and_contamination.ipynb", "04_contrastive_alignment.ipynb")
RUN_TIMEOUT = int(os.environ.get("PULID_LAB_BROWSER_TIMEOUT", 240))  # seconds for one notebook's Run All in smoke mode


def missing() -> str | None:
    if CHROMIUM is None:
        return "Debian's chromium is not installed (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; no browser download needed)"
    return None


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory):
    why = missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"the browser check must run in CI: {why}")
        pytest.skip(why)
    root = tmp_path_factory.mktemp("lab")
    for name in NOTEBOOKS:
        nb = json.loads((ROOT / "notebooks" / name).read_text())
        for cell in nb["cells"]:  # a fresh notebook: the prompts' numbers then say what this run executed
            if cell["cell_type"] == "code":
                cell["outputs"], cell["execution_count"] = [], None
            if "parameters" in cell.get("metadata", {}).get("tags", []):  # 02: two adapters, so that its
                src = "".join(cell["source"])  # adapter control can change too
                cell["source"] = src.replace("explorer_stages = [1]", "explorer_stages = [1, 2]")
        (root / name).write_text(json.dumps(nb))
    settings = root / "settings" / "@jupyterlab"
    (settings / "notebook-extension").mkdir(parents=True)
    (settings / "apputils-extension").mkdir(parents=True)
    # every cell in the page (no windowing: off-screen cells' prompts are read too); no news question
    (settings / "notebook-extension" / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')
    (settings / "apputils-extension" / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = "pulid-lab-browser-check"
    # TQDM_DISABLE: no progress widgets in the kernels. Under heavy CPU load (other jobs beside the suite) a kernel
    # streaming progress-bar updates was seen to finish its cells while the page never heard of it (cells left at
    # [*], kernel idle); the check is about the explorers, which stay widgets
    env = {**os.environ, "CI": "true", "TQDM_DISABLE": "1", "PULID_LAB_RUNS": str(root / "runs"),
           "JUPYTERLAB_WORKSPACES_DIR": str(root / "workspaces"), "JUPYTERLAB_SETTINGS_DIR": str(root / "settings"),
           "JUPYTER_RUNTIME_DIR": str(root / "runtime")}
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "w"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.5)
    else:
        server.kill()
        pytest.fail(f"JupyterLab did not start: {(root / 'server.log').read_text()[-2000:]}")
    yield url, token, root
    server.terminate()
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        server.kill()


@pytest.fixture(scope="module")
def browser(lab_server):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def _open_and_run_all(browser, lab_server, name: str):
    url, token, root = lab_server
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.errors = []  # JavaScript errors while the explorers are used (cleared once Run All has finished)
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(f"{url}/lab/tree/{name}?reset&token={token}")  # reset: only this notebook, no restored tabs
    panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    panel.locator(".jp-Cell").first.wait_for(timeout=60_000)
    n_code = sum(c["cell_type"] == "code" for c in json.loads((root / name).read_text())["cells"])
    status = page.locator(".jp-StatusBar-TextItem:has-text('| Idle')")
    wait_until = time.time() + 90
    while time.time() < wait_until and not status.count():  # the kernel starts by itself, or JupyterLab asks
        if page.locator(".jp-Dialog .jp-mod-accept").count():
            page.click(".jp-Dialog .jp-mod-accept")
        time.sleep(0.5)
    t0 = time.time()
    deadline, started = time.time() + RUN_TIMEOUT, False
    prompts: list[str] = []
    while time.time() < deadline:
        if not started:
            page.click("#jp-MainMenu .lm-MenuBar-itemLabel:text-is('Run')")
            page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")
            started = time.time()
        if page.locator(".jp-Dialog .jp-mod-accept").count():  # "Select Kernel"
            page.click(".jp-Dialog .jp-mod-accept")
        prompts = [p.strip() for p in panel.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()]
        if len(prompts) == n_code and all(p.startswith("[") and p[1:-2].isdigit() for p in prompts):
            break
        if panel.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']").count():
            break
        if all(p == "[ ]:" for p in prompts) and time.time() - started > 30:
            started = False  # the command did not take (the page was still settling): ask again
        time.sleep(1)
    else:
        page.screenshot(path=str(ARTIFACTS / f"{name}-timeout.png"), full_page=False)
        pytest.fail(f"{name}: Run All did not finish in {RUN_TIMEOUT} s (prompts {prompts}, {n_code} code cells)")
    tracebacks = panel.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']")
    if tracebacks.count():
        page.screenshot(path=str(ARTIFACTS / f"{name}-error.png"))
        pytest.fail(f"{name}: an error output after Run All: {tracebacks.first.inner_text()[:1500]}")
    print(f"{name}: Run All in {time.time() - t0:.0f} s")
    page.errors.clear()
    return page, panel


def _explorer(panel, index: int = 0):
    box = panel.locator(".jp-OutputArea-output .widget-vbox").nth(index)
    box.scroll_into_view_if_needed()
    box.locator("img").first.wait_for(timeout=60_000)
    return box


def _picture(box) -> str:
    return box.locator("img").first.get_attribute("src") or ""


def _changes_picture(box, action, what: str, timeout: float = 90):
    before = _picture(box)
    action()
    deadline = time.time() + timeout
    while time.time() < deadline:
        imgs = box.locator("img")
        if imgs.count() and _picture(box) not in ("", before):
            return
        time.sleep(0.5)
    pytest.fail(f"changing {what} did not change the explorer's picture within {timeout:g} s")


def _slider(box, label: str, value: str):
    readout = box.locator(f".widget-slider:has(label:text-is('{label}')) .widget-readout")
    readout.click()
    readout.press("Control+a")
    readout.type(value)
    readout.press("Enter")


def _select(box, label: str, index: int = 1):
    box.locator(f".widget-dropdown:has(label:text-is('{label}')) select").select_option(index=index)


@pytest.fixture(scope="module", autouse=True)
def _artifacts():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)


@pytest.fixture(autouse=True)
def _shut_kernels_down(request):
    """Each notebook's kernel stops after its test: the next one gets the CPU."""
    yield
    if "lab_server" not in request.fixturenames:
        return
    import urllib.request
    url, token, _ = request.getfixturevalue("lab_server")
    with urllib.request.urlopen(f"{url}/api/kernels?token={token}") as r:
        kernels = json.loads(r.read())
    for k in kernels:
        urllib.request.urlopen(urllib.request.Request(f"{url}/api/kernels/{k['id']}?token={token}", method="DELETE"))


def test_tour_runs_and_its_slider_moves_the_picture(browser, lab_server):
    page, panel = _open_and_run_all(browser, lab_server, "00_tour.ipynb")
    box = _explorer(panel)
    assert box.locator(".widget-slider").count() >= 2  # identity and id_scale
    _changes_picture(box, lambda: _slider(box, "id_scale", "3.5"), "id_scale")
    box.screenshot(path=str(ARTIFACTS / "00_tour-explorer-after-slider.png"))
    assert not page.errors, f"JavaScript errors while using the explorer: {page.errors[:3]}"
    page.screenshot(path=str(ARTIFACTS / "00_tour.png"))
    page.close()


def test_contamination_explorer_every_control(browser, lab_server):
    page, panel = _open_and_run_all(browser, lab_server, "02_id_adapter_and_contamination.ipynb")
    box = _explorer(panel)
    _changes_picture(box, lambda: _slider(box, "id_scale", "4"), "id_scale")
    _changes_picture(box, lambda: _slider(box, "identity", "2005"), "identity")
    _changes_picture(box, lambda: _select(box, "adapter"), "adapter")
    seed = box.locator("input[type='number']")  # the seed (IntText) is the explorer's only number field
    _changes_picture(box, lambda: (seed.fill("7"), seed.press("Enter")), "seed")
    prompt = box.locator("input[type='text']")  # the prompt (Combobox) is its only text field
    _changes_picture(box, lambda: (prompt.fill("a portrait, sketch, red background"), prompt.press("Enter")), "prompt")
    box.screenshot(path=str(ARTIFACTS / "02-explorer.png"))
    assert not page.errors, f"JavaScript errors while using the explorer: {page.errors[:3]}"
    page.close()


def test_attention_explorer_every_control(browser, lab_server):
    page, panel = _open_and_run_all(browser, lab_server, "04_contrastive_alignment.ipynb")
    box = _explorer(panel)
    for label in ("adapter", "example", "layer", "step", "token"):
        _changes_picture(box, lambda: _select(box, label), label)
    _changes_picture(box, lambda: box.locator(".widget-toggle-buttons button").nth(1).click(), "map kind")
    box.screenshot(path=str(ARTIFACTS / "04-explorer.png"))
    assert not page.errors, f"JavaScript errors while using the explorer: {page.errors[:3]}"
    page.close()
