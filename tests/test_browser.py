"""Pages open cleanly in a real browser: a KENviz report.html and every page of the docs site.

Each page is served over http on 127.0.0.1 and opened in headless Chromium (Debian's
``chromium`` package, driven by Playwright's Python package, whose wheel carries its driver:
no browser download). A page fails on a console message of level error, an uncaught page
error, a failed or >= 400 request, a request to any host but the local one (the pages must
work offline), or an image (``<img>`` or CSS background) that does not load.
"""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from playwright.async_api import Browser, Route, async_playwright
from playwright.async_api import Error as PlaywrightError

from ken_hf.cli import main as ken

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path(os.environ.get("KEN_HF_CHROMIUM", "/usr/bin/chromium"))
# Headless, and nothing that reaches out on its own (a closed network refuses it, and it would
# be noise). Playwright gives each launch a fresh, empty --user-data-dir of its own.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOCAL_HOSTS = {"127.0.0.1", "localhost"}

# Every <img> loaded with real pixels, and every CSS background image loads (lazy images are
# made eager first). Returns one line per broken image.
CHECK_IMAGES = """async () => {
  const broken = [];
  const settle = (img) => img.complete ? Promise.resolve() : new Promise((done) => {
    img.addEventListener("load", done, {once: true});
    img.addEventListener("error", done, {once: true});
    setTimeout(done, 30000);
  });
  const images = [...document.images];
  for (const img of images) img.loading = "eager";
  await Promise.all(images.map(settle));
  for (const img of images) {
    if (!(img.complete && img.naturalWidth > 0 && img.naturalHeight > 0)) {
      broken.push(`<img> ${img.currentSrc || img.src || img.outerHTML.slice(0, 120)}`
                  + ` (${img.naturalWidth}x${img.naturalHeight})`);
    }
  }
  const urls = new Set();
  for (const element of document.querySelectorAll("*")) {
    for (const pseudo of [null, "::before", "::after"]) {
      const value = getComputedStyle(element, pseudo).backgroundImage;
      for (const match of value.matchAll(/url\\(["']?([^"')]+)["']?\\)/g)) urls.add(match[1]);
    }
  }
  for (const url of urls) {
    const ok = await new Promise((done) => {
      const img = new Image();
      img.onload = () => done(img.naturalWidth > 0 || url.includes(".svg")
                              || url.startsWith("data:image/svg"));
      img.onerror = () => done(false);
      setTimeout(() => done(false), 30000);
      img.src = url;
    });
    if (!ok) broken.push(`CSS background ${url.slice(0, 200)}`);
  }
  return broken;
}"""


class _Handler(SimpleHTTPRequestHandler):
    """Serves ``directory`` under the URL path ``prefix`` (where the site will live, e.g.
    ``/ken-hf/`` on GitHub Pages), 404 elsewhere; logs nothing."""

    prefix = "/"

    def translate_path(self, path: str) -> str:
        path = unquote(urlsplit(path).path)
        if not path.startswith(self.prefix):
            return str(Path(self.directory) / ".not-served" / "missing")
        return super().translate_path("/" + path[len(self.prefix) :])

    def log_message(self, format, *args) -> None:
        pass


class _Server:
    def __init__(self, folder: Path, prefix: str = "/"):
        handler = type("Handler", (_Handler,), {"prefix": prefix})
        self.httpd = ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(handler, directory=str(folder))
        )
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}{prefix}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def _chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} not found: tests/test_browser.py opens pages in Debian's Chromium; "
            "install it with `apt-get install -y --no-install-recommends chromium` (or point "
            "KEN_HF_CHROMIUM at a Chromium binary)"
        )
    return CHROMIUM


