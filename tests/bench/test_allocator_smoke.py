"""Smoke test of the allocator benchmark on tiny-random: every allocator that is installed runs
the training children it was asked for, and the children really ran under the setting named."""

from __future__ import annotations

import json

from bench import allocator as bench


def test_allocators_each_run_the_variant_and_glibc_is_the_unit(tmp_path):
    out = tmp_path / "allocator.json"
    bench.main(["--smoke", "--rounds", "1", "--variants", "off", "--out", str(out)])

    result = json.loads(out.read_text())
    installed = [name for name, env in bench.allocators().items() if env is not None]
    assert set(result["figures"]) == set(installed) >= {"glibc", "glibc_mmap_2mib"}
    assert result["not_installed"] == [n for n in bench.allocators() if n not in installed]
    for name in installed:
        fig = result["figures"][name]["off"]
        assert fig["rounds"] == 1 and fig["peak_rss_mb"] > 0 and fig["median_step_s"] > 0
    assert result["ratios"]["glibc"] == {
        "off_peak_rss_vs_glibc": 1.0,
        "off_step_time_vs_glibc": 1.0,
    }


def test_each_allocator_sets_its_own_environment():
    envs = bench.allocators()
    assert envs["glibc"]["TETHER_HEAP_MMAP_THRESHOLD_KB"] == "0"
    assert envs["glibc_mmap_2mib"]["TETHER_HEAP_MMAP_THRESHOLD_KB"] == "2048"
    assert not envs["glibc"]["LD_PRELOAD"] and not envs["glibc_mmap_2mib"]["LD_PRELOAD"]
    if envs["jemalloc"] is not None:
        assert "jemalloc" in envs["jemalloc"]["LD_PRELOAD"]
