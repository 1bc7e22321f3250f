"""The built-in page (src/ember/web/): `/` for a browser, its files under /web/, with a strict policy.

`GET /` answers a browser (Accept: text/html) with the page and anything else with "ember is running", as
Ollama's clients expect. The files are static ES modules and vendored libraries shipped in the package; no
build step runs at install and nothing comes from another host. Model output is untrusted: the page renders it
through marked and DOMPurify, and the Content-Security-Policy below allows scripts, styles and connections from
this origin only (no inline script, no eval), so injected markup cannot run even if it got past the sanitizer.
The page and its files are open without an API key (they hold no data); every call the page makes sends the
key it asks for.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, PlainTextResponse, Response

from ember.errors import EmberError

router = APIRouter()

PAGE_ROOT = Path(str(resources.files("ember.web")))
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; font-src 'self'; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-cache",  # revalidated (ETag) so that an upgraded ember serves its new page at once
}
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}


class PageFileNotFoundError(EmberError):
    """No such file in the page."""

    http_status = 404


def page_file(relative: str) -> Path:
    """A file of the page by its path under src/ember/web/, never one outside it."""
    path = (PAGE_ROOT / relative).resolve()
    if not path.is_relative_to(PAGE_ROOT.resolve()) or not path.is_file() or path.suffix not in _MEDIA_TYPES:
        raise PageFileNotFoundError(f"no file {relative!r} in the page")
    return path


def _serve(path: Path) -> FileResponse:
    return FileResponse(path, media_type=_MEDIA_TYPES[path.suffix], headers=PAGE_HEADERS)


@router.get("/")
@router.head("/")
async def root(request: Request) -> Response:
    if "text/html" in request.headers.get("accept", ""):
        return _serve(page_file("index.html"))
    return PlainTextResponse("ember is running")


@router.get("/web/{relative:path}")
async def web_file(relative: str) -> Response:
    return _serve(page_file(relative))
