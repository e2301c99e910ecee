"""FLOPs and HBM bytes of a compiled XLA program with every loop counted by its trip count.

XLA's `compiled.cost_analysis()` counts the body of a `while` loop (every `lax.scan`,
`fori_loop`, `while_loop`) once. `loop_costs(hlo_text, ...)` walks the optimised HLO module
(`compiled.as_text()`) instead and multiplies each loop body by its trip count: XLA's
`known_trip_count` when recorded, else N of a `counter < constant(N)` condition (the form of
every `lax.scan`), else -- a loop whose length is only known at run time -- `unknown_trips` for
the loop of the entry computation with the most FLOPs (the sampler's decode loop) and 1 for the
others (the slot refills around it). Per instruction it charges, as XLA's cost analysis does:
  FLOPs: 2 x output elements x contracted size for each `dot` and `convolution` (also inside
    fusions); elementwise work is not counted (small next to the matrix products);
  bytes: operands + outputs of each scheduled instruction (a fusion is one read of its inputs
    and one write of its outputs; nothing inside it touches HBM); tuples, parameters,
    get-tuple-element, bitcasts and constants are free. An in-place update (a
    dynamic-update-slice or scatter into a buffer, alone or as a fusion's root) is charged the
    bytes of its update read and written, not the whole buffer (XLA's cost analysis charges
    the whole buffer: a decode step writing one token per row into the KV cache would count
    the cache twice); `in_place=False` charges as XLA does.
  `conditional`: the most expensive branch (an upper bound: one branch runs; XLA adds them all,
    and so does the walk with `ones`).
With every trip count taken as 1 (`ones`) the walk counts what XLA's cost analysis counts, up
to its rules for bytes (which differ in detail); `srft-jax compile` prints the ratio of the two
for every program (its "check" column) so the reader can see how close they are.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
                "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16, "token": 0}
_ARRAY = re.compile(r"([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all",
         "partition-id", "replica-id", "iota", "opt-barrier", "add-dependency"}


@dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    attrs: str
    args: str = ""  # the raw text between the opcode's parentheses (a constant's value)


@dataclass
class Cost:
    flops: float = 0.0
    bytes: float = 0.0
    unknown_loops: int = 0  # while loops without a recorded trip count (counted as told)

    def add(self, other: "Cost", times: float = 1.0) -> None:
        self.flops += times * other.flops
        self.bytes += times * other.bytes
        self.unknown_loops += other.unknown_loops


@dataclass
class Module:
    computations: dict[str, list[Instr]] = field(default_factory=dict)
    entry: str = ""
    roots: dict[str, str] = field(default_factory=dict)  # computation -> its ROOT instruction


def _split_shape(rest: str) -> tuple[str, str]:
    """'(a, b) opcode(...)' or 'f32[2]{0} opcode(...)' -> (shape, remainder)."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1:].lstrip()
    shape, _, remainder = rest.partition(" ")
    return shape, remainder


def _parse_instr(line: str) -> Optional[Instr]:
    line = line.strip()
    if line.startswith("ROOT "):
        line = line[5:]
    if not line.startswith("%") or " = " not in line:
        return None
    name, rest = line.split(" = ", 1)
    shape, rest = _split_shape(rest)
    m = re.match(r"([\w\-]+)\(", rest)
    if not m:
        return None
    opcode = m.group(1)
    depth, start = 0, m.end() - 1
    end = len(rest)
    for i in range(start, len(rest)):
        depth += rest[i] == "("
        depth -= rest[i] == ")"
        if depth == 0:
            end = i
            break
    operands = re.findall(r"%([\w.\-]+)", rest[start:end])
    return Instr(name.lstrip("%"), shape, opcode, operands, rest[end + 1:], rest[start + 1:end])


def parse(hlo_text: str) -> Module:
    module = Module()
    current: Optional[list[Instr]] = None
    for line in hlo_text.splitlines():
        header = re.match(r"^(ENTRY )?%([\w.\-]+) \(.*\{\s*$", line)
        if header:
            comp = header.group(2)
            current = module.computations.setdefault(comp, [])
            if header.group(1):
                module.entry = header.group(2)
            continue
        if line.startswith("}"):
            current = None
            continue
        if current is not None:
            instr = _parse_instr(line)
            if instr is not None:
                current.append(instr)
                if line.strip().startswith("ROOT "):
                    module.roots[comp] = instr.name
    return module


