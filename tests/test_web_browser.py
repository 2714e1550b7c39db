"""A person in a real browser (headless Debian Chromium driven by Playwright) against a real server:
signs in, ranks one task by drag and drop and another by keyboard, votes in the arena, sees the
leaderboard change, and chats. Screenshots go to the test's tmp dir, and to $RLHFKIT_SCREENSHOTS
when set (the README's come from ``RLHFKIT_SCREENSHOTS=docs/screenshots pytest tests/test_web_browser.py``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from web_support import Server, make_run

from rlhfkit.feedback.store import Store, TaskIn

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed: pip install -e '.[dev]'")
if not Path(CHROMIUM).exists():
    pytest.skip(
        f"{CHROMIUM} is missing: apt-get install chromium chromium-driver (make test does it where apt works)",
        allow_module_level=True,
    )

TASKS = [
    (
        "How do I keep basil alive on a windowsill?",
        [
            "Water it when the top soil is dry and give it six hours of sun.",
            "Basil is a plant.",
            "Put it in the freezer.",
        ],
    ),
    (
        '<script>alert("x")</script> Write one line about tea.',
        [
            "Tea: hot leaves, patient water, a quiet minute.",
            '"><img src=x onerror=alert(1)> tea',
            "I cannot help with that.",
        ],
    ),
]


def shot(page, tmp: Path, name: str) -> None:
    path = tmp / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    out = os.environ.get("RLHFKIT_SCREENSHOTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(out) / path.name)


def test_person_in_a_browser(tiny_path, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    run = make_run(tmp_path, tiny_path)
    store = Store.for_run(run)
    store.create_user("maria", role="admin", password="password123")
    store.add_tasks(
        "round1",
        [
            TaskIn([{"role": "user", "content": p}], r, ["sft"] * 3, external_id=str(i))
            for i, (p, r) in enumerate(TASKS)
        ],
    )
    # earlier votes, so the leaderboard has something to show
    for a, b, o in [
        ("ppo1", "sft", "a"),
        ("ppo1", "base", "a"),
        ("sft", "base", "a"),
        ("base", "ppo1", "b"),
        ("sft", "ppo1", "tie"),
        ("base", "sft", "both_bad"),
        ("ppo1", "sft", "a"),
        ("sft", "base", "a"),
    ]:
        store.vote(1, store.add_battle(1, "earlier prompt", a, b, "...", "..."), o)
    server = Server(run, "--max-new-tokens", "12").start()
    dialogs: list[str] = []
    try:
        with sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(
                str(tmp_path / "profile"),
                executable_path=CHROMIUM,
                headless=True,
                args=FLAGS,
                viewport={"width": 1100, "height": 900},
            )
            page = ctx.new_page()
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            # generous: the arena and chat generate on the CPU, which other tests (xdist) share
            page.set_default_timeout(120_000)
            expect.set_options(timeout=120_000)

            # sign in
            page.goto(server.url + "/")
            page.fill("input[name=name]", "maria")
            page.fill("input[name=password]", "password123")
            page.click("button:has-text('Sign in')")
            page.wait_for_url("**/label")
            expect(page.locator("#progress")).to_contain_text("Ranked 0 · 2 left")

            # task 1: drag the last answer onto the top of the first
            cards = page.locator("li.answer")
            expect(cards).to_have_count(3)
            order = [cards.nth(i).get_attribute("data-index") for i in range(3)]
            cards.nth(2).drag_to(cards.nth(0), target_position={"x": 40, "y": 5})
            moved = [cards.nth(i).get_attribute("data-index") for i in range(3)]
            assert moved == [order[2], order[0], order[1]], (order, moved)
            expect(cards.nth(0).locator(".place")).to_have_text("#1")
            cards.nth(1).locator(".flag[value=off-topic]").check()
            page.fill("#better", "Water basil when the soil is dry; give it sun.")
            shot(page, tmp_path, "labeler")
            page.click("#submit")
            expect(page.locator("#progress")).to_contain_text("Ranked 1 · 1 left")

            # task 2 (injected markup shown as text): keyboard only
            expect(page.locator(".prompt .text")).to_contain_text('<script>alert("x")</script>')
            order = [cards.nth(i).get_attribute("data-index") for i in range(3)]
            page.keyboard.press("ArrowDown")  # focus the second answer
            page.keyboard.press("Shift+ArrowUp")  # move it to the top
            page.keyboard.press("ArrowDown")
            page.keyboard.press("ArrowDown")  # focus the third
            page.keyboard.press("t")  # tie it with the one above
            expect(cards.nth(2).locator(".place")).to_have_text("#2 (tie)")
            page.keyboard.press("Control+Enter")
            expect(page.locator("h1")).to_have_text("Nothing to rank right now")
            expect(page.locator("#progress")).to_contain_text("Ranked 2 · 0 left")

            ranked = {r["meta"]["external_id"]: r for r in store.rankings("round1")}
            r0 = ranked["0"]
            assert r0["ranks"][int(moved[0])] == 0 and sorted(r0["ranks"]) == [0, 1, 2]
            assert r0["meta"]["flags"] == [{"response": int(moved[1]), "kind": "off-topic"}]
            r1 = ranked["1"]["ranks"]
            assert r1[int(order[1])] == 0 and r1[int(order[0])] == r1[int(order[2])] == 1
            assert store.demonstrations()[0]["response"].startswith("Water basil")

            # arena: vote, then the leaderboard has one more vote
            page.goto(server.url + "/leaderboard")
            expect(page.locator("#total-votes")).to_contain_text("8 votes")
            page.click("nav >> text=Arena")
            page.fill("#arena-prompt", "Give me a name for a cat.")
            page.click("#arena-go")
            expect(page.locator("#answer-a")).to_be_visible()
            assert page.locator(".model-name").count() == 0
            page.click("button:has-text('A is better')")
            expect(page.locator("#voted")).to_contain_text("A is better")
            assert page.locator(".model-name").count() == 2
            page.click("text=See the leaderboard")
            expect(page.locator("#total-votes")).to_contain_text("9 votes")
            expect(page.locator("#leaderboard tbody tr")).to_have_count(3)
            shot(page, tmp_path, "leaderboard")

            # chat: streamed tokens appear in the conversation
            page.click("nav >> text=Chat")
            page.select_option("#model", "ppo1")
            page.fill("#message", "Hello! What can you do?")
            page.keyboard.press("Enter")
            reply = page.locator(".msg.assistant .text.done")
            expect(reply).to_have_count(1)
            assert reply.inner_text().strip()
            shot(page, tmp_path, "chat")
            # a message with markup is shown as the text typed (chat.js builds bubbles with textContent)
            typed = '<b>bold?</b> "><img src=x onerror=alert(1)> <script>alert(2)</script>'
            page.fill("#message", typed)
            page.keyboard.press("Enter")
            expect(reply).to_have_count(2)
            mine = page.locator(".msg.user .text").nth(1)
            assert mine.text_content() == typed
            assert page.locator("#log img, #log b, #log script").count() == 0
            assert page.locator(".msg.assistant .role").nth(1).text_content() == "ppo1"

            # the admin dashboard sees the work
            page.click("nav >> text=Admin")
            expect(page.locator("#labelers")).to_contain_text("maria")
            shot(page, tmp_path, "admin")
            ctx.close()
    finally:
        server.stop()
        store.close()
    assert dialogs == []  # no injected script ever ran
