"""Memory passes over the state per solver step, counted in the compiled program (XLA's optimized HLO).

Without a network (a cheap denoiser, small images, large batches) a sampler step is bound by memory
traffic: how many state-sized arrays it reads and writes. This compiles a solver for a batch of
``--shape`` (default 64 x 32 x 32 x 3, float32, NFE 10) with the denoiser D(x) = x / (1 + sigma^2)
kept opaque to XLA (inside a ``lax.cond``, so that its read of x and write of D are an operation of
their own, as a network's would be, instead of being recomputed inside the solver's kernels), finds the
sampling loop (the ``while`` carrying the state) and sums over the operations of its body the bytes
each reads and writes:

* a fusion reads each operand once and writes its result once, except that an operand it only
  slices counts by its slices, and an in-place ``dynamic-update-slice`` (the ring buffer of past
  predictions) writes the slot it updates, not the whole buffer;
* copies, dots and other unfused array operations read their operands and write their result;
* parameters, tuples, bitcasts, constants and scalar bookkeeping cost nothing.

Passes = bytes / bytes of one state. The denoiser's own kernel (1 read, 1 write) is left out of the
solver's count. ``MINIMUM`` gives what each method must read and write in a steady step. Run::

    python benchmarks/solver_passes.py [--shape 64,32,32,3] [--nfe 10] [--detail]
    PYTHONPATH=/other/checkout python benchmarks/solver_passes.py   # another version of the package

XLA's CPU and GPU backends fuse differently; the figures are for the default backend.
"""

from __future__ import annotations

import argparse
import math
import re

import jax
import jax.numpy as jnp

import jdiffsample
from jdiffsample import schedules, timesteps
from jdiffsample.solvers import registry

# name -> (solver, options, minimum passes of a steady step, what they are)
MINIMUM = {
    "UniPC-3 (bh2)": ("unipc", dict(order=3, variant="bh2"), 6,
                      "read x, D, 3 past D; write next x, D into the history"),
    "DPM-Solver++(2M)": ("dpmpp", dict(order=2), 4, "read x, D, 1 past D; write next x, D into the history"),
    "DPM-Solver++(3M)": ("dpmpp", dict(order=3), 5, "read x, D, 2 past D; write next x, D into the history"),
    "DEIS-tab3": ("deis", dict(order=3, variant="tab"), 5, "read x, E, 2 past E; write next x, E into the history"),
    "iPNDM-4": ("ipndm", dict(order=4), 6, "read x, E, 3 past E; write next x, E into the history"),
    "SA-Solver(3,4), tau 1": ("sa_solver", dict(predictor_order=3, corrector_order=4, tau=1.0), 8,
                              "UniPC-3's 6 plus this step's noise, written once and read once"),
}

_DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s64": 8, "u64": 8, "s32": 4, "u32": 4, "s16": 2,
                "u16": 2, "s8": 1, "u8": 1, "pred": 1}
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "opt-barrier", "after-all"}


def _type_bytes(text: str) -> int:
    """Bytes of an HLO type: an array such as f32[64,32]{1,0}, or a tuple of them."""
    return sum(_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text) if dtype in _DTYPE_BYTES)


class Instr:
    """One HLO instruction: name, result type and bytes, opcode, operand names, the rest of the line."""

    def __init__(self, line: str):
        line = line.strip()
        self.root = line.startswith("ROOT ")
        name, rest = line.removeprefix("ROOT ").split(" = ", 1)
        self.name = name.lstrip("%")
        if rest.startswith("("):  # a tuple type
            end = _matching(rest, 0)
            self.type, rest = rest[: end + 1], rest[end + 2 :]
        else:
            self.type, rest = rest.split(" ", 1)
        self.op, rest = rest.split("(", 1)
        end = _matching("(" + rest, 0) - 1
        self.args, self.attrs = rest[:end], rest[end + 1 :]
        self.operands = re.findall(r"%([\w.\-]+)", self.args)
        self.bytes = _type_bytes(self.type)

    def attr(self, key):
        m = re.search(rf"\b{key}=%([\w.\-]+)", self.attrs)
        return m.group(1) if m else None


def _matching(text: str, start: int) -> int:
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    raise ValueError(f"unbalanced parentheses in {text[:80]!r}")


def parse_hlo(text: str) -> dict:
    """Computation name -> its instructions."""
    comps, cur = {}, None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
        if head:
            cur = comps.setdefault(head.group(1), [])
        elif line.strip() == "}":
            cur = None
        elif cur is not None and " = " in line:
            cur.append(Instr(re.sub(r", metadata=\{[^}]*\}", "", line)))
    return comps


