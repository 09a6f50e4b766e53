"""The web UI in a real browser: Debian's headless Chromium driven by Playwright, against a real registry
process filled through the real client API. Pages render the data (tables, one chart per metric, the
lineage picture), a promotion through a form moves the alias (checked through the API), one refused by
the alias's policy lists the failed rules, a read-only token gets no forms and is refused, and logging
out ends the session. A screenshot of every page visited is kept in test-artifacts/ui/.

Chromium comes from Debian (``make install`` installs it); Playwright never downloads a browser here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _support.adapters import make_adapter
from _support.auth import token_in_database
from _support.servers import Backend, ServerProcess
from playwright.sync_api import Browser, Page, sync_playwright

from deltareg.client.api import Registry

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ui"
REPO = "acme/bot"
BASE = "tmv1:" + "ab" * 32


@dataclass
class Site:
    url: str
    database_url: str
    tokens: dict[str, str]

    def registry(self, cache: Path, as_name: str = "alice") -> Registry:
        return Registry(self.url, token=self.tokens[as_name], cache_dir=cache, progress=False)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A registry process (SQLite + blob folder, anonymous reads off) holding four versions of acme/bot:
    1 <- 2 <- 4 stacked, 3 alone; production on 1 then 2; staging on 2 with a policy (accuracy >= 0.75)."""
    from deltareg.registry.config import Settings
    from deltareg.registry.migrate import upgrade

    root = tmp_path_factory.mktemp("ui")
    data_dir = root / "data"
    database_url = Settings(data_dir=data_dir).database_url
    upgrade(database_url)
    backend = Backend(
        "sqlite-fs", {"DELTAREG_DATA_DIR": str(data_dir), "DELTAREG_ANONYMOUS_READ": "false"}, data_dir
    )
    server = ServerProcess(backend, root / "server.log")
    server.start()
    try:
        tokens = {name: token_in_database(database_url, name) for name in ("alice", "carol")}
        tokens["reader"] = token_in_database(database_url, "reader", scopes=("read",))
        site = Site(server.url, database_url, tokens)
        _fill(site, root)
        yield site
    finally:
        server.stop()
    assert server.server_errors() == [], f"{server.log_path} shows 5xx answers"


