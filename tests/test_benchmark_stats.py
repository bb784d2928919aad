"""The benchmarks' reading of a target: the median's distribution-free interval
(``common.median_ci``), the verdict it gives (``common.verdict``), and the pooling of runs
(``benchmarks/pool_runs.py``)."""

from __future__ import annotations

import json
import math
import os
import random
import re
import statistics

import pytest
import torch

from helpers import benchmark_module


def _binom_cdf(n: int, k: int) -> float:
    """P(Bin(n, ½) ≤ k), exact."""
    return sum(math.comb(n, j) for j in range(k + 1)) / 2 ** n


@pytest.mark.parametrize("n", list(range(1, 41)))
def test_median_ci_is_the_widest_pair_that_reaches_the_level(n):
    common = benchmark_module("common")
    values = [float(v) for v in random.Random(n).sample(range(1000), n)]
    lo, hi, coverage = common.median_ci(values)
    xs = sorted(values)
    k = xs.index(lo) + 1
    assert hi == xs[n - k]  # the k-th smallest and the k-th largest
    assert coverage == pytest.approx(1 - 2 * _binom_cdf(n, k - 1), abs=1e-12)
    assert lo <= statistics.median(values) <= hi
    if coverage >= 0.95:  # the next pair inward would fall short of 95 %
        assert 2 * (k + 1) > n + 1 or 1 - 2 * _binom_cdf(n, k) < 0.95
    else:  # only below n = 6, and then the interval is [min, max]
        assert n < 6 and (lo, hi) == (xs[0], xs[-1])


def test_median_ci_covers_the_true_median_as_stated():
    """Skewed draws (log-normal, true median 1): the interval's coverage matches 96.1 % at n = 9
    (4,000 trials: SE 0.3 %)."""
    common = benchmark_module("common")
    rng = random.Random(0)
    trials, hits = 4000, 0
    for _ in range(trials):
        lo, hi, coverage = common.median_ci([rng.lognormvariate(0.0, 1.0) for _ in range(9)])
        hits += lo <= 1.0 <= hi
    assert coverage == pytest.approx(0.9609375)
    assert abs(hits / trials - 0.9609375) < 0.012


def test_median_ci_ignores_nan_and_handles_empty():
    common = benchmark_module("common")
    assert common.median_ci([1.0, math.nan, 2.0, 3.0, 4.0, 5.0, 6.0])[:2] == (1.0, 6.0)
    lo, hi, coverage = common.median_ci([math.nan])
    assert math.isnan(lo) and math.isnan(hi) and coverage == 0.0
    assert common.fmt_ci([]) == "n/a"


def test_verdict_reads_the_interval_not_only_the_median():
    common = benchmark_module("common")
    tight = [1.00, 1.01, 1.02, 1.03, 1.04, 1.05, 1.06, 1.07, 1.08]  # CI [1.01, 1.07]
    assert common.verdict(tight, 1.10) == "met"
    assert common.verdict(tight, 1.05).startswith("met by the median")
    assert common.verdict(tight, 1.03).startswith("**missed by the median**")
    assert common.verdict(tight, 1.00) == "**missed**"
    assert common.verdict([math.nan], 1.1).startswith("**n/a**")
    assert common.fmt_ci([1.0, 1.1, 1.2, 1.3, 1.4]) == "1.200× [1.000, 1.400, 93.8 %]"  # n = 5 says its coverage
    assert common.verdict([1.0, 1.1, 1.2, 1.3, 1.4], 1.5) == "met (too few rounds for 95 %: the interval covers 93.8 %)"