def shape_bytes(shape: str) -> float:
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape.split("{")[0] if not shape.startswith("(") else shape):
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += n * _DTYPE_BYTES.get(dtype, 4)
    return total


def _dims(shape: str) -> list[int]:
    m = _ARRAY.search(shape)
    if not m or not m.group(2):
        return []
    return [int(d) for d in m.group(2).split(",")]


def _attr(attrs: str, key: str) -> Optional[str]:
    m = re.search(rf"{key}=%?([\w.\-]+)", attrs)
    return m.group(1) if m else None


def _matmul_flops(instr: Instr, shapes: dict[str, str]) -> float:
    out = math.prod(_dims(instr.shape)) if _dims(instr.shape) else 1
    if instr.opcode == "dot":
        lhs = _dims(shapes.get(instr.operands[0], ""))
        m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", instr.attrs)
        contracted = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d) if m and lhs else 1
        return 2.0 * out * contracted
    if instr.opcode == "convolution":
        kernel = _dims(shapes.get(instr.operands[1], "")) if len(instr.operands) > 1 else []
        m = re.search(r"dim_labels=[^_]*_([0-9a-z]+)->", instr.attrs)
        if not kernel or not m:
            return 0.0
        labels = m.group(1)
        if len(labels) != len(kernel) or "i" not in labels:
            return 0.0
        contracted = kernel[labels.index("i")]
        # Spatial window taps multiply the work, except in the batched-matmul form the TPU
        # compiler emits (a dilated window over the batch: one tap per output).
        if not re.search(r"lhs_dilate|rhs_dilate", instr.attrs):
            contracted *= math.prod(k for k, l in zip(kernel, labels) if l.isdigit())
        return 2.0 * out * contracted
    return 0.0


