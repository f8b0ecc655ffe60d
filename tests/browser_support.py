"""Headless Chromium (Debian's chromium through its chromedriver, driven by Selenium) on the page at /ui.

`require(browser, *modules)` skips a test where the browser, its driver or a python package is missing, naming
what is missing; under CI (the CI environment variable set, as .ci/run runs) it fails instead, since CI
installs them and must not skip the page's tests. `Page` wraps the few things the tests do on the page, each
waiting for its effect.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# what runs here: no sandbox (root), no GPU, and no connection Chromium would make on its own (there is no network)
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,960")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"  # screenshots (gitignored)
WAIT_S = 90.0  # the longest wait for one thing on the page (a busy 2-core machine)


def missing(browser: bool, *modules: str) -> str | None:
    """What a test needs and this machine lacks, as a skip reason (None: nothing)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if browser and not p.exists()]
    for module in (("selenium",) if browser else ()) + modules:
        try:
            __import__(module)
        except ImportError:
            missing.append(f"the python package {module}")
    if not missing:
        return None
    return ("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver) and the test "
            "and ui extras; missing: " + ", ".join(missing))


def require(browser: bool, *modules: str) -> None:
    reason = missing(browser, *modules)
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI installs them: .ci/run; the browser tests must not skip there)")
    pytest.skip(reason)


def start_chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS + (f"--user-data-dir={tempfile.mkdtemp(prefix='omni-chromium-')}",):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


class Page:
    def __init__(self, driver, base_url: str):
        self.driver, self.url = driver, base_url.rstrip("/") + "/ui/"

    def _by_css(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def wait(self, condition, what: str, seconds: float = WAIT_S):
        deadline = time.monotonic() + seconds
        while True:
            try:
                value = condition()
            except Exception:  # noqa: BLE001 - an element replaced while read: read it again
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                self.screenshot("timeout")
                raise AssertionError(f"the page did not show {what} within {seconds:g} s")
            time.sleep(0.05)

    # --- loading, logging in -------------------------------------------------------------------------------------
    def open(self) -> str:
        """Load the page fresh -> "page" or "login" (which one came)."""
        self.driver.get(self.url)
        return self.wait(lambda: ("page" if self._by_css("#run") else None) or
                         ("login" if self._by_css("input[type=password]") else None), "the page or its login form")

    def login(self, user: str, password: str) -> None:
        (name,) = self._by_css("input[type=text]")
        (secret,) = self._by_css("input[type=password]")
        name.send_keys(user)
        secret.send_keys(password)
        next(b for b in self._by_css("button") if b.text.strip() == "Login").click()

    def login_error(self) -> str:
        return self.wait(lambda: next((e.text for e in self._by_css(".auth, form, div") if
                                       "Incorrect Credentials" in e.text), None), "the login refusal")

    # --- the page's fields ---------------------------------------------------------------------------------------
    def pick_sample(self, index: int) -> str:
        samples = self.wait(lambda: self._by_css("#samples button.gallery-item"), "the sample clips")
        name = samples[index].text
        samples[index].click()
        self.wait(lambda: self._by_css("#video video"), "the sample clip in the video field")
        return name

    def sample_names(self) -> list[str]:
        return [b.text for b in self.wait(lambda: self._by_css("#samples button.gallery-item"), "the samples")]

    def upload_video(self, path: Path) -> None:
        clear = self._by_css("#video button[aria-label=Clear]")
        if clear:
            clear[0].click()
        field = self.wait(lambda: self._by_css("#video input[type=file]"), "the video upload field")
        field[0].send_keys(str(path))
        self.wait(lambda: self._by_css("#video video"), "the uploaded clip")

    def open_sampling(self) -> None:
        if not self._by_css("#n input[type=number]"):
            self._by_css("#sampling button.label-wrap")[0].click()
            self.wait(lambda: self._by_css("#n input[type=number]"), "the sampling settings")

    def set_number(self, elem_id: str, value) -> None:
        from selenium.webdriver.common.keys import Keys

        self.open_sampling()
        (field,) = self._by_css(f"#{elem_id} input[type=number]")
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(str(value), Keys.TAB)
        self.wait(lambda: field.get_attribute("value") == str(value), f"{elem_id} = {value}")

    def recognize(self) -> None:
        self._by_css("#run")[0].click()

    # --- what it shows ------------------------------------------------------------------------------------------
    def reasoning(self) -> str:
        return self._by_css("#reasoning textarea")[0].get_attribute("value")

    def emotion(self) -> str:
        found = self._by_css("#emotion [data-testid=label-output-value]")
        return found[0].text if found else ""

    def note(self) -> str:
        return self._by_css("#label-note")[0].text

    def timings(self) -> str:
        return self._by_css("#timings")[0].text.strip()

    def error(self) -> str:
        found = [e for e in self._by_css("#error") if e.is_displayed()]
        return found[0].text.strip() if found else ""

    def answers(self) -> list[list[str]]:
        """The n answers' table, row by row (its data rows are div[role=row], their cells [role=gridcell])."""
        rows = [r for r in self._by_css("#answers div[role=row]") if r.is_displayed()]
        return [[c.text for c in sorted(r.find_elements("css selector", "[role=gridcell]"),
                                        key=lambda c: int(c.get_attribute("aria-colindex")))] for r in rows]

    def wait_done(self) -> None:
        """Until the answer is complete (its timings shown) or an error is (on a freshly opened page: what an
        earlier answer left shows until the next one clears it)."""
        self.wait(lambda: self.timings() or self.error(), "the finished answer or an error")

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.driver.execute_script("document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0)")
        self.driver.save_screenshot(str(path))
        return path
