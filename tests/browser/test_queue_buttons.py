"""The queue's reorder buttons in Debian's Chromium: four different icons, whatever fonts are installed.

They were the characters ⤒ ↑ ↓ ⤓, and a machine whose fonts lack ⤒ and ⤓ drew top like up and bottom like
down (or as the same empty box). The test draws them twice: with this machine's fonts, and with only the
Liberation fonts, the one font package Debian's chromium depends on."""

from __future__ import annotations

import os
from collections.abc import Iterator
from itertools import combinations
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS, SCREENSHOTS, log_in
from tests.webapp.factories import make_run

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]
MOVES = ("top", "up", "down", "bottom")
LIBERATION = Path("/usr/share/fonts/truetype/liberation")


def liberation_only(folder: Path) -> dict[str, str]:
    """The environment of a Chromium whose fontconfig sees the Liberation fonts and nothing else."""
    if not LIBERATION.is_dir():
        pytest.skip(f"needs the Liberation fonts at {LIBERATION} (apt-get install fonts-liberation)")
    conf = folder / "fonts.conf"
    conf.write_text(f"""<?xml version="1.0"?>
<!DOCTYPE fontconfig SYSTEM "fonts.dtd">
<fontconfig><dir>{LIBERATION}</dir><cachedir>{folder / "cache"}</cachedir></fontconfig>
""")
    return {**os.environ, "FONTCONFIG_FILE": str(conf)}


@pytest.fixture(params=["installed-fonts", "liberation-only"])
def fonts_page(request, chromium, asgi_server: str, demo, tmp_path: Path) -> Iterator[object]:  # type: ignore[no-untyped-def]
    """A logged-in page in a Chromium with this machine's fonts, or with only the Liberation fonts."""
    browser = chromium
    if request.param == "liberation-only":
        browser = chromium.browser_type.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
                                               env=liberation_only(tmp_path))
    context = browser.new_context(base_url=asgi_server, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.fonts = request.param  # type: ignore[attr-defined]
    log_in(page)
    yield page
    context.close()
    if browser is not chromium:
        browser.close()


# Draws a copy of a button alone at the page's top-left corner, in a form of the same class (so the same CSS
# applies): every copy at the same whole-pixel spot, so equal icons give equal pixels and only the icon differs.
PROBE = """button => {
  document.getElementById("icon-probe")?.remove();
  const form = document.createElement("form");
  form.id = "icon-probe";
  form.className = button.form.className;
  Object.assign(form.style, {position: "fixed", left: "0px", top: "0px", zIndex: "1000", padding: "4px", background: "#fff"});
  form.appendChild(button.cloneNode(true));
  document.body.appendChild(form);
}"""


def test_top_up_down_and_bottom_look_different(fonts_page, demo, screenshot) -> None:  # type: ignore[no-untyped-def]
    page = fonts_page
    user, base, dataset, config = demo
    run = make_run(user, base, dataset, config)  # queued: no scheduler runs here
    make_run(user, base, dataset, config)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for where, path in (("run", f"/runs/{run.pk}/"), ("runs", "/runs/")):
        page.goto(path)
        buttons = page.locator(".queue-moves").first.locator("button")
        expect(buttons).to_have_count(4)
        shots = {}
        for i, move in enumerate(MOVES):
            expect(buttons.nth(i)).to_have_attribute("value", move)
            buttons.nth(i).evaluate(PROBE)
            name = f"queue-button-{where}-{move}-{page.fonts}"
            shots[move] = page.locator("#icon-probe").screenshot(path=str(SCREENSHOTS / f"{name}.png"))
        page.evaluate("() => document.getElementById('icon-probe').remove()")
        alike = [(a, b) for a, b in combinations(MOVES, 2) if shots[a] == shots[b]]
        assert not alike, f"queue buttons that look alike on {path} with {page.fonts}: {alike}"
    screenshot(page, f"runs-queued-{page.fonts}")
