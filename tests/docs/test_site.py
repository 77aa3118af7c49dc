"""The documentation site builds with ``mkdocs build --strict``, offline, and says what it must."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.docs.blocks import ROOT

VENV_BIN = Path(sys.executable).parent
PUBLIC_MODULES = [
    "zeal_asgi",
    "zeal_asgi.cache",
    "zeal_asgi.fastapi",
    "zeal_asgi.health",
    "zeal_asgi.ws",
    "zeal_asgi.streams",
    "zeal_asgi.errors",
    "zeal_asgi.store",
    "zeal_asgi.settings",
    "zeal_asgi.locks",
]


def test_site_builds_strict_and_offline(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run(
        [str(VENV_BIN / "mkdocs"), "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "WARNING" not in out.stderr, out.stderr
    pages = list(site.rglob("*.html"))
    assert len(pages) >= 20
    for page in pages:
        html = page.read_text()
        # Nothing is fetched from another host: no CDN scripts, styles or fonts.
        external = re.findall(r'<(?:script|link|img)\b[^>]*(?:src|href)="(https?:)?//', html)
        assert not external, f"{page.relative_to(site)} loads from the network"
    assert ".py" not in {p.suffix for p in site.rglob("*")}  # the build's own scripts stay out

    # The API reference shows every public module, and Table/Atomic with their docstrings.
    reference = "".join(p.read_text() for p in (site / "reference").rglob("*.html"))
    for module in PUBLIC_MODULES:
        assert f'id="{module}"' in reference, module
    for name in ("zeal_asgi.Table.incr", "zeal_asgi.Atomic.increment", "zeal_asgi.Store.get"):
        assert f'id="{name}"' in reference, name
    assert "atomically" in reference  # the compiled module's docstrings made it in
    assert ":class:`" not in reference

    # The benchmark page shows the charts drawn from its tables.
    bench = (site / "benchmarks" / "index.html").read_text()
    charts = re.findall(r'src="\.\./img/(bench-[\w-]+\.svg)"', bench)
    assert len(charts) >= 5 and all((site / "img" / c).is_file() for c in charts)


def test_charts_match_the_published_tables() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "charts.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr


def test_readme_is_one_screen_that_starts_with_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, re.DOTALL)
    assert blocks[0].startswith("./scripts/run-example")
    assert blocks[1].strip() == "./scripts/test"
    assert text.index("./scripts/test") < text.index("## ")
    assert len(text.splitlines()) <= 80
    for needed in ('pip install "zeal-asgi[fastapi,redis]"', "3.11, 3.12 and 3.13", "Linux"):
        assert needed in text, needed
    for extra in ("redis", "memcached", "fastapi", "server", "example", "dev", "bench"):
        assert f"`{extra}`" in text, extra
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).is_file(), link
