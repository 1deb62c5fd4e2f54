"""Progress of loops over items (lora_core/progress.py): n/N, items/s, ETA, throttling, and the text contract."""

from __future__ import annotations

import pytest

from lora_core.progress import ItemRate, StepInfo, parse_phase_text, status_text


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_text_counts_rate_and_eta():
    clock = Clock()
    rate = ItemRate(unit="images", label="Load Dataset: encoding latents", clock=clock)
    rate.start(1000)
    assert rate.text(0) == "Load Dataset: encoding latents 0/1000 images · ? images/s · ETA ?"
    clock.now += 10.0
    assert rate.text(81) == "Load Dataset: encoding latents 81/1000 images · 8.1 images/s · ETA 1:53"
    clock.now += 113.5
    assert rate.text(1000).endswith("1000/1000 images · 8.1 images/s · ETA 0:00")


def test_without_a_label_the_text_starts_at_the_count():
    clock = Clock()
    rate = ItemRate(unit="images", clock=clock)
    rate.start(24)
    clock.now += 2.0
    assert rate.text(1) == "1/24 images · 0.50 images/s · ETA 0:46"


def test_texts_are_throttled_to_four_a_second_but_first_and_last_always_go():
    clock = Clock()
    rate = ItemRate(clock=clock)
    rate.start(1000)
    sent = []
    for done in range(1, 1001):  # 1000 items in 2 s
        clock.now += 0.002
        if rate.due(done):
            sent.append(done)
    assert sent[0] == 1 and sent[-1] == 1000
    assert 8 <= len(sent) <= 10  # 4 a second over 2 s, plus the first and the last


def test_a_slow_loop_sends_every_item():
    clock = Clock()
    rate = ItemRate(clock=clock)
    rate.start(5)
    due = []
    for done in range(1, 6):
        clock.now += 1.0
        due.append(rate.due(done))
    assert all(due)


def test_phase_texts_parse_back():
    rate = ItemRate(unit="captions", label="Train Steps: encoding captions", clock=Clock())
    rate.start(7)
    parsed = parse_phase_text(rate.text(3))
    assert parsed is not None
    assert (parsed.label, parsed.done, parsed.total) == ("Train Steps: encoding captions", 3, 7)
    bare = parse_phase_text("1/24 images · 1.20 images/s · ETA 0:19")  # Auto Caption's text
    assert bare is not None and (bare.label, bare.done, bare.total) == ("", 1, 24)
    status = parse_phase_text(status_text("Train Steps: loading the model"))
    assert status is not None and status.label == "Train Steps: loading the model" and status.total is None
    assert status_text("already…") == "already…"


@pytest.mark.parametrize("text", [
    # Train Steps' own step line (nodes/corridor/reporting.py NodeProgress): its progress event carries the facts
    "step 12 (12/300) · loss 0.1420 (avg 0.1500) · 0.31 s/it · ETA 1:02",
    StepInfo(step=5, run_step=5, run_steps=9, epoch=0, loss=0.1, smoothed_loss=0.1, lr=1e-4, grad_norm=1.0,
             sec_per_step=0.3, samples_per_sec=3.3, eta_seconds=12.0).describe(),
    "3 images: 3 new; 3 caption files written",
    "",
])
def test_other_texts_are_not_phase_texts(text):
    assert parse_phase_text(text) is None