def test_pool_runs_pairs_rounds_and_pools_them(tmp_path):
    pool = benchmark_module("pool_runs")

    def suite_run(ratios, adjusted_by):
        plain = [{"fit_s": 10.0, "val_step_s": 1.0} for _ in ratios]
        suite = [{"fit_s": 10.0 * r, "val_step_s": adjusted_by} for r in ratios]
        return {"runs": {"plain": plain, "suite": suite, "dense": []}}

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(suite_run([1.1, 1.2, 1.3], 1.0)))
    b.write_text(json.dumps(suite_run([1.15, 1.25, 1.35, 1.45], 1.25)))  # adjusted ÷ 1.25
    raw, adjusted = pool.round_ratios(json.loads(b.read_text()), None)
    assert raw == pytest.approx([1.15, 1.25, 1.35, 1.45])
    assert adjusted == pytest.approx([0.92, 1.0, 1.08, 1.16])
    table = pool.pooled_table([str(a), str(b)], None, 1.25)
    pooled = next(line for line in table.splitlines() if line.startswith("| **pooled**"))
    assert "| 7 |" in pooled and "1.250×" in pooled  # median of the seven raw ratios
    assert "raw — met by the median" in table

    disp = {"runs": {"mlp|plain": [{"ms_per_step": 10.0, "calib_ms": 5.0}] * 3,
                     "mlp|dispersion": [{"ms_per_step": 10.5, "calib_ms": 5.0},
                                        {"ms_per_step": 11.0, "calib_ms": 5.5},
                                        {"ms_per_step": 10.2}]}}
    raw, adjusted = pool.round_ratios(disp, "mlp")
    assert raw == pytest.approx([1.05, 1.10, 1.02])
    assert adjusted[:2] == pytest.approx([1.05, 1.0]) and math.isnan(adjusted[2])
    with pytest.raises(SystemExit, match="no 'cnn|dispersion'"):
        pool.round_ratios(disp, "cnn")


def test_step_blocks_schedule_and_pair_ratios():
    """``benchmarks/step_blocks.py``: the measured block alternates within pairs, and a pair's
    ratio is measured over unmeasured, each block's first step (the switch) left out."""
    sb = benchmark_module("step_blocks")
    flags = [sb.block_measured(s, 2) for s in range(8)]
    assert flags == [True, True, False, False, False, False, True, True]  # pair 0: first block; pair 1: second
    times = {0: 9.0, 1: 2.0, 2: 9.0, 3: 1.0,  # pair 0: measured (2.0) / unmeasured (1.0)
             4: 9.0, 5: 1.0, 6: 9.0, 7: 4.0}  # pair 1: unmeasured (1.0), then measured (4.0)
    measured = {s: f for s, f in enumerate(flags)}
    assert sb.pair_ratios(times, 2, measured) == pytest.approx([2.0, 4.0])
    del times[7]  # a pair without one of its blocks is left out
    assert sb.pair_ratios(times, 2, measured) == pytest.approx([2.0])


def test_hook_split_times_every_phase_of_a_measured_step(capsys, monkeypatch):
    """``benchmarks/hook_split.py`` (a short run): a row per phase of the measured step, each with
    a plain and a hooked time, the extras summed, and the ops timed alone."""
    split = benchmark_module("hook_split")
    monkeypatch.setattr("sys.argv", ["hook_split.py", "--steps", "20"])
    split.main()
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ") and "µs" not in line}
    for phase in ("arm", "forward", "backward", "read sums", "‖ḡ_k‖²", "row", "optimizer step"):
        cells = [c.strip() for c in rows[phase].split("|")[2:5]]
        assert all(c.lstrip("+-").isdigit() for c in cells), rows[phase]
    assert "**sum of the medians**" in out and "timed alone" in out
    for kind in ("plain", "no-op global forward hook", "ghost-norm hooks armed"):
        assert f"* forward, {kind}: " in out
    own = re.search(r"timed inside them \(20 steps; medians\): forward (\d+) µs, backward (\d+) µs", out)
    assert own is not None and int(own.group(2)) > 0, out


def test_per_sample_pass_memory_shows_the_running_sum_as_one_gradient(capsys, monkeypatch):
    """``benchmarks/per_sample_pass_memory.py`` (one round, a 0.27 M-parameter MLP one sample at a
    time, fresh child processes): with glibc's mmap threshold fixed, the pass that keeps ``Σ_i g_i``
    peaks at least one per-sample gradient above the one that does not, which stays under two."""
    import os

    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs")
    bench = benchmark_module("per_sample_pass_memory")
    monkeypatch.setattr("sys.argv", ["per_sample_pass_memory.py", "--rounds", "1", "--width", "256", "--batch", "8",
                                     "--budget-mib", "1"])  # one sample at a time, as the default on a large model
    bench.main()
    out = capsys.readouterr().out
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): float(line.split("|")[4])
            for line in out.splitlines() if line.startswith("| ") and "MiB" not in line and "---" not in line}
    assert len(rows) == 6, out
    fixed = {what: v for (alloc, what), v in rows.items() if alloc.startswith("mmap")}
    # (on a model this small vmap's own temporaries add about half a gradient to either)
    assert fixed["pass, running sum"] - fixed["pass, no running sum"] >= 0.8, out
    assert fixed["pass, no running sum"] < 2.0, out
    assert "The pass's time" in out