async def _page_problems(browser: Browser, url: str) -> list[str]:
    """Open ``url`` in a context of its own and return what went wrong on it (empty when
    nothing did). A request to a host but 127.0.0.1 or localhost is refused, and a problem."""
    problems: list[str] = []

    async def route(route: Route) -> None:  # the context's: pages and their workers
        if urlsplit(route.request.url).hostname in LOCAL_HOSTS:
            await route.continue_()
        else:
            problems.append(f"request to a non-local host: {route.request.url}")
            await route.abort()

    def console(message) -> None:
        if message.type == "error":
            where = f"{message.location['url']}:{message.location['lineNumber']}"
            problems.append(f"console error: {message.text} ({where})")

    def failed(request) -> None:  # a refused non-local request is reported by route
        if urlsplit(request.url).hostname in LOCAL_HOSTS:
            problems.append(f"request failed: {request.url} ({request.failure})")

    def response(response) -> None:
        if response.status >= 400:
            problems.append(f"HTTP {response.status}: {response.url}")

    context = await browser.new_context()
    context.set_default_timeout(120_000)  # generous: a CI machine may be busy
    try:
        await context.route("**/*", route)
        page = await context.new_page()
        page.on("console", console)
        page.on("pageerror", lambda error: problems.append(f"uncaught page error: {error}"))
        page.on("requestfailed", failed)
        page.on("response", response)
        await page.goto(url, wait_until="load")
        await page.wait_for_load_state("networkidle")  # what scripts fetch after load
        problems += [f"broken image: {line}" for line in await page.evaluate(CHECK_IMAGES)]
    except PlaywrightError as error:  # a timeout, a crash: reported with its page
        problems.append(f"{type(error).__name__}: {error}")
    finally:
        await context.close()
    return problems


async def _check_pages(urls: list[str], at_once: int = 4) -> dict[str, list[str]]:
    """``{url: problems}`` of every page of ``urls`` that has any, ``at_once`` pages open at
    a time (most of a page's time is the wait for its network to fall idle)."""
    chromium = _chromium()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True
        )
        slots = asyncio.Semaphore(at_once)

        async def check(url: str) -> tuple[str, list[str]]:
            async with slots:
                return url, await _page_problems(browser, url)

        try:
            results = await asyncio.gather(*(check(url) for url in urls))
        finally:
            await browser.close()
    return {url: problems for url, problems in results if problems}


def _report(found: dict[str, list[str]]) -> str:
    return "\n".join(f"{url}:\n  " + "\n  ".join(problems) for url, problems in found.items())


@pytest.fixture(scope="module")
def kenviz_report(minilm_subnetwork, tmp_path_factory) -> Path:
    """A report.html that ``ken viz`` writes for a real MiniLM subnetwork (conftest.py), its
    default views."""
    _, folder = minilm_subnetwork
    out = tmp_path_factory.mktemp("browser") / "kenviz"
    assert ken(["viz", str(folder), "--out", str(out)]) == 0
    return out / "report.html"


def test_kenviz_report_loads_every_image_without_errors(kenviz_report):
    assert kenviz_report.read_text().count("<img ") >= 4  # summary, kept, neighbours, layers
    with _Server(kenviz_report.parent) as server:
        found = asyncio.run(_check_pages([server.base + kenviz_report.name]))
    assert not found, "KENviz report.html in Chromium:\n" + _report(found)


class _IgnoreTags(yaml.SafeLoader):
    """mkdocs.yml may hold tags (``!ENV``, ``!!python/name:``) that safe YAML refuses."""


_IgnoreTags.add_multi_constructor("", lambda loader, suffix, node: None)
_IgnoreTags.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)


def test_every_docs_page_loads_every_image_without_errors(tmp_path):
    _chromium()  # before the build: say what is missing first
    config_file = ROOT / "mkdocs.yml"
    if not config_file.exists():
        pytest.skip("no mkdocs.yml: the docs site is not there yet")
    site = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stdout}{build.stderr}"
    pages = sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html"))
    assert "index.html" in pages and "404.html" in pages, pages
    # Served where site_url puts it (GitHub Pages: /ken-hf/), so that 404.html, whose links
    # are absolute paths from site_url, finds its stylesheets and scripts.
    site_url = (yaml.load(config_file.read_text(), Loader=_IgnoreTags) or {}).get("site_url")
    prefix = urlsplit(site_url or "/").path.rstrip("/") + "/"
    with _Server(site, prefix) as server:
        found = asyncio.run(_check_pages([server.base + page for page in pages]))
    assert not found, f"docs pages in Chromium ({len(pages)} opened):\n" + _report(found)
