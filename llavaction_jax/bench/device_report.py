"""The device check's printed table and its BENCHMARKS.md-style markdown block (bench/device_check.py)."""

from __future__ import annotations

import contextlib
import io

import jax

from llavaction_jax.bench.common import record

GIB = 2**30
SHOWN = ("ok", "running")  # sections whose facts are listed ("running": cut off mid-section, finished cases)


def _fmt(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def _gib(value) -> str:
    return "-" if value is None else f"{value / GIB:.1f} GiB"


def table_rows(results: dict) -> list[tuple[str, str, str, str]]:
    """(section, case, status, facts) rows for the printed table and the markdown block."""
    rows = []
    for name, out in results["sections"].items():
        kind = "train" if name.startswith("train") else name
        if out["status"] in SHOWN and kind in _SECTION_ROWS:
            rows += _SECTION_ROWS[kind](name, out)
        else:
            note = out.get("error", "")
            rows.append((name, out.get("model", ""), out["status"], note.splitlines()[0][:160] if note else ""))
    return rows


def _devices_rows(name: str, out: dict) -> list[tuple]:
    return [(name, f"{out['device_count']} x {out['device_kind']}", out["status"],
             f"JAX {out['jax']}, {out['platform_version']}, bf16 matmul {out['bf16_matmul_tflops']:.3g} "
             f"TFLOP/s ({out['matmul_size']}^3), memory {_gib(out['memory_limit_bytes'])}")]


def _attention_rows(name: str, out: dict) -> list[tuple]:
    rows = _case_rows(name, out["cases"], lambda c: f"{c['tokens']} tokens {c['impl']}", lambda c: (
        f"max|diff| {_fmt(c.get('max_diff'), '.2e')}, fwd {_fmt(c.get('fwd_ms'), '.2f')} ms, "
        f"fwd+bwd {_fmt(c.get('fwd_bwd_ms'), '.2f')} ms"))
    return rows + [(name, "auto picks", "ok", ", ".join(f"{t}: {i}" for t, i in out["auto"].items()))]


def _forward_rows(name: str, out: dict) -> list[tuple]:
    return [(name, f"{out['model']} {out['frames']} frames, {out['tokens']} tokens", out["status"],
             f"prefill {out['prefill_s']:.3f} s, MFU {_fmt(out['mfu'], '.1%')}, compiled "
             f"{_gib(out['compiled_bytes'])}, peak {_gib(out['peak_bytes'])}, compile {out['compile_s']:.0f} s")]


def _eval_rows(name: str, out: dict) -> list[tuple]:
    return _case_rows(name, out["cases"], lambda c: f"batch {c['batch']} {c['mode']}", lambda c: (
        f"{c['questions_per_s']:.2f} questions/s, {out['questions']} questions in "
        f"{c['projected_s'] / 60:.1f} min, compile {c['compile_s']:.0f} s"))


def _train_rows(name: str, out: dict) -> list[tuple]:
    return [(name, f"{out['model']} {out['frames']} frames, remat {out['remat']}", out["status"],
             f"{out['step_s']:.3f} s/step, {out['tokens_per_s']:,.0f} tokens/s, MFU {_fmt(out['mfu'], '.1%')}, "
             f"compiled {_gib(out['compiled_bytes'])}, compile {out['compile_s']:.0f} s")]


_SECTION_ROWS = {"devices": _devices_rows, "attention": _attention_rows, "forward_7b": _forward_rows,
                 "eval_7b": _eval_rows, "train": _train_rows}


def format_table(results: dict) -> str:
    rows = [("section", "case", "status", "result")] + table_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [" | ".join(r[i].ljust(widths[i]) for i in range(3)) + " | " + r[3] for r in rows]
    lines.insert(1, "-" * min(160, max(len(line) for line in lines)))
    return "\n".join(lines)


def markdown_block(results: dict, command: str) -> str:
    kind = results["sections"].get("devices", {}).get("device_kind", jax.devices()[0].device_kind)
    lines = [f"- {section} / {case}: **{status}**{': ' + facts if facts else ''}"
             for section, case, status, facts in table_rows(results)]
    lines.append(f"- total {results.get('total_s', 0):.0f} s of a {results['time_limit_s']:.0f} s limit"
                 + ("; smoke sizes (tiny model, CPU): not a measurement" if results["smoke"] else ""))
    with contextlib.redirect_stdout(io.StringIO()):  # record() prints; the table is printed once, at the end
        return record(f"device check: {kind}", command, lines, write=False)


def _case_rows(section: str, cases: list[dict], label, facts) -> list[tuple]:
    """One row per case of a section: its label, status, and `facts(case)` (or the error) for the ok ones."""
    return [(section, label(c), c["status"], facts(c) if c["status"] == "ok" else c.get("error", "")) for c in cases]