def test_kernel_floor_times_every_route_and_the_callbacks_hooks(capsys, monkeypatch):
    """``benchmarks/kernel_floor.py`` (a short run): every route to the row norms and to ``‖ḡ‖²``
    with a time and an error — the hooks' own routes exact to float64's 3e-7, the fp32 multi-tensor
    norm visibly less so —, the three placements of ``‖ḡ_k‖²`` in a step, and Lightning's profile
    with the callback's own hooks counted as extra."""
    import logging

    floor = benchmark_module("kernel_floor")
    monkeypatch.setattr("sys.argv", ["kernel_floor.py", "--steps", "12", "--reps", "3"])
    level = logging.getLogger("lightning.pytorch").level
    floor.main()
    # (it quiets Lightning's logger for its fit only: a level left behind hid the INFO lines
    # later tests of this process read)
    assert logging.getLogger("lightning.pytorch").level == level
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| ") and "---" not in line}
    ours_rows = rows[next(k for k in rows if k.startswith("`_rowsq`"))]
    assert len(ours_rows) == 3
    for cell in ours_rows:
        m = re.fullmatch(r"([\d.]+) µs \(([\d.e+-]+)\)", cell)
        assert m is not None and float(m.group(2)) <= 3e-7, cell
    pieces = rows[next(k for k in rows if k.startswith("`squared_pieces`"))]
    fp32 = rows["`_foreach_norm`, fp32"]
    assert float(pieces[2]) <= 3e-7 < float(fp32[2]), (pieces, fp32)
    for where in ("plain", "after the backward (ours)", "in post-accumulate-grad hooks", "after the optimizer step",
                  "one fp32 multi-tensor norm after the backward (not taken)"):
        assert re.fullmatch(r"\d+", rows[where][0]), rows[where]
    reads = [k for k in rows if k.startswith("the per-sample norms") or k.startswith("`‖ḡ_k‖²`")]
    assert len(reads) == 2 and all(re.fullmatch(r"\d+", c) for k in reads for c in rows[k]), reads
    hooks = [k for k in rows if "GradientDispersion" in k and "on_before_optimizer_step" in k]
    assert len(hooks) == 1 and rows[hooks[0]][0] == "–" and rows[hooks[0]][2].startswith("+"), hooks
    assert "run_training_batch" in rows


def test_peak_rss_reads_the_file_backed_growth_and_the_tables_report_it():
    """``common.PeakRSS`` reads ``RssFile`` on entry and exit (a file mapped and read inside the
    block counts; an anonymous allocation does not), and ``overhead_dispersion.tables`` reports the
    medians for the measured configuration beside its baseline's."""
    import mmap
    import os
    import tempfile

    common = benchmark_module("common")
    if common.status_kib("RssFile") is None:
        pytest.skip("no /proc/self/status RssFile here")
    with tempfile.NamedTemporaryFile() as fh:
        fh.write(os.urandom(8 * 2**20))
        fh.flush()
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            with common.PeakRSS() as peak:
                total = sum(mapped[i] for i in range(0, len(mapped), 4096))  # touch every page
            assert total >= 0
        with common.PeakRSS() as anon:
            block = bytearray(16 * 2**20)
            block[::4096] = b"\x01" * len(block[::4096])
    assert peak.file_growth_mib == pytest.approx(8.0, abs=1.0)
    assert abs(anon.file_growth_mib) < 1.0 and anon.growth_mib > 10.0

    od = benchmark_module("overhead_dispersion")
    run = {"ms_per_step": 1.0, "peak_growth_mib": 30.0, "maxrss_mib": 900.0, "base_mib": 0.0}
    results = {("mlp", "plain"): [dict(run, file_growth_mib=1.0)] * 3,
               ("mlp", "dispersion"): [dict(run, ms_per_step=1.1, peak_growth_mib=36.0, file_growth_mib=4.5)] * 3}
    text = od.tables(results, ["mlp"], raw=False, suite=False)
    assert "* mlp, dispersion: 4.5 MiB against 1.0 for plain (medians)" in text


