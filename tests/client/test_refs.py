"""Repository names and references: strict ASCII names (no confusables), no traversal, no reserved names."""

from __future__ import annotations

import pytest

from deltareg.client.errors import InvalidName, InvalidReference
from deltareg.client.refs import Reference, RepoName


@pytest.mark.parametrize(
    "text",
    [
        "acme/../etc",
        "acme/a..b",
        "../acme/bot",
        "acme/bot/",
        "Acme/bot",  # upper case: two spellings of one name
        "acme/bоt",  # Cyrillic 'о': a confusable of "bot"
        "acme/bot\u200b",  # zero-width space
        "acme/bot\x00",
        "acme/bot.",  # Windows strips a trailing dot
        "acme/con",
        "acme/nul.json",
        "com1/bot",
        "-acme/bot",
        "acme/" + "x" * 65,
    ],
)
def test_hostile_repository_names_are_refused(text):
    with pytest.raises(InvalidName):
        RepoName.parse(text)


@pytest.mark.parametrize("text", ["acme/support-bot", "a/b", "team-1/bot_v2.1", "acme/console", "acme/lpt"])
def test_ordinary_names_are_accepted(text):
    assert str(RepoName.parse(text)) == text


@pytest.mark.parametrize(
    "text", ["acme/bot@Prod", "acme/bot@sha256:abc", "acme/bot:0", "acme/bot:-1", "acme/bot:1e3", "acme/bot@"]
)
def test_hostile_references_are_refused(text):
    with pytest.raises((InvalidName, InvalidReference)):
        Reference.parse(text)