def _fill(site: Site, root: Path) -> None:
    with site.registry(root / "cache") as registry:
        scores = [
            {"accuracy": 0.7, "loss": 0.9},
            {"accuracy": 0.8, "loss": 0.5},
            {"accuracy": 0.6, "loss": 0.4},
            {"accuracy": 0.85, "loss": 0.45},
        ]
        parents = [None, f"{REPO}:1", None, f"{REPO}:2"]
        for i, (evals, parent) in enumerate(zip(scores, parents, strict=True)):
            adapter = make_adapter(root / f"adapter-{i}", seed=i)
            pushed = registry.push(adapter, REPO, base=BASE, parent=parent, evals=evals)
            assert pushed.version.number == i + 1
        registry.promote(f"{REPO}:1", "production", expected=None)
        registry.promote(f"{REPO}:2", "production", reason="better accuracy")
        registry.set_policy(REPO, "staging", {"min": {"accuracy": 0.75}})
        registry.promote(f"{REPO}:2", "staging", expected=None)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM.exists(), "Chromium is missing: `make install` installs Debian's chromium package"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser, site: Site) -> Iterator[Page]:
    """A fresh browser context (no cookies) and page for each test."""
    context = browser.new_context(base_url=site.url, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    yield page
    context.close()


def shoot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def log_in(page: Page, token: str) -> None:
    page.goto("/ui/login")
    page.fill("#token", token)
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#whoami")


def alias_holder(site: Site, alias: str, tmp_path: Path) -> int:
    with site.registry(tmp_path / "check") as registry:
        return next(int(a["version"]) for a in registry.aliases(REPO) if a["name"] == alias)


# ---- tests ----------------------------------------------------------------------------------------


def test_pages_render_the_registry_data(page, site):
    response = page.goto("/ui")
    assert response.status == 401 and page.locator("#login-needed").is_visible()
    shoot(page, "01-login-needed")
    page.click("#login-needed")
    shoot(page, "02-login")
    page.fill("#token", site.tokens["alice"])
    page.click("#login-form button[type=submit]")
    assert page.inner_text("#whoami") == "alice"
    assert page.locator("#repos tr.repo").count() == 1 and page.locator(f"text={REPO}").count() >= 1
    shoot(page, "03-repos")

    page.fill("#where", "accuracy>=0.8")
    page.click("#search-form button[type=submit]")
    assert sorted(page.locator("#hits tr.hit a").all_inner_texts()) == [f"{REPO}:2", f"{REPO}:4"]
    shoot(page, "04-search")

    page.goto(f"/ui/repos/{REPO}")
    assert page.locator("#versions tr.version").count() == 4
    charts = page.locator("svg.chart")
    assert charts.count() == 2
    assert page.locator('svg.chart[data-metric="accuracy"] circle.point').count() == 4
    assert page.locator('svg.chart[data-metric="loss"] circle.point').count() == 4
    assert page.locator('svg.chart[data-metric="accuracy"] text.x-tick').all_text_contents() == [
        "1",
        "2",
        "3",
        "4",
    ]
    production = page.locator('article.alias[data-alias="production"]')
    assert production.locator("a.holder").inner_text() == "version 2"
    assert production.locator("tr.move").count() == 2 and "better accuracy" in production.inner_text()
    shoot(page, "05-repo")

    page.goto(f"/ui/repos/{REPO}/versions/2")
    lineage = page.locator("svg.lineage")
    assert lineage.locator("g.node").count() == 3  # 1 above, 2 itself, 4 below
    assert lineage.locator('g.node[data-role="ancestor"]').get_attribute("data-ref") == f"{REPO}:1"
    assert lineage.locator('g.node[data-role="descendant"]').get_attribute("data-ref") == f"{REPO}:4"
    assert lineage.locator("g.base-node").count() == 1 and lineage.locator("line.edge").count() == 2
    tags = lineage.locator("g.alias-tag").evaluate_all("tags => tags.map(t => t.dataset.alias)")
    assert sorted(tags) == [f"{REPO}@production", f"{REPO}@staging"]
    assert page.locator("#files tr.file").count() == 2 and "deltareg.manifest.v1" in page.inner_text(
        "#manifest"
    )
    shoot(page, "06-version")

    page.goto(f"/ui/audit?repo={REPO}")
    actions = page.locator("#audit td.action").all_inner_texts()
    assert actions.count("push") == 4 and "policy.set" in actions and actions.count("alias.promote") == 3
    shoot(page, "07-audit")


def test_a_promotion_through_the_ui_moves_the_alias(page, site, tmp_path):
    log_in(page, site.tokens["carol"])
    page.goto(f"/ui/repos/{REPO}")
    form = page.locator('article.alias[data-alias="production"] form.promote-form')
    form.locator("select[name=version]").select_option("4")
    form.locator("input[name=reason]").fill("promoted in the browser")
    form.locator("button[type=submit]").click()
    page.wait_for_load_state()
    assert page.url.endswith(f"/ui/repos/{REPO}") and page.locator("#problem").count() == 0
    production = page.locator('article.alias[data-alias="production"]')
    assert production.locator("a.holder").inner_text() == "version 4"
    assert "promoted in the browser" in production.inner_text()
    shoot(page, "08-promoted")
    assert alias_holder(site, "production", tmp_path) == 4


def test_a_promotion_refused_by_policy_shows_the_failed_rules(page, site, tmp_path):
    log_in(page, site.tokens["carol"])
    page.goto(f"/ui/repos/{REPO}")
    form = page.locator('article.alias[data-alias="staging"] form.promote-form')
    form.locator("select[name=version]").select_option("3")
    with page.expect_response(re.compile(r"/promote$")) as answer:
        form.locator("button[type=submit]").click()
    assert answer.value.status == 403
    assert page.locator("#failed-rules li.failed-rule").all_inner_texts() == ["accuracy 0.6 < minimum 0.75"]
    assert "policy_violation" in page.inner_text("#problem")
    shoot(page, "09-policy-refused")
    assert alias_holder(site, "staging", tmp_path) == 2


def test_a_read_only_token_gets_no_forms_and_is_refused(page, site, tmp_path):
    log_in(page, site.tokens["reader"])
    page.goto(f"/ui/repos/{REPO}")
    assert page.locator("form.promote-form, form.rollback-form, #new-alias-form").count() == 0
    page.goto(f"/ui/repos/{REPO}/versions/3")
    assert page.locator("#yank-form, #approve-form").count() == 0
    shoot(page, "10-read-only")
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")  # the logout form's
    before = alias_holder(site, "production", tmp_path)
    form = {"csrf": str(csrf), "alias": "production", "version": "3", "expected": str(before)}
    refused = page.request.post(f"/ui/repos/{REPO}/promote", form=form, max_redirects=0)
    assert refused.status == 403 and "needs &#39;promote&#39;" in refused.text()
    assert alias_holder(site, "production", tmp_path) == before


def test_logging_out_ends_the_session(page, site):
    log_in(page, site.tokens["alice"])
    page.click("#logout")
    page.wait_for_selector("#login-form")
    shoot(page, "11-logged-out")
    assert page.context.cookies() == []
    assert page.goto("/ui").status == 401
