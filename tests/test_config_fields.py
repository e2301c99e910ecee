"""Every config field means what it says: a short training run reads every field of every
section (outside the dataclasses' own validation), except the few listed below with where
they are read. A field nobody reads would be a setting that silently does nothing. The run
itself is `test_train_loop.test_demo_config_runs_and_writes_everything`, which uses the
recorder defined here."""

import dataclasses
import sys

import pytest

from srft_jax.config import Config

# Fields read only while the config is built, and where.
READ_ELSEWHERE = {
    "loss.preset": "resolved into the loss switches by SRFTLossConfig.__post_init__",
}
# Fields that only mean something when another field selects them (the demo run does not):
# field -> the overrides that select it. `test_selected_fields_are_read` checks each.
READ_WHEN_SELECTED = {
    "loss.rl_norm_constant": {"rl_normalizer": "constant"},
    "model.lora.alpha": {"rank": 4},
    "model.lora.targets": {"rank": 4},
    "model.lora.dropout": {"rank": 4},
}


def _sections(cls=Config, prefix=""):
    """(dotted section name, dataclass) of every section and nested section of the config."""
    import typing

    out = []
    for f in dataclasses.fields(cls):
        ftype = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(ftype):
            name = f"{prefix}{f.name}"
            out.append((name, ftype))
            out += _sections(ftype, name + ".")
    return out


# Functions that read every field while building, checking or saving a config: not uses.
_LOADER = {"__post_init__", "load_config", "_build", "_check_derived", "to_yaml"}


def _in_validation(frame, depth: int = 6) -> bool:
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code.co_name in _LOADER:
            return True
        frame = frame.f_back
    return False


def record_config_reads(monkeypatch) -> set:
    """From now on, every read of a config field by srft_jax code outside the dataclasses' own
    validation is added to the returned set (as dotted keys, e.g. 'train.optim.lr')."""
    sections = _sections()
    by_class = {}
    for name, cls in sections:
        by_class.setdefault(cls, []).append(name)
    reads = set()
    for cls, names in by_class.items():
        own = {f.name for f in dataclasses.fields(cls)}

        def getattribute(self, attr, _names=tuple(names), _own=own):
            if attr in _own:
                frame = sys._getframe(1)
                caller = frame.f_globals.get("__name__", "")
                if caller.startswith("srft_jax") and not _in_validation(frame):
                    reads.update(f"{n}.{attr}" for n in _names)
            return object.__getattribute__(self, attr)

        monkeypatch.setattr(cls, "__getattribute__", getattribute)
    return reads


def assert_every_field_read(reads: set) -> None:
    """Every leaf field of every section is in `reads` or in READ_ELSEWHERE (and no more)."""
    fields = {f"{name}.{f.name}" for name, cls in _sections() for f in dataclasses.fields(cls)}
    fields -= {name for name, _ in _sections()}  # nested sections themselves (train.optim, ...)
    unread = sorted(fields - reads - set(READ_ELSEWHERE) - set(READ_WHEN_SELECTED))
    assert not unread, f"config fields no training code read: {unread}"
    assert not reads & set(READ_ELSEWHERE), "READ_ELSEWHERE lists a field the loop reads"


def test_the_recorder_sees_reads_and_ignores_validation(monkeypatch):
    from srft_jax.train_step import OptimizerConfig

    reads = record_config_reads(monkeypatch)
    cfg = OptimizerConfig(lr=0.5)  # __post_init__ reads every field: not counted
    assert reads == set()
    from srft_jax.train_step import make_schedule

    make_schedule(cfg, steps=3)
    assert {"train.optim.lr", "train.optim.warmup_steps", "train.optim.schedule"} <= reads
    with pytest.raises(AssertionError, match="config fields no training code read"):
        assert_every_field_read(reads)


def test_selected_fields_are_read(monkeypatch):
    """A field listed in READ_WHEN_SELECTED is read by the loss once its switch selects it."""
    import numpy as np

    from srft_jax.losses import SRFTLossConfig
    from srft_jax.losses.srft import loss_normalizers

    reads = record_config_reads(monkeypatch)
    batch = {"response_mask": np.ones((2, 3), np.float32), "is_demo": np.array([True, False])}
    for field, switch in READ_WHEN_SELECTED.items():
        section, name = field.rsplit(".", 1)
        if section == "model.lora":  # LoRA's settings are read once adapters are on
            from srft_jax.models.lora import LoraConfig

            LoraConfig(**switch).model_fields()
        else:
            assert section == "loss", field
            loss_normalizers(batch, SRFTLossConfig(preset="paper", **switch, **{name: 8.0}))
        assert field in reads
