# Turns the bench's raw rows into what a reader compares: fractions of the machine's measured roofs, speed-ups over
# the stock reference, a printed table and the JSON document (bench.cli writes it). Last step after runner.py.
from __future__ import annotations

from datetime import datetime, timezone

SCHEMA = "tinygptv-bench/1"


def _ratio(a, b):
    return a / b if a is not None and b else None


def derive(rows: list[dict], machine: dict) -> None:
    """Add the derived fields to every successful row, from the reported numbers only, so a reader can redo them:
    bound_tok_s = bandwidth / weight bytes per token; decode_fraction_of_bound = decode tok/s x bytes / bandwidth;
    encode_fraction = encode GFLOP/s / GEMM GFLOP/s of the tower's dtype; speedup_* against the reference row."""
    bandwidth = machine.get("bandwidth", {}).get("gb_s") if machine.get("ok") else None
    gemm = {k: v["gflop_s"] for k, v in machine.get("gemm", {}).items()} if machine.get("ok") else {}
    ref = next((r for r in rows if r.get("kind") == "reference" and r.get("ok")), None)
    for row in rows:
        if not row.get("ok"):
            continue
        nbytes, decode = row["weight_bytes_per_token"], row["decode_tok_s"]
        row["achieved_gb_s"] = decode * nbytes / 1e9
        row["bound_tok_s"] = _ratio(bandwidth * 1e9, nbytes) if bandwidth else None
        row["decode_fraction_of_bound"] = _ratio(decode * nbytes, bandwidth * 1e9) if bandwidth else None
        enc = row.get("encode_gflop_s")
        row["encode_gemm"] = "fp32" if row.get("vision_dtype") == "float32" else "bf16"
        row["encode_fraction"] = _ratio(enc, gemm.get(row["encode_gemm"]))
        row["encode_fraction_of_bf16_gemm"] = _ratio(enc, gemm.get("bf16"))
        row["speedup_decode"] = _ratio(decode, ref["decode_tok_s"]) if ref else None
        row["speedup_prefill"] = _ratio(row["prefill_tok_s"], ref["prefill_tok_s"]) if ref else None
        row["speedup_encode"] = _ratio(ref["encode_s"], row["encode_s"]) if ref else None
        row["speedup_e2e"] = _ratio(ref["e2e_s"], row["e2e_s"]) if ref else None


def assemble(settings: dict, rows: list[dict]) -> dict:
    machine = next((r for r in rows if r.get("kind") == "machine"), {"ok": False, "error": "not measured"})
    measured = [r for r in rows if r.get("kind") != "machine"]
    derive(measured, machine)
    return {
        "schema": SCHEMA,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "machine": machine,
        "rows": measured,
    }


def _num(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def machine_lines(machine: dict) -> list[str]:
    if not machine.get("ok"):
        return [f"machine: not measured ({machine.get('error', 'unknown error')}); fractions are left out"]
    bw, gemm = machine["bandwidth"], machine["gemm"]
    where = machine.get("gpu") or machine["cpu"]
    return [
        f"machine: {where}, {machine['threads']} threads ({machine['cpu_count']} CPUs), torch {machine['torch']}, "
        f"transformers {machine['transformers']}",
        f"roofs:   memory bandwidth {bw['gb_s']:.1f} GB/s ({bw['method']}); "
        f"GEMM {gemm['fp32']['shape']}: fp32 {gemm['fp32']['gflop_s']:.0f}, bf16 {gemm['bf16']['gflop_s']:.0f} GFLOP/s",
    ]


COLUMNS = (
    ("mode", "<", lambda r: r["mode"]),
    ("load s", ">", lambda r: _num(r["load_s"], ".1f")),
    ("1st answer s", ">", lambda r: _num(r.get("first_answer_s"), ".2f")),
    ("encode s/img", ">", lambda r: _num(r["encode_s"], ".3f")),
    ("enc GFLOP/s", ">", lambda r: _num(r.get("encode_gflop_s"), ".1f")),
    ("enc %GEMM", ">", lambda r: _pct(r.get("encode_fraction")) + (f" {r['encode_gemm']}"
                                                                     if r.get("encode_fraction") else "")),
    ("prefill tok/s", ">", lambda r: _num(r["prefill_tok_s"], ".1f")),
    ("decode tok/s", ">", lambda r: _num(r["decode_tok_s"], ".2f")),
    ("% of bound", ">", lambda r: _pct(r.get("decode_fraction_of_bound"))),
    ("x ref", ">", lambda r: _num(r.get("speedup_decode"), ".2f")),
    ("e2e s", ">", lambda r: _num(r["e2e_s"], ".2f")),
    ("peak RSS GB", ">", lambda r: _num(r["peak_rss_bytes"], ".2f", 1e-9)),
)
VRAM_COLUMN = ("peak VRAM GB", ">", lambda r: _num(r.get("peak_vram_bytes"), ".2f", 1e-9))


def format_table(result: dict) -> str:
    rows = result["rows"]
    columns = list(COLUMNS) + ([VRAM_COLUMN] if result["settings"].get("device") == "cuda" else [])
    ok = [r for r in rows if r.get("ok")]
    cells = [[c[0] for c in columns]] + [[c[2](r) for c in columns] for r in ok]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = machine_lines(result["machine"])
    if ok:
        first = ok[0]
        s = result["settings"]
        lines.append(
            f"workload: {s['model']}, {first['image_size']} px image -> {first['vision_tokens']} vision tokens -> "
            f"{first['image_embeddings']} embeddings; prefill {first['prefill_tokens']} tokens "
            f"({s['prompt_tokens']} text); {s['new_tokens']} new tokens greedy; {s['warmup']} warm-up, "
            f"median of {s['repeats']}")
    lines.append("")
    for row in cells:
        lines.append("  ".join(f"{v:{c[1]}{w}}" for v, c, w in zip(row, columns, widths)))
    for r in rows:
        if not r.get("ok"):
            lines.append(f"{r['mode']}: FAILED: {r['error']}")
    for r in ok:
        if r.get("backend", "torch") != "torch" and r.get("rss_file_bytes") is not None:
            lines.append(f"{r['mode']}: resident at the end {r['rss_anon_bytes'] / 1e9:.2f} GB anonymous + "
                         f"{r['rss_file_bytes'] / 1e9:.2f} GB of mapped files (the engine's weight files, kept after "
                         "it repacked them: the kernel can drop those pages under memory pressure)")
        if r.get("first_load"):
            first = r["first_load"]
            what = "converting" if first["converted"] else "the conversion was already cached"
            lines.append(f"{r['mode']}: first load {first['load_s']:.1f} s ({what}), peak RSS "
                         f"{first['peak_rss_bytes'] / 1e9:.2f} GB; the row's load s and peak RSS are of a later load")
    lines += [
        "",
        "% of bound = decode tok/s x weight bytes per token / bandwidth; enc %GEMM = encode GFLOP/s / GEMM GFLOP/s "
        "of the tower's dtype; x ref = decode tok/s / reference decode tok/s (docs/bench.md)",
    ]
    return "\n".join(lines)