def _fusion_traffic(comps: dict, fusion: Instr, sizes: dict, small: int) -> tuple[int, int]:
    """(bytes read, bytes written) of a fusion: sliced operands by their slices, in-place updates by the
    slot, arrays under ``small`` bytes not at all."""
    body = comps[fusion.attr("calls")]
    by_name = {i.name: i for i in body}
    users = {}
    for instr in body:
        for k, operand in enumerate(instr.operands):
            users.setdefault(operand, []).append((instr, k))

    def read(name, full):
        total = 0
        for user, k in users.get(name, []):
            if user.op == "bitcast":
                total += read(user.name, full)
            elif user.op in ("slice", "dynamic-slice") and k == 0:
                total += user.bytes
            elif user.op == "dynamic-update-slice" and k == 0:
                continue  # the buffer updated in place is not read
            else:
                return full
        return min(total, full)

    params = {int(i.args): i for i in body if i.op == "parameter"}
    n_read = sum(read(params[k].name, sizes.get(operand, 0)) for k, operand in enumerate(fusion.operands))
    root = next(i for i in body if i.root)
    outputs = [by_name[o] for o in root.operands] if root.op == "tuple" else [root]
    n_written = 0
    for out in outputs:
        node = out
        while node.op == "bitcast":
            node = by_name[node.operands[0]]
        size = by_name[node.operands[1]].bytes if node.op == "dynamic-update-slice" else out.bytes
        n_written += size if size >= small else 0
    return n_read, n_written


def loop_traffic(text: str, state_bytes: int):
    """[(instruction, opcode, passes read, passes written)] over the body of the sampling loop."""
    comps = parse_hlo(text)
    loops = [i for instrs in comps.values() for i in instrs if i.op == "while"]
    loop = max(loops, key=lambda i: i.bytes)  # the one carrying the state (and its history)
    if loop.bytes < state_bytes:
        raise RuntimeError("no while loop carries the state")
    return _body_traffic(comps, comps[loop.attr("body")], state_bytes)


def _body_traffic(comps: dict, body: list, state_bytes: int):
    small = state_bytes // 4  # scalars and coefficient tables: bookkeeping, not passes over the state
    sizes = {i.name: i.bytes if i.bytes >= small else 0 for i in body}
    rows = []
    for instr in body:
        if instr.op in _FREE:
            continue
        if instr.op == "while":  # a loop inside a step (JAX's threefry rounds on the CPU): its body, n times
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', instr.attrs)
            inner = _body_traffic(comps, comps[instr.attr("body")], state_bytes)
            n = int(trips.group(1)) if trips else 1
            rows.extend((f"{instr.name}/{name}", f"{op} x{n}", r * n, w * n) for name, op, r, w in inner)
            continue
        if instr.op == "fusion":
            n_read, n_written = _fusion_traffic(comps, instr, sizes, small)
        elif instr.op == "dynamic-update-slice":
            n_read = n_written = sizes[instr.operands[1]]
        elif instr.op == "conditional":  # one branch runs: it reads its own operands
            n_read, n_written = max(sizes.get(o, 0) for o in instr.operands[1:]), sizes[instr.name]
        else:
            n_read, n_written = sum(sizes.get(o, 0) for o in instr.operands), sizes[instr.name]
        if n_read + n_written:
            rows.append((instr.name, instr.op, n_read / state_bytes, n_written / state_bytes))
    return rows


def opaque_denoiser(x, t):
    """D(x) = x / (1 + t^2) (data ~ N(0, I), VE), as an operation of its own that XLA cannot merge into
    the solver's kernels: a conditional (whose other branch never runs), as a network would be."""
    return jax.lax.cond(t >= 0, lambda x: x / (1.0 + t**2), lambda x: -x, x)


def count(solver: str, options: dict, shape, nfe: int):
    """(solver passes per step, denoiser passes per step, rows) for one solver configuration."""
    info = registry.get(solver)
    n_steps = info.steps_for_nfe(nfe, zero_end=False)[0]
    ts = jnp.asarray(timesteps.karras(schedules.VE(), n_steps), jnp.float32)
    x = jnp.zeros(shape, jnp.float32)
    options = info.resolve(options)
    key = jax.random.key(0) if info.needs_key(options) else None
    fn = jax.jit(lambda x, ts, key: info.fn(opaque_denoiser, x, ts, schedules.VE(), key=key, **options))
    text = fn.lower(x, ts, key).compile().as_text()
    rows = loop_traffic(text, x.size * x.dtype.itemsize)
    den = [r for r in rows if r[1] == "conditional"]
    solver_rows = [r for r in rows if r[1] != "conditional"]
    return sum(r[2] + r[3] for r in solver_rows), sum(r[2] + r[3] for r in den), solver_rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="64,32,32,3", help="state shape (default 64,32,32,3)")
    parser.add_argument("--nfe", type=int, default=10)
    parser.add_argument("--detail", action="store_true", help="list every operation's passes")
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    print(f"state {'x'.join(map(str, shape))} float32, NFE {args.nfe}, {jax.devices()[0].platform}; "
          f"jdiffsample from {jdiffsample.__file__}\n")
    print("| solver | passes per step | minimum | ratio | the minimum |")
    print("|---|---:|---:|---:|---|")
    for name, (solver, options, minimum, why) in MINIMUM.items():
        total, _, rows = count(solver, options, shape, args.nfe)
        print(f"| {name} | {total:.0f} | {minimum} | {total / minimum:.2f} | {why} |", flush=True)
        if args.detail:
            for row in rows:
                print(f"|  | {row[1]} {row[0]}: read {row[2]:.2f}, write {row[3]:.2f} | | | |")


if __name__ == "__main__":
    main()
