"""Argument types shared by the sub-commands: a bad value is an argparse error, which
`srft-jax` prints as one line naming the option (`argument --temperature: ...`), exit 2."""

from __future__ import annotations

import argparse


def _number(kind, text: str, ok, rule: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 1, ">= 1")


def non_negative_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 0, ">= 0")


def non_negative_float(text: str) -> float:
    return _number(float, text, lambda v: v >= 0, ">= 0")


def positive_float(text: str) -> float:
    return _number(float, text, lambda v: v > 0, "> 0")


def unit_interval(text: str) -> float:
    return _number(float, text, lambda v: 0 < v <= 1, "in (0, 1]")


def mesh_size(text: str) -> int:
    return _number(int, text, lambda v: v >= 1 or v == -1, "a positive size or -1")
