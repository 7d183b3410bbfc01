"""The audit UI in a real browser: headless Debian Chromium driven through its chromedriver.

A real sidecar (uvicorn on loopback, the real model and catalog) is sent known traffic; the
browser logs in with a key, filters alerts, opens a conversation, sees shaded tokens and the
alert's explanation, opens a feature card, and a key of another tenant sees nothing of it.
Screenshots go to a temporary folder, or to ``$SM_SCREENSHOTS`` (the ones in docs/screenshots
were made with ``SM_SCREENSHOTS=docs/screenshots``).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from selenium.webdriver.remote.webdriver import WebDriver
from sqlalchemy.orm import Session

from monitor.localservices import ThreadedServer
from monitor.service.app import create_app
from monitor.service.keys import create_key
from monitor.service.monitored import Monitored
from monitor.service.settings import ServiceSettings

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

TRAFFIC = [
    (
        "invoice",
        {"app": "mail"},
        [
            {
                "role": "user",
                "content": "Can you check this message I got?\n\nSubject: URGENT - "
                "Your account will be SUSPENDED\n\nDear Customer, we detected unusual activity. "
                "Verify your bank details within 24 hours or lose access FOREVER. Click here and "
                "enter your card number and PIN to claim your $500 refund NOW!!! Limited offer, "
                "act today.",
            },
            {
                "role": "assistant",
                "content": "This looks like a phishing e-mail. Do not click the "
                "link or send any card details; contact your bank through its official website.",
            },
        ],
    ),
    (
        "library",
        {"app": "chat"},
        [
            {"role": "user", "content": "What time does the library open on Saturdays?"},
            {
                "role": "assistant",
                "content": "It opens at 10 a.m. on Saturdays and closes at 4 p.m.",
            },
        ],
    ),
]


@dataclass
class Site:
    base: str
    key: str
    other_key: str
    conversation: str


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, monitored: Monitored) -> Iterator[Site]:
    db = tmp_path_factory.mktemp("browser") / "monitor.db"
    settings = ServiceSettings(database_url=f"sqlite:///{db}", retention_interval_s=0)
    app = create_app(settings, [monitored])
    server = ThreadedServer(app).start()
    try:
        run = uuid.uuid4().hex[:6]
        with Session(app.state.monitor.engine) as session:
            keys = {
                (t, r): create_key(session, t, r)
                for t in ("acme", "globex")
                for r in ("ingest", "read")
            }
            session.commit()
        base = f"http://localhost:{server.port}"  # Chrome keeps secure cookies on localhost
        for tenant in ("acme", "globex"):
            for name, meta, messages in TRAFFIC:
                r = httpx.post(
                    f"{base}/v1/turns",
                    timeout=120,
                    headers={"Authorization": f"Bearer {keys[tenant, 'ingest']}"},
                    json={
                        "conversation_id": f"{tenant}-{name}-{run}",
                        "messages": messages,
                        "metadata": meta,
                    },
                )
                assert r.status_code == 200, r.text
        yield Site(base, keys["acme", "read"], keys["globex", "read"], f"acme-invoice-{run}")
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.skip(
            "Debian chromium and chromium-driver are not installed "
            "(scripts/system-deps.sh installs them for the suite)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1360,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    # A click that submits a form returns before the next page is there: element lookups wait
    # for it (a busy machine takes seconds), URL checks wait explicitly.
    driver.implicitly_wait(20)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = os.environ.get("SM_SCREENSHOTS")
    path = Path(target) if target else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _login(driver: WebDriver, base: str, key: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{base}/ui/login")
    driver.find_element(By.ID, "key").send_keys(key)
    driver.find_element(By.ID, "login").click()
    WebDriverWait(driver, 30).until(ec.presence_of_element_located((By.ID, "tenant")))


def test_auditor_logs_in_filters_and_reads_an_explained_alert(
    site: Site, browser: WebDriver, shots: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    d = browser
    d.get(f"{site.base}/ui/alerts")
    assert "/ui/login" in d.current_url
    d.find_element(By.ID, "key").send_keys("smk_not-a-key")
    d.find_element(By.ID, "login").click()
    assert "not valid" in d.find_element(By.ID, "login-error").text
    d.save_screenshot(str(shots / "login.png"))

    _login(d, site.base, site.key)
    WebDriverWait(d, 30).until(lambda drv: drv.current_url.endswith("/ui/alerts"))
    cookies = {c["name"]: c for c in d.get_cookies()}
    assert cookies["sm_key"]["httpOnly"] and cookies["sm_key"]["secure"]
    assert d.find_element(By.ID, "tenant").text == "acme"
    rows = d.find_elements(By.CSS_SELECTOR, "tr.alert-row")
    assert rows and all("acme-" in r.text for r in rows)
    Select(d.find_element(By.ID, "f-detector")).select_by_value("scam_email")
    d.find_element(By.ID, "apply").click()
    WebDriverWait(d, 30).until(lambda drv: "detector=scam_email" in drv.current_url)
    rows = d.find_elements(By.CSS_SELECTOR, "tr.alert-row")
    assert [r.get_attribute("data-detector") for r in rows] == ["scam_email"]
    d.save_screenshot(str(shots / "alerts.png"))

    rows[0].find_element(By.CSS_SELECTOR, "a.conv-link").click()
    assert site.conversation in d.find_element(By.ID, "conversation-id").text
    alert = d.find_element(By.CSS_SELECTOR, '.alert[data-detector="scam_email"]')
    assert "fired" in alert.text and "score" in alert.text
    assert alert.find_elements(By.CSS_SELECTOR, "table.evidence tr")
    assert alert.find_elements(By.CSS_SELECTOR, "code.evidence-token")
    shades = [
        float(s.get_attribute("data-shade") or "nan")
        for s in d.find_elements(By.CSS_SELECTOR, "span.tok")
    ]
    assert max(shades) > 0.5 and min(shades) == 0.0
    top = max(shades)
    strongest = next(
        s
        for s in d.find_elements(By.CSS_SELECTOR, "span.tok")
        if float(s.get_attribute("data-shade") or "nan") == top
    )
    colour = strongest.value_of_css_property("background-color")
    assert colour.startswith("rgba(234, 88, 12"), colour
    white = d.find_element(By.CSS_SELECTOR, 'span.tok[data-shade="0.0"]')
    assert white.value_of_css_property("background-color") in ("rgba(0, 0, 0, 0)", "transparent")
    d.save_screenshot(str(shots / "conversation.png"))

    alert.find_element(By.CSS_SELECTOR, "table.evidence a").click()
    WebDriverWait(d, 30).until(lambda drv: "/ui/features/" in drv.current_url)
    used_by = d.find_element(By.ID, "used-by").text
    assert "scam_email" in used_by
    assert d.find_elements(By.CSS_SELECTOR, "#contexts mark")
    d.save_screenshot(str(shots / "feature.png"))


def test_another_tenant_sees_nothing_of_it(site: Site, browser: WebDriver) -> None:
    from selenium.webdriver.common.by import By

    d = browser
    d.delete_all_cookies()
    _login(d, site.base, site.other_key)
    assert d.find_element(By.ID, "tenant").text == "globex"
    page = d.find_element(By.TAG_NAME, "main").text
    assert "acme-" not in page and "globex-" in page
    d.get(f"{site.base}/ui/conversations/{site.conversation}")
    assert "Not found" in d.find_element(By.TAG_NAME, "h1").text
    d.find_element(By.CSS_SELECTOR, "header button").click()
    d.get(f"{site.base}/ui/alerts")
    assert "/ui/login" in d.current_url
