"""nbval runs every lesson top to bottom in smoke mode. The lessons with explorers run in JupyterLab in a real
browser instead (tests/test_browser.py: the same Run All, failing on any error output, plus every explorer control
moved once) wherever Chromium and Playwright are installed; elsewhere nbval runs them here."""
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_browser_check", Path(__file__).parents[1] / "tests" / "test_browser.py")
_browser = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_browser)


def pytest_collection_modifyitems(config, items):
    if _browser.missing() is not None:
        return
    moved = [i for i in items if Path(str(i.fspath)).name in _browser.NOTEBOOKS]
    if moved:
        config.hook.pytest_deselected(items=moved)
        items[:] = [i for i in items if i not in moved]
