"""The interactive charts in a real Chromium: two runs picked on the runs list are overlaid on the compare page,
hovering shows both runs' values, the x-axis switches to time; the run page draws its charts and fits a phone.
No Content-Security-Policy violation anywhere (uPlot sizes its elements through the CSSOM, which it allows)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from playwright.sync_api import expect

from tests.browser.conftest import PASSWORD, USERNAME, log_in
from webapp.catalog.models import BaseModel, Dataset, LoraConfig
from webapp.training.models import TrainingRun

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]
START = 1_800_000_000.0


def curve(steps: int, scale: float, every_s: float) -> list[dict[str, Any]]:
    return [{"step": s, "loss": round(scale / s, 6), "learning_rate": 2e-4 * (1 - s / (steps + 1)), "grad_norm": 0.5,
             "tokens_per_s": 900.0 + s, "num_tokens": 400.0 * s, "time": START + every_s * s,
             **({"eval_loss": round(scale / s + 0.05, 6)} if s % 10 == 0 else {})} for s in range(1, steps + 1)]


def two_runs() -> tuple[TrainingRun, TrainingRun]:
    owner = get_user_model().objects.create_user(USERNAME, password=PASSWORD)
    base = BaseModel.objects.create(name="tiny", source="/models/tiny")
    data = Dataset.objects.create(name="toy", uri="file:///toy", original_filename="toy.jsonl", format="text",
                                  row_count=10, size_bytes=100, sha256="0" * 64)
    config = LoraConfig.objects.create(name="r8", params={"r": 8, "alpha": 16})

    def run(name: str, lr: float, scale: float, every_s: float) -> TrainingRun:
        return TrainingRun.objects.create(
            owner=owner, base_model=base, dataset=data, lora_config=config, name=name, state="succeeded", attempt=1,
            step=100, total_steps=100, last_loss=scale / 100, hyperparameters={"learning_rate": lr, "epochs": 1},
            metric_points=curve(100, scale, every_s))

    return run("lr-2e-4", 2e-4, 2.0, 1.5), run("lr-1e-3", 1e-3, 3.0, 1.0)


def csp_errors(page) -> list[str]:  # type: ignore[no-untyped-def]
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return errors


def legend(figure) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Legend label → the value it shows now."""
    rows = figure.locator(".u-legend .u-series").evaluate_all(
        "rows => rows.map(r => [r.querySelector('.u-label').textContent, r.querySelector('.u-value').textContent])")
    return dict(rows)


