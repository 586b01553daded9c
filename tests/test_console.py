"""The screen of our commands: our records and real warnings shown; other libraries' chatter at DEBUG."""

import io
import logging
import logging.handlers
import warnings
from pathlib import Path

import pytest

from s3prl_laser import console


def screen(threshold: int, *records: tuple[str, int, str, str]) -> list[str]:
    """Lines a console handler at ``threshold`` prints for ``(logger, level, funcName, message)`` records."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(console.ForeignChatterFilter(threshold))
    for name, level, func, message in records:
        handler.handle(logging.LogRecord(name, level, __file__, 1, message, None, None, func=func))
    return stream.getvalue().splitlines()


RECORDS = [
    ("s3prl.upstream.hubert.hubert_model", logging.INFO, "__init__", "HubertModel Config: ..."),
    ("s3prl.upstream.espnet_hubert.expert", logging.WARNING, "<module>", "ESPnet is not installed"),
    ("s3prl.downstream.runner", logging.WARNING, "train", "a real problem"),
    ("s3prl_laser.finetune", logging.INFO, "run", "data: 40 clips"),
    ("torch", logging.ERROR, "<module>", "import-time error"),
]


def test_foreign_info_and_import_time_warnings_become_debug():
    assert screen(logging.INFO, *RECORDS) == [
        "WARNING s3prl.downstream.runner: a real problem",
        "INFO s3prl_laser.finetune: data: 40 clips",
        "ERROR torch: import-time error",
    ]
    assert screen(logging.DEBUG, *RECORDS) == [
        "DEBUG s3prl.upstream.hubert.hubert_model: HubertModel Config: ...",
        "DEBUG s3prl.upstream.espnet_hubert.expert: ESPnet is not installed",
        "WARNING s3prl.downstream.runner: a real problem",
        "INFO s3prl_laser.finetune: data: 40 clips",
        "ERROR torch: import-time error",
    ]


@pytest.mark.parametrize(
    ("category", "filename", "level"),
    [
        (FutureWarning, "/site-packages/torch/nn/utils/weight_norm.py", logging.DEBUG),
        (DeprecationWarning, "/site-packages/s3prl/upstream/expert.py", logging.DEBUG),
        (UserWarning, "/site-packages/torch/nn/functional.py", logging.DEBUG),  # key_padding_mask, WavLM
        (FutureWarning, str(Path(console.__file__).parent / "trainer.py"), logging.WARNING),
    ],
)
def test_python_warnings_go_through_logging(category, filename, level, caplog):
    with caplog.at_level(logging.DEBUG, logger="py.warnings"):
        console.show_warning_through_logging(category("careful"), category, filename, 7)
    (record,) = caplog.records
    assert record.levelno == level
    assert record.getMessage() == f"{filename}:7: {category.__name__}: careful"


def test_setup_console_routes_warnings_and_keeps_existing_handlers(monkeypatch):
    root, ours = logging.getLogger(), logging.getLogger(console.OUR_LOGGER)
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(ours, "level", ours.level)
    monkeypatch.setenv(console.LEVEL_ENV, "debug")
    with warnings.catch_warnings():  # restores warnings.showwarning afterwards
        console.setup_console(logging.INFO, fmt="%(message)s")
        assert warnings.showwarning is console.show_warning_through_logging
        (handler,) = root.handlers
        assert isinstance(handler, console.ProgressAwareHandler)
        assert root.level == ours.level == logging.DEBUG
        console.setup_console(logging.INFO, fmt="%(message)s")  # a second call adds no second handler
        assert root.handlers == [handler]


def test_foreign_warnings_at_debug_inside_the_block_only(caplog):
    with caplog.at_level(logging.DEBUG, logger="py.warnings"), warnings.catch_warnings():
        warnings.simplefilter("always")
        before = warnings.showwarning
        with console.foreign_warnings_at_debug():
            warnings.warn_explicit("old API", FutureWarning, "/site-packages/torch/x.py", 3)
        assert warnings.showwarning is before
    (record,) = caplog.records
    assert record.levelno == logging.DEBUG and "FutureWarning: old API" in record.getMessage()


def test_chatter_lines_of_a_child_process_are_marked():
    output = [
        "ESPnet is not installed, cannot use espnet_hubert upstream",
        "/site/torch/nn/utils/weight_norm.py:145: FutureWarning: `torch.nn.utils.weight_norm` is deprecated",
        "  WeightNorm.apply(module, name, dim)",
        "[Runner] - Start a new experiment",
        "  indented line of the runner, not under a warning",
        "test-clean wer: 0.5",
    ]
    assert [chatter for _, chatter in console.mark_chatter(output)] == [True, True, True, False, False, False]


@pytest.mark.parametrize("debug", [False, True])
def test_quiet_loading_holds_transformers_back_unless_debug(debug, monkeypatch, caplog):
    """A loading message of transformers and another library's warning: off the screen, or kept for debug."""
    from transformers.utils import logging as hf_logging

    from s3prl_laser.models.hf_import import quiet_loading

    monkeypatch.setenv(console.LEVEL_ENV, "debug" if debug else "info")
    seen = logging.handlers.BufferingHandler(capacity=100)
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(seen)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    try:
        with caplog.at_level(logging.DEBUG, logger="py.warnings"), warnings.catch_warnings():
            warnings.simplefilter("always")
            with quiet_loading():
                assert hf_logging.is_progress_bar_enabled() == (bars and debug)
                hf_logging.get_logger("transformers.modeling_utils").warning("Some weights were not used")
                warnings.warn_explicit("old API", FutureWarning, "/site-packages/transformers/x.py", 3)
    finally:
        transformers_logger.removeHandler(seen)
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == (verbosity, bars)
    assert [r.getMessage() for r in seen.buffer] == (["Some weights were not used"] if debug else [])
    shown = [r for r in caplog.records if r.name == "py.warnings"]
    assert [(r.levelno, "FutureWarning: old API" in r.getMessage()) for r in shown] == (
        [(logging.DEBUG, True)] if debug else []
    )
