"""A headless Chromium driven by Selenium, for the page's tests and the documentation screenshot.

Uses the system's Chromium and chromedriver (Debian: ``apt-get install chromium chromium-driver``) and
never Selenium Manager, which would download a browser: everything runs offline.
"""

from __future__ import annotations

import shutil
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMEDRIVER_NAMES = ("chromedriver",)


def _first_on_path(names: tuple[str, ...]) -> str | None:
    return next((found for name in names if (found := shutil.which(name))), None)


def find_chromium() -> tuple[str, str] | None:
    """(browser, driver) executables, or None when either is missing."""
    browser, driver = _first_on_path(CHROMIUM_NAMES), _first_on_path(CHROMEDRIVER_NAMES)
    return (browser, driver) if browser and driver else None


def headless_chromium(profile_dir: Path, download_dir: Path | None = None, width: int = 1280, height: int = 900):
    """A fresh headless Chromium (its own profile in ``profile_dir``) whose downloads land in ``download_dir``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = find_chromium()
    if found is None:
        raise FileNotFoundError("chromium and chromedriver not found; install them (Debian: "
                                "`apt-get install -y chromium chromium-driver`)")
    browser, driver = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                 f"--user-data-dir={profile_dir}", f"--window-size={width},{height}", "--hide-scrollbars"):
        options.add_argument(flag)
    if download_dir is not None:
        options.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                                  "download.prompt_for_download": False,
                                                  "download.directory_upgrade": True})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    chrome.set_window_size(width, height)
    return chrome