def test_two_runs_overlaid_on_the_compare_page_show_both_values_on_hover(  # type: ignore[no-untyped-def]
        transactional_db, context, screenshot) -> None:
    low, high = two_runs()
    page = context.new_page()
    errors = csp_errors(page)
    log_in(page)
    page.goto("/runs/")
    page.get_by_label(f"Select run {low.pk} to compare").check()
    page.get_by_label(f"Select run {high.pk} to compare").check()
    page.get_by_role("button", name="Compare selected").click()
    page.wait_for_url(re.compile(r"/runs/compare/\?"))
    expect(page.get_by_role("heading", name="Compare runs")).to_be_visible()

    loss = page.locator('figure.chart[data-title="Loss"]')
    expect(loss.locator("canvas")).to_be_visible()
    assert loss.locator(".chart-plot").get_attribute("data-points") == "100"
    labels = list(legend(loss))
    # The runs list is newest first, and the compare page keeps the order they were picked in.
    assert labels == ["step", f"#{high.pk} lr-1e-3 train", f"#{high.pk} lr-1e-3 eval",
                      f"#{low.pk} lr-2e-4 train", f"#{low.pk} lr-2e-4 eval"]

    # Hover the middle of the plot: the legend shows the step under the cursor and both runs' losses there.
    over = loss.locator(".u-over")
    box = over.bounding_box()
    assert box and box["width"] > 400 and box["height"] > 150
    over.hover(position={"x": box["width"] / 2, "y": box["height"] / 2})
    shown = legend(loss)
    step = int(shown["step"].replace(",", ""))
    assert 40 <= step <= 60
    assert shown[f"#{low.pk} lr-2e-4 train"] == str(float(f"{2.0 / step:.3g}"))
    assert shown[f"#{high.pk} lr-1e-3 train"] == str(float(f"{3.0 / step:.3g}"))
    # The eval loss was logged every 10 steps: the nearest evaluation's value shows between them.
    assert re.fullmatch(r"0\.\d+", shown[f"#{high.pk} lr-1e-3 eval"])
    screenshot(page, "compare-runs")

    # A legend entry hides its run's line; the table of settings names the one that differs.
    page.locator(".u-legend .u-series").filter(has_text=f"#{high.pk} lr-1e-3 train").first.click()
    expect(loss.locator(".u-legend .u-series.u-off")).to_have_count(1)
    expect(page.locator("#compare-settings")).to_contain_text("learning_rate")
    expect(page.locator("#compare-settings")).not_to_contain_text("epochs")

    # Time as the x-axis: run 2 logged a step a second, run 1 every 1.5 s; the hover reads elapsed time.
    page.get_by_label("X-axis").select_option("time")
    expect(loss.locator(".u-legend .u-series").first).to_contain_text(re.compile(r"time"))
    over.hover(position={"x": box["width"] * 0.9, "y": box["height"] / 2})
    assert re.fullmatch(r"[\d.]+ (s|min)", legend(loss)["time"])
    page.get_by_label("Log scale").check()
    page.get_by_label("Smoothing").fill("0.6")
    expect(page.locator("form.chart-controls output")).to_have_text("0.60")
    expect(loss.locator("canvas")).to_be_visible()
    assert not [e for e in errors if "Content Security Policy" in e or "Refused" in e], errors
    assert not errors, errors


def test_the_run_page_draws_its_charts_and_fits_a_phone(  # type: ignore[no-untyped-def]
        transactional_db, chromium, asgi_server, screenshot) -> None:
    run, _ = two_runs()
    for viewport, name in (({"width": 1280, "height": 900}, "run-detail-charts"),
                           ({"width": 390, "height": 844}, "run-detail-charts-phone")):
        context = chromium.new_context(base_url=asgi_server, viewport=viewport)
        page = context.new_page()
        errors = csp_errors(page)
        log_in(page)
        page.goto(f"/runs/{run.pk}/")
        charts = page.locator("#run-charts figure.chart")
        expect(charts.locator("canvas").first).to_be_visible()
        assert [charts.nth(i).get_attribute("data-title") for i in range(charts.count())] == [
            "Loss", "Learning rate", "Grad norm", "Throughput"]
        loss = page.locator('#run-charts figure[data-title="Loss"]')
        canvas = loss.locator("canvas").bounding_box()
        assert canvas and 260 <= canvas["height"] <= 300
        assert canvas["width"] <= viewport["width"] - 20  # the chart fits the width, on a phone too
        expect(loss.locator(".chart-latest")).to_be_hidden()  # the no-script figures give way to the legend
        over = loss.locator(".u-over")
        box = over.bounding_box()
        assert box
        over.hover(position={"x": box["width"] * 0.25, "y": box["height"] / 2})
        shown = legend(loss)
        assert set(shown) == {"step", "train", "eval"} and re.fullmatch(r"[\d.]+", shown["train"])
        # Drag to zoom in on the x-axis, double-click to reset.
        plot = loss.locator(".chart-plot")
        whole = plot.get_attribute("data-x-range")
        assert whole == "1 – 100"
        page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + 20)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + 40, steps=5)
        page.mouse.up()
        zoomed = plot.get_attribute("data-x-range") or ""
        first, last = (float(v) for v in zoomed.split(" – "))
        assert 10 < first < last < 60, zoomed
        over.dblclick(position={"x": box["width"] / 2, "y": box["height"] / 2})
        expect(plot).to_have_attribute("data-x-range", whole)
        screenshot(page, name)
        assert not errors, errors
        context.close()