class _Walker:
    def __init__(self, module: Module, unknown_trips: float, ones: bool, in_place: bool = True):
        self.m = module
        self.unknown_trips = unknown_trips
        self.ones = ones  # every trip count 1 (XLA's own convention), to check the walk
        self.in_place = in_place  # charge in-place updates at the bytes they write
        self.memo: dict[tuple[str, bool], Cost] = {}
        self._main: dict[str, Optional[str]] = {}

    def shapes(self, comp: str) -> dict[str, str]:
        return {i.name: i.shape for i in self.m.computations.get(comp, [])}

    def main_loop(self, comp: str) -> Optional[str]:
        """Of the loops without a trip count in `comp`, the one with the most FLOPs in its body
        (the sampler's decode loop; the slot refills around it are loops too)."""
        if comp not in self._main:
            loops = [i for i in self.m.computations.get(comp, []) if i.opcode == "while"
                     and self.trip_count(i, _attr(i.attrs, "condition")) is None]
            costs = [(self.cost(_attr(i.attrs, "body"), False).flops, i.name) for i in loops]
            self._main[comp] = max(costs)[1] if costs else None
        return self._main[comp]

    def trip_count(self, instr: Instr, cond: str) -> Optional[int]:
        """XLA's `known_trip_count`, else N of a condition `counter < constant(N)` (the form
        of every `lax.scan`, counting from 0); None for any other condition."""
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.attrs)
        if m:
            return int(m.group(1))
        body = self.m.computations.get(cond, [])
        consts = {i.name: i.args for i in body if i.opcode == "constant"}
        compares = [i for i in body if i.opcode == "compare"]
        if len(compares) != 1 or "direction=LT" not in compares[0].attrs:
            return None
        values = [consts[o] for o in compares[0].operands if o in consts]
        if len(values) != 1 or not re.fullmatch(r"-?\d+", values[0].strip()):
            return None
        return int(values[0])

    def in_place_saving(self, instr: Instr, shapes: dict[str, str], comp: Optional[str]) -> float:
        """Bytes charged for an in-place update beyond what it touches: a dynamic-update-slice
        or scatter writes its update into its first operand's buffer (XLA updates the buffer in
        place) yet is charged a read and a write of the whole buffer. For such an instruction,
        or a fusion whose root (or a root tuple element) is one on a fusion parameter: 2 x
        (buffer - update) bytes."""
        if comp is None:
            elems, local, params = [instr], shapes, None
        else:
            body = self.m.computations.get(comp, [])
            local = {i.name: i.shape for i in body}
            by_name = {i.name: i for i in body}
            root = by_name.get(self.m.roots.get(comp, ""))
            if root is None:
                return 0.0
            elems = [by_name[o] for o in root.operands if o in by_name] if root.opcode == "tuple" else [root]
            params = {i.name for i in body if i.opcode == "parameter"}
        saving = 0.0
        for e in elems:
            if e.opcode not in ("dynamic-update-slice", "scatter") or len(e.operands) < 3:
                continue
            if params is not None and e.operands[0] not in params:
                continue
            update = e.operands[1] if e.opcode == "dynamic-update-slice" else e.operands[2]
            saving += 2.0 * max(0.0, shape_bytes(e.shape) - shape_bytes(local.get(update, "")))
        return saving

    def fused_flops(self, comp: str) -> float:
        shapes = self.shapes(comp)
        total = 0.0
        for i in self.m.computations.get(comp, []):
            total += _matmul_flops(i, shapes)
            called = _attr(i.attrs, "calls") if i.opcode == "fusion" else None
            if called:
                total += self.fused_flops(called)
        return total

    def cost(self, comp: str, top: bool) -> Cost:
        key = (comp, top)
        if key in self.memo:
            return self.memo[key]
        shapes = self.shapes(comp)
        c = Cost()
        for i in self.m.computations.get(comp, []):
            op = i.opcode
            if op in _FREE:
                continue
            if op == "while":
                body, cond = _attr(i.attrs, "body"), _attr(i.attrs, "condition")
                known = self.trip_count(i, cond)
                if self.ones:
                    trips = 1.0
                elif known is not None:
                    trips = float(known)
                else:
                    trips = self.unknown_trips if top and i.name == self.main_loop(comp) else 1.0
                    c.unknown_loops += 1
                inner = Cost()
                inner.add(self.cost(body, False))
                inner.add(self.cost(cond, False))
                c.add(inner, trips)
                continue
            if op == "conditional":
                names = re.findall(r"%([\w.\-]+)", (re.search(r"branch_computations=\{([^}]*)\}", i.attrs)
                                                    or re.search(r"()", "")).group(1))
                names += [n for n in (_attr(i.attrs, "true_computation"), _attr(i.attrs, "false_computation")) if n]
                branches = [self.cost(b, False) for b in names]
                if branches and self.ones:  # XLA's convention: every branch
                    for b in branches:
                        c.add(b)
                elif branches:
                    c.add(max(branches, key=lambda b: (b.flops, b.bytes)))
                c.bytes += sum(shape_bytes(shapes.get(o, "")) for o in i.operands[:1])
                continue
            if op in ("call", "async-start") or (op.endswith("-start") and _attr(i.attrs, "calls")):
                called = _attr(i.attrs, "to_apply") or _attr(i.attrs, "calls")
                if called and op == "call":
                    c.add(self.cost(called, top))
                    continue
            io = shape_bytes(i.shape) + sum(shape_bytes(shapes.get(o, "")) for o in i.operands)
            if op.endswith("-done"):
                io = 0.0  # charged at its -start
            if self.in_place and op in ("fusion", "dynamic-update-slice", "scatter"):
                io -= self.in_place_saving(i, shapes, _attr(i.attrs, "calls") if op == "fusion" else None)
            c.bytes += io
            c.flops += _matmul_flops(i, shapes)
            if op == "fusion":
                called = _attr(i.attrs, "calls")
                if called:
                    c.flops += self.fused_flops(called)
        self.memo[key] = c
        return c


def loop_costs(hlo_text: str, unknown_trips: float = 1.0, ones: bool = False,
               in_place: bool = True) -> Cost:
    """FLOPs and bytes of the module's entry computation with every loop body multiplied by
    its trip count (`ones`: every trip count 1, which is what XLA's cost analysis does).
    `in_place`: an in-place update (dynamic-update-slice, scatter) is charged the bytes of its
    update, not of the whole buffer it updates (False: the whole buffer, as XLA charges it)."""
    module = parse(hlo_text)
    if not module.entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return _Walker(module, unknown_trips, ones, in_place).cost(module.entry, True)
