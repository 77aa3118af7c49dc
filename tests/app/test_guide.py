"""The FastAPI example of the README runs as written (in its own interpreter)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.app.conftest import ROOT

GUIDE = ROOT / "README.md"

DRIVER = textwrap.dedent(
    """
    from starlette.testclient import TestClient

    with TestClient(app) as client:
        first = client.get("/demo/counter/increment").json()
        second = client.get("/demo/counter/increment").json()
        assert second["total_requests"] == first["total_requests"] + 1, (first, second)
        hits = client.get("/hits/home").json()
        assert hits == {"hits": 1, "top": {"page": "home"}}, hits
        assert client.get("/hits/home").json()["hits"] == 2
        assert client.get("/health/store").json()["status"] == "ok"
        assert any(getattr(r, "path", "") == "/ws/{user}" for r in app.routes)
    print("GUIDE EXAMPLE OK")
    """
)


def _fastapi_example() -> str:
    text = GUIDE.read_text()
    blocks: list[str] = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    return next(b for b in blocks if "FastAPI(lifespan=zeal.lifespan)" in b)


def test_the_readmes_fastapi_example_runs(tmp_path: Path) -> None:
    script = tmp_path / "guide_app.py"
    script.write_text(_fastapi_example() + DRIVER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZEAL_")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "GUIDE EXAMPLE OK" in out.stdout