def test_memory_breakdown_probe_reads_anonymous_growth_and_mappings():
    """``memory_breakdown.MemoryProbe``: an anonymous block touched between its start and a hook
    shows in its anonymous peak (not in ``libtorch_cpu.so``'s pages); ``_by_mapping`` names the
    mappings it sums."""
    common = benchmark_module("common")
    if common.status_kib("RssAnon") is None:
        pytest.skip("no /proc/self/status RssAnon here")
    mb = benchmark_module("memory_breakdown")

    class Trainer:
        global_step = 7

    import mmap

    probe = mb.MemoryProbe()
    probe.on_fit_start(Trainer(), None)
    # an anonymous mapping of its own (a bytearray may come from heap pages already resident,
    # once an earlier test has moved glibc's mmap threshold up)
    block = mmap.mmap(-1, 24 * 2**20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range(0, len(block), 4096):
        block[i] = 1
    probe.on_after_backward(Trainer(), None)
    summary = probe.summary()
    assert summary["anon_peak_mib"] > 20.0 and summary["anon_peak_at"] == "after backward, step 7"
    assert abs(summary["maps_mib"]["libtorch_cpu.so"]) < 4.0
    assert set(summary["maps_mib"]) == set(mb.MAPPINGS)
    maps = mb._by_mapping()
    assert maps.get("libtorch_cpu.so", 0) > 0 and "[anon]" in maps
    block.close()


@pytest.mark.parametrize("measure, steps", [("none", 0), ("first", 1)])
def test_memory_breakdown_measures_the_steps_it_is_told(measure, steps):
    """``memory_breakdown.py --measure``: the dispersion's child set up as usual (its backend
    chosen before step 0) measures no step, or step 0 only — the split of round 32 (how much of
    the peak growth the set-up leaves)."""
    import subprocess
    import sys

    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    out = subprocess.run([sys.executable, os.path.join(here, "memory_breakdown.py"), "--child", "mlp", "dispersion",
                          "--steps", "4", "--measure", measure], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1])
    assert res["backend"] == "hooks" and res["measured_steps"] == steps


def test_in_process_cpu_report_reads_time_targets_only():
    """``overhead_dispersion --in-process`` on the CPU: the time target is read, the memory
    target is not (the heap carries from fit to fit), and the title says so."""
    import argparse

    od = benchmark_module("overhead_dispersion")
    run = {"ms_per_step": 1.0, "peak_growth_mib": 30.0, "maxrss_mib": 900.0, "base_mib": 0.0, "params": 1e6,
           "warmup": 3, "steps": 10, "file_growth_mib": 1.0, "calib_ms": 1.0}
    results = {("mlp", "plain"): [run] * 5,
               ("mlp", "dispersion"): [dict(run, ms_per_step=1.05, peak_growth_mib=45.0, calib_ms=1.0)] * 5}
    args = argparse.Namespace(device="cpu", in_process=True, mmap_threshold=0, steady_heap=False, rounds=5, raw=False)
    text = od.report(args, ["mlp"], set(), od.machine_description(), results, ["0 0 0"], {}, 5)
    assert "every fit in one process" in text
    assert "time ≤ 1.10× plain" in text and "peak growth ≤ 1.2× plain" not in text
    args.in_process = False
    assert "peak growth ≤ 1.2× plain — measured 1.500×" in od.report(
        args, ["mlp"], set(), od.machine_description(), results, ["0 0 0"], {}, 5)


def test_tables_adjust_by_the_calibration_before_fit_when_there_is_one():
    """``overhead_dispersion --calibrate-before``: the ratio over each process's speed before ``fit``
    ((1.2 / 2) / (1.0 / 1) = 0.6 here, where the calibration after ``fit`` gives 1.2) and each
    configuration's after/before drift are reported; without the field, no such line."""
    od = benchmark_module("overhead_dispersion")
    run = {"ms_per_step": 1.0, "peak_growth_mib": 30.0, "maxrss_mib": 900.0, "base_mib": 0.0,
           "file_growth_mib": 1.0, "calib_ms": 1.0, "calib_before_ms": 1.0}
    results = {("mlp", "plain"): [run] * 3,
               ("mlp", "dispersion"): [dict(run, ms_per_step=1.2, calib_before_ms=2.0)] * 3}
    text = od.tables(results, ["mlp"], raw=False, suite=False)
    assert "* mlp: 0.600×" in text.split("calibration *before*")[1]
    assert "plain 1.000×" in text and "dispersion 0.500×" in text
    assert od.before_adjusted_ratio(results[("mlp", "dispersion")][0], run) == pytest.approx(0.6)
    assert "calibration *before*" not in od.tables(
        {k: [{kk: vv for kk, vv in x.items() if kk != "calib_before_ms"} for x in v] for k, v in results.items()},
        ["mlp"], raw=False, suite=False)


