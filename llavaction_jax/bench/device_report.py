"""The device check's printed lines, table and BENCHMARKS.md-style markdown block (bench/device_check.py).

Nothing here asks JAX for its devices: the check's own process never starts a backend (its worker holds the
accelerator), so the machine is described from the devices section's results.
"""

from __future__ import annotations

import contextlib
import io

from llavaction_jax.bench.common import record

GIB = 2**30


def _fmt(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def _gib(value) -> str:
    return "-" if value is None else f"{value / GIB:.1f} GiB"


def _first_line(text: str | None, width: int = 200) -> str:
    return text.strip().splitlines()[0][:width] if text and text.strip() else ""


def _case_result(c: dict) -> str:
    return (case_facts(c) if c["status"] == "ok" else _first_line(c.get("error"))) + attempts_note(c)


def _case_label(c: dict) -> str:
    return c["case"] + (f" ({c['attention']})" if c.get("attention") and "impl" not in c else "")


def case_facts(c: dict) -> str:
    """The measured facts of one case, in the order a reader wants them."""
    parts = []
    if "prefill_s" in c:
        parts.append(f"prefill {c['prefill_s']:.3f} s")
    if "questions_per_s" in c:
        parts.append(f"{c['questions_per_s']:.2f} questions/s, all of EK100-MQA in {c['projected_s'] / 60:.1f} min")
    if "step_s" in c:
        parts.append(f"{c['step_s']:.3f} s/step, {c['tokens_per_s']:,.0f} tokens/s, loss {c['loss']:.3f}")
    if "max_diff" in c:
        parts.append(f"max|diff| {c['max_diff']:.2e}, fwd {c['fwd_ms']:.2f} ms, fwd+bwd {c['fwd_bwd_ms']:.2f} ms")
    if "mfu" in c or "mfu_spec" in c:
        parts.append(f"MFU {_fmt(c.get('mfu'), '.1%')} of the measured peak, {_fmt(c.get('mfu_spec'), '.1%')} of the "
                     "specification")
    if "compile_s" in c:
        parts.append(f"compile {c['compile_s']:.0f} s, {c['calls']} call(s)")
    if c.get("compiled_bytes") is not None:
        parts.append(f"compiled {_gib(c['compiled_bytes'])}")
    if c.get("peak_bytes") is not None:  # the worker's peak so far: earlier sections in it count too
        parts.append(f"worker peak {_gib(c['peak_bytes'])}")
    return ", ".join(parts)


def attempts_note(c: dict) -> str:
    """What happened before the recorded attempt: '' for a first attempt."""
    earlier = c.get("attempts", [])[:-1]
    return "".join(f" [first with {a['attention']}: {a['status']}, {_first_line(a.get('error'), 120)}; retried with "
                   "flash]" for a in earlier)


def case_line(c: dict) -> str:
    """'label (attention): status: facts or error [earlier attempts]' -- one printed line per case."""
    result = _case_result(c)
    return f"{_case_label(c)}: {c['status']}{': ' + result if result else ''}"


def section_facts(name: str, out: dict) -> str:
    """The section-level facts (those that are not per case)."""
    if name == "devices" and "device_kind" in out:
        return (f"{out['device_count']} x {out['device_kind']}, JAX {out['jax']}, {out['platform_version']}, bf16 "
                f"matmul {out['bf16_matmul_tflops']:.3g} TFLOP/s measured ({out['matmul_size']}^3), specification "
                f"{_fmt(out.get('spec_tflops'))} TFLOP/s, memory {_gib(out['memory_limit_bytes'])}")
    parts = []
    if "model" in out:
        parts.append(f"{out['model']}, {out['frames']} frames" + (f", {out['tokens']} tokens" if "tokens" in out else ""))
    if "lm_head_tokens" in out:
        parts.append(f"LM head on {out['lm_head_tokens']} positions, remat {out['remat']}")
    if "batch_speedup" in out:
        parts.append(f"questions/s largest batch / batch 1: {out['batch_speedup']:.2f}x")
    if "auto" in out:
        parts.append(f"{out['heads']} heads, {out['tokens']} tokens, auto picks {out['auto']}")
    return ", ".join(parts)


def table_rows(results: dict) -> list[tuple[str, str, str, str]]:
    """(section, case, status, result) rows: one per section, then one per case."""
    rows = []
    for name, out in results["sections"].items():
        note = _first_line(out.get("reason") or out.get("error"))
        rows.append((name, "", out["status"], "; ".join(x for x in (section_facts(name, out), note) if x)))
        rows += [(name, _case_label(c), c["status"], _case_result(c)) for c in out.get("cases", [])]
    return rows


def format_table(results: dict) -> str:
    rows = [("section", "case", "status", "result")] + table_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [" | ".join(r[i].ljust(widths[i]) for i in range(3)) + " | " + r[3] for r in rows]
    lines.insert(1, "-" * min(160, max(len(line) for line in lines)))
    return "\n".join(lines)


def markdown_block(results: dict, command: str) -> str:
    dev = results["sections"].get("devices", {})
    kind = dev.get("device_kind", "device not reported")
    machine = (f"{dev['device_count']} x {kind}, JAX {dev['jax']}, Python {dev['python']}" if "jax" in dev
               else "not reported (the devices section did not finish)")
    lines = [f"- {section}{' / ' + case if case else ''}: **{status}**{': ' + facts if facts else ''}"
             for section, case, status, facts in table_rows(results)]
    lines.append(f"- total {results.get('total_s', 0):.0f} s of a {results['budget_s']:.0f} s budget"
                 + ("; smoke sizes (tiny model, CPU): not a measurement" if results["smoke"] else ""))
    with contextlib.redirect_stdout(io.StringIO()):  # record() prints; the table is printed once, at the end
        return record(f"device check: {kind}", command, lines, write=False, machine_text=machine)
