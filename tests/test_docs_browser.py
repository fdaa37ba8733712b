"""The built documentation as a reader sees it: headless Chromium on a local copy of the site.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them when it can) and
the ``selenium`` package (the ``test`` extra); skipped, saying which is missing, otherwise.
Screenshots of every page opened are saved in the test's temporary folder.
"""

from __future__ import annotations

import functools
import http.server
import re
import shutil
import threading
import urllib.error
import urllib.request
from urllib.parse import urldefrag, urljoin, urlparse

import pytest

from test_docs import RAW_RST, build_site

WIDTH, HEIGHT = 1280, 1000  # the window the tables and code blocks must fit
# (page, what it is, how many equations it shows at least)
PAGES = [("", "home", 0), ("api/distributed/", "api_with_equations", 4),
         ("concepts/", "concepts", 50), ("cli/", "cli_reference", 0)]


def chromium_paths() -> tuple[str, str]:
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                   "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("no headless browser: Chromium and chromedriver are not on PATH "
                    "(apt-get install chromium chromium-driver; .ci/run does so as root)")
    return browser, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver",
                                    reason="selenium is not installed: pip install -e '.[test]'")
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", f"--window-size={WIDTH},{HEIGHT}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def served_site(tmp_path_factory):
    """The built site over HTTP on the loopback interface (the theme's search needs HTTP)."""
    site = build_site(tmp_path_factory.mktemp("site"))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200, url
        return response.read().decode("utf-8")


@pytest.mark.parametrize("path, name, equations", PAGES)
def test_page_renders_math_and_no_raw_markup_fits_the_window_and_links_resolve(
        browser, served_site, tmp_path, path, name, equations):
    browser.get(served_site + path)
    browser.save_screenshot(str(tmp_path / f"{name}.png"))

    text = browser.execute_script("return document.querySelector('article').innerText")
    assert len(text) > 500, f"{name}: the page shows almost nothing"
    raw = sorted({m.group(0) for m in RAW_RST.finditer(text)})
    assert not raw, f"{name}: raw reStructuredText is visible: {raw}"
    assert "\\frac" not in text and "$$" not in text, f"{name}: TeX is visible as text"

    # the equations are MathML elements that Chromium laid out (a width and a height each)
    sizes = browser.execute_script("""
        return Array.from(document.querySelectorAll('article math')).map(m => {
            const box = m.getBoundingClientRect();
            return [m instanceof MathMLElement, box.width, box.height];
        });""")
    assert len(sizes) >= equations, f"{name}: {len(sizes)} equations, expected {equations}"
    assert all(is_mathml and w > 0 and h > 0 for is_mathml, w, h in sizes), (name, sizes[:5])
    if equations:
        browser.execute_script(
            "document.querySelector('article math[display=block]').scrollIntoView()")
        browser.save_screenshot(str(tmp_path / f"{name}_equation.png"))

    # nothing scrolls sideways in a 1280-pixel window: the page, its tables, its code blocks
    overflowing = browser.execute_script("""
        const wide = el => el.scrollWidth > el.clientWidth + 1;
        const found = [];
        if (document.documentElement.scrollWidth > window.innerWidth + 1) found.push('page');
        document.querySelectorAll('article .md-typeset__scrollwrap, article table, article pre')
            .forEach(el => { if (wide(el)) found.push(el.tagName + ': '
                + el.innerText.slice(0, 60)); });
        return found;""")
    assert not overflowing, f"{name}: scrolls sideways at {WIDTH} px: {overflowing}"

    # every internal link resolves: the page exists, and so does the heading or entry it names
    links = browser.execute_script(
        "return Array.from(document.querySelectorAll('a[href]')).map(a => a.href)")
    internal = {link for link in links if link.startswith(served_site)}
    assert len(internal) > 10, f"{name}: only {len(internal)} internal links"
    pages: dict[str, str] = {}
    for link in sorted(internal):
        page, fragment = urldefrag(link)
        if page not in pages:
            try:
                pages[page] = fetch(page)
            except urllib.error.HTTPError as error:
                pytest.fail(f"{name}: link {link} -> HTTP {error.code}")
        if fragment:
            assert re.search(rf'id="{re.escape(fragment)}"', pages[page]), \
                f"{name}: link {link}: no element with id {fragment!r}"


def test_search_finds_an_api_entry(browser, served_site, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(served_site)
    browser.find_element(By.CSS_SELECTOR, "label.md-search__icon, .md-search__input").click()
    box = browser.find_element(By.CSS_SELECTOR, "input.md-search__input")
    box.send_keys("hebbian_update")
    results = WebDriverWait(browser, 30).until(expected_conditions.presence_of_all_elements_located(
        (By.CSS_SELECTOR, ".md-search-result__item a")))
    browser.save_screenshot(str(tmp_path / "search.png"))
    targets = [urlparse(r.get_attribute("href")).path for r in results]
    assert any(t.endswith("/api/ops/") for t in targets), targets
    fetch(urljoin(served_site, targets[0]))