def test_malloc_callers_aggregates_a_dump_by_its_named_frames(tmp_path):
    """``malloc_callers._callers`` sums the hits of the shim's stacks by their first named frames
    (unnamed frames skipped), so two stacks that differ only in addresses count together."""
    mc = benchmark_module("malloc_callers")
    dump = tmp_path / "d.txt"
    dump.write_text("== 30\n  libc.so(malloc+0x1) [0x1]\n  libtorch.so(_ZfooImpl+0x2) [0x2]\n  python() [0x3]\n"
                    "== 12\n  libc.so(malloc+0x5) [0x9]\n  libtorch.so(_ZfooImpl+0x7) [0x8]\n"
                    "== 5\n  libc.so(malloc+0x1) [0x1]\n  libtorch.so(_Zbar+0x2) [0x2]\n")
    out = mc._callers(str(dump))
    assert out == {"malloc <- _ZfooImpl": 42, "malloc <- _Zbar": 5}


def test_piece_norms_in_situ_times_every_variant(capsys, monkeypatch):
    """``benchmarks/piece_norms_in_situ.py`` (a short run): a row per variant, each with its step
    time and its extra over plain training as a median with an interval."""
    bench = benchmark_module("piece_norms_in_situ")
    monkeypatch.setattr("sys.argv", ["piece_norms_in_situ.py", "--steps", "12"])
    bench.main()
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    for variant in ("gather", "apart", "in the backward", "after the optimizer step"):
        assert re.search(r"\| \d+ \| [+-]\d+ \[[+-]\d+, [+-]\d+\] \|$", rows[variant]), rows[variant]
    assert "plain training" in rows


def test_step_ablation_schedule_and_switches():
    """``benchmarks/step_ablation.py``: the block kinds rotate per triple (each kind once a triple),
    and each ablation changes its part of the per-step path and restores it."""
    ab = benchmark_module("step_ablation")
    kinds = [ab.kind_of(s, 2, 2) for s in range(2 + 18)]
    assert kinds[:2] == ["measured", "measured"]  # (the warm-up)
    triples = [kinds[2 + 6 * t: 8 + 6 * t: 2] for t in range(3)]
    assert triples == [["unmeasured", "measured", "changed"], ["measured", "changed", "unmeasured"],
                       ["changed", "unmeasured", "measured"]]
    from genbounds.estimators import functional
    from genbounds.estimators.ghost_norms import step_rows

    for name, owner, attr in (("no-piece-norms", functional._PiecePlan, "norms_into"),
                              ("no-row-norms", step_rows, "goodfellow_row_norms")):
        real = getattr(owner, attr)
        switch = ab.ablation_switch(name)
        switch(True)
        assert getattr(owner, attr) is not real
        switch(False)
        assert getattr(owner, attr) is real
    plan = functional.piece_plan([torch.zeros(64, 1024), torch.zeros(10), torch.zeros(3, 1024)])
    assert plan is not None and plan.apart is not None
    switch = ab.ablation_switch("gather")
    switch(True)
    assert plan.apart is None and plan.gather_buffer.shape == (4, 1024)
    switch(False)
    assert plan.apart is not None


_HEAP_CHURN = """
import ctypes, resource
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
MiB = 1 << 20
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def touch_and_free(n):
    blocks = [libc.malloc(4 * MiB) for _ in range(n)]
    for b in blocks:
        ctypes.memset(b, 1, 4 * MiB)
    for b in reversed(blocks):
        libc.free(b)
touch_and_free(1)  # mmapped (above the 128 KiB start), freed: the thresholds move to 4 and 8 MiB
touch_and_free(3)  # from the heap's top: 12 MiB free there afterwards
before = faults()
for _ in range(10):
    touch_and_free(3)
print((faults() - before) / 10)
"""


