"""The benchmark's section on FerretDB's compare-and-set patch flags a missed target."""

from __future__ import annotations

from typing import Any

from bench.cas_section import TARGET_SPEEDUP, summary, verdict
from bench.report import patch_section

from stockflow.stack.ferretdb_patches import BUILD, WITHOUT_CAS


def _round(stockflow: float, seed: float) -> dict[str, Any]:
    cpu = {"ferretdb": 0.1, "postgres": 0.1, "kafka": 0.05, "redis": 0.0}
    return {
        "stockflow": {
            "orders_per_s": stockflow,
            "audit_discrepancies": 0,
            "outcomes": 1000,
            "servers_cpu_s_per_1000": cpu,
        },
        "baseline": {"orders_per_s": seed, "orders_processed": 500, "servers_cpu_s_per_1000": cpu},
    }


def _section(with_patch: float, *, judged: bool = True) -> dict[str, Any]:
    """Results of a section where stockflow makes ``with_patch`` times the seed's rate on the
    patched build, and 50 times it without."""
    result: dict[str, Any] = {
        "workload": {"name": "zipf", "orders": 1000, "products": 10, "popularity": "zipf"},
        "target_speedup": TARGET_SPEEDUP,
        "target_judged": judged,
        "unpatched_build": WITHOUT_CAS.tag,
        "patched_build": BUILD.tag,
        "rounds": 1,
        "skipped": {},
        "builds": {
            WITHOUT_CAS.tag: summary([_round(5000, 100)]),
            BUILD.tag: summary([_round(with_patch * 100, 100)]),
        },
    }
    result.update(verdict(result))
    return result


def test_a_ratio_below_the_target_with_the_patch_is_flagged() -> None:
    missed = _section(TARGET_SPEEDUP - 1)
    assert missed["target_met"] is False
    assert missed["patch_change"]["stockflow"] < 0
    assert "MISSES 40x" in "\n".join(patch_section(missed))
    met = _section(TARGET_SPEEDUP)
    assert met["target_met"] is True
    assert "meets 40x" in "\n".join(patch_section(met))


def test_a_quick_run_is_not_judged() -> None:
    quick = _section(2.0, judged=False)
    assert quick["target_met"] is None
    assert "MISSES" not in "\n".join(patch_section(quick))