def _faults_per_round(env: dict[str, str] | None) -> float:
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _HEAP_CHURN], env={**base, **(env or {})}, capture_output=True,
                         text=True, timeout=60, check=True)
    return float(out.stdout.strip())


def test_steady_heap_stops_the_trim_and_regrow_every_step():
    """``overhead_dispersion --steady-heap``: glibc's default trims a heap top with more than twice
    the largest freed mmapped block free, so a loop that frees 12 MiB there after a 4 MiB block was
    unmapped faults thousands of pages in again every round (about 2,000 here: glibc keeps a pad
    and part of the top); under ``STEADY_HEAP_ENV`` it faults none.
    ``common.minor_faults`` counts them (the control: the default does fault)."""
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's malloc only")
    od = benchmark_module("overhead_dispersion")
    churn = _faults_per_round(None)
    steady = _faults_per_round(od.STEADY_HEAP_ENV)
    assert churn > 1000, churn  # at least 4 MiB of the 12 trimmed and faulted in again each round
    assert steady < 50, steady

    common = benchmark_module("common")
    import mmap

    before = common.minor_faults()
    block = mmap.mmap(-1, 8 * 2**20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range(0, len(block), 4096):
        block[i] = 1
    assert common.minor_faults() - before >= 2048 * 0.9  # (transparent huge pages would fault fewer)
    block.close()


def test_tables_report_each_configurations_page_faults():
    """The tables list the minor page faults per timed step of every configuration (median
    [min–max]); runs without the field (older JSON) list none."""
    od = benchmark_module("overhead_dispersion")
    run = {"ms_per_step": 1.0, "peak_growth_mib": 30.0, "maxrss_mib": 900.0, "base_mib": 0.0}
    results = {("mlp", "plain"): [dict(run, faults_per_step=f) for f in (0.2, 150.0, 0.4)],
               ("mlp", "dispersion"): [dict(run, ms_per_step=1.1, faults_per_step=f) for f in (5.0, 3.0, 80.0)]}
    text = od.tables(results, ["mlp"], raw=False, suite=False)
    assert "* mlp, plain: 0.4 [0.2–150.0]" in text and "* mlp, dispersion: 5.0 [3.0–80.0]" in text
    bare = {k: [{kk: vv for kk, vv in x.items() if kk != "faults_per_step"} for x in v] for k, v in results.items()}
    assert "page faults" not in od.tables(bare, ["mlp"], raw=False, suite=False)


def test_capture_routes_times_every_route_and_the_walk_finds_the_hooks_products(capsys, monkeypatch):
    """``benchmarks/capture_routes.py`` (a short run): the graph walk finds the MLP's three
    products and their row norms equal the global hook's (checked before timing: the run would
    raise); a row per route, with and without the norms."""
    bench = benchmark_module("capture_routes")
    monkeypatch.setattr("sys.argv", ["capture_routes.py", "--rounds", "2", "--block", "3"])
    bench.main()
    out = capsys.readouterr().out
    assert "equal (`torch.equal`)" in out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    for route in bench.ROUTES:
        for label in (f"{route}, with the row norms", f"{route}, route only"):
            assert re.search(r"\| \d+ \| [+-]\d+ \[[+-]\d+, [+-]\d+\] \|$", rows[label]), rows[label]


def test_capture_routes_walk_misses_no_product_and_ignores_other_weights():
    """The walk of ``capture_routes.Capture`` puts one pre-hook per hooked Linear call, none on
    an unhooked Linear's product, and two on a Linear called twice (both calls are products of
    its weight); its row norms are each call's own."""
    bench = benchmark_module("capture_routes")
    torch.manual_seed(0)
    a, b, other = torch.nn.Linear(6, 5), torch.nn.Linear(5, 5), torch.nn.Linear(5, 3)
    cap = bench.Capture([a, b], batch=4)
    x = torch.randn(4, 6)
    h1 = torch.relu(a(x))
    loss = other(b(torch.relu(b(h1)))).square().sum()
    cap.walk(loss)
    loss.backward()
    assert cap.found == 3  # a once, b twice, other never
    assert torch.allclose(cap.pairs[1, 0], x.norm(dim=1))
